//! Who may hold a gRPC connection. Every connection takes, at accept:
//! - a slot of its source address (`rpc.max_connections_per_ip`, node-wide);
//! - until it presents a valid bearer token, also a slot of its address's unauthenticated share
//!   (`rpc.max_unauthenticated_per_ip`, node-wide) and a place in its shard's
//!   (`rpc.max_unauthenticated_per_shard`, below the shard's connection cap).
//!
//! The first call with a valid token gives the unauthenticated slots back
//! ([`ConnSlot::authenticated`]), so peers without the token can never fill a shard, and one
//! address can hold only a few connections that have not proved anything.
//!
//! A full address share refuses the new connection. A full shard share does not: it evicts its
//! oldest unauthenticated connection ([`Eviction`]) and admits the new one. Refusing would let
//! peers from many addresses keep every new client out for as long as they reconnect; evicting
//! means a real client, which shows its token within a round trip or two, is pushed out only if
//! the share fills again in that time.
//!
//! Addresses are counted node-wide: SO_REUSEPORT spreads one address's connections over the
//! shards by a hash of the 4-tuple, so a per-shard count would let an address hold `shards`
//! times the cap, with a limit that changes with the core count. The shared
//! [`AddressLimiter`] takes one mutex per accept and per release, next to a TCP and HTTP/2
//! handshake. The unauthenticated total is per shard because the cap it protects is per shard,
//! and a per-shard count needs no lock.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::Arc;

use tokio::sync::Notify;

use crate::admission::{AddressLimiter, AddressSlot, Refusal};
use crate::config::RpcLimits;

/// Why a connection was refused at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{0} (gRPC connections)")]
pub struct Refused(Refusal);

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

/// Tells a connection that a newer one took its place in the shard's unauthenticated share.
#[derive(Debug, Default)]
pub struct Eviction {
    evicted: Cell<bool>,
    notify: Notify,
}

impl Eviction {
    fn evict(&self) {
        self.evicted.set(true);
        self.notify.notify_one();
    }

    pub fn is_evicted(&self) -> bool {
        self.evicted.get()
    }

    /// Resolves once the connection has been evicted.
    pub async fn wait(&self) {
        while !self.evicted.get() {
            self.notify.notified().await;
        }
    }
}

/// One shard's connections that have not yet authenticated, oldest first.
#[derive(Debug)]
pub struct ShardShare {
    max: usize,
    waiting: RefCell<VecDeque<(u64, Rc<Eviction>)>>,
    next_id: Cell<u64>,
}

/// A place in a [`ShardShare`], given back on drop.
#[derive(Debug)]
struct ShareTicket {
    share: Rc<ShardShare>,
    id: u64,
}

impl ShardShare {
    pub fn new(max: usize) -> Rc<Self> {
        Rc::new(Self {
            max,
            waiting: RefCell::new(VecDeque::with_capacity(max.min(4096))),
            next_id: Cell::new(0),
        })
    }

    /// A place for a new connection, evicting the oldest holder if the share is full.
    fn take(self: &Rc<Self>) -> (ShareTicket, Rc<Eviction>) {
        let mut waiting = self.waiting.borrow_mut();
        if waiting.len() >= self.max {
            // Its ticket stays alive until the connection has closed, which the eviction asks
            // for at once; it no longer counts here.
            if let Some((_, oldest)) = waiting.pop_front() {
                oldest.evict();
            }
        }
        let id = self.next_id.get();
        self.next_id.set(id + 1);
        let eviction = Rc::new(Eviction::default());
        waiting.push_back((id, Rc::clone(&eviction)));
        let ticket = ShareTicket {
            share: Rc::clone(self),
            id,
        };
        (ticket, eviction)
    }

    /// Connections holding a place now.
    pub fn waiting(&self) -> usize {
        self.waiting.borrow().len()
    }
}

impl Drop for ShareTicket {
    fn drop(&mut self) {
        let mut waiting = self.share.waiting.borrow_mut();
        // Usually near the front: connections authenticate or time out in arrival order.
        if let Some(i) = waiting.iter().position(|(id, _)| *id == self.id) {
            waiting.remove(i);
        }
    }
}

/// What one connection holds for as long as it is open.
#[derive(Debug)]
pub struct ConnSlot {
    _address: AddressSlot,
    unauthenticated: Option<(AddressSlot, ShareTicket)>,
    eviction: Rc<Eviction>,
}

impl ConnSlot {
    /// Admits a connection from `ip` (evicting the shard's oldest unauthenticated connection if
    /// the shard's share is full), or says which address cap it is over.
    ///
    /// # Errors
    /// [`Refused`] naming the address cap that is full.
    pub fn admit(caps: &AddressCaps, share: &Rc<ShardShare>, ip: IpAddr) -> Result<Self, Refused> {
        let address = caps.all.try_admit(ip).map_err(Refused)?;
        let pending = caps.unauthenticated.try_admit(ip).map_err(Refused)?;
        let (ticket, eviction) = share.take();
        Ok(Self {
            _address: address,
            unauthenticated: Some((pending, ticket)),
            eviction,
        })
    }

    /// Fires if a newer connection takes this one's place before it authenticates.
    pub fn eviction(&self) -> Rc<Eviction> {
        Rc::clone(&self.eviction)
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
            Refused(Refusal::PerSource(2))
        );
        // Another address is not affected.
        let _c = ConnSlot::admit(&caps, &share, ip("10.0.0.2")).unwrap();
        // Once one authenticates, a third may wait; a fourth is over the address's cap.
        a.authenticated();
        let _d = ConnSlot::admit(&caps, &share, ip("10.0.0.1")).unwrap();
        assert_eq!(
            ConnSlot::admit(&caps, &share, ip("10.0.0.1")).unwrap_err(),
            Refused(Refusal::PerSource(3))
        );
        assert_eq!(share.waiting(), 3);
    }

    #[test]
    fn a_full_shard_share_evicts_its_oldest_unauthenticated_connection() {
        let caps = caps(64, 8);
        let share = ShardShare::new(2);
        let mut a = ConnSlot::admit(&caps, &share, ip("10.0.0.1")).unwrap();
        let b = ConnSlot::admit(&caps, &share, ip("10.0.0.2")).unwrap();
        assert!(!a.eviction().is_evicted());
        let c = ConnSlot::admit(&caps, &share, ip("10.0.0.3")).unwrap();
        assert!(a.eviction().is_evicted());
        assert!(!b.eviction().is_evicted());
        assert_eq!(share.waiting(), 2);
        // The evicted one closing, or authenticating in the meantime, changes nothing here.
        a.authenticated();
        drop(a);
        assert_eq!(share.waiting(), 2);
        // An authenticated connection is never evicted; the oldest waiting one (b) is.
        let mut d = ConnSlot::admit(&caps, &share, ip("10.0.0.4")).unwrap();
        d.authenticated();
        assert!(b.eviction().is_evicted());
        assert_eq!(share.waiting(), 1);
        let e = ConnSlot::admit(&caps, &share, ip("10.0.0.5")).unwrap();
        assert!(!c.eviction().is_evicted() && !d.eviction().is_evicted());
        drop((b, c, d, e));
        assert_eq!(share.waiting(), 0);
        assert_eq!(caps.all.load(ip("10.0.0.1")), (0, 0));
    }
}
