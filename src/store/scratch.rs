//! Throw-away PostgreSQL databases for tests and benchmarks: one per test (or per server a test
//! starts), created on the server named by `GITPLANE_TEST_PG_ADMIN_URL` (default: the local
//! server the README's test command starts) and dropped when the handle goes. A missing server
//! fails the test with its URL; it never skips it.

use postgres::{Client, NoTls};

/// The maintenance database the scratch ones are created from.
pub fn admin_url() -> String {
    std::env::var("GITPLANE_TEST_PG_ADMIN_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// A database that exists until this is dropped.
pub struct ScratchDb {
    name: String,
    url: String,
}

#[derive(Debug, thiserror::Error)]
#[error("PostgreSQL at {url} (set GITPLANE_TEST_PG_ADMIN_URL, or run scripts/test.sh, which starts one): {source}")]
pub struct ScratchError {
    url: String,
    source: postgres::Error,
}

impl ScratchDb {
    pub fn create() -> Result<Self, ScratchError> {
        let admin = admin_url();
        let fail = |source| ScratchError {
            url: super::pg::redact(&admin),
            source,
        };
        let mut client = Client::connect(&admin, NoTls).map_err(fail)?;
        let name = format!(
            "gitplane_t_{}_{:016x}",
            std::process::id(),
            rand::random::<u64>()
        );
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .map_err(fail)?;
        let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
        Ok(Self {
            url: format!("{base}/{name}"),
            name,
        })
    }

    /// The scratch database's URL.
    pub fn url(&self) -> &str {
        &self.url
    }
}

impl Drop for ScratchDb {
    fn drop(&mut self) {
        if let Ok(mut client) = Client::connect(&admin_url(), NoTls) {
            // FORCE: a server a test killed may have left sessions behind.
            let _ = client.batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ));
        }
    }
}
