//! The client's address behind load balancers and proxies, from `X-Forwarded-For`, the way
//! nginx's realip module computes it with `real_ip_recursive on`.
//!
//! Each proxy appends the address it received the request from, so the header reads
//! `client, proxy1, proxy2` and the socket peer is the last proxy. Walking from the right, every
//! hop that is a trusted proxy vouches for the address before it; the first untrusted one is the
//! client. Nothing is believed unless the socket peer itself is trusted: a client talking to
//! gitplane directly cannot choose its own address. Trusting only the load balancer's own
//! address, and not the ranges it forwards from, gives the load balancer's address instead of
//! the client's (the trap the Backlog ops notes describe with GCP's load balancer).

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// An address range such as `10.0.0.0/8`, `2001:db8::/32` or a single address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpRange {
    base: IpAddr,
    prefix: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an IP address or range (like 10.0.0.0/8 or 2001:db8::/32)")]
pub struct BadRange(pub String);

impl FromStr for IpRange {
    type Err = BadRange;

    fn from_str(s: &str) -> Result<Self, BadRange> {
        let bad = || BadRange(s.to_owned());
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let written: IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if written.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(bad)?,
            None => max,
        };
        let base = written.to_canonical();
        // `::ffff:a.b.c.d/N` written as IPv6: the same range in IPv4 terms.
        let prefix = if written.is_ipv4() == base.is_ipv4() {
            prefix
        } else {
            prefix.checked_sub(96).ok_or_else(bad)?
        };
        Ok(Self { base, prefix })
    }
}

impl fmt::Display for IpRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.base, self.prefix)
    }
}

impl IpRange {
    pub fn contains(&self, addr: IpAddr) -> bool {
        // IPv4-mapped IPv6 (what a dual-stack listener reports) compares as plain IPv4.
        match (self.base, addr.to_canonical()) {
            (IpAddr::V4(base), IpAddr::V4(a)) => {
                same_prefix(&base.octets(), &a.octets(), self.prefix)
            }
            (IpAddr::V6(base), IpAddr::V6(a)) => {
                same_prefix(&base.octets(), &a.octets(), self.prefix)
            }
            _ => false,
        }
    }
}

fn same_prefix(a: &[u8], b: &[u8], prefix: u8) -> bool {
    let bits = usize::from(prefix);
    let (whole, rest) = (bits / 8, bits % 8);
    if a.get(..whole) != b.get(..whole) {
        return false;
    }
    if rest == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rest);
    match (a.get(whole), b.get(whole)) {
        (Some(x), Some(y)) => x & mask == y & mask,
        _ => false,
    }
}

