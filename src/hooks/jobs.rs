//! The jobs run for every push event: disk usage (size of the repository on disk), webhooks
//! (a signed JSON POST to each of the repository's webhooks, logged per attempt) and commit
//! indexing (sha, author, time, subject of the pushed commits), housekeeping (counts the push and
//! maintains the repository when [`crate::housekeeping`] says so), plus `noop` for benchmarks.
//!
//! Every job is idempotent by event id, so a redelivered message is harmless: sizes are
//! recomputed, commits are inserted-or-ignored, and a webhook already delivered for the event is
//! skipped. Blocking work (walking the repository, running git) goes to tokio's blocking pool.

use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::db::{DbError, HookDb};
use super::event::PushEvent;
use super::http_client::{self, HttpUrl};
use crate::config::JobConcurrency;
use crate::git::repo::RepoRoot;
use crate::git::repo_name::RepoName;
use crate::metrics::METRICS;
use crate::store::{CommitRecord, DeliveryRecord};

/// Most commits indexed per updated ref in one push (a huge import is indexed partially).
const MAX_COMMITS_PER_REF: usize = 10_000;

/// A job type. Each has its own durable queue, semaphore and completion record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobKind {
    DiskUsage,
    Webhooks,
    Indexing,
    Noop,
    Housekeeping,
}

impl JobKind {
    pub const ALL: [JobKind; 5] = [
        JobKind::DiskUsage,
        JobKind::Webhooks,
        JobKind::Indexing,
        JobKind::Noop,
        JobKind::Housekeeping,
    ];

    /// Stable name: queue suffix, completion record key, metrics label.
    pub fn name(self) -> &'static str {
        match self {
            JobKind::DiskUsage => "disk_usage",
            JobKind::Webhooks => "webhooks",
            JobKind::Indexing => "indexing",
            JobKind::Noop => "noop",
            JobKind::Housekeeping => "housekeeping",
        }
    }

    /// Index into [`crate::metrics::HookMetrics::jobs`] (same order as `HOOK_JOBS`).
    pub fn index(self) -> usize {
        self as usize
    }

    /// This core's permit count for the job; 0 means the job type is off.
    pub fn limit(self, c: &JobConcurrency) -> usize {
        match self {
            JobKind::DiskUsage => c.disk_usage,
            JobKind::Webhooks => c.webhooks,
            JobKind::Indexing => c.indexing,
            JobKind::Noop => c.noop,
            JobKind::Housekeeping => c.housekeeping,
        }
    }

    /// The job types that run with these limits.
    pub fn enabled(c: &JobConcurrency) -> Vec<JobKind> {
        Self::ALL.into_iter().filter(|j| j.limit(c) > 0).collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("repository name `{0}` in the event is invalid")]
    BadRepo(String),
    #[error("{failed} of {total} webhooks failed; first: {first}")]
    Webhooks {
        failed: usize,
        total: usize,
        first: String,
    },
    #[error("`git {args}` in {repo}: {message}")]
    Git {
        repo: PathBuf,
        args: String,
        message: String,
    },
    #[error("measuring {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("blocking task failed: {0}")]
    Join(String),
    #[error(transparent)]
    Housekeeping(#[from] crate::housekeeping::HousekeepingError),
}

impl JobError {
    /// Whether trying again can help (a bad event never gets better).
    pub fn retryable(&self) -> bool {
        !matches!(self, JobError::BadRepo(_))
    }
}

/// What every job needs; shared by all cores.
pub struct JobContext {
    pub db: HookDb,
    pub repos: RepoRoot,
    pub git: PathBuf,
    pub webhook_timeout: Duration,
    pub housekeeper: std::sync::Arc<crate::housekeeping::Housekeeper>,
}

/// Runs one attempt (1-based) of `job` for `event`.
pub async fn run(
    job: JobKind,
    ctx: &JobContext,
    event: &PushEvent,
    attempt: u32,
) -> Result<(), JobError> {
    match job {
        JobKind::DiskUsage => disk_usage(ctx, event).await,
        JobKind::Webhooks => webhooks(ctx, event, attempt).await,
        JobKind::Indexing => index_commits(ctx, event).await,
        JobKind::Noop => Ok(()),
        JobKind::Housekeeping => {
            let dir = repo_dir(ctx, event)?;
            Ok(ctx.housekeeper.after_push(dir).await?)
        }
    }
}

