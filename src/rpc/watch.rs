//! The timers of one gRPC connection, as pure state: the connection loop in [`super::server`]
//! reports what happens (a stream opens or ends, a call shows a valid token, a PING goes out or
//! its PONG comes back) and sleeps until [`ConnWatch::next`]; [`ConnWatch::due`] then says what
//! to do. Three rules, so that a peer holding a connection without using it gives it back:
//! - **first request**: a connection that has not sent a call with a valid bearer token within
//!   `first_request` of its handshake is closed (peers without the token cannot hold one);
//! - **idle**: a connection with no open stream for `idle` gets GOAWAY and is closed;
//! - **keepalive**: while streams are open, a PING goes out every `keepalive_interval`; one that
//!   is not answered within `keepalive_timeout` closes the connection (a vanished client of a
//!   long stream, or one that reads nothing at all, is found without waiting for TCP).

use std::time::Instant;

use crate::config::ConnTimers;
use crate::metrics::Cut;

/// What the connection loop must do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    /// Send a keepalive PING (then report [`ConnWatch::ping_sent`]).
    Ping,
    /// Close the connection, counting it under this reason.
    Close(Cut),
}

#[derive(Debug, Clone)]
pub struct ConnWatch {
    timers: ConnTimers,
    opened: Instant,
    authenticated: bool,
    open_streams: usize,
    /// When the last stream ended (or the handshake finished): the idle clock's start.
    idle_since: Instant,
    /// When the keepalive clock last restarted (streams opened, or a PONG came back).
    alive_at: Instant,
    ping_sent: Option<Instant>,
}

impl ConnWatch {
    /// A connection whose HTTP/2 handshake finished at `now`.
    pub fn new(timers: ConnTimers, now: Instant) -> Self {
        Self {
            timers,
            opened: now,
            authenticated: false,
            open_streams: 0,
            idle_since: now,
            alive_at: now,
            ping_sent: None,
        }
    }

    pub fn stream_opened(&mut self, now: Instant) {
        if self.open_streams == 0 {
            self.alive_at = now;
        }
        self.open_streams += 1;
    }

    pub fn stream_closed(&mut self, now: Instant) {
        self.open_streams = self.open_streams.saturating_sub(1);
        if self.open_streams == 0 {
            self.idle_since = now;
            // No stream left to keep alive: an outstanding PING no longer matters.
            self.ping_sent = None;
        }
    }

    pub fn authenticated(&mut self) {
        self.authenticated = true;
    }

    pub fn is_authenticated(&self) -> bool {
        self.authenticated
    }

    pub fn ping_sent(&mut self, now: Instant) {
        self.ping_sent = Some(now);
    }

    pub fn pong_received(&mut self, now: Instant) {
        self.ping_sent = None;
        self.alive_at = now;
    }

    /// Whether a PING is waiting for its PONG.
    pub fn awaiting_pong(&self) -> bool {
        self.ping_sent.is_some()
    }

    /// The earliest moment something may be due, with what it would be.
    fn earliest(&self) -> (Instant, Due) {
        let t = &self.timers;
        let activity = if self.open_streams == 0 {
            (self.idle_since + t.idle, Due::Close(Cut::RpcIdle))
        } else {
            match self.ping_sent {
                Some(sent) => (sent + t.keepalive_timeout, Due::Close(Cut::RpcKeepalive)),
                None => (self.alive_at + t.keepalive_interval, Due::Ping),
            }
        };
        // On a tie the missing token is the more telling reason.
        match self.authenticated {
            false if self.opened + t.first_request <= activity.0 => {
                (self.opened + t.first_request, Due::Close(Cut::RpcNoRequest))
            }
            _ => activity,
        }
    }

    /// When the loop must look again if nothing else happens.
    pub fn next(&self) -> Instant {
        self.earliest().0
    }

