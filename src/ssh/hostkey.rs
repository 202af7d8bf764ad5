//! The server's Ed25519 host key: generated on first start into `DATA/ssh_host_ed25519_key`
//! (OpenSSH format, mode 0600, with the public half beside it as `.pub`), reused afterwards so
//! clients' `known_hosts` entries stay valid.
//!
//! Creation is atomic: the key is written to a temporary file, synced, then hard-linked to the
//! final name, which fails if the name exists. Two processes starting at once therefore agree
//! on one key, and a crash mid-write never leaves a truncated key behind.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::ssh_key::LineEnding;
use russh::keys::PrivateKey;

pub const HOST_KEY_FILE: &str = "ssh_host_ed25519_key";

#[derive(Debug, thiserror::Error)]
pub enum HostKeyError {
    #[error("cannot read host key {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("host key {path} is not an unencrypted OpenSSH private key: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("cannot write host key {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot encode the new host key: {0}")]
    Encode(String),
}

/// Loads the host key, creating it first if there is none. Returns the key and whether it was
/// created now.
pub fn load_or_create(data_dir: &Path) -> Result<(PrivateKey, bool), HostKeyError> {
    let path = data_dir.join(HOST_KEY_FILE);
    if path.exists() {
        return load(&path).map(|k| (k, false));
    }
    let key = PrivateKey::from(Ed25519Keypair::from_seed(&rand::random()));
    let pem = key
        .to_openssh(LineEnding::LF)
        .map_err(|e| HostKeyError::Encode(e.to_string()))?;
    let tmp = data_dir.join(format!("{HOST_KEY_FILE}.tmp.{}", std::process::id()));
    let write_err = |path: &Path| {
        let path = path.to_owned();
        move |source| HostKeyError::Write { path, source }
    };
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(pem.as_bytes())?;
            f.sync_all()
        });
    let linked = written.and_then(|_| std::fs::hard_link(&tmp, &path));
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {}
        // Another process won the race: use its key.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return load(&path).map(|k| (k, false))
        }
        Err(e) => return Err(write_err(&path)(e)),
    }
    let public = key
        .public_key()
        .to_openssh()
        .map_err(|e| HostKeyError::Encode(e.to_string()))?;
    let pub_path = data_dir.join(format!("{HOST_KEY_FILE}.pub"));
    std::fs::write(&pub_path, format!("{public}\n")).map_err(write_err(&pub_path))?;
    Ok((key, true))
}

fn load(path: &Path) -> Result<PrivateKey, HostKeyError> {
    let meta = std::fs::metadata(path).map_err(|source| HostKeyError::Read {
        path: path.to_owned(),
        source,
    })?;
    if meta.permissions().mode() & 0o077 != 0 {
        tracing::warn!(path = %path.display(), "host key is readable by others; run chmod 600 on it");
    }
    let text = std::fs::read_to_string(path).map_err(|source| HostKeyError::Read {
        path: path.to_owned(),
        source,
    })?;
    let key = PrivateKey::from_openssh(&text).map_err(|e| HostKeyError::Parse {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    if key.is_encrypted() {
        return Err(HostKeyError::Parse {
            path: path.to_owned(),
            message: "it is encrypted".into(),
        });
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_then_reused() {
        let dir = tempfile::tempdir().unwrap();
        let (a, created) = load_or_create(dir.path()).unwrap();
        assert!(created);
        let (b, created) = load_or_create(dir.path()).unwrap();
        assert!(!created);
        assert_eq!(a.public_key(), b.public_key());
        let mode = std::fs::metadata(dir.path().join(HOST_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let public =
            std::fs::read_to_string(dir.path().join(format!("{HOST_KEY_FILE}.pub"))).unwrap();
        assert!(public.starts_with("ssh-ed25519 "), "{public}");
        // No temporary files left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn garbage_is_an_error_not_a_new_key() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(HOST_KEY_FILE), "not a key").unwrap();
        assert!(matches!(
            load_or_create(dir.path()),
            Err(HostKeyError::Parse { .. })
        ));
    }
}
