//! The store: users, password hashes, repositories, grants, SSH keys, LFS metadata and locks,
//! and the hook workers' tables. Two backends behind one interface ([`sql`]): the embedded SQLite
//! file under the data dir (WAL mode; one node), or a shared PostgreSQL database (a fleet of
//! nodes, `[store] url`). Calls are blocking: the server runs them on its blocking pools, never on
//! a shard thread; admin commands call them directly, safely while servers run.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use argon2::password_hash::{rand_core::OsRng, PasswordHash, PasswordHasher, SaltString};
use argon2::{Argon2, PasswordVerifier};

use crate::git::repo_name::RepoName;

pub mod cluster;
mod hooks;
mod lfs;
mod migrate;
pub mod pg;
pub mod revocation;
pub mod scratch;
pub(crate) mod sql;
pub use hooks::{
    CommitRecord, DeliveryRecord, JobRecord, OutboxRow, PendingRow, PendingState, Webhook,
};
pub use lfs::{LockQuery, LockRecord, ObjectState};
use sql::{params, Conn, Db};

pub const DB_FILE: &str = "gitplane.db";

/// What kind of database failure this was: callers answer 409, 503 or 500 from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbErrorKind {
    /// A unique key refused the write (another request, possibly on another node, won).
    Conflict,
    /// The database cannot be reached or is shutting down: retry later.
    Unavailable,
    Other,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database {place}: {message}")]
    Db {
        /// The SQLite file, or the PostgreSQL URL without its password.
        place: String,
        message: String,
        kind: DbErrorKind,
    },
    #[error("database {place} has schema version {found}, newer than this gitplane knows ({known}): run the newer binary")]
    SchemaTooNew {
        place: String,
        found: i64,
        known: i64,
    },
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Url(#[from] pg::UrlError),
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
    #[error("no SSH key {0}")]
    NoSuchKey(String),
    #[error("`{user}` has no grant on {repo}")]
    NoSuchGrant { repo: String, user: String },
}

impl StoreError {
    /// The database is unreachable (down, restarting, pool exhausted): answer 503 and retry.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            StoreError::Db {
                kind: DbErrorKind::Unavailable,
                ..
            }
        )
    }

    fn is_conflict(&self) -> bool {
        matches!(
            self,
            StoreError::Db {
                kind: DbErrorKind::Conflict,
                ..
            }
        )
    }
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoAccess {
    pub public: bool,
    /// The user's own access (grant, or Admin as the owner); None for anonymous or no grant.
    pub user_access: Option<Access>,
    /// The node the repository lives on when that is not this one: it cannot be served here.
    pub elsewhere: Option<String>,
    /// Its copies in a cluster (none when it is not replicated), read in the same round trip so
    /// routing a request costs no second query.
    pub replicas: cluster::Replicas,
}

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

fn now() -> i64 {
    i64::try_from(crate::clock::unix_now()).unwrap_or(i64::MAX)
}

/// Where the store is: the embedded file under the data dir, or a shared PostgreSQL database
/// (with this node's name, which scopes its repositories and hook events). Cheap to clone.
#[derive(Clone)]
pub struct Location {
    inner: Arc<LocationInner>,
}

struct LocationInner {
    data_dir: PathBuf,
    /// '' for the embedded store (one node).
    node: String,
    backend: Backend,
}

enum Backend {
    Sqlite,
    Postgres {
        pool: pg::PgPool,
        url: Box<pg::PgUrl>,
    },
}

/// Connections per node to PostgreSQL, when `[store] max_connections` is not set.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 16;

impl Location {
    /// The embedded SQLite file in `data_dir` (nothing is opened yet).
    pub fn sqlite(data_dir: &Path) -> Self {
        Self {
            inner: Arc::new(LocationInner {
                data_dir: data_dir.to_owned(),
                node: String::new(),
                backend: Backend::Sqlite,
            }),
        }
    }

    /// The store a process should use: PostgreSQL at `url` when given, else the embedded file.
    /// `node` names this node in a shared store (default: the host name). Connects nothing yet:
    /// see [`Location::prepare`].
    pub fn new(
        data_dir: &Path,
        url: Option<&str>,
        node: Option<&str>,
        max_connections: u32,
    ) -> Result<Self, StoreError> {
        let Some(url) = url.filter(|u| !u.is_empty()) else {
            return Ok(Self::sqlite(data_dir));
        };
        let url = pg::PgUrl::parse(url)?;
        let node = match node.filter(|n| !n.is_empty()) {
            Some(n) => n.to_owned(),
            None => host_name()?,
        };
        if !valid_user_name(&node) {
            return Err(StoreError::Internal(format!(
                "invalid node id `{node}`: use 1 to 64 of [A-Za-z0-9._-]"
            )));
        }
        let pool = pg::PgPool::new(&url, max_connections)?;
        Ok(Self {
            inner: Arc::new(LocationInner {
                data_dir: data_dir.to_owned(),
                node,
                backend: Backend::Postgres {
                    pool,
                    url: Box::new(url),
                },
            }),
        })
    }

