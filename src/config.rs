//! Configuration in two stages: [`FileConfig`] is what a user writes in TOML (every field optional,
//! defaults documented here), [`ServeConfig`] is the validated runtime form built once at start-up.
//! Command-line flags override the file; nothing deeper in the code reads configuration ad hoc.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::git::pack_cache::PackCacheSettings;
use crate::http::forwarded::IpRange;
use crate::progress::ProgressRules;
use crate::store::Location;

/// Default data directory, relative to the working directory.
pub const DEFAULT_DATA_DIR: &str = "./gitplane-data";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML for gitplane: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config field `{field}`: {reason}")]
    Invalid { field: &'static str, reason: String },
}

fn ip_ranges(field: &'static str, list: &[String]) -> Result<Vec<IpRange>, ConfigError> {
    list.iter()
        .map(|r| r.parse().map_err(|e| invalid(field, format!("{e}"))))
        .collect()
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        reason: reason.into(),
    }
}

/// The TOML file, as written by a user. See `docs/CONFIG.md` for an annotated example.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileConfig {
    /// Where repositories, the database and keys live. Default `./gitplane-data`.
    pub data_dir: Option<PathBuf>,
    pub http: HttpSection,
    pub tcp: TcpSection,
    pub runtime: RuntimeSection,
    pub git: GitSection,
    pub shutdown: ShutdownSection,
    pub hooks: HooksSection,
    pub rpc: RpcSection,
    pub ssh: SshSection,
    pub lfs: LfsSection,
    pub housekeeping: HousekeepingSection,
    pub store: StoreSection,
    pub cluster: ClusterSection,
}

/// `[cluster]` (#14): with a shared PostgreSQL store, this node joins the cluster.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSection {
    /// Node-to-node listener, e.g. "10.0.0.7:7070". Absent: no cluster. Also --cluster-listen.
    pub listen: Option<String>,
    /// The cluster secret, the same file on every node (16 bytes or more). Also
    /// --cluster-secret-file.
    pub secret_file: Option<PathBuf>,
    /// Copies of each new repository. Default 3 (all nodes when fewer are up).
    pub replication_factor: Option<usize>,
    /// A node silent this long is down. Default 10000.
    pub down_after_ms: Option<u64>,
    /// How often a node says it is up. Default 1000.
    pub heartbeat_ms: Option<u64>,
    /// Keep what this node relays of smart HTTP clones and fetches of repositories it holds no
    /// current copy of, and answer identical requests of the same generation from that copy
    /// (in the pack cache's directory and budget; off with the pack cache). Default true.
    pub relay_cache: Option<bool>,
}

/// `[store]`: where users, keys, grants, LFS metadata and hook events live.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSection {
    /// `postgres://USER[:PASSWORD]@HOST[:PORT]/DB[?sslmode=require[&sslrootcert=PATH]]`: a
    /// PostgreSQL database shared by several nodes. Absent: the embedded SQLite file.
    pub url: Option<String>,
    /// This node's name in a shared store (its repositories and hook events carry it). Default:
    /// the host name.
    pub node_id: Option<String>,
    /// PostgreSQL connections this node opens at most. Default 16.
    pub max_connections: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LfsSection {
    /// Size of one pinned transfer buffer, in KiB. Default 256.
    pub buffer_kib: usize,
    /// Pinned buffers per shard: a shard's LFS transfer memory is buffer_kib * this. Default 32.
    pub buffers_per_shard: usize,
    /// Largest object accepted, in bytes. Default 50 GiB.
    pub max_object_size: u64,
    /// Most objects in one batch request. Default 1000.
    pub max_batch_objects: usize,
    /// Seconds a batch action's href stays valid. Default 3600.
    pub action_expiry_secs: u64,
    /// Anonymous object transfers (downloads from public repositories without credentials)
    /// running at once, node-wide; more get 503 with Retry-After. Default 32.
    pub anonymous_transfers: usize,
    /// Anonymous object transfers running at once from one client address (IPv4, or IPv6 /64);
    /// more get 429 with Retry-After (git-lfs retries both). Default 4.
    pub anonymous_transfers_per_ip: usize,
    /// Store objects in S3-compatible storage instead of `DATA/lfs` (absent: local disk).
    pub s3: Option<S3Section>,
}

/// `[lfs.s3]`: an S3-compatible endpoint reached over plain HTTP (see docs/ARCHITECTURE.md).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Section {
    /// `host:port`, e.g. `127.0.0.1:9000`.
    pub endpoint: String,
    pub bucket: String,
    /// Key prefix. Default `lfs/`.
    #[serde(default = "default_s3_prefix")]
    pub prefix: String,
    /// Default `us-east-1`.
    #[serde(default = "default_s3_region")]
    pub region: String,
    /// Default: the AWS_ACCESS_KEY_ID environment variable.
    pub access_key_id: Option<String>,
    /// Default: the AWS_SECRET_ACCESS_KEY environment variable.
    pub secret_access_key: Option<String>,
    /// Multipart part size in MiB (at least 5). Default 8.
    #[serde(default = "default_part_mib")]
    pub part_size_mib: u64,
}

fn default_s3_prefix() -> String {
    "lfs/".into()
}
fn default_s3_region() -> String {
    "us-east-1".into()
}
fn default_part_mib() -> u64 {
    8
}

impl Default for LfsSection {
    fn default() -> Self {
        Self {
            buffer_kib: 256,
            buffers_per_shard: 32,
            max_object_size: 50 << 30,
            max_batch_objects: 1000,
            action_expiry_secs: 3600,
            anonymous_transfers: 32,
            anonymous_transfers_per_ip: 4,
            s3: None,
        }
    }
}

/// Validated `[lfs]`.
#[derive(Debug, Clone)]
pub struct LfsLimits {
    pub buffer_size: usize,
    pub buffers_per_shard: usize,
    pub max_object_size: u64,
    pub max_batch_objects: usize,
    pub action_expiry: Duration,
    pub anonymous_transfers: usize,
    pub anonymous_transfers_per_ip: usize,
    pub s3: Option<crate::lfs::s3::S3Settings>,
}

fn s3_settings(s: S3Section) -> Result<crate::lfs::s3::S3Settings, ConfigError> {
    let from_env = |field: &'static str, value: Option<String>, var: &str| {
        value.or_else(|| std::env::var(var).ok()).ok_or_else(|| {
            invalid(
                field,
                format!("not set, and {var} is not in the environment"),
            )
        })
    };
    if s.part_size_mib < 5 {
        return Err(invalid(
            "lfs.s3.part_size_mib",
            "S3 parts must be at least 5 MiB",
        ));
    }
    if s.endpoint.contains("://") {
        return Err(invalid(
            "lfs.s3.endpoint",
            "give host:port (plain HTTP), without a scheme",
        ));
    }
    Ok(crate::lfs::s3::S3Settings {
        endpoint: s.endpoint,
        bucket: s.bucket,
        prefix: s.prefix,
        credentials: crate::lfs::sigv4::Credentials {
            access_key_id: from_env("lfs.s3.access_key_id", s.access_key_id, "AWS_ACCESS_KEY_ID")?,
            secret_access_key: from_env(
                "lfs.s3.secret_access_key",
                s.secret_access_key,
                "AWS_SECRET_ACCESS_KEY",
            )?,
            region: s.region,
        },
        part_size: s.part_size_mib << 20,
    })
}

