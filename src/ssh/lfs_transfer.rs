//! `git-lfs-transfer OWNER/NAME upload|download`: the pure-SSH Git LFS protocol on an exec
//! channel, the connection loop around the sans-I/O [`super::lfs_transfer_proto`] codec.
//!
//! Data flow: channel data → input buffer (at most one pkt-line plus one SSH message) →
//! [`Decoder`] → [`Event`] → a handler here → the same store calls and disk layout as the HTTP
//! LFS API ([`crate::lfs::storage::DiskStore`], [`crate::store::Store`]'s `lfs_*` functions) →
//! answer pkt-lines → channel (russh's writer waits for the client's window, so a slow client
//! stops us reading the file).
//!
//! - `put-object` streams: each data packet is hashed and copied into one 64 KiB chunk that is
//!   written to `DATA/lfs/tmp/OID.NONCE` when full; at the flush the size and SHA-256 are checked,
//!   the file is fsynced and renamed into place ([`DiskStore::publish`]), and only then is the
//!   object recorded and linked to the repository. Anything else removes the staging file.
//! - `get-object` reads the file in packet-sized pieces into one buffer and sends each as a
//!   pkt-line. A session holds at most those two buffers whatever the object sizes.
//! - With S3 storage the upload is staged and verified the same way, then handed to the
//!   [`S3Bridge`] (a multipart upload from the staging file, which is removed afterwards), and a
//!   download comes from the bridge in bounded chunks.
//! - Every wait for the client (its next message, or a write its window must admit) is bounded
//!   by `ssh.channel_idle_secs` ([`super::idle`]): a client that stalls is cut, its staging file
//!   removed. The server's own work (fsync, an S3 upload) is not the client's wait.
//! - Authorisation happened before the session started (read for `download`, write for
//!   `upload`); what needs write (`put-object`, `verify-object`, `lock`, `unlock`) is refused in a
//!   `download` session, which git-lfs only uses for `batch`, `get-object` and `list-lock`.
//!
//! The LFS pinned buffer pool belongs to the monoio shards and is not `Send`; this loop runs on
//! the tokio sidecar with russh, so it bounds memory with its own two buffers instead. Files are
//! read and written on tokio's blocking pool (the sidecar's tokio has no `fs` feature, and a
//! blocking pool hop per 64 KiB is what `tokio::fs` would do anyway).

use std::fs::File;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use russh::server::Msg;
use russh::{Channel, ChannelMsg, ChannelReadHalf};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

use super::idle::{client_wait, ChannelStalled};
use super::lfs_transfer_proto::{
    data_header, encode_capabilities, encode_error, encode_object_head, encode_status, Decoder,
    Event, FramingError, ObjectSpec, Request, Step,
};
use super::phase::ExecGuard;
use super::{with_store, SshShared};
use crate::auth::{decide, Decision};
use crate::git::pktline::{FLUSH, MAX_PAYLOAD_LEN};
use crate::git::repo_name::RepoName;
use crate::lfs::api::rfc3339;
use crate::lfs::s3_bridge::{BridgeError, S3Bridge};
use crate::lfs::storage::DiskStore;
use crate::metrics::METRICS;
use crate::store::{Access, LockQuery, LockRecord, StoreError};
use crate::token::Operation;

/// Upload bytes are written to the staging file in chunks of this size.
const CHUNK: usize = 64 * 1024;
const DEFAULT_LOCK_PAGE: usize = 100;
const MAX_LOCK_PAGE: usize = 1000;

