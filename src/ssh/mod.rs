//! Git over SSH: a russh server on every tokio sidecar, exec-only, hardened against stalled
//! handshakes.
//!
//! Data flow: each sidecar core accepts on its own SO_REUSEPORT listener ([`SshService`]); a
//! connection is admitted against the pre-auth caps ([`crate::admission`]) and supervised by [`conn`],
//! which enforces one deadline over the whole handshake (TCP accept to successful public-key
//! auth) and cuts the socket when it passes. The russh [`handler`] authenticates keys against
//! the store ([`keys`]), accepts only session channels and only `exec` of the commands in
//! [`command`]; [`exec`] runs git through [`crate::git::process`] and
//! [`crate::git::tokio_child`] and streams it over the channel with SSH flow control.
//! `git-lfs-authenticate` answers with [`lfs`] JSON holding a [`crate::token`];
//! `git-lfs-transfer` speaks the pure-SSH LFS protocol ([`lfs_transfer_proto`]) in
//! [`lfs_transfer`], on local-disk or S3 LFS storage.
//!
//! Front ends do not import each other: SSH meets HTTP only in `git`, `auth`, `store` and
//! `token`.

mod conn;
mod exec;
mod handler;
pub mod hostkey;
mod idle;
pub mod keys;
pub mod lfs;
mod lfs_transfer;
mod phase;
pub mod websocket;
pub mod ws_client;

pub use gitplane_wire::ssh::{command, lfs_transfer as lfs_transfer_proto};

use std::borrow::Cow;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use russh::keys::{Algorithm, HashAlg};
use russh::{cipher, kex, MethodKind, MethodSet, Preferred, SshId};

use crate::admission::AddressLimiter as PreAuthLimiter;
use crate::config::{ServeConfig, SshLimits};
use crate::git::limiter::PackLimiter;
use crate::git::repo::RepoRoot;
use crate::lfs::s3_bridge::S3Bridge;
use crate::runtime::shard::ListenerSet;
use crate::runtime::sidecar::{stopped, SidecarService, StopSignal};
use crate::store::{Store, StoreError};
use crate::token::TokenSecret;

#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error(transparent)]
    HostKey(#[from] hostkey::HostKeyError),
    #[error("ssh protocol: {0}")]
    Russh(#[from] russh::Error),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("starting the S3 bridge for git-lfs-transfer: {0}")]
    S3Bridge(std::io::Error),
}

/// Key exchanges: the post-quantum hybrid first, then curve25519 (and its libssh.org alias).
/// The `ext-info` and strict-kex markers are not algorithms but must be listed for russh to
/// advertise server-sig-algs and the Terrapin countermeasure.
const KEX: &[kex::Name] = &[
    kex::MLKEM768X25519_SHA256,
    kex::CURVE25519,
    kex::CURVE25519_PRE_RFC_8731,
    kex::EXTENSION_SUPPORT_AS_CLIENT,
    kex::EXTENSION_SUPPORT_AS_SERVER,
    kex::EXTENSION_OPENSSH_STRICT_KEX_AS_CLIENT,
    kex::EXTENSION_OPENSSH_STRICT_KEX_AS_SERVER,
];
/// Ciphers offered where the CPU encrypts AES-GCM in hardware. The client picks the first of its
/// own list that the server offers, and OpenSSH lists chacha20-poly1305 first: offering it means
/// every pack is encrypted with it. With AES and carry-less multiply instructions, AES-GCM cost
/// this node 21-34% less CPU per SSH clone of a 52 MB pack (docs/BENCHMARKS.md, issue #16).
/// Every client that speaks chacha20-poly1305 also speaks AES-GCM (OpenSSH since 6.2, PuTTY, Go,
/// libssh2 1.11, Apache MINA).
const CIPHERS_AES_HARDWARE: &[cipher::Name] = &[cipher::AES_128_GCM, cipher::AES_256_GCM];
/// Without those instructions AES-GCM is the slow one.
const CIPHERS_SOFTWARE: &[cipher::Name] = &[
    cipher::CHACHA20_POLY1305,
    cipher::AES_256_GCM,
    cipher::AES_128_GCM,
];

fn offered_ciphers() -> &'static [cipher::Name] {
    #[cfg(target_arch = "x86_64")]
    let hardware = std::arch::is_x86_feature_detected!("aes")
        && std::arch::is_x86_feature_detected!("pclmulqdq");
    #[cfg(target_arch = "aarch64")]
    let hardware = std::arch::is_aarch64_feature_detected!("aes")
        && std::arch::is_aarch64_feature_detected!("pmull");
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    let hardware = false;
    if hardware {
        CIPHERS_AES_HARDWARE
    } else {
        CIPHERS_SOFTWARE
    }
}
const HOST_KEY_ALGORITHMS: &[Algorithm] = &[Algorithm::Ed25519];
/// Packs are already zlib-compressed: SSH compression would only burn CPU.
const COMPRESSION: &[russh::compression::Name] = &[russh::compression::NONE];

