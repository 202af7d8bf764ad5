//! Hook-worker tables of the embedded store (issue #6): the push-event outbox, per-(event, job)
//! completion records, webhooks and their delivery log, indexed commits and repository sizes.
//!
//! The outbox is the durability point of a push: `gitplane hook post-receive` inserts one row
//! (WAL, synchronous=FULL) before receive-pack reports success; the relay or the embedded
//! dispatcher deletes it only once the broker confirmed it (or every job finished). Repositories
//! are keyed by their `OWNER/NAME` text so these rows survive independently of `repos` ids.

use super::sql::{params, Row};
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

fn to_u32(v: i64) -> u32 {
    u32::try_from(v).unwrap_or(0)
}

fn pending_row(r: &Row<'_>) -> Result<PendingRow, StoreError> {
    Ok(PendingRow {
        id: r.int(0)?,
        owner: r.text(1)?,
        repo: r.text(2)?,
        refs: r.text(3)?,
        pusher: r.text(4)?,
        remote_addr: r.text(5)?,
        via: r.text(6)?,
        state: PendingState::parse(&r.text(7)?),
        created_at: r.int(8)?,
    })
}

const PENDING_COLUMNS: &str =
    "SELECT id, owner, repo, refs, pusher, remote_addr, via, state, created_at FROM hook_pending";

impl Store {
    /// Runs `f` inside one transaction (a savepoint when one is open, so it nests): all of it
    /// commits or none. The hook workers' writer thread uses this to group many small writes
    /// into one fsync.
    pub fn in_transaction<R>(
        &self,
        f: impl FnOnce(&Store) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        self.db.nested(|| f(self))
    }

    /// Starts a batch transaction (taking the write lock now, so it cannot fail half-way on a
    /// busy database); see [`Store::commit_batch`].
    pub fn begin_batch(&self) -> Result<(), StoreError> {
        self.db.begin(None)
    }

    /// Commits the batch begun by [`Store::begin_batch`]; rolls it back if the commit fails.
    pub fn commit_batch(&self) -> Result<(), StoreError> {
        self.db.commit()
    }

    /// Runs `f` in a transaction that excludes this node's other writers from its start, so a
    /// read-then-write of the node's hook rows cannot interleave with another process's.
    pub fn write_transaction<R>(
        &self,
        f: impl FnOnce(&Store) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        self.db.begin(Some(&format!("hook-rows:{}", self.node)))?;
        match f(self) {
            Ok(r) => {
                self.db.commit()?;
                Ok(r)
            }
            Err(e) => {
                self.db.rollback();
                Err(e)
            }
        }
    }

    /// Records a prepared ref transaction; durable when this returns. `row.id`, `row.state` and
    /// `row.created_at` are set by the store.
    pub fn pending_insert(&self, row: &PendingRow) -> Result<i64, StoreError> {
        self.db
            .row(
                "INSERT INTO hook_pending (owner, repo, refs, pusher, remote_addr, via, node, created_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id",
                params![
                    &row.owner,
                    &row.repo,
                    &row.refs,
                    &row.pusher,
                    &row.remote_addr,
                    &row.via,
                    &self.node,
                    super::now()
                ],
                |r| r.int(0),
            )?
            .ok_or_else(|| StoreError::Internal("INSERT ... RETURNING gave no row".into()))
    }

    /// Marks `owner`'s prepared transaction with exactly `refs` committed.
    pub fn pending_committed(&self, owner: &str, refs: &str) -> Result<(), StoreError> {
        self.db
            .exec(
                "UPDATE hook_pending SET state = 'committed'
                 WHERE node = $3 AND owner = $1 AND refs = $2 AND state = 'prepared'",
                params![owner, refs, &self.node],
            )
            .map(drop)
    }

    /// Forgets `owner`'s prepared transaction with exactly `refs` (git aborted it).
    pub fn pending_aborted(&self, owner: &str, refs: &str) -> Result<(), StoreError> {
        self.db
            .exec(
                "DELETE FROM hook_pending
                 WHERE node = $3 AND owner = $1 AND refs = $2 AND state = 'prepared'",
                params![owner, refs, &self.node],
            )
            .map(drop)
    }

    /// Every pending row of `owner` on this node, oldest first.
    pub fn pending_of(&self, owner: &str) -> Result<Vec<PendingRow>, StoreError> {
        self.db.rows(
            &format!("{PENDING_COLUMNS} WHERE node = $2 AND owner = $1 ORDER BY id"),
            params![owner, &self.node],
            pending_row,
        )
    }

    /// This node's owners with rows not yet published (process ids mean something only on the
    /// node that wrote them).
    pub fn pending_owners(&self) -> Result<Vec<String>, StoreError> {
        self.db.rows(
            "SELECT DISTINCT owner FROM hook_pending WHERE node = $1 AND state != 'published'",
            params![&self.node],
            |r| r.text(0),
        )
    }

    /// Deletes every row of `owner`.
    pub fn pending_forget(&self, owner: &str) -> Result<(), StoreError> {
        self.db
            .exec(
                "DELETE FROM hook_pending WHERE node = $2 AND owner = $1",
                params![owner, &self.node],
            )
            .map(drop)
    }