/// What ends a session early. Everything a client can get wrong inside a well-framed message is
/// answered with a status instead ([`Fault::Refuse`]) and the session goes on.
#[derive(Debug, thiserror::Error)]
enum TransferError {
    /// The channel closed or the connection died: nobody to tell.
    #[error("client went away")]
    ClientGone,
    /// The client moved no byte within the channel idle time: closed without a word (its
    /// window may be shut).
    #[error(transparent)]
    Stalled(#[from] ChannelStalled),
    /// The pkt-line stream is broken; nothing after it can be trusted (client error).
    #[error("broken pkt-line framing from the client: {0}")]
    Framing(#[from] FramingError),
    /// Local I/O failed (server error); names the operation and file.
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("LFS object {oid} is shorter on disk than its recorded {size} bytes")]
    ShortObject { oid: String, size: u64 },
    #[error("blocking task failed: {0}")]
    Blocking(String),
    #[error("S3 storage: {0}")]
    S3(#[from] BridgeError),
}

/// How one request went wrong.
enum Fault {
    /// Answer with this status and message; the session continues.
    Refuse(u16, String),
    /// End the session.
    Fatal(TransferError),
}

impl From<TransferError> for Fault {
    fn from(e: TransferError) -> Self {
        Self::Fatal(e)
    }
}

fn refuse(code: u16, message: impl Into<String>) -> Fault {
    Fault::Refuse(code, message.into())
}

/// Everything a session needs, detached from the handler.
pub(super) struct TransferContext {
    pub shared: Arc<SshShared>,
    pub user: String,
    pub repo: RepoName,
    pub operation: Operation,
    pub peer: SocketAddr,
    /// Flips when the supervisor finds the connection dead.
    pub dead: watch::Receiver<bool>,
}

/// How the loop ended without an error.
enum End {
    Quit,
    Eof,
}

/// Runs a session to its end; always closes the channel.
pub(super) async fn run(ctx: TransferContext, guard: ExecGuard, channel: Channel<Msg>) {
    let (mut read, write) = channel.split();
    let mut out = Box::pin(write.make_writer());
    let mut dead = ctx.dead.clone();
    let mut session = Session::new(&ctx);
    let result = tokio::select! {
        r = session.serve(&mut read, &mut out) => r,
        _ = dead.wait_for(|d| *d) => Err(TransferError::ClientGone),
    };
    // An upload cut off mid-body leaves its staging file to the guard in `session.put`.
    drop(session);
    let code = match result {
        Ok(end) => {
            tracing::debug!(peer = %ctx.peer, repo = %ctx.repo, operation = ctx.operation.as_str(), quit = matches!(end, End::Quit), "git-lfs-transfer session done");
            0
        }
        Err(TransferError::ClientGone) => {
            tracing::info!(peer = %ctx.peer, repo = %ctx.repo, "git-lfs-transfer client went away");
            drop(guard);
            return;
        }
        Err(e @ TransferError::Stalled(_)) => {
            tracing::info!(peer = %ctx.peer, repo = %ctx.repo, error = %e, "git-lfs-transfer session cut");
            let _ = write.close().await;
            drop(guard);
            return;
        }
        Err(e @ TransferError::Framing(_)) => {
            tracing::info!(peer = %ctx.peer, repo = %ctx.repo, error = %e, "git-lfs-transfer session ended");
            1
        }
        Err(e) => {
            tracing::warn!(peer = %ctx.peer, repo = %ctx.repo, error = %e, "git-lfs-transfer session failed");
            let _ = write
                .extended_data_bytes(1, b"gitplane: internal error\n".to_vec())
                .await;
            1
        }
    };
    let _ = out.flush().await;
    let _ = write.exit_status(code).await;
    let _ = write.eof().await;
    let _ = write.close().await;
    drop(guard);
}

/// Removes a staging file unless it was published (also when the session is dropped mid-upload).
struct Staged {
    path: PathBuf,
    armed: bool,
}

impl Drop for Staged {
    fn drop(&mut self) {
        if self.armed {
            // A single unlink: cheap enough to do in place, and Drop cannot await.
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Counts an object transfer in `gitplane_lfs_active_transfers` while it lives.
struct Active;

impl Active {
    fn start() -> Self {
        METRICS.lfs.active_transfers.inc();
        Self
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        METRICS.lfs.active_transfers.dec();
    }
}

/// An upload in progress.
struct Put {
    oid: String,
    size: u64,
    received: u64,
    hasher: Sha256,
    /// Decided already: the body is read to its flush and dropped, then this is the answer.
    refusal: Option<(u16, String)>,
    /// The open staging file, with its guard; None once refused.
    file: Option<(File, Staged)>,
    chunk: Vec<u8>,
    _active: Option<Active>,
}

struct Session<'a> {
    ctx: &'a TransferContext,
    disk: DiskStore,
    negotiated: bool,
    put: Option<Put>,
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, TransferError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| TransferError::Blocking(e.to_string()))
}

fn lock_args(l: &LockRecord) -> Vec<String> {
    vec![
        format!("id={}", l.id),
        format!("path={}", l.path),
        format!(
            "locked-at={}",
            rfc3339(u64::try_from(l.locked_at).unwrap_or(0))
        ),
        format!("ownername={}", l.owner),
    ]
}

impl<'a> Session<'a> {
    fn new(ctx: &'a TransferContext) -> Self {
        Self {
            ctx,
            disk: DiskStore::new(&ctx.shared.config.data_dir),
            negotiated: false,
            put: None,
        }
    }

    fn repo_key(&self) -> String {
        self.ctx.repo.to_string()
    }

    /// How long one wait for the client may last.
    fn idle(&self) -> Duration {
        self.ctx.shared.config.ssh.channel_idle
    }

    async fn store<R: Send + 'static>(
        &self,
        f: impl FnOnce(&crate::store::Store) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, Fault> {
        // As over HTTP: a store failure fails the request (500), not the session.
        with_store(self.ctx.shared.config.store.clone(), f)
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "LFS store call failed");
                refuse(500, "internal error")
            })
    }

