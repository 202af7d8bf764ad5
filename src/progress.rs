//! Progress deadlines for streams a peer can stall: a request body the client stops sending, a
//! response the client stops reading, an SSH channel or an RPC stream that goes quiet.
//!
//! A stream is cut when either rule fires:
//! - **idle**: no byte moved for `idle` (nginx's `client_body_timeout` / `send_timeout`);
//! - **slow**: fewer bytes moved than `min_rate` bytes per second allows since the start, after a
//!   head start of `idle` (Apache's `mod_reqtimeout` `MinRate`). A peer that trickles one byte
//!   just inside every idle window is caught by this rule; a real client that pauses on a bad
//!   link keeps the credit it earned while bytes were moving.
//!
//! Pure and runtime-agnostic: callers feed it byte counts and wait on [`Progress::deadline`] with
//! their runtime's timer.

use std::time::{Duration, Instant};

/// The two rules, as configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProgressRules {
    /// Longest time without a byte.
    pub idle: Duration,
    /// Bytes per second a stream must average after its head start; 0 turns the rule off.
    pub min_rate: u64,
}

/// Which rule cut a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stall {
    Idle,
    Slow,
}

impl std::fmt::Display for Stall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Stall::Idle => "no bytes moved within the idle deadline",
            Stall::Slow => "bytes moved below the minimum rate",
        })
    }
}

/// One stream's progress so far.
#[derive(Debug, Clone)]
pub struct Progress {
    rules: ProgressRules,
    started: Instant,
    last: Instant,
    bytes: u64,
}

impl Progress {
    pub fn new(rules: ProgressRules, now: Instant) -> Self {
        Self {
            rules,
            started: now,
            last: now,
            bytes: 0,
        }
    }

    /// Records `n` bytes moved at `now`; zero bytes is not progress.
    pub fn record(&mut self, n: u64, now: Instant) {
        if n > 0 {
            self.bytes = self.bytes.saturating_add(n);
            self.last = now.max(self.last);
        }
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    fn idle_deadline(&self) -> Instant {
        self.last + self.rules.idle
    }

    /// None while the rate rule is off.
    fn rate_deadline(&self) -> Option<Instant> {
        if self.rules.min_rate == 0 {
            return None;
        }
        // Each `min_rate` bytes buys one more second; capped so that the sum cannot overflow.
        let earned = Duration::from_secs(self.bytes / self.rules.min_rate)
            + Duration::from_nanos(
                (self.bytes % self.rules.min_rate) * 1_000_000_000 / self.rules.min_rate,
            );
        let earned = earned.min(Duration::from_secs(100 * 365 * 24 * 3600));
        Some(self.started + self.rules.idle + earned)
    }

    /// When the stream is cut if no further byte moves.
    pub fn deadline(&self) -> Instant {
        match self.rate_deadline() {
            Some(rate) => rate.min(self.idle_deadline()),
            None => self.idle_deadline(),
        }
    }

    /// The rule that has fired by `now`, if any.
    pub fn stalled(&self, now: Instant) -> Option<Stall> {
        if now >= self.idle_deadline() {
            Some(Stall::Idle)
        } else if self.rate_deadline().is_some_and(|d| now >= d) {
            Some(Stall::Slow)
        } else {
            None
        }
    }
}

/// [`Progress`] on a clock that runs only while we wait for the peer. Time spent waiting on our
/// own side (git producing the next pack bytes, git consuming the last body bytes) is not the
/// peer's stall and must not count against it.
#[derive(Debug, Clone)]
pub struct PeerClock {
    progress: Progress,
    base: Instant,
    waited: Duration,
}

impl PeerClock {
    pub fn new(rules: ProgressRules) -> Self {
        let base = Instant::now();
        Self {
            progress: Progress::new(rules, base),
            base,
            waited: Duration::ZERO,
        }
    }

    fn now(&self) -> Instant {
        self.base + self.waited
    }

    /// How long the next wait for the peer may last before the stream counts as stalled.
    pub fn budget(&self) -> Duration {
        self.progress
            .deadline()
            .saturating_duration_since(self.now())
    }

    /// Adds time spent waiting for the peer.
    pub fn waited(&mut self, d: Duration) {
        self.waited += d;
    }

    /// Records bytes the peer moved.
    pub fn moved(&mut self, n: u64) {
        self.progress.record(n, self.now());
    }

    /// The rule that has fired, if any (a wait that used up its budget has: idle by default).
    pub fn stall(&self) -> Stall {
        self.progress.stalled(self.now()).unwrap_or(Stall::Idle)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peer_clock_counts_only_time_spent_waiting_for_the_peer() {
        let mut c = PeerClock::new(RULES);
        assert_eq!(c.budget(), Duration::from_secs(10));
        c.waited(Duration::from_secs(4));
        c.moved(100);
        // Idle restarts at the byte; the rate rule allows 10 s + 1 s from the start.
        assert_eq!(c.budget(), Duration::from_secs(7));
        c.waited(Duration::from_secs(7));
        assert_eq!(c.budget(), Duration::ZERO);
        assert_eq!(c.stall(), Stall::Slow);
    }

    const RULES: ProgressRules = ProgressRules {
        idle: Duration::from_secs(10),
        min_rate: 100,
    };

    #[test]
    fn a_silent_peer_is_cut_after_idle() {
        let t0 = Instant::now();
        let p = Progress::new(RULES, t0);
        assert_eq!(p.deadline(), t0 + Duration::from_secs(10));
        assert_eq!(p.stalled(t0 + Duration::from_secs(9)), None);
        assert_eq!(p.stalled(t0 + Duration::from_secs(10)), Some(Stall::Idle));
    }

    #[test]
    fn a_trickling_peer_is_cut_by_the_rate_rule() {
        let t0 = Instant::now();
        let mut p = Progress::new(RULES, t0);
        // One byte every 9 s never trips the idle rule ...
        for i in 1..=3 {
            p.record(1, t0 + Duration::from_secs(9 * i));
        }
        // ... but 3 bytes earn 30 ms beyond the 10 s head start.
        assert_eq!(p.deadline(), t0 + Duration::from_millis(10_030));
        assert_eq!(p.stalled(t0 + Duration::from_secs(27)), Some(Stall::Slow));
    }

    #[test]
    fn a_fast_peer_that_pauses_keeps_its_credit_until_idle() {
        let t0 = Instant::now();
        let mut p = Progress::new(RULES, t0);
        p.record(1_000_000, t0 + Duration::from_secs(1));
        // Plenty of rate credit: only the idle rule can fire.
        assert_eq!(p.deadline(), t0 + Duration::from_secs(11));
        assert_eq!(p.stalled(t0 + Duration::from_secs(11)), Some(Stall::Idle));
        p.record(1, t0 + Duration::from_secs(10));
        assert_eq!(p.stalled(t0 + Duration::from_secs(19)), None);
    }

    #[test]
    fn the_rate_rule_can_be_off_and_huge_counts_do_not_overflow() {
        let t0 = Instant::now();
        let mut p = Progress::new(
            ProgressRules {
                idle: Duration::from_secs(1),
                min_rate: 0,
            },
            t0,
        );
        p.record(u64::MAX, t0);
        p.record(u64::MAX, t0);
        assert_eq!(p.deadline(), t0 + Duration::from_secs(1));
        let mut q = Progress::new(
            ProgressRules {
                idle: Duration::from_secs(1),
                min_rate: 1,
            },
            t0,
        );
        q.record(u64::MAX, t0);
        assert_eq!(q.deadline(), t0 + Duration::from_secs(1));
        assert_eq!(p.bytes(), u64::MAX);
    }
}