    /// Marks every row of `owner` published (its event is in the outbox).
    pub fn pending_published(&self, owner: &str) -> Result<(), StoreError> {
        self.db
            .exec(
                "UPDATE hook_pending SET state = 'published' WHERE node = $2 AND owner = $1",
                params![owner, &self.node],
            )
            .map(drop)
    }

    /// Deletes this node's published rows older than `before` (seconds since the epoch).
    pub fn pending_purge(&self, before: i64) -> Result<(), StoreError> {
        self.db
            .exec(
                "DELETE FROM hook_pending
                 WHERE node = $2 AND state = 'published' AND created_at < $1",
                params![before, &self.node],
            )
            .map(drop)
    }

    /// Appends a push event to the outbox (as this node's); returns its row id. Durable when
    /// this returns.
    pub fn outbox_insert(
        &self,
        event_id: &str,
        repo: &str,
        payload: &str,
    ) -> Result<i64, StoreError> {
        self.db
            .row(
                "INSERT INTO hook_outbox (event_id, repo, payload, node, created_at)
                 VALUES ($1, $2, $3, $4, $5) RETURNING id",
                params![event_id, repo, payload, &self.node, super::now()],
                |r| r.int(0),
            )?
            .ok_or_else(|| StoreError::Internal("INSERT ... RETURNING gave no row".into()))
    }