fn repo_dir(ctx: &JobContext, event: &PushEvent) -> Result<PathBuf, JobError> {
    let name = RepoName::parse(&event.repository)
        .map_err(|_| JobError::BadRepo(event.repository.clone()))?;
    Ok(ctx.repos.path_of(&name))
}

async fn blocking<R: Send + 'static>(
    f: impl FnOnce() -> Result<R, JobError> + Send + 'static,
) -> Result<R, JobError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| JobError::Join(e.to_string()))?
}

async fn disk_usage(ctx: &JobContext, event: &PushEvent) -> Result<(), JobError> {
    let dir = repo_dir(ctx, event)?;
    let Some(bytes) = blocking(move || dir_size(&dir)).await? else {
        // Deleted since the push: nothing to measure, and retrying will not change that.
        tracing::debug!(repo = %event.repository, "repository gone; size not measured");
        return Ok(());
    };
    let repo = event.repository.clone();
    ctx.db.call(move |s| s.set_repo_size(&repo, bytes)).await?;
    METRICS.hooks.set_repo_size(&event.repository, bytes);
    Ok(())
}

/// Bytes of every file under `root` (symlinks not followed); None if `root` does not exist.
/// Files that vanish during the walk (a concurrent gc) are skipped.
pub fn dir_size(root: &Path) -> Result<Option<u64>, JobError> {
    let io_err = |path: &Path, source| JobError::Io {
        path: path.to_owned(),
        source,
    };
    match std::fs::symlink_metadata(root) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(root, e)),
    }
    let mut total = 0u64;
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err(&dir, e)),
        };
        for entry in entries {
            let Ok(entry) = entry else { continue };
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                stack.push(entry.path());
            } else if meta.is_file() {
                total = total.saturating_add(meta.len());
            }
        }
    }
    Ok(Some(total))
}

/// `sha256=HEX` of HMAC-SHA256(secret, body), GitHub's `X-Hub-Signature-256` scheme.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    // HMAC takes keys of any length, so this cannot fail.
    let mut mac = match <Hmac<Sha256> as Mac>::new_from_slice(secret) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

async fn webhooks(ctx: &JobContext, event: &PushEvent, attempt: u32) -> Result<(), JobError> {
    let repo = event.repository.clone();
    let hooks = ctx.db.call(move |s| s.webhooks_for(&repo)).await?;
    if hooks.is_empty() {
        return Ok(());
    }
    let body = event.to_json();
    let mut failures = Vec::new();
    for hook in &hooks {
        let (id, ev) = (hook.id, event.id.clone());
        if ctx.db.call(move |s| s.webhook_delivered(id, &ev)).await? {
            continue;
        }
        let started = Instant::now();
        let result = match HttpUrl::parse(&hook.url) {
            Ok(url) => {
                let sig = signature(hook.secret.as_bytes(), body.as_bytes());
                let headers = [
                    ("X-Gitplane-Event", "push"),
                    ("X-Gitplane-Delivery", event.id.as_str()),
                    ("X-Gitplane-Signature-256", sig.as_str()),
                ];
                http_client::post(&url, &headers, body.as_bytes(), ctx.webhook_timeout).await
            }
            Err(e) => Err(e),
        };
        let (status, error) = match &result {
            Ok(code) => (Some(*code), None),
            Err(e) => (None, Some(e.to_string())),
        };
        let ok = status.is_some_and(|c| (200..300).contains(&c));
        let record = DeliveryRecord {
            webhook_id: hook.id,
            event_id: event.id.clone(),
            attempt,
            status,
            ok,
            error: error.clone(),
            duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        };
        ctx.db.call(move |s| s.log_delivery(&record)).await?;
        if !ok {
            let why = error.unwrap_or_else(|| format!("HTTP {}", status.unwrap_or(0)));
            failures.push(format!("webhook {} ({}): {why}", hook.id, hook.url));
        }
    }
    match failures.first() {
        None => Ok(()),
        Some(first) => Err(JobError::Webhooks {
            failed: failures.len(),
            total: hooks.len(),
            first: first.clone(),
        }),
    }
}

