//! Short-lived signed tokens for Git LFS: `git-lfs-authenticate` over SSH mints one, the HTTP LFS
//! endpoint (issue #4) verifies it. Pure functions over a server secret; no I/O except loading
//! or creating that secret (`DATA/token-secret`, 32 random bytes, mode 0600).
//!
//! Wire form (what goes after `Bearer ` in `Authorization`):
//!
//! ```text
//! gpl1.<base64url(user)>.<base64url(owner/name)>.<operation>.<expires unix secs>.<base64url(mac)>
//! ```
//!
//! `mac` is HMAC-SHA256 under the secret over every field before it, joined by `.` (so a field
//! cannot be moved into another: base64url has no `.`). Verification recomputes the MAC in
//! constant time, then checks expiry, repository and operation.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::git::repo_name::RepoName;

/// File under the data dir holding the secret.
pub const SECRET_FILE: &str = "token-secret";
const VERSION: &str = "gpl1";
const SECRET_LEN: usize = 32;
/// Longest token accepted by [`verify`] (user and repository names are short).
const MAX_TOKEN_LEN: usize = 1024;

type HmacSha256 = Hmac<Sha256>;

/// What a token allows: the LFS batch API operations.
pub use gitplane_wire::lfs::api::Operation;

/// The server secret. Debug never prints it.
#[derive(Clone)]
pub struct TokenSecret([u8; SECRET_LEN]);

impl std::fmt::Debug for TokenSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenSecret(***)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot create {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds {len} bytes, expected {SECRET_LEN}; delete it to make a new one (this invalidates issued tokens)")]
    BadLength { path: PathBuf, len: usize },
}

impl TokenSecret {
    pub fn from_bytes(bytes: [u8; SECRET_LEN]) -> Self {
        Self(bytes)
    }

    /// Reads `DATA/token-secret`, creating it (mode 0600) on first use. Creation uses
    /// `create_new`, so two processes starting at once agree on one secret.
    pub fn load_or_create(data_dir: &Path) -> Result<Self, SecretError> {
        let path = data_dir.join(SECRET_FILE);
        for _ in 0..2 {
            match std::fs::read(&path) {
                Ok(bytes) => {
                    let len = bytes.len();
                    let arr: [u8; SECRET_LEN] =
                        bytes.try_into().map_err(|_| SecretError::BadLength {
                            path: path.clone(),
                            len,
                        })?;
                    return Ok(Self(arr));
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(SecretError::Read { path, source }),
            }
            let secret: [u8; SECRET_LEN] = rand::random();
            let created = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path);
            match created {
                Ok(mut file) => {
                    file.write_all(&secret)
                        .and_then(|_| file.sync_all())
                        .map_err(|source| SecretError::Create {
                            path: path.clone(),
                            source,
                        })?;
                    return Ok(Self(secret));
                }
                // Someone else created it between our read and create: read theirs.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(source) => return Err(SecretError::Create { path, source }),
            }
        }
        Err(SecretError::Read {
            path,
            source: std::io::ErrorKind::NotFound.into(),
        })
    }

    fn mac(&self, signed: &str) -> HmacSha256 {
        // HMAC zero-pads keys shorter than the hash's block size, so a 64-byte block holding the
        // 32-byte secret gives the same MAC as keying with the secret itself, without the
        // fallible `new_from_slice`.
        let mut key = hmac::digest::Key::<HmacSha256>::default();
        for (k, s) in key.iter_mut().zip(self.0) {
            *k = s;
        }
        let mut mac = <HmacSha256 as hmac::digest::KeyInit>::new(&key);
        mac.update(signed.as_bytes());
        mac
    }
}

/// What a valid token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub user: String,
    pub repo: RepoName,
    pub operation: Operation,
    /// Unix seconds.
    pub expires_at: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("malformed token")]
    Malformed,
    #[error("bad token signature")]
    BadSignature,
    #[error("token expired")]
    Expired,
    #[error("token is for another repository")]
    WrongRepo,
    /// A download token cannot upload; an upload token may download (LFS uploads verify).
    #[error("token does not allow {0}")]
    WrongOperation(&'static str),
}

/// Mints a token for `user` to do `operation` on `repo` until `expires_at` (unix seconds).
pub fn mint(
    secret: &TokenSecret,
    user: &str,
    repo: &RepoName,
    operation: Operation,
    expires_at: u64,
) -> String {
    let signed = format!(
        "{VERSION}.{}.{}.{}.{expires_at}",
        B64.encode(user),
        B64.encode(repo.to_string()),
        operation.as_str()
    );
    let tag = secret.mac(&signed).finalize().into_bytes();
    format!("{signed}.{}", B64.encode(tag))
}

