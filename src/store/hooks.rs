//! Hook-worker tables of the embedded store (issue #6): the push-event outbox, per-(event, job)
//! completion records, webhooks and their delivery log, indexed commits and repository sizes.
//!
//! The outbox is the durability point of a push: `gitplane hook post-receive` inserts one row
//! (WAL, synchronous=FULL) before receive-pack reports success; the relay or the embedded
//! dispatcher deletes it only once the broker confirmed it (or every job finished). Repositories
//! are keyed by their `OWNER/NAME` text so these rows survive independently of `repos` ids.

use rusqlite::{params, OptionalExtension};

use super::{Store, StoreError};

/// One pending push event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRow {
    pub id: i64,
    pub event_id: String,
    /// `OWNER/NAME`.
    pub repo: String,
    pub payload: String,
}

/// A ref transaction recorded in its `prepared` state and not yet part of an outbox event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingRow {
    pub id: i64,
    /// The process changing the refs, `PID:STARTTIME` (receive-pack, or the server for gRPC).
    pub owner: String,
    /// `OWNER/NAME`.
    pub repo: String,
    /// The transaction's ref updates, as JSON.
    pub refs: String,
    pub pusher: String,
    pub remote_addr: String,
    pub via: String,
    pub state: PendingState,
    /// Seconds since the epoch.
    pub created_at: i64,
}

/// Where a pending transaction stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PendingState {
    /// Refs locked, not known to be committed.
    Prepared,
    /// git reported the refs committed.
    Committed,
    /// Reconciled into an outbox event after its process died; kept so that a post-receive
    /// still running for it adds no second event.
    Published,
}

impl PendingState {
    fn parse(s: &str) -> Self {
        match s {
            "committed" => Self::Committed,
            "published" => Self::Published,
            _ => Self::Prepared,
        }
    }
}

/// How a job ended for one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRecord {
    /// `done` or `dead` (dead-lettered after its last attempt).
    pub status: String,
    pub attempts: u32,
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Webhook {
    pub id: i64,
    pub repo: String,
    pub url: String,
    pub secret: String,
}

/// One attempt to deliver one event to one webhook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryRecord {
    pub webhook_id: i64,
    pub event_id: String,
    pub attempt: u32,
    /// HTTP status when the receiver answered.
    pub status: Option<u16>,
    pub ok: bool,
    pub error: Option<String>,
    pub duration_ms: u64,
}

/// A commit as indexed from a push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitRecord {
    pub sha: String,
    /// `Name <email>`.
    pub author: String,
    /// Author time, seconds since the epoch.
    pub time: i64,
    pub subject: String,
}

