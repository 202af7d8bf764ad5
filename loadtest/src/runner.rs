//! Runs a load: one runtime per `--threads` (monoio or tokio, as the [`Workload`] needs), each
//! driving its share of the virtual clients, closed-loop (`Closed`: N clients, each starting its next iteration when the last ends)
//! or open-loop (`Open`: iterations start on a fixed schedule whatever the server does, and their
//! latency counts from the scheduled start, so a stalled server cannot hide its queueing: no
//! coordinated omission). Every run is bounded by a deadline and/or an iteration budget, shared
//! by all threads through atomics; the per-iteration work records into thread-local
//! [`Recorder`]s that are merged at the end.

use std::cell::{Cell, RefCell};
use std::io::IsTerminal;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::runtime::Rt;
use crate::scenario::{IterError, Iteration, Workload};
use crate::stats::Recorder;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    Closed { concurrency: usize },
    Open { rate: f64, max_in_flight: usize },
}

/// A validated run: at least one bound, at least one thread.
pub struct Plan {
    pub mode: Mode,
    /// Give up on one iteration after this long.
    pub timeout: Duration,
    pub threads: usize,
    pub duration: Option<Duration>,
    pub requests: Option<u64>,
    /// Packs to keep for `--verify` (0: none).
    pub verify_samples: usize,
    /// CPUs to pin the runtime threads to, round-robin (empty: no pinning).
    pub cpus: Vec<usize>,
    pub progress: bool,
}

#[derive(Debug, Error)]
pub enum RunError {
    #[error("starting runtime thread {thread}: {source}")]
    Runtime {
        thread: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("runtime thread {thread} panicked")]
    Panicked { thread: usize },
}

/// What the run produced.
pub struct RunOutput {
    pub recorder: Recorder,
    pub elapsed: Duration,
    /// Packs captured for `--verify`.
    pub packs: Vec<Vec<u8>>,
}

/// Shared bounds and live counters (the progress line reads these).
struct Control {
    deadline: Option<Instant>,
    budget: Option<u64>,
    issued: AtomicU64,
    done: AtomicU64,
    failed: AtomicU64,
    bytes: AtomicU64,
    samples_left: AtomicUsize,
}

impl Control {
    /// Claims the right to start one more iteration.
    fn claim(&self) -> bool {
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            return false;
        }
        let n = self.issued.fetch_add(1, Ordering::Relaxed);
        self.budget.is_none_or(|b| n < b)
    }

    fn take_sample(&self) -> bool {
        self.samples_left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
    }
}

/// Per-thread state shared by that thread's tasks (single-threaded: `Rc`).
struct Local<W: Workload> {
    work: Arc<W>,
    control: Arc<Control>,
    timeout: Duration,
    rec: RefCell<Recorder>,
    packs: RefCell<Vec<Vec<u8>>>,
    /// Free slots (push branch names); a slot is held by one iteration at a time.
    free_slots: RefCell<Vec<usize>>,
    next_slot: Cell<usize>,
    thread: usize,
    in_flight: Cell<usize>,
}

