//! Process-wide counters and gauges, rendered as Prometheus text at `GET /metrics`. Plain relaxed
//! atomics: updating a metric on the hot path costs one uncontended atomic add, no allocation.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub const fn new() -> Self {
        Self(AtomicU64::new(0))
    }
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    pub const fn new() -> Self {
        Self(AtomicI64::new(0))
    }
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
    pub fn set(&self, v: i64) {
        self.0.store(v, Ordering::Relaxed);
    }
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Most shards a process can have (see `runtime.shards` validation).
pub const MAX_SHARDS: usize = 1024;

/// Which kind of request a counter is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    InfoRefs,
    UploadPack,
    ReceivePack,
    Health,
    Metrics,
    Lfs,
    Other,
}

impl Route {
    const ALL: [Route; 7] = [
        Route::InfoRefs,
        Route::UploadPack,
        Route::ReceivePack,
        Route::Health,
        Route::Metrics,
        Route::Lfs,
        Route::Other,
    ];
    fn label(self) -> &'static str {
        match self {
            Route::InfoRefs => "info_refs",
            Route::UploadPack => "upload_pack",
            Route::ReceivePack => "receive_pack",
            Route::Health => "healthz",
            Route::Metrics => "metrics",
            Route::Lfs => "lfs",
            Route::Other => "other",
        }
    }
}

/// Why a stream or connection was cut for stalling or for holding more than its share (issue
/// #17): one counter per reason, so an operator sees an attack as it happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// A request body sent no byte for `http.body_idle_secs`.
    HttpBodyIdle,
    /// A request body stayed under `http.body_min_bytes_per_sec`.
    HttpBodySlow,
    /// A response (pack, LFS object) the client accepted no byte of for `http.send_idle_secs`.
    HttpSendIdle,
    /// An anonymous client over its address's share of pack slots or LFS transfers.
    AnonymousShare,
    /// An SSH channel (git or git-lfs-transfer) that moved no byte for its idle limit.
    SshChannelIdle,
    /// A gRPC connection with no open stream for its idle limit.
    RpcIdle,
    /// A gRPC connection that sent no authenticated request in time after its preface.
    RpcNoRequest,
    /// A gRPC connection refused over the per-address cap.
    RpcPerAddress,
    /// A gRPC connection whose keepalive ping went unanswered.
    RpcKeepalive,
}

impl Cut {
    pub const ALL: [Cut; 9] = [
        Cut::HttpBodyIdle,
        Cut::HttpBodySlow,
        Cut::HttpSendIdle,
        Cut::AnonymousShare,
        Cut::SshChannelIdle,
        Cut::RpcIdle,
        Cut::RpcNoRequest,
        Cut::RpcPerAddress,
        Cut::RpcKeepalive,
    ];
    fn label(self) -> &'static str {
        match self {
            Cut::HttpBodyIdle => "http_body_idle",
            Cut::HttpBodySlow => "http_body_slow",
            Cut::HttpSendIdle => "http_send_idle",
            Cut::AnonymousShare => "anonymous_share",
            Cut::SshChannelIdle => "ssh_channel_idle",
            Cut::RpcIdle => "rpc_idle",
            Cut::RpcNoRequest => "rpc_no_request",
            Cut::RpcPerAddress => "rpc_per_address",
            Cut::RpcKeepalive => "rpc_keepalive",
        }
    }
}

