//! Request authorisation for the HTTP front ends (Git smart HTTP and LFS): who the client is
//! (HTTP Basic against the store, or an LFS token minted by `git-lfs-authenticate` over SSH)
//! and whether it may read or write the repository. Store calls run on the blocking pool.
//!
//! The decisions themselves are pure and live in [`crate::auth`]; this module adds the I/O and
//! the per-shard cache of verified passwords.

use std::cell::RefCell;
use std::time::{Duration, Instant};

use crate::auth::{decide, parse_basic, BasicCredentials, CredentialCache, Decision, PasswordGate};
use crate::cluster::membership::{Route, Routing};
use crate::git::process::RemoteExec;
use crate::git::repo_name::RepoName;
use crate::store::{revocation, Access, Location, RepoAccess, Store, StoreError};
use crate::token::{self, TokenSecret};

/// How long a verified password is trusted without re-hashing it.
const CREDENTIAL_TTL: Duration = Duration::from_secs(60);
const CREDENTIAL_CACHE_ENTRIES: usize = 10_000;

/// Password checks at once on the node: bounds their memory (about 19 MiB each) during a burst.
const PARALLEL_PASSWORD_CHECKS: usize = 2;
static PASSWORD_GATE: std::sync::LazyLock<PasswordGate> =
    std::sync::LazyLock::new(|| PasswordGate::new(PARALLEL_PASSWORD_CHECKS, CREDENTIAL_TTL));

/// Runs a store call on the blocking pool, with one database connection per pool thread.
pub async fn with_store<R: Send + 'static>(
    store: Location,
    f: impl FnOnce(&Store) -> Result<R, StoreError> + Send + 'static,
) -> Result<R, StoreError> {
    monoio::spawn_blocking(move || crate::store::with_thread_store(&store, f))
        .await
        .unwrap_or_else(|_| Err(StoreError::Internal("blocking pool task panicked".into())))
}

/// An authorised client.
#[derive(Debug, Clone)]
pub struct Principal {
    /// None for anonymous access to a public repository.
    pub user: Option<String>,
    /// The node whose copy git runs on when this node's is not current (a cluster).
    pub remote: Option<RemoteExec>,
}

/// Why a request was refused, in HTTP terms.
#[derive(Debug)]
pub enum Refusal {
    /// 401 with a challenge.
    Unauthorized(String),
    /// 403.
    Forbidden(String),
    /// 404.
    NotFound(String),
    /// 503 with Retry-After: the store cannot be reached now.
    Unavailable(String),
    /// 500: the store failed.
    Internal(String),
}

impl Refusal {
    pub fn status(&self) -> u16 {
        match self {
            Self::Unauthorized(_) => 401,
            Self::Forbidden(_) => 403,
            Self::NotFound(_) => 404,
            Self::Unavailable(_) => 503,
            Self::Internal(_) => 500,
        }
    }

    pub fn message(&self) -> &str {
        match self {
            Self::Unauthorized(m)
            | Self::Forbidden(m)
            | Self::NotFound(m)
            | Self::Unavailable(m)
            | Self::Internal(m) => m,
        }
    }
}

enum Presented {
    Anonymous,
    Basic(BasicCredentials),
    Token(String),
}

/// One shard's authoriser.
pub struct HttpAuth {
    store: Location,
    routing: Option<Routing>,
    secret: TokenSecret,
    credentials: RefCell<CredentialCache>,
}

impl HttpAuth {
    pub fn new(store: Location, routing: Option<Routing>, secret: TokenSecret) -> Self {
        Self {
            store,
            routing,
            secret,
            credentials: RefCell::new(CredentialCache::new(CREDENTIAL_CACHE_ENTRIES)),
        }
    }