/// Verifies a token for `operation` on `repo` at time `now` (unix seconds).
pub fn verify(
    secret: &TokenSecret,
    token: &str,
    repo: &RepoName,
    operation: Operation,
    now: u64,
) -> Result<Claims, TokenError> {
    let claims = decode(secret, token)?;
    if now >= claims.expires_at {
        return Err(TokenError::Expired);
    }
    if &claims.repo != repo {
        return Err(TokenError::WrongRepo);
    }
    if operation == Operation::Upload && claims.operation != Operation::Upload {
        return Err(TokenError::WrongOperation(operation.as_str()));
    }
    Ok(claims)
}

/// Checks the signature and parses the fields, without judging expiry or scope.
pub fn decode(secret: &TokenSecret, token: &str) -> Result<Claims, TokenError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(TokenError::Malformed);
    }
    let (signed, tag) = token.rsplit_once('.').ok_or(TokenError::Malformed)?;
    let tag = B64.decode(tag).map_err(|_| TokenError::Malformed)?;
    secret
        .mac(signed)
        .verify_slice(&tag)
        .map_err(|_| TokenError::BadSignature)?;
    let mut fields = signed.split('.');
    let (Some(VERSION), Some(user), Some(repo), Some(op), Some(exp), None) = (
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
    ) else {
        return Err(TokenError::Malformed);
    };
    let text = |s: &str| {
        B64.decode(s)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or(TokenError::Malformed)
    };
    Ok(Claims {
        user: text(user)?,
        repo: RepoName::parse(&text(repo)?).map_err(|_| TokenError::Malformed)?,
        operation: Operation::parse(op).ok_or(TokenError::Malformed)?,
        expires_at: exp.parse().map_err(|_| TokenError::Malformed)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(b: u8) -> TokenSecret {
        TokenSecret::from_bytes([b; SECRET_LEN])
    }

    fn repo(s: &str) -> RepoName {
        RepoName::parse(s).unwrap()
    }

    #[test]
    fn round_trip() {
        let s = secret(7);
        let t = mint(&s, "alice", &repo("alice/proj"), Operation::Upload, 1000);
        assert!(t.starts_with("gpl1."));
        let c = verify(&s, &t, &repo("alice/proj.git"), Operation::Upload, 999).unwrap();
        assert_eq!(c.user, "alice");
        assert_eq!(c.repo, repo("alice/proj"));
        assert_eq!(c.operation, Operation::Upload);
        assert_eq!(c.expires_at, 1000);
        // An upload token may also download.
        verify(&s, &t, &repo("alice/proj"), Operation::Download, 0).unwrap();
    }

    #[test]
    fn rejects_expired_wrong_scope_and_other_secrets() {
        let s = secret(7);
        let r = repo("alice/proj");
        let t = mint(&s, "alice", &r, Operation::Download, 1000);
        assert_eq!(
            verify(&s, &t, &r, Operation::Download, 1000),
            Err(TokenError::Expired)
        );
        assert_eq!(
            verify(&s, &t, &repo("alice/other"), Operation::Download, 1),
            Err(TokenError::WrongRepo)
        );
        assert_eq!(
            verify(&s, &t, &r, Operation::Upload, 1),
            Err(TokenError::WrongOperation("upload"))
        );
        assert_eq!(
            verify(&secret(8), &t, &r, Operation::Download, 1),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn tampering_is_detected() {
        let s = secret(1);
        let r = repo("alice/proj");
        let t = mint(&s, "bob", &r, Operation::Download, 5000);
        // Change the operation, the expiry, the user: each breaks the signature.
        for forged in [
            t.replace(".download.", ".upload."),
            t.replace(".5000.", ".9999."),
            t.replacen(&B64.encode("bob"), &B64.encode("admin"), 1),
        ] {
            assert_ne!(forged, t);
            assert_eq!(
                verify(&s, &forged, &r, Operation::Download, 1),
                Err(TokenError::BadSignature),
                "{forged}"
            );
        }
        for bad in ["", "gpl1", "a.b", &"x".repeat(2000), &format!("{t}.x")] {
            assert!(
                verify(&s, bad, &r, Operation::Download, 1).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn padded_key_equals_plain_hmac() {
        let s = secret(3);
        let mut plain = HmacSha256::new_from_slice(&s.0).unwrap();
        plain.update(b"abc");
        assert_eq!(
            plain.finalize().into_bytes(),
            s.mac("abc").finalize().into_bytes()
        );
    }

    #[test]
    fn secret_is_created_once_with_mode_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let a = TokenSecret::load_or_create(dir.path()).unwrap();
        let b = TokenSecret::load_or_create(dir.path()).unwrap();
        assert_eq!(a.0, b.0);
        let meta = std::fs::metadata(dir.path().join(SECRET_FILE)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(format!("{a:?}"), "TokenSecret(***)");
        std::fs::write(dir.path().join(SECRET_FILE), b"short").unwrap();
        assert!(matches!(
            TokenSecret::load_or_create(dir.path()),
            Err(SecretError::BadLength { len: 5, .. })
        ));
    }
}