    async fn serve<W: AsyncWrite + Unpin>(
        &mut self,
        read: &mut ChannelReadHalf,
        out: &mut W,
    ) -> Result<End, TransferError> {
        let mut resp = Vec::new();
        encode_capabilities(&mut resp);
        send(out, &resp, self.idle()).await?;
        let mut decoder = Decoder::new(self.ctx.shared.config.lfs.max_batch_objects);
        // Holds at most one partial packet plus one SSH message: the decoder is asked for the
        // next packet before anything more is read.
        let mut input: Vec<u8> = Vec::with_capacity(2 * CHUNK);
        let mut start = 0usize;
        loop {
            let step = match decoder.decode(input.get(start..).unwrap_or_default()) {
                Ok(s) => s,
                Err(e) => {
                    let mut resp = Vec::new();
                    encode_error(&mut resp, 400, &[], &format!("protocol error: {e}"));
                    send(out, &resp, self.idle()).await?;
                    return Err(e.into());
                }
            };
            match step {
                Step::Incomplete { .. } => {
                    input.drain(..start);
                    start = 0;
                    match client_wait(self.idle(), read.wait()).await? {
                        Some(ChannelMsg::Data { data }) => input.extend_from_slice(&data),
                        Some(ChannelMsg::Eof | ChannelMsg::Close) | None => return Ok(End::Eof),
                        Some(_) => {}
                    }
                }
                Step::Packet { consumed, event } => {
                    let quit = match event {
                        Some(e) => self.on_event(e, out).await?,
                        None => false,
                    };
                    start += consumed;
                    if quit {
                        return Ok(End::Quit);
                    }
                }
            }
        }
    }

