//! Local-disk object storage: `DATA/lfs/objects/OID[0:2]/OID[2:4]/OID`, uploads staged under
//! `DATA/lfs/tmp` and renamed into place only once verified, so a reader never sees a partial or
//! wrong object. Blocking filesystem calls here run on the blocking pool.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};

use monoio::buf::IoBuf;
use monoio::task::JoinHandle;

use super::pool::PooledBuf;

/// Offsets and lengths of O_DIRECT writes are multiples of this. Pool buffers are page-aligned
/// whole pages, so every full buffer qualifies; 4 KiB covers the logical block size of common
/// disks (512 or 4096 bytes). A device with larger blocks would refuse the writes (EINVAL), and
/// the upload would fail with 507 rather than store anything wrong.
pub const DIRECT_ALIGN: usize = 4096;

static BUFFERED_NOTED: AtomicBool = AtomicBool::new(false);

/// An upload's staging file.
pub struct Staging {
    pub file: monoio::fs::File,
    /// Opened with O_DIRECT: see [`DirectWriter`].
    pub direct: bool,
}

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

    /// Creates the staging file at `path` with O_DIRECT, or for buffered writes on a filesystem
    /// that refuses O_DIRECT (EINVAL at open: ramfs, some FUSE and network filesystems).
    pub async fn create_staging(&self, path: &Path) -> io::Result<Staging> {
        let options = |flags: i32| {
            let mut o = monoio::fs::OpenOptions::new();
            o.write(true)
                .create(true)
                .truncate(true)
                .custom_flags(flags);
            o
        };
        match options(libc::O_DIRECT).open(path).await {
            Ok(file) => Ok(Staging { file, direct: true }),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                if !BUFFERED_NOTED.swap(true, Ordering::Relaxed) {
                    tracing::info!(
                        dir = %self.root.join("tmp").display(),
                        "the LFS staging filesystem refuses O_DIRECT; uploads use buffered writes"
                    );
                }
                let file = options(0).open(path).await?;
                Ok(Staging {
                    file,
                    direct: false,
                })
            }
            Err(e) => Err(e),
        }
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

type WriteTask = JoinHandle<(io::Result<()>, PooledBuf)>;

/// Writes pool buffers to an O_DIRECT staging file, each write a task of its own, so the disk
/// writes chunk N while the upload receives and hashes chunk N+1. The data goes from the pinned
/// buffer to the device: no copy into the page cache, no dirty pages for the final fsync to wait
/// for (it only has the allocation metadata left), and no page-cache growth to reclaim later.
pub struct DirectWriter {
    file: Rc<monoio::fs::File>,
    in_flight: VecDeque<WriteTask>,
}

impl DirectWriter {
    pub fn new(file: monoio::fs::File) -> Self {
        Self {
            file: Rc::new(file),
            in_flight: VecDeque::new(),
        }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Starts writing `buf` at `offset`; both must be multiples of [`DIRECT_ALIGN`].
    pub fn submit(&mut self, buf: PooledBuf, offset: u64) {
        let file = Rc::clone(&self.file);
        self.in_flight.push_back(monoio::spawn(async move {
            file.write_all_at(buf, offset).await
        }));
    }

    /// Waits for the oldest write and hands back its buffer; None when nothing is in flight.
    pub async fn reclaim(&mut self) -> Option<io::Result<PooledBuf>> {
        let (res, buf) = self.in_flight.pop_front()?.await;
        Some(res.map(|()| buf))
    }

    /// Waits for every write; the first error wins. Their buffers go back to the pool.
    pub async fn drain(&mut self) -> io::Result<()> {
        let mut result = Ok(());
        while let Some(done) = self.reclaim().await {
            if let (Ok(()), Err(e)) = (&result, done) {
                result = Err(e);
            }
        }
        result
    }

    /// Writes the last chunk, `buf` at `offset`, whatever its length: its whole blocks directly,
    /// then the partial block, which O_DIRECT cannot write, through the page cache. Waits for
    /// every write, so the file is complete when this returns.
    pub async fn finish(&mut self, buf: PooledBuf, offset: u64) -> io::Result<()> {
        let len = buf.filled().len();
        let whole = len - len % DIRECT_ALIGN;
        if whole == len {
            self.submit(buf, offset);
            return self.drain().await;
        }
        let buf = if whole > 0 {
            let (res, prefix) = self.file.write_all_at(buf.slice(..whole), offset).await;
            res?;
            prefix.into_inner()
        } else {
            buf
        };
        self.drain().await?;
        self.clear_direct()?;
        let (res, _) = self
            .file
            .write_all_at(buf.slice(whole..len), offset + whole as u64)
            .await;
        res
    }

    fn clear_direct(&self) -> io::Result<()> {
        let fd = self.file.as_raw_fd();
        // SAFETY: fcntl on a descriptor this writer keeps open; no write is in flight.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        // SAFETY: as above.
        if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_DIRECT) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The file, once every write has been waited for (after [`Self::drain`] or [`Self::finish`]).
    pub fn file(&self) -> &monoio::fs::File {
        &self.file
    }
}
