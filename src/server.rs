//! `gitplane serve`: start-up, one pinned shard thread per core, signals and graceful shutdown.
//!
//! Each shard is a monoio runtime (io_uring, or epoll where io_uring is unavailable) with its own
//! SO_REUSEPORT listener, so the kernel spreads connections across shards and no accept lock is
//! shared. The main thread only waits for SIGTERM/SIGINT: then every shard stops accepting, lets
//! in-flight requests finish up to the grace period, cuts the rest, and the process exits 0.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use monoio::blocking::DefaultThreadPool;
use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};

use crate::config::{ServeConfig, TcpOptions};
use crate::git::stream::reap_orphans;
use crate::http::conn::Conn;
use crate::http::server::serve_connection;
use crate::lifecycle::ShutdownSignal;
use crate::metrics::METRICS;
use crate::smart_http::{AppState, SmartHttp};

/// Listen backlog per shard socket (the kernel caps it at net.core.somaxconn).
const BACKLOG: i32 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: io::Error },
    #[error("cannot start shard thread {shard}: {source}")]
    Thread { shard: usize, source: io::Error },
    #[error("cannot set up signal handling: {0}")]
    Signals(io::Error),
}

/// One SO_REUSEPORT listener per shard, all on the same port (port 0 picks one for all).
fn bind_listeners(addr: SocketAddr, count: usize) -> Result<Vec<TcpListener>, ServeError> {
    let mut listeners = Vec::with_capacity(count);
    let mut addr = addr;
    for _ in 0..count {
        let err = |source| ServeError::Listen { addr, source };
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
            .map_err(err)?;
        socket.set_reuse_port(true).map_err(err)?;
        socket.set_reuse_address(true).map_err(err)?;
        socket.set_nonblocking(true).map_err(err)?;
        socket.set_cloexec(true).map_err(err)?;
        socket.bind(&addr.into()).map_err(err)?;
        socket.listen(BACKLOG).map_err(err)?;
        let listener: TcpListener = socket.into();
        if addr.port() == 0 {
            addr = listener.local_addr().map_err(err)?;
        }
        listeners.push(listener);
    }
    Ok(listeners)
}

/// Kernel keepalive, TCP_USER_TIMEOUT and no Nagle on an accepted socket. Keepalive is what cuts
/// peers that vanish without a FIN; the user timeout cuts peers that stop acknowledging data.
fn tune_socket(fd: std::os::fd::RawFd, tcp: &TcpOptions) -> io::Result<()> {
    // SAFETY: fd is the open socket we just accepted; the borrow ends with this function.
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

fn block_signals() -> io::Result<libc::sigset_t> {
    // SAFETY: sigset manipulation on a local set; pthread_sigmask on the calling thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        let r = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if r != 0 {
            return Err(io::Error::from_raw_os_error(r));
        }
        Ok(set)
    }
}

fn wait_signal(set: &libc::sigset_t) -> i32 {
    let mut sig = 0;
    // SAFETY: set is a valid, blocked signal set.
    unsafe { libc::sigwait(set, &mut sig) };
    sig
}

/// Runs the server until SIGTERM or SIGINT. `ready` receives the bound HTTP address.
pub fn run(config: ServeConfig, ready: impl FnOnce(SocketAddr)) -> Result<(), ServeError> {
    // Block before any thread exists so that every thread inherits the mask and only the main
    // thread's sigwait sees the signals. git children get a clean mask from std's spawn.
    let signals = block_signals().map_err(ServeError::Signals)?;
    let config = Arc::new(config);
    let shards = config.shards.get();
    let listeners = bind_listeners(config.http_listen, shards)?;
    let bound = listeners
        .first()
        .and_then(|l| l.local_addr().ok())
        .unwrap_or(config.http_listen);
    METRICS.set_shards(shards);
    if !config.force_epoll && !monoio::utils::detect_uring() {
        tracing::warn!("io_uring is unavailable (old kernel, kernel.io_uring_disabled=1, or a seccomp filter): shards use epoll");
    }
    let state = Arc::new(AppState::new(Arc::clone(&config)));
    let pool = DefaultThreadPool::new(config.blocking_threads.get());
    let stop = Arc::new(AtomicBool::new(false));
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mut threads = Vec::with_capacity(shards);
    for (id, listener) in listeners.into_iter().enumerate() {
        let state = Arc::clone(&state);
        let stop = Arc::clone(&stop);
        let pool = pool.clone();
        let handle = std::thread::Builder::new()
            .name(format!("gitplane-shard-{id}"))
            .spawn(move || {
                if let Err(e) = monoio::utils::bind_to_cpu_set([id % cpus]) {
                    tracing::warn!(shard = id, error = ?e, "cannot pin shard to its CPU");
                }
                if let Err(e) = run_shard(id, listener, state, stop, pool) {
                    tracing::error!(shard = id, error = %e, "shard failed");
                }
            })
            .map_err(|source| ServeError::Thread { shard: id, source })?;
        threads.push(handle);
    }
    tracing::info!(%bound, shards, "serving Git smart HTTP");
    ready(bound);
    let sig = wait_signal(&signals);
    tracing::info!(
        signal = sig,
        grace_secs = config.shutdown_grace.as_secs(),
        "stopping: no new connections, finishing in-flight requests"
    );
    stop.store(true, Ordering::SeqCst);
    // A second signal during the drain means "now".
    std::thread::spawn(move || {
        wait_signal(&signals);
        tracing::warn!("second signal: exiting without waiting");
        std::process::exit(1);
    });
    for t in threads {
        let _ = t.join();
    }
    tracing::info!("stopped");
    Ok(())
}

