//! Runs one maintenance pass on a repository: takes the repository's maintenance lock (one pass
//! at a time per repository, across processes: the server's workers and `gitplane repo
//! maintain`), reads [`stats`] and [`state`], asks [`plan`] what to do, runs the git commands at
//! low CPU and I/O priority, and resets the counters by what it consumed.
//!
//! Cancelling (SIGTERM) kills the running git's process group. Git writes every pack, index and
//! graph to a temporary file and renames it into place, so the repository stays consistent; the
//! temporaries it leaves are removed as stale by a later pass, and the lock files only
//! maintenance takes are removed at once (the next pass would otherwise fail on them).

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::metrics::{Outcome, Task, HOUSEKEEPING};
use super::plan::{self, Plan, Repack};
use super::state::{self, Flock};
use super::stats::{self, Grace};
use super::HousekeepingError;
use crate::config::HousekeepingConfig;

/// How long a cancelled pass waits for the rest of its git's process group to be gone after
/// SIGKILL, before it removes their locks: exit takes milliseconds, unless the kernel is busy.
const GROUP_EXIT_WAIT: Duration = Duration::from_secs(2);

/// The lock file that makes maintenance single-flight per repository.
const LOCK_FILE: &str = "gitplane-housekeeping.flock";

/// What a pass did.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub plan: Plan,
    /// Each task run, with its wall time.
    pub tasks: Vec<(Task, Duration)>,
    pub packs_before: usize,
    pub packs_after: usize,
    pub loose_before: u64,
    pub loose_after: u64,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.tasks.is_empty() {
            return writeln!(f, "nothing to do");
        }
        for reason in &self.plan.reasons {
            writeln!(f, "because: {reason}")?;
        }
        for (task, took) in &self.tasks {
            writeln!(f, "ran {} in {:.2}s", task.label(), took.as_secs_f64())?;
        }
        writeln!(
            f,
            "packs {} -> {}, loose objects {} -> {}",
            self.packs_before, self.packs_after, self.loose_before, self.loose_after
        )
    }
}