/// Buffered channel messages per channel before russh stops reading the socket (backpressure).
const CHANNEL_BUFFER: usize = 64;

/// State shared by every SSH connection on every core.
pub struct SshShared {
    pub config: Arc<ServeConfig>,
    pub limits: SshLimits,
    russh: Arc<russh::server::Config>,
    repos: RepoRoot,
    packs: Arc<PackLimiter>,
    preauth: Arc<PreAuthLimiter>,
    /// Connections waiting for a pre-auth slot (see [`conn`]).
    preauth_queue: Arc<PreAuthLimiter>,
    tokens: TokenSecret,
    /// Where the HTTP listener really listens (for LFS hrefs).
    http_addr: SocketAddr,
    /// `git-lfs-transfer`'s way to S3 when LFS objects are stored there.
    lfs_s3: Option<S3Bridge>,
}

/// The SSH front end, run on every sidecar core.
pub struct SshService {
    listeners: ListenerSet,
    shared: Arc<SshShared>,
}

impl SshService {
    /// Loads (or creates) the host key and logs its fingerprint. `packs` is the node-wide pack
    /// limiter shared with HTTP; `tokens` signs LFS tokens that the HTTP side verifies.
    pub fn new(
        listeners: ListenerSet,
        config: Arc<ServeConfig>,
        packs: Arc<PackLimiter>,
        http_addr: SocketAddr,
        tokens: TokenSecret,
    ) -> Result<Self, SshError> {
        let (host_key, created) = hostkey::load_or_create(&config.data_dir)?;
        let fingerprint = host_key.public_key().fingerprint(HashAlg::Sha256);
        tracing::info!(
            %fingerprint,
            path = %config.data_dir.join(hostkey::HOST_KEY_FILE).display(),
            created,
            "SSH host key"
        );
        let limits = config.ssh.clone();
        let russh = russh::server::Config {
            server_id: SshId::Standard(Cow::Borrowed(concat!(
                "SSH-2.0-gitplane_",
                env!("CARGO_PKG_VERSION")
            ))),
            methods: MethodSet::from(&[MethodKind::PublicKey][..]),
            // OpenSSH probes with "none" first: answering it at once saves a round of waiting
            // on every connection. Key rejections wait a little so that timing tells nothing.
            auth_rejection_time: Duration::from_millis(50),
            auth_rejection_time_initial: Some(Duration::ZERO),
            keys: vec![host_key],
            channel_buffer_size: CHANNEL_BUFFER,
            preferred: Preferred {
                kex: Cow::Borrowed(KEX),
                key: Cow::Borrowed(HOST_KEY_ALGORITHMS),
                cipher: Cow::Borrowed(offered_ciphers()),
                compression: Cow::Borrowed(COMPRESSION),
                ..Preferred::default()
            },
            max_auth_attempts: limits.max_auth_attempts,
            inactivity_timeout: Some(limits.idle_timeout),
            keepalive_interval: Some(limits.keepalive_interval),
            keepalive_max: limits.keepalive_max,
            nodelay: true,
            ..russh::server::Config::default()
        };
        let preauth = PreAuthLimiter::new(
            limits.max_unauthenticated,
            limits.max_unauthenticated_per_ip,
        );
        // Waiting connections are bounded per address; node-wide by the same factor.
        let preauth_queue = PreAuthLimiter::new(
            limits
                .max_queued_per_ip
                .saturating_mul(limits.max_unauthenticated / limits.max_unauthenticated_per_ip)
                .max(limits.max_queued_per_ip),
            limits.max_queued_per_ip.max(1),
        );
        let lfs_s3 = config
            .lfs
            .s3
            .clone()
            .map(S3Bridge::start)
            .transpose()
            .map_err(SshError::S3Bridge)?;
        Ok(Self {
            listeners,
            shared: Arc::new(SshShared {
                lfs_s3,
                repos: RepoRoot::new(&config.data_dir),
                config,
                limits,
                russh: Arc::new(russh),
                packs,
                preauth,
                preauth_queue,
                tokens,
                http_addr,
            }),
        })
    }
}

