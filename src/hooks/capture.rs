//! Capture: git's post-receive hook runs `gitplane hook post-receive`, which turns the push into
//! one [`PushEvent`] row in the outbox (SQLite, WAL, synchronous=FULL) and exits. receive-pack
//! waits for the hook, so the event is durable before the pusher sees success. The server points
//! every receive-pack at `DATA/hooks` (`core.hooksPath`), where [`install_hooks`] wrote a
//! `post-receive` that execs this binary.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::event::{new_event_id, parse_ref_updates, push_options, EventError, PushEvent};
use crate::git::process::shell_quote;
use crate::git::repo_name::RepoName;
use crate::store::{Store, StoreError};

/// Largest post-receive input accepted (a mirror push of very many refs still fits).
const MAX_INPUT: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("reading post-receive input: {0}")]
    Stdin(std::io::Error),
    #[error(transparent)]
    Event(#[from] EventError),
    #[error("cannot tell which repository was pushed: set GITPLANE_REPO, or run inside DATA/repos/OWNER/NAME.git")]
    UnknownRepo,
    #[error("recording the push event in the outbox: {0}")]
    Store(#[from] StoreError),
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

/// Writes one event into the outbox; returns it.
pub fn record(data_dir: &Path, event: &PushEvent) -> Result<(), CaptureError> {
    let store = Store::open(data_dir)?;
    store.outbox_insert(&event.id, &event.repository, &event.to_json())?;
    Ok(())
}

/// `gitplane hook post-receive`: reads git's input from `stdin`, records the event, returns it.
/// A push that changed no ref (git does not run the hook then, but be safe) records nothing.
pub fn post_receive(data_dir: &Path, stdin: impl Read) -> Result<Option<PushEvent>, CaptureError> {
    let mut input = String::new();
    stdin
        .take(MAX_INPUT)
        .read_to_string(&mut input)
        .map_err(CaptureError::Stdin)?;
    let event = event_from_hook(data_dir, &input, |k| std::env::var(k).ok())?;
    if event.refs.is_empty() {
        return Ok(None);
    }
    record(data_dir, &event)?;
    Ok(Some(event))
}

/// Writes `DATA/hooks/post-receive`, which execs `exe hook post-receive` for `data_dir`, and
/// returns the hooks directory (for `core.hooksPath`). Written to a temporary name and renamed,
/// so a push running during a restart never sees half a script.
pub fn install_hooks(data_dir: &Path, exe: &Path) -> Result<PathBuf, CaptureError> {
    let install = |path: &Path, source| CaptureError::Install {
        path: path.to_owned(),
        source,
    };
    let data_dir = data_dir.canonicalize().map_err(|e| install(data_dir, e))?;
    let dir = data_dir.join("hooks");
    std::fs::create_dir_all(&dir).map_err(|e| install(&dir, e))?;
    let script = format!(
        "#!/bin/sh\n# Written by gitplane at start-up: records each push in the hook outbox.\nexec {} --data-dir {} hook post-receive\n",
        shell_quote(&exe.to_string_lossy()),
        shell_quote(&data_dir.to_string_lossy()),
    );
    let path = dir.join("post-receive");
    let tmp = dir.join(format!(".post-receive.{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(script.as_bytes())?;
        f.set_permissions(std::fs::Permissions::from_mode(0o755))?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    };
    write().map_err(|e| install(&path, e))?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_an_event_and_installs_the_script() {
        let dir = tempfile::tempdir().unwrap();
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
        record(dir.path(), &event).unwrap();
        let store = Store::open(dir.path()).unwrap();
        let rows = store.outbox_after(0, 10).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(
            PushEvent::from_json(rows[0].payload.as_bytes()).unwrap(),
            event
        );

        let bad = event_from_hook(dir.path(), &input, |_| None);
        assert!(matches!(bad, Err(CaptureError::UnknownRepo)));

        let hooks = install_hooks(dir.path(), Path::new("/usr/bin/gitplane")).unwrap();
        let script = std::fs::read_to_string(hooks.join("post-receive")).unwrap();
        assert!(
            script.contains("exec '/usr/bin/gitplane' --data-dir '"),
            "{script}"
        );
        let mode = std::fs::metadata(hooks.join("post-receive"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
    }
}
