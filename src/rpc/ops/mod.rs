//! The repository operations behind each RPC, as plain blocking functions over libgit2. They run
//! on the [`super::pool`] workers only; each takes a request message and returns a response
//! message (or, for streaming calls, sends messages through an [`Emitter`]).
//!
//! - [`refs`] runs ListBranches, ListTags, CreateBranch, DeleteBranch;
//! - [`commits`] runs FindCommit, CommitLog;
//! - [`diff`] runs CommitDiff, CompareRefs;
//! - [`tree`] runs GetTree, GetBlob;
//! - [`merge`] runs CheckMergeability, Merge;
//! - [`info`] runs RepositoryInfo;
//! - [`optimize`] runs OptimizeRepository.
//!
//! Errors are [`OpError`]; the edge turns them into gRPC statuses.

pub mod commits;
pub mod diff;
pub mod info;
pub mod merge;
pub mod optimize;
pub mod refs;
pub mod tree;

use std::cell::RefCell;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use git2::{Oid, Repository};

use super::frame::{encode_message, FrameError};
use super::pb::v1 as pb;
use super::pool::CallCtx;
use super::status::{Code, Status};

/// Open repositories each worker thread keeps. Each holds a few fds and pack index maps; 64 per
/// worker covers a node's hot set without letting fds grow with the number of repositories.
const REPO_CACHE_PER_THREAD: usize = 64;

/// Longest revision string accepted.
const MAX_REVISION_LEN: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    /// A compare-and-swap lost: the caller's view is stale; re-read and retry.
    #[error("{0}")]
    Aborted(String),
    #[error("{0}")]
    Status(Status),
    #[error("libgit2 failed while {doing}: {source}")]
    Git {
        doing: &'static str,
        source: git2::Error,
    },
    #[error("{doing} {path}: {source}")]
    Io {
        doing: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot encode the response: {0}")]
    Encode(#[from] FrameError),
    /// The consumer of a stream went away (deadline, cancel, client gone).
    #[error("the call ended before the response was complete")]
    Gone,
}

impl From<Status> for OpError {
    fn from(s: Status) -> Self {
        OpError::Status(s)
    }
}

impl From<OpError> for Status {
    fn from(e: OpError) -> Self {
        let code = match &e {
            OpError::InvalidArgument(_) => Code::InvalidArgument,
            OpError::NotFound(_) => Code::NotFound,
            OpError::AlreadyExists(_) => Code::AlreadyExists,
            OpError::FailedPrecondition(_) => Code::FailedPrecondition,
            OpError::Aborted(_) => Code::Aborted,
            OpError::Status(s) => return s.clone(),
            OpError::Git { source, .. } => match source.code() {
                git2::ErrorCode::NotFound => Code::NotFound,
                git2::ErrorCode::InvalidSpec | git2::ErrorCode::Ambiguous => Code::InvalidArgument,
                git2::ErrorCode::Exists => Code::AlreadyExists,
                // Someone else holds the ref lock or moved the ref under us: retry.
                git2::ErrorCode::Locked | git2::ErrorCode::Modified => Code::Aborted,
                _ => Code::Internal,
            },
            OpError::Io { .. } | OpError::Encode(_) => Code::Internal,
            OpError::Gone => Code::Cancelled,
        };
        Status::new(code, e.to_string())
    }
}

/// `map_err` helper: `repo.foo().map_err(git("reading foo"))`.
pub fn git(doing: &'static str) -> impl FnOnce(git2::Error) -> OpError {
    move |source| OpError::Git { doing, source }
}

pub type OpResult<T> = Result<T, OpError>;

/// Called by an op right before it writes a ref, with the exact change: the ref's event is
/// recorded as pending there. An error stops the op before the write.
pub type BeforeRefWrite<'a> = &'a dyn Fn(&crate::hooks::event::RefUpdate) -> OpResult<()>;

/// Sends a streaming call's messages to the shard writing them out. Bounded: when the client
/// reads slowly, `send` blocks this worker (not the shard) until there is room.
pub struct Emitter {
    tx: tokio::sync::mpsc::Sender<Bytes>,
    ctx: CallCtx,
}

impl Emitter {
    pub fn new(tx: tokio::sync::mpsc::Sender<Bytes>, ctx: CallCtx) -> Self {
        Self { tx, ctx }
    }

    pub fn ctx(&self) -> &CallCtx {
        &self.ctx
    }

    /// # Errors
    /// The call's deadline or cancellation, or [`OpError::Gone`] if the receiver is gone.
    pub fn send<M: prost::Message>(&self, msg: &M) -> OpResult<()> {
        self.ctx.check()?;
        let frame = encode_message(msg)?;
        self.tx.blocking_send(frame).map_err(|_| OpError::Gone)
    }
}

struct CachedRepo {
    path: PathBuf,
    dev: u64,
    ino: u64,
    last_used: u64,
    repo: Repository,
}

#[derive(Default)]
struct RepoCache {
    entries: Vec<CachedRepo>,
    clock: u64,
}

thread_local! {
    static REPOS: RefCell<RepoCache> = RefCell::new(RepoCache::default());
}

/// Runs `f` with the repository at `path`, opened once per worker thread and reused. A handle is
/// reopened when the directory's inode changed (the repository was deleted and re-created).
///
/// # Errors
/// NOT_FOUND when there is no repository at `path`; whatever `f` returns.
pub fn with_repo<R>(
    path: &Path,
    display_name: &str,
    f: impl FnOnce(&Repository) -> OpResult<R>,
) -> OpResult<R> {
    let meta = match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => m,
        _ => return Err(OpError::NotFound(format!("repository {display_name}"))),
    };
    REPOS.with(|cell| {
        let mut cache = cell.borrow_mut();
        cache.clock += 1;
        let now = cache.clock;
        let found = cache
            .entries
            .iter()
            .position(|e| e.path == path && e.dev == meta.dev() && e.ino == meta.ino());
        let index = match found {
            Some(i) => i,
            None => {
                let repo = Repository::open_bare(path).map_err(|e| {
                    if e.code() == git2::ErrorCode::NotFound {
                        OpError::NotFound(format!("repository {display_name}"))
                    } else {
                        OpError::Git {
                            doing: "opening the repository",
                            source: e,
                        }
                    }
                })?;
                cache.entries.retain(|e| e.path != path);
                if cache.entries.len() >= REPO_CACHE_PER_THREAD {
                    if let Some(oldest) = cache
                        .entries
                        .iter()
                        .enumerate()
                        .min_by_key(|(_, e)| e.last_used)
                        .map(|(i, _)| i)
                    {
                        cache.entries.swap_remove(oldest);
                    }
                }
                cache.entries.push(CachedRepo {
                    path: path.to_owned(),
                    dev: meta.dev(),
                    ino: meta.ino(),
                    last_used: now,
                    repo,
                });
                cache.entries.len() - 1
            }
        };
        let entry = cache
            .entries
            .get_mut(index)
            .ok_or_else(|| OpError::Status(Status::internal("repository cache lost an entry")))?;
        entry.last_used = now;
        f(&entry.repo)
    })
}