pub struct Metrics {
    pub requests: [Counter; 7],
    /// Responses by status class: index 1 = 1xx ... 5 = 5xx.
    pub responses: [Counter; 6],
    pub connections_accepted: Counter,
    pub connections_rejected: Counter,
    pub head_timeouts: Counter,
    pub bad_requests: Counter,
    shard_connections: [Gauge; MAX_SHARDS],
    shards: AtomicUsize,
    pub bytes_spliced: Counter,
    pub bytes_written: Counter,
    pub bytes_received: Counter,
    pub git_spawned: Counter,
    /// Protocol v2 requests answered without spawning git ([`crate::git::v2`]).
    pub v2_advertisements_served: Counter,
    pub v2_ls_refs_answered: Counter,
    pub git_killed: Counter,
    pub git_processes: Gauge,
    pub pack_running: Gauge,
    pub pack_queued: Gauge,
    pub pack_queue_waits: Counter,
    pub pack_queue_rejected: Counter,
    /// Relayed answers served from this node's cache, their bytes, and answers kept
    /// ([`crate::git::relay_cache`]).
    pub relay_cache_hits: Counter,
    pub relay_cache_hit_bytes: Counter,
    pub relay_cache_stored: Counter,
    /// Streams and connections cut for stalling, by reason ([`Cut`]).
    cuts: [Counter; Cut::ALL.len()],
    /// gRPC calls by method: count, status codes, latency.
    pub rpc: RpcMetrics,
    /// Hook workers: outbox, relay, per-job counters, repository sizes.
    pub hooks: HookMetrics,
    /// Git over SSH: handshakes, refusals, sessions.
    pub ssh: SshMetrics,
    /// Git LFS transfers.
    pub lfs: LfsMetrics,
}

pub static METRICS: Metrics = Metrics::new();

impl Metrics {
    const fn new() -> Self {
        Self {
            requests: [const { Counter::new() }; 7],
            responses: [const { Counter::new() }; 6],
            connections_accepted: Counter::new(),
            connections_rejected: Counter::new(),
            head_timeouts: Counter::new(),
            bad_requests: Counter::new(),
            shard_connections: [const { Gauge::new() }; MAX_SHARDS],
            shards: AtomicUsize::new(0),
            bytes_spliced: Counter::new(),
            bytes_written: Counter::new(),
            bytes_received: Counter::new(),
            git_spawned: Counter::new(),
            v2_advertisements_served: Counter::new(),
            v2_ls_refs_answered: Counter::new(),
            git_killed: Counter::new(),
            git_processes: Gauge::new(),
            pack_running: Gauge::new(),
            pack_queued: Gauge::new(),
            pack_queue_waits: Counter::new(),
            pack_queue_rejected: Counter::new(),
            relay_cache_hits: Counter::new(),
            relay_cache_hit_bytes: Counter::new(),
            relay_cache_stored: Counter::new(),
            cuts: [const { Counter::new() }; Cut::ALL.len()],
            rpc: RpcMetrics::new(),
            hooks: HookMetrics::new(),
            ssh: SshMetrics::new(),
            lfs: LfsMetrics::new(),
        }
    }

    pub fn set_shards(&self, n: usize) {
        self.shards.store(n.min(MAX_SHARDS), Ordering::Relaxed);
    }

    pub fn request(&self, route: Route) {
        if let Some(c) = self.requests.get(route as usize) {
            c.inc();
        }
    }

    pub fn response(&self, status: u16) {
        if let Some(c) = self.responses.get(usize::from(status / 100)) {
            c.inc();
        }
    }

    pub fn cut(&self, reason: Cut) {
        if let Some(c) = self.cuts.get(reason as usize) {
            c.inc();
        }
    }

    pub fn cuts(&self, reason: Cut) -> u64 {
        self.cuts.get(reason as usize).map_or(0, Counter::get)
    }

    pub fn shard_connections(&self, shard: usize) -> Option<&Gauge> {
        self.shard_connections.get(shard)
    }

