//! Pending ref transactions (issue #17): every ref change gets exactly one event, even when the
//! process changing the refs dies between the ref update and the outbox row.
//!
//! git's `reference-transaction` hook records each transaction of a push in `hook_pending` in its
//! `prepared` state (refs locked, nothing moved yet), durably, before git commits it; post-receive
//! turns all of a push's rows into one outbox event. Rows whose process died before that are
//! reconciled here against the refs on disk, at start-up and then every few seconds.
//!
//! A row's owner is the process changing the refs, `PID:STARTTIME` (the start time tells a
//! reused pid apart), optionally followed by `/TAG` when one process owns several independent
//! changes (the server, for gRPC calls).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::event::{new_event_id, PushEvent, RefUpdate, ZERO_OID};
use crate::git::repo::RepoRoot;
use crate::git::repo_name::RepoName;
use crate::metrics::METRICS;
use crate::store::{Location, PendingRow, PendingState, Store, StoreError};

/// How often rows of dead processes are looked for after the start-up pass.
const RECONCILE_EVERY: Duration = Duration::from_secs(5);
/// How long a published row stays, so that a post-receive still running for the same push adds
/// no second event.
const KEEP_PUBLISHED_SECS: i64 = 3600;

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("reading the refs of {repo}: {why}")]
    Refs { repo: String, why: String },
    #[error("pending row {id} of {owner}: {why}")]
    BadRow { id: i64, owner: String, why: String },
}

/// `PID:STARTTIME` of a running process.
pub fn process_key(pid: u32) -> Option<String> {
    let stat = crate::procfs::read_stat(pid)?;
    Some(format!("{pid}:{}", start_time(&stat)?))
}

/// Field 22 of `/proc/PID/stat` (start time in clock ticks since boot).
fn start_time(stat: &str) -> Option<u64> {
    crate::procfs::stat_fields(stat)?.nth(19)?.parse().ok()
}

/// Whether the process an owner names still runs.
pub fn alive(owner: &str) -> bool {
    let process = owner.split('/').next().unwrap_or_default();
    let Some(pid) = process.split_once(':').and_then(|(p, _)| p.parse().ok()) else {
        return false;
    };
    process_key(pid).as_deref() == Some(process)
}

/// The owner key of this hook's push: its parent, when that is `git receive-pack`. None for
/// every other git command that runs the hooks (pack-refs, gc): their ref changes are no push.
pub fn receive_pack_parent() -> Option<String> {
    let ppid = std::os::unix::process::parent_id();
    let cmdline = std::fs::read(format!("/proc/{ppid}/cmdline")).ok()?;
    if is_receive_pack(&cmdline) {
        process_key(ppid)
    } else {
        None
    }
}

fn is_receive_pack(cmdline: &[u8]) -> bool {
    let mut args = cmdline.split(|&b| b == 0);
    let argv0 = args.next().unwrap_or_default();
    argv0.ends_with(b"git-receive-pack") || args.next() == Some(b"receive-pack".as_slice())
}

/// Which updates of a dead process's transactions happened. `current` gives a ref's value on
/// disk (None: absent). A committed transaction happened. Otherwise a ref at its new value moved
/// and a ref at its old value did not. A ref at neither was changed again since: ours held the
/// lock before that and may have landed, so it counts as moved (at least once beats never).
pub fn moved<'a>(
    txs: &[(PendingState, Vec<RefUpdate>)],
    current: impl Fn(&str) -> Option<&'a str>,
) -> Vec<RefUpdate> {
    let mut out = Vec::new();
    for (state, refs) in txs {
        for r in refs {
            let now = current(&r.refname).unwrap_or(ZERO_OID);
            if *state == PendingState::Committed || now != r.before {
                out.push(r.clone());
            }
        }
    }
    out
}

/// The event for a push's pending rows and the refs that moved.
pub fn event_of(first: &PendingRow, refs: Vec<RefUpdate>) -> PushEvent {
    PushEvent {
        id: new_event_id(),
        repository: first.repo.clone(),
        pusher: first.pusher.clone(),
        remote_addr: first.remote_addr.clone(),
        via: first.via.clone(),
        refs,
        push_options: Vec::new(),
        pushed_at: first.created_at,
    }
}

/// Reconciles rows of dead processes against the refs on disk.
pub struct Reconciler {
    store: Location,
    repos: RepoRoot,
    git: PathBuf,
}

/// What one pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    pub published: u64,
    pub dropped: u64,
}

impl Reconciler {
    pub fn new(store: &Location, git: &Path) -> Self {
        Self {
            store: store.clone(),
            repos: RepoRoot::new(store.data_dir()),
            git: git.to_owned(),
        }
    }