/// The client's address: `peer` (the socket's other end) unless it is a trusted proxy, in which
/// case the rightmost `X-Forwarded-For` entry that is not a trusted proxy. An entry that is not
/// an address (a proxy that writes `unknown`, a port, garbage) ends the walk at the last
/// address reached, which is trusted and so is the best that can be said.
pub fn client_addr(peer: IpAddr, x_forwarded_for: Option<&str>, trusted: &[IpRange]) -> IpAddr {
    let peer = peer.to_canonical();
    let is_trusted = |a: IpAddr| trusted.iter().any(|r| r.contains(a));
    let Some(header) = x_forwarded_for else {
        return peer;
    };
    let mut client = peer;
    for entry in header.rsplit(',') {
        if !is_trusted(client) {
            break;
        }
        match entry.trim().parse::<IpAddr>() {
            Ok(addr) => client = addr.to_canonical(),
            Err(_) => break,
        }
    }
    client
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ranges(list: &[&str]) -> Vec<IpRange> {
        list.iter().map(|r| r.parse().unwrap()).collect()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ranges_parse_and_match() {
        let r: IpRange = "10.0.0.0/8".parse().unwrap();
        assert!(r.contains(ip("10.255.1.2")));
        assert!(!r.contains(ip("11.0.0.1")));
        assert!(r.contains(ip("::ffff:10.1.1.1")), "mapped IPv4 matches");
        let r: IpRange = "35.191.0.0/16".parse().unwrap();
        assert!(r.contains(ip("35.191.200.3")) && !r.contains(ip("35.190.0.1")));
        let r: IpRange = "130.211.0.0/22".parse().unwrap();
        assert!(r.contains(ip("130.211.3.255")) && !r.contains(ip("130.211.4.0")));
        let r: IpRange = "2001:db8::/32".parse().unwrap();
        assert!(r.contains(ip("2001:db8:1::5")) && !r.contains(ip("2001:db9::1")));
        assert!(!r.contains(ip("10.0.0.1")));
        let one: IpRange = "192.0.2.7".parse().unwrap();
        assert!(one.contains(ip("192.0.2.7")) && !one.contains(ip("192.0.2.8")));
        let all: IpRange = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("203.0.113.1")));
        let mapped: IpRange = "::ffff:10.0.0.0/104".parse().unwrap();
        assert!(mapped.contains(ip("10.9.9.9")));
        for bad in [
            "",
            "10.0.0.0/33",
            "10.0.0/8",
            "::/129",
            "x",
            "10.0.0.0/",
            "::ffff:1.2.3.4/64",
        ] {
            assert!(bad.parse::<IpRange>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn untrusted_peers_cannot_choose_their_address() {
        let trusted = ranges(&["10.0.0.0/8"]);
        assert_eq!(
            client_addr(ip("203.0.113.9"), Some("1.2.3.4"), &trusted),
            ip("203.0.113.9")
        );
        assert_eq!(client_addr(ip("10.0.0.1"), None, &trusted), ip("10.0.0.1"));
        assert_eq!(
            client_addr(ip("10.0.0.1"), Some("1.2.3.4"), &[]),
            ip("10.0.0.1"),
            "no trusted proxies: the header is ignored"
        );
    }

    #[test]
    fn walks_back_through_trusted_hops_only() {
        // GCP's load balancer: `client, lb-address`, from its front-end range.
        let lb_range_only = ranges(&["130.211.0.0/22", "35.191.0.0/16"]);
        let header = Some("1.2.3.4, 35.186.1.1");
        assert_eq!(
            client_addr(ip("35.191.5.5"), header, &lb_range_only),
            ip("35.186.1.1"),
            "without the LB's own address trusted, its address is taken for the client"
        );
        let with_lb = ranges(&["130.211.0.0/22", "35.191.0.0/16", "35.186.1.1"]);
        assert_eq!(
            client_addr(ip("35.191.5.5"), header, &with_lb),
            ip("1.2.3.4")
        );
        // A client's own forged entries sit left of the first untrusted hop and are not reached.
        assert_eq!(
            client_addr(
                ip("10.0.0.2"),
                Some("6.6.6.6, 198.51.100.7, 10.0.0.9"),
                &ranges(&["10.0.0.0/8"])
            ),
            ip("198.51.100.7")
        );
        // Every hop trusted: the leftmost address.
        assert_eq!(
            client_addr(
                ip("10.0.0.2"),
                Some("10.1.1.1,10.2.2.2"),
                &ranges(&["10.0.0.0/8"])
            ),
            ip("10.1.1.1")
        );
        // IPv6 entries and mapped peers.
        assert_eq!(
            client_addr(
                ip("::ffff:10.0.0.2"),
                Some("2001:db8::5"),
                &ranges(&["10.0.0.0/8"])
            ),
            ip("2001:db8::5")
        );
    }

    #[test]
    fn garbage_entries_stop_at_the_last_trusted_hop() {
        let trusted = ranges(&["10.0.0.0/8"]);
        for header in [
            "unknown",
            "1.2.3.4:5678",
            "",
            " , ",
            "1.2.3.4, 10.0.0.3, bogus",
        ] {
            let got = client_addr(ip("10.0.0.2"), Some(header), &trusted);
            assert!(
                trusted[0].contains(got),
                "{header:?} gave {got}, which no trusted hop vouched for"
            );
        }
    }
}
