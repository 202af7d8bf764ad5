//! Users' SSH public keys: parsing and vetting an OpenSSH `.pub` line, the algorithm policy that
//! authentication applies, and the admin commands `gitplane key add USER FILE.pub` and
//! `gitplane key list USER` (which work whether or not a server runs: they only touch the store).
//!
//! Policy: Ed25519, ECDSA (NIST P-256/384/521) and RSA of at least 2048 bits; RSA only with
//! SHA-2 signatures (`rsa-sha2-256`/`-512`, never `ssh-rsa`/SHA-1). DSA, security-key (`sk-`)
//! keys and certificates are refused.

use std::path::{Path, PathBuf};

use russh::keys::ssh_key::public::KeyData;
use russh::keys::{Algorithm, HashAlg, PublicKey};

use crate::store::{Location, SshKeyRecord, Store, StoreError};

/// Smallest RSA modulus accepted, in bits.
pub const MIN_RSA_BITS: u32 = 2048;
/// Largest `.pub` file read.
const MAX_KEY_FILE: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no public key")]
    Empty { path: PathBuf },
    #[error("{path} holds more than one key; add them one at a time")]
    Several { path: PathBuf },
    #[error("not an OpenSSH public key: {0}")]
    Malformed(String),
    #[error("{0} keys are not accepted; use Ed25519, ECDSA or RSA (at least {MIN_RSA_BITS} bits)")]
    Algorithm(String),
    #[error("RSA key of {0} bits is too short; at least {MIN_RSA_BITS} bits are required")]
    RsaTooShort(u32),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A vetted public key, ready to be stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedKey {
    pub fingerprint: String,
    pub algorithm: String,
    /// `TYPE BASE64` without the comment.
    pub openssh: String,
    pub comment: String,
}

/// The SHA-256 fingerprint as OpenSSH prints it (`SHA256:...`).
pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

/// Whether a key type may be registered at all.
fn key_type_allowed(key: &KeyData) -> Result<(), KeyError> {
    match key {
        KeyData::Ed25519(_) | KeyData::Ecdsa(_) => Ok(()),
        KeyData::Rsa(rsa) => {
            let bits = rsa.key_size();
            if bits < MIN_RSA_BITS {
                Err(KeyError::RsaTooShort(bits))
            } else {
                Ok(())
            }
        }
        other => Err(KeyError::Algorithm(other.algorithm().as_str().to_owned())),
    }
}

/// Whether a signature algorithm offered during authentication is acceptable: the key types
/// above, RSA only with SHA-2.
pub fn signature_algorithm_allowed(algorithm: &Algorithm) -> bool {
    match algorithm {
        Algorithm::Ed25519 | Algorithm::Ecdsa { .. } => true,
        Algorithm::Rsa { hash } => matches!(hash, Some(HashAlg::Sha256 | HashAlg::Sha512)),
        _ => false,
    }
}

/// Parses and vets one public key line (`TYPE BASE64 [COMMENT]`).
pub fn parse_public_key(line: &str) -> Result<ParsedKey, KeyError> {
    let key =
        PublicKey::from_openssh(line.trim()).map_err(|e| KeyError::Malformed(e.to_string()))?;
    key_type_allowed(key.key_data())?;
    let comment = key.comment().as_str_lossy().to_owned();
    let mut bare = key.clone();
    bare.set_comment("");
    let openssh = bare
        .to_openssh()
        .map_err(|e| KeyError::Malformed(e.to_string()))?;
    Ok(ParsedKey {
        fingerprint: fingerprint(&key),
        algorithm: key.algorithm().as_str().to_owned(),
        openssh: openssh.trim().to_owned(),
        comment,
    })
}

/// Reads a `.pub` file holding exactly one key (blank and `#` lines are ignored).
pub fn read_key_file(path: &Path) -> Result<ParsedKey, KeyError> {
    use std::io::Read;
    let read_err = |source| KeyError::Read {
        path: path.to_owned(),
        source,
    };
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_KEY_FILE).read_to_string(&mut text))
        .map_err(read_err)?;
    let mut lines = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'));
    let first = lines.next().ok_or_else(|| KeyError::Empty {
        path: path.to_owned(),
    })?;
    if lines.next().is_some() {
        return Err(KeyError::Several {
            path: path.to_owned(),
        });
    }
    parse_public_key(first)
}

/// `gitplane key add USER FILE.pub`.
pub fn key_add(store: &Location, user: &str, file: &Path) -> Result<ParsedKey, KeyError> {
    let key = read_key_file(file)?;
    Store::open(store)?.add_ssh_key(
        user,
        &key.fingerprint,
        &key.algorithm,
        &key.openssh,
        &key.comment,
    )?;
    Ok(key)
}

/// `gitplane key list USER`.
pub fn key_list(store: &Location, user: &str) -> Result<Vec<SshKeyRecord>, KeyError> {
    Ok(Store::open(store)?.ssh_keys(user)?)
}

