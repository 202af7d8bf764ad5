//! The per-core job runner shared by the AMQP consumers and the embedded dispatcher: for one
//! (event, job) it checks the completion record (idempotency by event id), takes a permit of the
//! core's semaphore for that job type (Backlog's lesson: heavy jobs need a concurrency cap), runs
//! the job, retries failures with exponential backoff up to `max_attempts`, and records the end:
//! `done`, or `dead` when the last attempt failed (the caller then dead-letters the message).
//!
//! A permit is held only while an attempt runs, never during a backoff sleep, so a failing
//! receiver does not starve healthy deliveries.

use std::cell::Cell;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Semaphore;

use super::db::{DbError, HookDb};
use super::event::PushEvent;
use super::jobs::{self, JobContext, JobKind};
use crate::config::HookConfig;
use crate::metrics::METRICS;
use crate::runtime::sidecar::{stopped, StopSignal};

/// How a job ended for one delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Ran and succeeded now.
    Done,
    /// A copy already finished (done or dead-lettered) earlier: nothing ran.
    AlreadyDone,
    /// Every attempt failed; recorded as dead.
    DeadLettered,
    /// The server is stopping; the job did not finish and will be redelivered.
    Stopped,
}

/// Process-wide state of the workers.
pub struct Shared {
    pub config: HookConfig,
    pub db: HookDb,
    pub jobs: JobContext,
    /// (event id, job) pairs running in this process. A redelivered copy that arrives while the
    /// original still runs (possible after a reconnect) waits instead of running twice.
    inflight: Mutex<HashSet<(String, JobKind)>>,
}

impl Shared {
    pub fn new(config: HookConfig, db: HookDb, jobs: JobContext) -> Self {
        Self {
            config,
            db,
            jobs,
            inflight: Mutex::new(HashSet::new()),
        }
    }

    fn claim(self: &Arc<Self>, event: &str, job: JobKind) -> Option<Claim> {
        let key = (event.to_owned(), job);
        let mut set = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        if set.insert(key.clone()) {
            Some(Claim {
                shared: Arc::clone(self),
                key,
            })
        } else {
            None
        }
    }
}

struct Claim {
    shared: Arc<Shared>,
    key: (String, JobKind),
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.shared
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
    }
}

/// Delay before retry number `retry` (1-based): initial * 2^(retry-1), capped.
pub fn backoff(initial: Duration, max: Duration, retry: u32) -> Duration {
    let factor = 1u32
        .checked_shl(retry.saturating_sub(1))
        .unwrap_or(u32::MAX);
    initial.saturating_mul(factor).min(max)
}

/// One core's workers: a semaphore and a running count per job type.
pub struct Worker {
    pub core: usize,
    pub shared: Arc<Shared>,
    semaphores: [Semaphore; 5],
    running: [Cell<i64>; 5],
    stop: StopSignal,
}

impl Worker {
    pub fn new(core: usize, shared: Arc<Shared>, stop: StopSignal) -> Self {
        let c = shared.config.concurrency;
        let sem = |j: JobKind| Semaphore::new(j.limit(&c).max(1));
        Self {
            core,
            semaphores: [
                sem(JobKind::DiskUsage),
                sem(JobKind::Webhooks),
                sem(JobKind::Indexing),
                sem(JobKind::Noop),
                sem(JobKind::Housekeeping),
            ],
            running: Default::default(),
            shared,
            stop,
        }
    }

    pub fn db(&self) -> &HookDb {
        &self.shared.db
    }

    /// Runs `job` for `event` to its end (see [`Outcome`]). An error means the outcome could not
    /// be recorded; the caller should hand the message back for a later try.
    pub async fn process(&self, event: &PushEvent, job: JobKind) -> Result<Outcome, DbError> {
        let m = &METRICS.hooks.jobs[job.index()];
        let mut stop = self.stop.clone();
        let claim = loop {
            if let Some(c) = self.shared.claim(&event.id, job) {
                break c;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                _ = stopped(&mut stop) => return Ok(Outcome::Stopped),
            }
        };
        let (ev, name) = (event.id.clone(), job.name());
        if self
            .db()
            .call(move |s| s.job_status(&ev, name))
            .await?
            .is_some()
        {
            m.duplicates.inc();
            return Ok(Outcome::AlreadyDone);
        }
        let cfg = &self.shared.config;
        let sem = &self.semaphores[job.index()];
        let mut attempt = 1u32;
        loop {
            let permit = match sem.try_acquire() {
                Ok(p) => p,
                Err(_) => {
                    m.semaphore_waits.inc();
                    tokio::select! {
                        p = sem.acquire() => match p {
                            Ok(p) => p,
                            Err(_) => return Ok(Outcome::Stopped),
                        },
                        _ = stopped(&mut stop) => return Ok(Outcome::Stopped),
                    }
                }
            };
            let running = &self.running[job.index()];
            running.set(running.get() + 1);
            m.running.inc();
            m.note_running(self.core, running.get());
            let result = jobs::run(job, &self.shared.jobs, event, attempt).await;
            running.set(running.get() - 1);
            m.running.dec();
            drop(permit);
            let error = match result {
                Ok(()) => {
                    let ev = event.id.clone();
                    self.db()
                        .call(move |s| s.record_job(&ev, name, "done", attempt, None))
                        .await?;
                    m.succeeded.inc();
                    drop(claim);
                    return Ok(Outcome::Done);
                }
                Err(e) => e,
            };
            m.failed.inc();
            if !error.retryable() || attempt >= cfg.max_attempts {
                tracing::warn!(event = %event.id, repo = %event.repository, job = name, attempt, error = %error, "job failed for good: dead-lettered");
                let (ev, text) = (event.id.clone(), error.to_string());
                self.db()
                    .call(move |s| s.record_job(&ev, name, "dead", attempt, Some(&text)))
                    .await?;
                m.dead_lettered.inc();
                drop(claim);
                return Ok(Outcome::DeadLettered);
            }
            let delay = backoff(cfg.backoff_initial, cfg.backoff_max, attempt);
            tracing::debug!(event = %event.id, job = name, attempt, error = %error, ?delay, "job failed; retrying");
            m.retried.inc();
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stopped(&mut stop) => return Ok(Outcome::Stopped),
            }
            attempt += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let (i, m) = (Duration::from_millis(100), Duration::from_secs(1));
        assert_eq!(backoff(i, m, 1), Duration::from_millis(100));
        assert_eq!(backoff(i, m, 2), Duration::from_millis(200));
        assert_eq!(backoff(i, m, 4), Duration::from_millis(800));
        assert_eq!(backoff(i, m, 5), m);
        assert_eq!(backoff(i, m, 100), m);
    }
}
