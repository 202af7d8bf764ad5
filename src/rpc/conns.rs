//! Who may hold a gRPC connection. Every connection takes, at accept:
//! - a slot of its source address (`rpc.max_connections_per_ip`, node-wide);
//! - until it presents a valid bearer token, also a slot of its address's unauthenticated share
//!   (`rpc.max_unauthenticated_per_ip`, node-wide) and of its shard's
//!   (`rpc.max_unauthenticated_per_shard`, below the shard's connection cap).
//!
//! The first call with a valid token gives the unauthenticated slots back
//! ([`ConnSlot::authenticated`]), so peers without the token can never fill a shard, and one
//! address can hold only a few connections that have not proved anything.
//!
//! Addresses are counted node-wide: SO_REUSEPORT spreads one address's connections over the
//! shards by a hash of the 4-tuple, so a per-shard count would let an address hold `shards`
//! times the cap, with a limit that changes with the core count. The shared
//! [`AddressLimiter`] takes one mutex per accept and per release, next to a TCP and HTTP/2
//! handshake. The unauthenticated total is per shard because the cap it protects is per shard,
//! and a per-shard count needs no lock.

use std::cell::Cell;
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::Arc;

use crate::admission::{AddressLimiter, AddressSlot, Refusal};
use crate::config::RpcLimits;

/// Why a connection was refused at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("{0} (gRPC connections)")]
    Address(Refusal),
    #[error("{0} connections without a token already wait on this shard")]
    ShardShare(usize),
}

/// The node-wide per-address counts, shared by every shard.
#[derive(Debug)]
pub struct AddressCaps {
    all: Arc<AddressLimiter>,
    unauthenticated: Arc<AddressLimiter>,
}

impl AddressCaps {
    pub fn new(limits: &RpcLimits) -> Self {
        Self {
            all: AddressLimiter::new(usize::MAX, limits.max_connections_per_ip),
            unauthenticated: AddressLimiter::new(usize::MAX, limits.max_unauthenticated_per_ip),
        }
    }
}

/// One shard's count of connections that have not yet authenticated.
#[derive(Debug)]
pub struct ShardShare {
    max: usize,
    held: Cell<usize>,
}

/// A place in a [`ShardShare`], given back on drop.
#[derive(Debug)]
struct ShareTicket(Rc<ShardShare>);

impl ShardShare {
    pub fn new(max: usize) -> Rc<Self> {
        Rc::new(Self {
            max,
            held: Cell::new(0),
        })
    }

    fn take(self: &Rc<Self>) -> Option<ShareTicket> {
        if self.held.get() >= self.max {
            return None;
        }
        self.held.set(self.held.get() + 1);
        Some(ShareTicket(Rc::clone(self)))
    }

    pub fn held(&self) -> usize {
        self.held.get()
    }
}

impl Drop for ShareTicket {
    fn drop(&mut self) {
        self.0.held.set(self.0.held.get().saturating_sub(1));
    }
}

/// What one connection holds for as long as it is open.
#[derive(Debug)]
pub struct ConnSlot {
    _address: AddressSlot,
    unauthenticated: Option<(AddressSlot, ShareTicket)>,
}

impl ConnSlot {
    /// Admits a connection from `ip`, or says which cap it is over.
    ///
    /// # Errors
    /// [`Refused`] naming the cap that is full.
    pub fn admit(caps: &AddressCaps, share: &Rc<ShardShare>, ip: IpAddr) -> Result<Self, Refused> {
        let address = caps.all.try_admit(ip).map_err(Refused::Address)?;
        let pending = caps
            .unauthenticated
            .try_admit(ip)
            .map_err(Refused::Address)?;
        let ticket = share.take().ok_or(Refused::ShardShare(share.max))?;
        Ok(Self {
            _address: address,
            unauthenticated: Some((pending, ticket)),
        })
    }

    /// The connection presented a valid token: it no longer counts as unauthenticated.
    pub fn authenticated(&mut self) {
        self.unauthenticated = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{FileConfig, Overrides, ServeConfig};

    fn caps(per_ip: usize, unauth_per_ip: usize) -> AddressCaps {
        let file: FileConfig = toml::from_str(&format!(
            "[rpc]\nmax_connections_per_ip = {per_ip}\nmax_unauthenticated_per_ip = {unauth_per_ip}\n"
        ))
        .unwrap();
        AddressCaps::new(&ServeConfig::build(file, Overrides::default()).unwrap().rpc)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn unauthenticated_connections_have_a_smaller_share_per_address() {
        let caps = caps(3, 2);
        let share = ShardShare::new(100);
        let mut a = ConnSlot::admit(&caps, &share, ip("10.0.0.1")).unwrap();
        let _b = ConnSlot::admit(&caps, &share, ip("10.0.0.1")).unwrap();
        assert_eq!(
            ConnSlot::admit(&caps, &share, ip("10.0.0.1")).unwrap_err(),
            Refused::Address(Refusal::PerSource(2))
        );
        // Another address is not affected.
        let _c = ConnSlot::admit(&caps, &share, ip("10.0.0.2")).unwrap();
        // Once one authenticates, a third may wait; a fourth is over the address's cap.
        a.authenticated();
        let _d = ConnSlot::admit(&caps, &share, ip("10.0.0.1")).unwrap();
        assert_eq!(
            ConnSlot::admit(&caps, &share, ip("10.0.0.1")).unwrap_err(),
            Refused::Address(Refusal::PerSource(3))
        );
        assert_eq!(share.held(), 3);
    }

    #[test]
    fn the_shard_share_bounds_unauthenticated_connections_and_frees_on_drop() {
        let caps = caps(64, 8);
        let share = ShardShare::new(2);
        let mut a = ConnSlot::admit(&caps, &share, ip("10.0.0.1")).unwrap();
        let b = ConnSlot::admit(&caps, &share, ip("10.0.0.2")).unwrap();
        assert_eq!(
            ConnSlot::admit(&caps, &share, ip("10.0.0.3")).unwrap_err(),
            Refused::ShardShare(2)
        );
        a.authenticated();
        assert_eq!(share.held(), 1);
        let c = ConnSlot::admit(&caps, &share, ip("10.0.0.3")).unwrap();
        drop((b, c));
        assert_eq!(share.held(), 0);
        // A refusal leaves nothing behind.
        let full = ShardShare::new(0);
        assert!(ConnSlot::admit(&caps, &full, ip("10.0.0.4")).is_err());
        assert_eq!(caps.all.load(ip("10.0.0.4")), (1, 0));
        drop(a);
        assert_eq!(caps.all.load(ip("10.0.0.1")).1, 0);
    }
}