    /// Up to `limit` of this node's outbox rows with an id above `after`, oldest first. Each
    /// node relays only the events of the pushes it took (their jobs need the repository, which
    /// lives on that node), so two nodes never publish the same event.
    pub fn outbox_after(&self, after: i64, limit: usize) -> Result<Vec<OutboxRow>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.db.rows(
            "SELECT id, event_id, repo, payload FROM hook_outbox
             WHERE node = $3 AND id > $1 ORDER BY id LIMIT $2",
            params![after, limit, &self.node],
            |r| {
                Ok(OutboxRow {
                    id: r.int(0)?,
                    event_id: r.text(1)?,
                    repo: r.text(2)?,
                    payload: r.text(3)?,
                })
            },
        )
    }

    pub fn outbox_delete(&self, ids: &[i64]) -> Result<(), StoreError> {
        for &id in ids {
            self.db
                .exec("DELETE FROM hook_outbox WHERE id = $1", params![id])?;
        }
        Ok(())
    }

    /// This node's events not yet handed to the broker (or, embedded, not yet finished by every
    /// job).
    pub fn outbox_depth(&self) -> Result<u64, StoreError> {
        let n = self
            .db
            .row(
                "SELECT count(*) FROM hook_outbox WHERE node = $1",
                params![&self.node],
                |r| r.int(0),
            )?
            .unwrap_or(0);
        Ok(n.max(0) as u64)
    }

    pub fn job_status(&self, event_id: &str, job: &str) -> Result<Option<JobRecord>, StoreError> {
        self.db.row(
            "SELECT status, attempts, error FROM hook_jobs WHERE event_id = $1 AND job = $2",
            params![event_id, job],
            |r| {
                Ok(JobRecord {
                    status: r.text(0)?,
                    attempts: to_u32(r.int(1)?),
                    error: r.opt_text(2)?,
                })
            },
        )
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
        self.db
            .exec(
                "INSERT INTO hook_jobs (event_id, job, status, attempts, error, finished_at)
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
                params![event_id, job, status, attempts, error, super::now()],
            )
            .map(drop)
    }

    /// How many events ended with `status` for `job`.
    pub fn job_count(&self, job: &str, status: &str) -> Result<u64, StoreError> {
        let n = self
            .db
            .row(
                "SELECT count(*) FROM hook_jobs WHERE job = $1 AND status = $2",
                params![job, status],
                |r| r.int(0),
            )?
            .unwrap_or(0);
        Ok(n.max(0) as u64)
    }

    /// Every (event id, job, record) for `job`.
    pub fn job_records(&self, job: &str) -> Result<Vec<(String, JobRecord)>, StoreError> {
        self.db.rows(
            "SELECT event_id, status, attempts, error FROM hook_jobs WHERE job = $1",
            params![job],
            |r| {
                Ok((
                    r.text(0)?,
                    JobRecord {
                        status: r.text(1)?,
                        attempts: to_u32(r.int(2)?),
                        error: r.opt_text(3)?,
                    },
                ))
            },
        )
    }

    /// Adds a webhook to a repository known to the store; returns its id.
    pub fn add_webhook(&self, repo: &str, url: &str, secret: &str) -> Result<i64, StoreError> {
        let (owner, name) = super::cluster::owner_and_name(repo)?;
        let known = self.db.row(
            "SELECT id FROM repos WHERE owner = $1 AND name = $2",
            params![owner, name],
            |r| r.int(0),
        )?;
        if known.is_none() {
            return Err(StoreError::NoSuchRepo(repo.to_owned()));
        }
        self.db
            .row(
                "INSERT INTO webhooks (repo, url, secret, created_at) VALUES ($1, $2, $3, $4)
                 RETURNING id",
                params![repo, url, secret, super::now()],
                |r| r.int(0),
            )?
            .ok_or_else(|| StoreError::Internal("INSERT ... RETURNING gave no row".into()))
    }

    pub fn webhooks_for(&self, repo: &str) -> Result<Vec<Webhook>, StoreError> {
        self.db.rows(
            "SELECT id, repo, url, secret FROM webhooks WHERE repo = $1 ORDER BY id",
            params![repo],
            |r| {
                Ok(Webhook {
                    id: r.int(0)?,
                    repo: r.text(1)?,
                    url: r.text(2)?,
                    secret: r.text(3)?,
                })
            },
        )
    }

    /// Whether `event_id` already reached webhook `webhook_id` (a retry skips it).
    pub fn webhook_delivered(&self, webhook_id: i64, event_id: &str) -> Result<bool, StoreError> {
        Ok(self
            .db
            .row(
                "SELECT id FROM webhook_deliveries
                 WHERE event_id = $1 AND webhook_id = $2 AND ok LIMIT 1",
                params![event_id, webhook_id],
                |_| Ok(()),
            )?
            .is_some())
    }

    pub fn log_delivery(&self, d: &DeliveryRecord) -> Result<(), StoreError> {
        self.db
            .exec(
                "INSERT INTO webhook_deliveries
                 (webhook_id, event_id, attempt, status, ok, error, duration_ms, delivered_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                params![
                    d.webhook_id,
                    &d.event_id,
                    d.attempt,
                    d.status.map(i64::from),
                    d.ok,
                    d.error.as_deref(),
                    i64::try_from(d.duration_ms).unwrap_or(i64::MAX),
                    super::now()
                ],
            )
            .map(drop)
    }

    /// The delivery log of one event, oldest first.
    pub fn deliveries(&self, event_id: &str) -> Result<Vec<DeliveryRecord>, StoreError> {
        self.db.rows(
            "SELECT webhook_id, event_id, attempt, status, ok, error, duration_ms
             FROM webhook_deliveries WHERE event_id = $1 ORDER BY id",
            params![event_id],
            |r| {
                Ok(DeliveryRecord {
                    webhook_id: r.int(0)?,
                    event_id: r.text(1)?,
                    attempt: to_u32(r.int(2)?),
                    status: r.opt_int(3)?.and_then(|s| u16::try_from(s).ok()),
                    ok: r.bool(4)?,
                    error: r.opt_text(5)?,
                    duration_ms: u64::try_from(r.int(6)?).unwrap_or(0),
                })
            },
        )
    }

    /// Indexes commits of a push; a commit already known for the repository is kept as is.
    pub fn insert_commits(
        &self,
        repo: &str,
        event_id: &str,
        refname: &str,
        commits: &[CommitRecord],
    ) -> Result<(), StoreError> {
        for c in commits {
            self.db.exec(
                "INSERT INTO commits (repo, sha, author, time, subject, ref, event_id)
                 VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
                params![repo, &c.sha, &c.author, c.time, &c.subject, refname, event_id],
            )?;
        }
        Ok(())
    }

    /// Indexed commits of a repository, newest author time first.
    pub fn commits(&self, repo: &str) -> Result<Vec<CommitRecord>, StoreError> {
        self.db.rows(
            "SELECT sha, author, time, subject FROM commits WHERE repo = $1
             ORDER BY time DESC, sha",
            params![repo],
            |r| {
                Ok(CommitRecord {
                    sha: r.text(0)?,
                    author: r.text(1)?,
                    time: r.int(2)?,
                    subject: r.text(3)?,
                })
            },
        )
    }

    pub fn set_repo_size(&self, repo: &str, bytes: u64) -> Result<(), StoreError> {
        self.db
            .exec(
                "INSERT INTO repo_sizes (repo, bytes, updated_at) VALUES ($1, $2, $3)
                 ON CONFLICT (repo) DO UPDATE SET bytes = excluded.bytes,
                     updated_at = excluded.updated_at",
                params![repo, i64::try_from(bytes).unwrap_or(i64::MAX), super::now()],
            )
            .map(drop)
    }

    /// The last measured size of a repository on disk, in bytes.
    pub fn repo_size(&self, repo: &str) -> Result<Option<u64>, StoreError> {
        Ok(self
            .db
            .row(
                "SELECT bytes FROM repo_sizes WHERE repo = $1",
                params![repo],
                |r| r.int(0),
            )?
            .map(|n| n.max(0) as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::git::repo_name::RepoName;

    #[test]
    fn outbox_jobs_webhooks_commits() {
        crate::store::each_backend(|store| {
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
        });
    }

    #[test]
    fn pending_rows_follow_their_transaction() {
        crate::store::each_backend(|store| {
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
        });
    }

    #[test]
    fn failed_transaction_leaves_nothing() {
        crate::store::each_backend(|store| {
            let r = store.in_transaction(|s| {
                s.outbox_insert("e1", "o/r", "{}")?;
                s.outbox_insert("e1", "o/r", "{}")
            });
            assert!(r.is_err());
            assert_eq!(store.outbox_depth().unwrap(), 0);
        });
    }
}
