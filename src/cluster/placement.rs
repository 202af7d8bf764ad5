//! Where repositories live: a new one on the `replication_factor` least loaded up nodes (fewest
//! replicas), moves of one replica from a node to another (copy, verify, switch, delete), and
//! draining a node by moving every replica it holds. Run by the admin CLI on any node.

use super::auth::Secret;
use super::membership::Routing;
use super::ClusterError;
use crate::git::repo_name::RepoName;
use crate::store::cluster::NodeRecord;
use crate::store::{Location, Store, StoreError};
use gitplane_wire::cluster::Op;

/// How long a move waits for the new copy to catch up.
const MOVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

/// The nodes a new repository goes to: up, not draining, fewest replicas first.
pub fn choose(up: &[NodeRecord], factor: usize) -> Vec<String> {
    let mut candidates: Vec<&NodeRecord> = up.iter().filter(|n| !n.draining).collect();
    candidates.sort_by(|a, b| a.replicas.cmp(&b.replicas).then(a.id.cmp(&b.id)));
    candidates
        .into_iter()
        .take(factor.max(1))
        .map(|n| n.id.clone())
        .collect()
}

/// `gitplane repo create` in a cluster: records the repository and its replicas, then creates
/// it on each node; undone if any node fails. Returns the nodes.
pub fn create(
    location: &Location,
    routing: &Routing,
    secret: &Secret,
    name: &RepoName,
    public: bool,
    factor: usize,
) -> Result<Vec<String>, ClusterError> {
    let store = Store::open(location)?;
    let up = routing.up_nodes(&store)?;
    let nodes = choose(&up, factor);
    if nodes.is_empty() {
        return Err(ClusterError::Refused("no node of the cluster is up".into()));
    }
    store.create_replicated_repo(name, public, &nodes)?;
    let repo = name.to_string();
    let addr = |id: &str| {
        up.iter()
            .find(|n| n.id == id)
            .map(|n| n.cluster_addr.clone())
            .unwrap_or_default()
    };
    let mut made = Vec::new();
    for node in &nodes {
        match super::transport::call(&addr(node), secret, Op::Init, &repo) {
            Ok(()) => made.push(node.clone()),
            Err(e) => {
                for done in &made {
                    let _ = super::transport::call(&addr(done), secret, Op::Delete, &repo);
                }
                let _ = store.delete_repo_record(name);
                return Err(e.into());
            }
        }
    }
    Ok(nodes)
}

/// Moves `repo`'s replica from `from` to `to`: the new copy is added outdated, repaired by `to`
/// (under the repository's lock, verified against a current copy), then the old one is dropped
/// from the records and deleted from `from`'s disk. Reads never see a half-made copy: routing
/// only uses current ones.
pub fn move_replica(
    location: &Location,
    routing: &Routing,
    secret: &Secret,
    repo: &str,
    from: &str,
    to: &str,
) -> Result<(), ClusterError> {
    let store = Store::open(location)?;
    let replicas = store
        .replicas(repo)?
        .ok_or_else(|| StoreError::NoSuchRepo(repo.to_owned()))?;
    if !replicas.replicas.iter().any(|r| r.node == from) {
        return Err(ClusterError::Refused(format!(
            "{from} holds no copy of {repo}"
        )));
    }
    if replicas.replicas.iter().any(|r| r.node == to) {
        return Err(ClusterError::Refused(format!(
            "{to} already holds a copy of {repo}"
        )));
    }
    let up = routing.up_nodes(&store)?;
    let target = up
        .iter()
        .find(|n| n.id == to)
        .ok_or_else(|| ClusterError::Refused(format!("node {to} is not up")))?;
    super::transport::call(&target.cluster_addr, secret, Op::Init, repo)?;
    // Outdated by construction: `to`'s repair loop copies it and takes the generation.
    store.add_replica(repo, to, -1)?;
    let deadline = std::time::Instant::now() + MOVE_TIMEOUT;
    loop {
        let now = store
            .replicas(repo)?
            .ok_or_else(|| StoreError::NoSuchRepo(repo.to_owned()))?;
        if now.is_current(to) {
            break;
        }
        if std::time::Instant::now() > deadline {
            return Err(ClusterError::Refused(format!(
                "{to} did not catch up with {repo} within {} s; the old copy stays",
                MOVE_TIMEOUT.as_secs()
            )));
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    store.lock_repo(repo)?;
    let removed = store.remove_replica(repo, from);
    let _ = store.unlock_repo(repo);
    removed?;
    if let Some(old) = up.iter().find(|n| n.id == from) {
        // Reads already go elsewhere; a relayed clone still running on it keeps its open files.
        if let Err(e) = super::transport::call(&old.cluster_addr, secret, Op::Delete, repo) {
            tracing::warn!(repo, node = from, error = %e, "old copy not deleted; delete it by hand");
        }
    }
    Ok(())
}

/// `gitplane node drain NODE`: no new replica goes there, and every replica it holds moves to
/// the least loaded up node that holds none of that repository. Returns the moves made.
pub fn drain(
    location: &Location,
    routing: &Routing,
    secret: &Secret,
    node: &str,
) -> Result<Vec<(String, String)>, ClusterError> {
    let store = Store::open(location)?;
    store.set_draining(node, true)?;
    let mut moves = Vec::new();
    for repo in store.repos_on(node)? {
        let holders: Vec<String> = store
            .replicas(&repo)?
            .map(|r| r.replicas.into_iter().map(|r| r.node).collect())
            .unwrap_or_default();
        let up = routing.up_nodes(&store)?;
        let free: Vec<NodeRecord> = up
            .into_iter()
            .filter(|n| !holders.contains(&n.id))
            .collect();
        let Some(to) = choose(&free, 1).into_iter().next() else {
            return Err(ClusterError::Refused(format!(
                "no up node without a copy of {repo} to move it to"
            )));
        };
        move_replica(location, routing, secret, &repo, node, &to)?;
        moves.push((repo, to));
    }
    Ok(moves)
}