impl SidecarService for SshService {
    fn name(&self) -> &'static str {
        "ssh"
    }

    fn run(
        self: Arc<Self>,
        core: usize,
        stop: StopSignal,
        grace: Duration,
    ) -> Pin<Box<dyn Future<Output = ()>>> {
        let listener = self.listeners.take(core);
        let shared = Arc::clone(&self.shared);
        let upgraded = websocket::register();
        Box::pin(async move {
            let Some(listener) = listener else { return };
            serve_core(core, shared, listener, upgraded, stop, grace).await;
        })
    }
}

/// Counts this core's open connections; the drain waits for it to reach 0.
struct Active(Arc<AtomicUsize>);

impl Drop for Active {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn serve_core(
    core: usize,
    shared: Arc<SshShared>,
    listener: std::net::TcpListener,
    mut upgraded: tokio::sync::mpsc::UnboundedReceiver<websocket::Handoff>,
    mut stop: StopSignal,
    grace: Duration,
) {
    // Bound with socket2 in non-blocking mode, as tokio requires.
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(core, error = %e, "cannot register the SSH listener");
            return;
        }
    };
    let active = Arc::new(AtomicUsize::new(0));
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            Some(handoff) = upgraded.recv() => {
                // SSH over WebSocket, upgraded by the HTTP listener.
                active.fetch_add(1, Ordering::SeqCst);
                let guard = Active(Arc::clone(&active));
                let (shared, stop) = (Arc::clone(&shared), stop.clone());
                tokio::spawn(async move {
                    websocket::serve(shared, handoff, stop).await;
                    drop(guard);
                });
                continue;
            }
            _ = stopped(&mut stop) => break,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(core, error = %e, "SSH accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        active.fetch_add(1, Ordering::SeqCst);
        let guard = Active(Arc::clone(&active));
        let (shared, stop) = (Arc::clone(&shared), stop.clone());
        tokio::spawn(async move {
            conn::serve(shared, stream, peer, stop).await;
            drop(guard);
        });
    }
    drop(listener);
    // Connections see the same stop signal: unauthenticated and idle ones close now, running
    // git sessions finish. Whatever still runs at the deadline is dropped with the runtime,
    // which kills its git (see `TokioGit`'s Drop).
    let deadline = Instant::now() + grace;
    while active.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let left = active.load(Ordering::SeqCst);
    if left > 0 {
        tracing::warn!(
            core,
            connections = left,
            "SSH grace period over: cutting connections"
        );
    }
}

/// Runs a store call on tokio's blocking pool, with one connection per pool thread.
async fn with_store<R: Send + 'static>(
    store: crate::store::Location,
    f: impl FnOnce(&Store) -> Result<R, StoreError> + Send + 'static,
) -> Result<R, StoreError> {
    match tokio::task::spawn_blocking(move || crate::store::with_thread_store(&store, f)).await {
        Ok(r) => r,
        Err(e) => Err(StoreError::Internal(format!(
            "blocking store task failed: {e}"
        ))),
    }
}