/// A git command for reading a repository: clean environment, no user/system config, and every
/// inherited fd above stderr closed at exec (sockets and pipes of other connections must never
/// leak into a child).
pub(super) fn git_command(git: &Path, repo: &Path) -> Command {
    let mut cmd = crate::git::process::git_command(git, repo);
    cmd.arg("--git-dir")
        .arg(repo)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: the closure only makes an async-signal-safe syscall.
    unsafe {
        cmd.pre_exec(|| {
            // CLOSE_RANGE_CLOEXEC (4): mark every fd above stderr close-on-exec.
            if libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 4u32) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

/// Parses `git log --format=%H%x1f%an <%ae>%x1f%at%x1f%s` output.
pub fn parse_log(out: &str) -> Vec<CommitRecord> {
    out.lines()
        .filter_map(|line| {
            let mut f = line.splitn(4, '\u{1f}');
            let sha = f.next()?;
            let author = f.next()?;
            let time = f.next()?.trim().parse().ok()?;
            let subject = f.next().unwrap_or("");
            Some(CommitRecord {
                sha: sha.to_owned(),
                author: author.to_owned(),
                time,
                subject: subject.to_owned(),
            })
        })
        .collect()
}

async fn index_commits(ctx: &JobContext, event: &PushEvent) -> Result<(), JobError> {
    let dir = repo_dir(ctx, event)?;
    if !dir.exists() {
        return Ok(());
    }
    let updated: Vec<String> = event.refs.iter().map(|r| r.refname.clone()).collect();
    for update in event.refs.iter().filter(|r| !r.deleted()) {
        let mut args: Vec<String> = vec![
            "log".into(),
            "--no-decorate".into(),
            "--ignore-missing".into(),
            format!("--max-count={MAX_COMMITS_PER_REF}"),
            "--format=%H%x1f%an <%ae>%x1f%at%x1f%s".into(),
            update.after.clone(),
        ];
        if update.created() {
            // A new ref: its commits not reachable from any ref this push did not touch.
            // Excluding every updated ref keeps two new branches on one commit from hiding
            // it from each other.
            args.push("--not".into());
            args.extend(updated.iter().map(|r| format!("--exclude={r}")));
            // `--glob=refs/*`, not `--all`: --all also counts HEAD, which names the new ref.
            args.push("--glob=refs/*".into());
        } else {
            args.push(format!("^{}", update.before));
        }
        args.push("--".into());
        let (git, repo) = (ctx.git.clone(), dir.clone());
        let out = blocking(move || {
            let output =
                git_command(&git, &repo)
                    .args(&args)
                    .output()
                    .map_err(|e| JobError::Git {
                        repo: repo.clone(),
                        args: args.join(" "),
                        message: e.to_string(),
                    })?;
            if !output.status.success() {
                return Err(JobError::Git {
                    repo,
                    args: args.join(" "),
                    message: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
                });
            }
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        })
        .await?;
        let commits = parse_log(&out);
        if commits.is_empty() {
            continue;
        }
        let (repo, ev, refname) = (
            event.repository.clone(),
            event.id.clone(),
            update.refname.clone(),
        );
        ctx.db
            .call(move |s| s.insert_commits(&repo, &ev, &refname, &commits))
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_like_github() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn parses_git_log() {
        let out = "abc\u{1f}A <a@x>\u{1f}17\u{1f}subject \u{1f} odd\nbad line\n";
        let c = parse_log(out);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].sha, "abc");
        assert_eq!(c[0].time, 17);
        assert_eq!(c[0].subject, "subject \u{1f} odd");
    }

    #[test]
    fn measures_directories() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("a/b")).unwrap();
        std::fs::write(dir.path().join("a/b/f"), [0u8; 100]).unwrap();
        std::fs::write(dir.path().join("g"), [0u8; 23]).unwrap();
        assert_eq!(dir_size(dir.path()).unwrap(), Some(123));
        assert_eq!(dir_size(&dir.path().join("nope")).unwrap(), None);
    }

    #[test]
    fn job_names_match_metrics_order() {
        for j in JobKind::ALL {
            assert_eq!(crate::metrics::HOOK_JOBS[j.index()], j.name());
        }
    }
}