    /// Acts on one event; returns whether the client said `quit`.
    async fn on_event<W: AsyncWrite + Unpin>(
        &mut self,
        event: Event<'_>,
        out: &mut W,
    ) -> Result<bool, TransferError> {
        let mut resp = Vec::new();
        let result = match event {
            Event::Request(Request::Quit) => {
                encode_status(&mut resp, 200, &[], None);
                send(out, &resp, self.idle()).await?;
                return Ok(true);
            }
            Event::Request(r) => self.on_request(r, out, &mut resp).await,
            Event::PutObject { oid, size } => {
                self.begin_put(oid, size).await?;
                return Ok(false);
            }
            Event::Data(d) => {
                self.put_data(d).await?;
                return Ok(false);
            }
            Event::DataEnd => self.end_put(&mut resp).await,
            Event::Invalid(e) => {
                // A malformed message ends any upload in progress without storing it.
                self.put = None;
                Err(refuse(e.status(), e.to_string()))
            }
        };
        match result {
            Ok(()) => {}
            Err(Fault::Refuse(code, message)) => {
                tracing::debug!(peer = %self.ctx.peer, repo = %self.ctx.repo, code, %message, "git-lfs-transfer request refused");
                resp.clear();
                encode_error(&mut resp, code, &[], &message);
            }
            Err(Fault::Fatal(e)) => return Err(e),
        }
        send(out, &resp, self.idle()).await?;
        Ok(false)
    }

    /// Checks what every request but `version` and `quit` needs; `write` for the commands that
    /// change something.
    fn check(&self, write: bool) -> Result<(), Fault> {
        if !self.negotiated {
            return Err(refuse(
                400,
                "negotiate the protocol first: send `version 1`",
            ));
        }
        if write && self.ctx.operation != Operation::Upload {
            return Err(refuse(
                403,
                "this session was opened for download; uploads, verification and locks need \
                 `git-lfs-transfer PATH upload` (write access)",
            ));
        }
        Ok(())
    }

    async fn on_request<W: AsyncWrite + Unpin>(
        &mut self,
        request: Request,
        out: &mut W,
        resp: &mut Vec<u8>,
    ) -> Result<(), Fault> {
        match request {
            Request::Version(1) => {
                self.negotiated = true;
                encode_status(resp, 200, &[], None);
                Ok(())
            }
            Request::Version(v) => Err(refuse(
                400,
                format!("unsupported protocol version {v}: this server speaks version 1"),
            )),
            Request::Batch { objects, .. } => self.batch(objects, resp).await,
            Request::GetObject { oid } => self.get_object(oid, out, resp).await,
            Request::VerifyObject { oid, size } => self.verify_object(oid, size, resp).await,
            Request::Lock { path } => self.lock(path, resp).await,
            Request::ListLocks {
                path,
                id,
                cursor,
                limit,
            } => {
                let query = LockQuery {
                    path,
                    id,
                    after_id: cursor,
                    limit: limit.unwrap_or(DEFAULT_LOCK_PAGE).clamp(1, MAX_LOCK_PAGE),
                };
                self.list_locks(query, resp).await
            }
            Request::Unlock { id, force } => self.unlock(&id, force, resp).await,
            // Answered by the caller before it gets here.
            Request::Quit => Ok(()),
        }
    }

    async fn batch(&self, objects: Vec<ObjectSpec>, resp: &mut Vec<u8>) -> Result<(), Fault> {
        self.check(false)?;
        let max = self.ctx.shared.config.lfs.max_object_size;
        if let Some(big) = objects.iter().find(|o| o.size > max) {
            return Err(refuse(
                413,
                format!(
                    "object {} is larger than this server's limit of {max} bytes",
                    big.oid
                ),
            ));
        }
        let repo = self.repo_key();
        let oids: Vec<String> = objects.iter().map(|o| o.oid.clone()).collect();
        let states = self
            .store(move |s| {
                oids.iter()
                    .map(|oid| s.lfs_object_state(&repo, oid))
                    .collect::<Result<Vec<_>, _>>()
            })
            .await?;
        let upload = self.ctx.operation == Operation::Upload;
        let lines: Vec<String> = objects
            .iter()
            .zip(states)
            .map(|(o, st)| {
                let here = st.linked && st.stored_size == Some(o.size);
                // As over HTTP: an object stored for another repository only must still be
                // uploaded here (proving possession); a missing download is a `noop`, which
                // git-lfs reports as missing, since this protocol has no per-object errors.
                let action = match (upload, here) {
                    (true, true) | (false, false) => "noop",
                    (true, false) => "upload",
                    (false, true) => "download",
                };
                format!("{} {} {action}", o.oid, o.size)
            })
            .collect();
        encode_status(resp, 200, &["hash-algo=sha256".to_owned()], Some(&lines));
        Ok(())
    }

