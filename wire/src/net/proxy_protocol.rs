//! The PROXY protocol header (HAProxy's spec, versions 1 and 2) that TCP load balancers put in
//! front of a connection to tell the server who the client is. SSH has no headers of its own,
//! so behind a TCP balancer this is the only way to learn the client's address.
//!
//! Sans-I/O: [`parse`] looks at the bytes received so far and says whether a whole header is
//! there, how long it is, and the source address it names. The caller only accepts it from
//! trusted balancers.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Version 2's fixed signature.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// Version 1's longest line, CRLF included (from the spec).
const V1_MAX: usize = 107;
/// Largest version 2 payload accepted (addresses plus TLVs); the spec's own bound is 64 KiB.
const V2_MAX_PAYLOAD: usize = 1024;
/// Bytes worth reading before deciding: a whole version 1 line or a version 2 header with its
/// largest accepted payload.
pub const MAX_HEADER: usize = 16 + V2_MAX_PAYLOAD;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyParse {
    /// A prefix of a header: read more.
    Incomplete,
    /// A whole header of `consumed` bytes. `source` is None for `UNKNOWN`, `LOCAL` (a health
    /// check from the balancer itself) and address families other than TCP over IPv4/IPv6.
    Complete {
        consumed: usize,
        source: Option<SocketAddr>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("the connection does not start with a PROXY protocol header")]
    NotProxy,
    #[error("malformed PROXY protocol header: {0}")]
    Malformed(&'static str),
}

/// Parses the header at the start of `buf`.
pub fn parse(buf: &[u8]) -> Result<ProxyParse, ProxyError> {
    if is_prefix_of(buf, V2_SIGNATURE) {
        return parse_v2(buf);
    }
    if is_prefix_of(buf, b"PROXY ") {
        return parse_v1(buf);
    }
    Err(ProxyError::NotProxy)
}

/// Whether `buf` and `signature` agree on their common length.
fn is_prefix_of(buf: &[u8], signature: &[u8]) -> bool {
    let n = buf.len().min(signature.len());
    buf.get(..n) == signature.get(..n)
}

fn parse_v1(buf: &[u8]) -> Result<ProxyParse, ProxyError> {
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        if buf.len() >= V1_MAX {
            return Err(ProxyError::Malformed(
                "version 1 line longer than 107 bytes",
            ));
        }
        return Ok(ProxyParse::Incomplete);
    };
    let consumed = end + 2;
    if consumed > V1_MAX {
        return Err(ProxyError::Malformed(
            "version 1 line longer than 107 bytes",
        ));
    }
    let line = std::str::from_utf8(&buf[..end])
        .map_err(|_| ProxyError::Malformed("version 1 line is not text"))?;
    let mut fields = line.split(' ');
    let _proxy = fields.next();
    let source = match fields.next() {
        Some("UNKNOWN") => None,
        Some(family @ ("TCP4" | "TCP6")) => {
            let parts: Vec<&str> = fields.collect();
            let [src, dst, sport, dport] = parts[..] else {
                return Err(ProxyError::Malformed("version 1 needs 4 address fields"));
            };
            let ip = |s: &str| -> Result<IpAddr, ProxyError> {
                let ip: IpAddr = s
                    .parse()
                    .map_err(|_| ProxyError::Malformed("bad address"))?;
                if ip.is_ipv4() != (family == "TCP4") {
                    return Err(ProxyError::Malformed("address does not match its family"));
                }
                Ok(ip)
            };
            let port = |s: &str| -> Result<u16, ProxyError> {
                // Decimal without sign or leading zeros, as the spec writes them.
                if s.is_empty()
                    || (s.len() > 1 && s.starts_with('0'))
                    || !s.bytes().all(|b| b.is_ascii_digit())
                {
                    return Err(ProxyError::Malformed("bad port"));
                }
                s.parse().map_err(|_| ProxyError::Malformed("bad port"))
            };
            let source = SocketAddr::new(ip(src)?, port(sport)?);
            ip(dst)?;
            port(dport)?;
            Some(source)
        }
        _ => return Err(ProxyError::Malformed("unknown version 1 protocol")),
    };
    Ok(ProxyParse::Complete { consumed, source })
}

