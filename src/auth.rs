//! Authentication and authorisation decisions, free of I/O: parsing HTTP Basic credentials, a
//! short-lived cache of verified passwords (argon2 is deliberately slow, and git sends the same
//! credentials on every request of a clone), and the access decision for a repository.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use base64::Engine;
use sha2::{Digest, Sha256};

use crate::store::{Access, RepoAccess};

/// Credentials from an `Authorization: Basic` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BasicCredentials {
    pub user: String,
    pub password: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CredentialsError {
    #[error("only the Basic authorization scheme is accepted")]
    UnsupportedScheme,
    #[error("malformed Basic credentials")]
    Malformed,
}

/// Parses `Basic base64(user:password)`.
pub fn parse_basic(header: &str) -> Result<BasicCredentials, CredentialsError> {
    let header = header.trim();
    let (scheme, rest) = header
        .split_once(' ')
        .ok_or(CredentialsError::UnsupportedScheme)?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(CredentialsError::UnsupportedScheme);
    }
    let rest = rest.trim();
    if rest.len() > 4096 {
        return Err(CredentialsError::Malformed);
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(rest)
        .map_err(|_| CredentialsError::Malformed)?;
    let text = String::from_utf8(raw).map_err(|_| CredentialsError::Malformed)?;
    let (user, password) = text.split_once(':').ok_or(CredentialsError::Malformed)?;
    if user.is_empty() {
        return Err(CredentialsError::Malformed);
    }
    Ok(BasicCredentials {
        user: user.to_owned(),
        password: password.to_owned(),
    })
}

/// The outcome of an access check, in HTTP terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// 401: ask for credentials. Also the answer for a missing or hidden repository when the
    /// client is anonymous, so that existence is not revealed.
    Unauthorized,
    /// 403: authenticated and may see the repository, but lacks the needed access.
    Forbidden,
    /// 404: no such repository, or the authenticated user may not see it.
    NotFound,
}

/// Decides access. `authenticated` is whether the client proved an identity.
pub fn decide(repo: Option<RepoAccess>, authenticated: bool, need: Access) -> Decision {
    let Some(repo) = repo else {
        return if authenticated {
            Decision::NotFound
        } else {
            Decision::Unauthorized
        };
    };
    let readable = repo.public || repo.user_access.is_some();
    if repo.user_access.is_some_and(|a| a >= need) || (need == Access::Read && repo.public) {
        return Decision::Allow;
    }
    match (authenticated, readable) {
        (false, _) => Decision::Unauthorized,
        (true, true) => Decision::Forbidden,
        (true, false) => Decision::NotFound,
    }
}

/// Remembers recently verified passwords by a keyed hash, never the password itself.
pub struct CredentialCache {
    key: [u8; 32],
    ttl: Duration,
    capacity: usize,
    entries: HashMap<[u8; 32], Instant>,
}

impl CredentialCache {
    pub fn new(ttl: Duration, capacity: usize) -> Self {
        Self {
            key: rand::random(),
            ttl,
            capacity,
            entries: HashMap::new(),
        }
    }

    fn fingerprint(&self, creds: &BasicCredentials) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.key);
        h.update(creds.user.as_bytes());
        h.update([0]);
        h.update(creds.password.as_bytes());
        h.finalize().into()
    }

    pub fn is_verified(&self, creds: &BasicCredentials, now: Instant) -> bool {
        self.entries
            .get(&self.fingerprint(creds))
            .is_some_and(|&expires| expires > now)
    }

    pub fn remember(&mut self, creds: &BasicCredentials, now: Instant) {
        if self.entries.len() >= self.capacity {
            self.entries.retain(|_, &mut expires| expires > now);
            if self.entries.len() >= self.capacity {
                self.entries.clear();
            }
        }
        let fp = self.fingerprint(creds);
        self.entries.insert(fp, now + self.ttl);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_parsing() {
        let ok = parse_basic("Basic YWxpY2U6cHc6eA==").unwrap();
        assert_eq!(ok.user, "alice");
        assert_eq!(ok.password, "pw:x");
        assert_eq!(
            parse_basic("Bearer abc"),
            Err(CredentialsError::UnsupportedScheme)
        );
        assert_eq!(parse_basic("Basic !!!"), Err(CredentialsError::Malformed));
        assert_eq!(
            parse_basic("Basic OnB3"), // ":pw", empty user
            Err(CredentialsError::Malformed)
        );
        assert_eq!(
            parse_basic("Basic"),
            Err(CredentialsError::UnsupportedScheme)
        );
    }

    fn access(public: bool, user_access: Option<Access>) -> Option<RepoAccess> {
        Some(RepoAccess {
            public,
            user_access,
        })
    }

    #[test]
    fn decisions() {
        use Decision::*;
        // Missing repo: anonymous clients cannot tell it from a private one.
        assert_eq!(decide(None, false, Access::Read), Unauthorized);
        assert_eq!(decide(None, true, Access::Read), NotFound);
        assert_eq!(
            decide(access(false, None), false, Access::Read),
            Unauthorized
        );
        assert_eq!(decide(access(false, None), true, Access::Read), NotFound);
        assert_eq!(decide(access(true, None), false, Access::Read), Allow);
        assert_eq!(
            decide(access(true, None), false, Access::Write),
            Unauthorized
        );
        assert_eq!(decide(access(true, None), true, Access::Write), Forbidden);
        assert_eq!(
            decide(access(false, Some(Access::Read)), true, Access::Write),
            Forbidden
        );
        assert_eq!(
            decide(access(false, Some(Access::Write)), true, Access::Write),
            Allow
        );
        assert_eq!(
            decide(access(false, Some(Access::Admin)), true, Access::Write),
            Allow
        );
    }

    #[test]
    fn cache_expires_and_distinguishes_passwords() {
        let mut cache = CredentialCache::new(Duration::from_secs(10), 2);
        let now = Instant::now();
        let a = BasicCredentials {
            user: "a".into(),
            password: "1".into(),
        };
        let wrong = BasicCredentials {
            user: "a".into(),
            password: "2".into(),
        };
        cache.remember(&a, now);
        assert!(cache.is_verified(&a, now));
        assert!(!cache.is_verified(&wrong, now));
        assert!(!cache.is_verified(&a, now + Duration::from_secs(11)));
    }
}