    async fn begin_put(&mut self, oid: String, size: u64) -> Result<(), TransferError> {
        let mut put = Put {
            oid,
            size,
            received: 0,
            hasher: Sha256::new(),
            refusal: None,
            file: None,
            chunk: Vec::new(),
            _active: None,
        };
        let max = self.ctx.shared.config.lfs.max_object_size;
        let checked = match self.check(true) {
            Err(Fault::Refuse(code, msg)) => Err((code, msg)),
            _ if size > max => Err((413, format!("object larger than {max} bytes"))),
            _ => Ok(()),
        };
        match checked {
            Err(r) => put.refusal = Some(r),
            Ok(()) => {
                let path = self.disk.staging_path(&put.oid);
                let p = path.clone();
                match blocking(move || File::create(&p)).await? {
                    Ok(f) => {
                        put.file = Some((f, Staged { path, armed: true }));
                        put.chunk = Vec::with_capacity(CHUNK);
                        put._active = Some(Active::start());
                    }
                    Err(e) => {
                        tracing::error!(path = %path.display(), error = %e, "cannot create LFS staging file");
                        put.refusal = Some((507, "cannot store the object".into()));
                    }
                }
            }
        }
        self.put = Some(put);
        Ok(())
    }

    async fn put_data(&mut self, mut data: &[u8]) -> Result<(), TransferError> {
        let Some(put) = self.put.as_mut() else {
            return Ok(());
        };
        if put.refusal.is_some() {
            return Ok(());
        }
        put.received = put.received.saturating_add(data.len() as u64);
        if put.received > put.size {
            put.refusal = Some((
                400,
                format!("more data than the declared size of {} bytes", put.size),
            ));
            put.file = None;
            return Ok(());
        }
        put.hasher.update(data);
        METRICS.lfs.bytes_in.add(data.len() as u64);
        while !data.is_empty() {
            let room = CHUNK.saturating_sub(put.chunk.len()).min(data.len());
            let (now, rest) = data.split_at(room);
            put.chunk.extend_from_slice(now);
            data = rest;
            if put.chunk.len() >= CHUNK {
                write_chunk(put).await?;
            }
        }
        Ok(())
    }

