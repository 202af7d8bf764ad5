//! The API's bearer token. The API is internal (the hosting web app calls it), so one shared
//! secret from a file guards it: `authorization: Bearer TOKEN` on every call but health checks.
//! On first start the file is created with a random token, mode 0600.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rand::RngCore;

/// Shortest token accepted from a file: anything shorter is guessable.
pub const MIN_TOKEN_LEN: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot read the RPC token file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot create the RPC token file {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the RPC token in {path} is {len} characters; use at least {MIN_TOKEN_LEN} printable ASCII characters without spaces")]
    Weak { path: PathBuf, len: usize },
}

/// The secret callers must present.
pub struct Token(Vec<u8>);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

impl Token {
    /// Reads the token from `path`, creating the file with a fresh random token if absent.
    ///
    /// # Errors
    /// [`TokenError`] when the file cannot be read or created, or holds a weak token.
    pub fn load_or_create(path: &Path) -> Result<(Self, bool), TokenError> {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let t = text.trim();
                let printable = t.bytes().all(|b| b.is_ascii_graphic());
                if t.len() < MIN_TOKEN_LEN || !printable {
                    return Err(TokenError::Weak {
                        path: path.to_owned(),
                        len: t.len(),
                    });
                }
                if let Ok(meta) = std::fs::metadata(path) {
                    if meta.permissions().mode() & 0o077 != 0 {
                        tracing::warn!(path = %path.display(), "the RPC token file is readable by group or others; chmod 600 it");
                    }
                }
                Ok((Self(t.as_bytes().to_vec()), false))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut raw = [0u8; 32];
                rand::rngs::OsRng.fill_bytes(&mut raw);
                let token = hex::encode(raw);
                let create_err = |source| TokenError::Create {
                    path: path.to_owned(),
                    source,
                };
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent).map_err(create_err)?;
                }
                // create_new: if another process won the race, read its token instead.
                match std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                {
                    Ok(mut f) => {
                        f.write_all(format!("{token}\n").as_bytes())
                            .and_then(|()| f.sync_all())
                            .map_err(create_err)?;
                        Ok((Self(token.into_bytes()), true))
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        Self::load_or_create(path)
                    }
                    Err(e) => Err(create_err(e)),
                }
            }
            Err(source) => Err(TokenError::Read {
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// Whether an `authorization` header value carries this token. Constant time in the token's
    /// content, so response timing does not leak how much of a guess was right.
    pub fn matches_header(&self, value: Option<&[u8]>) -> bool {
        let Some(v) = value else { return false };
        let Some(given) = strip_bearer(v) else {
            return false;
        };
        if given.len() != self.0.len() {
            return false;
        }
        given
            .iter()
            .zip(&self.0)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

fn strip_bearer(v: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = v.split_at(v.iter().position(|&b| b == b' ')?);
    scheme
        .eq_ignore_ascii_case(b"bearer")
        .then(|| rest.trim_ascii())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_a_private_random_token_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/rpc-token");
        let (a, created) = Token::load_or_create(&path).unwrap();
        assert!(created);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (b, created) = Token::load_or_create(&path).unwrap();
        assert!(!created);
        assert_eq!(a.0, b.0);
        assert_eq!(a.0.len(), 64);
    }

    #[test]
    fn checks_the_bearer_header() {
        let t = Token(b"0123456789abcdef".to_vec());
        assert!(t.matches_header(Some(b"Bearer 0123456789abcdef")));
        assert!(t.matches_header(Some(b"bearer  0123456789abcdef ")));
        assert!(!t.matches_header(Some(b"Bearer 0123456789abcdeX")));
        assert!(!t.matches_header(Some(b"Bearer 0123456789abcde")));
        assert!(!t.matches_header(Some(b"Basic 0123456789abcdef")));
        assert!(!t.matches_header(Some(b"0123456789abcdef")));
        assert!(!t.matches_header(None));
    }

    #[test]
    fn refuses_weak_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t");
        std::fs::write(&path, "short\n").unwrap();
        assert!(matches!(
            Token::load_or_create(&path),
            Err(TokenError::Weak { len: 5, .. })
        ));
    }
}