fn parse_v2(buf: &[u8]) -> Result<ProxyParse, ProxyError> {
    let Some(head) = buf.get(..16) else {
        return Ok(ProxyParse::Incomplete);
    };
    let version_command = head[12];
    if version_command >> 4 != 2 {
        return Err(ProxyError::Malformed(
            "version 2 signature with another version",
        ));
    }
    let command = version_command & 0x0f;
    if command > 1 {
        return Err(ProxyError::Malformed("unknown version 2 command"));
    }
    let family = head[13];
    let len = usize::from(u16::from_be_bytes([head[14], head[15]]));
    if len > V2_MAX_PAYLOAD {
        return Err(ProxyError::Malformed("version 2 payload too long"));
    }
    let Some(payload) = buf.get(16..16 + len) else {
        return Ok(ProxyParse::Incomplete);
    };
    let consumed = 16 + len;
    if command == 0 {
        // LOCAL: the balancer's own connection (a health check); no client behind it.
        return Ok(ProxyParse::Complete {
            consumed,
            source: None,
        });
    }
    let source = match family {
        // TCP over IPv4: source and destination addresses, then ports.
        0x11 => {
            let a = payload
                .get(..12)
                .ok_or(ProxyError::Malformed("version 2 IPv4 addresses cut short"))?;
            let ip = Ipv4Addr::new(a[0], a[1], a[2], a[3]);
            Some(SocketAddr::new(ip.into(), u16::from_be_bytes([a[8], a[9]])))
        }
        0x21 => {
            let a = payload
                .get(..36)
                .ok_or(ProxyError::Malformed("version 2 IPv6 addresses cut short"))?;
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&a[..16]);
            let ip = Ipv6Addr::from(octets);
            Some(SocketAddr::new(
                ip.into(),
                u16::from_be_bytes([a[32], a[33]]),
            ))
        }
        // UNSPEC, UDP and Unix sockets: nothing usable as a client address.
        _ => None,
    };
    Ok(ProxyParse::Complete { consumed, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(command: u8, family: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = V2_SIGNATURE.to_vec();
        out.push(0x20 | command);
        out.push(family);
        out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    fn complete(buf: &[u8]) -> (usize, Option<SocketAddr>) {
        match parse(buf) {
            Ok(ProxyParse::Complete { consumed, source }) => (consumed, source),
            other => panic!("{other:?} for {buf:?}"),
        }
    }

    #[test]
    fn version_1() {
        let line = b"PROXY TCP4 198.51.100.7 10.0.0.5 40001 22\r\nSSH-2.0-OpenSSH_9.2\r\n";
        assert_eq!(
            complete(line),
            (43, Some("198.51.100.7:40001".parse().unwrap()))
        );
        let six = b"PROXY TCP6 2001:db8::7 2001:db8::1 5000 22\r\n";
        assert_eq!(
            complete(six),
            (six.len(), Some("[2001:db8::7]:5000".parse().unwrap()))
        );
        assert_eq!(complete(b"PROXY UNKNOWN\r\n"), (15, None));
        assert_eq!(complete(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n").1, None);
    }

    #[test]
    fn version_2() {
        let mut p = vec![198, 51, 100, 7, 10, 0, 0, 5];
        p.extend_from_slice(&40001u16.to_be_bytes());
        p.extend_from_slice(&22u16.to_be_bytes());
        p.extend_from_slice(&[0x04, 0x00, 0x01, 0x00]); // a NOOP TLV, skipped
        let mut buf = v2(1, 0x11, &p);
        let header_len = buf.len();
        buf.extend_from_slice(b"SSH-2.0-x\r\n");
        assert_eq!(
            complete(&buf),
            (header_len, Some("198.51.100.7:40001".parse().unwrap()))
        );
        let mut p6 = vec![0x20, 0x01, 0x0d, 0xb8];
        p6.extend_from_slice(&[0; 11]);
        p6.push(7);
        p6.extend_from_slice(&[0; 16]);
        p6.extend_from_slice(&5000u16.to_be_bytes());
        p6.extend_from_slice(&22u16.to_be_bytes());
        assert_eq!(
            complete(&v2(1, 0x21, &p6)).1,
            Some("[2001:db8::7]:5000".parse().unwrap())
        );
        assert_eq!(complete(&v2(0, 0x00, &[])), (16, None), "LOCAL");
        assert_eq!(complete(&v2(1, 0x31, &[0; 216])).1, None, "Unix socket");
    }

    #[test]
    fn prefixes_ask_for_more_at_every_split() {
        let two = v2(1, 0x11, &[198, 51, 100, 7, 10, 0, 0, 5, 0x9c, 0x41, 0, 22]);
        let one = b"PROXY TCP4 198.51.100.7 10.0.0.5 40001 22\r\n".to_vec();
        for whole in [one, two] {
            for cut in 0..whole.len() {
                assert_eq!(
                    parse(&whole[..cut]),
                    Ok(ProxyParse::Incomplete),
                    "cut {cut}"
                );
            }
            assert_eq!(complete(&whole).0, whole.len());
        }
    }

    #[test]
    fn everything_else_is_refused() {
        assert_eq!(parse(b"SSH-2.0-OpenSSH_9.2\r\n"), Err(ProxyError::NotProxy));
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Err(ProxyError::NotProxy));
        for bad in [
            &b"PROXY TCP4 198.51.100.7 10.0.0.5 40001\r\n"[..],
            b"PROXY TCP4 2001:db8::1 10.0.0.5 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 22\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 022 22\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 22\r\n",
            b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY \xff\r\n",
        ] {
            assert!(
                matches!(parse(bad), Err(ProxyError::Malformed(_))),
                "{bad:?}"
            );
        }
        let long = format!("PROXY TCP4 {}\r\n", "1".repeat(120));
        assert!(matches!(
            parse(long.as_bytes()),
            Err(ProxyError::Malformed(_))
        ));
        assert!(matches!(parse(&[b'P'; 2][..1]), Ok(ProxyParse::Incomplete)));
        let mut wrong_version = v2(1, 0x11, &[0; 12]);
        wrong_version[12] = 0x11;
        assert!(matches!(
            parse(&wrong_version),
            Err(ProxyError::Malformed(_))
        ));
        let mut huge = v2(1, 0x11, &[]);
        huge[14..16].copy_from_slice(&2000u16.to_be_bytes());
        assert!(matches!(parse(&huge), Err(ProxyError::Malformed(_))));
        assert!(matches!(
            parse(&v2(1, 0x11, &[0; 8])),
            Err(ProxyError::Malformed(_))
        ));
        assert!(matches!(
            parse(&v2(5, 0x11, &[0; 12])),
            Err(ProxyError::Malformed(_))
        ));
    }
}