/// Tables of the hook workers; appended to the store schema by `Store::open`.
pub(super) const HOOK_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS hook_outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL UNIQUE,
    repo TEXT NOT NULL,
    payload TEXT NOT NULL,
    created_at INTEGER NOT NULL DEFAULT (unixepoch())
);
CREATE TABLE IF NOT EXISTS hook_pending (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    owner TEXT NOT NULL,
    repo TEXT NOT NULL,
    refs TEXT NOT NULL,
    pusher TEXT NOT NULL,
    remote_addr TEXT NOT NULL,
    via TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'prepared',
    created_at INTEGER NOT NULL DEFAULT (unixepoch())
);
CREATE INDEX IF NOT EXISTS hook_pending_by_owner ON hook_pending (owner);
CREATE TABLE IF NOT EXISTS hook_jobs (
    event_id TEXT NOT NULL,
    job TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    error TEXT,
    finished_at INTEGER NOT NULL DEFAULT (unixepoch()),
    PRIMARY KEY (event_id, job)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS webhooks (
    id INTEGER PRIMARY KEY,
    repo TEXT NOT NULL,
    url TEXT NOT NULL,
    secret TEXT NOT NULL,
    created_at INTEGER NOT NULL DEFAULT (unixepoch())
);
CREATE INDEX IF NOT EXISTS webhooks_by_repo ON webhooks (repo);
CREATE TABLE IF NOT EXISTS webhook_deliveries (
    id INTEGER PRIMARY KEY,
    webhook_id INTEGER NOT NULL,
    event_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    status INTEGER,
    ok INTEGER NOT NULL,
    error TEXT,
    duration_ms INTEGER NOT NULL,
    delivered_at INTEGER NOT NULL DEFAULT (unixepoch())
);
CREATE INDEX IF NOT EXISTS webhook_deliveries_by_event ON webhook_deliveries (event_id, webhook_id);
CREATE TABLE IF NOT EXISTS commits (
    repo TEXT NOT NULL,
    sha TEXT NOT NULL,
    author TEXT NOT NULL,
    time INTEGER NOT NULL,
    subject TEXT NOT NULL,
    ref TEXT NOT NULL,
    event_id TEXT NOT NULL,
    PRIMARY KEY (repo, sha)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS repo_sizes (
    repo TEXT PRIMARY KEY,
    bytes INTEGER NOT NULL,
    updated_at INTEGER NOT NULL DEFAULT (unixepoch())
);
";

fn to_u32(v: i64) -> u32 {
    u32::try_from(v).unwrap_or(0)
}

impl Store {
    /// Runs `f` inside one transaction (savepoint, so it nests): all of it commits or none.
    /// The hook workers' writer thread uses this to group many small writes into one fsync.
    pub fn in_transaction<R>(
        &self,
        f: impl FnOnce(&Store) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        self.conn
            .execute_batch("SAVEPOINT gp_tx")
            .map_err(|e| self.db(e))?;
        match f(self) {
            Ok(r) => {
                self.conn
                    .execute_batch("RELEASE gp_tx")
                    .map_err(|e| self.db(e))?;
                Ok(r)
            }
            Err(e) => {
                // Undo only this unit; the error that matters is the caller's.
                let _ = self.conn.execute_batch("ROLLBACK TO gp_tx; RELEASE gp_tx");
                Err(e)
            }
        }
    }

    /// Starts a batch transaction (taking the write lock now, so it cannot fail half-way on a
    /// busy database); see [`Store::commit_batch`].
    pub fn begin_batch(&self) -> Result<(), StoreError> {
        self.conn
            .execute_batch("BEGIN IMMEDIATE")
            .map_err(|e| self.db(e))
    }

    /// Commits the batch begun by [`Store::begin_batch`]; rolls it back if the commit fails.
    pub fn commit_batch(&self) -> Result<(), StoreError> {
        self.conn.execute_batch("COMMIT").map_err(|e| {
            let _ = self.conn.execute_batch("ROLLBACK");
            self.db(e)
        })
    }

    /// Runs `f` in a transaction that holds the write lock from its start (`BEGIN IMMEDIATE`), so
    /// a read-then-write cannot fail half-way against another process's writer.
    pub fn write_transaction<R>(
        &self,
        f: impl FnOnce(&Store) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        self.begin_batch()?;
        match f(self) {
            Ok(r) => {
                self.commit_batch()?;
                Ok(r)
            }
            Err(e) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                Err(e)
            }
        }
    }

    /// Records a prepared ref transaction; durable when this returns. `row.id`, `row.state` and
    /// `row.created_at` are set by the store.
    pub fn pending_insert(&self, row: &PendingRow) -> Result<i64, StoreError> {
        self.conn
            .prepare_cached(
                "INSERT INTO hook_pending (owner, repo, refs, pusher, remote_addr, via)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )
            .and_then(|mut s| {
                s.execute(params![
                    row.owner,
                    row.repo,
                    row.refs,
                    row.pusher,
                    row.remote_addr,
                    row.via
                ])
            })
            .map_err(|e| self.db(e))?;
        Ok(self.conn.last_insert_rowid())
    }

    /// Marks `owner`'s prepared transaction with exactly `refs` committed.
    pub fn pending_committed(&self, owner: &str, refs: &str) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(
                "UPDATE hook_pending SET state = 'committed'
                 WHERE owner = ?1 AND refs = ?2 AND state = 'prepared'",
            )
            .and_then(|mut s| s.execute(params![owner, refs]))
            .map(drop)
            .map_err(|e| self.db(e))
    }

    /// Forgets `owner`'s prepared transaction with exactly `refs` (git aborted it).
    pub fn pending_aborted(&self, owner: &str, refs: &str) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(
                "DELETE FROM hook_pending WHERE owner = ?1 AND refs = ?2 AND state = 'prepared'",
            )
            .and_then(|mut s| s.execute(params![owner, refs]))
            .map(drop)
            .map_err(|e| self.db(e))
    }

    /// Every pending row of `owner`, oldest first.
    pub fn pending_of(&self, owner: &str) -> Result<Vec<PendingRow>, StoreError> {
        self.pending_query("WHERE owner = ?1 ORDER BY id", owner)
    }

    /// The owners with rows not yet published.
    pub fn pending_owners(&self) -> Result<Vec<String>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT DISTINCT owner FROM hook_pending WHERE state != 'published'")
            .map_err(|e| self.db(e))?;
        let owners = stmt
            .query_map([], |r| r.get(0))
            .and_then(|rows| rows.collect::<Result<Vec<String>, _>>())
            .map_err(|e| self.db(e))?;
        Ok(owners)
    }

    /// Deletes every row of `owner`.
    pub fn pending_forget(&self, owner: &str) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("DELETE FROM hook_pending WHERE owner = ?1")
            .and_then(|mut s| s.execute([owner]))
            .map(drop)
            .map_err(|e| self.db(e))
    }

    /// Marks every row of `owner` published (its event is in the outbox).
    pub fn pending_published(&self, owner: &str) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("UPDATE hook_pending SET state = 'published' WHERE owner = ?1")
            .and_then(|mut s| s.execute([owner]))
            .map(drop)
            .map_err(|e| self.db(e))
    }

    /// Deletes published rows older than `before` (seconds since the epoch).
    pub fn pending_purge(&self, before: i64) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(
                "DELETE FROM hook_pending WHERE state = 'published' AND created_at < ?1",
            )
            .and_then(|mut s| s.execute([before]))
            .map(drop)
            .map_err(|e| self.db(e))
    }

    fn pending_query(&self, clause: &str, arg: &str) -> Result<Vec<PendingRow>, StoreError> {
        let sql = format!(
            "SELECT id, owner, repo, refs, pusher, remote_addr, via, state, created_at
             FROM hook_pending {clause}"
        );
        let mut stmt = self.conn.prepare_cached(&sql).map_err(|e| self.db(e))?;
        let rows = stmt
            .query_map([arg], |r| {
                Ok(PendingRow {
                    id: r.get(0)?,
                    owner: r.get(1)?,
                    repo: r.get(2)?,
                    refs: r.get(3)?,
                    pusher: r.get(4)?,
                    remote_addr: r.get(5)?,
                    via: r.get(6)?,
                    state: PendingState::parse(&r.get::<_, String>(7)?),
                    created_at: r.get(8)?,
                })
            })
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(|e| self.db(e))?;
        Ok(rows)
    }

    /// Appends a push event to the outbox; returns its row id. Durable when this returns.
    pub fn outbox_insert(
        &self,
        event_id: &str,
        repo: &str,
        payload: &str,
    ) -> Result<i64, StoreError> {
        self.conn
            .prepare_cached("INSERT INTO hook_outbox (event_id, repo, payload) VALUES (?1, ?2, ?3)")
            .and_then(|mut s| s.execute(params![event_id, repo, payload]))
            .map_err(|e| self.db(e))?;
        Ok(self.conn.last_insert_rowid())
    }

    /// Up to `limit` outbox rows with an id above `after`, oldest first.
    pub fn outbox_after(&self, after: i64, limit: usize) -> Result<Vec<OutboxRow>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT id, event_id, repo, payload FROM hook_outbox WHERE id > ?1 ORDER BY id
                 LIMIT ?2",
            )
            .map_err(|e| self.db(e))?;
        let rows = stmt
            .query_map(params![after, limit], |r| {
                Ok(OutboxRow {
                    id: r.get(0)?,
                    event_id: r.get(1)?,
                    repo: r.get(2)?,
                    payload: r.get(3)?,
                })
            })
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(|e| self.db(e))?;
        Ok(rows)
    }

    pub fn outbox_delete(&self, ids: &[i64]) -> Result<(), StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("DELETE FROM hook_outbox WHERE id = ?1")
            .map_err(|e| self.db(e))?;
        for id in ids {
            stmt.execute([id]).map_err(|e| self.db(e))?;
        }
        Ok(())
    }

    /// Events not yet handed to the broker (or, embedded, not yet finished by every job).
    pub fn outbox_depth(&self) -> Result<u64, StoreError> {
        self.conn
            .query_row("SELECT count(*) FROM hook_outbox", [], |r| {
                r.get::<_, i64>(0)
            })
            .map(|n| n.max(0) as u64)
            .map_err(|e| self.db(e))
    }

    pub fn job_status(&self, event_id: &str, job: &str) -> Result<Option<JobRecord>, StoreError> {
        self.conn
            .prepare_cached(
                "SELECT status, attempts, error FROM hook_jobs WHERE event_id = ?1 AND job = ?2",
            )
            .and_then(|mut s| {
                s.query_row(params![event_id, job], |r| {
                    Ok(JobRecord {
                        status: r.get(0)?,
                        attempts: to_u32(r.get(1)?),
                        error: r.get(2)?,
                    })
                })
                .optional()
            })
            .map_err(|e| self.db(e))
    }

    /// Records how a job ended for an event. The first record wins, which makes a redelivered
    /// copy of a finished job a no-op.
    pub fn record_job(
        &self,
        event_id: &str,
        job: &str,
        status: &str,
        attempts: u32,
        error: Option<&str>,
    ) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(
                "INSERT OR IGNORE INTO hook_jobs (event_id, job, status, attempts, error)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )
            .and_then(|mut s| s.execute(params![event_id, job, status, attempts, error]))
            .map(|_| ())
            .map_err(|e| self.db(e))
    }

    /// How many events ended with `status` for `job`.
    pub fn job_count(&self, job: &str, status: &str) -> Result<u64, StoreError> {
        self.conn
            .query_row(
                "SELECT count(*) FROM hook_jobs WHERE job = ?1 AND status = ?2",
                params![job, status],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n.max(0) as u64)
            .map_err(|e| self.db(e))
    }

    /// Every (event id, job, record) for `job`.
    pub fn job_records(&self, job: &str) -> Result<Vec<(String, JobRecord)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT event_id, status, attempts, error FROM hook_jobs WHERE job = ?1")
            .map_err(|e| self.db(e))?;
        let rows = stmt
            .query_map([job], |r| {
                Ok((
                    r.get(0)?,
                    JobRecord {
                        status: r.get(1)?,
                        attempts: to_u32(r.get(2)?),
                        error: r.get(3)?,
                    },
                ))
            })
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(|e| self.db(e))?;
        Ok(rows)
    }

    /// Adds a webhook to a repository known to the store; returns its id.
    pub fn add_webhook(&self, repo: &str, url: &str, secret: &str) -> Result<i64, StoreError> {
        let known: Option<i64> = self
            .conn
            .query_row(
                "SELECT id FROM repos WHERE owner || '/' || name = ?1",
                [repo],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.db(e))?;
        if known.is_none() {
            return Err(StoreError::NoSuchRepo(repo.to_owned()));
        }
        self.conn
            .execute(
                "INSERT INTO webhooks (repo, url, secret) VALUES (?1, ?2, ?3)",
                params![repo, url, secret],
            )
            .map_err(|e| self.db(e))?;
        Ok(self.conn.last_insert_rowid())
    }

    pub fn webhooks_for(&self, repo: &str) -> Result<Vec<Webhook>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT id, repo, url, secret FROM webhooks WHERE repo = ?1 ORDER BY id",
            )
            .map_err(|e| self.db(e))?;
        let rows = stmt
            .query_map([repo], |r| {
                Ok(Webhook {
                    id: r.get(0)?,
                    repo: r.get(1)?,
                    url: r.get(2)?,
                    secret: r.get(3)?,
                })
            })
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(|e| self.db(e))?;
        Ok(rows)
    }

    /// Whether `event_id` already reached webhook `webhook_id` (a retry skips it).
    pub fn webhook_delivered(&self, webhook_id: i64, event_id: &str) -> Result<bool, StoreError> {
        self.conn
            .prepare_cached(
                "SELECT 1 FROM webhook_deliveries WHERE event_id = ?1 AND webhook_id = ?2 AND ok = 1
                 LIMIT 1",
            )
            .and_then(|mut s| {
                s.query_row(params![event_id, webhook_id], |_| Ok(()))
                    .optional()
            })
            .map(|r| r.is_some())
            .map_err(|e| self.db(e))
    }

    pub fn log_delivery(&self, d: &DeliveryRecord) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(
                "INSERT INTO webhook_deliveries
                 (webhook_id, event_id, attempt, status, ok, error, duration_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )
            .and_then(|mut s| {
                s.execute(params![
                    d.webhook_id,
                    d.event_id,
                    d.attempt,
                    d.status,
                    d.ok,
                    d.error,
                    i64::try_from(d.duration_ms).unwrap_or(i64::MAX)
                ])
            })
            .map(|_| ())
            .map_err(|e| self.db(e))
    }

    /// The delivery log of one event, oldest first.
    pub fn deliveries(&self, event_id: &str) -> Result<Vec<DeliveryRecord>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT webhook_id, event_id, attempt, status, ok, error, duration_ms
                 FROM webhook_deliveries WHERE event_id = ?1 ORDER BY id",
            )
            .map_err(|e| self.db(e))?;
        let rows = stmt
            .query_map([event_id], |r| {
                Ok(DeliveryRecord {
                    webhook_id: r.get(0)?,
                    event_id: r.get(1)?,
                    attempt: to_u32(r.get(2)?),
                    status: r
                        .get::<_, Option<i64>>(3)?
                        .and_then(|s| u16::try_from(s).ok()),
                    ok: r.get(4)?,
                    error: r.get(5)?,
                    duration_ms: u64::try_from(r.get::<_, i64>(6)?).unwrap_or(0),
                })
            })
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(|e| self.db(e))?;
        Ok(rows)
    }

    /// Indexes commits of a push; a commit already known for the repository is kept as is.
    pub fn insert_commits(
        &self,
        repo: &str,
        event_id: &str,
        refname: &str,
        commits: &[CommitRecord],
    ) -> Result<(), StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "INSERT OR IGNORE INTO commits (repo, sha, author, time, subject, ref, event_id)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )
            .map_err(|e| self.db(e))?;
        for c in commits {
            stmt.execute(params![
                repo, c.sha, c.author, c.time, c.subject, refname, event_id
            ])
            .map_err(|e| self.db(e))?;
        }
        Ok(())
    }

    /// Indexed commits of a repository, newest author time first.
    pub fn commits(&self, repo: &str) -> Result<Vec<CommitRecord>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT sha, author, time, subject FROM commits WHERE repo = ?1
                 ORDER BY time DESC, sha",
            )
            .map_err(|e| self.db(e))?;
        let rows = stmt
            .query_map([repo], |r| {
                Ok(CommitRecord {
                    sha: r.get(0)?,
                    author: r.get(1)?,
                    time: r.get(2)?,
                    subject: r.get(3)?,
                })
            })
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(|e| self.db(e))?;
        Ok(rows)
    }

    pub fn set_repo_size(&self, repo: &str, bytes: u64) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(
                "INSERT INTO repo_sizes (repo, bytes) VALUES (?1, ?2)
                 ON CONFLICT (repo) DO UPDATE SET bytes = excluded.bytes, updated_at = unixepoch()",
            )
            .and_then(|mut s| s.execute(params![repo, i64::try_from(bytes).unwrap_or(i64::MAX)]))
            .map(|_| ())
            .map_err(|e| self.db(e))
    }

    /// The last measured size of a repository on disk, in bytes.
    pub fn repo_size(&self, repo: &str) -> Result<Option<u64>, StoreError> {
        self.conn
            .query_row(
                "SELECT bytes FROM repo_sizes WHERE repo = ?1",
                [repo],
                |r| r.get::<_, i64>(0),
            )
            .optional()
            .map(|v| v.map(|n| n.max(0) as u64))
            .map_err(|e| self.db(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::git::repo_name::RepoName;

    #[test]
    fn outbox_jobs_webhooks_commits() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let a = store.outbox_insert("e1", "o/r", "{}").unwrap();
        let b = store.outbox_insert("e2", "o/r", "{}").unwrap();
        assert!(
            store.outbox_insert("e1", "o/r", "{}").is_err(),
            "event ids are unique"
        );
        assert_eq!(store.outbox_depth().unwrap(), 2);
        let rows = store.outbox_after(0, 10).unwrap();
        assert_eq!(rows.iter().map(|r| r.id).collect::<Vec<_>>(), vec![a, b]);
        assert_eq!(store.outbox_after(a, 10).unwrap().len(), 1);
        store.outbox_delete(&[a]).unwrap();
        assert_eq!(store.outbox_depth().unwrap(), 1);

        store.record_job("e1", "webhooks", "done", 1, None).unwrap();
        store
            .record_job("e1", "webhooks", "dead", 5, Some("x"))
            .unwrap();
        assert_eq!(
            store.job_status("e1", "webhooks").unwrap().unwrap().status,
            "done"
        );
        assert_eq!(store.job_count("webhooks", "done").unwrap(), 1);

        assert!(matches!(
            store.add_webhook("o/r", "http://x/", "s"),
            Err(StoreError::NoSuchRepo(_))
        ));
        store
            .create_repo(&RepoName::parse("o/r").unwrap(), false)
            .unwrap();
        let id = store.add_webhook("o/r", "http://x/", "s").unwrap();
        assert_eq!(store.webhooks_for("o/r").unwrap().len(), 1);
        assert!(!store.webhook_delivered(id, "e1").unwrap());
        let mut d = DeliveryRecord {
            webhook_id: id,
            event_id: "e1".into(),
            attempt: 1,
            status: Some(500),
            ok: false,
            error: None,
            duration_ms: 3,
        };
        store.log_delivery(&d).unwrap();
        assert!(!store.webhook_delivered(id, "e1").unwrap());
        d.attempt = 2;
        d.status = Some(200);
        d.ok = true;
        store.log_delivery(&d).unwrap();
        assert!(store.webhook_delivered(id, "e1").unwrap());
        assert_eq!(store.deliveries("e1").unwrap().len(), 2);

        let c = CommitRecord {
            sha: "ab".into(),
            author: "A <a@x>".into(),
            time: 5,
            subject: "s".into(),
        };
        store
            .in_transaction(|s| {
                s.insert_commits("o/r", "e1", "refs/heads/main", &[c.clone(), c.clone()])
            })
            .unwrap();
        assert_eq!(store.commits("o/r").unwrap(), vec![c]);
        store.set_repo_size("o/r", 10).unwrap();
        store.set_repo_size("o/r", 12).unwrap();
        assert_eq!(store.repo_size("o/r").unwrap(), Some(12));
        assert_eq!(store.repo_size("o/x").unwrap(), None);
    }

    #[test]
    fn pending_rows_follow_their_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let row = |refs: &str| PendingRow {
            id: 0,
            owner: "10:99".into(),
            repo: "o/r".into(),
            refs: refs.into(),
            pusher: "alice".into(),
            remote_addr: String::new(),
            via: String::new(),
            state: PendingState::Prepared,
            created_at: 0,
        };
        store.pending_insert(&row("[1]")).unwrap();
        store.pending_insert(&row("[2]")).unwrap();
        store.pending_insert(&row("[3]")).unwrap();
        store.pending_committed("10:99", "[1]").unwrap();
        store.pending_aborted("10:99", "[2]").unwrap();
        // A committed row is not aborted by a stray `aborted` with the same refs.
        store.pending_aborted("10:99", "[1]").unwrap();
        let rows = store.pending_of("10:99").unwrap();
        assert_eq!(
            rows.iter()
                .map(|r| (r.refs.as_str(), r.state))
                .collect::<Vec<_>>(),
            [
                ("[1]", PendingState::Committed),
                ("[3]", PendingState::Prepared)
            ]
        );
        assert_eq!(store.pending_owners().unwrap(), ["10:99"]);
        store.pending_published("10:99").unwrap();
        assert!(store.pending_owners().unwrap().is_empty());
        store.pending_purge(0).unwrap();
        assert_eq!(store.pending_of("10:99").unwrap().len(), 2);
        store.pending_purge(i64::MAX).unwrap();
        assert!(store.pending_of("10:99").unwrap().is_empty());
    }

    #[test]
    fn failed_transaction_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let r = store.in_transaction(|s| {
            s.outbox_insert("e1", "o/r", "{}")?;
            s.outbox_insert("e1", "o/r", "{}")
        });
        assert!(r.is_err());
        assert_eq!(store.outbox_depth().unwrap(), 0);
    }
}