impl LfsLimits {
    fn build(l: LfsSection) -> Result<Self, ConfigError> {
        if !(4..=16 * 1024).contains(&l.buffer_kib) {
            return Err(invalid("lfs.buffer_kib", "must be between 4 and 16384"));
        }
        Ok(Self {
            buffer_size: l.buffer_kib * 1024,
            buffers_per_shard: at_least_one("lfs.buffers_per_shard", l.buffers_per_shard)?,
            max_object_size: l.max_object_size,
            max_batch_objects: at_least_one("lfs.max_batch_objects", l.max_batch_objects)?,
            action_expiry: positive_secs("lfs.action_expiry_secs", l.action_expiry_secs)?,
            anonymous_transfers: at_least_one("lfs.anonymous_transfers", l.anonymous_transfers)?,
            anonymous_transfers_per_ip: at_least_one(
                "lfs.anonymous_transfers_per_ip",
                l.anonymous_transfers_per_ip,
            )?,
            s3: l.s3.map(s3_settings).transpose()?,
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSection {
    /// Address of the Git smart HTTP listener. Default `127.0.0.1:8080`.
    pub listen: String,
    /// Open connections one shard accepts before it answers 503. Default 16384.
    pub max_connections_per_shard: usize,
    /// Seconds a client has to send a whole request head (slowloris defence). Default 10.
    pub head_timeout_secs: u64,
    /// Seconds an idle keep-alive connection is kept. Default 60.
    pub idle_timeout_secs: u64,
    /// Largest request head accepted, in bytes. Default 16384.
    pub max_head_bytes: usize,
    /// Seconds a request body (a push, a fetch negotiation, an LFS upload) may send no byte
    /// before it is cut with 408. Default 30.
    pub body_idle_secs: u64,
    /// Bytes per second a request body must average after its first `body_idle_secs` (a
    /// trickling client is cut with 408); 0 turns the rule off. Default 256.
    pub body_min_bytes_per_sec: u64,
    /// Seconds a response (a pack, an LFS object) may wait for the client to accept a byte
    /// before it is cut and its resources returned. Default 60.
    pub send_idle_secs: u64,
    /// Bytes per second the client must accept on average after its first `send_idle_secs`;
    /// 0 turns the rule off. Default 256.
    pub send_min_bytes_per_sec: u64,
    /// Load balancers and proxies (addresses or ranges like `10.0.0.0/8`) whose
    /// `X-Forwarded-For` is believed when naming the client (push events, logs). Default none:
    /// the socket peer is the client.
    pub trusted_proxies: Vec<String>,
    /// TCP load balancers (addresses or ranges) whose connections start with a PROXY protocol
    /// header (v1 or v2) naming the client; connections from them without one are refused.
    /// Default none.
    pub proxy_protocol_from: Vec<String>,
}

impl Default for HttpSection {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            max_connections_per_shard: 16384,
            head_timeout_secs: 10,
            idle_timeout_secs: 60,
            max_head_bytes: 16 * 1024,
            body_idle_secs: 30,
            body_min_bytes_per_sec: 256,
            send_idle_secs: 60,
            send_min_bytes_per_sec: 256,
            trusted_proxies: Vec::new(),
            proxy_protocol_from: Vec::new(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TcpSection {
    /// Idle seconds before the kernel sends the first keepalive probe. Default 60.
    pub keepalive_idle_secs: u64,
    /// Seconds between keepalive probes. Default 10.
    pub keepalive_interval_secs: u64,
    /// Unanswered probes before the kernel drops the connection. Default 6.
    pub keepalive_probes: u32,
    /// TCP_USER_TIMEOUT: seconds unacknowledged data may wait before the kernel drops the
    /// connection (0 = kernel default). Default 120.
    pub user_timeout_secs: u64,
}

impl Default for TcpSection {
    fn default() -> Self {
        Self {
            keepalive_idle_secs: 60,
            keepalive_interval_secs: 10,
            keepalive_probes: 6,
            user_timeout_secs: 120,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeSection {
    /// Shard threads (0 = one per CPU). Default 0.
    pub shards: usize,
    /// Use the epoll driver even where io_uring works (for comparison and old kernels). Default false.
    pub force_epoll: bool,
    /// Threads for blocking work (SQLite, password hashing; 0 = 2 per shard). Default 0.
    pub blocking_threads: usize,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GitSection {
    /// The git executable. Default `git` (looked up in PATH).
    pub binary: PathBuf,
    /// Pack generations (upload-pack, receive-pack) running at once on the node. Default 64.
    pub max_concurrent: usize,
    /// Pack generations running at once for one repository. Default 16.
    pub max_concurrent_per_repo: usize,
    /// Requests that may wait for a pack slot; beyond this they get 503. Default 256.
    pub max_queued: usize,
    /// Seconds a request waits for a pack slot before 503. Default 120: on a busy node a queued
    /// clone should wait its turn rather than fail (measured: at 32 concurrent clones on 2 cores
    /// the slowest waited 30 to 42 s).
    pub queue_timeout_secs: u64,
    /// Pack slots that anonymous requests (public repositories, no credentials) may hold at once,
    /// so anonymous traffic can never take the whole node. Default 32 (half of the default
    /// `max_concurrent`); at most `max_concurrent`.
    pub anonymous_max_concurrent: usize,
    /// Anonymous pack requests from one client address (IPv4, or IPv6 /64), running or waiting;
    /// beyond this they get 503 at once. Default 8.
    pub anonymous_max_per_ip: usize,
    /// Share one generated pack between identical fetches (`DATA/cache/packs`). Default true.
    pub pack_cache: bool,
    /// Seconds a cached pack is served; it bounds how long a fetch can miss a tag created after
    /// the pack. Default 300.
    pub pack_cache_max_age_secs: u64,
    /// Disk the cache may use, in MiB; the oldest packs go first. Default 4096.
    pub pack_cache_max_mib: u64,
}

impl Default for GitSection {
    fn default() -> Self {
        Self {
            binary: PathBuf::from("git"),
            max_concurrent: 64,
            max_concurrent_per_repo: 16,
            max_queued: 256,
            queue_timeout_secs: 120,
            anonymous_max_concurrent: 32,
            anonymous_max_per_ip: 8,
            pack_cache: true,
            pack_cache_max_age_secs: 300,
            pack_cache_max_mib: 4096,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownSection {
    /// Seconds in-flight transfers may run after SIGTERM before they are cut. Default 30.
    pub grace_secs: u64,
    /// After SIGTERM, seconds an idle HTTP keep-alive connection may take to send its next
    /// request before it is closed. A git clone or push is several requests on one connection;
    /// closing between them would cut it. Default 10.
    pub keepalive_drain_secs: u64,
    /// On an upgrade (SIGUSR2), seconds the new generation has to report ready; past them it is
    /// told to stop and this one keeps serving. Default 60.
    pub upgrade_timeout_secs: u64,
    /// File naming the pid of the generation that serves (written once it is ready, replaced by
    /// the next generation on an upgrade). Also `--pid-file`. Default none.
    pub pid_file: Option<PathBuf>,
}

impl Default for ShutdownSection {
    fn default() -> Self {
        Self {
            grace_secs: 30,
            keepalive_drain_secs: 10,
            upgrade_timeout_secs: 60,
            pid_file: None,
        }
    }
}

/// `[hooks]`: the push-event workers (issue #6).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HooksSection {
    /// RabbitMQ URL, e.g. `amqp://guest:guest@127.0.0.1:5672/%2f`. Default none: the workers
    /// consume the outbox directly in-process (embedded mode).
    pub amqp_url: Option<String>,
    /// Prefix of the exchange and queue names (`PREFIX.events`, `PREFIX.jobs.JOB`,
    /// `PREFIX.dead.JOB`, `PREFIX.dlx`). Default `gitplane`.
    pub amqp_prefix: String,
    /// Unacknowledged deliveries per consumer (`basic_qos`). Default 64.
    pub prefetch: u16,
    /// Attempts per job before it is dead-lettered. Default 5.
    pub max_attempts: u32,
    /// Delay before the first retry, doubled for each further one. Default 500 ms.
    pub backoff_initial_ms: u64,
    /// Longest delay between retries. Default 30000 ms.
    pub backoff_max_ms: u64,
    /// Seconds one webhook delivery (connect, send, read the status) may take. Default 10.
    pub webhook_timeout_secs: u64,
    /// Outbox rows published per batch of publisher confirms. Default 1000.
    pub relay_batch: usize,
    /// Delete a job queue unused for this many seconds (RabbitMQ `x-expires`; 0 = never).
    /// For test brokers shared between runs. Default 0.
    pub queue_expires_secs: u64,
    pub concurrency: HookConcurrencySection,
}

impl Default for HooksSection {
    fn default() -> Self {
        Self {
            amqp_url: None,
            amqp_prefix: "gitplane".into(),
            prefetch: 64,
            max_attempts: 5,
            backoff_initial_ms: 500,
            backoff_max_ms: 30_000,
            webhook_timeout_secs: 10,
            relay_batch: 1000,
            queue_expires_secs: 0,
            concurrency: HookConcurrencySection::default(),
        }
    }
}

/// `[hooks.concurrency]`: jobs of one type running at once per core (a semaphore per job type
/// per core). 0 turns the job type off.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HookConcurrencySection {
    /// Recomputing repository sizes (walks the repository). Default 1.
    pub disk_usage: usize,
    /// Webhook deliveries. Default 8.
    pub webhooks: usize,
    /// Commit indexing (runs `git log`). Default 2.
    pub indexing: usize,
    /// A job that only records its completion, for benchmarking the pipeline. Default 0 (off).
    pub noop: usize,
    /// Housekeeping after pushes (the node-wide `[housekeeping] max_concurrent` limits the
    /// repacks themselves). Default 1.
    pub housekeeping: usize,
}

impl Default for HookConcurrencySection {
    fn default() -> Self {
        Self {
            disk_usage: 1,
            webhooks: 8,
            indexing: 2,
            noop: 0,
            housekeeping: 1,
        }
    }
}

/// `[housekeeping]`: repository maintenance (issue #12), run by the hook workers after pushes and
/// by a periodic sweep. docs/HOUSEKEEPING.md explains each threshold and why it is set where it is.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HousekeepingSection {
    /// Maintenance runs at once on the node (all cores together); 0 = one per two cores.
    /// Default 0.
    pub max_concurrent: usize,
    /// `nice` value of maintenance git processes (0..=19): serving comes first. Default 10.
    pub nice: i32,
    /// Run maintenance in the idle I/O class (`ioprio_set`), so clones' reads come first.
    /// Default true.
    pub ioprio_idle: bool,
    /// Loose objects (estimated from `objects/17`, as `git gc --auto` does) that trigger a
    /// geometric repack. Default 1024.
    pub loose_objects_limit: u64,
    /// Objects brought in by packs since the last run that trigger a repack at once (a mirror
    /// push or an import). Default 10000.
    pub big_push_objects: u64,
    /// Geometric factor of `git repack --geometric`. Default 2.
    pub geometric_factor: u32,
    /// Packs (cruft packs aside) above which the geometric sequence counts as degraded and a full
    /// repack runs. Default 16.
    pub max_packs: usize,
    /// Pushes after which a full repack runs even if the packs look fine. Default 1000.
    pub full_repack_pushes: u64,
    /// Shortest time between two full repacks not asked for by an admin, in seconds.
    /// Default 86400.
    pub full_repack_cooldown_secs: u64,
    /// Unreachable objects stay in a cruft pack at least this long, in seconds (never less than
    /// one hour: a push in flight must never lose its objects). Default 1209600 (2 weeks).
    pub cruft_expiration_secs: u64,
    /// Pushes after which the commit-graph is rewritten (a repack always rewrites it).
    /// Default 16.
    pub commit_graph_pushes: u64,
    /// Pushes after which a geometric repack runs, so that what they brought is packed and
    /// covered by the bitmap again. Default 32.
    pub repack_pushes: u64,
    /// Loose refs that trigger `git pack-refs`. Default 256.
    pub loose_refs_limit: u64,
    /// Git temporary object files (`tmp_*`, `.tmp-*`) older than this are removed, in seconds.
    /// Default 86400.
    pub stale_tmp_secs: u64,
    /// Lock files (`*.lock`) older than this are removed, in seconds. Default 3600.
    pub stale_lock_secs: u64,
    /// Seconds between sweeps over every repository for overdue maintenance; 0 = no sweep.
    /// Default 3600.
    pub sweep_interval_secs: u64,
    /// A repository with pushes since its last run is overdue after this many seconds.
    /// Default 86400.
    pub overdue_secs: u64,
}

impl Default for HousekeepingSection {
    fn default() -> Self {
        Self {
            max_concurrent: 0,
            nice: 10,
            ioprio_idle: true,
            loose_objects_limit: 1024,
            big_push_objects: 10_000,
            geometric_factor: 2,
            max_packs: 16,
            full_repack_pushes: 1000,
            full_repack_cooldown_secs: 86_400,
            cruft_expiration_secs: 14 * 86_400,
            commit_graph_pushes: 16,
            repack_pushes: 32,
            loose_refs_limit: 256,
            stale_tmp_secs: 86_400,
            stale_lock_secs: 3600,
            sweep_interval_secs: 3600,
            overdue_secs: 86_400,
        }
    }
}

/// Validated `[housekeeping]`.
#[derive(Debug, Clone)]
pub struct HousekeepingConfig {
    pub max_concurrent: usize,
    pub nice: i32,
    pub ioprio_idle: bool,
    pub loose_objects_limit: u64,
    pub big_push_objects: u64,
    pub geometric_factor: u32,
    pub max_packs: usize,
    pub full_repack_pushes: u64,
    pub full_repack_cooldown: Duration,
    pub cruft_expiration: Duration,
    pub commit_graph_pushes: u64,
    pub repack_pushes: u64,
    pub loose_refs_limit: u64,
    pub stale_tmp: Duration,
    pub stale_lock: Duration,
    /// None: no periodic sweep.
    pub sweep_interval: Option<Duration>,
    pub overdue: Duration,
}

impl HousekeepingConfig {
    /// Validates `h`; `cores` sizes the default semaphore.
    pub fn build(h: HousekeepingSection, cores: usize) -> Result<Self, ConfigError> {
        if !(0..=19).contains(&h.nice) {
            return Err(invalid("housekeeping.nice", "must be between 0 and 19"));
        }
        if h.geometric_factor < 2 {
            return Err(invalid(
                "housekeeping.geometric_factor",
                "must be at least 2",
            ));
        }
        if h.cruft_expiration_secs < 3600 {
            return Err(invalid(
                "housekeeping.cruft_expiration_secs",
                "must be at least 3600: a push in flight must never lose its objects",
            ));
        }
        if h.stale_tmp_secs < 3600 || h.stale_lock_secs < 600 {
            return Err(invalid(
                "housekeeping.stale_tmp_secs",
                "stale_tmp_secs must be at least 3600 and stale_lock_secs at least 600 (a running git holds them)",
            ));
        }
        Ok(Self {
            max_concurrent: match h.max_concurrent {
                0 => (cores / 2).max(1),
                n => n,
            },
            nice: h.nice,
            ioprio_idle: h.ioprio_idle,
            loose_objects_limit: at_least_one_u64(
                "housekeeping.loose_objects_limit",
                h.loose_objects_limit,
            )?,
            big_push_objects: at_least_one_u64(
                "housekeeping.big_push_objects",
                h.big_push_objects,
            )?,
            geometric_factor: h.geometric_factor,
            max_packs: at_least_one("housekeeping.max_packs", h.max_packs)?,
            full_repack_pushes: at_least_one_u64(
                "housekeeping.full_repack_pushes",
                h.full_repack_pushes,
            )?,
            full_repack_cooldown: Duration::from_secs(h.full_repack_cooldown_secs),
            cruft_expiration: Duration::from_secs(h.cruft_expiration_secs),
            commit_graph_pushes: at_least_one_u64(
                "housekeeping.commit_graph_pushes",
                h.commit_graph_pushes,
            )?,
            repack_pushes: at_least_one_u64("housekeeping.repack_pushes", h.repack_pushes)?,
            loose_refs_limit: at_least_one_u64(
                "housekeeping.loose_refs_limit",
                h.loose_refs_limit,
            )?,
            stale_tmp: Duration::from_secs(h.stale_tmp_secs),
            stale_lock: Duration::from_secs(h.stale_lock_secs),
            sweep_interval: (h.sweep_interval_secs > 0)
                .then(|| Duration::from_secs(h.sweep_interval_secs)),
            overdue: positive_secs("housekeeping.overdue_secs", h.overdue_secs)?,
        })
    }
}

fn at_least_one_u64(field: &'static str, n: u64) -> Result<u64, ConfigError> {
    if n == 0 {
        return Err(invalid(field, "must be at least 1"));
    }
    Ok(n)
}

/// `[rpc]`: the gRPC repository API (issue #5).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RpcSection {
    /// Address of the gRPC (HTTP/2 cleartext) listener. Default `127.0.0.1:9090`.
    pub listen: String,
    /// File holding the bearer token every call but health checks needs; created with a random
    /// token (mode 0600) if absent. Default `DATA/rpc-token`.
    pub token_file: Option<PathBuf>,
    /// Largest request message, in bytes (also after gzip inflation). Default 4194304.
    pub max_message_bytes: usize,
    /// Concurrent streams per HTTP/2 connection. Default 256.
    pub max_concurrent_streams: u32,
    /// Open connections one shard accepts; more are closed at once. Default 4096.
    pub max_connections_per_shard: usize,
    /// Connections on one shard that have not yet presented a valid token, below
    /// `max_connections_per_shard` so peers without the token never take the whole shard; when
    /// full, a new connection evicts the oldest of them (0 = a quarter of
    /// `max_connections_per_shard`, at least 1). Default 0.
    pub max_unauthenticated_per_shard: usize,
    /// Open connections from one source address (one IPv6 /64), node-wide. Default 64.
    pub max_connections_per_ip: usize,
    /// Of those, connections that have not yet presented a valid token. Default 8.
    pub max_unauthenticated_per_ip: usize,
    /// Seconds a connection may stay open with no stream before it gets GOAWAY and is closed.
    /// Default 60.
    pub idle_timeout_secs: u64,
    /// Seconds after the HTTP/2 handshake by which a connection must have sent a call with a
    /// valid bearer token; it is closed otherwise. Default 10.
    pub first_request_secs: u64,
    /// Seconds between HTTP/2 PINGs while streams are open. Default 30.
    pub keepalive_interval_secs: u64,
    /// Seconds a PING may go unanswered before the connection is closed. Default 20.
    pub keepalive_timeout_secs: u64,
    /// Threads running libgit2 work (0 = 2 per shard, at least 4). Default 0.
    pub blocking_threads: usize,
    /// Calls that may wait for a worker; beyond this they get UNAVAILABLE. Default 1024.
    pub max_queued: usize,
    /// Deadline of a call whose client sets none (`grpc-timeout`), in seconds. Default 300.
    pub default_deadline_secs: u64,
}

impl Default for RpcSection {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9090".into(),
            token_file: None,
            max_message_bytes: 4 << 20,
            max_concurrent_streams: 256,
            max_connections_per_shard: 4096,
            max_unauthenticated_per_shard: 0,
            max_connections_per_ip: 64,
            max_unauthenticated_per_ip: 8,
            idle_timeout_secs: 60,
            first_request_secs: 10,
            keepalive_interval_secs: 30,
            keepalive_timeout_secs: 20,
            blocking_threads: 0,
            max_queued: 1024,
            default_deadline_secs: 300,
        }
    }
}

/// `[ssh]`: Git over SSH (issue #3).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SshSection {
    /// Address of the SSH listener. Default `127.0.0.1:2222`.
    pub listen: String,
    /// Seconds a connection has from TCP accept to successful authentication; connections that
    /// stall anywhere in the handshake are closed then. Default 20.
    pub handshake_timeout_secs: u64,
    /// Connections not yet authenticated, node-wide; more are closed at once (like OpenSSH
    /// MaxStartups). Default 1024.
    pub max_unauthenticated: usize,
    /// Connections not yet authenticated from one source address (one IPv6 /64). Default 32.
    pub max_unauthenticated_per_ip: usize,
    /// Connections from one source address that wait for a handshake slot when that address
    /// already has `max_unauthenticated_per_ip` in the handshake; their handshake has not
    /// started (each costs its socket's kernel buffers and a small task) and they are cut at the
    /// same deadline. Beyond this they are closed at once. 0 = no queue. Default 512.
    pub max_queued_per_ip: usize,
    /// Authentication attempts per connection. Default 6.
    pub max_auth_attempts: usize,
    /// Seconds of client silence before the server sends an SSH keepalive. Default 30.
    pub keepalive_interval_secs: u64,
    /// Unanswered keepalives before the connection is dropped. Default 3.
    pub keepalive_max: usize,
    /// Seconds a connection may be fully idle (no data either way) before it is closed.
    /// Default 600.
    pub idle_timeout_secs: u64,
    /// Session channels one connection may have open at once. Default 8.
    pub max_channels_per_connection: usize,
    /// Seconds a git or git-lfs-transfer channel may move no byte (the client sends nothing
    /// while the server waits for input, or reads nothing while output waits) before the
    /// channel is closed and its git process killed. Unlike `idle_timeout_secs` this holds
    /// while other channels or keepalives keep the connection busy. Default 60.
    pub channel_idle_secs: u64,
    /// Lifetime of the tokens `git-lfs-authenticate` hands out, in seconds. Default 600.
    pub lfs_token_ttl_secs: u64,
    /// TCP load balancers (addresses or ranges) that send a PROXY protocol header (v1 or v2)
    /// naming the client; connections from them must start with one. Default none.
    pub proxy_protocol_from: Vec<String>,
}

impl Default for SshSection {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:2222".into(),
            handshake_timeout_secs: 20,
            max_unauthenticated: 1024,
            max_unauthenticated_per_ip: 32,
            max_queued_per_ip: 512,
            max_auth_attempts: 6,
            keepalive_interval_secs: 30,
            keepalive_max: 3,
            idle_timeout_secs: 600,
            max_channels_per_connection: 8,
            channel_idle_secs: 60,
            lfs_token_ttl_secs: 600,
            proxy_protocol_from: Vec::new(),
        }
    }
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }
}

/// Flags of `gitplane serve` that override the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub data_dir: Option<PathBuf>,
    pub http_listen: Option<String>,
    pub shards: Option<usize>,
    pub force_epoll: bool,
    pub amqp_url: Option<String>,
    pub rpc_listen: Option<String>,
    pub ssh_listen: Option<String>,
    pub pid_file: Option<PathBuf>,
    /// `--database-url` / `GITPLANE_DATABASE_URL`.
    pub database_url: Option<String>,
    /// `--node-id` / `GITPLANE_NODE_ID`.
    pub node_id: Option<String>,
    pub cluster_listen: Option<String>,
    pub cluster_secret_file: Option<PathBuf>,
}

/// Validated runtime configuration of `gitplane serve`.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub data_dir: PathBuf,
    /// The store (not connected yet: the server prepares it at start).
    pub store: Location,
    /// This node's part in a cluster, when it has one.
    pub cluster: Option<crate::cluster::ClusterConfig>,
    pub http_listen: SocketAddr,
    pub shards: NonZeroUsize,
    pub force_epoll: bool,
    pub blocking_threads: NonZeroUsize,
    pub http: HttpLimits,
    pub tcp: TcpOptions,
    pub git: GitLimits,
    pub shutdown_grace: Duration,
    /// How long an upgrade waits for the next generation to be ready.
    pub upgrade_timeout: Duration,
    pub pid_file: Option<PathBuf>,
    pub hooks: HookConfig,
    pub rpc_listen: SocketAddr,
    pub rpc: RpcLimits,
    pub ssh_listen: SocketAddr,
    pub ssh: SshLimits,
    pub lfs: LfsLimits,
    pub housekeeping: HousekeepingConfig,
}

/// Validated `[ssh]` (the listen address is [`ServeConfig::ssh_listen`]).
#[derive(Debug, Clone)]
pub struct SshLimits {
    pub handshake_timeout: Duration,
    pub max_unauthenticated: usize,
    pub max_unauthenticated_per_ip: usize,
    pub max_queued_per_ip: usize,
    pub max_auth_attempts: usize,
    pub keepalive_interval: Duration,
    pub keepalive_max: usize,
    pub idle_timeout: Duration,
    pub max_channels_per_connection: usize,
    pub channel_idle: Duration,
    pub lfs_token_ttl: Duration,
    pub proxy_protocol_from: Vec<IpRange>,
}

impl SshLimits {
    fn build(s: &SshSection) -> Result<Self, ConfigError> {
        if s.max_auth_attempts == 0 || s.max_auth_attempts > 100 {
            return Err(invalid(
                "ssh.max_auth_attempts",
                "must be between 1 and 100",
            ));
        }
        Ok(Self {
            handshake_timeout: positive_secs(
                "ssh.handshake_timeout_secs",
                s.handshake_timeout_secs,
            )?,
            max_unauthenticated: at_least_one("ssh.max_unauthenticated", s.max_unauthenticated)?,
            max_unauthenticated_per_ip: at_least_one(
                "ssh.max_unauthenticated_per_ip",
                s.max_unauthenticated_per_ip,
            )?,
            max_queued_per_ip: s.max_queued_per_ip,
            max_auth_attempts: s.max_auth_attempts,
            keepalive_interval: positive_secs(
                "ssh.keepalive_interval_secs",
                s.keepalive_interval_secs,
            )?,
            keepalive_max: at_least_one("ssh.keepalive_max", s.keepalive_max)?,
            idle_timeout: positive_secs("ssh.idle_timeout_secs", s.idle_timeout_secs)?,
            max_channels_per_connection: at_least_one(
                "ssh.max_channels_per_connection",
                s.max_channels_per_connection,
            )?,
            channel_idle: positive_secs("ssh.channel_idle_secs", s.channel_idle_secs)?,
            lfs_token_ttl: positive_secs("ssh.lfs_token_ttl_secs", s.lfs_token_ttl_secs)?,
            proxy_protocol_from: ip_ranges("ssh.proxy_protocol_from", &s.proxy_protocol_from)?,
        })
    }
}

/// Validated `[rpc]` (the listen address is [`ServeConfig::rpc_listen`]).
#[derive(Debug, Clone)]
pub struct RpcLimits {
    pub token_file: PathBuf,
    pub max_message_bytes: usize,
    pub max_concurrent_streams: u32,
    pub max_connections_per_shard: usize,
    pub max_unauthenticated_per_shard: usize,
    pub max_connections_per_ip: usize,
    pub max_unauthenticated_per_ip: usize,
    pub conn_timers: ConnTimers,
    pub blocking_threads: NonZeroUsize,
    pub max_queued: usize,
    pub default_deadline: Duration,
}

/// The timers of one gRPC connection (see `rpc::watch`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnTimers {
    pub idle: Duration,
    pub first_request: Duration,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
}

