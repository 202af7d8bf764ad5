//! The coordinator's side of a write. A push runs on one node holding a current copy (the client
//! reached it, or was relayed to it); git there calls the `reference-transaction` hook with the
//! exact ref updates once their locks are taken (`prepared`). The hook, under the repository's
//! cluster-wide lock, pushes the same updates to every other current, up replica (an atomic push
//! whose leases name the old values, so a replica that moved is refused, not overwritten), and
//! lets git commit only when this copy plus the replicas that took it make a majority of all
//! replicas. The repository's generation then goes up, with the replicas that took it; this
//! copy's goes up when git reports the refs committed. Every other replica is outdated until
//! repaired. See docs/CLUSTER.md.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::membership::Routing;
use super::ClusterError;
use crate::store::{Location, Store};

/// How long one replica may take to take a write before it counts as a failed vote.
pub const REPLICA_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a write waits for this copy to finish committing the previous one.
const OWN_COMMIT_WAIT: Duration = Duration::from_secs(5);

/// The variables the hook scripts of a cluster node export.
pub const SECRET_FILE_VAR: &str = "GITPLANE_CLUSTER_SECRET_FILE";
/// Set on a replica's git by the transport: nothing to coordinate, no event to record.
pub const REPLICA_VAR: &str = "GITPLANE_REPLICA";

/// The hook's routing view, from its environment; None outside a cluster.
pub fn from_env(location: &Location) -> Option<Routing> {
    let secret_file = std::env::var_os(SECRET_FILE_VAR)?;
    Some(Routing {
        node: location.node().to_owned(),
        secret_file: PathBuf::from(secret_file),
        relay_cache: false,
    })
}

/// Whether this git is a replica's copy of a write coordinated elsewhere.
pub fn is_replica() -> bool {
    std::env::var_os(REPLICA_VAR).is_some_and(|v| v == "1")
}

/// One ref update of a transaction, as git gave it to the hook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefUpdate {
    pub before: String,
    pub after: String,
    pub refname: String,
}

fn is_zero(oid: &str) -> bool {
    oid.bytes().all(|b| b == b'0')
}

/// The names of [`pending_file`]s start so.
const TXN_PREFIX: &str = "gitplane-txn-";

/// Where the generation a prepared transaction will give this copy waits for `committed`.
fn pending_file(repo_dir: &Path, updates: &[RefUpdate]) -> PathBuf {
    let mut h = Sha256::new();
    for u in updates {
        h.update(format!("{} {} {}\n", u.before, u.after, u.refname));
    }
    repo_dir.join(format!("{TXN_PREFIX}{}", hex::encode(&h.finalize()[..12])))
}

/// Whether a write of this copy's is between its vote and its commit ([`pending_file`]); true
/// when the directory cannot be read, so a caller relying on false relies on a fact.
pub fn transaction_pending(repo_dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(repo_dir) else {
        return true;
    };
    entries.flatten().any(|e| {
        e.file_name()
            .as_encoded_bytes()
            .starts_with(TXN_PREFIX.as_bytes())
    })
}

/// `prepared`: replicate, count votes; Err makes git abort the update.
pub fn prepared(
    location: &Location,
    routing: &Routing,
    repo: &str,
    repo_dir: &Path,
    updates: &[RefUpdate],
) -> Result<(), ClusterError> {
    let store = Store::open(location)?;
    store.lock_repo(repo)?;
    let result = replicate_locked(&store, routing, repo, repo_dir, updates);
    let _ = store.unlock_repo(repo);
    result
}

