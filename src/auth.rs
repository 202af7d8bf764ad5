//! Authentication and authorisation decisions, free of I/O: parsing HTTP Basic credentials, a
//! short-lived cache of verified passwords (argon2 is deliberately slow, and git sends the same
//! credentials on every request of a clone), and the access decision for a repository.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex, MutexGuard};
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
    capacity: usize,
    /// Fingerprint -> (trusted until, the revocation epoch it was verified in).
    entries: HashMap<[u8; 32], (Instant, u64)>,
}

impl CredentialCache {
    pub fn new(capacity: usize) -> Self {
        Self {
            key: rand::random(),
            capacity,
            entries: HashMap::new(),
        }
    }

    fn fingerprint(&self, creds: &BasicCredentials) -> [u8; 32] {
        fingerprint(&self.key, creds)
    }

    /// Whether `creds` were verified in the current revocation `epoch` (None: trust nothing
    /// cached, see [`crate::store::revocation`]) and are still within their lifetime.
    pub fn is_verified(&self, creds: &BasicCredentials, now: Instant, epoch: Option<u64>) -> bool {
        let Some(epoch) = epoch else { return false };
        self.entries
            .get(&self.fingerprint(creds))
            .is_some_and(|&(expires, at)| expires > now && at == epoch)
    }

    /// Trusts `creds` until `expires` (the moment the node-wide [`PasswordGate`] stops trusting
    /// them, so a changed password stops working within one lifetime on every shard).
    pub fn remember(
        &mut self,
        creds: &BasicCredentials,
        now: Instant,
        expires: Instant,
        epoch: Option<u64>,
    ) {
        let Some(epoch) = epoch else { return };
        if self.entries.len() >= self.capacity {
            self.entries.retain(|_, &mut (expires, _)| expires > now);
            if self.entries.len() >= self.capacity {
                self.entries.clear();
            }
        }
        let fp = self.fingerprint(creds);
        self.entries.insert(fp, (expires, epoch));
    }
}

/// The node-wide gate in front of password hashing. One argon2id check holds about 19 MiB and
/// tens of milliseconds of CPU, and the per-shard [`CredentialCache`] misses on every shard at
/// once when a burst of clients arrives with the same credentials (8 LFS clients starting together
/// took the server from 26 to 105 MB). So at most `max_parallel` checks run at once, whatever the
/// burst; a request whose credentials are already being checked waits for that answer instead of
/// hashing them again; and a valid answer is trusted node-wide for `trust_for` (the per-shard
/// cache's lifetime), so a shard that has not seen the credentials yet does not hash them again.
pub struct PasswordGate {
    key: [u8; 32],
    max_parallel: usize,
    trust_for: Duration,
    state: Mutex<GateState>,
    changed: Condvar,
}

/// How long a refusal is handed to requests that waited for it: long enough to collapse a burst,
/// short enough that a password just set is not refused for long.
const SHARE_REFUSAL_FOR: Duration = Duration::from_secs(5);
/// Answers kept at most; past this the finished ones are dropped (they are only a cache).
const MAX_ANSWERS: usize = 10_000;

#[derive(Default)]
struct GateState {
    running: usize,
    checks: HashMap<[u8; 32], Check>,
}

enum Check {
    Running,
    Done {
        valid: bool,
        until: Instant,
        epoch: Option<u64>,
    },
}