    /// Opens the store once and brings its schema up to date: a process calls this at start so
    /// that an unreachable database or a newer schema stops it with a clear error.
    pub fn prepare(&self) -> Result<(), StoreError> {
        let store = Store::open(self)?;
        if self.pg_pool().is_some() {
            migrate::run(&store.db)?;
        }
        Ok(())
    }

    pub fn data_dir(&self) -> &Path {
        &self.inner.data_dir
    }

    /// This node's name in a shared store; '' for the embedded one.
    pub fn node(&self) -> &str {
        &self.inner.node
    }

    /// The database, for logs: the SQLite file or the URL without its password.
    pub fn describe(&self) -> String {
        match &self.inner.backend {
            Backend::Sqlite => self.inner.data_dir.join(DB_FILE).display().to_string(),
            Backend::Postgres { url, .. } => url.redacted.clone(),
        }
    }

    /// The PostgreSQL URL as given (password included), for the hook processes git runs.
    pub fn secret_url(&self) -> Option<&str> {
        match &self.inner.backend {
            Backend::Sqlite => None,
            Backend::Postgres { url, .. } => Some(url.original()),
        }
    }

    pub fn pg_pool(&self) -> Option<&pg::PgPool> {
        match &self.inner.backend {
            Backend::Sqlite => None,
            Backend::Postgres { pool, .. } => Some(pool),
        }
    }
}

impl std::fmt::Debug for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (node `{}`)", self.describe(), self.node())
    }
}

/// This machine's name: the default node id in a shared store.
fn host_name() -> Result<String, StoreError> {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } != 0 {
        return Err(StoreError::Internal(format!(
            "cannot read the host name for the node id (set --node-id): {}",
            std::io::Error::last_os_error()
        )));
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    Ok(String::from_utf8_lossy(&buf[..end]).into_owned())
}

pub struct Store {
    db: Db,
    node: String,
}

/// Runs `f` with a store for `location` on this thread: for SQLite this thread's own connection,
/// opened on first use (blocking pools call this, so each pool thread keeps one); for PostgreSQL
/// a connection from the node's bounded pool for the length of the call.
pub fn with_thread_store<R>(
    location: &Location,
    f: impl FnOnce(&Store) -> Result<R, StoreError>,
) -> Result<R, StoreError> {
    if location.pg_pool().is_some() {
        return f(&Store::open(location)?);
    }
    thread_local! {
        static STORE: std::cell::RefCell<Option<(PathBuf, Store)>> =
            const { std::cell::RefCell::new(None) };
    }
    STORE.with(|cell| {
        let mut slot = cell.borrow_mut();
        let store = match slot.take() {
            Some((dir, s)) if dir == location.data_dir() => s,
            _ => Store::open(location)?,
        };
        let result = f(&store);
        *slot = Some((location.data_dir().to_owned(), store));
        result
    })
}

impl Store {
    /// Opens the store at `location`: for SQLite the file (created and migrated if needed), for
    /// PostgreSQL a handle that checks a pooled connection out on first use.
    pub fn open(location: &Location) -> Result<Self, StoreError> {
        let node = location.node().to_owned();
        match &location.inner.backend {
            Backend::Postgres { pool, url } => Ok(Self {
                db: Db::new(Conn::Postgres {
                    pool: pool.clone(),
                    conn: Box::new(std::cell::RefCell::new(None)),
                    place: url.redacted.clone(),
                }),
                node,
            }),
            Backend::Sqlite => {
                let data_dir = location.data_dir();
                std::fs::create_dir_all(data_dir).map_err(|source| StoreError::DataDir {
                    path: data_dir.to_owned(),
                    source,
                })?;
                let path = data_dir.join(DB_FILE);
                let place = path.display().to_string();
                let db_err = |e: rusqlite::Error| StoreError::Db {
                    place: place.clone(),
                    message: e.to_string(),
                    kind: DbErrorKind::Other,
                };
                let conn = rusqlite::Connection::open(&path).map_err(db_err)?;
                conn.busy_timeout(Duration::from_secs(10)).map_err(db_err)?;
                // WAL + synchronous=FULL: a committed write survives power loss before we
                // report success.
                conn.execute_batch(
                    "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;",
                )
                .map_err(db_err)?;
                let db = Db::new(Conn::Sqlite { conn, place });
                migrate::run(&db)?;
                Ok(Self { db, node })
            }
        }
    }

