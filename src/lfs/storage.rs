//! Local-disk object storage: `DATA/lfs/objects/OID[0:2]/OID[2:4]/OID`, uploads staged under
//! `DATA/lfs/tmp` and renamed into place only once verified, so a reader never sees a partial or
//! wrong object. Blocking filesystem calls here run on the blocking pool.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
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

/// Starts writeback of a staging file while it is still being received, so the fsync that
/// makes the object durable finds little left to write: disk writes overlap the transfer instead
/// of all following it. (The kernel would otherwise wait for `dirty_background_ratio` of RAM, gigabytes on a
/// hosting node, before writing anything back.)
pub struct Writeback {
    fd: RawFd,
    started_to: u64,
}

impl Writeback {
    /// Bytes written between two writeback requests.
    pub const STEP: u64 = 8 << 20;

    pub fn new(file: &impl AsRawFd) -> Self {
        Self {
            fd: file.as_raw_fd(),
            started_to: 0,
        }
    }

    /// Called with the end of the data written so far, in order.
    pub fn written_to(&mut self, end: u64) {
        if end - self.started_to < Self::STEP {
            return;
        }
        let (Ok(from), Ok(len)) = (
            libc::off64_t::try_from(self.started_to),
            libc::off64_t::try_from(end - self.started_to),
        ) else {
            return;
        };
        // SYNC_FILE_RANGE_WRITE only queues the dirty pages for writing and does not wait for
        // them (the way PostgreSQL's checkpoint_flush_after and RocksDB's bytes_per_sync use it).
        // A failure is not an error here: the fsync at the end is what reports and guarantees.
        // SAFETY: plain syscall on a descriptor the caller keeps open.
        unsafe { libc::sync_file_range(self.fd, from, len, libc::SYNC_FILE_RANGE_WRITE) };
        self.started_to = end;
    }
}
