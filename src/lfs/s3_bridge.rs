//! S3 storage for callers off the monoio shards: the SSH sidecars' `git-lfs-transfer`, which runs
//! on tokio with russh. The S3 client runs on monoio (on the shards it streams from the pinned
//! pool), so the bridge is one thread of its own running a monoio runtime with that same client,
//! fed over channels that work across runtimes.
//!
//! - An upload arrives already staged and verified on local disk (SHA-256 and size, as for disk
//!   storage), and goes to S3 as a multipart upload read from that file, completed only when
//!   every part was accepted and aborted otherwise: S3 never shows a partial object.
//! - A download comes back as chunks over a channel of [`DOWNLOAD_CHUNKS_QUEUED`] chunks, so a
//!   slow SSH client stops the S3 read instead of growing memory.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use tokio::sync::{mpsc, oneshot};

use super::s3::{Parts, S3Client, S3Error, S3Settings};

/// Chunks of a download waiting for the SSH channel; with the one being read and the one being
/// sent, a download holds at most this plus two chunks.
const DOWNLOAD_CHUNKS_QUEUED: usize = 2;
/// How much of a staged upload is read from its file per part write.
const UPLOAD_READ: usize = 256 * 1024;

/// Why a bridged transfer failed.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error(transparent)]
    S3(#[from] S3Error),
    #[error("reading staged upload {}: {source}", path.display())]
    Staged { path: PathBuf, source: io::Error },
    #[error("S3 object {oid} ended after {got} of {size} bytes")]
    Short { oid: String, got: u64, size: u64 },
    #[error("the S3 bridge thread is gone")]
    Gone,
}

enum Job {
    Upload {
        staged: PathBuf,
        oid: String,
        size: u64,
        done: oneshot::Sender<Result<(), BridgeError>>,
    },
    Download {
        oid: String,
        size: u64,
        chunk_len: usize,
        chunks: mpsc::Sender<Result<Vec<u8>, BridgeError>>,
    },
}

/// A handle to the bridge thread; cheap to share between sidecar threads.
pub struct S3Bridge {
    jobs: mpsc::UnboundedSender<Job>,
}

impl S3Bridge {
    /// Starts the bridge thread. It ends when the last handle is dropped.
    pub fn start(settings: S3Settings) -> io::Result<Self> {
        let (jobs, mut queue) = mpsc::unbounded_channel::<Job>();
        let (started, startup) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("gitplane-s3-bridge".into())
            .spawn(move || {
                let runtime = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
                    .enable_timer()
                    .build();
                let mut runtime = match runtime {
                    Ok(r) => {
                        let _ = started.send(Ok(()));
                        r
                    }
                    Err(e) => {
                        let _ = started.send(Err(e));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let client = S3Client::new(settings);
                    while let Some(job) = queue.recv().await {
                        monoio::spawn(run(client.clone(), job));
                    }
                });
            })?;
        startup
            .recv()
            .unwrap_or_else(|_| Err(io::Error::other("S3 bridge thread died at start")))?;
        Ok(Self { jobs })
    }

    /// Uploads the verified file `staged` as object `oid`; returns once S3 has it all.
    pub async fn upload(&self, staged: PathBuf, oid: String, size: u64) -> Result<(), BridgeError> {
        let (done, answer) = oneshot::channel();
        self.jobs
            .send(Job::Upload {
                staged,
                oid,
                size,
                done,
            })
            .map_err(|_| BridgeError::Gone)?;
        answer.await.unwrap_or(Err(BridgeError::Gone))
    }

    /// Streams object `oid` of `size` bytes in chunks of at most `chunk_len` bytes. Dropping the
    /// receiver stops the read.
    pub fn download(
        &self,
        oid: String,
        size: u64,
        chunk_len: usize,
    ) -> mpsc::Receiver<Result<Vec<u8>, BridgeError>> {
        let (chunks, receiver) = mpsc::channel(DOWNLOAD_CHUNKS_QUEUED);
        let job = Job::Download {
            oid,
            size,
            chunk_len,
            chunks,
        };
        if let Err(mpsc::error::SendError(Job::Download { chunks, .. })) = self.jobs.send(job) {
            let _ = chunks.try_send(Err(BridgeError::Gone));
        }
        receiver
    }
}

async fn run(client: S3Client, job: Job) {
    match job {
        Job::Upload {
            staged,
            oid,
            size,
            done,
        } => {
            let _ = done.send(upload(&client, &staged, &oid, size).await);
        }
        Job::Download {
            oid,
            size,
            chunk_len,
            chunks,
        } => {
            if let Err(e) = download(&client, &oid, size, chunk_len, &chunks).await {
                let _ = chunks.send(Err(e)).await;
            }
        }
    }
}

async fn upload(client: &S3Client, staged: &Path, oid: &str, size: u64) -> Result<(), BridgeError> {
    if size == 0 {
        return Ok(client.put_empty(oid).await?);
    }
    let file = File::open(staged).map_err(|source| BridgeError::Staged {
        path: staged.to_path_buf(),
        source,
    })?;
    client
        .multipart(oid, async |upload_id: &str| {
            upload_parts(client, &file, staged, oid, upload_id, size).await
        })
        .await
}

async fn upload_parts(
    client: &S3Client,
    file: &File,
    staged: &Path,
    oid: &str,
    upload_id: &str,
    size: u64,
) -> Result<Vec<String>, BridgeError> {
    let mut parts = Parts::new(client);
    let mut buf = Vec::with_capacity(UPLOAD_READ);
    let mut offset = 0u64;
    while offset < size {
        let part_len = client.part_size().min(size - offset);
        let mut part = client
            .start_part(oid, upload_id, parts.next_number()?, part_len)
            .await?;
        let part_end = offset + part_len;
        while offset < part_end {
            let want = usize::try_from(part_end - offset)
                .unwrap_or(UPLOAD_READ)
                .min(UPLOAD_READ);
            buf.resize(want, 0);
            // The staged file was just written, so this read comes from the page cache; a
            // blocking read on the bridge thread is shorter than a pool hop.
            file.read_exact_at(&mut buf, offset)
                .map_err(|source| BridgeError::Staged {
                    path: staged.to_path_buf(),
                    source,
                })?;
            let (res, back) = client.write_part(&mut part, buf).await;
            buf = back;
            res?;
            offset += want as u64;
        }
        parts.sent(part).await?;
    }
    Ok(parts.finish().await?)
}

async fn download(
    client: &S3Client,
    oid: &str,
    size: u64,
    chunk_len: usize,
    chunks: &mpsc::Sender<Result<Vec<u8>, BridgeError>>,
) -> Result<(), BridgeError> {
    if size == 0 {
        return Ok(());
    }
    let mut response = client.get(oid, 0, size - 1).await?;
    let mut got = 0u64;
    while got < size {
        let (res, chunk) = response.read_into(Vec::with_capacity(chunk_len)).await;
        let n = res.map_err(|source| S3Error::Io {
            endpoint: "object download".into(),
            source,
        })?;
        if n == 0 {
            return Err(BridgeError::Short {
                oid: oid.to_owned(),
                got,
                size,
            });
        }
        got += n as u64;
        if chunks.send(Ok(chunk)).await.is_err() {
            // The SSH client went away: stop reading.
            return Ok(());
        }
    }
    Ok(())
}