    /// Prometheus text exposition format 0.0.4.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let mut family = |name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        family(
            "gitplane_http_requests_total",
            "counter",
            "HTTP requests by route.",
        );
        let mut body = String::new();
        for r in Route::ALL {
            let _ = writeln!(
                body,
                "gitplane_http_requests_total{{route=\"{}\"}} {}",
                r.label(),
                self.requests[r as usize].get()
            );
        }
        out.push_str(&body);
        let _ = writeln!(
            out,
            "# HELP gitplane_http_responses_total HTTP responses by status class.\n# TYPE gitplane_http_responses_total counter"
        );
        for (i, c) in self.responses.iter().enumerate().skip(1) {
            let _ = writeln!(
                out,
                "gitplane_http_responses_total{{class=\"{i}xx\"}} {}",
                c.get()
            );
        }
        let _ = writeln!(
            out,
            "# HELP gitplane_http_active_connections Open HTTP connections per shard.\n# TYPE gitplane_http_active_connections gauge"
        );
        for (i, g) in self
            .shard_connections
            .iter()
            .take(self.shards.load(Ordering::Relaxed))
            .enumerate()
        {
            let _ = writeln!(
                out,
                "gitplane_http_active_connections{{shard=\"{i}\"}} {}",
                g.get()
            );
        }
        let scalars: [(&str, &str, &str, i64); 20] = [
            (
                "gitplane_http_connections_accepted_total",
                "counter",
                "Accepted HTTP connections.",
                self.connections_accepted.get() as i64,
            ),
            (
                "gitplane_http_connections_rejected_total",
                "counter",
                "Connections refused at the per-shard cap.",
                self.connections_rejected.get() as i64,
            ),
            (
                "gitplane_http_head_timeouts_total",
                "counter",
                "Connections closed for not sending a request head in time.",
                self.head_timeouts.get() as i64,
            ),
            (
                "gitplane_http_bad_requests_total",
                "counter",
                "Malformed or oversized requests.",
                self.bad_requests.get() as i64,
            ),
            (
                "gitplane_bytes_spliced_total",
                "counter",
                "Response bytes moved pipe-to-socket by splice.",
                self.bytes_spliced.get() as i64,
            ),
            (
                "gitplane_bytes_written_total",
                "counter",
                "Response bytes written from user space.",
                self.bytes_written.get() as i64,
            ),
            (
                "gitplane_bytes_received_total",
                "counter",
                "Request body bytes received.",
                self.bytes_received.get() as i64,
            ),
            (
                "gitplane_git_spawned_total",
                "counter",
                "git processes started.",
                self.git_spawned.get() as i64,
            ),
            (
                "gitplane_git_v2_advertisements_total",
                "counter",
                "Protocol v2 capability advertisements served without spawning git.",
                self.v2_advertisements_served.get() as i64,
            ),
            (
                "gitplane_git_v2_ls_refs_total",
                "counter",
                "Protocol v2 ls-refs requests answered without spawning git.",
                self.v2_ls_refs_answered.get() as i64,
            ),
            (
                "gitplane_git_killed_total",
                "counter",
                "git processes killed because their client went away.",
                self.git_killed.get() as i64,
            ),
            (
                "gitplane_git_processes",
                "gauge",
                "git processes running.",
                self.git_processes.get(),
            ),
            (
                "gitplane_pack_running",
                "gauge",
                "Pack operations holding a slot.",
                self.pack_running.get(),
            ),
            (
                "gitplane_pack_queued",
                "gauge",
                "Pack operations waiting for a slot.",
                self.pack_queued.get(),
            ),
            (
                "gitplane_pack_queue_waits_total",
                "counter",
                "Pack operations that had to wait.",
                self.pack_queue_waits.get() as i64,
            ),
            (
                "gitplane_pack_queue_rejected_total",
                "counter",
                "Pack operations refused with 503.",
                self.pack_queue_rejected.get() as i64,
            ),
            (
                "gitplane_relay_cache_hits_total",
                "counter",
                "Relayed reads answered from this node's copy of an earlier answer.",
                self.relay_cache_hits.get() as i64,
            ),
            (
                "gitplane_relay_cache_hit_bytes_total",
                "counter",
                "Bytes of relayed reads answered from this node's copies.",
                self.relay_cache_hit_bytes.get() as i64,
            ),
            (
                "gitplane_relay_cache_stored_total",
                "counter",
                "Answers of relayed reads kept for identical requests.",
                self.relay_cache_stored.get() as i64,
            ),
            (
                "gitplane_shards",
                "gauge",
                "Shard threads.",
                self.shards.load(Ordering::Relaxed) as i64,
            ),
        ];
        for (name, kind, help, v) in scalars {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP gitplane_stalled_cuts_total Streams and connections cut for stalling or over their share, by reason.\n# TYPE gitplane_stalled_cuts_total counter"
        );
        for reason in Cut::ALL {
            let _ = writeln!(
                out,
                "gitplane_stalled_cuts_total{{reason=\"{}\"}} {}",
                reason.label(),
                self.cuts(reason)
            );
        }
        self.rpc.render(&mut out);
        self.hooks.render(&mut out);
        self.ssh.render(&mut out);
        self.lfs.render(&mut out);
        render_pack_cache(&mut out);
        crate::housekeeping::metrics::HOUSEKEEPING.render(&mut out);
        out
    }
}

