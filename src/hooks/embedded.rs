//! Embedded mode (no `--amqp-url`): the outbox itself is the queue. A dispatcher on core 0 reads
//! outbox rows in id order and hands each (event, job) to the cores round-robin over bounded
//! channels; every core runs them with the same [`Worker`] (semaphores, retries, dead-lettering)
//! as the AMQP consumers. A row is deleted only when every job of its event finished (done or
//! dead), so a crash loses nothing: on restart the remaining rows are dispatched again and jobs
//! already recorded as finished are skipped.
//!
//! Only core 0 reads the outbox: one reader needs no claim protocol, and reading is cheap next to
//! running the jobs, which every core does.

use std::cell::Cell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::event::PushEvent;
use super::jobs::JobKind;
use super::poll::IdleBackoff;
use super::worker::{Outcome, Worker};
use crate::metrics::METRICS;
use crate::runtime::sidecar::{stopped, StopSignal};

/// Per-core queue of dispatched jobs.
const CHANNEL: usize = 4096;

/// One (event, job) handed to a core.
pub struct Task {
    row_id: i64,
    event: Arc<PushEvent>,
    job: JobKind,
    done: mpsc::UnboundedSender<i64>,
}

/// The per-core channels, made before the cores start.
pub struct Queues {
    senders: Vec<mpsc::Sender<Task>>,
    receivers: Vec<Mutex<Option<mpsc::Receiver<Task>>>>,
}

impl Queues {
    pub fn new(cores: usize) -> Self {
        let (senders, receivers) = (0..cores.max(1))
            .map(|_| {
                let (tx, rx) = mpsc::channel(CHANNEL);
                (tx, Mutex::new(Some(rx)))
            })
            .unzip();
        Self { senders, receivers }
    }

    fn take(&self, core: usize) -> Option<mpsc::Receiver<Task>> {
        self.receivers
            .get(core)?
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }
}

/// Runs one core: its share of the jobs, plus the dispatcher on core 0.
pub async fn run_core(worker: Rc<Worker>, queues: Arc<Queues>, stop: StopSignal, grace: Duration) {
    let Some(mut rx) = queues.take(worker.core) else {
        tracing::error!(core = worker.core, "hook queue already taken");
        return;
    };
    let dispatcher = (worker.core == 0).then(|| {
        tokio::task::spawn_local(dispatch(
            Rc::clone(&worker),
            queues.senders.clone(),
            stop.clone(),
        ))
    });
    let inflight = Rc::new(Cell::new(0usize));
    let mut stop_wait = stop.clone();
    loop {
        let task = tokio::select! {
            t = rx.recv() => match t { Some(t) => t, None => break },
            _ = stopped(&mut stop_wait) => break,
        };
        inflight.set(inflight.get() + 1);
        let (worker, inflight, mut stop) = (Rc::clone(&worker), Rc::clone(&inflight), stop.clone());
        tokio::task::spawn_local(async move {
            loop {
                match worker.process(&task.event, task.job).await {
                    Ok(Outcome::Stopped) => break,
                    Ok(_) => {
                        let _ = task.done.send(task.row_id);
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(event = %task.event.id, job = task.job.name(), error = %e, "cannot record the job's end; trying again");
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                            _ = stopped(&mut stop) => break,
                        }
                    }
                }
            }
            inflight.set(inflight.get() - 1);
        });
    }
    // Running attempts finish (their events' rows stay unless every job ended); bounded by grace.
    let deadline = Instant::now() + grace;
    while inflight.get() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if let Some(d) = dispatcher {
        let _ = d.await;
    }
}

/// Core 0: outbox rows -> (event, job) tasks; finished events -> rows deleted.
async fn dispatch(worker: Rc<Worker>, cores: Vec<mpsc::Sender<Task>>, mut stop: StopSignal) {
    if !super::lease::acquire(&mut stop).await {
        return;
    }
    let cfg = &worker.shared.config;
    let db = worker.db().clone();
    let jobs = JobKind::enabled(&cfg.concurrency);
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<i64>();
    // Outbox row -> jobs of its event still running.
    let mut pending: HashMap<i64, usize> = HashMap::new();
    let max_pending = usize::from(cfg.prefetch).saturating_mul(cores.len()).max(1);
    let mut last_id = 0i64;
    let mut next_core = 0usize;
    let mut finished: Vec<i64> = Vec::new();
    let mut depth_at = Instant::now()
        .checked_sub(Duration::from_secs(1))
        .unwrap_or_else(Instant::now);
    let mut idle = IdleBackoff::default();
    loop {
        while let Ok(id) = done_rx.try_recv() {
            finish(&mut pending, &mut finished, id);
        }
        if !finished.is_empty() {
            let ids = std::mem::take(&mut finished);
            if let Err(e) = db.call(move |s| s.outbox_delete(&ids)).await {
                // The rows come back after a restart; their jobs are recorded as finished.
                tracing::warn!(error = %e, "cannot delete finished outbox rows");
            }
        }
        if depth_at.elapsed() >= Duration::from_millis(500) {
            depth_at = Instant::now();
            if let Ok(n) = db.call(|s| s.outbox_depth()).await {
                METRICS
                    .hooks
                    .outbox_depth
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            }
        }
        if *stop.borrow() {
            return;
        }
        let room = max_pending.saturating_sub(pending.len());
        let mut got = 0;
        if room > 0 {
            let limit = room.min(cfg.relay_batch);
            match db.call(move |s| s.outbox_after(last_id, limit)).await {
                Ok(rows) => {
                    got = rows.len();
                    for row in rows {
                        last_id = row.id;
                        let event = match PushEvent::from_json(row.payload.as_bytes()) {
                            Ok(e) => Arc::new(e),
                            Err(e) => {
                                tracing::error!(row = row.id, event = %row.event_id, error = %e, "unreadable outbox event dropped");
                                finished.push(row.id);
                                continue;
                            }
                        };
                        if jobs.is_empty() {
                            finished.push(row.id);
                            continue;
                        }
                        pending.insert(row.id, jobs.len());
                        for &job in &jobs {
                            let task = Task {
                                row_id: row.id,
                                event: Arc::clone(&event),
                                job,
                                done: done_tx.clone(),
                            };
                            next_core = (next_core + 1) % cores.len();
                            let Some(core) = cores.get(next_core) else {
                                continue;
                            };
                            // A full channel waits, but never past a stop (the cores are gone).
                            let sent = tokio::select! {
                                r = core.send(task) => r.is_ok(),
                                _ = stopped(&mut stop) => false,
                            };
                            if !sent {
                                return;
                            }
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot read the outbox"),
            }
        }
        if got > 0 {
            idle.found();
        } else {
            tokio::select! {
                id = done_rx.recv() => if let Some(id) = id { finish(&mut pending, &mut finished, id) },
                _ = tokio::time::sleep(idle.empty()) => {}
                _ = stopped(&mut stop) => return,
            }
        }
    }
}

fn finish(pending: &mut HashMap<i64, usize>, finished: &mut Vec<i64>, id: i64) {
    if let Some(left) = pending.get_mut(&id) {
        *left = left.saturating_sub(1);
        if *left == 0 {
            pending.remove(&id);
            finished.push(id);
        }
    }
}
