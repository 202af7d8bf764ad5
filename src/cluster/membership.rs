//! Who is in the cluster: each node heartbeats into the shared store every second; a node silent
//! for its `down_after` (which it registers, so every node and the CLI agree) is down: not read
//! from, not written to, not placed on. And where a request
//! for a repository runs: here when this node's copy is current, else on a current copy of an up
//! node, through the cluster transport.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use gitplane_wire::cluster::Op;

use super::auth::Secret;
use crate::git::process::{RemoteExec, RepoGeneration};
use crate::store::cluster::{NodeRecord, Replicas};
use crate::store::{Location, Store, StoreError};

/// Where to run git for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// This node's copy is current (or the repository is not replicated).
    Local,
    Remote(RemoteExec),
    /// No up node holds a current copy: 503.
    NoCurrentReplica,
}

/// What routing needs to know about this node.
#[derive(Debug, Clone)]
pub struct Routing {
    pub node: String,
    pub secret_file: PathBuf,
    /// Let relays keep their answers ([`crate::git::relay_cache`]).
    pub relay_cache: bool,
}

/// How long a read of the node list is reused.
const NODES_FRESH_FOR: Duration = Duration::from_millis(500);

/// The node list, read at most every [`NODES_FRESH_FOR`] per process.
fn nodes(store: &Store) -> Result<Vec<NodeRecord>, StoreError> {
    static CACHE: Mutex<Option<(Instant, Vec<NodeRecord>)>> = Mutex::new(None);
    if let Some((at, nodes)) = &*CACHE.lock().unwrap_or_else(|p| p.into_inner()) {
        if at.elapsed() < NODES_FRESH_FOR {
            return Ok(nodes.clone());
        }
    }
    let fresh = store.cluster_nodes()?;
    *CACHE.lock().unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), fresh.clone()));
    Ok(fresh)
}

impl Routing {
    /// The up nodes, by id.
    pub fn up_nodes(&self, store: &Store) -> Result<Vec<NodeRecord>, StoreError> {
        Ok(nodes(store)?
            .into_iter()
            .filter(NodeRecord::is_up)
            .collect())
    }

    /// Where git for `repo` runs.
    pub fn route(&self, store: &Store, repo: &str) -> Result<Route, StoreError> {
        match store.replicas(repo)? {
            Some(replicas) => self.route_among(store, repo, &replicas),
            None => Ok(Route::Local),
        }
    }

    /// Where git for `repo` runs, given its replicas as just read (with the access check).
    pub fn route_among(
        &self,
        store: &Store,
        repo: &str,
        replicas: &Replicas,
    ) -> Result<Route, StoreError> {
        if replicas.replicas.is_empty() {
            return Ok(Route::Local);
        }
        let up = self.up_nodes(store)?;
        let mut candidates: Vec<&NodeRecord> = replicas
            .current()
            .filter_map(|id| up.iter().find(|n| n.id == id))
            .collect();
        if candidates.iter().any(|n| n.id == self.node) {
            return Ok(Route::Local);
        }
        // Spread the relayed load; a draining node only when nothing else is current.
        candidates.sort_by_key(|n| (n.draining, rand::random::<u32>()));
        let Some(n) = candidates.first() else {
            return Ok(Route::NoCurrentReplica);
        };
        // Read per request (a small file), so a rotated secret takes effect without a restart.
        let secret = match Secret::load(&self.secret_file) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, repo, "cannot relay: the cluster secret is unreadable");
                return Ok(Route::NoCurrentReplica);
            }
        };
        Ok(Route::Remote(RemoteExec {
            node: n.id.clone(),
            addr: n.cluster_addr.clone(),
            token: secret.token(Op::Exec, repo),
            repo: repo.to_owned(),
            generation: self.relay_cache.then_some(RepoGeneration {
                repo_id: replicas.repo_id,
                number: replicas.generation,
            }),
        }))
    }
}

/// Registers this node and refreshes its heartbeat every `every` until the process exits.
pub fn start_heartbeat(
    location: Location,
    cluster_addr: String,
    http_addr: String,
    ssh_addr: String,
    every: Duration,
    down_after: Duration,
) -> std::io::Result<()> {
    let down_after_ms = i64::try_from(down_after.as_millis()).unwrap_or(i64::MAX);
    let node = location.node().to_owned();
    std::thread::Builder::new()
        .name("gitplane-heartbeat".into())
        .spawn(move || {
            let mut failing = false;
            loop {
                let beat = Store::open(&location).and_then(|s| {
                    s.cluster_heartbeat(&node, &cluster_addr, &http_addr, &ssh_addr, down_after_ms)
                });
                match beat {
                    Ok(()) if failing => {
                        failing = false;
                        tracing::info!(node, "cluster heartbeat restored");
                    }
                    Ok(()) => {}
                    Err(e) if !failing => {
                        failing = true;
                        tracing::warn!(node, error = %e, "cluster heartbeat failed: other nodes will take this one for down");
                    }
                    Err(_) => {}
                }
                std::thread::sleep(every);
            }
        })
        .map(drop)
}