/// Resolves a revision (`main`, `v1.0`, an id, `HEAD~2`) to a commit.
///
/// # Errors
/// INVALID_ARGUMENT for an empty or overlong revision, NOT_FOUND if it names nothing or
/// something that is not a commit.
pub fn resolve_commit<'r>(repo: &'r Repository, rev: &str) -> OpResult<git2::Commit<'r>> {
    check_revision(rev)?;
    let obj = repo.revparse_single(rev).map_err(|e| match e.code() {
        git2::ErrorCode::NotFound | git2::ErrorCode::InvalidSpec => {
            OpError::NotFound(format!("revision {rev:?}"))
        }
        git2::ErrorCode::Ambiguous => {
            OpError::InvalidArgument(format!("revision {rev:?} is ambiguous"))
        }
        _ => OpError::Git {
            doing: "resolving a revision",
            source: e,
        },
    })?;
    obj.peel_to_commit()
        .map_err(|_| OpError::NotFound(format!("commit for revision {rev:?}")))
}

fn check_revision(rev: &str) -> OpResult<()> {
    if rev.is_empty() {
        return Err(OpError::InvalidArgument("revision is empty".into()));
    }
    if rev.len() > MAX_REVISION_LEN {
        return Err(OpError::InvalidArgument(format!(
            "revision is {} bytes, longer than {MAX_REVISION_LEN}",
            rev.len()
        )));
    }
    Ok(())
}

/// Parses a full hex object id.
///
/// # Errors
/// INVALID_ARGUMENT naming `field`.
pub fn parse_oid(field: &str, s: &str) -> OpResult<Oid> {
    if s.len() != 40 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(OpError::InvalidArgument(format!(
            "{field} must be a 40-digit hex object id, got {:?}",
            s.chars().take(64).collect::<String>()
        )));
    }
    Oid::from_str(s).map_err(|e| OpError::InvalidArgument(format!("{field}: {e}")))
}