/// The pack cache's counters, which the hook processes keep in shared memory.
fn render_pack_cache(out: &mut String) {
    use crate::git::pack_cache_stats::Counter as PackCounter;
    let Some(stats) = crate::git::pack_cache::stats() else {
        return;
    };
    for counter in PackCounter::ALL {
        let (name, help) = counter.describe();
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
            stats.get(counter)
        );
    }
}

/// Most gRPC methods tracked (the RPC front end registers its names at start-up).
pub const MAX_RPC_METHODS: usize = 32;
/// gRPC status codes, 0 (OK) to 16 (UNAUTHENTICATED).
pub const RPC_CODES: usize = 17;
/// Upper bounds of the RPC latency buckets, in microseconds (0.5 ms to 10 s).
const RPC_BUCKETS_US: [u64; 14] = [
    500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    2_500_000, 5_000_000, 10_000_000,
];

pub struct RpcMethodMetrics {
    calls: Counter,
    codes: [Counter; RPC_CODES],
    /// Calls per bucket (not cumulative; rendering adds them up); the last one is +Inf.
    buckets: [Counter; RPC_BUCKETS_US.len() + 1],
    sum_us: Counter,
}

impl RpcMethodMetrics {
    const fn new() -> Self {
        Self {
            calls: Counter::new(),
            codes: [const { Counter::new() }; RPC_CODES],
            buckets: [const { Counter::new() }; RPC_BUCKETS_US.len() + 1],
            sum_us: Counter::new(),
        }
    }
}

/// Per-method gRPC metrics: `gitplane_rpc_calls_total`, `gitplane_rpc_responses_total` by
/// code, and the `gitplane_rpc_duration_seconds` histogram.
pub struct RpcMetrics {
    methods: [RpcMethodMetrics; MAX_RPC_METHODS],
    names: std::sync::OnceLock<&'static [&'static str]>,
}

impl RpcMetrics {
    const fn new() -> Self {
        Self {
            methods: [const { RpcMethodMetrics::new() }; MAX_RPC_METHODS],
            names: std::sync::OnceLock::new(),
        }
    }

