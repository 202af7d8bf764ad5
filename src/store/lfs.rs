//! Git LFS tables of the embedded store: which objects exist (verified, with their size), which
//! repositories reference them, and file locks. Objects are content-addressed and shared on
//! disk, but a repository may only serve the objects linked to it: a link is made only by an
//! upload through that repository (which proves possession of the content).

use super::sql::{params, Row};
use super::{Store, StoreError};

/// A stored lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockRecord {
    pub id: i64,
    pub path: String,
    pub owner: String,
    /// Unix seconds.
    pub locked_at: i64,
}

/// The store's view of one object for one repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectState {
    /// Size of the verified object, if it is stored at all.
    pub stored_size: Option<u64>,
    /// Whether this repository references it.
    pub linked: bool,
}

/// Filters for listing locks.
#[derive(Debug, Default, Clone)]
pub struct LockQuery {
    pub path: Option<String>,
    pub id: Option<i64>,
    /// Only locks with an id above this (the previous page's last id).
    pub after_id: Option<i64>,
    pub limit: usize,
}

fn lock_from_row(r: &Row<'_>) -> Result<LockRecord, StoreError> {
    Ok(LockRecord {
        id: r.int(0)?,
        path: r.text(1)?,
        owner: r.text(2)?,
        locked_at: r.int(3)?,
    })
}

impl Store {
    pub fn lfs_object_state(&self, repo: &str, oid: &str) -> Result<ObjectState, StoreError> {
        // One round trip: the object's size, and whether this repository links it.
        let row = self.db.row(
            "SELECT o.size, l.oid FROM lfs_objects o
             LEFT JOIN lfs_repo_objects l ON l.oid = o.oid AND l.repo = $1
             WHERE o.oid = $2",
            params![repo, oid],
            |r| Ok((r.int(0)?, r.opt_text(1)?.is_some())),
        )?;
        Ok(match row {
            Some((size, linked)) => ObjectState {
                stored_size: Some(size.max(0) as u64),
                linked,
            },
            // A link always has its object (foreign key), so no object means no link.
            None => ObjectState {
                stored_size: None,
                linked: false,
            },
        })
    }

    /// Records a verified object and links it to `repo` (both idempotent).
    pub fn lfs_record_object(&self, repo: &str, oid: &str, size: u64) -> Result<(), StoreError> {
        let size = i64::try_from(size)
            .map_err(|_| StoreError::Internal("object size overflows".into()))?;
        self.db.nested(|| {
            self.db.exec(
                "INSERT INTO lfs_objects (oid, size, created_at) VALUES ($1, $2, $3)
                 ON CONFLICT (oid) DO NOTHING",
                params![oid, size, super::now()],
            )?;
            self.db.exec(
                "INSERT INTO lfs_repo_objects (repo, oid) VALUES ($1, $2)
                 ON CONFLICT (repo, oid) DO NOTHING",
                params![repo, oid],
            )?;
            Ok(())
        })
    }

    /// Creates a lock, or returns the existing one on `path` as the error's payload. Atomic
    /// across nodes: the unique (repo, path) key lets exactly one insert win.
    pub fn lfs_create_lock(
        &self,
        repo: &str,
        path: &str,
        owner: &str,
    ) -> Result<Result<LockRecord, LockRecord>, StoreError> {
        let inserted = self.db.row(
            "INSERT INTO lfs_locks (repo, path, owner, locked_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (repo, path) DO NOTHING RETURNING id, path, owner, locked_at",
            params![repo, path, owner, super::now()],
            lock_from_row,
        )?;
        if let Some(lock) = inserted {
            return Ok(Ok(lock));
        }
        let existing = self.db.row(
            "SELECT id, path, owner, locked_at FROM lfs_locks WHERE repo = $1 AND path = $2",
            params![repo, path],
            lock_from_row,
        )?;
        // Deleted between the two statements: the path is free now, so try once more.
        match existing {
            Some(lock) => Ok(Err(lock)),
            None => self
                .db
                .row(
                    "INSERT INTO lfs_locks (repo, path, owner, locked_at) VALUES ($1, $2, $3, $4)
                     ON CONFLICT (repo, path) DO NOTHING RETURNING id, path, owner, locked_at",
                    params![repo, path, owner, super::now()],
                    lock_from_row,
                )?
                .map(Ok)
                .ok_or_else(|| StoreError::Internal(format!("lock on {path} keeps changing"))),
        }
    }

