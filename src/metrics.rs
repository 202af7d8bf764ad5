//! Process-wide counters and gauges, rendered as Prometheus text at `GET /metrics`. Plain relaxed
//! atomics: updating a metric on the hot path costs one uncontended atomic add, no allocation.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};

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
    Other,
}

impl Route {
    const ALL: [Route; 6] = [
        Route::InfoRefs,
        Route::UploadPack,
        Route::ReceivePack,
        Route::Health,
        Route::Metrics,
        Route::Other,
    ];
    fn label(self) -> &'static str {
        match self {
            Route::InfoRefs => "info_refs",
            Route::UploadPack => "upload_pack",
            Route::ReceivePack => "receive_pack",
            Route::Health => "healthz",
            Route::Metrics => "metrics",
            Route::Other => "other",
        }
    }
}

pub struct Metrics {
    pub requests: [Counter; 6],
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
    pub git_killed: Counter,
    pub git_processes: Gauge,
    pub pack_running: Gauge,
    pub pack_queued: Gauge,
    pub pack_queue_waits: Counter,
    pub pack_queue_rejected: Counter,
}

pub static METRICS: Metrics = Metrics::new();

impl Metrics {
    const fn new() -> Self {
        Self {
            requests: [const { Counter::new() }; 6],
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
            git_killed: Counter::new(),
            git_processes: Gauge::new(),
            pack_running: Gauge::new(),
            pack_queued: Gauge::new(),
            pack_queue_waits: Counter::new(),
            pack_queue_rejected: Counter::new(),
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
        let scalars: [(&str, &str, &str, i64); 15] = [
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
        out
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
            v.parse::<i64>().unwrap();
        }
    }
}