    /// Authenticates the `Authorization` header and decides `need` on `repo`. LFS tokens are
    /// only honoured where `accept_token` is set (the LFS endpoints they are minted for).
    pub async fn authorize(
        &self,
        authorization: Option<&str>,
        repo: &RepoName,
        need: Access,
        accept_token: bool,
    ) -> Result<Principal, Refusal> {
        let presented = match authorization {
            None => Presented::Anonymous,
            Some(h) if accept_token && h.trim_start().starts_with("Bearer ") => {
                Presented::Token(h.trim_start()["Bearer ".len()..].trim().to_owned())
            }
            Some(h) => match parse_basic(h) {
                Ok(c) => Presented::Basic(c),
                Err(e) => return Err(Refusal::Unauthorized(e.to_string())),
            },
        };
        let (user, verified_here) = match &presented {
            Presented::Anonymous => (None, false),
            Presented::Basic(c) => {
                let cached =
                    self.credentials
                        .borrow()
                        .is_verified(c, Instant::now(), revocation::epoch());
                (Some(c.user.clone()), !cached)
            }
            Presented::Token(t) => {
                let op = if need >= Access::Write {
                    token::Operation::Upload
                } else {
                    token::Operation::Download
                };
                match token::verify(&self.secret, t, repo, op, crate::clock::unix_now()) {
                    Ok(claims) => (Some(claims.user), false),
                    Err(e) => return Err(Refusal::Unauthorized(format!("LFS token refused: {e}"))),
                }
            }
        };
        let to_verify = match &presented {
            Presented::Basic(c) if verified_here => Some(c.clone()),
            _ => None,
        };
        let lookup_repo = repo.clone();
        let lookup_user = user.clone();
        // None: the password was wrong. Otherwise until when a password checked here is trusted.
        // The epoch before the check: a revocation that lands during it makes the answer stale.
        let epoch = revocation::epoch();
        let routing = self.routing.clone();
        let result = with_store(self.store.clone(), move |store| {
            let trusted_until = match &to_verify {
                Some(c) => {
                    match PASSWORD_GATE
                        .verify(c, epoch, || store.verify_password(&c.user, &c.password))?
                    {
                        Some(until) => Some(until),
                        None => return Ok(None),
                    }
                }
                None => None,
            };
            let access: Option<RepoAccess> =
                store.repo_access(&lookup_repo, lookup_user.as_deref())?;
            let route = match (&routing, &access) {
                (Some(routing), Some(a)) => {
                    routing.route_among(store, &lookup_repo.to_string(), &a.replicas)?
                }
                _ => Route::Local,
            };
            Ok(Some((trusted_until, access, route)))
        })
        .await;
        let (trusted_until, access, route) = match result {
            Ok(Some(r)) => r,
            Ok(None) => return Err(Refusal::Unauthorized("invalid credentials".into())),
            Err(e) if e.is_unavailable() => {
                tracing::warn!(error = %e, "store unavailable");
                return Err(Refusal::Unavailable(
                    "the user database is unavailable; try again shortly".into(),
                ));
            }
            Err(e) => {
                tracing::error!(error = %e, "store lookup failed");
                return Err(Refusal::Internal("internal error".into()));
            }
        };
        if let (Presented::Basic(c), Some(until)) = (&presented, trusted_until) {
            self.credentials
                .borrow_mut()
                .remember(c, Instant::now(), until, epoch);
        }
        if let Some(node) = access.as_ref().and_then(|a| a.elsewhere.as_deref()) {
            tracing::info!(repo = %repo, node, "repository lives on another node");
            return Err(Refusal::NotFound(format!("repository {repo} not found")));
        }
        match decide(access, user.is_some(), need) {
            Decision::Allow => match route {
                Route::Local => Ok(Principal { user, remote: None }),
                Route::Remote(remote) => Ok(Principal {
                    user,
                    remote: Some(remote),
                }),
                Route::NoCurrentReplica => Err(Refusal::Unavailable(format!(
                    "no up-to-date copy of {repo} is reachable now; try again shortly"
                ))),
            },
            Decision::Unauthorized => Err(Refusal::Unauthorized("authentication required".into())),
            Decision::Forbidden => Err(Refusal::Forbidden(format!(
                "you may not {} {repo}",
                if need >= Access::Write {
                    "write to"
                } else {
                    "read"
                }
            ))),
            Decision::NotFound => Err(Refusal::NotFound(format!("repository {repo} not found"))),
        }
    }
}
