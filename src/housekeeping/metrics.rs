//! Housekeeping metrics: runs by task and outcome, a duration histogram per task, the queue
//! (passes waiting for the node-wide semaphore), passes running and the most ever seen running at
//! once, and repositories overdue at the last sweep. Rendered into `GET /metrics`.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use crate::metrics::{Counter, Gauge};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    CleanStale,
    PackRefs,
    Geometric,
    Full,
    CommitGraph,
}

impl Task {
    pub const ALL: [Task; 5] = [
        Task::CleanStale,
        Task::PackRefs,
        Task::Geometric,
        Task::Full,
        Task::CommitGraph,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Task::CleanStale => "clean_stale",
            Task::PackRefs => "pack_refs",
            Task::Geometric => "repack_geometric",
            Task::Full => "repack_full",
            Task::CommitGraph => "commit_graph",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Failed,
    Cancelled,
}

impl Outcome {
    const ALL: [Outcome; 3] = [Outcome::Ok, Outcome::Failed, Outcome::Cancelled];

    fn label(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Failed => "failed",
            Outcome::Cancelled => "cancelled",
        }
    }
}

/// Upper bounds of the duration buckets, in seconds.
const BUCKETS: [f64; 9] = [0.05, 0.25, 1.0, 5.0, 15.0, 60.0, 300.0, 1200.0, 3600.0];

pub struct HousekeepingMetrics {
    runs: [[Counter; 3]; 5],
    buckets: [[Counter; BUCKETS.len()]; 5],
    sum_ms: [Counter; 5],
    /// Passes waiting for a permit of the node-wide semaphore.
    pub queued: Gauge,
    /// Passes holding a permit.
    pub running: Gauge,
    peak_running: AtomicI64,
    /// Repositories found overdue by the last sweep.
    pub overdue: Gauge,
}

pub static HOUSEKEEPING: HousekeepingMetrics = HousekeepingMetrics {
    runs: [const { [const { Counter::new() }; 3] }; 5],
    buckets: [const { [const { Counter::new() }; BUCKETS.len()] }; 5],
    sum_ms: [const { Counter::new() }; 5],
    queued: Gauge::new(),
    running: Gauge::new(),
    peak_running: AtomicI64::new(0),
    overdue: Gauge::new(),
};

impl HousekeepingMetrics {
    pub fn record(&self, task: Task, outcome: Outcome, took: Duration) {
        let t = task as usize;
        self.runs[t][outcome as usize].inc();
        let secs = took.as_secs_f64();
        for (bound, c) in BUCKETS.iter().zip(&self.buckets[t]) {
            if secs <= *bound {
                c.inc();
            }
        }
        self.sum_ms[t].add(u64::try_from(took.as_millis()).unwrap_or(u64::MAX));
    }

    /// Notes one more pass holding a permit.
    pub fn started(&self) {
        self.running.inc();
        self.peak_running
            .fetch_max(self.running.get(), Ordering::Relaxed);
    }

    pub fn ended(&self) {
        self.running.dec();
    }

    pub fn render(&self, out: &mut String) {
        let _ = writeln!(out, "# HELP gitplane_housekeeping_runs_total Maintenance tasks run, by task and outcome.\n# TYPE gitplane_housekeeping_runs_total counter");
        for task in Task::ALL {
            for outcome in Outcome::ALL {
                let _ = writeln!(
                    out,
                    "gitplane_housekeeping_runs_total{{task=\"{}\",outcome=\"{}\"}} {}",
                    task.label(),
                    outcome.label(),
                    self.runs[task as usize][outcome as usize].get()
                );
            }
        }
        let _ = writeln!(out, "# HELP gitplane_housekeeping_duration_seconds Wall time of maintenance tasks.\n# TYPE gitplane_housekeeping_duration_seconds histogram");
        for task in Task::ALL {
            let t = task as usize;
            let (name, count) = (
                task.label(),
                self.runs[t].iter().map(Counter::get).sum::<u64>(),
            );
            for (bound, c) in BUCKETS.iter().zip(&self.buckets[t]) {
                let _ = writeln!(out, "gitplane_housekeeping_duration_seconds_bucket{{task=\"{name}\",le=\"{bound}\"}} {}", c.get());
            }
            let _ = writeln!(out, "gitplane_housekeeping_duration_seconds_bucket{{task=\"{name}\",le=\"+Inf\"}} {count}");
            let _ = writeln!(
                out,
                "gitplane_housekeeping_duration_seconds_sum{{task=\"{name}\"}} {}",
                self.sum_ms[t].get() as f64 / 1e3
            );
            let _ = writeln!(
                out,
                "gitplane_housekeeping_duration_seconds_count{{task=\"{name}\"}} {count}"
            );
        }
        for (name, help, value) in [
            (
                "gitplane_housekeeping_queued",
                "Maintenance passes waiting for the node-wide semaphore.",
                self.queued.get(),
            ),
            (
                "gitplane_housekeeping_running",
                "Maintenance passes running.",
                self.running.get(),
            ),
            (
                "gitplane_housekeeping_peak_running",
                "Most maintenance passes seen running at once.",
                self.peak_running.load(Ordering::Relaxed),
            ),
            (
                "gitplane_housekeeping_overdue_repositories",
                "Repositories found overdue by the last sweep.",
                self.overdue.get(),
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        }
    }
}
