//! Admin commands (`gitplane user|repo ...`). They talk to the store and the repositories
//! directly, so they work whether or not a server is running.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::git::repo::{RepoError, RepoRoot};
use crate::git::repo_name::{RepoName, RepoNameError};
use crate::store::{Access, Location, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error("invalid repository name: {0}")]
    RepoName(#[from] RepoNameError),
    #[error("reading the password from stdin: {0}")]
    Stdin(std::io::Error),
    #[error("the password is empty")]
    EmptyPassword,
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Reads a password from stdin, without its trailing newline.
pub fn read_password(input: impl Read) -> Result<String, AdminError> {
    let mut text = String::new();
    input
        .take(4096)
        .read_to_string(&mut text)
        .map_err(AdminError::Stdin)?;
    let password = text.trim_end_matches(['\n', '\r']).to_owned();
    if password.is_empty() {
        return Err(AdminError::EmptyPassword);
    }
    Ok(password)
}

pub fn user_add(store: &Location, name: &str, password: &str) -> Result<(), AdminError> {
    Store::open(store)?.add_user(name, password)?;
    Ok(())
}

/// `gitplane user passwd NAME --password-stdin`: the old password stops working on every node.
pub fn user_passwd(store: &Location, name: &str, password: &str) -> Result<(), AdminError> {
    Store::open(store)?.set_password(name, password)?;
    Ok(())
}

/// `gitplane user remove NAME`: with their keys and grants, on every node.
pub fn user_remove(store: &Location, name: &str) -> Result<(), AdminError> {
    Store::open(store)?.remove_user(name)?;
    Ok(())
}

/// Records the repository and creates it on disk; undoes the record if git fails.
pub fn repo_create(
    location: &Location,
    git: &Path,
    name: &str,
    public: bool,
) -> Result<PathBuf, AdminError> {
    let repo = RepoName::parse(name)?;
    let store = Store::open(location)?;
    store.create_repo(&repo, public)?;
    match RepoRoot::new(location.data_dir()).init_bare(git, &repo) {
        Ok(path) => Ok(path),
        Err(e) => {
            let _ = store.delete_repo_record(&repo);
            Err(e.into())
        }
    }
}

pub fn repo_grant(
    store: &Location,
    repo: &str,
    user: &str,
    access: Access,
) -> Result<(), AdminError> {
    let repo = RepoName::parse(repo)?;
    Store::open(store)?.grant(&repo, user, access)?;
    Ok(())
}

/// `gitplane repo revoke OWNER/NAME USER`.
pub fn repo_revoke(store: &Location, repo: &str, user: &str) -> Result<(), AdminError> {
    let repo = RepoName::parse(repo)?;
    Store::open(store)?.revoke(&repo, user)?;
    Ok(())
}

/// On first start with no users: creates `admin` with a random password, written to
/// `DATA/initial-admin-password` (mode 0600). Returns that file's path when it did.
pub fn ensure_initial_admin(location: &Location) -> Result<Option<PathBuf>, AdminError> {
    let data_dir = location.data_dir();
    use rand::distributions::{Alphanumeric, DistString};
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;

    let store = Store::open(location)?;
    if store.user_count()? > 0 {
        return Ok(None);
    }
    let password = Alphanumeric.sample_string(&mut rand::thread_rng(), 24);
    let path = data_dir.join("initial-admin-password");
    let write_err = |source| AdminError::Write {
        path: path.clone(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .map_err(write_err)?;
    file.write_all(format!("{password}\n").as_bytes())
        .and_then(|_| file.sync_all())
        .map_err(write_err)?;
    match store.add_user("admin", &password) {
        Ok(()) => Ok(Some(path)),
        // Another node of a shared store started at the same moment and made it.
        Err(StoreError::UserExists(_)) => {
            let _ = std::fs::remove_file(&path);
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_from_stdin() {
        assert_eq!(read_password(&b"s3cret\n"[..]).unwrap(), "s3cret");
        assert_eq!(read_password(&b"a b\r\n"[..]).unwrap(), "a b");
        assert!(matches!(
            read_password(&b"\n"[..]),
            Err(AdminError::EmptyPassword)
        ));
    }

    #[test]
    fn initial_admin_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Location::sqlite(dir.path());
        let path = ensure_initial_admin(&store).unwrap().unwrap();
        let pw = std::fs::read_to_string(&path).unwrap();
        assert_eq!(pw.trim().len(), 24);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(Store::open(&store)
            .unwrap()
            .verify_password("admin", pw.trim())
            .unwrap());
        assert!(ensure_initial_admin(&store).unwrap().is_none());
    }
}