impl PasswordGate {
    pub fn new(max_parallel: usize, trust_for: Duration) -> Self {
        Self {
            key: rand::random(),
            max_parallel: max_parallel.max(1),
            trust_for,
            state: Mutex::new(GateState::default()),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Answers whether `creds` are valid: Some(until when they are trusted) or None. Runs
    /// `check` (the hashing) only when no answer for the same credentials is fresh or on its way.
    /// Blocks: call it from a blocking-pool thread.
    pub fn verify<E>(
        &self,
        creds: &BasicCredentials,
        epoch: Option<u64>,
        check: impl FnOnce() -> Result<bool, E>,
    ) -> Result<Option<Instant>, E> {
        let fp = fingerprint(&self.key, creds);
        let mut state = self.lock();
        loop {
            match state.checks.get(&fp) {
                Some(Check::Done {
                    valid,
                    until,
                    epoch: at,
                }) if *until > Instant::now() && epoch.is_some() && *at == epoch => {
                    return Ok(valid.then_some(*until));
                }
                Some(Check::Running) => {}
                _ if state.running < self.max_parallel => break,
                _ => {}
            }
            state = self.changed.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        state.running += 1;
        state.checks.insert(fp, Check::Running);
        drop(state);
        let result = check();
        let mut state = self.lock();
        state.running -= 1;
        let now = Instant::now();
        state
            .checks
            .retain(|_, c| !matches!(c, Check::Done { until, .. } if *until <= now));
        if state.checks.len() >= MAX_ANSWERS {
            state.checks.retain(|_, c| matches!(c, Check::Running));
        }
        match &result {
            Ok(valid) => {
                let lasts = if *valid {
                    self.trust_for
                } else {
                    SHARE_REFUSAL_FOR
                };
                state.checks.insert(
                    fp,
                    Check::Done {
                        valid: *valid,
                        until: now + lasts,
                        epoch,
                    },
                );
            }
            // A failed check (the store, not the password) is not an answer to share.
            Err(_) => {
                state.checks.remove(&fp);
            }
        }
        drop(state);
        self.changed.notify_all();
        result.map(|valid| valid.then_some(now + self.trust_for))
    }
}

fn fingerprint(key: &[u8; 32], creds: &BasicCredentials) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(key);
    h.update(creds.user.as_bytes());
    h.update([0]);
    h.update(creds.password.as_bytes());
    h.finalize().into()
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
            elsewhere: None,
            replicas: Default::default(),
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
        let mut cache = CredentialCache::new(2);
        let now = Instant::now();
        let a = BasicCredentials {
            user: "a".into(),
            password: "1".into(),
        };
        let wrong = BasicCredentials {
            user: "a".into(),
            password: "2".into(),
        };
        cache.remember(&a, now, now + Duration::from_secs(10), Some(1));
        assert!(cache.is_verified(&a, now, Some(1)));
        assert!(!cache.is_verified(&wrong, now, Some(1)));
        assert!(!cache.is_verified(&a, now + Duration::from_secs(11), Some(1)));
        // A revocation notice (new epoch), or a listener that is down (None), ends the trust.
        assert!(!cache.is_verified(&a, now, Some(2)));
        assert!(!cache.is_verified(&a, now, None));
        cache.remember(&a, now, now + Duration::from_secs(10), None);
        assert!(!cache.is_verified(&a, now, None));
    }

    fn creds(user: &str, password: &str) -> BasicCredentials {
        BasicCredentials {
            user: user.into(),
            password: password.into(),
        }
    }

    #[test]
    fn gate_hashes_a_burst_of_the_same_credentials_once() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let gate = PasswordGate::new(2, Duration::from_secs(5));
        let calls = AtomicUsize::new(0);
        let answers: Vec<bool> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    s.spawn(|| {
                        gate.verify(&creds("alice", "pw"), Some(1), || {
                            calls.fetch_add(1, Ordering::SeqCst);
                            std::thread::sleep(Duration::from_millis(100));
                            Ok::<_, ()>(true)
                        })
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap().unwrap().is_some())
                .collect()
        });
        assert_eq!(answers, [true; 8]);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // Trusted afterwards too, from any thread (any shard), without hashing again.
        let trusted = gate.verify(&creds("alice", "pw"), Some(1), || {
            calls.fetch_add(1, Ordering::SeqCst);
            Ok::<_, ()>(true)
        });
        assert!(trusted.unwrap().is_some_and(|until| until > Instant::now()));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // A different password is a different check, and a wrong one is answered as such.
        assert_eq!(
            gate.verify(&creds("alice", "nope"), Some(1), || Ok::<_, ()>(false)),
            Ok(None)
        );
    }

    #[test]
    fn gate_bounds_parallel_checks_and_does_not_share_errors() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let gate = PasswordGate::new(2, Duration::from_secs(5));
        let (now, peak) = (AtomicUsize::new(0), AtomicUsize::new(0));
        std::thread::scope(|s| {
            for i in 0..6 {
                let (gate, now, peak) = (&gate, &now, &peak);
                s.spawn(move || {
                    gate.verify(&creds(&format!("user{i}"), "pw"), Some(1), || {
                        let running = now.fetch_add(1, Ordering::SeqCst) + 1;
                        peak.fetch_max(running, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(50));
                        now.fetch_sub(1, Ordering::SeqCst);
                        Ok::<_, ()>(true)
                    })
                });
            }
        });
        assert_eq!(peak.load(Ordering::SeqCst), 2);
        assert_eq!(
            gate.verify(&creds("bob", "pw"), Some(1), || Err::<bool, _>("db down")),
            Err("db down")
        );
        assert!(gate
            .verify(&creds("bob", "pw"), Some(1), || Ok::<_, &str>(true))
            .is_ok_and(|trusted| trusted.is_some()));
    }

    #[test]
    fn gate_answers_only_within_their_revocation_epoch() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let gate = PasswordGate::new(2, Duration::from_secs(60));
        let calls = AtomicUsize::new(0);
        let check = || {
            calls.fetch_add(1, Ordering::SeqCst);
            Ok::<_, ()>(true)
        };
        gate.verify(&creds("alice", "pw"), Some(1), check).unwrap();
        gate.verify(&creds("alice", "pw"), Some(1), check).unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 1, "shared within the epoch");
        gate.verify(&creds("alice", "pw"), Some(2), check).unwrap();
        assert_eq!(
            calls.load(Ordering::SeqCst),
            2,
            "checked again after a revocation"
        );
        gate.verify(&creds("alice", "pw"), None, check).unwrap();
        gate.verify(&creds("alice", "pw"), None, check).unwrap();
        assert_eq!(
            calls.load(Ordering::SeqCst),
            4,
            "nothing shared while not listening"
        );
    }
}