/// Where and how maintenance runs git.
pub struct Runner<'a> {
    pub config: &'a HousekeepingConfig,
    pub git: &'a Path,
    /// Set to stop: the running git is killed and the pass ends with `Cancelled`.
    pub cancel: &'a AtomicBool,
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Runner<'_> {
    /// One pass on the bare repository `dir`; `full` forces a full repack.
    pub fn maintain(&self, dir: &Path, full: bool) -> Result<Report, HousekeepingError> {
        let io = |what: &'static str| {
            let path = dir.to_owned();
            move |source| HousekeepingError::Io { what, path, source }
        };
        let lock_file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join(LOCK_FILE))
            .map_err(io("opening the maintenance lock"))?;
        let _lock = self.wait_lock(&lock_file).map_err(io("locking"))?;
        let snapshot = state::read(dir).map_err(io("reading the counters"))?;
        let grace = Grace {
            tmp: self.config.stale_tmp,
            lock: self.config.stale_lock,
        };
        let now = SystemTime::now();
        let last_run = UNIX_EPOCH + Duration::from_secs(snapshot.last_run);
        let before = stats::read(dir, last_run, grace, now).map_err(io("reading objects/"))?;
        let plan = plan::decide(self.config, &before, &snapshot, unix(now), full);
        let mut report = Report {
            packs_before: before.packs.len() + before.cruft_packs,
            loose_before: before.loose_objects,
            plan: plan.clone(),
            ..Report::default()
        };
        if plan.clean_stale {
            self.task(&mut report, Task::CleanStale, || {
                for path in &before.stale {
                    remove(path);
                }
                Ok(())
            })?;
        }
        if plan.pack_refs {
            self.task(&mut report, Task::PackRefs, || {
                self.git(dir, &["pack-refs", "--all", "--prune"])
            })?;
        }
        match plan.repack {
            Some(Repack::Geometric) => {
                let factor = format!("--geometric={}", self.config.geometric_factor);
                self.task(&mut report, Task::Geometric, || {
                    self.git(
                        dir,
                        &[
                            "repack",
                            "-d",
                            "-q",
                            &factor,
                            "--write-midx",
                            "--write-bitmap-index",
                        ],
                    )
                })?;
            }
            Some(Repack::Full) => {
                // Never `prune --expire=now`: an object a push is writing right now is
                // unreachable until its ref lands, so it must survive in the cruft pack.
                let expiry = format!(
                    "--cruft-expiration={}.seconds.ago",
                    self.config.cruft_expiration.as_secs()
                );
                self.task(&mut report, Task::Full, || {
                    self.git(
                        dir,
                        &[
                            "repack",
                            "-a",
                            "-d",
                            "-q",
                            "--cruft",
                            &expiry,
                            "--write-midx",
                            "--write-bitmap-index",
                        ],
                    )
                })?;
            }
            None => {}
        }
        if plan.commit_graph {
            self.task(&mut report, Task::CommitGraph, || {
                self.git(
                    dir,
                    &[
                        "commit-graph",
                        "write",
                        "--reachable",
                        "--split",
                        "--changed-paths",
                        "--no-progress",
                    ],
                )
            })?;
        }
        let after =
            stats::read(dir, now, grace, SystemTime::now()).map_err(io("reading objects/"))?;
        report.packs_after = after.packs.len() + after.cruft_packs;
        report.loose_after = after.loose_objects;
        // Pushes counted while this pass ran stay counted: subtract what the pass saw.
        state::update(dir, |s| {
            s.pushes_since_run = s.pushes_since_run.saturating_sub(snapshot.pushes_since_run);
            s.last_run = unix(now);
            if plan.repack == Some(Repack::Full) {
                s.pushes_since_full = s
                    .pushes_since_full
                    .saturating_sub(snapshot.pushes_since_full);
                s.last_full = unix(now);
            }
            if plan.repack.is_some() {
                s.pushes_since_repack = s
                    .pushes_since_repack
                    .saturating_sub(snapshot.pushes_since_repack);
            }
            if plan.commit_graph {
                s.pushes_since_graph = s
                    .pushes_since_graph
                    .saturating_sub(snapshot.pushes_since_graph);
            }
        })
        .map_err(io("writing the counters"))?;
        Ok(report)
    }

    /// Waits for the repository's maintenance lock, giving up when cancelled.
    fn wait_lock<'f>(&self, file: &'f File) -> io::Result<Flock<'f>> {
        loop {
            if let Some(lock) = Flock::try_exclusive(file)? {
                return Ok(lock);
            }
            if self.cancel.load(Ordering::Relaxed) {
                return Err(io::Error::new(io::ErrorKind::Interrupted, "stopping"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn task(
        &self,
        report: &mut Report,
        task: Task,
        f: impl FnOnce() -> Result<(), HousekeepingError>,
    ) -> Result<(), HousekeepingError> {
        let started = Instant::now();
        let result = f();
        let took = started.elapsed();
        let outcome = match &result {
            Ok(()) => Outcome::Ok,
            Err(HousekeepingError::Cancelled) => Outcome::Cancelled,
            Err(_) => Outcome::Failed,
        };
        HOUSEKEEPING.record(task, outcome, took);
        result?;
        report.tasks.push((task, took));
        Ok(())
    }

    /// Runs `git ARGS` in `dir` at low priority, killing it if cancelled.
    fn git(&self, dir: &Path, args: &[&str]) -> Result<(), HousekeepingError> {
        let mut cmd = crate::git::process::git_command(self.git, dir);
        cmd.arg("--git-dir")
            .arg(dir)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let (nice, idle) = (self.config.nice, self.config.ioprio_idle);
        // SAFETY: the closure only makes async-signal-safe syscalls.
        unsafe {
            cmd.pre_exec(move || {
                // Own process group: cancelling reaches pack-objects too.
                if libc::setpgid(0, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // Serving comes first. Failing to lower our own priority is harmless.
                libc::setpriority(libc::PRIO_PROCESS, 0, nice);
                if idle {
                    // ioprio_set(IOPRIO_WHO_PROCESS, self, IOPRIO_CLASS_IDLE << 13).
                    libc::syscall(libc::SYS_ioprio_set, 1, 0, 3 << 13);
                }
                // CLOSE_RANGE_CLOEXEC (4): no socket or pipe of a connection leaks into git.
                if libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 4u32) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let failed = |message: String| HousekeepingError::Git {
            repo: dir.to_owned(),
            args: args.join(" "),
            message,
        };
        let mut child = cmd.spawn().map_err(|e| failed(e.to_string()))?;
        let status = self.wait(&mut child).map_err(|e| failed(e.to_string()))?;
        let Some(status) = status else {
            remove_locks_of_killed(dir, args);
            return Err(HousekeepingError::Cancelled);
        };
        if status.success() {
            return Ok(());
        }
        let mut stderr = String::new();
        if let Some(mut err) = child.stderr.take() {
            let _ = err.read_to_string(&mut stderr);
        }
        Err(failed(format!("{status}: {}", stderr.trim())))
    }

    /// Waits for `child`; None if cancelled (its process group is killed and reaped).
    fn wait(&self, child: &mut Child) -> io::Result<Option<std::process::ExitStatus>> {
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(Some(status));
            }
            if self.cancel.load(Ordering::Relaxed) {
                let group = child.id() as libc::pid_t;
                crate::git::process::kill_group(group);
                child.wait()?;
                // The child's own children (repack's pack-objects and multi-pack-index, which
                // hold the lock) die on their own time; their locks are removed only after.
                crate::git::process::wait_group_stopped(group, GROUP_EXIT_WAIT);
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Removes the lock files a maintenance git killed mid-write leaves behind. Left in place, a
/// `multi-pack-index.lock` makes every repack fail until it counts as stale (an hour at least):
/// after a restart, the repository would go unmaintained for that long. Only locks that nothing
/// but maintenance takes, and only once the git that held them is reaped; `packed-refs.lock`
/// stays, since a push may hold it, and ages out as stale.
fn remove_locks_of_killed(dir: &Path, args: &[&str]) {
    let locks: &[&str] = match args.first() {
        Some(&"repack") | Some(&"multi-pack-index") => &["objects/pack/multi-pack-index.lock"],
        Some(&"commit-graph") => &[
            "objects/info/commit-graph.lock",
            "objects/info/commit-graphs/commit-graph-chain.lock",
        ],
        _ => &[],
    };
    for lock in locks {
        remove(&dir.join(lock));
    }
}

/// Removes a stale file or quarantine directory; one that is already gone is fine.
fn remove(path: &PathBuf) {
    let result = if path.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    if let Err(e) = result {
        if e.kind() != io::ErrorKind::NotFound {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove a stale file");
        }
    }
}
