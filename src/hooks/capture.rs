//! Capture: git runs two hooks of ours in every receive-pack (`core.hooksPath=DATA/hooks`, where
//! [`install_hooks`] wrote scripts that exec this binary):
//! - `reference-transaction` records each ref transaction of the push in `hook_pending` in its
//!   `prepared` state (refs locked, nothing moved), durably, before git commits it; a failure
//!   exits non-zero, and git then aborts the update. `committed` and `aborted` mark or drop it.
//! - `post-receive` turns the push into one [`PushEvent`] row in the outbox (SQLite, WAL,
//!   synchronous=FULL) and forgets the push's pending rows, in one transaction. receive-pack
//!   waits for it, so the event is durable before the pusher sees the end of the push.
//!
//! A push whose receive-pack dies between the two leaves pending rows, which
//! [`super::pending`] reconciles against the refs on disk.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::event::{
    new_event_id, parse_ref_updates, parse_transaction, push_options, EventError, PushEvent,
};
use super::pending;
use crate::cluster::replicate;
use crate::git::repo_name::RepoName;
use crate::git::shell_quote;
use crate::store::{Location, PendingRow, PendingState, Store, StoreError};

/// Largest hook input accepted (a mirror push of very many refs still fits).
const MAX_INPUT: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("reading the hook's input: {0}")]
    Stdin(std::io::Error),
    #[error(transparent)]
    Event(#[from] EventError),
    #[error("cannot tell which repository was pushed: set GITPLANE_REPO, or run inside DATA/repos/OWNER/NAME.git")]
    UnknownRepo,
    #[error("recording the push event in the outbox: {0}")]
    Store(#[from] StoreError),
    #[error("cluster: {0}")]
    Cluster(String),
    #[error("writing hook {path}: {source}")]
    Install {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The repository `OWNER/NAME` from `GITPLANE_REPO`, else from the hook's working directory
/// (git runs hooks inside the bare repository).
fn repo_of(data_dir: &Path, var: &impl Fn(&str) -> Option<String>) -> Option<String> {
    if let Some(r) = var("GITPLANE_REPO").filter(|r| !r.is_empty()) {
        return RepoName::parse(&r).ok().map(|n| n.to_string());
    }
    let cwd = std::env::current_dir().ok()?.canonicalize().ok()?;
    let root = data_dir.join("repos").canonicalize().ok()?;
    let rel = cwd.strip_prefix(root).ok()?.to_str()?.to_owned();
    let name = rel.strip_suffix(".git").unwrap_or(&rel);
    RepoName::parse(name).ok().map(|n| n.to_string())
}

/// Builds the event for one push from the hook's input and environment.
pub fn event_from_hook(
    data_dir: &Path,
    input: &str,
    var: impl Fn(&str) -> Option<String>,
) -> Result<PushEvent, CaptureError> {
    let refs = parse_ref_updates(input)?;
    let repository = repo_of(data_dir, &var).ok_or(CaptureError::UnknownRepo)?;
    let pushed_at = i64::try_from(crate::clock::unix_now()).unwrap_or(i64::MAX);
    Ok(PushEvent {
        id: new_event_id(),
        repository,
        pusher: var("GITPLANE_USER").unwrap_or_default(),
        remote_addr: var("GITPLANE_REMOTE_ADDR").unwrap_or_default(),
        via: String::new(),
        refs,
        push_options: push_options(&var),
        pushed_at,
    })
}

/// Writes a push's one event into the outbox and forgets the pending transactions of `owner`
/// (its receive-pack), in one write transaction. Records nothing when the reconciler has already
/// published them (it found the receive-pack dead while this hook still ran). Returns whether the
/// event was recorded.
pub fn record(
    location: &Location,
    owner: Option<&str>,
    event: &PushEvent,
) -> Result<bool, CaptureError> {
    let store = Store::open(location)?;
    Ok(store.write_transaction(|s| {
        if let Some(owner) = owner {
            let rows = s.pending_of(owner)?;
            s.pending_forget(owner)?;
            if rows.iter().any(|r| r.state == PendingState::Published) {
                return Ok(false);
            }
        }
        s.outbox_insert(&event.id, &event.repository, &event.to_json())?;
        Ok(true)
    })?)
}

fn read_input(stdin: impl Read) -> Result<String, CaptureError> {
    let mut input = String::new();
    stdin
        .take(MAX_INPUT)
        .read_to_string(&mut input)
        .map_err(CaptureError::Stdin)?;
    Ok(input)
}

/// `gitplane hook post-receive`: reads git's input from `stdin`, records the event, returns it.
/// A push that changed no ref (git does not run the hook then, but be safe) records nothing.
pub fn post_receive(
    location: &Location,
    stdin: impl Read,
) -> Result<Option<PushEvent>, CaptureError> {
    let input = read_input(stdin)?;
    if replicate::is_replica() {
        return Ok(None);
    }
    let event = event_from_hook(location.data_dir(), &input, |k| std::env::var(k).ok())?;
    if event.refs.is_empty() {
        return Ok(None);
    }
    let owner = pending::receive_pack_parent();
    Ok(record(location, owner.as_deref(), &event)?.then_some(event))
}

/// The states of git's `reference-transaction` hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxState {
    Prepared,
    Committed,
    Aborted,
}

impl TxState {
    /// None for a state git may add later (2.48 has `preparing`, before the refs are locked):
    /// nothing to record there.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "prepared" => Some(Self::Prepared),
            "committed" => Some(Self::Committed),
            "aborted" => Some(Self::Aborted),
            _ => None,
        }
    }
}