/// `gitplane key remove FINGERPRINT`: returns whose key it was. New connections with it are
/// refused at once on every node (each authentication looks the key up).
pub fn key_remove(store: &Location, fingerprint: &str) -> Result<String, KeyError> {
    Ok(Store::open(store)?.remove_ssh_key(fingerprint)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Generated with ssh-keygen for these tests only.
    const ED25519: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMUs9S256nNeCTVo172MHfNazw9N36NCXksbfQq9i+TQ me@laptop";
    const ECDSA: &str =
        "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBFPUlvaRdUcIZk15qnBGMwPIEQyaDw2fOvmR5A+Ack1JiLqNj3C86HM/c+uc8ZiXK1UY5TAdtgI2C2C6ZASCx7M=";
    const RSA_1024: &str =
        "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQCmRZbMAX4MUFeO/5E7WBla6gFpJpNVWq8Ed39DJ+zA78yvCE3C3luGyIuhiAJmLj0g16CEIir6ds7/lFd1VsoZ/6+MwjoEIiAL/xyNP6vuTrwIOzImk8CMfoE3pMEj1S08bMrfkDmuhJiY74kSi4+DMtfsFJs3IvU2IOqLmEfkkQ==";
    const DSA: &str =
        "ssh-dss AAAAB3NzaC1kc3MAAACBAMC6m266tZJUiS3+oZ2/TVYvMak8j1ej1erfIGxpB9CKe32kE9KJWJ14moIP4hYG/InTe9nM4ii1QhoID0+8l7UvDw7YwBgcnhJmz7I4HKniATq036WW+h/1mNaKLB+8NgXQKmkRytzWoKlrDNQu5qnJyB/a3BJBdy7hJVU9453tAAAAFQCN8kcJDDQwKWNDIri4kGPoo+VNEwAAAIACj5Glk8TdhiVR418jMiZUkYcvj41g/BAJJdOSEGW+b88wbx8YC9WEE8JBVI07qCHzmmQU0OvXcDVrBfwSqIdY4x2Tg2/pWS04DoTuAxUDjf0llvcS74JC99+Jn6yHnH9RvTCkLgT71XTSgmubyuLIqsEBb9nENi0iEiuinph0aQAAAIBGB+YjIO5GSyes6kkNjs109epkYeBNtsEJL+eQEkJx9AN98S/+vtSGC49/vmkOfhCGAhwRtQzbqfrmI3Ga/tAi1QpSchKLQXrHIUImWntSiqvoSYULuRwA/ga+ZU6XWZBzWEhzP/WiDSHMJNTFi9lL1LAIzREwh6C5GoS+YFKSvg==";

    #[test]
    fn accepts_modern_keys() {
        let k = parse_public_key(ED25519).unwrap();
        assert_eq!(k.algorithm, "ssh-ed25519");
        assert_eq!(k.comment, "me@laptop");
        assert!(k.fingerprint.starts_with("SHA256:"), "{}", k.fingerprint);
        assert!(!k.openssh.contains("me@laptop"));
        let e = parse_public_key(ECDSA).unwrap();
        assert_eq!(e.algorithm, "ecdsa-sha2-nistp256");
        assert_ne!(e.fingerprint, k.fingerprint);
    }

    #[test]
    fn refuses_weak_and_malformed_keys() {
        assert!(matches!(
            parse_public_key(RSA_1024),
            Err(KeyError::RsaTooShort(1024))
        ));
        assert!(matches!(
            parse_public_key(DSA),
            Err(KeyError::Algorithm(_)) | Err(KeyError::Malformed(_))
        ));
        for bad in ["", "ssh-ed25519", "ssh-ed25519 !!!", "hello world"] {
            assert!(
                matches!(parse_public_key(bad), Err(KeyError::Malformed(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn signature_policy() {
        assert!(signature_algorithm_allowed(&Algorithm::Ed25519));
        assert!(signature_algorithm_allowed(&Algorithm::Rsa {
            hash: Some(HashAlg::Sha512)
        }));
        assert!(!signature_algorithm_allowed(&Algorithm::Rsa { hash: None }));
        assert!(!signature_algorithm_allowed(&Algorithm::Dsa));
    }

    #[test]
    fn key_files_and_store() {
        let dir = tempfile::tempdir().unwrap();
        let data = Location::sqlite(&dir.path().join("d"));
        Store::open(&data).unwrap().add_user("alice", "pw").unwrap();
        let file = dir.path().join("k.pub");
        std::fs::write(&file, format!("# mine\n\n{ED25519}\n")).unwrap();
        let added = key_add(&data, "alice", &file).unwrap();
        assert!(matches!(
            key_add(&data, "alice", &file),
            Err(KeyError::Store(StoreError::SshKeyExists(_)))
        ));
        let listed = key_list(&data, "alice").unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].fingerprint, added.fingerprint);
        std::fs::write(&file, format!("{ED25519}\n{ECDSA}\n")).unwrap();
        assert!(matches!(
            key_add(&data, "alice", &file),
            Err(KeyError::Several { .. })
        ));
        std::fs::write(&file, "\n").unwrap();
        assert!(matches!(
            key_add(&data, "alice", &file),
            Err(KeyError::Empty { .. })
        ));
        assert!(matches!(
            key_add(&data, "alice", &dir.path().join("missing.pub")),
            Err(KeyError::Read { .. })
        ));
    }
}
