//! The cluster's state in the shared store (#14): nodes and heartbeats, repositories' replicas and
//! generations. PostgreSQL only (a cluster needs a shared store); times are the database's clock,
//! so nodes' clocks never need to agree.

use super::sql::params;
use super::{Store, StoreError};
use crate::git::repo_name::RepoName;

/// The database's clock, in milliseconds.
const NOW_MS: &str = "(extract(epoch FROM clock_timestamp()) * 1000)::bigint";

/// A node as the cluster knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRecord {
    pub id: String,
    pub cluster_addr: String,
    pub http_addr: String,
    pub ssh_addr: String,
    /// Milliseconds since its last heartbeat.
    pub silent_ms: i64,
    /// Silent this long, it is down.
    pub down_after_ms: i64,
    pub draining: bool,
    /// Replicas it holds.
    pub replicas: i64,
}

/// One copy of a repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaRecord {
    pub node: String,
    pub generation: i64,
}

/// A repository's replicas and the generation a current one has reached.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Replicas {
    /// The repository's row.
    pub repo_id: i64,
    pub generation: i64,
    pub replicas: Vec<ReplicaRecord>,
}

impl NodeRecord {
    pub fn is_up(&self) -> bool {
        self.silent_ms < self.down_after_ms
    }
}

impl Replicas {
    /// The nodes whose copy has every acknowledged write.
    pub fn current(&self) -> impl Iterator<Item = &str> {
        self.replicas
            .iter()
            .filter(move |r| r.generation == self.generation)
            .map(|r| r.node.as_str())
    }

    pub fn is_current(&self, node: &str) -> bool {
        self.current().any(|n| n == node)
    }

    /// Votes a write needs: a majority of all replicas.
    pub fn quorum(&self) -> usize {
        self.replicas.len() / 2 + 1
    }
}

/// Longest wait for a repository's lock.
pub const LOCK_WAIT_MS: u64 = 120_000;

fn lock_key(repo: &str) -> String {
    format!("gitplane-repo:{repo}")
}

impl Store {
    /// Registers this node or refreshes its heartbeat.
    pub fn cluster_heartbeat(
        &self,
        id: &str,
        cluster_addr: &str,
        http_addr: &str,
        ssh_addr: &str,
        down_after_ms: i64,
    ) -> Result<(), StoreError> {
        self.db
            .exec(
                &format!(
                    "INSERT INTO cluster_nodes
                         (id, cluster_addr, http_addr, ssh_addr, down_after_ms, heartbeat_ms)
                     VALUES ($1, $2, $3, $4, $5, {NOW_MS})
                     ON CONFLICT (id) DO UPDATE SET cluster_addr = excluded.cluster_addr,
                         http_addr = excluded.http_addr, ssh_addr = excluded.ssh_addr,
                         down_after_ms = excluded.down_after_ms,
                         heartbeat_ms = excluded.heartbeat_ms"
                ),
                params![id, cluster_addr, http_addr, ssh_addr, down_after_ms],
            )
            .map(drop)
    }

