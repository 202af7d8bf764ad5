//! Git LFS tables of the embedded store: which objects exist (verified, with their size), which
//! repositories reference them, and file locks. Objects are content-addressed and shared on
//! disk, but a repository may only serve the objects linked to it: a link is made only by an
//! upload through that repository (which proves possession of the content).

use rusqlite::{params, OptionalExtension};

use super::{Store, StoreError};

pub(super) const LFS_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS lfs_objects (
    oid TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    created_at INTEGER NOT NULL DEFAULT (unixepoch())
);
CREATE TABLE IF NOT EXISTS lfs_repo_objects (
    repo TEXT NOT NULL,
    oid TEXT NOT NULL REFERENCES lfs_objects(oid),
    PRIMARY KEY (repo, oid)
);
CREATE TABLE IF NOT EXISTS lfs_locks (
    id INTEGER PRIMARY KEY,
    repo TEXT NOT NULL,
    path TEXT NOT NULL,
    owner TEXT NOT NULL,
    locked_at INTEGER NOT NULL DEFAULT (unixepoch()),
    UNIQUE (repo, path)
);
";

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

fn lock_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<LockRecord> {
    Ok(LockRecord {
        id: r.get(0)?,
        path: r.get(1)?,
        owner: r.get(2)?,
        locked_at: r.get(3)?,
    })
}

impl Store {
    pub fn lfs_object_state(&self, repo: &str, oid: &str) -> Result<ObjectState, StoreError> {
        let stored_size: Option<i64> = self
            .conn
            .prepare_cached("SELECT size FROM lfs_objects WHERE oid = ?1")
            .and_then(|mut s| s.query_row([oid], |r| r.get(0)).optional())
            .map_err(|e| self.db(e))?;
        let linked = self
            .conn
            .prepare_cached("SELECT 1 FROM lfs_repo_objects WHERE repo = ?1 AND oid = ?2")
            .and_then(|mut s| s.exists(params![repo, oid]))
            .map_err(|e| self.db(e))?;
        Ok(ObjectState {
            stored_size: stored_size.map(|n| n.max(0) as u64),
            linked,
        })
    }

    /// Records a verified object and links it to `repo` (both idempotent).
    pub fn lfs_record_object(&self, repo: &str, oid: &str, size: u64) -> Result<(), StoreError> {
        let size = i64::try_from(size)
            .map_err(|_| StoreError::Internal("object size overflows".into()))?;
        self.conn
            .execute(
                "INSERT INTO lfs_objects (oid, size) VALUES (?1, ?2) ON CONFLICT (oid) DO NOTHING",
                params![oid, size],
            )
            .and_then(|_| {
                self.conn.execute(
                    "INSERT INTO lfs_repo_objects (repo, oid) VALUES (?1, ?2)
                     ON CONFLICT (repo, oid) DO NOTHING",
                    params![repo, oid],
                )
            })
            .map(|_| ())
            .map_err(|e| self.db(e))
    }

    /// Creates a lock, or returns the existing one on `path` as the error's payload.
    pub fn lfs_create_lock(
        &self,
        repo: &str,
        path: &str,
        owner: &str,
    ) -> Result<Result<LockRecord, LockRecord>, StoreError> {
        let inserted = self.conn.execute(
            "INSERT INTO lfs_locks (repo, path, owner) VALUES (?1, ?2, ?3)
             ON CONFLICT (repo, path) DO NOTHING",
            params![repo, path, owner],
        );
        let inserted = inserted.map_err(|e| self.db(e))? == 1;
        let lock = self
            .conn
            .query_row(
                "SELECT id, path, owner, locked_at FROM lfs_locks WHERE repo = ?1 AND path = ?2",
                params![repo, path],
                lock_from_row,
            )
            .map_err(|e| self.db(e))?;
        Ok(if inserted { Ok(lock) } else { Err(lock) })
    }

    /// Locks in id order, and whether more follow.
    pub fn lfs_list_locks(
        &self,
        repo: &str,
        q: &LockQuery,
    ) -> Result<(Vec<LockRecord>, bool), StoreError> {
        let limit = i64::try_from(q.limit).unwrap_or(i64::MAX);
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT id, path, owner, locked_at FROM lfs_locks
                 WHERE repo = ?1 AND (?2 IS NULL OR path = ?2) AND (?3 IS NULL OR id = ?3)
                   AND id > ?4
                 ORDER BY id LIMIT ?5",
            )
            .map_err(|e| self.db(e))?;
        let mut locks = stmt
            .query_map(
                params![
                    repo,
                    q.path,
                    q.id,
                    q.after_id.unwrap_or(0),
                    limit.saturating_add(1)
                ],
                lock_from_row,
            )
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(|e| self.db(e))?;
        let more = locks.len() > q.limit;
        locks.truncate(q.limit);
        Ok((locks, more))
    }

    pub fn lfs_delete_lock(&self, repo: &str, id: i64) -> Result<Option<LockRecord>, StoreError> {
        let lock = self
            .conn
            .query_row(
                "SELECT id, path, owner, locked_at FROM lfs_locks WHERE repo = ?1 AND id = ?2",
                params![repo, id],
                lock_from_row,
            )
            .optional()
            .map_err(|e| self.db(e))?;
        if lock.is_some() {
            self.conn
                .execute(
                    "DELETE FROM lfs_locks WHERE repo = ?1 AND id = ?2",
                    params![repo, id],
                )
                .map_err(|e| self.db(e))?;
        }
        Ok(lock)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_are_scoped_per_repository() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
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
    }

    #[test]
    fn locks_conflict_page_and_delete() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
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
    }
}
