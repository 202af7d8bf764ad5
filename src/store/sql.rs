//! One SQL surface over both backends. Queries are written once, in the dialect both engines
//! share (`$1` placeholders, `ON CONFLICT`, `RETURNING`, `CAST`), and run against either the
//! embedded SQLite connection or a pooled PostgreSQL one. Only schema creation differs per
//! backend (see [`super::migrate`]).
//!
//! Values cross in a small closed set of types ([`Value`]) so both drivers see the same typed
//! parameters: PostgreSQL refuses an `i32` where a `BIGINT` is expected, so every integer is an
//! `i64` and every integer column is `BIGINT`.

use std::cell::{Cell, RefCell};

use super::pg::{PgConn, PgPool, Pooled};
use super::{DbErrorKind, StoreError};

/// A query parameter.
#[derive(Debug, Clone, Copy)]
pub enum Value<'a> {
    Int(i64),
    Text(&'a str),
    Bool(bool),
    OptInt(Option<i64>),
    OptText(Option<&'a str>),
}

impl From<i64> for Value<'_> {
    fn from(v: i64) -> Self {
        Value::Int(v)
    }
}
impl From<u32> for Value<'_> {
    fn from(v: u32) -> Self {
        Value::Int(i64::from(v))
    }
}
impl<'a> From<&'a str> for Value<'a> {
    fn from(v: &'a str) -> Self {
        Value::Text(v)
    }
}
impl<'a> From<&'a String> for Value<'a> {
    fn from(v: &'a String) -> Self {
        Value::Text(v)
    }
}
impl From<bool> for Value<'_> {
    fn from(v: bool) -> Self {
        Value::Bool(v)
    }
}
impl From<Option<i64>> for Value<'_> {
    fn from(v: Option<i64>) -> Self {
        Value::OptInt(v)
    }
}
impl<'a> From<Option<&'a str>> for Value<'a> {
    fn from(v: Option<&'a str>) -> Self {
        Value::OptText(v)
    }
}

/// `params![a, b]`: a slice of [`Value`]s.
macro_rules! params {
    ($($v:expr),* $(,)?) => { &[$($crate::store::sql::Value::from($v)),*][..] };
}
pub(crate) use params;

impl rusqlite::ToSql for Value<'_> {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(match *self {
            Value::Int(v) => ToSqlOutput::Borrowed(ValueRef::Integer(v)),
            Value::Text(v) => ToSqlOutput::Borrowed(ValueRef::Text(v.as_bytes())),
            Value::Bool(v) => ToSqlOutput::Borrowed(ValueRef::Integer(i64::from(v))),
            Value::OptInt(Some(v)) => ToSqlOutput::Borrowed(ValueRef::Integer(v)),
            Value::OptText(Some(v)) => ToSqlOutput::Borrowed(ValueRef::Text(v.as_bytes())),
            Value::OptInt(None) | Value::OptText(None) => ToSqlOutput::Borrowed(ValueRef::Null),
        })
    }
}

fn pg_param<'v>(v: &'v Value<'_>) -> &'v (dyn postgres::types::ToSql + Sync) {
    match v {
        Value::Int(v) => v,
        Value::Text(v) => v,
        Value::Bool(v) => v,
        Value::OptInt(v) => v,
        Value::OptText(v) => v,
    }
}

/// One result row of either backend.
pub enum Row<'a> {
    Sqlite(&'a rusqlite::Row<'a>),
    Postgres(&'a postgres::Row),
}

impl Row<'_> {
    fn get<S>(&self, i: usize) -> Result<S, StoreError>
    where
        S: rusqlite::types::FromSql + for<'r> postgres::types::FromSql<'r>,
    {
        match self {
            Row::Sqlite(r) => r.get(i).map_err(|e| StoreError::Internal(e.to_string())),
            Row::Postgres(r) => r
                .try_get(i)
                .map_err(|e| StoreError::Internal(format!("column {i}: {e}"))),
        }
    }

    pub fn int(&self, i: usize) -> Result<i64, StoreError> {
        self.get::<i64>(i)
    }
    pub fn text(&self, i: usize) -> Result<String, StoreError> {
        self.get::<String>(i)
    }
    pub fn bool(&self, i: usize) -> Result<bool, StoreError> {
        self.get::<bool>(i)
    }
    pub fn opt_int(&self, i: usize) -> Result<Option<i64>, StoreError> {
        self.get::<Option<i64>>(i)
    }
    pub fn opt_text(&self, i: usize) -> Result<Option<String>, StoreError> {
        self.get::<Option<String>>(i)
    }
}

