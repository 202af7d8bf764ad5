//! The two runtimes a load can run on, behind the few calls the runner needs: monoio (io_uring,
//! with epoll as the fallback) for the HTTP/1.1, git:// and LFS clients, and a tokio
//! current_thread runtime with a `LocalSet` for SSH and gRPC, whose crates (russh, h2) are
//! tokio-bound. Either way there is one runtime per load thread and tasks never leave it.

use std::future::Future;
use std::time::{Duration, Instant};

pub trait Rt: 'static {
    /// Builds a runtime on the calling thread and runs `f` to completion on it.
    ///
    /// # Errors
    /// When the runtime cannot be built (e.g. neither io_uring nor epoll is available).
    fn block_on<F: Future>(f: F) -> std::io::Result<F::Output>;

    /// Starts `f` as a task of the current runtime. The returned future resolves when the task
    /// has ended; dropping it leaves the task running.
    fn spawn<F: Future<Output = ()> + 'static>(f: F) -> impl Future<Output = ()>;

    fn sleep_until(t: Instant) -> impl Future<Output = ()>;

    /// `f`'s output, or `None` when it did not finish within `d` (it is then dropped).
    fn timeout<F: Future>(d: Duration, f: F) -> impl Future<Output = Option<F::Output>>;
}

/// monoio with its fusion driver: io_uring where the kernel allows it, else epoll.
pub struct Monoio;

impl Rt for Monoio {
    fn block_on<F: Future>(f: F) -> std::io::Result<F::Output> {
        let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
            .enable_timer()
            .with_entries(1024)
            .build()?;
        Ok(rt.block_on(f))
    }

    fn spawn<F: Future<Output = ()> + 'static>(f: F) -> impl Future<Output = ()> {
        monoio::spawn(f)
    }

    fn sleep_until(t: Instant) -> impl Future<Output = ()> {
        monoio::time::sleep_until(t.into())
    }

    fn timeout<F: Future>(d: Duration, f: F) -> impl Future<Output = Option<F::Output>> {
        let t = monoio::time::timeout(d, f);
        async move { t.await.ok() }
    }
}

/// tokio current_thread with a `LocalSet`, so tasks need not be `Send`.
pub struct Tokio;

impl Rt for Tokio {
    fn block_on<F: Future>(f: F) -> std::io::Result<F::Output> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(tokio::task::LocalSet::new().block_on(&rt, f))
    }

    fn spawn<F: Future<Output = ()> + 'static>(f: F) -> impl Future<Output = ()> {
        let task = tokio::task::spawn_local(f);
        // A task that panicked has nothing to give back; the runner counts what it recorded.
        async move {
            let _ = task.await;
        }
    }

    fn sleep_until(t: Instant) -> impl Future<Output = ()> {
        tokio::time::sleep_until(tokio::time::Instant::from_std(t))
    }

    fn timeout<F: Future>(d: Duration, f: F) -> impl Future<Output = Option<F::Output>> {
        let t = tokio::time::timeout(d, f);
        async move { t.await.ok() }
    }
}