impl RpcLimits {
    fn build(r: RpcSection, data_dir: &Path, shards: NonZeroUsize) -> Result<Self, ConfigError> {
        if !(1024..=(256 << 20)).contains(&r.max_message_bytes) {
            return Err(invalid(
                "rpc.max_message_bytes",
                "must be between 1024 and 268435456",
            ));
        }
        if r.max_concurrent_streams == 0 || r.max_concurrent_streams > 65_536 {
            return Err(invalid(
                "rpc.max_concurrent_streams",
                "must be between 1 and 65536",
            ));
        }
        let blocking_threads = match r.blocking_threads {
            0 => NonZeroUsize::new(shards.get().saturating_mul(2).max(4))
                .unwrap_or(NonZeroUsize::MIN),
            n if n > 1024 => return Err(invalid("rpc.blocking_threads", "at most 1024")),
            n => NonZeroUsize::new(n).unwrap_or(NonZeroUsize::MIN),
        };
        let max_connections_per_shard =
            at_least_one("rpc.max_connections_per_shard", r.max_connections_per_shard)?;
        let max_unauthenticated_per_shard = match r.max_unauthenticated_per_shard {
            0 => (max_connections_per_shard / 4).max(1),
            n if n >= max_connections_per_shard && max_connections_per_shard > 1 => {
                return Err(invalid(
                    "rpc.max_unauthenticated_per_shard",
                    "must be below rpc.max_connections_per_shard, or connections without the \
                     token could take them all",
                ))
            }
            n => n,
        };
        let max_connections_per_ip =
            at_least_one("rpc.max_connections_per_ip", r.max_connections_per_ip)?;
        let max_unauthenticated_per_ip = at_least_one(
            "rpc.max_unauthenticated_per_ip",
            r.max_unauthenticated_per_ip,
        )?;
        if max_unauthenticated_per_ip > max_connections_per_ip {
            return Err(invalid(
                "rpc.max_unauthenticated_per_ip",
                "must not exceed rpc.max_connections_per_ip",
            ));
        }
        Ok(Self {
            token_file: r.token_file.unwrap_or_else(|| data_dir.join("rpc-token")),
            max_message_bytes: r.max_message_bytes,
            max_concurrent_streams: r.max_concurrent_streams,
            max_connections_per_shard,
            max_unauthenticated_per_shard,
            max_connections_per_ip,
            max_unauthenticated_per_ip,
            conn_timers: ConnTimers {
                idle: positive_secs("rpc.idle_timeout_secs", r.idle_timeout_secs)?,
                first_request: positive_secs("rpc.first_request_secs", r.first_request_secs)?,
                keepalive_interval: positive_secs(
                    "rpc.keepalive_interval_secs",
                    r.keepalive_interval_secs,
                )?,
                keepalive_timeout: positive_secs(
                    "rpc.keepalive_timeout_secs",
                    r.keepalive_timeout_secs,
                )?,
            },
            blocking_threads,
            max_queued: at_least_one("rpc.max_queued", r.max_queued)?,
            default_deadline: positive_secs("rpc.default_deadline_secs", r.default_deadline_secs)?,
        })
    }
}