    /// What is due at `now`, if anything.
    pub fn due(&self, now: Instant) -> Option<Due> {
        let (at, due) = self.earliest();
        (now >= at).then_some(due)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const S: Duration = Duration::from_secs(1);

    fn timers() -> ConnTimers {
        ConnTimers {
            idle: 60 * S,
            first_request: 10 * S,
            keepalive_interval: 30 * S,
            keepalive_timeout: 20 * S,
        }
    }

    #[test]
    fn a_connection_without_a_token_is_closed_at_the_first_request_deadline() {
        let t0 = Instant::now();
        let mut w = ConnWatch::new(timers(), t0);
        assert_eq!(w.next(), t0 + 10 * S);
        assert_eq!(w.due(t0 + 9 * S), None);
        assert_eq!(w.due(t0 + 10 * S), Some(Due::Close(Cut::RpcNoRequest)));
        // An open stream without the token does not buy more time.
        w.stream_opened(t0 + S);
        assert_eq!(w.due(t0 + 10 * S), Some(Due::Close(Cut::RpcNoRequest)));
    }

    #[test]
    fn an_authenticated_connection_is_closed_only_when_idle() {
        let t0 = Instant::now();
        let mut w = ConnWatch::new(timers(), t0);
        w.stream_opened(t0 + S);
        w.authenticated();
        w.stream_closed(t0 + 2 * S);
        assert_eq!(w.next(), t0 + 62 * S);
        assert_eq!(w.due(t0 + 61 * S), None);
        assert_eq!(w.due(t0 + 62 * S), Some(Due::Close(Cut::RpcIdle)));
        // A new stream stops the idle clock; its end restarts it.
        w.stream_opened(t0 + 61 * S);
        assert_ne!(w.due(t0 + 62 * S), Some(Due::Close(Cut::RpcIdle)));
        w.stream_closed(t0 + 70 * S);
        assert_eq!(w.due(t0 + 129 * S), None);
        assert_eq!(w.due(t0 + 130 * S), Some(Due::Close(Cut::RpcIdle)));
    }

    #[test]
    fn idle_before_the_first_request_deadline_counts_as_idle() {
        let t0 = Instant::now();
        let w = ConnWatch::new(
            ConnTimers {
                idle: 3 * S,
                ..timers()
            },
            t0,
        );
        assert_eq!(w.due(t0 + 3 * S), Some(Due::Close(Cut::RpcIdle)));
    }

    #[test]
    fn long_streams_are_pinged_and_an_unanswered_ping_closes() {
        let t0 = Instant::now();
        let mut w = ConnWatch::new(timers(), t0);
        w.authenticated();
        w.stream_opened(t0);
        assert_eq!(w.due(t0 + 29 * S), None);
        assert_eq!(w.due(t0 + 30 * S), Some(Due::Ping));
        w.ping_sent(t0 + 30 * S);
        assert!(w.awaiting_pong());
        assert_eq!(w.due(t0 + 49 * S), None);
        // Answered: the next PING is an interval after the PONG.
        w.pong_received(t0 + 31 * S);
        assert_eq!(w.due(t0 + 60 * S), None);
        assert_eq!(w.due(t0 + 61 * S), Some(Due::Ping));
        w.ping_sent(t0 + 61 * S);
        assert_eq!(w.due(t0 + 80 * S), None);
        assert_eq!(w.due(t0 + 81 * S), Some(Due::Close(Cut::RpcKeepalive)));
    }

    #[test]
    fn an_outstanding_ping_is_forgotten_when_the_last_stream_ends() {
        let t0 = Instant::now();
        let mut w = ConnWatch::new(timers(), t0);
        w.authenticated();
        w.stream_opened(t0);
        w.ping_sent(t0 + 30 * S);
        w.stream_closed(t0 + 31 * S);
        assert!(!w.awaiting_pong());
        assert_eq!(w.due(t0 + 90 * S), None);
        assert_eq!(w.due(t0 + 91 * S), Some(Due::Close(Cut::RpcIdle)));
    }
}
