//! Repository housekeeping (issue #12): repositories that grow by push stay as cheap to serve as
//! freshly repacked ones, and no push ever waits for maintenance (no git runs `gc --auto`).
//!
//! Data flow:
//! - every push event reaches the `housekeeping` hook job ([`crate::hooks::jobs`]), which counts
//!   the push in the repository's [`state`] and asks the [`Housekeeper`] for a pass;
//! - the [`Housekeeper`] folds requests per repository (single-flight: a request while a pass
//!   runs makes that pass run once more, it does not queue another), then waits for a permit of
//!   the node-wide semaphore;
//! - a pass ([`run`]) reads [`stats`] from `objects/` and `refs/`, lets [`plan`] pick the tasks
//!   (geometric or full repack with a multi-pack-index bitmap and cruft pack, commit-graph,
//!   pack-refs, stale files) and runs git at low CPU and I/O priority;
//! - [`HousekeepingService`] sweeps every repository periodically for overdue ones and cancels
//!   running passes on shutdown;
//! - `gitplane repo maintain` and gRPC `OptimizeRepository` run a pass on demand.
//!
//! docs/HOUSEKEEPING.md explains the heuristic and its thresholds.

pub mod metrics;
pub mod plan;
pub mod run;
pub mod state;
pub mod stats;

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::Semaphore;

use crate::config::HousekeepingConfig;
use crate::runtime::sidecar::{stopped, SidecarService, StopSignal};
use metrics::HOUSEKEEPING;
pub use run::Report;

#[derive(Debug, thiserror::Error)]
pub enum HousekeepingError {
    #[error("{what} in {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("`git {args}` in {repo}: {message}")]
    Git {
        repo: PathBuf,
        args: String,
        message: String,
    },
    #[error("maintenance stopped: the server is shutting down")]
    Cancelled,
    #[error("maintenance task failed: {0}")]
    Join(String),
}

/// A pending request for a repository whose pass is already running.
#[derive(Debug, Default, Clone, Copy)]
struct Pending {
    again: bool,
    full: bool,
}

/// The node's maintenance scheduler: one per process, shared by every core.
pub struct Housekeeper {
    config: HousekeepingConfig,
    git: PathBuf,
    repos: PathBuf,
    permits: Semaphore,
    /// Repositories with a pass running, and whether another was asked for meanwhile.
    inflight: Mutex<HashMap<PathBuf, Pending>>,
    cancel: Arc<AtomicBool>,
}

/// What a request led to.
#[derive(Debug)]
pub enum Requested {
    /// This request ran the pass (the last one, if it ran more than once).
    Ran(Report),
    /// A pass was already running: it runs once more after it ends, covering this request.
    Folded,
}

