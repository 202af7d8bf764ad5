//! Where repositories live on disk, and creating them. Paths are only ever built from a validated
//! [`RepoName`], so a request cannot name anything outside `DATA/repos`.

use std::path::{Path, PathBuf};

use super::repo_name::RepoName;

#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error("cannot create {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("`git init --bare {path}` failed: {stderr}")]
    Init { path: PathBuf, stderr: String },
    #[error("{path} already exists on disk")]
    Exists { path: PathBuf },
}

/// The repositories root, `DATA/repos`.
#[derive(Debug, Clone)]
pub struct RepoRoot {
    root: PathBuf,
}

impl RepoRoot {
    pub fn new(data_dir: &Path) -> Self {
        Self {
            root: data_dir.join("repos"),
        }
    }

    /// `DATA/repos`.
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn path_of(&self, repo: &RepoName) -> PathBuf {
        self.root.join(repo.relative_dir())
    }

    /// Creates a bare repository whose default branch is `main`.
    pub fn init_bare(&self, git: &Path, repo: &RepoName) -> Result<PathBuf, RepoError> {
        let path = self.path_of(repo);
        if path.exists() {
            return Err(RepoError::Exists { path });
        }
        let parent = path.parent().unwrap_or(&self.root);
        std::fs::create_dir_all(parent).map_err(|source| RepoError::Create {
            path: parent.to_owned(),
            source,
        })?;
        let out = super::process::git_command(git, parent)
            .args(["init", "--bare", "--quiet", "--initial-branch=main"])
            .arg(&path)
            .output()
            .map_err(|source| RepoError::Create {
                path: path.clone(),
                source,
            })?;
        if !out.status.success() {
            return Err(RepoError::Init {
                path,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Ok(path)
    }
}
