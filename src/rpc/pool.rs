//! The RPC blocking pool: every libgit2 call runs here, never on a shard thread.
//!
//! Why a pool of its own rather than the shards' `monoio::spawn_blocking` pool: RPC jobs include
//! merges, diffs and 200 MB blob streams whose threads wait on a slow client. Sharing the pool
//! with smart HTTP's SQLite lookups would let a burst of those stall every clone's
//! authentication. Here the pool is sized on its own (`rpc.blocking_threads`), its queue is
//! bounded (a full queue answers UNAVAILABLE, retryable), and streaming calls may hold at most
//! half of the threads, so unary calls always find one.
//!
//! Each worker keeps a small cache of open repositories ([`super::ops::with_repo`]): a
//! `git2::Repository` is `Send` but not `Sync`, so a per-thread cache needs no lock and 64
//! concurrent `ListBranches` on one repository never contend.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use super::status::{Code, Status};

type Job = Box<dyn FnOnce() + Send>;

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("cannot start RPC worker thread: {0}")]
    Spawn(std::io::Error),
}

/// Deadline and cancellation of one call, checked by long-running jobs between steps.
#[derive(Debug, Clone)]
pub struct CallCtx {
    deadline: Option<Instant>,
    cancelled: Arc<AtomicBool>,
}

impl CallCtx {
    pub fn new(deadline: Option<Instant>) -> Self {
        Self {
            deadline,
            cancelled: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Err once the deadline has passed or the call was abandoned.
    pub fn check(&self) -> Result<(), Status> {
        if self.cancelled.load(Ordering::Relaxed) {
            return Err(Status::new(Code::Cancelled, "call cancelled"));
        }
        match self.deadline {
            Some(d) if Instant::now() >= d => Err(Status::deadline_exceeded()),
            _ => Ok(()),
        }
    }

    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Marks the call abandoned when dropped (the caller's future was dropped or finished).
    pub fn cancel_on_drop(&self) -> CancelGuard {
        CancelGuard(Arc::clone(&self.cancelled))
    }
}

pub struct CancelGuard(Arc<AtomicBool>);

impl Drop for CancelGuard {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

pub struct GitPool {
    tx: SyncSender<Job>,
    streaming: Arc<Semaphore>,
}

impl GitPool {
    /// Starts `threads` workers named `gitplane-rpc-N`; at most `max_queued` jobs wait.
    ///
    /// # Errors
    /// [`PoolError::Spawn`] if a thread cannot be started.
    pub fn start(threads: usize, max_queued: usize) -> Result<Self, PoolError> {
        let threads = threads.max(1);
        let (tx, rx) = sync_channel::<Job>(max_queued);
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads {
            let rx = Arc::clone(&rx);
            std::thread::Builder::new()
                .name(format!("gitplane-rpc-{i}"))
                .spawn(move || worker(&rx))
                .map_err(PoolError::Spawn)?;
        }
        Ok(Self {
            tx,
            streaming: Arc::new(Semaphore::new(threads.div_ceil(2))),
        })
    }

    /// Runs `f` on a worker and waits for its result without blocking the shard.
    ///
    /// # Errors
    /// UNAVAILABLE when the queue is full, INTERNAL if the job panicked.
    pub async fn run<R, F>(&self, f: F) -> Result<R, Status>
    where
        R: Send + 'static,
        F: FnOnce() -> R + Send + 'static,
    {
        self.submit(f)?.await
    }

    /// Queues `f` now; the returned future (which borrows nothing) resolves to its result.
    ///
    /// # Errors
    /// UNAVAILABLE when the queue is full; the future gives INTERNAL if the job panicked.
    pub fn submit<R, F>(
        &self,
        f: F,
    ) -> Result<impl std::future::Future<Output = Result<R, Status>> + 'static, Status>
    where
        R: Send + 'static,
        F: FnOnce() -> R + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move || {
            // A panic inside libgit2 glue must not take a worker down with it.
            let r = std::panic::catch_unwind(AssertUnwindSafe(f));
            let _ = tx.send(r);
        });
        match self.tx.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                return Err(Status::new(
                    Code::Unavailable,
                    "the RPC worker queue is full; retry later",
                ))
            }
            Err(TrySendError::Disconnected(_)) => {
                return Err(Status::new(
                    Code::Unavailable,
                    "the RPC workers have stopped",
                ))
            }
        }
        Ok(async move {
            match rx.await {
                Ok(Ok(r)) => Ok(r),
                Ok(Err(_)) => Err(Status::internal("the RPC worker failed (panic)")),
                Err(_) => Err(Status::internal("the RPC worker dropped the call")),
            }
        })
    }

    /// A slot for a streaming job; waits while half the workers are streaming.
    pub async fn streaming_slot(&self) -> Result<OwnedSemaphorePermit, Status> {
        Arc::clone(&self.streaming)
            .acquire_owned()
            .await
            .map_err(|_| Status::new(Code::Unavailable, "the RPC workers have stopped"))
    }
}

fn worker(rx: &Mutex<Receiver<Job>>) {
    loop {
        let job = {
            let guard = rx.lock().unwrap_or_else(|p| p.into_inner());
            guard.recv()
        };
        match job {
            Ok(job) => job(),
            Err(_) => return,
        }
    }
}
