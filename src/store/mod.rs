//! The embedded store: users, password hashes, repositories and grants in SQLite (WAL mode) under
//! the data dir. Calls are blocking: the server runs them on its blocking pool, never on a shard
//! thread; admin commands call them directly, safely while a server runs (SQLite serialises writers).

use std::path::{Path, PathBuf};
use std::time::Duration;

use argon2::password_hash::{rand_core::OsRng, PasswordHash, PasswordHasher, SaltString};
use argon2::{Argon2, PasswordVerifier};
use rusqlite::{params, Connection, OptionalExtension};

use crate::git::repo_name::RepoName;

mod hooks;
mod lfs;
pub use hooks::{
    CommitRecord, DeliveryRecord, JobRecord, OutboxRow, PendingRow, PendingState, Webhook,
};
pub use lfs::{LockQuery, LockRecord, ObjectState};

pub const DB_FILE: &str = "gitplane.db";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database {path}: {source}")]
    Db {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("user `{0}` already exists")]
    UserExists(String),
    #[error("no user `{0}`")]
    NoSuchUser(String),
    #[error("repository `{0}` already exists")]
    RepoExists(String),
    #[error("no repository `{0}`")]
    NoSuchRepo(String),
    #[error(
        "invalid user name `{0}`: use 1 to 64 of [A-Za-z0-9._-], not starting with '-' or '.'"
    )]
    BadUserName(String),
    #[error("password hashing failed: {0}")]
    Hash(String),
    #[error("{0}")]
    Internal(String),
    #[error("SSH key {0} is already registered")]
    SshKeyExists(String),
}

/// A user's level of access to one repository; higher levels include the lower ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Access {
    Read = 1,
    Write = 2,
    Admin = 3,
}

impl Access {
    fn from_db(v: i64) -> Option<Self> {
        match v {
            1 => Some(Self::Read),
            2 => Some(Self::Write),
            3 => Some(Self::Admin),
            _ => None,
        }
    }
}

impl std::str::FromStr for Access {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "read" => Ok(Self::Read),
            "write" => Ok(Self::Write),
            "admin" => Ok(Self::Admin),
            other => Err(format!("`{other}` is not one of read, write, admin")),
        }
    }
}

/// What the store knows about a repository for one (possibly anonymous) user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RepoAccess {
    pub public: bool,
    /// The user's own access (grant, or Admin as the owner); None for anonymous or no grant.
    pub user_access: Option<Access>,
}

pub struct Store {
    conn: Connection,
    path: PathBuf,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS users (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    created_at INTEGER NOT NULL DEFAULT (unixepoch())
);
CREATE TABLE IF NOT EXISTS repos (
    id INTEGER PRIMARY KEY,
    owner TEXT NOT NULL,
    name TEXT NOT NULL,
    public INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL DEFAULT (unixepoch()),
    UNIQUE (owner, name)
);
CREATE TABLE IF NOT EXISTS grants (
    repo_id INTEGER NOT NULL REFERENCES repos(id) ON DELETE CASCADE,
    user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    access INTEGER NOT NULL,
    PRIMARY KEY (repo_id, user_id)
);
CREATE TABLE IF NOT EXISTS ssh_keys (
    id INTEGER PRIMARY KEY,
    user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    fingerprint TEXT NOT NULL UNIQUE,
    algorithm TEXT NOT NULL,
    public_key TEXT NOT NULL,
    comment TEXT NOT NULL DEFAULT '',
    created_at INTEGER NOT NULL DEFAULT (unixepoch())
);
CREATE INDEX IF NOT EXISTS ssh_keys_user ON ssh_keys (user_id);
";

/// A registered SSH public key (see [`Store::add_ssh_key`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshKeyRecord {
    /// `SHA256:...`, as OpenSSH prints it.
    pub fingerprint: String,
    pub algorithm: String,
    pub comment: String,
    /// Unix seconds.
    pub created_at: i64,
}