pub fn signature(sig: &git2::Signature<'_>) -> pb::Signature {
    let when = sig.when();
    pb::Signature {
        name: String::from_utf8_lossy(sig.name_bytes()).into_owned(),
        email: String::from_utf8_lossy(sig.email_bytes()).into_owned(),
        time: when.seconds(),
        offset_minutes: when.offset_minutes(),
    }
}

/// A commit as the API shows it; `with_message` adds the whole message (summaries leave it out).
pub fn commit_pb(c: &git2::Commit<'_>, with_message: bool) -> pb::Commit {
    let message = String::from_utf8_lossy(c.message_bytes());
    let summary = message.lines().next().unwrap_or("").trim_end().to_owned();
    pb::Commit {
        id: c.id().to_string(),
        tree_id: c.tree_id().to_string(),
        parent_ids: c.parent_ids().map(|p| p.to_string()).collect(),
        author: Some(signature(&c.author())),
        committer: Some(signature(&c.committer())),
        summary,
        message: if with_message {
            message.into_owned()
        } else {
            String::new()
        },
    }
}

/// `limit` from a request: 0 means `default`, anything above `max` is clamped.
pub fn page_limit(limit: u32, default: usize, max: usize) -> usize {
    match limit {
        0 => default,
        n => (n as usize).min(max),
    }
}

/// Page tokens are opaque to clients: `KIND:VALUE` in unpadded URL-safe base64. The kind stops a
/// token from one call being replayed on another.
pub fn encode_token(kind: &str, value: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{kind}:{value}"))
}

/// The value of a token made by [`encode_token`] with the same `kind`; `None` for no token.
///
/// # Errors
/// INVALID_ARGUMENT for a token that is not ours or is for another call.
pub fn decode_token(kind: &str, token: &str) -> OpResult<Option<String>> {
    use base64::Engine;
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || OpError::InvalidArgument("page_token is not valid for this call".into());
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| bad())?;
    let text = String::from_utf8(raw).map_err(|_| bad())?;
    let value = text
        .strip_prefix(kind)
        .and_then(|r| r.strip_prefix(':'))
        .ok_or_else(bad)?;
    Ok(Some(value.to_owned()))
}

/// A path inside a tree from a request: relative, `/`-separated, no `.`/`..`, no empty segments.
/// Leading and trailing slashes are dropped; an empty result means the root.
///
/// # Errors
/// INVALID_ARGUMENT naming `field`.
pub fn tree_path(field: &str, path: &str) -> OpResult<String> {
    let p = path.trim_matches('/');
    if p.is_empty() {
        return Ok(String::new());
    }
    if p.len() > 4096 || p.contains('\0') {
        return Err(OpError::InvalidArgument(format!(
            "{field} is not a valid path"
        )));
    }
    if p.split('/').any(|s| s.is_empty() || s == "." || s == "..") {
        return Err(OpError::InvalidArgument(format!(
            "{field} {p:?} has an empty, `.` or `..` segment"
        )));
    }
    Ok(p.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_are_bound_to_their_kind() {
        let t = encode_token("branches", "refs/heads/main");
        assert_eq!(
            decode_token("branches", &t).unwrap().as_deref(),
            Some("refs/heads/main")
        );
        assert!(decode_token("tags", &t).is_err());
        assert!(decode_token("tags", "!!!").is_err());
        assert_eq!(decode_token("tags", "").unwrap(), None);
    }

    #[test]
    fn paths_and_limits() {
        assert_eq!(tree_path("path", "/a/b/").unwrap(), "a/b");
        assert_eq!(tree_path("path", "").unwrap(), "");
        for bad in ["a//b", "a/../b", "./a", "a/."] {
            assert!(tree_path("path", bad).is_err(), "{bad}");
        }
        assert_eq!(page_limit(0, 100, 1000), 100);
        assert_eq!(page_limit(5000, 100, 1000), 1000);
        assert_eq!(page_limit(7, 100, 1000), 7);
        assert!(parse_oid("id", "abc").is_err());
        assert!(parse_oid("id", &"g".repeat(40)).is_err());
        assert!(parse_oid("id", &"a".repeat(40)).is_ok());
    }
}
