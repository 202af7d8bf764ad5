//! Sidecars: one pinned thread per core running a tokio current_thread runtime, for the crates
//! that need tokio (russh, lapin, the S3 client). A monoio shard and a tokio runtime cannot share
//! a thread (each blocks the other's reactor while it runs), hence a second thread per core.
//!
//! Services implement [`SidecarService`]; each runs on every sidecar inside a `LocalSet`, so
//! per-core state needs no locks. They get a [`StopSignal`] that flips to true on SIGTERM, and
//! should then stop accepting and finish in-flight work within the grace period.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

/// Flips to `true` once, when the process is told to stop.
pub type StopSignal = watch::Receiver<bool>;

/// Resolves when `stop` flips to true (or its sender is gone).
pub async fn stopped(stop: &mut StopSignal) {
    let _ = stop.wait_for(|s| *s).await;
}

/// A service run on every sidecar core.
pub trait SidecarService: Send + Sync {
    fn name(&self) -> &'static str;
    /// Runs on sidecar `core` until `stop` flips, then drains (bounded by `grace`).
    fn run(
        self: Arc<Self>,
        core: usize,
        stop: StopSignal,
        grace: Duration,
    ) -> Pin<Box<dyn Future<Output = ()>>>;
}

/// Runs one sidecar thread to completion.
pub(crate) fn run_sidecar(
    core: usize,
    services: Arc<Vec<Arc<dyn SidecarService>>>,
    stop: StopSignal,
    grace: Duration,
) -> io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        let tasks: Vec<_> = services
            .iter()
            .map(|s| {
                let name = s.name();
                let fut = Arc::clone(s).run(core, stop.clone(), grace);
                (name, tokio::task::spawn_local(fut))
            })
            .collect();
        for (name, task) in tasks {
            if let Err(e) = task.await {
                tracing::error!(core, service = name, error = %e, "sidecar service failed");
            }
        }
    });
    Ok(())
}
