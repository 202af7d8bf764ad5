//! The PostgreSQL backend's connections: a bounded r2d2 pool of synchronous `postgres` clients,
//! each with its prepared statements, TLS (rustls) when the URL asks for it, and error mapping
//! that tells "the database is unreachable" (503, retry) from everything else.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use postgres::error::SqlState;
use postgres::{Client, Statement};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::tls_client::TlsConfigError;

use super::{DbErrorKind, StoreError};

/// How long one connection attempt may take (a host that does not answer).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a caller waits for a pooled connection (r2d2 retries connecting meanwhile) before
/// it gets "unavailable": a request that needs a stopped database answers 503 within this.
const CHECKOUT_TIMEOUT: Duration = Duration::from_secs(1);
/// A dead peer (host gone, cable pulled) is noticed within this on a busy connection.
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(5);
/// A query running longer than this is cancelled by the server: nothing of ours should.
const STATEMENT_TIMEOUT_MS: u32 = 10_000;

/// One pooled connection and its prepared statements (SQL text -> statement).
/// A checked-out connection.
pub type Pooled = r2d2::PooledConnection<Manager>;

pub struct PgConn {
    pub client: Client,
    statements: HashMap<String, Statement>,
}

impl PgConn {
    /// The prepared statement for `sql`, prepared on first use on this connection.
    pub fn statement(&mut self, sql: &str) -> Result<Statement, postgres::Error> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let s = self.client.prepare(sql)?;
        self.statements.insert(sql.to_owned(), s.clone());
        Ok(s)
    }
}

pub struct Manager {
    config: postgres::Config,
    tls: MakeRustlsConnect,
}

impl r2d2::ManageConnection for Manager {
    type Connection = PgConn;
    type Error = postgres::Error;

    fn connect(&self) -> Result<PgConn, postgres::Error> {
        Ok(PgConn {
            client: self.config.connect(self.tls.clone())?,
            statements: HashMap::new(),
        })
    }

    fn is_valid(&self, conn: &mut PgConn) -> Result<(), postgres::Error> {
        conn.client.simple_query("").map(drop)
    }

    fn has_broken(&self, conn: &mut PgConn) -> bool {
        conn.client.is_closed()
    }
}

/// Logs connection failures the pool sees in the background.
#[derive(Debug)]
struct LogErrors;

impl r2d2::HandleError<postgres::Error> for LogErrors {
    fn handle_error(&self, error: postgres::Error) {
        tracing::warn!(error = %with_causes(&error), "PostgreSQL connection failed");
    }
}

/// A cheap handle to the node's pool. The pool (and its maintenance threads) is made on first
/// use, so that a server has blocked its signals before any such thread exists.
#[derive(Clone)]
pub struct PgPool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    config: postgres::Config,
    tls: MakeRustlsConnect,
    max_connections: u32,
    pool: OnceLock<r2d2::Pool<Manager>>,
}

impl PgPool {
    /// Checks the settings (TLS roots are read now); connects nothing.
    pub fn new(url: &PgUrl, max_connections: u32) -> Result<Self, StoreError> {
        Ok(Self {
            inner: Arc::new(PoolInner {
                config: url.config.clone(),
                tls: MakeRustlsConnect::new(tls_config(url)?),
                max_connections: max_connections.max(1),
                pool: OnceLock::new(),
            }),
        })
    }

    fn pool(&self) -> &r2d2::Pool<Manager> {
        let i = &self.inner;
        i.pool.get_or_init(|| {
            r2d2::Pool::builder()
                .max_size(i.max_connections)
                .min_idle(Some(0))
                .connection_timeout(CHECKOUT_TIMEOUT)
                // A broken connection is dropped on return (`has_broken`) and its query failed
                // already; testing each checkout would add a round trip to every request.
                .test_on_check_out(false)
                .error_handler(Box::new(LogErrors))
                .build_unchecked(Manager {
                    config: i.config.clone(),
                    tls: i.tls.clone(),
                })
        })
    }

    pub fn checkout(&self, place: &str) -> Result<Pooled, StoreError> {
        self.pool().get().map_err(|e| StoreError::Db {
            place: place.to_owned(),
            message: format!("no connection: {e}"),
            kind: DbErrorKind::Unavailable,
        })
    }

    /// A connection of its own, outside the pool (for LISTEN, which holds it for good).
    pub fn dedicated(&self) -> Result<Client, postgres::Error> {
        self.inner.config.connect(self.inner.tls.clone())
    }
}

