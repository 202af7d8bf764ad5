//! Node-to-node authentication: every request carries `v1.<seconds>.<HMAC-SHA256>` over its
//! time, operation and repository under the cluster secret (the same file on every node). A
//! token is good for [`SKEW`] either way, so a captured one cannot be replayed later, nor for
//! another repository or operation. A user's credentials never reach this listener.

use std::path::Path;
use std::sync::Arc;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use gitplane_wire::cluster::{Header, Op};

/// How far a token's time may be from the receiver's clock.
const SKEW: u64 = 120;
/// A secret shorter than this is refused: it must not be guessable.
const MIN_SECRET: usize = 16;

#[derive(Clone)]
pub struct Secret(Arc<[u8]>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cluster secret file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cluster secret file {0} holds fewer than {MIN_SECRET} bytes")]
    TooShort(String),
}

impl Secret {
    pub fn load(path: &Path) -> Result<Self, SecretError> {
        let text = std::fs::read(path).map_err(|source| SecretError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let trimmed = text.trim_ascii();
        if trimmed.len() < MIN_SECRET {
            return Err(SecretError::TooShort(path.display().to_string()));
        }
        Ok(Self(Arc::from(trimmed)))
    }

    fn mac(&self, text: &str) -> Hmac<Sha256> {
        // HMAC takes a key of any length.
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC accepts every key length"));
        mac.update(text.as_bytes());
        mac
    }

    /// A token for `op` on `repo`, made now.
    pub fn token(&self, op: Op, repo: &str) -> String {
        let now = crate::clock::unix_now();
        let sig = self
            .mac(&Header::signed_text(op, repo, now))
            .finalize()
            .into_bytes();
        format!("v1.{now}.{}", hex::encode(sig))
    }

    /// Whether `token` signs `op` on `repo` and is fresh.
    pub fn verify(&self, token: &str, op: Op, repo: &str) -> bool {
        let mut parts = token.splitn(3, '.');
        let (Some("v1"), Some(secs), Some(sig)) = (parts.next(), parts.next(), parts.next()) else {
            return false;
        };
        let (Ok(secs), Ok(sig)) = (secs.parse::<u64>(), hex::decode(sig)) else {
            return false;
        };
        if crate::clock::unix_now().abs_diff(secs) > SKEW {
            return false;
        }
        // Constant time.
        self.mac(&Header::signed_text(op, repo, secs))
            .verify_slice(&sig)
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_sign_their_operation_repository_and_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, "0123456789abcdef-cluster\n").unwrap();
        let s = Secret::load(&path).unwrap();
        let t = s.token(Op::Exec, "o/r");
        assert!(s.verify(&t, Op::Exec, "o/r"));
        assert!(!s.verify(&t, Op::Delete, "o/r"));
        assert!(!s.verify(&t, Op::Exec, "o/other"));
        std::fs::write(&path, "another-secret-of-enough-bytes").unwrap();
        assert!(!Secret::load(&path).unwrap().verify(&t, Op::Exec, "o/r"));
        let old = format!("v1.1000.{}", t.rsplit('.').next().unwrap());
        assert!(!s.verify(&old, Op::Exec, "o/r"));
        assert!(!s.verify("v2.x.y", Op::Exec, "o/r"));
        std::fs::write(&path, "short").unwrap();
        assert!(Secret::load(&path).is_err());
    }
}