    async fn end_put(&mut self, resp: &mut Vec<u8>) -> Result<(), Fault> {
        let Some(mut put) = self.put.take() else {
            return Err(refuse(400, "data without a put-object"));
        };
        if put.refusal.is_none() && !put.chunk.is_empty() {
            write_chunk(&mut put).await?;
        }
        if let Some((code, msg)) = put.refusal.take() {
            return Err(Fault::Refuse(code, msg));
        }
        if put.received != put.size {
            return Err(refuse(
                400,
                format!("body ended after {} of {} bytes", put.received, put.size),
            ));
        }
        let digest = hex::encode(std::mem::take(&mut put.hasher).finalize());
        if digest != put.oid {
            METRICS.lfs.verify_failures.inc();
            tracing::info!(peer = %self.ctx.peer, repo = %self.ctx.repo, oid = %put.oid, "git-lfs-transfer upload refused: content does not match its oid");
            return Err(refuse(
                422,
                "content does not match the object id (SHA-256)",
            ));
        }
        let Some((file, mut staged)) = put.file.take() else {
            return Err(refuse(507, "cannot store the object"));
        };
        if let Some(s3) = &self.ctx.shared.lfs_s3 {
            drop(file);
            let sent = s3
                .upload(staged.path.clone(), put.oid.clone(), put.size)
                .await;
            if let Err(e) = sent {
                tracing::error!(oid = %put.oid, error = %e, "storing LFS object in S3 failed");
                return Err(refuse(507, "cannot store the object"));
            }
            // In S3 now; `staged` removes the local copy when it drops.
        } else {
            let (disk, oid, path) = (self.disk.clone(), put.oid.clone(), staged.path.clone());
            let published = blocking(move || {
                file.sync_all().map_err(|e| ("fsync", e))?;
                drop(file);
                disk.publish(&path, &oid).map_err(|e| ("publish", e))
            })
            .await?;
            if let Err((op, source)) = published {
                tracing::error!(oid = %put.oid, op, error = %source, "storing LFS object failed");
                return Err(refuse(507, "cannot store the object"));
            }
            // Renamed into place: nothing to clean up any more.
            staged.armed = false;
        }
        let (repo, oid, size) = (self.repo_key(), put.oid.clone(), put.size);
        self.store(move |s| s.lfs_record_object(&repo, &oid, size))
            .await?;
        tracing::debug!(peer = %self.ctx.peer, repo = %self.ctx.repo, oid = %put.oid, size, "git-lfs-transfer put-object stored");
        encode_status(resp, 200, &[], None);
        Ok(())
    }

    async fn verify_object(&self, oid: String, size: u64, resp: &mut Vec<u8>) -> Result<(), Fault> {
        self.check(true)?;
        let repo = self.repo_key();
        let st = self.store(move |s| s.lfs_object_state(&repo, &oid)).await?;
        match (st.stored_size, st.linked) {
            (Some(s), true) if s == size => {
                encode_status(resp, 200, &[], None);
                Ok(())
            }
            (Some(s), true) => Err(refuse(422, format!("object size is {s}, not {size}"))),
            _ => Err(refuse(404, "object not found")),
        }
    }

    /// Streams an object: the head, one pkt-line per read, a flush. Once the head is sent the
    /// size is promised, so a failure after it ends the session.
    async fn get_object<W: AsyncWrite + Unpin>(
        &self,
        oid: String,
        out: &mut W,
        resp: &mut Vec<u8>,
    ) -> Result<(), Fault> {
        self.check(false)?;
        let (repo, key) = (self.repo_key(), oid.clone());
        let st = self.store(move |s| s.lfs_object_state(&repo, &key)).await?;
        let size = match st {
            crate::store::ObjectState {
                stored_size: Some(s),
                linked: true,
            } => s,
            _ => return Err(refuse(404, "object not found")),
        };
        if let Some(s3) = &self.ctx.shared.lfs_s3 {
            return send_from_s3(s3, oid, size, out, resp, self.idle()).await;
        }
        let path = self.disk.object_path(&oid);
        let p = path.clone();
        let mut file = match blocking(move || File::open(&p)).await? {
            Ok(f) => f,
            Err(e) => {
                tracing::error!(%oid, path = %path.display(), error = %e, "LFS object recorded but unreadable");
                return Err(refuse(500, "internal error"));
            }
        };
        encode_object_head(resp, size);
        send(out, resp, self.idle()).await?;
        resp.clear();
        let _active = Active::start();
        let mut buf: Vec<u8> = Vec::with_capacity(4 + MAX_PAYLOAD_LEN);
        let mut offset = 0u64;
        while offset < size {
            let want = usize::try_from(size - offset)
                .unwrap_or(usize::MAX)
                .min(MAX_PAYLOAD_LEN);
            buf.resize(4 + want, 0);
            let read = blocking(move || {
                let r = buf
                    .get_mut(4..)
                    .map_or(Ok(0), |dst| file.read_at(dst, offset));
                (file, buf, r)
            })
            .await?;
            (file, buf) = (read.0, read.1);
            let n = match read.2 {
                Ok(0) => {
                    return Err(TransferError::ShortObject { oid, size }.into());
                }
                Ok(n) => n,
                Err(source) => {
                    return Err(TransferError::Io {
                        op: "reading",
                        path,
                        source,
                    }
                    .into())
                }
            };
            let header = data_header(n).map_err(TransferError::Framing)?;
            if let Some(h) = buf.get_mut(..4) {
                h.copy_from_slice(&header);
            }
            send(out, buf.get(..4 + n).unwrap_or_default(), self.idle()).await?;
            METRICS.lfs.bytes_out.add(n as u64);
            offset += n as u64;
        }
        resp.extend_from_slice(FLUSH);
        tracing::debug!(peer = %self.ctx.peer, repo = %self.ctx.repo, %oid, size, "git-lfs-transfer get-object sent");
        Ok(())
    }