/// Classifies a driver error: unreachable database, conflict (unique key), or other.
pub fn error(place: &str, e: &postgres::Error) -> StoreError {
    let kind = match e.code() {
        Some(c) if *c == SqlState::UNIQUE_VIOLATION => DbErrorKind::Conflict,
        Some(c)
            if c.code().starts_with("08")
                || *c == SqlState::ADMIN_SHUTDOWN
                || *c == SqlState::CRASH_SHUTDOWN
                || *c == SqlState::CANNOT_CONNECT_NOW
                || *c == SqlState::TOO_MANY_CONNECTIONS
                || *c == SqlState::QUERY_CANCELED =>
        {
            DbErrorKind::Unavailable
        }
        Some(_) => DbErrorKind::Other,
        None if e.is_closed() || io_source(e) => DbErrorKind::Unavailable,
        None => DbErrorKind::Other,
    };
    StoreError::Db {
        place: place.to_owned(),
        message: with_causes(e),
        kind,
    }
}

/// "error performing TLS handshake: invalid peer certificate: UnknownIssuer": the driver's
/// message says little without its causes.
fn with_causes(e: &postgres::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}

fn io_source(e: &postgres::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if s.is::<std::io::Error>() {
            return true;
        }
        source = s.source();
    }
    false
}

/// A parsed `postgres://` URL: the driver's config, our own `sslrootcert`, and the URL with its
/// password removed (for every log line and error message).
#[derive(Clone)]
pub struct PgUrl {
    pub config: postgres::Config,
    pub redacted: String,
    original: String,
    root_cert: Option<std::path::PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum UrlError {
    #[error("database URL {0}: {1}")]
    Invalid(String, String),
}

impl PgUrl {
    pub fn parse(url: &str) -> Result<Self, UrlError> {
        let redacted = redact(url);
        let invalid = |why: String| UrlError::Invalid(redacted.clone(), why);
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(invalid(
                "expected postgres://USER@HOST[:PORT]/DATABASE".into(),
            ));
        }
        // `sslrootcert` is ours (the driver has no such option): take it out of the query.
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let mut root_cert = None;
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("sslrootcert", v)) => root_cert = Some(std::path::PathBuf::from(v)),
                _ => kept.push(pair),
            }
        }
        let driver_url = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        let mut config: postgres::Config =
            driver_url.parse().map_err(|e| invalid(format!("{e}")))?;
        // TLS only when asked for (`sslmode=require`), then always verified; `prefer` (the
        // driver's default) would try TLS against a self-signed server and fail.
        if config.get_ssl_mode() != postgres::config::SslMode::Require {
            config.ssl_mode(postgres::config::SslMode::Disable);
        }
        config
            .connect_timeout(CONNECT_TIMEOUT)
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(30))
            .tcp_user_timeout(TCP_USER_TIMEOUT)
            .options(&format!("-c statement_timeout={STATEMENT_TIMEOUT_MS}"));
        if config.get_application_name().is_none() {
            config.application_name("gitplane");
        }
        Ok(Self {
            config,
            redacted,
            original: url.to_owned(),
            root_cert,
        })
    }

    /// The URL as given, password included (only for the processes gitplane starts itself).
    pub fn original(&self) -> &str {
        &self.original
    }

    pub fn wants_tls(&self) -> bool {
        self.config.get_ssl_mode() == postgres::config::SslMode::Require
    }
}

/// `postgres://user:secret@host/db` -> `postgres://user@host/db`.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{scheme}://{user}@{host}{tail}")
        }
        None => url.to_owned(),
    }
}

fn tls_config(url: &PgUrl) -> Result<rustls::ClientConfig, StoreError> {
    let bad = |why: String| StoreError::Internal(format!("TLS for {}: {why}", url.redacted));
    let config = if url.wants_tls() {
        crate::tls_client::trusting(url.root_cert.as_deref()).map_err(|e| match e {
            TlsConfigError::NoRoots => {
                bad("no trusted root certificates (set sslrootcert=PATH in the URL)".into())
            }
            TlsConfigError::Read { path, source } => {
                bad(format!("reading sslrootcert {path}: {source}"))
            }
            other => bad(other.to_string()),
        })?
    } else {
        crate::tls_client::with_roots(rustls::RootCertStore::empty())
            .map_err(|e| bad(e.to_string()))?
    };
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(
            redact("postgres://gp:s3cret@db.example:5432/gitplane?sslmode=require"),
            "postgres://gp@db.example:5432/gitplane?sslmode=require"
        );
        assert_eq!(redact("postgres://gp@h/db"), "postgres://gp@h/db");
        let e = PgUrl::parse("mysql://gp:s3cret@h/db")
            .err()
            .unwrap()
            .to_string();
        assert!(!e.contains("s3cret"), "{e}");
    }

    #[test]
    fn tls_only_when_required_and_root_cert_is_ours() {
        let u = PgUrl::parse("postgres://gp@h/db").unwrap();
        assert!(!u.wants_tls());
        let u = PgUrl::parse("postgres://gp@h/db?sslmode=require&sslrootcert=/x.pem").unwrap();
        assert!(u.wants_tls());
        assert_eq!(u.root_cert.as_deref(), Some(std::path::Path::new("/x.pem")));
        assert!(PgUrl::parse("postgres://gp@h/db?bogus=1").is_err());
    }
}