impl Housekeeper {
    /// `repos` is `DATA/repos`.
    pub fn new(config: HousekeepingConfig, git: PathBuf, repos: PathBuf) -> Self {
        Self {
            permits: Semaphore::new(config.max_concurrent),
            config,
            git,
            repos,
            inflight: Mutex::new(HashMap::new()),
            cancel: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Counts a push to `dir` and maintains it if the heuristic says so.
    pub async fn after_push(&self, dir: PathBuf) -> Result<(), HousekeepingError> {
        let d = dir.clone();
        let counted = blocking(move || {
            if !d.exists() {
                // Deleted since the push: nothing to maintain.
                return Ok(false);
            }
            state::update(&d, |s| {
                s.pushes_since_run += 1;
                s.pushes_since_full += 1;
                s.pushes_since_graph += 1;
                s.pushes_since_repack += 1;
            })
            .map(|_| true)
            .map_err(|source| HousekeepingError::Io {
                what: "counting a push",
                path: d.clone(),
                source,
            })
        })
        .await?;
        if counted {
            self.request(dir, false).await?;
        }
        Ok(())
    }

    /// Runs a pass on `dir` once a permit is free, or folds into the one running.
    pub async fn request(&self, dir: PathBuf, full: bool) -> Result<Requested, HousekeepingError> {
        {
            let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(p) = inflight.get_mut(&dir) {
                p.again = true;
                p.full |= full;
                return Ok(Requested::Folded);
            }
            inflight.insert(dir.clone(), Pending::default());
        }
        let mut inflight_entry = Inflight {
            hk: self,
            dir: &dir,
            armed: true,
        };
        let mut full = full;
        loop {
            let report = self.pass(&dir, full).await?;
            let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            let p = inflight.entry(dir.clone()).or_default();
            if !p.again {
                // Under the same lock as the check: a request arriving after it starts a pass of
                // its own instead of folding into this one, which is ending (it was lost).
                inflight.remove(&dir);
                inflight_entry.armed = false;
                return Ok(Requested::Ran(report));
            }
            full = p.full;
            *p = Pending::default();
        }
    }

    async fn pass(&self, dir: &Path, full: bool) -> Result<Report, HousekeepingError> {
        HOUSEKEEPING.queued.inc();
        let permit = self.permits.acquire().await;
        HOUSEKEEPING.queued.dec();
        let _permit = permit.map_err(|_| HousekeepingError::Cancelled)?;
        if self.cancel.load(Ordering::Relaxed) {
            return Err(HousekeepingError::Cancelled);
        }
        HOUSEKEEPING.started();
        let (config, git, cancel, d) = (
            self.config.clone(),
            self.git.clone(),
            Arc::clone(&self.cancel),
            dir.to_owned(),
        );
        let result = blocking(move || {
            run::Runner {
                config: &config,
                git: &git,
                cancel: &cancel,
            }
            .maintain(&d, full)
        })
        .await;
        HOUSEKEEPING.ended();
        match &result {
            Ok(r) if !r.tasks.is_empty() => {
                tracing::info!(repo = %dir.display(), tasks = ?r.tasks, reasons = ?r.plan.reasons, "repository maintained")
            }
            Err(e) => tracing::warn!(repo = %dir.display(), error = %e, "maintenance failed"),
            Ok(_) => {}
        }
        result
    }

    /// Stops: running passes kill their git, waiting ones give up.
    pub fn stop(&self) {
        self.cancel.store(true, Ordering::Relaxed);
        self.permits.close();
    }

    /// Every `DATA/repos/OWNER/NAME.git` with pushes not maintained for `overdue`.
    fn overdue(&self) -> Vec<PathBuf> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut found = Vec::new();
        let Ok(owners) = std::fs::read_dir(&self.repos) else {
            return found;
        };
        for owner in owners.filter_map(Result::ok) {
            let Ok(repos) = std::fs::read_dir(owner.path()) else {
                continue;
            };
            for repo in repos.filter_map(Result::ok) {
                let dir = repo.path();
                if dir.extension().is_none_or(|e| e != "git") {
                    continue;
                }
                let Ok(s) = state::read(&dir) else { continue };
                if s.pushes_since_run > 0
                    && now.saturating_sub(s.last_run) >= self.config.overdue.as_secs()
                {
                    found.push(dir);
                }
            }
        }
        found
    }

    /// One sweep: maintains every overdue repository, one after another.
    async fn sweep(&self) {
        let repos = self.overdue();
        HOUSEKEEPING.overdue.set(repos.len() as i64);
        for dir in repos {
            if self.cancel.load(Ordering::Relaxed) {
                return;
            }
            if let Err(e) = self.request(dir, false).await {
                tracing::warn!(error = %e, "sweep: maintenance failed");
            }
        }
    }
}

/// `gitplane repo maintain OWNER/NAME [--full]`: one pass now, in this process (the repository's
/// maintenance lock keeps it from overlapping a pass of the server).
pub fn maintain_now(
    data_dir: &Path,
    git: &Path,
    config: &HousekeepingConfig,
    name: &str,
    full: bool,
) -> Result<Report, HousekeepingError> {
    let repo = crate::git::repo_name::RepoName::parse(name).map_err(|e| HousekeepingError::Io {
        what: "naming the repository",
        path: PathBuf::from(name),
        source: io::Error::new(io::ErrorKind::InvalidInput, e.to_string()),
    })?;
    let dir = crate::git::repo::RepoRoot::new(data_dir).path_of(&repo);
    if !dir.join("objects").is_dir() {
        return Err(HousekeepingError::Io {
            what: "opening the repository",
            path: dir,
            source: io::ErrorKind::NotFound.into(),
        });
    }
    let cancel = AtomicBool::new(false);
    run::Runner {
        config,
        git,
        cancel: &cancel,
    }
    .maintain(&dir, full)
}

/// Removes a repository from the in-flight set when its pass ends early (error, cancel, panic);
/// a pass that ends normally removes it itself, under the lock of its last check.
struct Inflight<'a> {
    hk: &'a Housekeeper,
    dir: &'a Path,
    armed: bool,
}

impl Drop for Inflight<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        self.hk
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(self.dir);
    }
}

async fn blocking<R: Send + 'static>(
    f: impl FnOnce() -> Result<R, HousekeepingError> + Send + 'static,
) -> Result<R, HousekeepingError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| HousekeepingError::Join(e.to_string()))?
}

/// The periodic sweep (core 0) and the shutdown of running passes, as a sidecar service.
pub struct HousekeepingService {
    pub housekeeper: Arc<Housekeeper>,
}

impl SidecarService for HousekeepingService {
    fn name(&self) -> &'static str {
        "housekeeping"
    }

    fn run(
        self: Arc<Self>,
        core: usize,
        mut stop: StopSignal,
        _grace: Duration,
    ) -> Pin<Box<dyn Future<Output = ()>>> {
        Box::pin(async move {
            let hk = &self.housekeeper;
            match hk.config.sweep_interval.filter(|_| core == 0) {
                Some(every) => loop {
                    tokio::select! {
                        _ = tokio::time::sleep(every) => hk.sweep().await,
                        _ = stopped(&mut stop) => break,
                    }
                },
                None => stopped(&mut stop).await,
            }
            hk.stop();
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HousekeepingSection;

    #[test]
    fn a_request_while_a_pass_runs_is_folded_into_it() {
        let data = tempfile::tempdir().unwrap();
        let dir = data.path().join("repos/o/r.git");
        let git = PathBuf::from("git");
        let out = crate::git::process::git_command(&git, data.path())
            .args(["init", "--bare", "-q"])
            .arg(&dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "git init: {out:?}");
        let config = HousekeepingConfig::build(HousekeepingSection::default(), 2).unwrap();
        let hk = Arc::new(Housekeeper::new(config, git, data.path().join("repos")));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let first = {
                let (hk, dir) = (Arc::clone(&hk), dir.clone());
                tokio::spawn(async move { hk.request(dir, false).await })
            };
            // Let the first request register itself and start its pass.
            while !hk.inflight.lock().unwrap().contains_key(&dir) {
                tokio::task::yield_now().await;
            }
            let second = hk.request(dir.clone(), true).await.unwrap();
            assert!(matches!(second, Requested::Folded), "{second:?}");
            // The first ran once more, with the folded request's --full.
            match first.await.unwrap().unwrap() {
                Requested::Ran(report) => {
                    assert_eq!(report.plan.repack, Some(plan::Repack::Full))
                }
                other => panic!("{other:?}"),
            }
            assert!(hk.inflight.lock().unwrap().is_empty());
        });
    }
}
