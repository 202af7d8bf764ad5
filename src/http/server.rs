//! The HTTP/1.1 connection loop: read a head within its deadline, hand the request to a
//! [`Handler`], repeat while keep-alive allows. Malformed or oversized heads get a clean 4xx and a
//! closed connection; a client that sends nothing in time is dropped (slowloris defence).

use std::future::Future;
use std::io;

use std::time::Instant;

use monoio::time::timeout;

use super::conn::Conn;
use super::head::{parse_request_head, BodyFraming, HeadLimits, HeadParse, RequestHead};
use crate::coarse_timer;
use crate::config::HttpLimits;
use crate::lifecycle::ShutdownSignal;
use crate::metrics::METRICS;

/// Whether the connection may carry another request after this one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reuse {
    KeepAlive,
    Close,
    /// The socket now belongs to another service (a WebSocket carrying SSH): leave it open.
    HandedOff,
}

/// Serves one request. The handler reads the body (if it wants it) and writes the whole response;
/// [`Conn::reusable`] tells it whether it may promise keep-alive.
pub trait Handler {
    fn handle(&self, head: RequestHead, conn: &mut Conn)
        -> impl Future<Output = io::Result<Reuse>>;
}

/// Runs the request loop until the connection ends.
pub async fn serve_connection<H: Handler>(
    handler: &H,
    conn: &mut Conn,
    limits: &HttpLimits,
    shutdown: &ShutdownSignal,
) {
    let head_limits = HeadLimits {
        max_head_bytes: limits.max_head_bytes,
        ..HeadLimits::default()
    };
    loop {
        // Idle between requests: only this small wait is held (no buffer, no request state).
        if conn.buffered().is_empty() && !wait_for_request(conn, limits, shutdown).await {
            break;
        }
        // None: the peer closed or sent garbage (already answered). Boxed, like the handler
        // below, so that their state lives on the heap only while a request is being read or
        // served, and an idle keep-alive connection costs little more than its socket.
        let Some(head) = Box::pin(next_head(conn, limits, &head_limits)).await else {
            break;
        };
        // Keep-alive survives shutdown: a git clone or push is several requests on one
        // connection, and the client cannot reconnect once the listener is closed.
        let has_body = !matches!(head.framing, BodyFraming::None | BodyFraming::Length(0));
        conn.begin_request(head.keep_alive, has_body);
        // Boxed: a request's future (an LFS upload to S3 is the largest) lives on the heap only
        // while the request runs, so an idle keep-alive connection's task stays small.
        match Box::pin(handler.handle(head, conn)).await {
            Ok(Reuse::KeepAlive) if conn.reusable() => {
                conn.release_buffer();
            }
            Ok(Reuse::HandedOff) => return,
            Ok(_) => break,
            Err(e) => {
                tracing::debug!(peer = %conn.peer, error = %e, "connection ended mid-request");
                break;
            }
        }
    }
    Box::pin(conn.shutdown()).await;
}

/// Idle between requests: waits without a buffer until the peer sends something. Gives up after
/// the idle timeout, or after the shorter drain timeout once shutdown has begun, so that idle
/// connections do not hold the process for the whole grace period. The timers are coarse
/// ([`crate::coarse_timer`]): this wait is what every idle keep-alive connection holds.
///
/// One readability wait serves both phases: it stays submitted across the start of shutdown
/// (no cancel and resubmit), and the task holds one such future, not two.
async fn wait_for_request(conn: &Conn, limits: &HttpLimits, shutdown: &ShutdownSignal) -> bool {
    let idle_until = Instant::now() + limits.idle_timeout;
    let mut readable = std::pin::pin!(conn.readable());
    monoio::select! {
        r = &mut readable => return r.is_ok(),
        _ = coarse_timer::deadline(idle_until) => return false,
        _ = shutdown.wait() => {}
    }
    let drain_until = idle_until.min(Instant::now() + limits.drain_idle_timeout);
    monoio::select! {
        r = readable => r.is_ok(),
        _ = coarse_timer::deadline(drain_until) => false,
    }
}

/// Reads the next request head. Errors have already been answered (or the peer is gone).
async fn next_head(
    conn: &mut Conn,
    limits: &HttpLimits,
    head_limits: &HeadLimits,
) -> Option<RequestHead> {
    let deadline = monoio::time::Instant::now() + limits.head_timeout;
    let mut first = true;
    loop {
        match parse_request_head(conn.buffered(), head_limits) {
            Ok(HeadParse::Complete { head, consumed }) => {
                conn.consume(consumed);
                return Some(head);
            }
            Ok(HeadParse::Incomplete) => {}
            Err(e) => {
                METRICS.bad_requests.inc();
                let status = e.status();
                tracing::debug!(peer = %conn.peer, error = %e, "bad request head");
                conn.begin_request(false, false);
                let _ = conn.respond_text(status, &[], &format!("{e}\n")).await;
                return None;
            }
        }
        let left = deadline.saturating_duration_since(monoio::time::Instant::now());
        match timeout(left, conn.fill(head_limits.max_head_bytes)).await {
            Ok(Ok(0)) => {
                // EOF: fine between requests, a truncated head otherwise.
                if !first && !conn.buffered().is_empty() {
                    METRICS.bad_requests.inc();
                }
                return None;
            }
            Ok(Ok(_)) => first = false,
            Ok(Err(_)) => return None,
            Err(_) => {
                METRICS.head_timeouts.inc();
                conn.begin_request(false, false);
                let _ = conn
                    .respond_text(408, &[], "request head not received in time\n")
                    .await;
                return None;
            }
        }
    }
}