/// Validated `[hooks]`.
#[derive(Debug, Clone)]
pub struct HookConfig {
    pub amqp_url: Option<String>,
    pub prefix: String,
    pub prefetch: u16,
    pub concurrency: JobConcurrency,
    pub max_attempts: u32,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub webhook_timeout: Duration,
    pub relay_batch: usize,
    pub queue_expires: Option<Duration>,
}

/// Per-core limits by job type; 0 = the job type is off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobConcurrency {
    pub disk_usage: usize,
    pub webhooks: usize,
    pub indexing: usize,
    pub noop: usize,
    pub housekeeping: usize,
}

impl HookConfig {
    /// In a shared store each node relays only its own pushes' events, whose jobs need the
    /// repository on its disk, so each node has its own exchange and queues on a shared broker:
    /// `PREFIX.NODE.events`, `PREFIX.NODE.jobs.JOB`, ...
    fn for_node(mut self, node: &str) -> Self {
        if !node.is_empty() {
            self.prefix = format!("{}.{node}", self.prefix);
        }
        self
    }

    fn build(h: HooksSection, amqp_flag: Option<String>) -> Result<Self, ConfigError> {
        let amqp_url = amqp_flag.or(h.amqp_url).filter(|u| !u.is_empty());
        if let Some(u) = &amqp_url {
            if !u.starts_with("amqp://") {
                return Err(invalid(
                    "hooks.amqp_url",
                    "must start with amqp:// (TLS to the broker is not built in)",
                ));
            }
        }
        let p = &h.amqp_prefix;
        if p.is_empty()
            || p.len() > 64
            || !p
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            return Err(invalid(
                "hooks.amqp_prefix",
                "use 1 to 64 of [A-Za-z0-9._-]",
            ));
        }
        if h.prefetch == 0 {
            return Err(invalid("hooks.prefetch", "must be at least 1"));
        }
        if h.max_attempts == 0 {
            return Err(invalid("hooks.max_attempts", "must be at least 1"));
        }
        if h.backoff_initial_ms == 0 || h.backoff_max_ms < h.backoff_initial_ms {
            return Err(invalid(
                "hooks.backoff_initial_ms",
                "must be at least 1 and at most hooks.backoff_max_ms",
            ));
        }
        let c = h.concurrency;
        if [c.disk_usage, c.webhooks, c.indexing, c.noop, c.housekeeping]
            .iter()
            .any(|n| *n > 10_000)
        {
            return Err(invalid("hooks.concurrency", "at most 10000 per job type"));
        }
        Ok(Self {
            amqp_url,
            prefix: h.amqp_prefix,
            prefetch: h.prefetch,
            concurrency: JobConcurrency {
                disk_usage: c.disk_usage,
                webhooks: c.webhooks,
                indexing: c.indexing,
                noop: c.noop,
                housekeeping: c.housekeeping,
            },
            max_attempts: h.max_attempts,
            backoff_initial: Duration::from_millis(h.backoff_initial_ms),
            backoff_max: Duration::from_millis(h.backoff_max_ms),
            webhook_timeout: positive_secs("hooks.webhook_timeout_secs", h.webhook_timeout_secs)?,
            relay_batch: at_least_one("hooks.relay_batch", h.relay_batch)?.min(10_000),
            queue_expires: (h.queue_expires_secs > 0)
                .then(|| Duration::from_secs(h.queue_expires_secs)),
        })
    }
}