    pub fn user_count(&self) -> Result<u64, StoreError> {
        let n = self
            .db
            .row("SELECT count(*) FROM users", &[], |r| r.int(0))?
            .unwrap_or(0);
        Ok(n.max(0) as u64)
    }

    fn hash_password(password: &str) -> Result<String, StoreError> {
        let salt = SaltString::generate(&mut OsRng);
        Ok(Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map_err(|e| StoreError::Hash(e.to_string()))?
            .to_string())
    }

    pub fn add_user(&self, name: &str, password: &str) -> Result<(), StoreError> {
        if !valid_user_name(name) {
            return Err(StoreError::BadUserName(name.to_owned()));
        }
        let hash = Self::hash_password(password)?;
        match self.db.exec(
            "INSERT INTO users (name, password_hash, created_at) VALUES ($1, $2, $3)",
            params![name, &hash, now()],
        ) {
            Err(e) if e.is_conflict() => Err(StoreError::UserExists(name.to_owned())),
            r => r.map(drop),
        }
    }

    /// Sets a new password; every node stops trusting the old one (see [`revocation`]).
    pub fn set_password(&self, name: &str, password: &str) -> Result<(), StoreError> {
        let hash = Self::hash_password(password)?;
        self.revoking(&format!("user:{name}"), |s| {
            let n = s.db.exec(
                "UPDATE users SET password_hash = $1 WHERE name = $2",
                params![&hash, name],
            )?;
            if n == 0 {
                return Err(StoreError::NoSuchUser(name.to_owned()));
            }
            Ok(())
        })
    }

    /// Removes a user with their keys and grants (their repositories stay, as records of their
    /// owner name); every node stops accepting their credentials.
    pub fn remove_user(&self, name: &str) -> Result<(), StoreError> {
        self.revoking(&format!("user:{name}"), |s| {
            let n =
                s.db.exec("DELETE FROM users WHERE name = $1", params![name])?;
            if n == 0 {
                return Err(StoreError::NoSuchUser(name.to_owned()));
            }
            Ok(())
        })
    }

    /// Runs a change that takes trust away, and tells every node (in the same transaction, so
    /// the notice goes out exactly when the change commits).
    fn revoking(
        &self,
        what: &str,
        f: impl FnOnce(&Store) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        self.db.nested(|| {
            f(self)?;
            if self.db.is_postgres() {
                self.db.exec(
                    "SELECT pg_notify($1, $2)",
                    params![revocation::CHANNEL, what],
                )?;
            }
            Ok(())
        })
    }

    /// Checks a password; `Ok(false)` for an unknown user or a wrong password alike.
    pub fn verify_password(&self, name: &str, password: &str) -> Result<bool, StoreError> {
        let hash = self.db.row(
            "SELECT password_hash FROM users WHERE name = $1",
            params![name],
            |r| r.text(0),
        )?;
        let Some(hash) = hash else { return Ok(false) };
        let parsed = PasswordHash::new(&hash).map_err(|e| StoreError::Hash(e.to_string()))?;
        Ok(Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok())
    }

    /// Records a repository as living on this node; the caller creates it on disk.
    pub fn create_repo(&self, repo: &RepoName, public: bool) -> Result<(), StoreError> {
        match self.db.exec(
            "INSERT INTO repos (owner, name, public, node, created_at) VALUES ($1, $2, $3, $4, $5)",
            params![repo.owner(), repo.name(), public, &self.node, now()],
        ) {
            Err(e) if e.is_conflict() => Err(StoreError::RepoExists(repo.to_string())),
            r => r.map(drop),
        }
    }

    pub fn delete_repo_record(&self, repo: &RepoName) -> Result<(), StoreError> {
        self.db
            .exec(
                "DELETE FROM repos WHERE owner = $1 AND name = $2",
                params![repo.owner(), repo.name()],
            )
            .map(drop)
    }

    fn repo_id(&self, repo: &RepoName) -> Result<i64, StoreError> {
        self.db
            .row(
                "SELECT id FROM repos WHERE owner = $1 AND name = $2",
                params![repo.owner(), repo.name()],
                |r| r.int(0),
            )?
            .ok_or_else(|| StoreError::NoSuchRepo(repo.to_string()))
    }