/// `gitplane hook reference-transaction STATE`. Records only transactions of a push (the parent
/// is receive-pack); pack-refs and gc run the hook too.
pub fn reference_transaction(
    location: &Location,
    state: &str,
    stdin: impl Read,
) -> Result<(), CaptureError> {
    let input = read_input(stdin)?;
    // A replica's copy of a write another node coordinates: that node records its event.
    if replicate::is_replica() {
        return Ok(());
    }
    let (Some(state), Some(owner)) = (TxState::parse(state), pending::receive_pack_parent()) else {
        return Ok(());
    };
    let var = |k: &str| std::env::var(k).ok();
    record_transaction(location, state, &owner, &input, var)?;
    if let Some(routing) = replicate::from_env(location) {
        let updates: Vec<replicate::RefUpdate> = parse_transaction(&input)?
            .into_iter()
            .map(|u| replicate::RefUpdate {
                before: u.before,
                after: u.after,
                refname: u.refname,
            })
            .collect();
        if updates.is_empty() {
            return Ok(());
        }
        let repo = repo_of(location.data_dir(), &var).ok_or(CaptureError::UnknownRepo)?;
        // git runs a bare repository's hooks in the repository.
        let dir = std::env::current_dir().map_err(CaptureError::Stdin)?;
        let cluster = |e: crate::cluster::ClusterError| CaptureError::Cluster(e.to_string());
        match state {
            TxState::Prepared => {
                replicate::prepared(location, &routing, &repo, &dir, &updates).map_err(cluster)?
            }
            TxState::Committed => {
                replicate::finished(location, &repo, &dir, &updates, true).map_err(cluster)?
            }
            TxState::Aborted => {
                replicate::finished(location, &repo, &dir, &updates, false).map_err(cluster)?
            }
        }
    }
    Ok(())
}

/// Records one state of one transaction of `owner`'s push.
pub fn record_transaction(
    location: &Location,
    state: TxState,
    owner: &str,
    input: &str,
    var: impl Fn(&str) -> Option<String>,
) -> Result<(), CaptureError> {
    let refs = parse_transaction(input)?;
    if refs.is_empty() {
        return Ok(());
    }
    // The same text for the same updates: `committed` and `aborted` find the row by it.
    let refs = serde_json::to_string(&refs).map_err(|e| EventError::Payload(e.to_string()))?;
    let store = Store::open(location)?;
    match state {
        TxState::Prepared => {
            let repo = repo_of(location.data_dir(), &var).ok_or(CaptureError::UnknownRepo)?;
            store.pending_insert(&PendingRow {
                id: 0,
                owner: owner.to_owned(),
                repo,
                refs,
                pusher: var("GITPLANE_USER").unwrap_or_default(),
                remote_addr: var("GITPLANE_REMOTE_ADDR").unwrap_or_default(),
                via: String::new(),
                state: PendingState::Prepared,
                created_at: 0,
            })?;
        }
        TxState::Committed => store.pending_committed(owner, &refs)?,
        TxState::Aborted => store.pending_aborted(owner, &refs)?,
    }
    Ok(())
}

/// The hooks [`install_hooks`] writes, and the arguments their scripts pass on.
const HOOKS: [(&str, &str); 2] = [
    ("post-receive", "hook post-receive"),
    ("reference-transaction", "hook reference-transaction \"$1\""),
];