    async fn lock(&self, path: String, resp: &mut Vec<u8>) -> Result<(), Fault> {
        self.check(true)?;
        let (repo, user) = (self.repo_key(), self.ctx.user.clone());
        let created = self
            .store(move |s| s.lfs_create_lock(&repo, &path, &user))
            .await?;
        match created {
            Ok(lock) => encode_status(resp, 201, &lock_args(&lock), None),
            Err(existing) => encode_error(
                resp,
                409,
                &lock_args(&existing),
                &format!("already locked by {}", existing.owner),
            ),
        }
        Ok(())
    }

    async fn list_locks(&self, query: LockQuery, resp: &mut Vec<u8>) -> Result<(), Fault> {
        self.check(false)?;
        let repo = self.repo_key();
        let (locks, more) = self.store(move |s| s.lfs_list_locks(&repo, &query)).await?;
        let mut lines = Vec::with_capacity(locks.len() * 5);
        for l in &locks {
            let who = if l.owner == self.ctx.user {
                "ours"
            } else {
                "theirs"
            };
            let at = rfc3339(u64::try_from(l.locked_at).unwrap_or(0));
            lines.push(format!("lock {}", l.id));
            lines.push(format!("path {} {}", l.id, l.path));
            lines.push(format!("locked-at {} {at}", l.id));
            lines.push(format!("ownername {} {}", l.id, l.owner));
            lines.push(format!("owner {} {who}", l.id));
        }
        let args: Vec<String> = match (more, locks.last()) {
            (true, Some(last)) => vec![format!("next-cursor={}", last.id)],
            _ => Vec::new(),
        };
        encode_status(resp, 200, &args, Some(&lines));
        Ok(())
    }

    async fn unlock(&self, id: &str, force: bool, resp: &mut Vec<u8>) -> Result<(), Fault> {
        self.check(true)?;
        let id: i64 = id.parse().map_err(|_| refuse(404, "lock not found"))?;
        let repo = self.repo_key();
        let query = LockQuery {
            id: Some(id),
            limit: 1,
            ..LockQuery::default()
        };
        let (found, _) = self.store(move |s| s.lfs_list_locks(&repo, &query)).await?;
        let lock = found
            .into_iter()
            .next()
            .ok_or_else(|| refuse(404, "lock not found"))?;
        if lock.owner != self.ctx.user {
            // Breaking someone else's lock is a repository admin's right, as over HTTP. Over
            // HTTP it also takes `force`; git-lfs 3.3 does not send `unlock --force` over this
            // protocol (its unlock carries only `refname`), so here an admin's unlock of another
            // user's lock counts as forced. For everyone else `force` changes nothing.
            let (repo, user) = (self.ctx.repo.clone(), self.ctx.user.clone());
            let access = self
                .store(move |s| s.repo_access(&repo, Some(&user)))
                .await?;
            if decide(access, true, Access::Admin) != Decision::Allow {
                let message = if force {
                    "only a repository admin may force-unlock another user's lock".to_owned()
                } else {
                    format!(
                        "locked by {}; only a repository admin may unlock it",
                        lock.owner
                    )
                };
                return Err(refuse(403, message));
            }
        }
        let repo = self.repo_key();
        let removed = self.store(move |s| s.lfs_delete_lock(&repo, id)).await?;
        let removed = removed.ok_or_else(|| refuse(404, "lock not found"))?;
        encode_status(resp, 200, &lock_args(&removed), None);
        Ok(())
    }
}