fn valid_user_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['-', '.'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Runs `f` with this thread's connection to the store in `data_dir`, opened on first use.
/// Blocking pools (monoio's and tokio's) call this, so each pool thread keeps one connection.
pub fn with_thread_store<R>(
    data_dir: &Path,
    f: impl FnOnce(&Store) -> Result<R, StoreError>,
) -> Result<R, StoreError> {
    thread_local! {
        static STORE: std::cell::RefCell<Option<Store>> = const { std::cell::RefCell::new(None) };
    }
    STORE.with(|cell| {
        let mut slot = cell.borrow_mut();
        let store = match slot.take() {
            Some(s) => s,
            None => Store::open(data_dir)?,
        };
        let result = f(&store);
        *slot = Some(store);
        result
    })
}

impl Store {
    /// Opens (creating if needed) the database in `data_dir`.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|source| StoreError::DataDir {
            path: data_dir.to_owned(),
            source,
        })?;
        let path = data_dir.join(DB_FILE);
        let db = |source| StoreError::Db {
            path: path.clone(),
            source,
        };
        let conn = Connection::open(&path).map_err(db)?;
        conn.busy_timeout(Duration::from_secs(10)).map_err(db)?;
        // WAL + synchronous=FULL: a committed write survives power loss before we report success.
        conn.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;",
        )
        .map_err(db)?;
        conn.execute_batch(SCHEMA).map_err(db)?;
        conn.execute_batch(hooks::HOOK_SCHEMA).map_err(db)?;
        conn.execute_batch(lfs::LFS_SCHEMA).map_err(db)?;
        Ok(Self { conn, path })
    }

    fn db(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Db {
            path: self.path.clone(),
            source,
        }
    }

    pub fn user_count(&self) -> Result<u64, StoreError> {
        self.conn
            .query_row("SELECT count(*) FROM users", [], |r| r.get::<_, i64>(0))
            .map(|n| n.max(0) as u64)
            .map_err(|e| self.db(e))
    }

    pub fn add_user(&self, name: &str, password: &str) -> Result<(), StoreError> {
        if !valid_user_name(name) {
            return Err(StoreError::BadUserName(name.to_owned()));
        }
        let salt = SaltString::generate(&mut OsRng);
        let hash = Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map_err(|e| StoreError::Hash(e.to_string()))?
            .to_string();
        match self.conn.execute(
            "INSERT INTO users (name, password_hash) VALUES (?1, ?2)",
            params![name, hash],
        ) {
            Ok(_) => Ok(()),
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                Err(StoreError::UserExists(name.to_owned()))
            }
            Err(e) => Err(self.db(e)),
        }
    }

    /// Checks a password; `Ok(false)` for an unknown user or a wrong password alike.
    pub fn verify_password(&self, name: &str, password: &str) -> Result<bool, StoreError> {
        let hash: Option<String> = self
            .conn
            .query_row(
                "SELECT password_hash FROM users WHERE name = ?1",
                [name],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.db(e))?;
        let Some(hash) = hash else { return Ok(false) };
        let parsed = PasswordHash::new(&hash).map_err(|e| StoreError::Hash(e.to_string()))?;
        Ok(Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok())
    }

    /// Records a repository; the caller creates it on disk.
    pub fn create_repo(&self, repo: &RepoName, public: bool) -> Result<(), StoreError> {
        match self.conn.execute(
            "INSERT INTO repos (owner, name, public) VALUES (?1, ?2, ?3)",
            params![repo.owner(), repo.name(), public],
        ) {
            Ok(_) => Ok(()),
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                Err(StoreError::RepoExists(repo.to_string()))
            }
            Err(e) => Err(self.db(e)),
        }
    }

    pub fn delete_repo_record(&self, repo: &RepoName) -> Result<(), StoreError> {
        self.conn
            .execute(
                "DELETE FROM repos WHERE owner = ?1 AND name = ?2",
                params![repo.owner(), repo.name()],
            )
            .map(|_| ())
            .map_err(|e| self.db(e))
    }

    pub fn grant(&self, repo: &RepoName, user: &str, access: Access) -> Result<(), StoreError> {
        let repo_id: Option<i64> = self
            .conn
            .query_row(
                "SELECT id FROM repos WHERE owner = ?1 AND name = ?2",
                params![repo.owner(), repo.name()],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.db(e))?;
        let repo_id = repo_id.ok_or_else(|| StoreError::NoSuchRepo(repo.to_string()))?;
        let user_id: Option<i64> = self
            .conn
            .query_row("SELECT id FROM users WHERE name = ?1", [user], |r| r.get(0))
            .optional()
            .map_err(|e| self.db(e))?;
        let user_id = user_id.ok_or_else(|| StoreError::NoSuchUser(user.to_owned()))?;
        self.conn
            .execute(
                "INSERT INTO grants (repo_id, user_id, access) VALUES (?1, ?2, ?3)
                 ON CONFLICT (repo_id, user_id) DO UPDATE SET access = excluded.access",
                params![repo_id, user_id, access as i64],
            )
            .map(|_| ())
            .map_err(|e| self.db(e))
    }

    /// Registers a public key for `user`. A key (by fingerprint) identifies exactly one user, so
    /// registering it twice, for anyone, is refused. The caller validates and fingerprints it.
    pub fn add_ssh_key(
        &self,
        user: &str,
        fingerprint: &str,
        algorithm: &str,
        public_key: &str,
        comment: &str,
    ) -> Result<(), StoreError> {
        let user_id: Option<i64> = self
            .conn
            .query_row("SELECT id FROM users WHERE name = ?1", [user], |r| r.get(0))
            .optional()
            .map_err(|e| self.db(e))?;
        let user_id = user_id.ok_or_else(|| StoreError::NoSuchUser(user.to_owned()))?;
        match self.conn.execute(
            "INSERT INTO ssh_keys (user_id, fingerprint, algorithm, public_key, comment)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![user_id, fingerprint, algorithm, public_key, comment],
        ) {
            Ok(_) => Ok(()),
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                Err(StoreError::SshKeyExists(fingerprint.to_owned()))
            }
            Err(e) => Err(self.db(e)),
        }
    }

    /// The keys of `user`, oldest first.
    pub fn ssh_keys(&self, user: &str) -> Result<Vec<SshKeyRecord>, StoreError> {
        let exists: Option<i64> = self
            .conn
            .query_row("SELECT id FROM users WHERE name = ?1", [user], |r| r.get(0))
            .optional()
            .map_err(|e| self.db(e))?;
        let user_id = exists.ok_or_else(|| StoreError::NoSuchUser(user.to_owned()))?;
        let mut stmt = self
            .conn
            .prepare(
                "SELECT fingerprint, algorithm, comment, created_at FROM ssh_keys
                 WHERE user_id = ?1 ORDER BY id",
            )
            .map_err(|e| self.db(e))?;
        let rows = stmt
            .query_map([user_id], |r| {
                Ok(SshKeyRecord {
                    fingerprint: r.get(0)?,
                    algorithm: r.get(1)?,
                    comment: r.get(2)?,
                    created_at: r.get(3)?,
                })
            })
            .map_err(|e| self.db(e))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|e| self.db(e))
    }

    /// The user a key fingerprint belongs to, if it is registered.
    pub fn user_for_ssh_key(&self, fingerprint: &str) -> Result<Option<String>, StoreError> {
        self.conn
            .prepare_cached(
                "SELECT u.name FROM ssh_keys k JOIN users u ON u.id = k.user_id
                 WHERE k.fingerprint = ?1",
            )
            .and_then(|mut s| s.query_row([fingerprint], |r| r.get(0)).optional())
            .map_err(|e| self.db(e))
    }

    /// None when the repository does not exist. `user` is an authenticated user name.
    pub fn repo_access(
        &self,
        repo: &RepoName,
        user: Option<&str>,
    ) -> Result<Option<RepoAccess>, StoreError> {
        let row: Option<(i64, bool)> = self
            .conn
            .prepare_cached("SELECT id, public FROM repos WHERE owner = ?1 AND name = ?2")
            .and_then(|mut s| {
                s.query_row(params![repo.owner(), repo.name()], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })
                .optional()
            })
            .map_err(|e| self.db(e))?;
        let Some((repo_id, public)) = row else {
            return Ok(None);
        };
        let user_access = match user {
            None => None,
            Some(u) if u == repo.owner() => Some(Access::Admin),
            Some(u) => self
                .conn
                .prepare_cached(
                    "SELECT g.access FROM grants g JOIN users u ON u.id = g.user_id
                     WHERE g.repo_id = ?1 AND u.name = ?2",
                )
                .and_then(|mut s| s.query_row(params![repo_id, u], |r| r.get(0)).optional())
                .map_err(|e| self.db(e))?
                .and_then(Access::from_db),
        };
        Ok(Some(RepoAccess {
            public,
            user_access,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo(s: &str) -> RepoName {
        RepoName::parse(s).unwrap()
    }

    #[test]
    fn users_grants_and_owner_access() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.add_user("alice", "pw-a").unwrap();
        store.add_user("bob", "pw-b").unwrap();
        assert!(matches!(
            store.add_user("alice", "x"),
            Err(StoreError::UserExists(_))
        ));
        assert!(matches!(
            store.add_user("-x", "x"),
            Err(StoreError::BadUserName(_))
        ));
        assert!(store.verify_password("alice", "pw-a").unwrap());
        assert!(!store.verify_password("alice", "pw-b").unwrap());
        assert!(!store.verify_password("nobody", "pw-a").unwrap());

        let r = repo("alice/proj");
        assert_eq!(store.repo_access(&r, Some("alice")).unwrap(), None);
        store.create_repo(&r, false).unwrap();
        assert!(matches!(
            store.create_repo(&r, true),
            Err(StoreError::RepoExists(_))
        ));
        let owner = store.repo_access(&r, Some("alice")).unwrap().unwrap();
        assert_eq!(owner.user_access, Some(Access::Admin));
        assert!(!owner.public);
        assert_eq!(
            store
                .repo_access(&r, Some("bob"))
                .unwrap()
                .unwrap()
                .user_access,
            None
        );
        store.grant(&r, "bob", Access::Read).unwrap();
        store.grant(&r, "bob", Access::Write).unwrap();
        assert_eq!(
            store
                .repo_access(&r, Some("bob"))
                .unwrap()
                .unwrap()
                .user_access,
            Some(Access::Write)
        );
        assert!(matches!(
            store.grant(&r, "carol", Access::Read),
            Err(StoreError::NoSuchUser(_))
        ));
        assert!(matches!(
            store.grant(&repo("x/y"), "bob", Access::Read),
            Err(StoreError::NoSuchRepo(_))
        ));
    }

    #[test]
    fn ssh_keys_identify_one_user() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.add_user("alice", "pw").unwrap();
        store.add_user("bob", "pw").unwrap();
        store
            .add_ssh_key(
                "alice",
                "SHA256:aaa",
                "ssh-ed25519",
                "ssh-ed25519 AAAA a",
                "laptop",
            )
            .unwrap();
        assert!(matches!(
            store.add_ssh_key("bob", "SHA256:aaa", "ssh-ed25519", "ssh-ed25519 AAAA a", ""),
            Err(StoreError::SshKeyExists(_))
        ));
        assert!(matches!(
            store.add_ssh_key("carol", "SHA256:bbb", "ssh-ed25519", "x", ""),
            Err(StoreError::NoSuchUser(_))
        ));
        assert_eq!(
            store.user_for_ssh_key("SHA256:aaa").unwrap().as_deref(),
            Some("alice")
        );
        assert_eq!(store.user_for_ssh_key("SHA256:zzz").unwrap(), None);
        let keys = store.ssh_keys("alice").unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].comment, "laptop");
        assert!(store.ssh_keys("bob").unwrap().is_empty());
        assert!(matches!(
            store.ssh_keys("carol"),
            Err(StoreError::NoSuchUser(_))
        ));
    }
}
