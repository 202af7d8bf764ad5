//! Versioned schema migrations, applied at start-up (server and admin commands alike).
//!
//! Each backend has its own SQL per version under `migrations/{sqlite,postgres}/`, compiled into
//! the binary; versions are the same on both, so one number says where a database stands. The
//! applied versions are recorded in `gitplane_schema`; a database with a version this binary
//! does not know was written by a newer gitplane, and is refused rather than guessed at.
//!
//! Why not `refinery`: it pins its own rusqlite and postgres versions, and it has no lock across
//! processes, while several nodes start against one PostgreSQL database at once. Here a
//! PostgreSQL migration runs under an advisory lock, so exactly one node applies each version and
//! the others wait and then see it applied; every version runs in its own transaction (DDL is
//! transactional in both engines).

use super::sql::{params, Db};
use super::StoreError;

struct Migration {
    version: i64,
    name: &'static str,
    sqlite: &'static str,
    postgres: &'static str,
}

const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "initial",
        sqlite: include_str!("../../migrations/sqlite/V001__initial.sql"),
        postgres: include_str!("../../migrations/postgres/V001__initial.sql"),
    },
    Migration {
        version: 2,
        name: "node_scoping",
        sqlite: include_str!("../../migrations/sqlite/V002__node_scoping.sql"),
        postgres: include_str!("../../migrations/postgres/V002__node_scoping.sql"),
    },
    Migration {
        version: 3,
        name: "cluster",
        sqlite: include_str!("../../migrations/sqlite/V003__cluster.sql"),
        postgres: include_str!("../../migrations/postgres/V003__cluster.sql"),
    },
];

/// The newest schema version this binary knows.
pub fn latest() -> i64 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

/// An arbitrary constant naming gitplane's migration lock among the database's advisory locks.
const PG_MIGRATION_LOCK: i64 = 0x6769_7470_6c61_6e65; // "gitplane"

/// Brings the schema up to [`latest`]; refuses a database newer than this binary.
pub fn run(db: &Db) -> Result<(), StoreError> {
    if db.is_postgres() {
        db.exec("SELECT pg_advisory_lock($1)", params![PG_MIGRATION_LOCK])?;
        let result = apply(db);
        let _ = db.exec("SELECT pg_advisory_unlock($1)", params![PG_MIGRATION_LOCK]);
        result
    } else {
        apply(db)
    }
}

fn apply(db: &Db) -> Result<(), StoreError> {
    db.batch(
        "CREATE TABLE IF NOT EXISTS gitplane_schema (
            version BIGINT PRIMARY KEY,
            name TEXT NOT NULL,
            applied_at BIGINT NOT NULL
        )",
    )?;
    let current = db
        .row("SELECT max(version) FROM gitplane_schema", &[], |r| {
            r.opt_int(0)
        })?
        .flatten()
        .unwrap_or(0);
    if current > latest() {
        return Err(StoreError::SchemaTooNew {
            place: db.place().to_owned(),
            found: current,
            known: latest(),
        });
    }
    for m in MIGRATIONS.iter().filter(|m| m.version > current) {
        let sql = if db.is_postgres() {
            m.postgres
        } else {
            m.sqlite
        };
        db.nested(|| {
            db.batch(sql)?;
            db.exec(
                "INSERT INTO gitplane_schema (version, name, applied_at) VALUES ($1, $2, $3)",
                params![m.version, m.name, super::now()],
            )
            .map(drop)
        })?;
        tracing::info!(
            store = db.place(),
            version = m.version,
            name = m.name,
            "schema migrated"
        );
    }
    Ok(())
}