/// Writes the upload's chunk to its staging file; a write failure refuses the upload.
async fn write_chunk(put: &mut Put) -> Result<(), TransferError> {
    let Some((mut file, staged)) = put.file.take() else {
        put.chunk.clear();
        return Ok(());
    };
    let chunk = std::mem::take(&mut put.chunk);
    let (file_back, mut chunk, res) = blocking(move || {
        let r = file.write_all(&chunk);
        (file, chunk, r)
    })
    .await?;
    chunk.clear();
    put.chunk = chunk;
    match res {
        Ok(()) => put.file = Some((file_back, staged)),
        Err(e) => {
            tracing::error!(path = %staged.path.display(), error = %e, "writing LFS staging file");
            put.refusal = Some((507, "cannot store the object".into()));
            // Dropping `staged` removes the partial file.
        }
    }
    Ok(())
}

/// [`Session::get_object`] from S3: the head once the first bytes have arrived (so a missing or
/// unreachable object is still an error status), then one pkt-line per piece, then a flush.
async fn send_from_s3<W: AsyncWrite + Unpin>(
    s3: &S3Bridge,
    oid: String,
    size: u64,
    out: &mut W,
    resp: &mut Vec<u8>,
    idle: Duration,
) -> Result<(), Fault> {
    let mut chunks = s3.download(oid.clone(), size, MAX_PAYLOAD_LEN);
    let mut chunk = if size > 0 {
        next_chunk(&mut chunks, &oid, size).await.map_err(|e| {
            tracing::error!(%oid, error = %e, "LFS object recorded but not readable from S3");
            refuse(500, "internal error")
        })?
    } else {
        Vec::new()
    };
    encode_object_head(resp, size);
    send(out, resp, idle).await?;
    resp.clear();
    let _active = Active::start();
    let mut packet: Vec<u8> = Vec::with_capacity(4 + MAX_PAYLOAD_LEN);
    let mut sent = 0u64;
    while sent < size {
        if chunk.is_empty() {
            chunk = next_chunk(&mut chunks, &oid, size).await?;
        }
        for piece in chunk.chunks(MAX_PAYLOAD_LEN) {
            packet.clear();
            packet.extend_from_slice(&data_header(piece.len()).map_err(TransferError::Framing)?);
            packet.extend_from_slice(piece);
            send(out, &packet, idle).await?;
        }
        METRICS.lfs.bytes_out.add(chunk.len() as u64);
        sent += chunk.len() as u64;
        chunk.clear();
    }
    resp.extend_from_slice(FLUSH);
    tracing::debug!(%oid, size, "git-lfs-transfer get-object sent from S3");
    Ok(())
}

async fn next_chunk(
    chunks: &mut tokio::sync::mpsc::Receiver<Result<Vec<u8>, BridgeError>>,
    oid: &str,
    size: u64,
) -> Result<Vec<u8>, TransferError> {
    match chunks.recv().await {
        Some(Ok(chunk)) => Ok(chunk),
        Some(Err(e)) => Err(TransferError::S3(e)),
        None => Err(TransferError::ShortObject {
            oid: oid.to_owned(),
            size,
        }),
    }
}

/// Sends bytes; the writer waits for the client's SSH window, at most `idle`.
async fn send<W: AsyncWrite + Unpin>(
    out: &mut W,
    bytes: &[u8],
    idle: Duration,
) -> Result<(), TransferError> {
    client_wait(idle, out.write_all(bytes))
        .await?
        .map_err(|_| TransferError::ClientGone)
}