/// Rewrites `$N` placeholders as SQLite's numbered `?N` (SQLite would read `$1` as a *named*
/// parameter, numbered by first appearance, which breaks a query that uses `$2` before `$1`).
fn sqlite_dialect(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '$' && chars.peek().is_some_and(char::is_ascii_digit) {
            out.push('?');
        } else {
            out.push(c);
        }
    }
    out
}

/// The connection a [`super::Store`] runs its queries on.
pub enum Conn {
    Sqlite {
        conn: rusqlite::Connection,
        /// The file, for error messages.
        place: String,
    },
    Postgres {
        pool: PgPool,
        /// Checked out on first use and kept for the life of the store (a transaction must run
        /// on one connection); replaced when it broke outside a transaction.
        conn: Box<RefCell<Option<Pooled>>>,
        place: String,
    },
}

/// A connection plus the transaction depth (nesting uses savepoints).
pub struct Db {
    pub conn: Conn,
    depth: Cell<u32>,
}

impl Db {
    pub fn new(conn: Conn) -> Self {
        Self {
            conn,
            depth: Cell::new(0),
        }
    }

    pub fn place(&self) -> &str {
        match &self.conn {
            Conn::Sqlite { place, .. } | Conn::Postgres { place, .. } => place,
        }
    }

    pub fn is_postgres(&self) -> bool {
        matches!(self.conn, Conn::Postgres { .. })
    }

