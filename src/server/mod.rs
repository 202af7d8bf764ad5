//! `gitplane serve`: start-up, the per-core threads, signals and graceful shutdown.
//!
//! The composition root: it builds every service and runs them on the per-core runtime
//! ([`crate::runtime`]): a monoio shard per core serving the io_uring front ends (HTTP, gRPC) and
//! a tokio sidecar per core for the tokio-bound ones (SSH, AMQP). Nothing below imports it. Each front end owns one
//! SO_REUSEPORT listener per core, so the kernel spreads connections and no accept lock is
//! shared. The main thread only waits for signals: on SIGTERM/SIGINT every front end stops
//! accepting, lets in-flight work finish up to the grace period, cuts the rest, and the process
//! exits 0; on SIGUSR2 it first starts the next generation with the listening sockets
//! ([`upgrade`]) and drains only once that one is ready. Listeners handed down by server_starter
//! or by the previous generation are taken over instead of bound ([`inherit`]).

mod http;
pub mod inherit;
pub mod upgrade;

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use monoio::blocking::DefaultThreadPool;

use crate::config::ServeConfig;
use crate::metrics::METRICS;
use crate::runtime::shard::{self, bind_listeners, ListenerSet, ShardService};
use crate::runtime::sidecar::{self, SidecarService};
use crate::smart_http::AppState;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr} for {service}: {source}")]
    Listen {
        service: &'static str,
        addr: SocketAddr,
        source: io::Error,
    },
    #[error("cannot start thread {name}: {source}")]
    Thread { name: String, source: io::Error },
    #[error("cannot set up signal handling: {0}")]
    Signals(io::Error),
    #[error("cannot start the SSH service: {0}")]
    Ssh(#[from] crate::ssh::SshError),
    #[error("cannot start the hook workers: {0}")]
    Hooks(#[from] crate::hooks::HookError),
    #[error("cannot start the gRPC API: {0}")]
    Rpc(#[from] crate::rpc::RpcError),
    #[error("cannot load the LFS token secret: {0}")]
    TokenSecret(#[from] crate::token::SecretError),
    #[error("cannot find the gitplane executable: {0}")]
    Exe(io::Error),
    #[error(transparent)]
    PackCache(#[from] crate::git::pack_cache::PackCacheError),
    #[error("cannot prepare LFS storage under {path}: {source}")]
    LfsStorage {
        path: std::path::PathBuf,
        source: io::Error,
    },
    #[error("inherited listening sockets: {0}")]
    Inherit(#[from] inherit::InheritError),
    #[error("cannot open the store: {0}")]
    Store(crate::store::StoreError),
    #[error("cannot create the first user: {0}")]
    Admin(#[from] crate::admin::AdminError),
}

/// The services a server runs, and where they listen.
#[derive(Default)]
pub struct Frontends {
    pub shard: Vec<Arc<dyn ShardService>>,
    pub sidecar: Vec<Arc<dyn SidecarService>>,
    /// (service name, bound address), reported once everything listens.
    pub bound: Vec<(&'static str, SocketAddr)>,
    /// Every service's listening sockets, for the next generation.
    pub fds: Vec<(&'static str, Vec<RawFd>)>,
    /// Sockets handed down by the previous generation, until taken.
    inherited: inherit::Inherited,
}

impl Frontends {
    /// One listener per core for `service` on `addr`: the inherited ones if any, else bound.
    pub fn listen(
        &mut self,
        service: &'static str,
        addr: SocketAddr,
        cores: usize,
    ) -> Result<ListenerSet, ServeError> {
        let listen_error = |source| ServeError::Listen {
            service,
            addr,
            source,
        };
        let listeners = match self.inherited.take(service, addr, cores) {
            Ok(Some(listeners)) => {
                tracing::info!(service, %addr, "serving on inherited listening sockets");
                listeners
            }
            Ok(None) => {
                if self.inherited.under_server_starter() {
                    tracing::info!(service, %addr, "server_starter passed no socket for this address: binding it");
                }
                bind_listeners(addr, cores).map_err(listen_error)?
            }
            Err(e) => return Err(listen_error(e)),
        };
        self.fds
            .push((service, listeners.iter().map(|l| l.as_raw_fd()).collect()));
        let bound = listeners
            .first()
            .and_then(|l| l.local_addr().ok())
            .unwrap_or(addr);
        self.bound.push((service, bound));
        Ok(ListenerSet::new(listeners))
    }
}

/// Binds every front end. A new front end is added here.
fn build_frontends(
    config: &Arc<ServeConfig>,
    inherited: inherit::Inherited,
) -> Result<Frontends, ServeError> {
    let cores = config.shards.get();
    let mut f = Frontends {
        inherited,
        ..Frontends::default()
    };
    // Captured once: the shards answer v2 advertisements with it, and so does the cluster
    // transport for relayed requests.
    let v2_advertisement = crate::git::v2::capture_or_warn(&config.git.binary, &config.data_dir);
    let state = Arc::new(AppState::new(Arc::clone(config), v2_advertisement.clone()));
    let token_secret = crate::token::TokenSecret::load_or_create(&config.data_dir)?;
    crate::lfs::storage::DiskStore::new(&config.data_dir)
        .prepare()
        .map_err(|source| ServeError::LfsStorage {
            path: config.data_dir.join("lfs"),
            source,
        })?;
    if let Some(cache) = &config.git.pack_cache {
        let exe = crate::lifecycle::running_exe().map_err(ServeError::Exe)?;
        crate::git::pack_cache::enable(&exe, cache)?;
    }
    let http_listeners = f.listen("http", config.http_listen, cores)?;
    let (packs, ssh_tokens) = (Arc::clone(&state.limiter), token_secret.clone());
    f.shard.push(Arc::new(http::HttpService::new(
        http_listeners,
        state,
        token_secret,
    )));
    // Git over SSH (issue #3) on every sidecar; LFS hrefs point at the bound HTTP address.
    let http_addr = f
        .bound
        .iter()
        .find(|(service, _)| *service == "http")
        .map_or(config.http_listen, |(_, addr)| *addr);
    let ssh_listeners = f.listen("ssh", config.ssh_listen, cores)?;
    f.sidecar.push(Arc::new(crate::ssh::SshService::new(
        ssh_listeners,
        Arc::clone(config),
        packs,
        http_addr,
        ssh_tokens,
    )?));
    let ssh_addr = f
        .bound
        .iter()
        .find(|(service, _)| *service == "ssh")
        .map_or(config.ssh_listen, |(_, addr)| *addr);
    if let Some(cluster) = &config.cluster {
        start_cluster(
            config,
            cluster,
            &mut f,
            http_addr,
            ssh_addr,
            v2_advertisement,
        )?;
    }
    let rpc_listeners = f.listen("rpc", config.rpc_listen, cores)?;
    f.shard.push(Arc::new(crate::rpc::RpcService::new(
        rpc_listeners,
        config,
    )?));
    // Hook workers (issue #6): consumers/relay, or the embedded outbox queue, on every sidecar.
    // Housekeeping (issue #12): a job of the hook workers, plus the periodic sweep.
    let housekeeper = Arc::new(crate::housekeeping::Housekeeper::new(
        config.housekeeping.clone(),
        config.git.binary.clone(),
        config.data_dir.join("repos"),
    ));
    f.sidecar.push(Arc::new(crate::hooks::HooksService::new(
        config,
        Arc::clone(&housekeeper),
    )?));
    f.sidecar
        .push(Arc::new(crate::housekeeping::HousekeepingService {
            housekeeper,
        }));
    Ok(f)
}

fn block_signals() -> io::Result<libc::sigset_t> {
    // SAFETY: sigset manipulation on a local set; pthread_sigmask on the calling thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGUSR2);
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

/// Joins the cluster: the node-to-node listener (SO_REUSEPORT, so that the next generation of a
/// hot upgrade can bind it too), the heartbeat, and the repair loop.
fn start_cluster(
    config: &Arc<ServeConfig>,
    cluster: &crate::cluster::ClusterConfig,
    f: &mut Frontends,
    http_addr: SocketAddr,
    ssh_addr: SocketAddr,
    v2_advertisement: Option<Arc<[u8]>>,
) -> Result<(), ServeError> {
    let listen_err = |source| ServeError::Listen {
        service: "cluster",
        addr: cluster.listen,
        source,
    };
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(cluster.listen),
        socket2::Type::STREAM,
        None,
    )
    .map_err(listen_err)?;
    socket.set_reuse_address(true).map_err(listen_err)?;
    socket.set_reuse_port(true).map_err(listen_err)?;
    socket.bind(&cluster.listen.into()).map_err(listen_err)?;
    socket.listen(1024).map_err(listen_err)?;
    let listener: std::net::TcpListener = socket.into();
    let bound = listener.local_addr().map_err(listen_err)?;
    let repos = crate::git::repo::RepoRoot::new(&config.data_dir);
    crate::cluster::transport::serve(
        listener,
        Arc::new(crate::cluster::transport::ServerContext {
            secret: cluster.secret.clone(),
            repos: repos.clone(),
            git: config.git.binary.clone(),
            v2_advertisement,
            store: config.store.clone(),
        }),
    )
    .map_err(|source| ServeError::Thread {
        name: "gitplane-cluster".into(),
        source,
    })?;
    let thread_err = |name: &str| {
        let name = name.to_owned();
        move |source| ServeError::Thread { name, source }
    };
    crate::cluster::membership::start_heartbeat(
        config.store.clone(),
        bound.to_string(),
        http_addr.to_string(),
        ssh_addr.to_string(),
        cluster.heartbeat,
        cluster.down_after,
    )
    .map_err(thread_err("gitplane-heartbeat"))?;
    if let Some(routing) = config.cluster_routing() {
        crate::cluster::repair::start(
            config.store.clone(),
            routing,
            repos,
            config.git.binary.clone(),
        )
        .map_err(thread_err("gitplane-repair"))?;
    }
    f.bound.push(("cluster", bound));
    Ok(())
}

/// Runs the server until SIGTERM or SIGINT. `ready` receives every bound (service, address).
pub fn run(
    config: ServeConfig,
    ready: impl FnOnce(&[(&'static str, SocketAddr)]),
) -> Result<(), ServeError> {
    // Block before any thread exists so that every thread inherits the mask and only the main
    // thread's sigwait sees the signals. git children get a clean mask from std's spawn.
    let signals = block_signals().map_err(ServeError::Signals)?;
    // A fixed mmap threshold (which also turns off glibc's dynamic one): blocks of 1 MiB and up
    // are mapped and unmapped on their own. With the dynamic threshold, the first large free
    // (argon2id's 19 MiB working memory) raises it, and from then on every password check leaves
    // 19 MiB resident in the arena of each blocking thread that ran one.
    // SAFETY: mallopt only changes allocator tuning.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
    // Taken before any thread exists: the fds are ours, and the environment is read once.
    let inherited = inherit::Inherited::from_env()?;
    let next = upgrade::NextGeneration {
        exe: std::env::current_exe().map_err(ServeError::Exe)?,
        args: std::env::args_os().skip(1).collect(),
        listeners: Vec::new(),
        ready_timeout: config.upgrade_timeout,
    };
    // The store after the signal mask: a PostgreSQL pool starts threads of its own.
    config.store.prepare().map_err(ServeError::Store)?;
    tracing::info!(store = ?config.store, "store ready");
    if let Some(path) = crate::admin::ensure_initial_admin(&config.store)? {
        tracing::info!(
            path = %path.display(),
            "created user `admin`; its password is in this file (mode 0600)"
        );
    }
    crate::store::revocation::listen(&config.store);
    let config = Arc::new(config);
    let cores = config.shards.get();
    let frontends = build_frontends(&config, inherited)?;
    let next = upgrade::NextGeneration {
        listeners: frontends.fds.clone(),
        ..next
    };
    METRICS.set_shards(cores);
    if !config.force_epoll && !monoio::utils::detect_uring() {
        tracing::warn!("io_uring is unavailable (old kernel, kernel.io_uring_disabled=1, or a seccomp filter): shards use epoll");
    }
    let pool = DefaultThreadPool::new(config.blocking_threads.get());
    let stop = Arc::new(AtomicBool::new(false));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let shard_services = Arc::new(frontends.shard);
    let sidecar_services = Arc::new(frontends.sidecar);
    let grace = config.shutdown_grace;
    let mut threads = Vec::new();
    let spawn = |name: String, cpu: usize, body: Box<dyn FnOnce() -> io::Result<()> + Send>| {
        std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                if let Err(e) = monoio::utils::bind_to_cpu_set([cpu]) {
                    tracing::warn!(thread = %name, error = ?e, "cannot pin thread to its CPU");
                }
                if let Err(e) = body() {
                    tracing::error!(thread = %name, error = %e, "thread failed");
                }
            })
            .map_err(|source| ServeError::Thread {
                name: String::new(),
                source,
            })
    };
    for core in 0..cores {
        let (services, stop, pool) = (Arc::clone(&shard_services), Arc::clone(&stop), pool.clone());
        let force_epoll = config.force_epoll;
        threads.push(spawn(
            format!("gitplane-shard-{core}"),
            core % cpus,
            Box::new(move || shard::run_shard(core, services, stop, grace, force_epoll, pool)),
        )?);
        if !sidecar_services.is_empty() {
            let (services, stop) = (Arc::clone(&sidecar_services), stop_rx.clone());
            threads.push(spawn(
                format!("gitplane-sidecar-{core}"),
                core % cpus,
                Box::new(move || sidecar::run_sidecar(core, services, stop, grace)),
            )?);
        }
    }
    for (service, addr) in &frontends.bound {
        tracing::info!(%service, %addr, cores, "listening");
    }
    ready(&frontends.bound);
    upgrade::report_ready(config.pid_file.as_deref());
    let sig = loop {
        let sig = wait_signal(&signals);
        if sig != libc::SIGUSR2 {
            break sig;
        }
        tracing::info!(exe = %next.exe.display(), "upgrade: starting the next generation");
        match next.start() {
            Ok(pid) => {
                tracing::info!(
                    pid,
                    "upgrade: the next generation is ready; draining this one"
                );
                break sig;
            }
            Err(e) => tracing::error!(error = %e, "upgrade failed: this generation keeps serving"),
        }
    };
    tracing::info!(
        signal = sig,
        grace_secs = grace.as_secs(),
        "stopping: no new connections, finishing in-flight work"
    );
    stop.store(true, Ordering::SeqCst);
    let _ = stop_tx.send(true);
    // During the drain, SIGINT (a second Ctrl-C) means "now". Another SIGTERM does not:
    // server_starter sends TERM to every old generation on each HUP, so a generation still
    // draining from the previous upgrade gets it again, and must not cut its transfers; the
    // grace period bounds the drain either way.
    std::thread::spawn(move || loop {
        match wait_signal(&signals) {
            libc::SIGINT => {
                tracing::warn!("SIGINT while draining: exiting without waiting");
                std::process::exit(1);
            }
            sig => tracing::info!(signal = sig, "already draining: signal ignored"),
        }
    });
    for t in threads {
        let _ = t.join();
    }
    if let Some(path) = &config.pid_file {
        upgrade::remove_pid_file(path);
    }
    tracing::info!("stopped");
    Ok(())
}