/// Writes `DATA/hooks/post-receive` and `DATA/hooks/reference-transaction`, which exec `exe hook
/// ...` for `data_dir`, and returns the hooks directory (for `core.hooksPath`). Each is written
/// to a temporary name and renamed, so a push running during a restart never sees half a script.
pub fn install_hooks(
    location: &Location,
    exe: &Path,
    extra_env: &[(&str, String)],
) -> Result<PathBuf, CaptureError> {
    let data_dir = location.data_dir();
    let install = |path: &Path, source| CaptureError::Install {
        path: path.to_owned(),
        source,
    };
    let data_dir = data_dir.canonicalize().map_err(|e| install(data_dir, e))?;
    // One directory per server process: during a hot upgrade two generations serve at once,
    // and each one's git children must run that generation's hooks (its `exe`), not whatever
    // the other one wrote last, which may be a generation that failed to start and is gone.
    let root = data_dir.join("hooks");
    remove_stale_generations(&root);
    let dir = root.join(format!("gen-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| install(&dir, e))?;
    // A shared store's URL may hold a password: it goes in the script (readable by this user
    // only, like the data dir's own database), not on a command line other users can see.
    let mut store_env = match location.secret_url() {
        Some(url) => format!(
            "GITPLANE_DATABASE_URL={}\nexport GITPLANE_DATABASE_URL\n",
            shell_quote(url)
        ),
        None => String::new(),
    };
    for (k, v) in extra_env {
        store_env.push_str(&format!("{k}={}\nexport {k}\n", shell_quote(v)));
    }
    let node = match location.node() {
        "" => String::new(),
        n => format!(" --node-id {}", shell_quote(n)),
    };
    for (name, args) in HOOKS {
        let script = format!(
            "#!/bin/sh\n# Written by gitplane at start-up: records each push in the hook outbox.\n{store_env}exec {} --data-dir {}{node} {args}\n",
            shell_quote(&exe.to_string_lossy()),
            shell_quote(&data_dir.to_string_lossy()),
        );
        let path = dir.join(name);
        let tmp = dir.join(format!(".{name}.{}", std::process::id()));
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(script.as_bytes())?;
            f.set_permissions(std::fs::Permissions::from_mode(0o700))?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        };
        write().map_err(|e| install(&path, e))?;
    }
    Ok(dir)
}

/// A dead generation's hooks are kept this long: a receive-pack it started may outlive it (after
/// a `kill -9`), and git runs *without* hooks when their directory is gone, so removing it at
/// once would let such a push move a ref with no pending row and no event. With the directory
/// kept, the hook execs the dead process's `/proc/PID/exe`, fails, and git aborts the update.
const KEEP_DEAD_GENERATION: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// Removes the hook directories of server processes that stopped running a day ago or more.
fn remove_stale_generations(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    let old_enough = |entry: &std::fs::DirEntry| {
        entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age >= KEEP_DEAD_GENERATION)
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("gen-"))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() && old_enough(&entry) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_generation_has_its_own_hooks_and_long_dead_ones_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let loc = Location::sqlite(dir.path());
        let long_gone = dir.path().join("hooks/gen-4000000000");
        let just_gone = dir.path().join("hooks/gen-4000000001");
        std::fs::create_dir_all(&long_gone).unwrap();
        std::fs::create_dir_all(&just_gone).unwrap();
        let two_days_ago = std::time::SystemTime::now() - 2 * KEEP_DEAD_GENERATION;
        std::fs::File::open(&long_gone)
            .unwrap()
            .set_modified(two_days_ago)
            .unwrap();
        let hooks = install_hooks(&loc, Path::new("/usr/bin/gitplane"), &[]).unwrap();
        assert!(hooks.ends_with(format!("hooks/gen-{}", std::process::id())));
        assert!(
            !long_gone.exists(),
            "a long dead generation's hooks are removed"
        );
        // A receive-pack of a just killed server may still run them: git would run without hooks.
        assert!(
            just_gone.exists(),
            "a just dead generation's hooks are kept"
        );
    }

    #[test]
    fn records_an_event_and_installs_the_script() {
        let dir = tempfile::tempdir().unwrap();
        let loc = Location::sqlite(dir.path());
        let input = format!(
            "{} {} refs/heads/main\n",
            super::super::event::ZERO_OID,
            "a".repeat(40)
        );
        let vars = |k: &str| match k {
            "GITPLANE_REPO" => Some("alice/proj".to_owned()),
            "GITPLANE_USER" => Some("alice".to_owned()),
            "GIT_PUSH_OPTION_COUNT" => Some("1".to_owned()),
            "GIT_PUSH_OPTION_0" => Some("ci.skip".to_owned()),
            _ => None,
        };
        let event = event_from_hook(dir.path(), &input, vars).unwrap();
        assert_eq!(event.repository, "alice/proj");
        assert_eq!(event.push_options, vec!["ci.skip".to_owned()]);
        assert!(record(&loc, None, &event).unwrap());
        let store = Store::open(&loc).unwrap();
        let rows = store.outbox_after(0, 10).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(
            PushEvent::from_json(rows[0].payload.as_bytes()).unwrap(),
            event
        );

        let bad = event_from_hook(dir.path(), &input, |_| None);
        assert!(matches!(bad, Err(CaptureError::UnknownRepo)));

        let hooks = install_hooks(&loc, Path::new("/usr/bin/gitplane"), &[]).unwrap();
        let script = std::fs::read_to_string(hooks.join("post-receive")).unwrap();
        assert!(
            script.contains("exec '/usr/bin/gitplane' --data-dir '"),
            "{script}"
        );
        let tx = std::fs::read_to_string(hooks.join("reference-transaction")).unwrap();
        assert!(tx.contains("hook reference-transaction \"$1\""), "{tx}");
        let mode = std::fs::metadata(hooks.join("post-receive"))
            .unwrap()
            .permissions()
            .mode();
        // Owner only: with a shared store the script carries the database URL.
        assert_eq!(mode & 0o777, 0o700);
    }

    #[test]
    fn a_shared_store_reaches_the_hook_process() {
        let dir = tempfile::tempdir().unwrap();
        let loc = Location::new(
            dir.path(),
            Some("postgres://gp:pw@127.0.0.1:5432/fleet"),
            Some("node-a"),
            2,
        )
        .unwrap();
        let hooks = install_hooks(&loc, Path::new("/usr/bin/gitplane"), &[]).unwrap();
        let script = std::fs::read_to_string(hooks.join("post-receive")).unwrap();
        assert!(
            script.contains("GITPLANE_DATABASE_URL='postgres://gp:pw@127.0.0.1:5432/fleet'\nexport GITPLANE_DATABASE_URL\n"),
            "{script}"
        );
        assert!(
            script.contains(" --node-id 'node-a' hook post-receive"),
            "{script}"
        );
    }

    #[test]
    fn one_event_per_push_and_none_after_the_reconciler() {
        let dir = tempfile::tempdir().unwrap();
        let loc = Location::sqlite(dir.path());
        let (a, b) = ("a".repeat(40), "b".repeat(40));
        let tx1 = format!("{a} {b} refs/heads/main\n{a} {b} HEAD\n");
        let tx2 = format!("{} {b} refs/heads/topic\n", super::super::event::ZERO_OID);
        let vars = |k: &str| (k == "GITPLANE_REPO").then(|| "alice/proj".to_owned());
        let store = Store::open(&loc).unwrap();
        // A non-atomic push: one transaction per ref, the second aborted.
        for (state, input) in [
            (TxState::Prepared, &tx1),
            (TxState::Committed, &tx1),
            (TxState::Prepared, &tx2),
            (TxState::Aborted, &tx2),
        ] {
            record_transaction(&loc, state, "7:1", input, vars).unwrap();
        }
        let rows = store.pending_of("7:1").unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].state, PendingState::Committed);
        assert!(!rows[0].refs.contains("HEAD"), "{}", rows[0].refs);
        let event = event_from_hook(dir.path(), &tx1, vars).unwrap();
        assert!(record(&loc, Some("7:1"), &event).unwrap());
        assert!(store.pending_of("7:1").unwrap().is_empty());
        assert_eq!(store.outbox_depth().unwrap(), 1);

        // The reconciler published this push already: its late post-receive adds nothing.
        record_transaction(&loc, TxState::Prepared, "8:1", &tx1, vars).unwrap();
        store.pending_published("8:1").unwrap();
        let late = event_from_hook(dir.path(), &tx1, vars).unwrap();
        assert!(!record(&loc, Some("8:1"), &late).unwrap());
        assert_eq!(store.outbox_depth().unwrap(), 1);
        assert!(store.pending_of("8:1").unwrap().is_empty());

        // Malformed input is refused (git then aborts the update), and nothing is recorded.
        let bad = record_transaction(&loc, TxState::Prepared, "9:1", "x y\n", vars);
        assert!(
            matches!(bad, Err(CaptureError::Event(EventError::BadTxLine { .. }))),
            "{bad:?}"
        );
        assert!(store.pending_of("9:1").unwrap().is_empty());
        assert_eq!(TxState::parse("preparing"), None);
    }
}