    fn sqlite_err(&self, e: rusqlite::Error) -> StoreError {
        let kind = match &e {
            rusqlite::Error::SqliteFailure(f, _)
                if f.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                DbErrorKind::Conflict
            }
            rusqlite::Error::SqliteFailure(f, _)
                if matches!(
                    f.code,
                    rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
                ) =>
            {
                DbErrorKind::Unavailable
            }
            _ => DbErrorKind::Other,
        };
        StoreError::Db {
            place: self.place().to_owned(),
            message: e.to_string(),
            kind,
        }
    }

    /// Runs `f` on the PostgreSQL connection, checking one out first if needed.
    fn with_pg<R>(
        &self,
        f: impl FnOnce(&mut PgConn) -> Result<R, postgres::Error>,
    ) -> Result<R, StoreError> {
        let Conn::Postgres { pool, conn, place } = &self.conn else {
            return Err(StoreError::Internal("not a PostgreSQL store".into()));
        };
        let mut slot = conn.borrow_mut();
        if slot.as_ref().is_some_and(|c| c.client.is_closed()) && self.depth.get() == 0 {
            *slot = None;
        }
        if slot.is_none() {
            *slot = Some(pool.checkout(place)?);
        }
        let Some(c) = slot.as_mut() else {
            return Err(StoreError::Internal("no connection".into()));
        };
        f(&mut *c).map_err(|e| super::pg::error(place, &e))
    }

    /// Runs a statement; returns the number of rows it changed.
    pub fn exec(&self, sql: &str, params: &[Value<'_>]) -> Result<u64, StoreError> {
        match &self.conn {
            Conn::Sqlite { conn, .. } => conn
                .prepare_cached(&sqlite_dialect(sql))
                .and_then(|mut s| s.execute(rusqlite::params_from_iter(params.iter())))
                .map(|n| n as u64)
                .map_err(|e| self.sqlite_err(e)),
            Conn::Postgres { .. } => {
                let args: Vec<_> = params.iter().map(pg_param).collect();
                self.with_pg(|c| {
                    let stmt = c.statement(sql)?;
                    c.client.execute(&stmt, &args)
                })
            }
        }
    }

    /// Runs a query and maps every row.
    pub fn rows<T>(
        &self,
        sql: &str,
        params: &[Value<'_>],
        mut map: impl FnMut(&Row<'_>) -> Result<T, StoreError>,
    ) -> Result<Vec<T>, StoreError> {
        match &self.conn {
            Conn::Sqlite { conn, .. } => {
                let mut stmt = conn
                    .prepare_cached(&sqlite_dialect(sql))
                    .map_err(|e| self.sqlite_err(e))?;
                let mut rows = stmt
                    .query(rusqlite::params_from_iter(params.iter()))
                    .map_err(|e| self.sqlite_err(e))?;
                let mut out = Vec::new();
                while let Some(r) = rows.next().map_err(|e| self.sqlite_err(e))? {
                    out.push(map(&Row::Sqlite(r))?);
                }
                Ok(out)
            }
            Conn::Postgres { .. } => {
                let args: Vec<_> = params.iter().map(pg_param).collect();
                let rows = self.with_pg(|c| {
                    let stmt = c.statement(sql)?;
                    c.client.query(&stmt, &args)
                })?;
                rows.iter().map(|r| map(&Row::Postgres(r))).collect()
            }
        }
    }

    /// Runs a query expected to give at most one row.
    pub fn row<T>(
        &self,
        sql: &str,
        params: &[Value<'_>],
        mut map: impl FnMut(&Row<'_>) -> Result<T, StoreError>,
    ) -> Result<Option<T>, StoreError> {
        let mut first = None;
        let mut seen = false;
        self.rows(sql, params, |r| {
            if !seen {
                seen = true;
                first = Some(map(r)?);
            }
            Ok(())
        })?;
        Ok(first)
    }

    /// Runs statements without parameters (transaction control, schema).
    pub fn batch(&self, sql: &str) -> Result<(), StoreError> {
        match &self.conn {
            Conn::Sqlite { conn, .. } => conn.execute_batch(sql).map_err(|e| self.sqlite_err(e)),
            Conn::Postgres { .. } => self.with_pg(|c| c.client.batch_execute(sql)),
        }
    }

    /// Begins the outermost transaction. SQLite takes the write lock now (`IMMEDIATE`), so a
    /// read-then-write cannot fail half-way against another writer; PostgreSQL serialises the
    /// same sections per node with a transaction-scoped advisory lock on `lock_key`.
    pub fn begin(&self, lock_key: Option<&str>) -> Result<(), StoreError> {
        match &self.conn {
            Conn::Sqlite { .. } => self.batch("BEGIN IMMEDIATE")?,
            Conn::Postgres { .. } => {
                self.batch("BEGIN")?;
                if let Some(key) = lock_key {
                    if let Err(e) =
                        self.exec("SELECT pg_advisory_xact_lock(hashtext($1))", params![key])
                    {
                        let _ = self.batch("ROLLBACK");
                        return Err(e);
                    }
                }
            }
        }
        self.depth.set(1);
        Ok(())
    }

    /// Commits the outermost transaction; rolls it back if the commit fails.
    pub fn commit(&self) -> Result<(), StoreError> {
        self.depth.set(0);
        self.batch("COMMIT").inspect_err(|_| {
            let _ = self.batch("ROLLBACK");
        })
    }

    pub fn rollback(&self) {
        self.depth.set(0);
        let _ = self.batch("ROLLBACK");
    }

    /// Runs `f` as one unit: a transaction, or a savepoint inside the current one.
    pub fn nested<R>(&self, f: impl FnOnce() -> Result<R, StoreError>) -> Result<R, StoreError> {
        let depth = self.depth.get();
        if depth == 0 {
            self.batch("BEGIN")?;
        } else {
            self.batch(&format!("SAVEPOINT gp_{depth}"))?;
        }
        self.depth.set(depth + 1);
        let result = f();
        self.depth.set(depth);
        match (&result, depth) {
            (Ok(_), 0) => self.batch("COMMIT").inspect_err(|_| {
                let _ = self.batch("ROLLBACK");
            })?,
            (Ok(_), _) => self.batch(&format!("RELEASE gp_{depth}"))?,
            // Undo only this unit; the error that matters is the caller's.
            (Err(_), 0) => {
                let _ = self.batch("ROLLBACK");
            }
            (Err(_), _) => {
                let _ = self.batch(&format!("ROLLBACK TO gp_{depth}; RELEASE gp_{depth}"));
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_become_sqlite_numbered_ones() {
        assert_eq!(
            sqlite_dialect("SELECT $2, '$' || x FROM t WHERE a = $1 AND b = $10"),
            "SELECT ?2, '$' || x FROM t WHERE a = ?1 AND b = ?10"
        );
    }
}
