//! Shards: one pinned thread per core running a monoio runtime (io_uring, or epoll as fallback).
//!
//! Front ends that live on the shards implement [`ShardService`]; each owns one SO_REUSEPORT
//! listener per shard and serves it with [`accept_loop`]. A shard stops accepting when its
//! [`ShutdownSignal`] fires, then waits for its tracked connections to finish, up to the grace
//! period; whatever is still running after that is dropped with the runtime (killing git
//! children, see [`crate::git::stream`]).

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use monoio::blocking::DefaultThreadPool;
use monoio::net::TcpStream;
use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};

use crate::config::TcpOptions;
use crate::git::stream::reap_orphans;
use crate::lifecycle::ShutdownSignal;
use crate::metrics::METRICS;

/// Listen backlog per shard socket (the kernel caps it at net.core.somaxconn).
const BACKLOG: i32 = 4096;

/// What a service gets on each shard.
#[derive(Clone)]
pub struct ShardContext {
    pub shard: usize,
    pub shutdown: Rc<ShutdownSignal>,
    /// Open connections of every service on this shard; the drain waits for it to reach 0.
    pub connections: Rc<Cell<usize>>,
}

/// A front end served on every shard.
pub trait ShardService: Send + Sync {
    /// Serves on one shard until `ctx.shutdown` fires; in-flight connections may outlive the
    /// returned future (they are tracked in `ctx.connections`).
    fn serve(&self, ctx: ShardContext) -> Pin<Box<dyn Future<Output = ()>>>;
}

/// One SO_REUSEPORT listener per shard, all on the same port (port 0 picks one for all).
pub fn bind_listeners(addr: SocketAddr, count: usize) -> io::Result<Vec<TcpListener>> {
    let mut listeners = Vec::with_capacity(count);
    let mut addr = addr;
    for _ in 0..count {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_port(true)?;
        socket.set_reuse_address(true)?;
        socket.set_nonblocking(true)?;
        socket.set_cloexec(true)?;
        socket.bind(&addr.into())?;
        socket.listen(BACKLOG)?;
        let listener: TcpListener = socket.into();
        if addr.port() == 0 {
            addr = listener.local_addr()?;
        }
        listeners.push(listener);
    }
    Ok(listeners)
}

/// Hands each shard its own listener from a set made by [`bind_listeners`].
pub struct ListenerSet(Mutex<Vec<Option<TcpListener>>>);

impl ListenerSet {
    pub fn new(listeners: Vec<TcpListener>) -> Self {
        Self(Mutex::new(listeners.into_iter().map(Some).collect()))
    }

    pub fn take(&self, shard: usize) -> Option<TcpListener> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(shard)
            .and_then(Option::take)
    }
}

/// Kernel keepalive, TCP_USER_TIMEOUT and no Nagle on an accepted socket. Keepalive is what cuts
/// peers that vanish without a FIN; the user timeout cuts peers that stop acknowledging data.
pub fn tune_socket(fd: std::os::fd::RawFd, tcp: &TcpOptions) -> io::Result<()> {
    // SAFETY: fd is an open socket owned by the caller for the duration of this call.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let sock = SockRef::from(&fd);
    let keepalive = TcpKeepalive::new()
        .with_time(tcp.keepalive_idle)
        .with_interval(tcp.keepalive_interval)
        .with_retries(tcp.keepalive_probes);
    sock.set_tcp_keepalive(&keepalive)?;
    sock.set_tcp_user_timeout(tcp.user_timeout)?;
    sock.set_nodelay(true)?;
    Ok(())
}

/// Limits for [`accept_loop`].
pub struct AcceptOptions<'a> {
    pub name: &'static str,
    pub max_connections: usize,
    pub tcp: &'a TcpOptions,
}