    /// Names the methods by index (`service/Method`); the first call wins.
    pub fn set_methods(&self, names: &'static [&'static str]) {
        let _ = self.names.set(names);
    }

    /// Counts one finished call of method `index` with gRPC status `code`.
    pub fn record(&self, index: usize, code: u8, elapsed: std::time::Duration) {
        let Some(m) = self.methods.get(index) else {
            return;
        };
        m.calls.inc();
        if let Some(c) = m.codes.get(usize::from(code)) {
            c.inc();
        }
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let bucket = RPC_BUCKETS_US
            .iter()
            .position(|&b| us <= b)
            .unwrap_or(RPC_BUCKETS_US.len());
        if let Some(b) = m.buckets.get(bucket) {
            b.inc();
        }
        m.sum_us.add(us);
    }

    fn render(&self, out: &mut String) {
        let Some(names) = self.names.get() else {
            return;
        };
        let _ = writeln!(
            out,
            "# HELP gitplane_rpc_calls_total gRPC calls by method.\n# TYPE gitplane_rpc_calls_total counter"
        );
        for (name, m) in names.iter().zip(&self.methods) {
            let _ = writeln!(
                out,
                "gitplane_rpc_calls_total{{method=\"{name}\"}} {}",
                m.calls.get()
            );
        }
        let _ = writeln!(
            out,
            "# HELP gitplane_rpc_responses_total gRPC calls by method and status code.\n# TYPE gitplane_rpc_responses_total counter"
        );
        for (name, m) in names.iter().zip(&self.methods) {
            for (code, c) in m.codes.iter().enumerate() {
                // Codes never seen stay out: 17 zero lines per method would drown the rest.
                if c.get() > 0 {
                    let _ = writeln!(
                        out,
                        "gitplane_rpc_responses_total{{method=\"{name}\",code=\"{code}\"}} {}",
                        c.get()
                    );
                }
            }
        }
        let _ = writeln!(
            out,
            "# HELP gitplane_rpc_duration_seconds gRPC call latency by method.\n# TYPE gitplane_rpc_duration_seconds histogram"
        );
        for (name, m) in names.iter().zip(&self.methods) {
            let mut cumulative = 0;
            for (i, b) in m.buckets.iter().enumerate() {
                cumulative += b.get();
                let le = RPC_BUCKETS_US
                    .get(i)
                    .map(|us| format!("{}", *us as f64 / 1e6))
                    .unwrap_or_else(|| "+Inf".into());
                let _ = writeln!(
                    out,
                    "gitplane_rpc_duration_seconds_bucket{{method=\"{name}\",le=\"{le}\"}} {cumulative}"
                );
            }
            let _ = writeln!(
                out,
                "gitplane_rpc_duration_seconds_sum{{method=\"{name}\"}} {}\ngitplane_rpc_duration_seconds_count{{method=\"{name}\"}} {}",
                m.sum_us.get() as f64 / 1e6,
                m.calls.get()
            );
        }
    }
}

/// Hook job types, in the index order of [`HookMetrics::jobs`].
pub const HOOK_JOBS: [&str; 5] = ["disk_usage", "webhooks", "indexing", "noop", "housekeeping"];
/// Most repositories whose size is exported (the rest are still stored, just not exported).
const MAX_SIZE_SERIES: usize = 10_000;

/// Counters of one hook job type.
pub struct HookJobMetrics {
    /// Jobs holding a semaphore permit, all cores together.
    pub running: Gauge,
    pub succeeded: Counter,
    /// Failed attempts (each retry that failed counts).
    pub failed: Counter,
    pub retried: Counter,
    pub dead_lettered: Counter,
    /// Redelivered copies of jobs already finished, skipped.
    pub duplicates: Counter,
    /// Jobs that found every permit of their core's semaphore taken and had to wait.
    pub semaphore_waits: Counter,
    /// Highest number of jobs seen running at once on each core.
    peak_per_core: [AtomicI64; MAX_SHARDS],
}

impl HookJobMetrics {
    const fn new() -> Self {
        Self {
            running: Gauge::new(),
            succeeded: Counter::new(),
            failed: Counter::new(),
            retried: Counter::new(),
            dead_lettered: Counter::new(),
            duplicates: Counter::new(),
            semaphore_waits: Counter::new(),
            peak_per_core: [const { AtomicI64::new(0) }; MAX_SHARDS],
        }
    }

    /// Notes that `running` jobs run at once on `core` now.
    pub fn note_running(&self, core: usize, running: i64) {
        if let Some(p) = self.peak_per_core.get(core) {
            p.fetch_max(running, Ordering::Relaxed);
        }
    }

    pub fn peak(&self, core: usize) -> i64 {
        self.peak_per_core
            .get(core)
            .map_or(0, |p| p.load(Ordering::Relaxed))
    }
}

pub struct HookMetrics {
    /// Events waiting in the outbox.
    pub outbox_depth: Gauge,
    pub published: Counter,
    pub confirmed: Counter,
    /// Publishes the broker refused (nack or unroutable) or that were cut by a lost connection.
    pub publish_failures: Counter,
    /// AMQP connections (re)established.
    pub amqp_connects: Counter,
    /// Pending ref changes of dead processes reconciled into an event / dropped as not landed.
    pub pending_published: Counter,
    pub pending_dropped: Counter,
    pub jobs: [HookJobMetrics; 5],
    repo_sizes: Mutex<BTreeMap<String, u64>>,
}

