//! Repair: each node brings its own outdated copies up to date. Every second it asks the store
//! which of its replicas are behind; for each, under the repository's cluster-wide lock (so no
//! write moves the refs meanwhile), it fetches every ref from a current copy of an up node with
//! `--prune` (a ref the majority deleted goes; one a failed write left here is put back), checks
//! that its refs now equal the source's, and only then takes the current generation. Until then
//! routing never reads from it, so a node that comes back serves only what it has caught up on.
//! The job's state is the generations in the store: a crash mid-repair leaves the copy outdated,
//! and the next pass starts it again.

use std::path::Path;
use std::time::Duration;

use super::membership::Routing;
use super::replicate::{ext_url, run_bounded};
use super::ClusterError;
use crate::git::repo::RepoRoot;
use crate::git::repo_name::RepoName;
use crate::store::{Location, Store};

const PASS_EVERY: Duration = Duration::from_secs(1);
/// A fetch of a whole repository may take a while; past this the pass gives up on it for now.
const FETCH_TIMEOUT: Duration = Duration::from_secs(600);

/// Starts the repair loop of this node.
pub fn start(
    location: Location,
    routing: Routing,
    repos: RepoRoot,
    git: std::path::PathBuf,
) -> std::io::Result<()> {
    match super::replicate::recover_interrupted(&location, repos.root()) {
        Ok(0) => {}
        Ok(n) => tracing::warn!(
            copies = n,
            "copies marked outdated after an interrupted write"
        ),
        Err(e) => tracing::error!(error = %e, "cannot check for interrupted writes"),
    }
    std::thread::Builder::new()
        .name("gitplane-repair".into())
        .spawn(move || loop {
            if let Err(e) = pass(&location, &routing, &repos, &git) {
                tracing::warn!(error = %e, "repair pass failed");
            }
            std::thread::sleep(PASS_EVERY);
        })
        .map(drop)
}

/// One pass over this node's outdated copies; how many it repaired.
pub fn pass(
    location: &Location,
    routing: &Routing,
    repos: &RepoRoot,
    git: &Path,
) -> Result<usize, ClusterError> {
    let store = Store::open(location)?;
    let mut repaired = 0;
    for (repo, have, want) in store.outdated_on(&routing.node)? {
        store.lock_repo(&repo)?;
        let r = repair_locked(&store, routing, repos, git, &repo);
        let _ = store.unlock_repo(&repo);
        match r {
            Ok(Some(generation)) => {
                repaired += 1;
                tracing::info!(
                    repo,
                    from = have,
                    to = generation,
                    wanted = want,
                    "replica repaired"
                );
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(repo, error = %e, "replica not repaired yet"),
        }
    }
    Ok(repaired)
}

/// Some(new generation) when repaired; None when there was nothing to do or nobody to copy from.
fn repair_locked(
    store: &Store,
    routing: &Routing,
    repos: &RepoRoot,
    git: &Path,
    repo: &str,
) -> Result<Option<i64>, ClusterError> {
    let Some(replicas) = store.replicas(repo)? else {
        return Ok(None);
    };
    if replicas.is_current(&routing.node) {
        return Ok(None);
    }
    let up = routing.up_nodes(store)?;
    let Some(source) = replicas
        .current()
        .find_map(|n| up.iter().find(|u| u.id == n && u.id != routing.node))
    else {
        return Ok(None);
    };
    let name = RepoName::parse(repo).map_err(|e| ClusterError::Git(e.to_string()))?;
    let dir = repos.path_of(&name);
    if !dir.is_dir() {
        repos
            .init_bare(git, &name)
            .map_err(|e| ClusterError::Git(e.to_string()))?;
    }
    let url = ext_url(&routing.secret_file, &source.cluster_addr, repo, true);
    let mut fetch = crate::git::process::git_command(git, &dir);
    fetch
        .current_dir(&dir)
        .env("GIT_DIR", &dir)
        .args([
            "-c",
            "protocol.ext.allow=always",
            "fetch",
            "--quiet",
            "--prune",
            "--force",
        ])
        .arg(&url)
        .arg("+refs/*:refs/*");
    run_bounded(fetch, FETCH_TIMEOUT).map_err(ClusterError::Git)?;
    // Under the lock the source cannot move: its refs and ours must now be the same.
    let theirs = ls_remote(git, &dir, &url)?;
    let ours = for_each_ref(git, &dir)?;
    if theirs != ours {
        return Err(ClusterError::Git(format!(
            "refs differ from {} after the fetch",
            source.id
        )));
    }
    store.set_replica_generation(repo, &routing.node, replicas.generation)?;
    Ok(Some(replicas.generation))
}

/// "OID REF" lines of the remote's refs under refs/, sorted.
fn ls_remote(git: &Path, dir: &Path, url: &str) -> Result<Vec<String>, ClusterError> {
    let out = crate::git::process::git_command(git, dir)
        .current_dir(dir)
        .env("GIT_DIR", dir)
        .args([
            "-c",
            "protocol.ext.allow=always",
            "ls-remote",
            "--refs",
            url,
            "refs/*",
        ])
        .output()
        .map_err(|e| ClusterError::Git(e.to_string()))?;
    if !out.status.success() {
        return Err(ClusterError::Git(
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ));
    }
    Ok(sorted_lines(&out.stdout, |l| l.replace('\t', " ")))
}

/// "OID REF" lines of the local refs, sorted.
pub fn for_each_ref(git: &Path, dir: &Path) -> Result<Vec<String>, ClusterError> {
    let out = crate::git::process::git_command(git, dir)
        .current_dir(dir)
        .env("GIT_DIR", dir)
        .args(["for-each-ref", "--format=%(objectname) %(refname)", "refs/"])
        .output()
        .map_err(|e| ClusterError::Git(e.to_string()))?;
    if !out.status.success() {
        return Err(ClusterError::Git(
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ));
    }
    Ok(sorted_lines(&out.stdout, str::to_owned))
}

fn sorted_lines(bytes: &[u8], f: impl Fn(&str) -> String) -> Vec<String> {
    let mut lines: Vec<String> = String::from_utf8_lossy(bytes)
        .lines()
        .filter(|l| !l.is_empty())
        .map(f)
        .collect();
    lines.sort();
    lines
}