    fn user_id(&self, user: &str) -> Result<i64, StoreError> {
        self.db
            .row("SELECT id FROM users WHERE name = $1", params![user], |r| {
                r.int(0)
            })?
            .ok_or_else(|| StoreError::NoSuchUser(user.to_owned()))
    }

    pub fn grant(&self, repo: &RepoName, user: &str, access: Access) -> Result<(), StoreError> {
        let repo_id = self.repo_id(repo)?;
        let user_id = self.user_id(user)?;
        self.revoking(&format!("grant:{repo}:{user}"), |s| {
            s.db.exec(
                "INSERT INTO grants (repo_id, user_id, access) VALUES ($1, $2, $3)
                 ON CONFLICT (repo_id, user_id) DO UPDATE SET access = excluded.access",
                params![repo_id, user_id, access as i64],
            )
            .map(drop)
        })
    }

    /// Takes `user`'s grant on `repo` away.
    pub fn revoke(&self, repo: &RepoName, user: &str) -> Result<(), StoreError> {
        let repo_id = self.repo_id(repo)?;
        let user_id = self.user_id(user)?;
        self.revoking(&format!("grant:{repo}:{user}"), |s| {
            let n = s.db.exec(
                "DELETE FROM grants WHERE repo_id = $1 AND user_id = $2",
                params![repo_id, user_id],
            )?;
            if n == 0 {
                return Err(StoreError::NoSuchGrant {
                    repo: repo.to_string(),
                    user: user.to_owned(),
                });
            }
            Ok(())
        })
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
        let user_id = self.user_id(user)?;
        match self.db.exec(
            "INSERT INTO ssh_keys (user_id, fingerprint, algorithm, public_key, comment, created_at)
             VALUES ($1, $2, $3, $4, $5, $6)",
            params![user_id, fingerprint, algorithm, public_key, comment, now()],
        ) {
            Err(e) if e.is_conflict() => Err(StoreError::SshKeyExists(fingerprint.to_owned())),
            r => r.map(drop),
        }
    }

    /// Removes a key by fingerprint; returns the user it belonged to.
    pub fn remove_ssh_key(&self, fingerprint: &str) -> Result<String, StoreError> {
        let user = self
            .user_for_ssh_key(fingerprint)?
            .ok_or_else(|| StoreError::NoSuchKey(fingerprint.to_owned()))?;
        self.revoking(&format!("key:{fingerprint}"), |s| {
            s.db.exec(
                "DELETE FROM ssh_keys WHERE fingerprint = $1",
                params![fingerprint],
            )
            .map(drop)
        })?;
        Ok(user)
    }

    /// The keys of `user`, oldest first.
    pub fn ssh_keys(&self, user: &str) -> Result<Vec<SshKeyRecord>, StoreError> {
        let user_id = self.user_id(user)?;
        self.db.rows(
            "SELECT fingerprint, algorithm, comment, created_at FROM ssh_keys
             WHERE user_id = $1 ORDER BY id",
            params![user_id],
            |r| {
                Ok(SshKeyRecord {
                    fingerprint: r.text(0)?,
                    algorithm: r.text(1)?,
                    comment: r.text(2)?,
                    created_at: r.int(3)?,
                })
            },
        )
    }

    /// The user a key fingerprint belongs to, if it is registered.
    pub fn user_for_ssh_key(&self, fingerprint: &str) -> Result<Option<String>, StoreError> {
        self.db.row(
            "SELECT u.name FROM ssh_keys k JOIN users u ON u.id = k.user_id
             WHERE k.fingerprint = $1",
            params![fingerprint],
            |r| r.text(0),
        )
    }