impl<W: Workload> Local<W> {
    /// One iteration of `client` whose latency counts from `scheduled`.
    async fn iterate(&self, client: &W::Client, scheduled: Instant) {
        let slot = self.free_slots.borrow_mut().pop().unwrap_or_else(|| {
            let s = self.next_slot.get();
            self.next_slot.set(s + 1);
            s
        });
        let name = format!("t{}-{slot}", self.thread);
        let capture = self.control.take_sample();
        let it = Iteration {
            slot: &name,
            capture,
        };
        let result = W::Rt::timeout(self.timeout, self.work.iterate(client, it))
            .await
            .unwrap_or(Err(IterError::Timeout(self.timeout)));
        self.free_slots.borrow_mut().push(slot);
        let end = Instant::now();
        match result {
            Ok(out) => {
                self.rec.borrow_mut().success(
                    end,
                    end.saturating_duration_since(scheduled),
                    out.bytes,
                );
                if let Some(v) = out.protocol {
                    self.rec.borrow_mut().protocol(v);
                }
                self.control.done.fetch_add(1, Ordering::Relaxed);
                self.control.bytes.fetch_add(out.bytes, Ordering::Relaxed);
                if let Some(p) = out.pack {
                    self.packs.borrow_mut().push(p);
                }
            }
            Err(e) => {
                if capture {
                    // Give the sample back: a failed iteration has no pack to check.
                    self.control.samples_left.fetch_add(1, Ordering::Relaxed);
                }
                self.rec.borrow_mut().failure(end, &e.kind(), e.to_string());
                self.control.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Runs `plan` with `work` and returns the merged measurements.
///
/// # Errors
/// When a runtime cannot start (e.g. io_uring and epoll both unavailable) or a thread panics.
pub fn run<W: Workload>(work: W, plan: &Plan) -> Result<RunOutput, RunError> {
    let start = Instant::now();
    let control = Arc::new(Control {
        deadline: plan.duration.map(|d| start + d),
        budget: plan.requests,
        issued: AtomicU64::new(0),
        done: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        bytes: AtomicU64::new(0),
        samples_left: AtomicUsize::new(plan.verify_samples),
    });
    let work = Arc::new(work);
    let finished = Arc::new(AtomicBool::new(false));
    let progress = plan
        .progress
        .then(|| spawn_progress(control.clone(), finished.clone(), plan, start));

    let mut handles = Vec::new();
    for thread in 0..plan.threads {
        let mode = match plan.mode {
            Mode::Closed { concurrency } => Mode::Closed {
                concurrency: share(concurrency, plan.threads, thread),
            },
            Mode::Open {
                rate,
                max_in_flight,
            } => Mode::Open {
                rate: rate / plan.threads as f64,
                max_in_flight: share(max_in_flight, plan.threads, thread).max(1),
            },
        };
        let cpu = (!plan.cpus.is_empty()).then(|| plan.cpus[thread % plan.cpus.len()]);
        let (work, control, timeout) = (work.clone(), control.clone(), plan.timeout);
        let h = std::thread::Builder::new()
            .name(format!("load-{thread}"))
            .spawn(move || thread_main(thread, cpu, mode, work, control, timeout, start))
            .map_err(|source| RunError::Runtime { thread, source })?;
        handles.push(h);
    }
    let mut recorder = Recorder::new(start);
    let mut packs = Vec::new();
    let mut first_err = None;
    for (thread, h) in handles.into_iter().enumerate() {
        match h.join() {
            Ok(Ok((rec, p))) => {
                recorder.merge(&rec);
                packs.extend(p);
            }
            Ok(Err(e)) => first_err = first_err.or(Some(e)),
            Err(_) => first_err = first_err.or(Some(RunError::Panicked { thread })),
        }
    }
    let elapsed = start.elapsed();
    finished.store(true, Ordering::Relaxed);
    if let Some(p) = progress {
        let _ = p.join();
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(RunOutput {
            recorder,
            elapsed,
            packs,
        }),
    }
}

/// Thread `i`'s share of `total` split over `n` threads.
fn share(total: usize, n: usize, i: usize) -> usize {
    total / n + usize::from(i < total % n)
}

fn thread_main<W: Workload>(
    thread: usize,
    cpu: Option<usize>,
    mode: Mode,
    work: Arc<W>,
    control: Arc<Control>,
    timeout: Duration,
    start: Instant,
) -> Result<(Recorder, Vec<Vec<u8>>), RunError> {
    if let Some(cpu) = cpu {
        pin_to(cpu);
    }
    let local = Rc::new(Local {
        work,
        control,
        timeout,
        rec: RefCell::new(Recorder::new(start)),
        packs: RefCell::new(Vec::new()),
        free_slots: RefCell::new(Vec::new()),
        next_slot: Cell::new(0),
        thread,
        in_flight: Cell::new(0),
    });
    let l = local.clone();
    W::Rt::block_on(async move {
        match mode {
            Mode::Closed { concurrency } => closed_loop(l, concurrency).await,
            Mode::Open {
                rate,
                max_in_flight,
            } => open_loop(l, rate, max_in_flight).await,
        }
    })
    .map_err(|source| RunError::Runtime { thread, source })?;
    let rec = local.rec.borrow().clone();
    let packs = std::mem::take(&mut *local.packs.borrow_mut());
    Ok((rec, packs))
}

/// Each client runs its iterations one after the other, with its own state.
async fn closed_loop<W: Workload>(local: Rc<Local<W>>, concurrency: usize) {
    let mut tasks = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let l = local.clone();
        tasks.push(W::Rt::spawn(async move {
            let client = l.work.client();
            while l.control.claim() {
                l.iterate(&client, Instant::now()).await;
            }
        }));
    }
    for t in tasks {
        t.await;
    }
}

/// Iterations start on the schedule and share the thread's one client state.
async fn open_loop<W: Workload>(local: Rc<Local<W>>, rate: f64, max_in_flight: usize) {
    if rate <= 0.0 {
        return;
    }
    let client = Rc::new(local.work.client());
    let interval = Duration::from_secs_f64(1.0 / rate);
    let mut next = Instant::now();
    loop {
        W::Rt::sleep_until(next).await;
        if !local.control.claim() {
            break;
        }
        let scheduled = next;
        next += interval;
        if local.in_flight.get() >= max_in_flight {
            // Open loop means the schedule does not wait for the server; past the cap, count
            // the start as failed instead of piling up unbounded work in the generator.
            local.rec.borrow_mut().failure(
                Instant::now(),
                "client_overload",
                format!("more than {max_in_flight} iterations in flight on one thread"),
            );
            local.control.failed.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        local.in_flight.set(local.in_flight.get() + 1);
        let (l, c) = (local.clone(), client.clone());
        // Detached: the loop below waits for the in-flight count instead.
        drop(W::Rt::spawn(async move {
            l.iterate(&c, scheduled).await;
            l.in_flight.set(l.in_flight.get() - 1);
        }));
    }
    while local.in_flight.get() > 0 {
        W::Rt::sleep_until(Instant::now() + Duration::from_millis(2)).await;
    }
}

/// Pins the calling thread to `cpu` (best effort: a failure only costs stability).
fn pin_to(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; CPU_SET bounds-checks against its size in libc.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            eprintln!("gitplane-load: could not pin a thread to CPU {cpu}");
        }
    }
}

fn spawn_progress(
    control: Arc<Control>,
    finished: Arc<AtomicBool>,
    plan: &Plan,
    start: Instant,
) -> std::thread::JoinHandle<()> {
    let (duration, requests) = (plan.duration, plan.requests);
    std::thread::spawn(move || {
        let tty = std::io::stderr().is_terminal();
        // A terminal gets a line redrawn in place every second; a log gets a line every 5 s.
        let every = if tty { 1 } else { 5 };
        let mut last_done = 0;
        let mut tick = 0u64;
        while !finished.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(200));
            tick += 1;
            if tick % (5 * every) != 0 {
                continue;
            }
            let done = control.done.load(Ordering::Relaxed);
            let failed = control.failed.load(Ordering::Relaxed);
            let elapsed = start.elapsed();
            let frac = match (duration, requests) {
                (Some(d), Some(r)) => {
                    (elapsed.as_secs_f64() / d.as_secs_f64()).max((done + failed) as f64 / r as f64)
                }
                (Some(d), None) => elapsed.as_secs_f64() / d.as_secs_f64(),
                (None, Some(r)) => (done + failed) as f64 / r as f64,
                (None, None) => 0.0,
            }
            .min(1.0);
            let filled = (frac * 20.0) as usize;
            let line = format!(
                "[{}{}] {:>3.0}% {:>6.1}s  ok {done}  errors {failed}  {:.1}/s  {:.1} MB",
                "#".repeat(filled),
                "-".repeat(20 - filled),
                frac * 100.0,
                elapsed.as_secs_f64(),
                (done - last_done) as f64 / every as f64,
                control.bytes.load(Ordering::Relaxed) as f64 / 1e6,
            );
            last_done = done;
            if tty {
                eprint!("\r{line}");
            } else {
                eprintln!("{line}");
            }
        }
        if tty {
            eprintln!();
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_add_up() {
        for total in [0, 1, 7, 64, 1001] {
            for n in 1..6 {
                assert_eq!((0..n).map(|i| share(total, n, i)).sum::<usize>(), total);
            }
        }
    }
}