    /// One pass over every owner whose process is gone.
    pub fn pass(&self) -> Result<Tally, ReconcileError> {
        let store = Store::open(&self.store)?;
        let mut tally = Tally::default();
        for owner in store.pending_owners()? {
            if alive(&owner) {
                continue;
            }
            // One owner's trouble (a broken repository) must not hold back the others, nor
            // the server's start: its rows stay for the next pass.
            match self.settle(&store, &owner) {
                Ok(Some(true)) => tally.published += 1,
                Ok(Some(false)) => tally.dropped += 1,
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(owner, error = %e, "cannot reconcile a pending ref change")
                }
            }
        }
        let now = i64::try_from(crate::clock::unix_now()).unwrap_or(i64::MAX);
        store.pending_purge(now.saturating_sub(KEEP_PUBLISHED_SECS))?;
        METRICS.hooks.pending_published.add(tally.published);
        METRICS.hooks.pending_dropped.add(tally.dropped);
        Ok(tally)
    }

    /// Publishes or drops one dead owner's rows: Some(published), None when a post-receive got
    /// there first.
    fn settle(&self, store: &Store, owner: &str) -> Result<Option<bool>, ReconcileError> {
        let rows = open_rows(store, owner)?;
        let Some(first) = rows.first() else {
            return Ok(None);
        };
        let txs = rows
            .iter()
            .map(|r| {
                serde_json::from_str::<Vec<RefUpdate>>(&r.refs)
                    .map(|refs| (r.state, refs))
                    .map_err(|e| ReconcileError::BadRow {
                        id: r.id,
                        owner: owner.to_owned(),
                        why: e.to_string(),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        // git is read before the write lock is taken; the process is dead, so the refs it
        // locked can no longer change through it.
        let on_disk = self.refs_of(&first.repo)?;
        let refs = moved(&txs, |name| on_disk.get(name).map(String::as_str));
        let event = (!refs.is_empty()).then(|| event_of(first, refs));
        let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
        let done = store.write_transaction(|s| {
            // Only if nobody (a late post-receive) settled these rows meanwhile.
            let now: Vec<i64> = open_rows(s, owner)?.iter().map(|r| r.id).collect();
            if now != ids {
                return Ok(None);
            }
            match &event {
                Some(e) => {
                    s.outbox_insert(&e.id, &e.repository, &e.to_json())?;
                    s.pending_published(owner)?;
                }
                None => s.pending_forget(owner)?,
            }
            Ok(Some(event.is_some()))
        })?;
        if let Some(published) = done {
            tracing::info!(owner, repo = %first.repo, published, "reconciled a pending ref change");
        }
        Ok(done)
    }

    /// Every ref of `repo` and its value.
    fn refs_of(&self, repo: &str) -> Result<HashMap<String, String>, ReconcileError> {
        let fail = |why: String| ReconcileError::Refs {
            repo: repo.to_owned(),
            why,
        };
        let name = RepoName::parse(repo).map_err(|e| fail(e.to_string()))?;
        let path = self.repos.path_of(&name);
        if !path.exists() {
            // A deleted repository has no refs: nothing of it moved that anyone can see.
            return Ok(HashMap::new());
        }
        let out = super::jobs::git_command(&self.git, &path)
            .args(["for-each-ref", "--format=%(objectname) %(refname)"])
            .output()
            .map_err(|e| fail(e.to_string()))?;
        if !out.status.success() {
            return Err(fail(String::from_utf8_lossy(&out.stderr).trim().to_owned()));
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(oid, name)| (name.to_owned(), oid.to_owned()))
            .collect())
    }

    /// The start-up pass, then a thread that repeats it for rows whose process dies later (a
    /// receive-pack of the previous generation still running, or one cut by a deadline).
    pub fn start(self) -> Result<Tally, ReconcileError> {
        let tally = self.pass()?;
        let spawned = std::thread::Builder::new()
            .name("gitplane-reconcile".into())
            .spawn(move || loop {
                std::thread::sleep(RECONCILE_EVERY);
                if let Err(e) = self.pass() {
                    tracing::warn!(error = %e, "reconciling pending ref changes");
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the pending ref change reconciler; only start-up reconciles");
        }
        Ok(tally)
    }
}

/// A ref change made by this server (a gRPC call): pending, durably, before the ref is written,
/// and turned into its event once the write is done, so a crash in between is reconciled at the
/// next start like a push's. Runs on a blocking thread.
pub struct ServerChange {
    store: Location,
    repo: String,
    via: String,
    prepared: std::cell::RefCell<Option<(String, RefUpdate)>>,
}

impl ServerChange {
    pub fn new(store: &Location, repo: &str, via: String) -> Self {
        Self {
            store: store.clone(),
            repo: repo.to_owned(),
            via,
            prepared: std::cell::RefCell::new(None),
        }
    }

    /// Records the change as pending; an error means the ref must not be written.
    pub fn prepare(&self, update: &RefUpdate) -> Result<(), StoreError> {
        static SERVER: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        let server = SERVER.get_or_init(|| {
            // Our own /proc entry is always there; "0:0" (never alive) only if /proc is not.
            process_key(std::process::id()).unwrap_or_else(|| "0:0".into())
        });
        let owner = format!("{server}/{}", new_event_id());
        let refs = serde_json::to_string(std::slice::from_ref(update))
            .map_err(|e| StoreError::Internal(e.to_string()))?;
        crate::store::with_thread_store(&self.store, |s| {
            s.pending_insert(&PendingRow {
                id: 0,
                owner: owner.clone(),
                repo: self.repo.clone(),
                refs,
                pusher: String::new(),
                remote_addr: String::new(),
                via: self.via.clone(),
                state: PendingState::Prepared,
                created_at: 0,
            })
        })?;
        *self.prepared.borrow_mut() = Some((owner, update.clone()));
        Ok(())
    }

    /// After the write: `succeeded` when the call's ref write returned Ok; otherwise the ref's
    /// value now (`current`) tells whether it moved anyway. Returns whether an event was
    /// recorded. On an error the pending row stays, and the next start publishes it.
    pub fn finish(
        self,
        succeeded: bool,
        current: impl FnOnce(&str) -> Option<String>,
    ) -> Result<bool, StoreError> {
        let Some((owner, update)) = self.prepared.into_inner() else {
            return Ok(false);
        };
        let landed = succeeded || {
            let now = current(&update.refname);
            let txs = [(PendingState::Prepared, vec![update.clone()])];
            !moved(&txs, |_| now.as_deref()).is_empty()
        };
        let first = PendingRow {
            id: 0,
            owner: owner.clone(),
            repo: self.repo,
            refs: String::new(),
            pusher: String::new(),
            remote_addr: String::new(),
            via: self.via,
            state: PendingState::Prepared,
            created_at: i64::try_from(crate::clock::unix_now()).unwrap_or(i64::MAX),
        };
        let event = landed.then(|| event_of(&first, vec![update]));
        crate::store::with_thread_store(&self.store, |s| {
            s.write_transaction(|s| {
                s.pending_forget(&owner)?;
                if let Some(e) = &event {
                    s.outbox_insert(&e.id, &e.repository, &e.to_json())?;
                }
                Ok(landed)
            })
        })
    }
}

/// `owner`'s rows not yet published.
fn open_rows(store: &Store, owner: &str) -> Result<Vec<PendingRow>, StoreError> {
    let mut rows = store.pending_of(owner)?;
    rows.retain(|r| r.state != PendingState::Published);
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "1111111111111111111111111111111111111111";
    const B: &str = "2222222222222222222222222222222222222222";
    const C: &str = "3333333333333333333333333333333333333333";

    fn up(name: &str, before: &str, after: &str) -> RefUpdate {
        RefUpdate {
            refname: name.into(),
            before: before.into(),
            after: after.into(),
        }
    }

    #[test]
    fn decides_by_the_refs_on_disk() {
        let disk: HashMap<&str, &str> = [
            ("refs/heads/new", B),
            ("refs/heads/old", A),
            ("refs/heads/later", C),
            ("refs/heads/committed", A),
        ]
        .into();
        let txs = vec![
            (
                PendingState::Prepared,
                vec![
                    up("refs/heads/new", A, B),
                    up("refs/heads/old", A, B),
                    up("refs/heads/later", A, B),
                ],
            ),
            // Created but absent: never landed. Deleted and absent: landed.
            (
                PendingState::Prepared,
                vec![
                    up("refs/heads/made", ZERO_OID, B),
                    up("refs/heads/gone", A, ZERO_OID),
                ],
            ),
            (
                PendingState::Committed,
                vec![up("refs/heads/committed", A, B)],
            ),
        ];
        let got = moved(&txs, |n| disk.get(n).copied());
        assert_eq!(
            got.iter().map(|r| r.refname.as_str()).collect::<Vec<_>>(),
            [
                "refs/heads/new",
                "refs/heads/later",
                "refs/heads/gone",
                "refs/heads/committed"
            ]
        );
        assert!(moved(&txs[..1], |_| Some(A)).is_empty());
    }

    #[test]
    fn process_keys() {
        let me = process_key(std::process::id()).unwrap();
        assert!(alive(&me));
        assert!(alive(&format!("{me}/tag")));
        let (pid, _) = me.split_once(':').unwrap();
        assert!(
            !alive(&format!("{pid}:1")),
            "a reused pid is another process"
        );
        for bad in ["", "x", "1", ":", "abc:1", "4294967296:1"] {
            assert!(!alive(bad), "{bad:?}");
        }
        let stat = "42 (a b) c) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 777 19";
        assert_eq!(start_time(stat), Some(777));
        assert_eq!(start_time("42 (x"), None);
        assert!(is_receive_pack(
            b"git\0receive-pack\0--stateless-rpc\0/r.git\0"
        ));
        assert!(is_receive_pack(
            b"/usr/lib/git-core/git-receive-pack\0/r.git\0"
        ));
        assert!(!is_receive_pack(b"git\0pack-refs\0--all\0"));
        assert!(!is_receive_pack(b""));
    }

    #[test]
    fn server_changes_become_events_only_when_the_ref_moved() {
        let dir = tempfile::tempdir().unwrap();
        let loc = Location::sqlite(dir.path());
        let store = Store::open(&loc).unwrap();
        let change = |ok: bool, now: Option<&str>| {
            let c = ServerChange::new(&loc, "o/r", "grpc:Merge".into());
            c.prepare(&up("refs/heads/main", A, B)).unwrap();
            assert_eq!(
                store.pending_owners().unwrap().len(),
                1,
                "pending before the write"
            );
            let now = now.map(str::to_owned);
            c.finish(ok, |_| now).unwrap()
        };
        assert!(change(true, None));
        assert!(
            !change(false, Some(A)),
            "the write failed, the ref did not move"
        );
        assert!(
            change(false, Some(B)),
            "an error after the write: the ref moved"
        );
        assert!(store.pending_owners().unwrap().is_empty());
        assert_eq!(store.outbox_depth().unwrap(), 2);
        let unprepared = ServerChange::new(&loc, "o/r", String::new());
        assert!(!unprepared.finish(false, |_| None).unwrap());
        let rows = store.outbox_after(0, 10).unwrap();
        let e = PushEvent::from_json(rows[0].payload.as_bytes()).unwrap();
        assert_eq!((e.via.as_str(), e.refs.len()), ("grpc:Merge", 1));
    }

    /// Runs git in `dir` with a fixed identity; its trimmed stdout.
    fn git_in(dir: &Path, args: &[&str], stdin: &str) -> String {
        use std::io::Write;
        let mut child = std::process::Command::new("git")
            .current_dir(dir)
            .args(args)
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@x")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@x")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("git");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "git {args:?}");
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    #[test]
    fn a_pass_publishes_what_landed_and_drops_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let loc = Location::sqlite(dir.path());
        let repo = dir.path().join("repos/o/r.git");
        std::fs::create_dir_all(&repo).unwrap();
        git_in(&repo, &["init", "-q", "--bare"], "");
        let tree = git_in(&repo, &["hash-object", "-t", "tree", "-w", "--stdin"], "");
        let sha = git_in(&repo, &["commit-tree", &tree, "-m", "x"], "");
        git_in(&repo, &["update-ref", "refs/heads/made", &sha], "");
        let store = Store::open(&loc).unwrap();
        let me = process_key(std::process::id()).unwrap();
        // Two dead pushes (pid 0 never runs a process) and a live one.
        for (owner, branch) in [("0:1", "made"), ("0:2", "never"), (me.as_str(), "live")] {
            let refs = vec![up(&format!("refs/heads/{branch}"), ZERO_OID, &sha)];
            store
                .pending_insert(&PendingRow {
                    id: 0,
                    owner: owner.into(),
                    repo: "o/r".into(),
                    refs: serde_json::to_string(&refs).unwrap(),
                    pusher: "alice".into(),
                    remote_addr: String::new(),
                    via: String::new(),
                    state: PendingState::Prepared,
                    created_at: 0,
                })
                .unwrap();
        }
        let git = PathBuf::from("git");
        let reconciler = Reconciler::new(&loc, &git);
        let tally = reconciler.pass().unwrap();
        assert_eq!(
            tally,
            Tally {
                published: 1,
                dropped: 1
            }
        );
        let rows = store.outbox_after(0, 10).unwrap();
        assert_eq!(rows.len(), 1);
        let event = PushEvent::from_json(rows[0].payload.as_bytes()).unwrap();
        assert_eq!(event.pusher, "alice");
        assert_eq!(event.refs[0].refname, "refs/heads/made");
        assert_eq!(
            store.pending_owners().unwrap(),
            std::slice::from_ref(&me),
            "live rows stay"
        );
        // Published rows stay (for a late post-receive) but are never published twice.
        assert_eq!(reconciler.pass().unwrap(), Tally::default());
        assert_eq!(
            store.pending_of("0:1").unwrap()[0].state,
            PendingState::Published
        );
        assert_eq!(store.outbox_depth().unwrap(), 1);
    }
}