    /// None when the repository does not exist. `user` is an authenticated user name.
    pub fn repo_access(
        &self,
        repo: &RepoName,
        user: Option<&str>,
    ) -> Result<Option<RepoAccess>, StoreError> {
        // One round trip: the repository, where it lives, the user's grant, and its replicas
        // (one row per replica, at least one row).
        let rows = self.db.rows(
            "SELECT r.public, r.node, g.access, r.generation, rr.node, rr.generation, r.id
             FROM repos r
             LEFT JOIN users u ON u.name = $3
             LEFT JOIN grants g ON g.repo_id = r.id AND g.user_id = u.id
             LEFT JOIN repo_replicas rr ON rr.repo_id = r.id
             WHERE r.owner = $1 AND r.name = $2 ORDER BY rr.node",
            params![repo.owner(), repo.name(), user.unwrap_or("")],
            |r| {
                let replica = match (r.opt_text(4)?, r.opt_int(5)?) {
                    (Some(node), Some(generation)) => {
                        Some(cluster::ReplicaRecord { node, generation })
                    }
                    _ => None,
                };
                let repo_id = r.int(6)?;
                Ok((
                    r.bool(0)?,
                    r.text(1)?,
                    r.opt_int(2)?,
                    r.int(3)?,
                    replica,
                    repo_id,
                ))
            },
        )?;
        let Some((public, node, grant, generation, _, repo_id)) = rows.first().cloned() else {
            return Ok(None);
        };
        let replicas = cluster::Replicas {
            repo_id,
            generation,
            replicas: rows.into_iter().filter_map(|row| row.4).collect(),
        };
        let user_access = match user {
            None => None,
            Some(u) if u == repo.owner() => Some(Access::Admin),
            Some(_) => grant.and_then(Access::from_db),
        };
        let elsewhere = (!node.is_empty() && node != self.node).then_some(node);
        Ok(Some(RepoAccess {
            public,
            user_access,
            elsewhere,
            replicas,
        }))
    }
}

/// Runs a unit test's body against each backend: the embedded file and a scratch PostgreSQL
/// database.
#[cfg(test)]
pub(crate) fn each_backend(test: impl Fn(&Store)) {
    let dir = tempfile::tempdir().unwrap();
    test(&Store::open(&Location::sqlite(dir.path())).unwrap());
    let db = scratch::ScratchDb::create().unwrap_or_else(|e| panic!("{e}"));
    let pg = Location::new(dir.path(), Some(db.url()), Some("n1"), 4).unwrap();
    pg.prepare().unwrap();
    test(&Store::open(&pg).unwrap());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_newer_schema_is_refused() {
        each_backend(|store| {
            store
                .db
                .exec(
                    "INSERT INTO gitplane_schema (version, name, applied_at) VALUES ($1, $2, $3)",
                    params![migrate::latest() + 1, "from-the-future", 0i64],
                )
                .unwrap();
            let e = migrate::run(&store.db).expect_err("a newer schema must be refused");
            assert!(matches!(e, StoreError::SchemaTooNew { .. }), "{e}");
            assert!(e.to_string().contains("newer than this gitplane"), "{e}");
        });
    }

    #[test]
    fn concurrent_creations_have_one_winner() {
        // Two connections racing (two nodes' requests): one user, one repository, one lock.
        let dir = tempfile::tempdir().unwrap();
        let db = scratch::ScratchDb::create().unwrap_or_else(|e| panic!("{e}"));
        for location in [
            Location::sqlite(dir.path()),
            Location::new(dir.path(), Some(db.url()), Some("n1"), 8).unwrap(),
        ] {
            location.prepare().unwrap();
            for round in 0..5 {
                let outcomes: Vec<(bool, bool, bool)> = std::thread::scope(|s| {
                    let handles: Vec<_> = (0..4)
                        .map(|_| {
                            let location = location.clone();
                            s.spawn(move || {
                                let store = Store::open(&location).unwrap();
                                let user = store.add_user(&format!("u{round}"), "pw");
                                let repo = store.create_repo(&repo(&format!("o/r{round}")), false);
                                let lock = store.lfs_create_lock("o/r", &format!("p{round}"), "me");
                                // A loser gets the clear error, never a database failure.
                                assert!(
                                    matches!(user, Ok(()) | Err(StoreError::UserExists(_))),
                                    "{user:?}"
                                );
                                assert!(
                                    matches!(repo, Ok(()) | Err(StoreError::RepoExists(_))),
                                    "{repo:?}"
                                );
                                assert!(lock.is_ok(), "{lock:?}");
                                (user.is_ok(), repo.is_ok(), matches!(lock, Ok(Ok(_))))
                            })
                        })
                        .collect();
                    handles.into_iter().map(|h| h.join().unwrap()).collect()
                });
                let wins = |pick: fn(&(bool, bool, bool)) -> bool| {
                    outcomes.iter().filter(|o| pick(o)).count()
                };
                assert_eq!(wins(|o| o.0), 1, "{location:?}: users created");
                assert_eq!(wins(|o| o.1), 1, "{location:?}: repositories created");
                assert_eq!(wins(|o| o.2), 1, "{location:?}: locks taken");
            }
        }
    }

    fn repo(s: &str) -> RepoName {
        RepoName::parse(s).unwrap()
    }

    #[test]
    fn users_grants_and_owner_access() {
        crate::store::each_backend(|store| {
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
        });
    }

    #[test]
    fn ssh_keys_identify_one_user() {
        crate::store::each_backend(|store| {
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
        });
    }
}