#[derive(Debug, Clone)]
pub struct HttpLimits {
    pub max_connections_per_shard: usize,
    pub head_timeout: Duration,
    pub idle_timeout: Duration,
    /// Idle limit between requests once shutdown has begun (`shutdown.keepalive_drain_secs`).
    pub drain_idle_timeout: Duration,
    pub max_head_bytes: usize,
    pub trusted_proxies: Vec<IpRange>,
    /// Balancers that must open each connection with a PROXY protocol header.
    pub proxy_protocol_from: Vec<IpRange>,
    /// When a request body counts as stalled (`http.body_*`).
    pub body_progress: ProgressRules,
    /// When a response the client does not read counts as stalled (`http.send_*`).
    pub send_progress: ProgressRules,
}

#[derive(Debug, Clone)]
pub struct TcpOptions {
    pub keepalive_idle: Duration,
    pub keepalive_interval: Duration,
    pub keepalive_probes: u32,
    pub user_timeout: Option<Duration>,
}

#[derive(Debug, Clone)]
pub struct GitLimits {
    pub binary: PathBuf,
    pub max_concurrent: usize,
    pub max_concurrent_per_repo: usize,
    pub max_queued: usize,
    pub queue_timeout: Duration,
    pub anonymous_max_concurrent: usize,
    pub anonymous_max_per_ip: usize,
    /// None: every fetch runs its own pack-objects.
    pub pack_cache: Option<PackCacheSettings>,
}