impl HookMetrics {
    const fn new() -> Self {
        Self {
            outbox_depth: Gauge::new(),
            published: Counter::new(),
            confirmed: Counter::new(),
            publish_failures: Counter::new(),
            amqp_connects: Counter::new(),
            pending_published: Counter::new(),
            pending_dropped: Counter::new(),
            jobs: [const { HookJobMetrics::new() }; 5],
            repo_sizes: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn set_repo_size(&self, repo: &str, bytes: u64) {
        let mut sizes = self.repo_sizes.lock().unwrap_or_else(|p| p.into_inner());
        if sizes.len() < MAX_SIZE_SERIES || sizes.contains_key(repo) {
            sizes.insert(repo.to_owned(), bytes);
        }
    }

    fn render(&self, out: &mut String) {
        let scalars = [
            (
                "gitplane_hook_outbox_depth",
                "gauge",
                "Push events waiting in the outbox.",
                self.outbox_depth.get(),
            ),
            (
                "gitplane_hook_published_total",
                "counter",
                "Events published to the broker.",
                self.published.get() as i64,
            ),
            (
                "gitplane_hook_confirmed_total",
                "counter",
                "Publishes confirmed by the broker.",
                self.confirmed.get() as i64,
            ),
            (
                "gitplane_hook_publish_failures_total",
                "counter",
                "Publishes nacked, unroutable or cut.",
                self.publish_failures.get() as i64,
            ),
            (
                "gitplane_hook_amqp_connects_total",
                "counter",
                "AMQP connections established.",
                self.amqp_connects.get() as i64,
            ),
        ];
        for (name, kind, help, v) in scalars {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP gitplane_hook_pending_reconciled_total Ref changes of dead processes reconciled against the refs on disk.\n# TYPE gitplane_hook_pending_reconciled_total counter\ngitplane_hook_pending_reconciled_total{{outcome=\"published\"}} {}\ngitplane_hook_pending_reconciled_total{{outcome=\"dropped\"}} {}",
            self.pending_published.get(),
            self.pending_dropped.get()
        );
        type Get = fn(&HookJobMetrics) -> i64;
        let families: [(&str, &str, &str, Get); 7] = [
            (
                "gitplane_hook_jobs_running",
                "gauge",
                "Jobs running, by type.",
                |m| m.running.get(),
            ),
            (
                "gitplane_hook_jobs_succeeded_total",
                "counter",
                "Jobs finished successfully.",
                |m| m.succeeded.get() as i64,
            ),
            (
                "gitplane_hook_job_attempts_failed_total",
                "counter",
                "Failed job attempts.",
                |m| m.failed.get() as i64,
            ),
            (
                "gitplane_hook_jobs_retried_total",
                "counter",
                "Job attempts retried after a backoff.",
                |m| m.retried.get() as i64,
            ),
            (
                "gitplane_hook_jobs_dead_lettered_total",
                "counter",
                "Jobs dead-lettered after their last attempt.",
                |m| m.dead_lettered.get() as i64,
            ),
            (
                "gitplane_hook_jobs_duplicates_total",
                "counter",
                "Redelivered jobs skipped as already finished.",
                |m| m.duplicates.get() as i64,
            ),
            (
                "gitplane_hook_semaphore_waits_total",
                "counter",
                "Jobs that waited for their core's semaphore.",
                |m| m.semaphore_waits.get() as i64,
            ),
        ];
        for (name, kind, help, get) in families {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (job, m) in HOOK_JOBS.iter().zip(&self.jobs) {
                let _ = writeln!(out, "{name}{{job=\"{job}\"}} {}", get(m));
            }
        }
        let _ = writeln!(out, "# HELP gitplane_hook_jobs_peak_running Most jobs seen running at once on one core.\n# TYPE gitplane_hook_jobs_peak_running gauge");
        let cores = METRICS.shards.load(Ordering::Relaxed).max(1);
        for (job, m) in HOOK_JOBS.iter().zip(&self.jobs) {
            for core in 0..cores {
                let _ = writeln!(
                    out,
                    "gitplane_hook_jobs_peak_running{{job=\"{job}\",core=\"{core}\"}} {}",
                    m.peak(core)
                );
            }
        }
        let _ = writeln!(out, "# HELP gitplane_repo_size_bytes Repository size on disk, as last measured after a push.\n# TYPE gitplane_repo_size_bytes gauge");
        let sizes = self.repo_sizes.lock().unwrap_or_else(|p| p.into_inner());
        for (repo, bytes) in sizes.iter() {
            // Repository names are [A-Za-z0-9._-] and '/', nothing that needs escaping.
            let _ = writeln!(out, "gitplane_repo_size_bytes{{repo=\"{repo}\"}} {bytes}");
        }
    }
}

/// SSH front end counters (issue #3). A handshake starts at TCP accept and completes with
/// successful authentication; one that does neither within the deadline is timed out.
pub struct SshMetrics {
    pub handshakes_started: Counter,
    pub handshakes_completed: Counter,
    pub handshakes_timed_out: Counter,
    /// Connections closed at accept: too many unauthenticated connections (globally or from
    /// one source).
    pub handshakes_refused: Counter,
    /// Connections that waited for a handshake slot (their address had its share in the
    /// handshake) before starting.
    pub handshakes_queued: Counter,
    /// Handshakes that ended early for another reason (protocol error, client gave up, auth
    /// attempts exhausted).
    pub handshakes_failed: Counter,
    /// Public keys rejected (unknown key, wrong user name, refused algorithm).
    pub auth_rejected: Counter,
    pub connections: Gauge,
    pub unauthenticated: Gauge,
    /// Exec requests that ran git or git-lfs-authenticate.
    pub execs: Counter,
    /// Exec, shell, subsystem, pty and forwarding requests refused.
    pub requests_refused: Counter,
}

impl SshMetrics {
    const fn new() -> Self {
        Self {
            handshakes_started: Counter::new(),
            handshakes_completed: Counter::new(),
            handshakes_timed_out: Counter::new(),
            handshakes_refused: Counter::new(),
            handshakes_queued: Counter::new(),
            handshakes_failed: Counter::new(),
            auth_rejected: Counter::new(),
            connections: Gauge::new(),
            unauthenticated: Gauge::new(),
            execs: Counter::new(),
            requests_refused: Counter::new(),
        }
    }

    fn render(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP gitplane_ssh_handshakes_total SSH handshakes by outcome.\n# TYPE gitplane_ssh_handshakes_total counter"
        );
        for (outcome, c) in [
            ("started", &self.handshakes_started),
            ("completed", &self.handshakes_completed),
            ("timed_out", &self.handshakes_timed_out),
            ("refused", &self.handshakes_refused),
            ("queued", &self.handshakes_queued),
            ("failed", &self.handshakes_failed),
        ] {
            let _ = writeln!(
                out,
                "gitplane_ssh_handshakes_total{{outcome=\"{outcome}\"}} {}",
                c.get()
            );
        }
        let scalars = [
            (
                "gitplane_ssh_auth_rejected_total",
                "counter",
                "SSH public keys rejected.",
                self.auth_rejected.get() as i64,
            ),
            (
                "gitplane_ssh_connections",
                "gauge",
                "Open SSH connections.",
                self.connections.get(),
            ),
            (
                "gitplane_ssh_unauthenticated_connections",
                "gauge",
                "SSH connections not yet authenticated.",
                self.unauthenticated.get(),
            ),
            (
                "gitplane_ssh_execs_total",
                "counter",
                "SSH exec requests run.",
                self.execs.get() as i64,
            ),
            (
                "gitplane_ssh_requests_refused_total",
                "counter",
                "SSH exec, shell, subsystem, pty and forwarding requests refused.",
                self.requests_refused.get() as i64,
            ),
        ];
        for (name, kind, help, v) in scalars {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        }
    }
}

/// Git LFS transfer counters.
pub struct LfsMetrics {
    pub bytes_in: Counter,
    pub bytes_out: Counter,
    pub active_transfers: Gauge,
    /// Pool buffers on loan, all shards (object bytes in flight).
    pub pool_in_use: Gauge,
    pub pool_waits: Counter,
    pub verify_failures: Counter,
    pub batch_requests: Counter,
}

impl LfsMetrics {
    const fn new() -> Self {
        Self {
            bytes_in: Counter::new(),
            bytes_out: Counter::new(),
            active_transfers: Gauge::new(),
            pool_in_use: Gauge::new(),
            pool_waits: Counter::new(),
            verify_failures: Counter::new(),
            batch_requests: Counter::new(),
        }
    }