fn run_shard(
    id: usize,
    listener: TcpListener,
    state: Arc<AppState>,
    stop: Arc<AtomicBool>,
    pool: DefaultThreadPool,
) -> io::Result<()> {
    let force_epoll = state.config.force_epoll;
    let shard = accept_loop(id, listener, state, stop);
    if force_epoll {
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .attach_thread_pool(Box::new(pool))
            .build()?
            .block_on(shard);
    } else {
        monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
            .enable_timer()
            .with_entries(4096)
            .attach_thread_pool(Box::new(pool))
            .build()?
            .block_on(shard);
    }
    // Connections cut at the deadline dropped their tasks with the runtime, killing their git
    // children; reap those now.
    reap_orphans(true);
    Ok(())
}

async fn accept_loop(
    id: usize,
    listener: TcpListener,
    state: Arc<AppState>,
    stop: Arc<AtomicBool>,
) {
    let listener = match monoio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(shard = id, error = %e, "cannot register listener");
            return;
        }
    };
    let shutdown = Rc::new(ShutdownSignal::default());
    monoio::spawn(watch_stop(Arc::clone(&stop), Rc::clone(&shutdown)));
    let handler = Rc::new(SmartHttp::new(Arc::clone(&state), Rc::clone(&shutdown)));
    let config = Arc::clone(&state.config);
    let active = Rc::new(std::cell::Cell::new(0usize));
    let gauge = METRICS.shard_connections(id);
    loop {
        let accepted = monoio::select! {
            r = listener.accept() => r,
            _ = shutdown.wait() => break,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(shard = id, error = %e, "accept failed");
                monoio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if active.get() >= config.http.max_connections_per_shard {
            METRICS.connections_rejected.inc();
            monoio::spawn(async move {
                let mut conn = Conn::new(stream, peer);
                conn.close_after_response();
                let _ = conn
                    .respond_text(503, &[("Retry-After", "1")], "too many connections\n")
                    .await;
                conn.shutdown().await;
            });
            continue;
        }
        if let Err(e) = tune_socket(std::os::fd::AsRawFd::as_raw_fd(&stream), &config.tcp) {
            tracing::debug!(error = %e, "cannot set socket options");
        }
        METRICS.connections_accepted.inc();
        active.set(active.get() + 1);
        if let Some(g) = gauge {
            g.inc();
        }
        let handler = Rc::clone(&handler);
        let shutdown = Rc::clone(&shutdown);
        let active = Rc::clone(&active);
        let config = Arc::clone(&config);
        monoio::spawn(async move {
            let mut conn = Conn::new(stream, peer);
            serve_connection(&*handler, &mut conn, &config.http, &shutdown).await;
            active.set(active.get() - 1);
            if let Some(g) = gauge {
                g.dec();
            }
        });
    }
    drop(listener);
    let deadline = std::time::Instant::now() + config.shutdown_grace;
    while active.get() > 0 && std::time::Instant::now() < deadline {
        monoio::time::sleep(Duration::from_millis(20)).await;
    }
    if active.get() > 0 {
        tracing::warn!(
            shard = id,
            connections = active.get(),
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
            return;
        }
        monoio::time::sleep(Duration::from_millis(50)).await;
    }
}
