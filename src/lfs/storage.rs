//! Local-disk object storage: `DATA/lfs/objects/OID[0:2]/OID[2:4]/OID`, uploads staged under
//! `DATA/lfs/tmp` and renamed into place only once verified, so a reader never sees a partial or
//! wrong object. Blocking filesystem calls here run on the blocking pool.

use std::io;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct DiskStore {
    root: PathBuf,
}

impl DiskStore {
    pub fn new(data_dir: &Path) -> Self {
        Self {
            root: data_dir.join("lfs"),
        }
    }

    /// Creates the staging directory (at start-up).
    pub fn prepare(&self) -> io::Result<()> {
        std::fs::create_dir_all(self.root.join("tmp"))?;
        std::fs::create_dir_all(self.root.join("objects"))
    }

    /// `oid` must be a validated 64-hex id.
    pub fn object_path(&self, oid: &str) -> PathBuf {
        let (a, b) = (oid.get(0..2).unwrap_or("xx"), oid.get(2..4).unwrap_or("xx"));
        self.root.join("objects").join(a).join(b).join(oid)
    }

    /// A fresh staging path for an upload of `oid` (unique per upload, so concurrent uploads of
    /// the same object never write the same file).
    pub fn staging_path(&self, oid: &str) -> PathBuf {
        let nonce: u64 = rand::random();
        self.root.join("tmp").join(format!("{oid}.{nonce:016x}"))
    }

    /// Moves a verified, fsynced staging file into place and makes the rename durable.
    pub fn publish(&self, staged: &Path, oid: &str) -> io::Result<()> {
        let target = self.object_path(oid);
        let dir = target.parent().unwrap_or(&self.root);
        std::fs::create_dir_all(dir)?;
        std::fs::rename(staged, &target)?;
        std::fs::File::open(dir)?.sync_all()
    }
}