fn replicate_locked(
    store: &Store,
    routing: &Routing,
    repo: &str,
    repo_dir: &Path,
    updates: &[RefUpdate],
) -> Result<(), ClusterError> {
    // The previous write through this node may be between its vote count and git's commit,
    // the moment this copy's generation catches up: wait that out (it is short), not refuse.
    let deadline = Instant::now() + OWN_COMMIT_WAIT;
    let replicas = loop {
        let Some(replicas) = store.replicas(repo)? else {
            return Ok(());
        };
        if replicas.replicas.is_empty() {
            return Ok(());
        }
        if replicas.is_current(&routing.node) {
            break replicas;
        }
        if Instant::now() >= deadline {
            return Err(ClusterError::Refused(format!(
                "this node's copy of {repo} is outdated; retry (the push will go to a current one)"
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let up = routing.up_nodes(store)?;
    let targets: Vec<(String, String)> = replicas
        .current()
        .filter(|n| *n != routing.node)
        .filter_map(|n| {
            up.iter()
                .find(|u| u.id == n)
                .map(|u| (u.id.clone(), u.cluster_addr.clone()))
        })
        .collect();
    // In doubt until the votes are counted: if this process dies while a replica holds the
    // update, that replica must not pass for current with a write nobody acknowledged. Marked
    // outdated first, each is made current again only by the commit below (or by repair, from a
    // copy that is current).
    for (node, _) in &targets {
        store.set_replica_generation(repo, node, replicas.generation - 1)?;
    }
    let outcomes: Vec<(String, Result<(), String>)> = std::thread::scope(|s| {
        let handles: Vec<_> = targets
            .iter()
            .map(|(node, addr)| {
                s.spawn(move || {
                    (
                        node.clone(),
                        push_to(&routing.secret_file, addr, repo, repo_dir, updates),
                    )
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| (String::new(), Err("replication thread panicked".into())))
            })
            .collect()
    });
    let took: Vec<&str> = outcomes
        .iter()
        .filter(|(_, r)| r.is_ok())
        .map(|(n, _)| n.as_str())
        .collect();
    for (node, r) in &outcomes {
        if let Err(e) = r {
            tracing::warn!(repo, node, error = %e, "replica did not take the write");
        }
    }
    let votes = 1 + took.len();
    if votes < replicas.quorum() {
        // Those that took it hold a write that is not acknowledged: they stay outdated, and
        // repair puts them back to the current copies' refs.
        return Err(ClusterError::Refused(format!(
            "only {votes} of {} replicas of {repo} took the update ({} needed); nothing changed",
            replicas.replicas.len(),
            replicas.quorum()
        )));
    }
    // This copy counts as holding the write from here: git commits it as soon as the hook
    // returns (renaming lock files), and a copy left behind at this point would be skipped by
    // the next write and wait for repair. The file below marks the short window in which it
    // does not yet hold it: a node that restarts with such a file left marks its copy outdated
    // before it serves (see [`recover_interrupted`]).
    let pending = pending_file(repo_dir, updates);
    let mut voters = took.clone();
    voters.push(&routing.node);
    let generation = replicas.generation + 1;
    std::fs::write(&pending, generation.to_string())
        .map_err(|e| ClusterError::Git(format!("recording the pending generation: {e}")))?;
    if let Err(e) = store.commit_generation(repo, &voters) {
        let _ = std::fs::remove_file(&pending);
        return Err(e.into());
    }
    Ok(())
}

/// `committed` or `aborted`: the window is closed. (An abort after a majority voted leaves this
/// copy behind a write the others hold: it is marked outdated, and repaired.)
pub fn finished(
    location: &Location,
    repo: &str,
    repo_dir: &Path,
    updates: &[RefUpdate],
    committed: bool,
) -> Result<(), ClusterError> {
    let file = pending_file(repo_dir, updates);
    let Ok(text) = std::fs::read_to_string(&file) else {
        return Ok(());
    };
    if !committed {
        let generation: i64 = text.trim().parse().unwrap_or(i64::MAX);
        Store::open(location)?.set_replica_generation(repo, location.node(), generation - 1)?;
    }
    let _ = std::fs::remove_file(&file);
    Ok(())
}

/// At start-up, before serving: a copy with a transaction file left (the process died between
/// the vote and git's commit) may lack a write the cluster counts it as holding; it is marked
/// outdated, and the repair loop brings it in line.
pub fn recover_interrupted(location: &Location, repos_root: &Path) -> Result<usize, ClusterError> {
    let mut marked = 0;
    let Ok(owners) = std::fs::read_dir(repos_root) else {
        return Ok(0);
    };
    let store = Store::open(location)?;
    for owner in owners.flatten() {
        let Ok(repos) = std::fs::read_dir(owner.path()) else {
            continue;
        };
        for repo in repos.flatten() {
            let files: Vec<PathBuf> = std::fs::read_dir(repo.path())
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("gitplane-txn-"))
                })
                .collect();
            if files.is_empty() {
                continue;
            }
            let name = format!(
                "{}/{}",
                owner.file_name().to_string_lossy(),
                repo.file_name().to_string_lossy().trim_end_matches(".git")
            );
            if let Some(r) = store.replicas(&name)? {
                store.set_replica_generation(&name, location.node(), r.generation - 1)?;
                marked += 1;
                tracing::warn!(
                    repo = name,
                    "an interrupted write left this copy in doubt: outdated until repaired"
                );
            }
            for f in files {
                let _ = std::fs::remove_file(f);
            }
        }
    }
    Ok(marked)
}

/// The `ext::` URL (`%S`: git's full service name) that reaches `repo` on the node at `addr` through the cluster transport.
pub fn ext_url(secret_file: &Path, addr: &str, repo: &str, replica: bool) -> String {
    format!(
        "ext::{} cluster-exec --addr {addr} --secret-file {} --repo {repo}{} %S",
        crate::lifecycle::exe().display(),
        secret_file.display(),
        if replica { " --replica" } else { "" }
    )
}

/// Runs `cmd` with a deadline; its stderr on failure.
pub fn run_bounded(mut cmd: Command, limit: Duration) -> Result<(), String> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run git: {e}"))?;
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                return if status.success() {
                    Ok(())
                } else {
                    Err(err.trim().to_owned())
                };
            }
            Ok(None) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("no answer within {} s", limit.as_secs()));
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// One replica's vote: an atomic push of exactly `updates`, each leased on its old value.
fn push_to(
    secret_file: &Path,
    addr: &str,
    repo: &str,
    repo_dir: &Path,
    updates: &[RefUpdate],
) -> Result<(), String> {
    let mut cmd = Command::new("git");
    cmd.current_dir(repo_dir)
        .env("GIT_DIR", repo_dir)
        .args([
            "-c",
            "protocol.ext.allow=always",
            "push",
            "--atomic",
            "--quiet",
        ])
        .arg("--no-verify");
    for u in updates {
        let expect = if is_zero(&u.before) {
            String::new()
        } else {
            u.before.clone()
        };
        cmd.arg(format!("--force-with-lease={}:{expect}", u.refname));
    }
    cmd.arg(ext_url(secret_file, addr, repo, true));
    for u in updates {
        if is_zero(&u.after) {
            cmd.arg(format!(":{}", u.refname));
        } else {
            cmd.arg(format!("+{}:{}", u.after, u.refname));
        }
    }
    run_bounded(cmd, REPLICA_TIMEOUT)
}
