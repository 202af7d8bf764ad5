//! One SSH connection from accept to close, supervised from outside the russh session.
//!
//! Why supervise from outside: russh runs each session as its own task and a stalled peer can
//! park that task at any await (the version line, key exchange, auth). Backlog's SSH service
//! leaked exactly such connections. So the supervisor keeps a `dup` of the socket ([`Cutter`])
//! and, whatever the session is doing:
//! - closes it when authentication has not succeeded by the handshake deadline (one deadline
//!   for the whole pre-auth phase, starting at accept);
//! - closes it when the peer is gone while git runs (the session task may be blocked handing
//!   client data to a git that is not reading, and would not notice);
//! - on shutdown, closes it at once if nothing runs on it, else after its git sessions end.
//!
//! `shutdown(2)` on the dup wakes every pending read and write of the session with EOF/EPIPE,
//! so the session task ends and drops its end; SO_LINGER 0 makes the final close a RST, which
//! frees the kernel's socket state at once.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use gitplane_wire::net::proxy_protocol::{self, ProxyParse};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;

use super::handler::{ConnHandler, PreAuthGuard};
use super::phase::Phase;
use super::SshShared;
use crate::metrics::METRICS;
use crate::runtime::shard::tune_socket;
use crate::runtime::sidecar::{stopped, StopSignal};

/// How often a connection with running git checks that its peer is still there.
const LIVENESS_INTERVAL: Duration = Duration::from_secs(2);
/// How long a cut session may take to notice before the supervisor stops waiting for it.
const CUT_WAIT: Duration = Duration::from_secs(5);
/// How long an idle connection may take to close by itself on shutdown.
const LINGER: Duration = Duration::from_secs(2);
/// How long a session may take to deliver its last output on shutdown before it is cut.
const DRAIN_WAIT: Duration = Duration::from_secs(5);

/// A second fd on the connection's socket, to end it from outside the session.
struct Cutter(OwnedFd);

impl Cutter {
    fn new(fd: RawFd) -> io::Result<Self> {
        // SAFETY: F_DUPFD_CLOEXEC on an open socket returns a new fd we own, or -1.
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: dup is a fresh fd that nothing else owns.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(dup) }))
    }

    /// Ends the connection: every pending I/O of the session fails, and the last close resets.
    fn cut(&self) {
        let fd = self.0.as_raw_fd();
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: plain socket calls on an fd we own; errors (already closed) are harmless.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                std::ptr::addr_of!(linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            );
            libc::shutdown(fd, libc::SHUT_RDWR);
        }
    }

    /// True when the peer has closed, reset or timed out (kernel keepalive, TCP_USER_TIMEOUT).
    fn peer_gone(&self) -> bool {
        let mut p = libc::pollfd {
            fd: self.0.as_raw_fd(),
            events: libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        let r = unsafe { libc::poll(&mut p, 1, 0) };
        r > 0 && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
    }
}

struct ConnGauge;

impl ConnGauge {
    fn new() -> Self {
        METRICS.ssh.connections.inc();
        Self
    }
}

impl Drop for ConnGauge {
    fn drop(&mut self) {
        METRICS.ssh.connections.dec();
    }
}

