//! Node-wide limits on concurrent pack work (upload-pack, receive-pack), globally, per
//! repository and for anonymous requests as a class, with a bounded number of waiters. Pack generation is the CPU- and memory-heavy part
//! of hosting: past the limit, requests queue; past the queue, they get 503 with Retry-After.
//!
//! Shared by all shards; the state sits behind one mutex, held for a few instructions per pack.
//! Waiting is the caller's job (it knows its runtime): [`PackLimiter::try_acquire`] in a loop with
//! a short sleep, holding a [`QueueTicket`] while it waits.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::metrics::METRICS;

#[derive(Debug)]
pub struct PackLimiter {
    max_total: usize,
    max_per_repo: usize,
    max_queued: usize,
    max_anonymous: usize,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    running: usize,
    queued: usize,
    anonymous: usize,
    per_repo: HashMap<String, usize>,
}

/// Who asks for a slot: anonymous requests share a smaller part of the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requester {
    Authenticated,
    Anonymous,
}

/// A running pack operation; dropping it frees the slot.
#[derive(Debug)]
pub struct PackPermit {
    limiter: Arc<PackLimiter>,
    repo: String,
    requester: Requester,
}

/// A place in the wait queue; dropping it leaves the queue.
#[derive(Debug)]
pub struct QueueTicket {
    limiter: Arc<PackLimiter>,
}

impl PackLimiter {
    pub fn new(
        max_total: usize,
        max_per_repo: usize,
        max_queued: usize,
        max_anonymous: usize,
    ) -> Arc<Self> {
        Arc::new(Self {
            max_total,
            max_per_repo,
            max_queued,
            max_anonymous,
            state: Mutex::new(State::default()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent even if a holder panicked: every update is one statement.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn try_acquire(self: &Arc<Self>, repo: &str, requester: Requester) -> Option<PackPermit> {
        let mut s = self.lock();
        let in_repo = s.per_repo.get(repo).copied().unwrap_or(0);
        let anonymous = requester == Requester::Anonymous;
        if s.running >= self.max_total
            || in_repo >= self.max_per_repo
            || (anonymous && s.anonymous >= self.max_anonymous)
        {
            return None;
        }
        s.running += 1;
        if anonymous {
            s.anonymous += 1;
        }
        METRICS.pack_running.inc();
        *s.per_repo.entry(repo.to_owned()).or_insert(0) += 1;
        Some(PackPermit {
            limiter: Arc::clone(self),
            repo: repo.to_owned(),
            requester,
        })
    }

    /// None when the queue is full.
    pub fn enqueue(self: &Arc<Self>) -> Option<QueueTicket> {
        let mut s = self.lock();
        if s.queued >= self.max_queued {
            return None;
        }
        s.queued += 1;
        METRICS.pack_queued.inc();
        Some(QueueTicket {
            limiter: Arc::clone(self),
        })
    }

    /// (running, queued), for metrics.
    pub fn load(&self) -> (usize, usize) {
        let s = self.lock();
        (s.running, s.queued)
    }

    /// Slots anonymous requests hold now.
    pub fn anonymous_running(&self) -> usize {
        self.lock().anonymous
    }
}

impl Drop for PackPermit {
    fn drop(&mut self) {
        let mut s = self.limiter.lock();
        s.running = s.running.saturating_sub(1);
        if self.requester == Requester::Anonymous {
            s.anonymous = s.anonymous.saturating_sub(1);
        }
        METRICS.pack_running.dec();
        if let Some(n) = s.per_repo.get_mut(&self.repo) {
            *n -= 1;
            if *n == 0 {
                s.per_repo.remove(&self.repo);
            }
        }
    }
}

impl Drop for QueueTicket {
    fn drop(&mut self) {
        let mut s = self.limiter.lock();
        s.queued = s.queued.saturating_sub(1);
        METRICS.pack_queued.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AUTH: Requester = Requester::Authenticated;
    const ANON: Requester = Requester::Anonymous;

    #[test]
    fn global_and_per_repo_limits() {
        let l = PackLimiter::new(3, 2, 1, 3);
        let a1 = l.try_acquire("a", AUTH).unwrap();
        let _a2 = l.try_acquire("a", AUTH).unwrap();
        assert!(l.try_acquire("a", AUTH).is_none(), "per-repo limit");
        let _b1 = l.try_acquire("b", AUTH).unwrap();
        assert!(l.try_acquire("c", AUTH).is_none(), "global limit");
        drop(a1);
        assert!(l.try_acquire("a", AUTH).is_some());
        assert_eq!(l.load().0, 3 - 1);
    }

    #[test]
    fn anonymous_requests_share_part_of_the_node() {
        let l = PackLimiter::new(4, 4, 0, 2);
        let x1 = l.try_acquire("a", ANON).unwrap();
        let _x2 = l.try_acquire("b", ANON).unwrap();
        assert!(l.try_acquire("c", ANON).is_none(), "anonymous share full");
        let _u1 = l.try_acquire("c", AUTH).unwrap();
        let _u2 = l.try_acquire("d", AUTH).unwrap();
        assert_eq!(l.anonymous_running(), 2);
        drop(x1);
        assert_eq!(l.anonymous_running(), 1);
        let _u3 = l.try_acquire("e", AUTH).unwrap();
        assert!(l.try_acquire("f", ANON).is_none(), "the node is full");
    }

    #[test]
    fn queue_is_bounded() {
        let l = PackLimiter::new(1, 1, 2, 1);
        let t1 = l.enqueue().unwrap();
        let _t2 = l.enqueue().unwrap();
        assert!(l.enqueue().is_none());
        drop(t1);
        assert!(l.enqueue().is_some());
    }
}
