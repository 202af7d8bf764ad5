//! Admission by client address: a node-wide cap and a cap per source address (IPv4 address, or
//! IPv6 /64, since one host usually owns a whole /64), so one address cannot take every slot.
//! Used for SSH connections that have not authenticated yet (like OpenSSH's MaxStartups, but per
//! source too) and for anonymous clients' share of pack slots.
//!
//! An [`AddressSlot`] is held while the thing it admits runs; dropping it frees the slot. Shared
//! by all threads; the state sits behind one mutex, held for a hash-map update per admission.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("too many at once on the server ({0})")]
    Global(usize),
    #[error("too many at once from this address ({0})")]
    PerSource(usize),
}

#[derive(Debug)]
pub struct AddressLimiter {
    max_total: usize,
    max_per_source: usize,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    total: usize,
    per_source: HashMap<IpAddr, usize>,
}

/// One admitted connection or operation.
#[derive(Debug)]
pub struct AddressSlot {
    limiter: Arc<AddressLimiter>,
    source: IpAddr,
}

/// The key an address is counted under: IPv4 as is (IPv4-mapped IPv6 too), IPv6 by /64.
fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

impl AddressLimiter {
    pub fn new(max_total: usize, max_per_source: usize) -> Arc<Self> {
        Arc::new(Self {
            max_total,
            max_per_source,
            state: Mutex::new(State::default()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update is a single statement, so the state is consistent even after a panic.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn try_admit(self: &Arc<Self>, ip: IpAddr) -> Result<AddressSlot, Refusal> {
        let source = source_key(ip);
        let mut s = self.lock();
        if s.total >= self.max_total {
            return Err(Refusal::Global(self.max_total));
        }
        let n = s.per_source.entry(source).or_insert(0);
        if *n >= self.max_per_source {
            return Err(Refusal::PerSource(self.max_per_source));
        }
        *n += 1;
        s.total += 1;
        Ok(AddressSlot {
            limiter: Arc::clone(self),
            source,
        })
    }

    /// (all, from this address's source key), for tests and metrics.
    pub fn load(&self, ip: IpAddr) -> (usize, usize) {
        let s = self.lock();
        (
            s.total,
            s.per_source.get(&source_key(ip)).copied().unwrap_or(0),
        )
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut s = self.limiter.lock();
        s.total = s.total.saturating_sub(1);
        if let Some(n) = s.per_source.get_mut(&self.source) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                s.per_source.remove(&self.source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn per_source_and_global_caps() {
        let l = AddressLimiter::new(3, 2);
        let a1 = l.try_admit(ip("10.0.0.1")).unwrap();
        let _a2 = l.try_admit(ip("10.0.0.1")).unwrap();
        assert_eq!(
            l.try_admit(ip("10.0.0.1")).unwrap_err(),
            Refusal::PerSource(2)
        );
        let _b = l.try_admit(ip("10.0.0.2")).unwrap();
        assert_eq!(l.try_admit(ip("10.0.0.3")).unwrap_err(), Refusal::Global(3));
        drop(a1);
        assert_eq!(l.load(ip("10.0.0.1")), (2, 1));
        let _a3 = l.try_admit(ip("10.0.0.1")).unwrap();
    }

    #[test]
    fn ipv6_counts_by_slash_64_and_mapped_v4_as_v4() {
        let l = AddressLimiter::new(10, 1);
        let _a = l.try_admit(ip("2001:db8:1:2::1")).unwrap();
        assert!(l.try_admit(ip("2001:db8:1:2::ffff")).is_err());
        let _b = l.try_admit(ip("2001:db8:1:3::1")).unwrap();
        let _c = l.try_admit(ip("192.0.2.1")).unwrap();
        assert!(l.try_admit(ip("::ffff:192.0.2.1")).is_err());
    }

    #[test]
    fn slots_free_on_drop() {
        let l = AddressLimiter::new(1, 1);
        for _ in 0..100 {
            let s = l.try_admit(ip("10.0.0.1")).unwrap();
            drop(s);
        }
        assert_eq!(l.load(ip("10.0.0.1")), (0, 0));
    }
}
