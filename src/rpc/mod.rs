//! The gRPC repository API: what the hosting web app asks of the data plane (branches, tags,
//! logs, diffs, trees and blobs, pull-request checks and merges), served on the shards.
//!
//! Data flow: a shard accepts on its own SO_REUSEPORT `--rpc-listen` socket ([`RpcService`]),
//! [`server`] runs HTTP/2 (h2 through monoio-compat) and the gRPC stream protocol, with the
//! wire format in the sans-I/O codecs [`frame`] and [`status`]; [`service`] maps each method to
//! an operation in [`ops`], which runs on the dedicated blocking [`pool`] with a cached
//! `git2::Repository`; responses go back through a bounded channel so a 200 MB blob streams in
//! 64 KiB messages with flat memory. [`auth`] holds the bearer token every call but health
//! checks needs. Messages are generated from `proto/` into [`pb`]. Connections that do not use
//! what they hold give it back: [`conns`] caps them per address and keeps those without a token
//! to a share of the shard, [`watch`] closes idle ones, ones that never authenticate and ones
//! whose keepalive PING goes unanswered.

pub mod auth;
pub mod conns;
pub mod ops;
pub mod pb;
pub mod pool;
pub mod server;
pub mod service;
pub mod watch;

pub use gitplane_wire::rpc::{frame, status};

use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;

use crate::config::ServeConfig;
use crate::git::repo::RepoRoot;
use crate::metrics::METRICS;
use crate::runtime::shard::{accept_loop, AcceptOptions, ListenerSet, ShardContext, ShardService};
use auth::{Token, TokenError};
use conns::{AddressCaps, ShardShare};
use pool::{GitPool, PoolError};
use server::ShardRpc;
use service::{RpcState, METHOD_LABELS};

/// Why the RPC front end cannot start.
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error(transparent)]
    Pool(#[from] PoolError),
}

/// The gRPC front end, one accept loop per shard.
pub struct RpcService {
    listeners: ListenerSet,
    state: Arc<RpcState>,
    tcp: crate::config::TcpOptions,
}

impl RpcService {
    /// Loads (or creates) the token and starts the worker pool.
    ///
    /// # Errors
    /// [`RpcError`] if the token file is unusable or a worker thread cannot start.
    pub fn new(listeners: ListenerSet, config: &ServeConfig) -> Result<Self, RpcError> {
        let limits = config.rpc.clone();
        let (token, created) = Token::load_or_create(&limits.token_file)?;
        if created {
            tracing::info!(path = %limits.token_file.display(), "created the RPC bearer token (mode 0600)");
        }
        configure_libgit2();
        let pool = GitPool::start(limits.blocking_threads.get(), limits.max_queued)?;
        METRICS.rpc.set_methods(METHOD_LABELS);
        Ok(Self {
            listeners,
            tcp: config.tcp.clone(),
            state: Arc::new(RpcState {
                address_caps: AddressCaps::new(&limits),
                limits,
                token,
                pool,
                repos: RepoRoot::new(&config.data_dir),
                git_binary: config.git.binary.clone(),
                store: config.store.clone(),
                routing: config.cluster_routing(),
                housekeeping: Arc::new(config.housekeeping.clone()),
            }),
        })
    }
}

/// Process-wide libgit2 settings, once: no user or system gitconfig may change how the server
/// merges or diffs, pack maps are bounded, and what Merge/CreateBranch/DeleteBranch write is
/// fsynced before the call answers.
fn configure_libgit2() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        for level in [
            git2::ConfigLevel::System,
            git2::ConfigLevel::XDG,
            git2::ConfigLevel::Global,
        ] {
            // SAFETY: called once, before any repository is opened by this process's workers.
            if let Err(e) = unsafe { git2::opts::set_search_path(level, "") } {
                tracing::warn!(error = %e, "cannot clear the libgit2 config search path");
            }
        }
        // Packs are mmapped in windows; cap the total so RSS from maps stays bounded
        // (libgit2 evicts least-recently-used windows past it).
        // SAFETY: as above.
        if let Err(e) = unsafe { git2::opts::set_mwindow_mapped_limit(512 << 20) } {
            tracing::warn!(error = %e, "cannot limit libgit2 pack maps");
        }
        // libgit2 does not fsync objects, refs or reflogs unless told to (git2 has no wrapper
        // for the option). Without it an acknowledged merge could vanish in a power cut, which
        // receive-pack (core.fsync in git::process) never allows for a push.
        libgit2_sys::init();
        // SAFETY: a documented integer option, set once before any repository is opened.
        let failed = unsafe {
            libgit2_sys::git_libgit2_opts(
                libgit2_sys::GIT_OPT_ENABLE_FSYNC_GITDIR as libc::c_int,
                1 as libc::c_int,
            )
        } < 0;
        if failed {
            tracing::error!(
                "cannot make libgit2 fsync what it writes: gRPC ref updates are not durable"
            );
        }
    });
}

impl ShardService for RpcService {
    fn serve(&self, ctx: ShardContext) -> Pin<Box<dyn Future<Output = ()>>> {
        let listener = self.listeners.take(ctx.shard);
        let state = Arc::clone(&self.state);
        let tcp = self.tcp.clone();
        Box::pin(async move {
            let Some(listener) = listener else { return };
            let shard = Rc::new(ShardRpc {
                state: Arc::clone(&state),
                shutdown: Rc::clone(&ctx.shutdown),
                unauthenticated: ShardShare::new(state.limits.max_unauthenticated_per_shard),
            });
            let opts = AcceptOptions {
                name: "rpc",
                max_connections: state.limits.max_connections_per_shard,
                tcp: &tcp,
            };
            let serve = |stream, peer| server::serve_connection(stream, peer, Rc::clone(&shard));
            // Over the cap: close at once; gRPC clients reconnect with backoff.
            let reject = |stream: monoio::net::TcpStream, _peer| async move { drop(stream) };
            accept_loop(listener, &ctx, opts, serve, reject).await;
        })
    }
}