    /// Locks in id order, and whether more follow.
    pub fn lfs_list_locks(
        &self,
        repo: &str,
        q: &LockQuery,
    ) -> Result<(Vec<LockRecord>, bool), StoreError> {
        let limit = i64::try_from(q.limit).unwrap_or(i64::MAX);
        let mut locks = self.db.rows(
            "SELECT id, path, owner, locked_at FROM lfs_locks
             WHERE repo = $1 AND (CAST($2 AS TEXT) IS NULL OR path = $2)
               AND (CAST($3 AS BIGINT) IS NULL OR id = $3)
               AND id > $4
             ORDER BY id LIMIT $5",
            params![
                repo,
                q.path.as_deref(),
                q.id,
                q.after_id.unwrap_or(0),
                limit.saturating_add(1)
            ],
            lock_from_row,
        )?;
        let more = locks.len() > q.limit;
        locks.truncate(q.limit);
        Ok((locks, more))
    }

    pub fn lfs_delete_lock(&self, repo: &str, id: i64) -> Result<Option<LockRecord>, StoreError> {
        self.db.row(
            "DELETE FROM lfs_locks WHERE repo = $1 AND id = $2
             RETURNING id, path, owner, locked_at",
            params![repo, id],
            lock_from_row,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_are_scoped_per_repository() {
        crate::store::each_backend(|store| {
            let oid = "a".repeat(64);
            assert_eq!(
                store.lfs_object_state("o/a", &oid).unwrap(),
                ObjectState {
                    stored_size: None,
                    linked: false
                }
            );
            store.lfs_record_object("o/a", &oid, 5).unwrap();
            store.lfs_record_object("o/a", &oid, 5).unwrap();
            assert_eq!(
                store.lfs_object_state("o/a", &oid).unwrap(),
                ObjectState {
                    stored_size: Some(5),
                    linked: true
                }
            );
            assert_eq!(
                store.lfs_object_state("o/b", &oid).unwrap(),
                ObjectState {
                    stored_size: Some(5),
                    linked: false
                }
            );
        });
    }

    #[test]
    fn locks_conflict_page_and_delete() {
        crate::store::each_backend(|store| {
            let a = store
                .lfs_create_lock("o/r", "a.bin", "alice")
                .unwrap()
                .unwrap();
            let conflict = store
                .lfs_create_lock("o/r", "a.bin", "bob")
                .unwrap()
                .unwrap_err();
            assert_eq!(conflict.owner, "alice");
            let b = store
                .lfs_create_lock("o/r", "b.bin", "bob")
                .unwrap()
                .unwrap();
            store
                .lfs_create_lock("o/other", "a.bin", "bob")
                .unwrap()
                .unwrap();
            let page = LockQuery {
                limit: 1,
                ..LockQuery::default()
            };
            let (first, more) = store.lfs_list_locks("o/r", &page).unwrap();
            assert_eq!((first.len(), more), (1, true));
            let next = LockQuery {
                after_id: Some(first[0].id),
                ..page
            };
            let (second, more) = store.lfs_list_locks("o/r", &next).unwrap();
            assert_eq!((second[0].id, more), (b.id, false));
            let by_path = LockQuery {
                path: Some("a.bin".into()),
                limit: 10,
                ..LockQuery::default()
            };
            assert_eq!(
                store.lfs_list_locks("o/r", &by_path).unwrap().0,
                vec![a.clone()]
            );
            assert_eq!(store.lfs_delete_lock("o/r", a.id).unwrap(), Some(a));
            assert_eq!(store.lfs_delete_lock("o/r", 999).unwrap(), None);
        });
    }
}