fn positive_secs(field: &'static str, secs: u64) -> Result<Duration, ConfigError> {
    if secs == 0 {
        return Err(invalid(field, "must be at least 1 second"));
    }
    Ok(Duration::from_secs(secs))
}

fn at_least_one(field: &'static str, n: usize) -> Result<usize, ConfigError> {
    if n == 0 {
        return Err(invalid(field, "must be at least 1"));
    }
    Ok(n)
}

fn cluster_config(
    c: ClusterSection,
    listen_flag: Option<String>,
    secret_flag: Option<PathBuf>,
    store: &Location,
    lfs_in_s3: bool,
) -> Result<Option<crate::cluster::ClusterConfig>, ConfigError> {
    let Some(listen) = listen_flag.or(c.listen) else {
        return Ok(None);
    };
    let listen: SocketAddr = listen.parse().map_err(|e| {
        invalid(
            "cluster.listen",
            format!("`{listen}` is not an IP:PORT address ({e})"),
        )
    })?;
    if store.pg_pool().is_none() {
        return Err(invalid(
            "cluster.listen",
            "a cluster needs the shared PostgreSQL store ([store] url or --database-url)",
        ));
    }
    if !lfs_in_s3 {
        return Err(invalid(
            "cluster.listen",
            "a cluster keeps LFS objects in S3 ([lfs.s3]): an object on one node's disk would be missing on the others",
        ));
    }
    let secret_file = secret_flag.or(c.secret_file).ok_or_else(|| {
        invalid(
            "cluster.secret_file",
            "a cluster needs its secret (--cluster-secret-file)",
        )
    })?;
    let secret = crate::cluster::auth::Secret::load(&secret_file)
        .map_err(|e| invalid("cluster.secret_file", e.to_string()))?;
    let replication_factor = c.replication_factor.unwrap_or(3);
    if replication_factor == 0 {
        return Err(invalid("cluster.replication_factor", "must be at least 1"));
    }
    let down_after = Duration::from_millis(c.down_after_ms.unwrap_or(10_000));
    let heartbeat = Duration::from_millis(c.heartbeat_ms.unwrap_or(1_000));
    if heartbeat.is_zero() || heartbeat >= down_after {
        return Err(invalid(
            "cluster.heartbeat_ms",
            "must be above 0 and below cluster.down_after_ms",
        ));
    }
    Ok(Some(crate::cluster::ClusterConfig {
        relay_cache: c.relay_cache.unwrap_or(true),
        listen,
        secret,
        secret_file,
        replication_factor,
        down_after,
        heartbeat,
    }))
}

impl ServeConfig {
    /// How this node routes requests in its cluster; None without one.
    pub fn cluster_routing(&self) -> Option<crate::cluster::membership::Routing> {
        self.cluster
            .as_ref()
            .map(|c| crate::cluster::membership::Routing {
                node: self.store.node().to_owned(),
                secret_file: c.secret_file.clone(),
                relay_cache: c.relay_cache,
            })
    }