/// Accepts on `listener` until shutdown, spawning `serve` for each connection on this shard.
/// Past `max_connections` open connections on the shard, `reject` gets the socket instead.
pub async fn accept_loop<S, F, R, G>(
    listener: TcpListener,
    ctx: &ShardContext,
    opts: AcceptOptions<'_>,
    serve: S,
    reject: R,
) where
    S: Fn(TcpStream, SocketAddr) -> F,
    F: Future<Output = ()> + 'static,
    R: Fn(TcpStream, SocketAddr) -> G,
    G: Future<Output = ()> + 'static,
{
    let listener = match monoio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(shard = ctx.shard, service = opts.name, error = %e, "cannot register listener");
            return;
        }
    };
    let gauge = METRICS.shard_connections(ctx.shard);
    let admit = |stream: TcpStream, peer: SocketAddr| {
        if ctx.connections.get() >= opts.max_connections {
            METRICS.connections_rejected.inc();
            monoio::spawn(reject(stream, peer));
            return;
        }
        if let Err(e) = tune_socket(std::os::fd::AsRawFd::as_raw_fd(&stream), opts.tcp) {
            tracing::debug!(error = %e, "cannot set socket options");
        }
        METRICS.connections_accepted.inc();
        let connections = Rc::clone(&ctx.connections);
        connections.set(connections.get() + 1);
        if let Some(g) = gauge {
            g.inc();
        }
        let conn = serve(stream, peer);
        monoio::spawn(async move {
            conn.await;
            connections.set(connections.get() - 1);
            if let Some(g) = gauge {
                g.dec();
            }
        });
    };
    loop {
        let canceller = monoio::io::Canceller::new();
        let mut accept = std::pin::pin!(listener.cancelable_accept(canceller.handle()));
        let accepted = monoio::select! {
            r = &mut accept => r,
            _ = ctx.shutdown.wait() => {
                // Cancel the pending accept, but serve what it may already have accepted: on
                // io_uring the kernel can complete it before the cancel lands, and dropping that
                // connection would reset a client that was in our queue (during a hot upgrade
                // the queue is shared with the next generation, and must lose nothing).
                let _ = canceller.cancel();
                if let Ok((stream, peer)) = accept.await {
                    admit(stream, peer);
                }
                break;
            }
        };
        match accepted {
            Ok((stream, peer)) => admit(stream, peer),
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(shard = ctx.shard, service = opts.name, error = %e, "accept failed");
                monoio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Runs one shard thread to completion.
pub(crate) fn run_shard(
    shard: usize,
    services: Arc<Vec<Arc<dyn ShardService>>>,
    stop: Arc<AtomicBool>,
    grace: Duration,
    force_epoll: bool,
    pool: DefaultThreadPool,
) -> io::Result<()> {
    let main = shard_main(shard, services, stop, grace);
    if force_epoll {
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .attach_thread_pool(Box::new(pool))
            .build()?
            .block_on(main);
    } else {
        monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
            .enable_timer()
            .with_entries(4096)
            .attach_thread_pool(Box::new(pool))
            .build()?
            .block_on(main);
    }
    // Connections cut at the deadline dropped their tasks with the runtime, killing their git
    // children; reap those now.
    reap_orphans(true);
    Ok(())
}

async fn shard_main(
    shard: usize,
    services: Arc<Vec<Arc<dyn ShardService>>>,
    stop: Arc<AtomicBool>,
    grace: Duration,
) {
    let ctx = ShardContext {
        shard,
        shutdown: Rc::new(ShutdownSignal::default()),
        connections: Rc::new(Cell::new(0)),
    };
    monoio::spawn(watch_stop(stop, Rc::clone(&ctx.shutdown)));
    let running: Vec<_> = services
        .iter()
        .map(|s| monoio::spawn(s.serve(ctx.clone())))
        .collect();
    for r in running {
        r.await;
    }
    let deadline = std::time::Instant::now() + grace;
    while ctx.connections.get() > 0 && std::time::Instant::now() < deadline {
        monoio::time::sleep(Duration::from_millis(20)).await;
    }
    if ctx.connections.get() > 0 {
        tracing::warn!(
            shard,
            connections = ctx.connections.get(),
            "grace period over: cutting connections"
        );
    }
}

/// Turns the process-wide stop flag into this shard's signal, and reaps killed children.
async fn watch_stop(stop: Arc<AtomicBool>, shutdown: Rc<ShutdownSignal>) {
    loop {
        reap_orphans(false);
        if stop.load(Ordering::SeqCst) {
            shutdown.trigger();
        }
        monoio::time::sleep(Duration::from_millis(50)).await;
    }
}