    fn render(&self, out: &mut String) {
        let rows: [(&str, &str, &str, i64); 7] = [
            (
                "gitplane_lfs_bytes_in_total",
                "counter",
                "LFS object bytes uploaded.",
                self.bytes_in.get() as i64,
            ),
            (
                "gitplane_lfs_bytes_out_total",
                "counter",
                "LFS object bytes downloaded.",
                self.bytes_out.get() as i64,
            ),
            (
                "gitplane_lfs_active_transfers",
                "gauge",
                "LFS uploads and downloads in progress.",
                self.active_transfers.get(),
            ),
            (
                "gitplane_lfs_pool_buffers_in_use",
                "gauge",
                "Pinned LFS buffers on loan to transfers, all shards.",
                self.pool_in_use.get(),
            ),
            (
                "gitplane_lfs_pool_waits_total",
                "counter",
                "Times a transfer waited for a pinned buffer.",
                self.pool_waits.get() as i64,
            ),
            (
                "gitplane_lfs_verify_failures_total",
                "counter",
                "Uploads refused for a wrong size or SHA-256.",
                self.verify_failures.get() as i64,
            ),
            (
                "gitplane_lfs_batch_requests_total",
                "counter",
                "LFS batch API requests.",
                self.batch_requests.get() as i64,
            ),
        ];
        for (name, kind, help, v) in rows {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::new();
        m.set_shards(2);
        m.request(Route::UploadPack);
        m.response(200);
        m.response(503);
        let text = m.render();
        assert!(text.contains("gitplane_http_requests_total{route=\"upload_pack\"} 1\n"));
        assert!(text.contains("gitplane_http_responses_total{class=\"5xx\"} 1\n"));
        assert!(text.contains("gitplane_http_active_connections{shard=\"1\"} 0\n"));
        assert!(!text.contains("shard=\"2\""));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (_, v) = line.rsplit_once(' ').unwrap();
            v.parse::<f64>().unwrap_or_else(|e| panic!("{line}: {e}"));
        }
    }

    #[test]
    fn renders_rpc_histograms() {
        let m = Metrics::new();
        m.rpc.set_methods(&["svc/A", "svc/B"]);
        m.rpc.record(0, 0, std::time::Duration::from_micros(700));
        m.rpc.record(0, 5, std::time::Duration::from_secs(60));
        let text = m.render();
        assert!(
            text.contains("gitplane_rpc_calls_total{method=\"svc/A\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("gitplane_rpc_calls_total{method=\"svc/B\"} 0\n"));
        assert!(text.contains("gitplane_rpc_responses_total{method=\"svc/A\",code=\"5\"} 1\n"));
        assert!(text
            .contains("gitplane_rpc_duration_seconds_bucket{method=\"svc/A\",le=\"0.0005\"} 0\n"));
        assert!(text
            .contains("gitplane_rpc_duration_seconds_bucket{method=\"svc/A\",le=\"0.001\"} 1\n"));
        assert!(
            text.contains("gitplane_rpc_duration_seconds_bucket{method=\"svc/A\",le=\"+Inf\"} 2\n")
        );
        assert!(text.contains("gitplane_rpc_duration_seconds_count{method=\"svc/A\"} 2\n"));
    }
}
