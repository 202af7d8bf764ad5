//! How often an idle outbox relay asks the store for new rows. Every node's relay polls the shared
//! database; at a fixed 10 ms an idle fleet of N nodes costs the database 100·N queries a second
//! and each node a steady trickle of CPU (10% of an otherwise idle relaying node's samples in
//! `bench/cluster.py --perf`). So the wait doubles with each empty poll up to [`IDLE_MAX`] and
//! falls back to [`BUSY`] as soon as a poll finds rows: under load nothing changes, and an event
//! that lands on an idle node waits at most [`IDLE_MAX`] longer.

use std::time::Duration;

/// The wait after an empty poll that followed rows.
pub const BUSY: Duration = Duration::from_millis(10);
/// The longest wait between polls of an idle outbox.
pub const IDLE_MAX: Duration = Duration::from_millis(100);

/// The next idle wait: doubles per empty poll, reset by a poll that found rows.
#[derive(Debug)]
pub struct IdleBackoff {
    next: Duration,
}

impl Default for IdleBackoff {
    fn default() -> Self {
        Self { next: BUSY }
    }
}

impl IdleBackoff {
    /// A poll found rows: the next empty poll waits [`BUSY`] again.
    pub fn found(&mut self) {
        self.next = BUSY;
    }

    /// A poll found nothing: how long to wait before the next one.
    pub fn empty(&mut self) -> Duration {
        let wait = self.next;
        self.next = (wait * 2).min(IDLE_MAX);
        wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_to_the_cap_and_resets_on_rows() {
        let mut b = IdleBackoff::default();
        let waits: Vec<u128> = (0..6).map(|_| b.empty().as_millis()).collect();
        assert_eq!(waits, [10, 20, 40, 80, 100, 100]);
        b.found();
        assert_eq!(b.empty(), BUSY);
    }
}