/// Reads the PROXY protocol header a trusted balancer sends first, and returns the client's
/// address it names (the balancer's own for a health check or an unknown family). The bytes after
/// the header, the client's SSH banner, stay unread for russh.
async fn proxied_client(
    stream: &mut TcpStream,
    balancer: SocketAddr,
    deadline: Instant,
) -> Result<SocketAddr, String> {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; proxy_protocol::MAX_HEADER];
    loop {
        let n = tokio::time::timeout_at(deadline, stream.peek(&mut buf))
            .await
            .map_err(|_| "no PROXY protocol header in time".to_owned())?
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("closed before its PROXY protocol header".into());
        }
        match proxy_protocol::parse(&buf[..n]) {
            Ok(ProxyParse::Complete { consumed, source }) => {
                let header = buf.get_mut(..consumed).unwrap_or_default();
                stream.read_exact(header).await.map_err(|e| e.to_string())?;
                return Ok(source.unwrap_or(balancer));
            }
            // A peek returns at once while any bytes wait, so it cannot wait for the rest of
            // the header; balancers send it in one segment, so this is rare and short.
            Ok(ProxyParse::Incomplete) => {
                if Instant::now() >= deadline {
                    return Err("no whole PROXY protocol header in time".into());
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// A pre-auth slot for `peer`. When its address already has its share in the handshake, the
/// connection waits its turn in a bounded per-address queue (its handshake not started) until a
/// slot frees, the handshake deadline passes, or the server stops: a legitimate burst from one
/// address (a CI farm behind one NAT) is served late instead of refused, while a stalling
/// attacker still holds at most the per-address share in the handshake.
async fn admit(
    shared: &SshShared,
    peer: SocketAddr,
    deadline: Instant,
    stop: &mut StopSignal,
) -> Result<crate::admission::AddressSlot, String> {
    use crate::admission::Refusal;
    match shared.preauth.try_admit(peer.ip()) {
        Ok(slot) => return Ok(slot),
        Err(Refusal::PerSource(_)) => {}
        Err(global) => return Err(global.to_string()),
    }
    let _place = shared
        .preauth_queue
        .try_admit(peer.ip())
        .map_err(|e| format!("handshake queue full: {e}"))?;
    METRICS.ssh.handshakes_queued.inc();
    let mut delay = Duration::from_millis(2);
    loop {
        let wait = delay.min(deadline.saturating_duration_since(Instant::now()));
        if wait.is_zero() {
            return Err("no handshake slot before the deadline".into());
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stopped(stop) => return Err("server stopping".into()),
        }
        match shared.preauth.try_admit(peer.ip()) {
            Ok(slot) => return Ok(slot),
            Err(Refusal::PerSource(_)) => delay = (delay * 2).min(Duration::from_millis(50)),
            Err(global) => return Err(global.to_string()),
        }
    }
}

/// Serves one accepted connection to the end.
pub(super) async fn serve(
    shared: Arc<SshShared>,
    mut stream: TcpStream,
    peer: SocketAddr,
    stop: StopSignal,
) {
    let _gauge = ConnGauge::new();
    let fd = stream.as_raw_fd();
    if let Err(e) = tune_socket(fd, &shared.config.tcp) {
        tracing::debug!(%peer, error = %e, "cannot set SSH socket options");
    }
    let deadline = Instant::now() + shared.limits.handshake_timeout;
    let from_balancer = shared
        .limits
        .proxy_protocol_from
        .iter()
        .any(|r| r.contains(peer.ip()));
    let peer = if from_balancer {
        match proxied_client(&mut stream, peer, deadline).await {
            Ok(client) => client,
            Err(reason) => {
                METRICS.ssh.handshakes_failed.inc();
                tracing::info!(%peer, %reason, "SSH connection from a PROXY protocol balancer refused");
                return;
            }
        }
    } else {
        peer
    };
    let local = stream.local_addr().ok();
    serve_after(shared, stream, fd, peer, local, deadline, stop).await;
}

/// Serves SSH over `stream` (a TCP connection, or a WebSocket over one: `fd` is the TCP socket
/// under it, which the supervisor cuts), from admission on, with the pre-auth deadline starting
/// now.
pub(super) async fn serve_transport<S>(
    shared: Arc<SshShared>,
    stream: S,
    fd: RawFd,
    peer: SocketAddr,
    local: Option<SocketAddr>,
    stop: StopSignal,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let _gauge = ConnGauge::new();
    let deadline = Instant::now() + shared.limits.handshake_timeout;
    serve_after(shared, stream, fd, peer, local, deadline, stop).await;
}

async fn serve_after<S>(
    shared: Arc<SshShared>,
    stream: S,
    fd: RawFd,
    peer: SocketAddr,
    local: Option<SocketAddr>,
    deadline: Instant,
    mut stop: StopSignal,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let slot = match admit(&shared, peer, deadline, &mut stop).await {
        Ok(s) => s,
        Err(reason) => {
            METRICS.ssh.handshakes_refused.inc();
            tracing::info!(%peer, %reason, "SSH connection refused");
            if let Ok(c) = Cutter::new(fd) {
                c.cut();
            }
            return;
        }
    };
    // Boxed: a connection waiting in the queue above holds only the admission's small state,
    // not the handshake's and session's, which a spawned task would otherwise reserve up front.
    Box::pin(handshake_and_session(
        shared, stream, fd, peer, local, deadline, stop, slot,
    ))
    .await;
}

/// The SSH handshake and session of an admitted connection, holding its pre-auth `slot`.
#[allow(clippy::too_many_arguments)]
async fn handshake_and_session<S>(
    shared: Arc<SshShared>,
    stream: S,
    fd: RawFd,
    peer: SocketAddr,
    local: Option<SocketAddr>,
    deadline: Instant,
    mut stop: StopSignal,
    slot: crate::admission::AddressSlot,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    METRICS.ssh.handshakes_started.inc();
    let cutter = match Cutter::new(fd) {
        Ok(c) => c,
        Err(e) => {
            // Without a way to cut the connection, do not serve it (e.g. EMFILE).
            tracing::warn!(%peer, error = %e, "cannot dup SSH socket; closing");
            METRICS.ssh.handshakes_failed.inc();
            return;
        }
    };
    let (phase_tx, mut phase) = watch::channel(Phase::default());
    let (dead_tx, dead_rx) = watch::channel(false);
    let handler = ConnHandler::new(
        Arc::clone(&shared),
        peer,
        local,
        PreAuthGuard::new(slot),
        Arc::new(phase_tx),
        dead_rx,
        stop.clone(),
    );
    let started = tokio::time::timeout_at(
        deadline,
        russh::server::run_stream(Arc::clone(&shared.russh), stream, handler),
    )
    .await;
    let session = match started {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            // The version exchange failed: not SSH, or the peer closed.
            tracing::debug!(%peer, error = %e, "SSH handshake failed");
            METRICS.ssh.handshakes_failed.inc();
            return;
        }
        Err(_) => {
            // Dropping the future dropped the stream: the socket is closed already.
            METRICS.ssh.handshakes_timed_out.inc();
            tracing::info!(%peer, "SSH handshake timed out before the version exchange");
            cutter.cut();
            return;
        }
    };
    let handle = session.handle();
    tokio::pin!(session);
    let mut liveness = tokio::time::interval(LIVENESS_INTERVAL);
    let mut stopping = false;
    let mut authenticated = false;
    loop {
        let now = *phase.borrow_and_update();
        authenticated |= now.authenticated;
        if stopping && now.execs == 0 {
            // Shutdown and nothing runs here. A client whose command just finished closes
            // the connection itself within moments; a disconnect sent before that makes
            // OpenSSH exit 255 instead of with git's status. So first give it a moment.
            if tokio::time::timeout(LINGER, &mut session).await.is_ok() {
                return;
            }
            // Then say goodbye. The disconnect queues behind any output still on its way, so
            // wait for the session to flush it and end before cutting.
            let bye = handle.disconnect(
                russh::Disconnect::ByApplication,
                "server is shutting down".into(),
                "en".into(),
            );
            let _ = tokio::time::timeout(DRAIN_WAIT, bye).await;
            if tokio::time::timeout(DRAIN_WAIT, &mut session).await.is_ok() {
                return;
            }
            cutter.cut();
            break;
        }
        tokio::select! {
            result = &mut session => {
                if let Err(e) = result {
                    tracing::debug!(%peer, error = %e, "SSH session ended with an error");
                }
                if !authenticated && !phase.borrow().authenticated {
                    METRICS.ssh.handshakes_failed.inc();
                }
                return;
            }
            _ = tokio::time::sleep_until(deadline), if !authenticated => {
                METRICS.ssh.handshakes_timed_out.inc();
                tracing::info!(%peer, "SSH handshake timed out: closing");
                cutter.cut();
                break;
            }
            changed = phase.changed() => {
                if changed.is_err() {
                    // The handler is gone, so the session is ending: wait for it.
                    let _ = (&mut session).await;
                    return;
                }
            }
            _ = stopped(&mut stop), if !stopping => stopping = true,
            _ = liveness.tick(), if now.execs > 0 => {
                if cutter.peer_gone() {
                    tracing::info!(%peer, "SSH client gone while git ran: cutting");
                    let _ = dead_tx.send(true);
                    cutter.cut();
                    break;
                }
            }
        }
    }
    // Cut: the session notices at its next I/O, which the shutdown made fail at once.
    let _ = dead_tx.send(true);
    if tokio::time::timeout(CUT_WAIT, &mut session).await.is_err() {
        tracing::warn!(%peer, "SSH session did not end after its socket was cut");
    }
}