    /// Variables the git hooks of this node get (a cluster's coordinator needs its secret).
    pub fn hook_env(&self) -> Vec<(&'static str, String)> {
        match &self.cluster {
            Some(c) => vec![(
                crate::cluster::replicate::SECRET_FILE_VAR,
                c.secret_file.display().to_string(),
            )],
            None => Vec::new(),
        }
    }

    /// Merges flags over the file and validates the result.
    pub fn build(file: FileConfig, flags: Overrides) -> Result<Self, ConfigError> {
        let data_dir = flags
            .data_dir
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        let h = file.http;
        let listen_text = flags.http_listen.unwrap_or_else(|| h.listen.clone());
        let http_listen: SocketAddr = listen_text.parse().map_err(|e| {
            invalid(
                "http.listen",
                format!("`{listen_text}` is not an IP:PORT address ({e})"),
            )
        })?;
        let rpc_listen_text = flags.rpc_listen.unwrap_or_else(|| file.rpc.listen.clone());
        let rpc_listen: SocketAddr = rpc_listen_text.parse().map_err(|e| {
            invalid(
                "rpc.listen",
                format!("`{rpc_listen_text}` is not an IP:PORT address ({e})"),
            )
        })?;
        let ssh_listen_text = flags.ssh_listen.unwrap_or_else(|| file.ssh.listen.clone());
        let ssh_listen: SocketAddr = ssh_listen_text.parse().map_err(|e| {
            invalid(
                "ssh.listen",
                format!("`{ssh_listen_text}` is not an IP:PORT address ({e})"),
            )
        })?;
        let ssh = SshLimits::build(&file.ssh)?;
        let shards = match flags.shards.unwrap_or(file.runtime.shards) {
            0 => std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN),
            n => NonZeroUsize::new(n).unwrap_or(NonZeroUsize::MIN),
        };
        if shards.get() > 1024 {
            return Err(invalid("runtime.shards", "at most 1024 shards"));
        }
        let blocking_threads = match file.runtime.blocking_threads {
            0 => shards.saturating_mul(NonZeroUsize::new(2).unwrap_or(NonZeroUsize::MIN)),
            n => NonZeroUsize::new(n).unwrap_or(NonZeroUsize::MIN),
        };
        if h.max_head_bytes < 1024 || h.max_head_bytes > 1024 * 1024 {
            return Err(invalid(
                "http.max_head_bytes",
                "must be between 1024 and 1048576",
            ));
        }
        let http = HttpLimits {
            max_connections_per_shard: at_least_one(
                "http.max_connections_per_shard",
                h.max_connections_per_shard,
            )?,
            head_timeout: positive_secs("http.head_timeout_secs", h.head_timeout_secs)?,
            idle_timeout: positive_secs("http.idle_timeout_secs", h.idle_timeout_secs)?,
            drain_idle_timeout: Duration::from_secs(file.shutdown.keepalive_drain_secs),
            max_head_bytes: h.max_head_bytes,
            trusted_proxies: ip_ranges("http.trusted_proxies", &h.trusted_proxies)?,
            proxy_protocol_from: ip_ranges("http.proxy_protocol_from", &h.proxy_protocol_from)?,
            body_progress: ProgressRules {
                idle: positive_secs("http.body_idle_secs", h.body_idle_secs)?,
                min_rate: h.body_min_bytes_per_sec,
            },
            send_progress: ProgressRules {
                idle: positive_secs("http.send_idle_secs", h.send_idle_secs)?,
                min_rate: h.send_min_bytes_per_sec,
            },
        };
        let t = file.tcp;
        if t.keepalive_probes == 0 {
            return Err(invalid("tcp.keepalive_probes", "must be at least 1"));
        }
        let tcp = TcpOptions {
            keepalive_idle: positive_secs("tcp.keepalive_idle_secs", t.keepalive_idle_secs)?,
            keepalive_interval: positive_secs(
                "tcp.keepalive_interval_secs",
                t.keepalive_interval_secs,
            )?,
            keepalive_probes: t.keepalive_probes,
            user_timeout: (t.user_timeout_secs > 0)
                .then(|| Duration::from_secs(t.user_timeout_secs)),
        };
        let g = file.git;
        let git = GitLimits {
            binary: g.binary,
            max_concurrent: at_least_one("git.max_concurrent", g.max_concurrent)?,
            max_concurrent_per_repo: at_least_one(
                "git.max_concurrent_per_repo",
                g.max_concurrent_per_repo,
            )?,
            max_queued: g.max_queued,
            queue_timeout: positive_secs("git.queue_timeout_secs", g.queue_timeout_secs)?,
            anonymous_max_concurrent: at_least_one(
                "git.anonymous_max_concurrent",
                g.anonymous_max_concurrent,
            )?
            .min(g.max_concurrent),
            anonymous_max_per_ip: at_least_one("git.anonymous_max_per_ip", g.anonymous_max_per_ip)?,
            pack_cache: if g.pack_cache {
                Some(PackCacheSettings {
                    dir: data_dir.join("cache").join("packs"),
                    max_age: positive_secs(
                        "git.pack_cache_max_age_secs",
                        g.pack_cache_max_age_secs,
                    )?,
                    max_bytes: g.pack_cache_max_mib.saturating_mul(1 << 20),
                })
            } else {
                None
            },
        };
        let rpc = RpcLimits::build(file.rpc, &data_dir, shards)?;
        let lfs = LfsLimits::build(file.lfs)?;
        let housekeeping = HousekeepingConfig::build(file.housekeeping, shards.get())?;
        let store = Location::new(
            &data_dir,
            flags.database_url.or(file.store.url).as_deref(),
            flags.node_id.or(file.store.node_id).as_deref(),
            file.store
                .max_connections
                .unwrap_or(crate::store::DEFAULT_MAX_CONNECTIONS),
        )
        .map_err(|e| invalid("store.url", e.to_string()))?;
        let hooks = HookConfig::build(file.hooks, flags.amqp_url)?.for_node(store.node());
        let cluster = cluster_config(
            file.cluster,
            flags.cluster_listen,
            flags.cluster_secret_file,
            &store,
            lfs.s3.is_some(),
        )?;
        Ok(Self {
            store,
            cluster,
            data_dir,
            http_listen,
            shards,
            force_epoll: flags.force_epoll || file.runtime.force_epoll,
            blocking_threads,
            http,
            tcp,
            git,
            shutdown_grace: Duration::from_secs(file.shutdown.grace_secs),
            upgrade_timeout: positive_secs(
                "shutdown.upgrade_timeout_secs",
                file.shutdown.upgrade_timeout_secs,
            )?,
            pid_file: flags.pid_file.or(file.shutdown.pid_file),
            hooks,
            rpc_listen,
            rpc,
            ssh_listen,
            ssh,
            lfs,
            housekeeping,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let c = ServeConfig::build(FileConfig::default(), Overrides::default()).unwrap();
        assert_eq!(c.http_listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
        assert_eq!(c.shutdown_grace, Duration::from_secs(30));
    }

    #[test]
    fn flags_override_file() {
        let file: FileConfig =
            toml::from_str("data_dir = \"/a\"\n[http]\nlisten = \"127.0.0.1:1\"\n").unwrap();
        let flags = Overrides {
            data_dir: Some("/b".into()),
            http_listen: Some("127.0.0.1:2".into()),
            shards: Some(3),
            ..Overrides::default()
        };
        let c = ServeConfig::build(file, flags).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/b"));
        assert_eq!(c.http_listen.port(), 2);
        assert_eq!(c.shards.get(), 3);
    }

    #[test]
    fn errors_name_the_field() {
        let file: FileConfig = toml::from_str("[http]\nhead_timeout_secs = 0\n").unwrap();
        let err = ServeConfig::build(file, Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("http.head_timeout_secs"), "{err}");
        let flags = Overrides {
            http_listen: Some("nope".into()),
            ..Overrides::default()
        };
        let err = ServeConfig::build(FileConfig::default(), flags).unwrap_err();
        assert!(err.to_string().contains("http.listen"), "{err}");
    }

    #[test]
    fn stall_settings_of_lfs_and_ssh() {
        let c = ServeConfig::build(FileConfig::default(), Overrides::default()).unwrap();
        assert_eq!(c.lfs.anonymous_transfers, 32);
        assert_eq!(c.lfs.anonymous_transfers_per_ip, 4);
        assert_eq!(c.ssh.channel_idle, Duration::from_secs(60));
        for (bad, field) in [
            (
                "[lfs]\nanonymous_transfers = 0\n",
                "lfs.anonymous_transfers",
            ),
            (
                "[lfs]\nanonymous_transfers_per_ip = 0\n",
                "lfs.anonymous_transfers_per_ip",
            ),
            ("[ssh]\nchannel_idle_secs = 0\n", "ssh.channel_idle_secs"),
        ] {
            let file: FileConfig = toml::from_str(bad).unwrap();
            let err = ServeConfig::build(file, Overrides::default()).unwrap_err();
            assert!(err.to_string().contains(field), "{bad}: {err}");
        }
    }

    #[test]
    fn hooks_section() {
        let c = ServeConfig::build(FileConfig::default(), Overrides::default()).unwrap();
        assert_eq!(c.hooks.amqp_url, None);
        assert_eq!(c.hooks.concurrency.disk_usage, 1);
        assert_eq!(c.hooks.concurrency.webhooks, 8);
        assert_eq!(c.hooks.concurrency.indexing, 2);
        assert_eq!(c.hooks.concurrency.noop, 0);
        let file: FileConfig = toml::from_str(
            "[hooks]\namqp_url = \"amqp://a\"\namqp_prefix = \"t-1\"\n[hooks.concurrency]\nwebhooks = 2\n",
        )
        .unwrap();
        let flags = Overrides {
            amqp_url: Some("amqp://b".into()),
            ..Overrides::default()
        };
        let c = ServeConfig::build(file, flags).unwrap();
        assert_eq!(c.hooks.amqp_url.as_deref(), Some("amqp://b"));
        assert_eq!(c.hooks.prefix, "t-1");
        assert_eq!(c.hooks.concurrency.webhooks, 2);
        for bad in [
            "[hooks]\namqp_prefix = \"a b\"\n",
            "[hooks]\nprefetch = 0\n",
            "[hooks]\namqp_url = \"https://x\"\n",
            "[hooks]\nbackoff_initial_ms = 10\nbackoff_max_ms = 5\n",
        ] {
            let file: FileConfig = toml::from_str(bad).unwrap();
            let err = ServeConfig::build(file, Overrides::default()).unwrap_err();
            assert!(err.to_string().contains("hooks."), "{bad}: {err}");
        }
    }

    #[test]
    fn rpc_section() {
        let c = ServeConfig::build(FileConfig::default(), Overrides::default()).unwrap();
        assert_eq!(c.rpc_listen.to_string(), "127.0.0.1:9090");
        assert_eq!(
            c.rpc.token_file,
            PathBuf::from(DEFAULT_DATA_DIR).join("rpc-token")
        );
        assert_eq!(c.rpc.max_message_bytes, 4 << 20);
        assert_eq!(c.rpc.default_deadline, Duration::from_secs(300));
        assert!(c.rpc.blocking_threads.get() >= 4);
        assert_eq!(c.rpc.max_unauthenticated_per_shard, 1024);
        assert_eq!(c.rpc.conn_timers.idle, Duration::from_secs(60));
        assert_eq!(c.rpc.conn_timers.first_request, Duration::from_secs(10));
        let file: FileConfig = toml::from_str(
            "[rpc]\nlisten = \"127.0.0.1:1\"\ntoken_file = \"/t\"\nblocking_threads = 3\n",
        )
        .unwrap();
        let flags = Overrides {
            rpc_listen: Some("127.0.0.1:2".into()),
            ..Overrides::default()
        };
        let c = ServeConfig::build(file, flags).unwrap();
        assert_eq!(c.rpc_listen.port(), 2);
        assert_eq!(c.rpc.token_file, PathBuf::from("/t"));
        assert_eq!(c.rpc.blocking_threads.get(), 3);
        for (bad, field) in [
            ("[rpc]\nlisten = \"x\"\n", "rpc.listen"),
            ("[rpc]\nmax_message_bytes = 10\n", "rpc.max_message_bytes"),
            (
                "[rpc]\nmax_concurrent_streams = 0\n",
                "rpc.max_concurrent_streams",
            ),
            (
                "[rpc]\ndefault_deadline_secs = 0\n",
                "rpc.default_deadline_secs",
            ),
            (
                "[rpc]\nmax_connections_per_shard = 64\nmax_unauthenticated_per_shard = 64\n",
                "rpc.max_unauthenticated_per_shard",
            ),
            (
                "[rpc]\nmax_connections_per_ip = 4\nmax_unauthenticated_per_ip = 5\n",
                "rpc.max_unauthenticated_per_ip",
            ),
            ("[rpc]\nfirst_request_secs = 0\n", "rpc.first_request_secs"),
            ("[rpc]\nidle_timeout_secs = 0\n", "rpc.idle_timeout_secs"),
        ] {
            let file: FileConfig = toml::from_str(bad).unwrap();
            let err = ServeConfig::build(file, Overrides::default()).unwrap_err();
            assert!(err.to_string().contains(field), "{bad}: {err}");
        }
    }

    #[test]
    fn ssh_section() {
        let c = ServeConfig::build(FileConfig::default(), Overrides::default()).unwrap();
        assert_eq!(c.ssh_listen.to_string(), "127.0.0.1:2222");
        assert_eq!(c.ssh.handshake_timeout, Duration::from_secs(20));
        assert_eq!(c.ssh.max_unauthenticated_per_ip, 32);
        let file: FileConfig = toml::from_str(
            "[ssh]\nlisten = \"127.0.0.1:1\"\nhandshake_timeout_secs = 2\nmax_unauthenticated = 5\n",
        )
        .unwrap();
        let flags = Overrides {
            ssh_listen: Some("127.0.0.1:3".into()),
            ..Overrides::default()
        };
        let c = ServeConfig::build(file, flags).unwrap();
        assert_eq!(c.ssh_listen.port(), 3);
        assert_eq!(c.ssh.handshake_timeout, Duration::from_secs(2));
        assert_eq!(c.ssh.max_unauthenticated, 5);
        for (bad, field) in [
            ("[ssh]\nlisten = \"x\"\n", "ssh.listen"),
            (
                "[ssh]\nhandshake_timeout_secs = 0\n",
                "ssh.handshake_timeout_secs",
            ),
            (
                "[ssh]\nmax_unauthenticated_per_ip = 0\n",
                "ssh.max_unauthenticated_per_ip",
            ),
            ("[ssh]\nmax_auth_attempts = 0\n", "ssh.max_auth_attempts"),
        ] {
            let file: FileConfig = toml::from_str(bad).unwrap();
            let err = ServeConfig::build(file, Overrides::default()).unwrap_err();
            assert!(err.to_string().contains(field), "{bad}: {err}");
        }
    }

    #[test]
    fn unknown_fields_are_rejected() {
        assert!(toml::from_str::<FileConfig>("[http]\nlisen = \"x\"\n").is_err());
    }
}