    /// Every node, with how long it has been silent and how many replicas it holds.
    pub fn cluster_nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        self.db.rows(
            &format!(
                "SELECT n.id, n.cluster_addr, n.http_addr, n.ssh_addr, {NOW_MS} - n.heartbeat_ms,
                        n.draining, (SELECT count(*) FROM repo_replicas r WHERE r.node = n.id),
                        n.down_after_ms
                 FROM cluster_nodes n ORDER BY n.id"
            ),
            &[],
            |r| {
                Ok(NodeRecord {
                    id: r.text(0)?,
                    cluster_addr: r.text(1)?,
                    http_addr: r.text(2)?,
                    ssh_addr: r.text(3)?,
                    silent_ms: r.int(4)?,
                    draining: r.bool(5)?,
                    replicas: r.int(6)?,
                    down_after_ms: r.int(7)?,
                })
            },
        )
    }

    pub fn set_draining(&self, node: &str, draining: bool) -> Result<(), StoreError> {
        let n = self.db.exec(
            "UPDATE cluster_nodes SET draining = $2 WHERE id = $1",
            params![node, draining],
        )?;
        if n == 0 {
            return Err(StoreError::Internal(format!(
                "no node `{node}` in the cluster"
            )));
        }
        Ok(())
    }

    /// The replicas of `repo`; None when the repository does not exist.
    pub fn replicas(&self, repo: &str) -> Result<Option<Replicas>, StoreError> {
        // One round trip on the (owner, name) index: every relayed or local read routes through
        // here (the repository's row and its replicas were two queries, the first a scan of
        // `owner || '/' || name`).
        let Some((owner, name)) = repo.split_once('/') else {
            return Ok(None);
        };
        let rows = self.db.rows(
            "SELECT r.generation, rr.node, rr.generation, r.id
             FROM repos r LEFT JOIN repo_replicas rr ON rr.repo_id = r.id
             WHERE r.owner = $1 AND r.name = $2 ORDER BY rr.node",
            params![owner, name],
            |r| Ok((r.int(0)?, r.opt_text(1)?, r.opt_int(2)?, r.int(3)?)),
        )?;
        let Some(&(generation, _, _, repo_id)) = rows.first() else {
            return Ok(None);
        };
        let replicas = rows
            .into_iter()
            .filter_map(|(_, node, generation, _)| {
                Some(ReplicaRecord {
                    node: node?,
                    generation: generation?,
                })
            })
            .collect();
        Ok(Some(Replicas {
            repo_id,
            generation,
            replicas,
        }))
    }

    /// Records a clustered repository with its replicas (generation 0 everywhere).
    pub fn create_replicated_repo(
        &self,
        repo: &RepoName,
        public: bool,
        nodes: &[String],
    ) -> Result<(), StoreError> {
        self.db.nested(|| {
            let id = match self.db.row(
                "INSERT INTO repos (owner, name, public, node, created_at)
                 VALUES ($1, $2, $3, '', $4) RETURNING id",
                params![repo.owner(), repo.name(), public, super::now()],
                |r| r.int(0),
            ) {
                Err(e) if e.is_conflict() => {
                    return Err(StoreError::RepoExists(repo.to_string()));
                }
                r => r?.ok_or_else(|| StoreError::Internal("no id returned".into()))?,
            };
            for node in nodes {
                self.db.exec(
                    "INSERT INTO repo_replicas (repo_id, node, generation) VALUES ($1, $2, 0)",
                    params![id, node.as_str()],
                )?;
            }
            Ok(())
        })
    }

    /// Adds a replica of `repo` on `node` at `generation` (a move's new copy, once verified).
    pub fn add_replica(&self, repo: &str, node: &str, generation: i64) -> Result<(), StoreError> {
        let (owner, name) = owner_and_name(repo)?;
        self.db
            .exec(
                "INSERT INTO repo_replicas (repo_id, node, generation)
                 SELECT id, $3, $4 FROM repos WHERE owner = $1 AND name = $2
                 ON CONFLICT (repo_id, node) DO UPDATE SET generation = excluded.generation",
                params![owner, name, node, generation],
            )
            .map(drop)
    }

    pub fn remove_replica(&self, repo: &str, node: &str) -> Result<(), StoreError> {
        let (owner, name) = owner_and_name(repo)?;
        self.db
            .exec(
                "DELETE FROM repo_replicas WHERE node = $3
                 AND repo_id = (SELECT id FROM repos WHERE owner = $1 AND name = $2)",
                params![owner, name, node],
            )
            .map(drop)
    }

    /// Sets one replica's generation.
    pub fn set_replica_generation(
        &self,
        repo: &str,
        node: &str,
        generation: i64,
    ) -> Result<(), StoreError> {
        let (owner, name) = owner_and_name(repo)?;
        self.db
            .exec(
                "UPDATE repo_replicas SET generation = $4 WHERE node = $3
                 AND repo_id = (SELECT id FROM repos WHERE owner = $1 AND name = $2)",
                params![owner, name, node, generation],
            )
            .map(drop)
    }

    /// A write committed on `nodes`: the repository's generation goes up by one, and so do those
    /// replicas'; every other replica is now outdated. Returns the new generation.
    pub fn commit_generation(&self, repo: &str, nodes: &[&str]) -> Result<i64, StoreError> {
        let (owner, name) = owner_and_name(repo)?;
        self.db.nested(|| {
            let generation = self
                .db
                .row(
                    "UPDATE repos SET generation = generation + 1
                     WHERE owner = $1 AND name = $2 RETURNING generation",
                    params![owner, name],
                    |r| r.int(0),
                )?
                .ok_or_else(|| StoreError::NoSuchRepo(repo.to_owned()))?;
            for node in nodes {
                self.set_replica_generation(repo, node, generation)?;
            }
            Ok(generation)
        })
    }

    /// `node`'s replicas that are behind: (repository, replica generation, current generation).
    pub fn outdated_on(&self, node: &str) -> Result<Vec<(String, i64, i64)>, StoreError> {
        self.db.rows(
            "SELECT r.owner || '/' || r.name, p.generation, r.generation
             FROM repo_replicas p JOIN repos r ON r.id = p.repo_id
             WHERE p.node = $1 AND p.generation < r.generation ORDER BY 1",
            params![node],
            |r| Ok((r.text(0)?, r.int(1)?, r.int(2)?)),
        )
    }

    /// Repositories whose replicas do not all agree: (repository, generation, replicas).
    pub fn disagreeing(&self) -> Result<Vec<(String, Replicas)>, StoreError> {
        let names = self.db.rows(
            "SELECT DISTINCT r.owner || '/' || r.name FROM repo_replicas p
             JOIN repos r ON r.id = p.repo_id WHERE p.generation <> r.generation ORDER BY 1",
            &[],
            |r| r.text(0),
        )?;
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            if let Some(r) = self.replicas(&name)? {
                out.push((name, r));
            }
        }
        Ok(out)
    }

    /// Every clustered repository on `node`.
    pub fn repos_on(&self, node: &str) -> Result<Vec<String>, StoreError> {
        self.db.rows(
            "SELECT r.owner || '/' || r.name FROM repo_replicas p JOIN repos r ON r.id = p.repo_id
             WHERE p.node = $1 ORDER BY 1",
            params![node],
            |r| r.text(0),
        )
    }

    /// Serialises writes and repairs of one repository across the cluster (a session lock,
    /// held until [`Store::unlock_repo`] or the connection ends, as when its process dies).
    /// Waits up to [`LOCK_WAIT_MS`]: a busy repository's pushes queue here, one replication at
    /// a time, longer than any single statement may run.
    pub fn lock_repo(&self, repo: &str) -> Result<(), StoreError> {
        self.db
            .batch(&format!("SET statement_timeout = {LOCK_WAIT_MS}"))?;
        let locked = self.db.exec(
            "SELECT pg_advisory_lock(hashtext($1))",
            params![&lock_key(repo)],
        );
        let reset = self.db.batch("RESET statement_timeout");
        locked?;
        reset
    }

    pub fn unlock_repo(&self, repo: &str) -> Result<(), StoreError> {
        self.db
            .exec(
                "SELECT pg_advisory_unlock(hashtext($1))",
                params![&lock_key(repo)],
            )
            .map(drop)
    }
}

/// `OWNER/NAME` as the two columns of the (owner, name) index, which a match on
/// `owner || '/' || name` cannot use.
pub(super) fn owner_and_name(repo: &str) -> Result<(&str, &str), StoreError> {
    repo.split_once('/')
        .ok_or_else(|| StoreError::NoSuchRepo(repo.to_owned()))
}
