//! The LFS HTTP handlers: batch, basic upload/download, verify, locks.
//!
//! Object bytes only ever sit in pinned pool buffers: an upload reads from the socket into a
//! pool buffer, hashes it and writes it to the staging file; a download reads the file into a
//! pool buffer and writes it to the socket. A transfer holds at most a few buffers (a disk
//! upload up to one more than [`WRITES_IN_FLIGHT`], and only one while another transfer waits),
//! so a shard's transfer memory is the pool's size, whatever the object sizes and concurrency.
//!
//! Buffers are held only while bytes move: a download waits for the socket to take bytes before
//! it takes one ([`super::send`]), an upload waits for body bytes before it takes one, and both
//! run under progress deadlines (`http.send_*`, `http.body_*`), so a client that stops is cut
//! and holds nothing meanwhile. Anonymous downloads have their own smaller share, node-wide and
//! per client address.

use std::collections::BTreeMap;
use std::io;
use std::rc::Rc;
use std::sync::Arc;

use monoio::buf::IoBufMut;
use serde::de::DeserializeOwned;
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::api::{self, ActionContext, BatchRequest, Known, Lock, Operation, CONTENT_TYPE};
use super::pool::{BufferPool, PooledBuf};
use super::s3::{Parts, S3Client, S3Error};
use super::send::{send_object, SendError, Source};
use super::storage::{DirectWriter, DiskStore, Staging, Writeback};
use crate::access::{with_store, HttpAuth, Principal, Refusal};
use crate::admission::{self, AddressLimiter, AddressSlot};
use crate::config::{LfsLimits, ServeConfig};
use crate::git::repo_name::RepoName;
use crate::http::body::BodyReader;
use crate::http::conn::{BodyReadError, Conn};
use crate::http::forwarded::{client_addr, IpRange};
use crate::http::head::{BodyFraming, Method, RequestHead};
use crate::http::query_param;
use crate::http::response::{encode_head, BodyLength};
use crate::http::server::Reuse;
use crate::metrics::{Cut, METRICS};
use crate::store::{Access, LockQuery, LockRecord};

/// Most O_DIRECT writes one upload keeps going while it receives the next chunk (each holds a
/// pool buffer).
const WRITES_IN_FLIGHT: usize = 2;
/// Largest JSON request body (batch, locks) accepted.
const MAX_JSON_BODY: u64 = 1 << 20;
const DEFAULT_LOCK_PAGE: usize = 100;
const MAX_LOCK_PAGE: usize = 1000;

/// An LFS request that cannot proceed: answered as `{"message": ...}`.
struct Failure {
    status: u16,
    message: String,
    /// Seconds after which the client should try again (429, 503).
    retry_after: Option<&'static str>,
}

fn fail(status: u16, message: impl Into<String>) -> Failure {
    Failure {
        status,
        message: message.into(),
        retry_after: None,
    }
}

impl From<Refusal> for Failure {
    fn from(r: Refusal) -> Self {
        Failure {
            status: r.status(),
            message: r.message().to_owned(),
            retry_after: (r.status() == 503).then_some(STORE_RETRY_AFTER),
        }
    }
}

/// Seconds a client waits before retrying when the store is unreachable.
const STORE_RETRY_AFTER: &str = "2";

fn lock_json(l: &LockRecord) -> Lock {
    Lock {
        id: l.id.to_string(),
        path: l.path.clone(),
        locked_at: api::rfc3339(u64::try_from(l.locked_at).unwrap_or(0)),
        owner: api::Owner {
            name: l.owner.clone(),
        },
    }
}

/// Parses `bytes=START-END`, `bytes=START-` or `bytes=-SUFFIX` against `size`; None when the
/// range cannot be satisfied. Multiple ranges are not supported (git-lfs sends one).
pub fn parse_range(header: &str, size: u64) -> Option<(u64, u64)> {
    let spec = header.trim().strip_prefix("bytes=")?;
    if spec.contains(',') || size == 0 {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (start, end) = match (a.trim(), b.trim()) {
        ("", suffix) => {
            let n: u64 = suffix.parse().ok()?;
            (size.saturating_sub(n), size - 1)
        }
        (s, "") => (s.parse().ok()?, size - 1),
        (s, e) => (s.parse().ok()?, e.parse::<u64>().ok()?.min(size - 1)),
    };
    (start <= end && start < size).then_some((start, end))
}

/// One shard's LFS handler.
pub struct LfsHttp {
    store: crate::store::Location,
    auth: Rc<HttpAuth>,
    pool: BufferPool,
    disk: DiskStore,
    /// Where objects live when not on local disk.
    s3: Option<S3Client>,
    limits: LfsLimits,
    fallback_host: String,
    /// Anonymous downloads running, node-wide and per client address.
    anonymous: Arc<AddressLimiter>,
    trusted_proxies: Vec<IpRange>,
}

/// The node-wide share of anonymous LFS transfers; one per process, handed to every shard.
pub fn anonymous_share(config: &ServeConfig) -> Arc<AddressLimiter> {
    AddressLimiter::new(
        config.lfs.anonymous_transfers,
        config.lfs.anonymous_transfers_per_ip,
    )
}

impl LfsHttp {
    pub fn new(config: &ServeConfig, auth: Rc<HttpAuth>, anonymous: Arc<AddressLimiter>) -> Self {
        Self {
            anonymous,
            trusted_proxies: config.http.trusted_proxies.clone(),
            store: config.store.clone(),
            auth,
            pool: BufferPool::new(config.lfs.buffer_size, config.lfs.buffers_per_shard),
            disk: DiskStore::new(&config.data_dir),
            s3: config.lfs.s3.clone().map(S3Client::new),
            limits: config.lfs.clone(),
            fallback_host: config.http_listen.to_string(),
        }
    }

    pub async fn handle(
        &self,
        head: &RequestHead,
        conn: &mut Conn,
        repo: &str,
        path: &str,
    ) -> io::Result<Reuse> {
        let result = match RepoName::parse(repo) {
            Ok(repo) => self.route(head, conn, &repo, path).await,
            Err(e) => Err(fail(400, format!("invalid repository name: {e}"))),
        };
        match result {
            Ok(reuse) => Ok(reuse),
            Err(f) => {
                let mut extra = Vec::new();
                if f.status == 401 {
                    extra.push(crate::smart_http::WWW_AUTHENTICATE);
                    extra.push(("LFS-Authenticate", "Basic realm=\"gitplane\""));
                }
                if let Some(secs) = f.retry_after {
                    extra.push(("Retry-After", secs));
                }
                respond_json(
                    conn,
                    f.status,
                    &api::ErrorBody {
                        message: &f.message,
                    },
                    &extra,
                )
                .await?;
                Ok(Reuse::KeepAlive)
            }
        }
    }

    async fn route(
        &self,
        head: &RequestHead,
        conn: &mut Conn,
        repo: &RepoName,
        path: &str,
    ) -> Result<Reuse, Failure> {
        let r = match (head.method, path) {
            (Method::Post, "objects/batch") => self.batch(head, conn, repo).await?,
            (Method::Put, p) if p.starts_with("objects/") => {
                self.upload(head, conn, repo, &p["objects/".len()..])
                    .await?
            }
            (Method::Get, p) if p.starts_with("objects/") => {
                self.download(head, conn, repo, &p["objects/".len()..])
                    .await?
            }
            (Method::Post, "verify") => self.verify(head, conn, repo).await?,
            (Method::Post, "locks") => self.create_lock(head, conn, repo).await?,
            (Method::Get, "locks") => self.list_locks(head, conn, repo).await?,
            (Method::Post, "locks/verify") => self.verify_locks(head, conn, repo).await?,
            (Method::Post, p) if p.starts_with("locks/") && p.ends_with("/unlock") => {
                let id = &p["locks/".len()..p.len() - "/unlock".len()];
                self.unlock(head, conn, repo, id).await?
            }
            _ => return Err(fail(404, "no such LFS endpoint")),
        };
        Ok(r)
    }

    async fn authorize(
        &self,
        head: &RequestHead,
        repo: &RepoName,
        need: Access,
    ) -> Result<Principal, Failure> {
        Ok(self
            .auth
            .authorize(head.authorization.as_deref(), repo, need, true)
            .await?)
    }

    async fn store<R: Send + 'static>(
        &self,
        f: impl FnOnce(&crate::store::Store) -> Result<R, crate::store::StoreError> + Send + 'static,
    ) -> Result<R, Failure> {
        with_store(self.store.clone(), f).await.map_err(|e| {
            if e.is_unavailable() {
                tracing::warn!(error = %e, "LFS store unavailable");
                return Failure {
                    status: 503,
                    message: "the LFS database is unavailable; try again shortly".into(),
                    retry_after: Some(STORE_RETRY_AFTER),
                };
            }
            tracing::error!(error = %e, "LFS store call failed");
            fail(500, "internal error")
        })
    }

    async fn batch(
        &self,
        head: &RequestHead,
        conn: &mut Conn,
        repo: &RepoName,
    ) -> Result<Reuse, Failure> {
        METRICS.lfs.batch_requests.inc();
        let req: BatchRequest = read_json(head, conn).await?;
        let need = match req.operation {
            Operation::Upload => Access::Write,
            Operation::Download => Access::Read,
        };
        self.authorize(head, repo, need).await?;
        api::check_request(&req, self.limits.max_batch_objects)
            .map_err(|e| fail(e.status(), e.to_string()))?;
        let repo_key = repo.to_string();
        let oids: Vec<String> = req.objects.iter().map(|o| o.oid.clone()).collect();
        let known: Vec<Known> = self
            .store(move |s| {
                oids.iter()
                    .map(|oid| {
                        if !api::valid_oid(oid) {
                            return Ok(Known {
                                stored_size: None,
                                linked: false,
                            });
                        }
                        let st = s.lfs_object_state(&repo_key, oid)?;
                        Ok(Known {
                            stored_size: st.stored_size,
                            linked: st.linked,
                        })
                    })
                    .collect()
            })
            .await?;
        let host = head.host.as_deref().unwrap_or(&self.fallback_host);
        let base = format!("http://{host}/{repo}.git/info/lfs");
        let mut header = BTreeMap::new();
        if let Some(a) = head.authorization.as_deref() {
            header.insert("Authorization".to_owned(), a.to_owned());
        }
        let expires_in = self.limits.action_expiry.as_secs();
        let expires_at = api::rfc3339(crate::clock::unix_now() + expires_in);
        let ctx = ActionContext {
            base: &base,
            header: &header,
            expires_in,
            expires_at: &expires_at,
            max_object_size: self.limits.max_object_size,
        };
        let objects = req
            .objects
            .iter()
            .zip(known)
            .map(|(spec, k)| api::answer(req.operation, spec, k, &ctx))
            .collect();
        let body = api::BatchResponse {
            transfer: "basic",
            objects,
            hash_algo: "sha256",
        };
        respond_json(conn, 200, &body, &[])
            .await
            .map_err(io_failure)?;
        Ok(Reuse::KeepAlive)
    }

    async fn upload(
        &self,
        head: &RequestHead,
        conn: &mut Conn,
        repo: &RepoName,
        oid: &str,
    ) -> Result<Reuse, Failure> {
        if !api::valid_oid(oid) {
            return Err(fail(422, "invalid object id"));
        }
        self.authorize(head, repo, Access::Write).await?;
        let size = match head.framing {
            BodyFraming::Length(n) => n,
            BodyFraming::None => 0,
            BodyFraming::Chunked => return Err(fail(411, "uploads need a Content-Length")),
        };
        if size > self.limits.max_object_size {
            return Err(fail(
                413,
                format!("object larger than {} bytes", self.limits.max_object_size),
            ));
        }
        if head.expect_continue {
            conn.send_continue().await.map_err(io_failure)?;
        }
        METRICS.lfs.active_transfers.inc();
        let stored = match &self.s3 {
            Some(s3) => self.receive_to_s3(s3, conn, oid, size).await,
            None => self.receive_to_disk(conn, oid, size).await,
        };
        METRICS.lfs.active_transfers.dec();
        if let Err(f) = stored {
            conn.close_after_response();
            return Err(f);
        }
        let (oid_owned, repo_key) = (oid.to_owned(), repo.to_string());
        self.store(move |s| s.lfs_record_object(&repo_key, &oid_owned, size))
            .await?;
        respond_json(conn, 200, &serde_json::json!({}), &[])
            .await
            .map_err(io_failure)?;
        Ok(Reuse::KeepAlive)
    }

    /// Fills `buf` (emptied first) with the next `min(want, capacity)` request-body bytes: what
    /// the connection already buffered, then socket reads straight into pool memory, under the
    /// body deadline. Whole buffers mean fewer, larger file writes and hash updates than one per
    /// socket read. Callers take `buf` only once body bytes wait ([`body_waiting`]), so a silent
    /// uploader holds no buffer between chunks.
    async fn fill_body(
        &self,
        conn: &mut Conn,
        mut buf: PooledBuf,
        want: u64,
        offset: u64,
        size: u64,
    ) -> Result<PooledBuf, Failure> {
        buf.clear();
        let want = usize::try_from(want)
            .unwrap_or(usize::MAX)
            .min(buf.capacity());
        let buffered = conn.buffered();
        let take = buffered.len().min(want);
        buf.fill_from(buffered.get(..take).unwrap_or_default());
        conn.consume(take);
        while buf.filled().len() < want {
            let filled = buf.filled().len();
            let (res, slice) = conn.read_body(buf.slice_mut(filled..want)).await;
            buf = slice.into_inner();
            match res {
                Ok(0) => {
                    let got = offset + buf.filled().len() as u64;
                    return Err(fail(400, format!("body ended after {got} of {size} bytes")));
                }
                Ok(_) => {}
                Err(e) => return Err(body_failure(e)),
            }
        }
        METRICS.lfs.bytes_in.add(want as u64);
        Ok(buf)
    }

    /// Local disk: stage, fsync, verify, then rename into place.
    async fn receive_to_disk(&self, conn: &mut Conn, oid: &str, size: u64) -> Result<(), Failure> {
        let staged = self.disk.staging_path(oid);
        let written = self.stage(conn, &staged, size).await;
        let verified = written.and_then(|digest| verify_digest(oid, digest));
        if let Err(f) = verified {
            let _ = std::fs::remove_file(&staged);
            return Err(f);
        }
        let (disk, oid_owned) = (self.disk.clone(), oid.to_owned());
        self.store(move |_| {
            disk.publish(&staged, &oid_owned).map_err(|e| {
                crate::store::StoreError::Internal(format!("publishing LFS object: {e}"))
            })
        })
        .await
    }

    /// Streams `size` body bytes into `staged` through pool buffers, then fsyncs it; returns the
    /// SHA-256.
    async fn stage(
        &self,
        conn: &mut Conn,
        staged: &std::path::Path,
        size: u64,
    ) -> Result<[u8; 32], Failure> {
        let Staging { file, direct } = self.disk.create_staging(staged).await.map_err(|e| {
            tracing::error!(path = %staged.display(), error = %e, "cannot create LFS staging file");
            fail(500, "internal error")
        })?;
        let mut hasher = Sha256::new();
        if direct {
            let mut writer = DirectWriter::new(file);
            let streamed = self
                .stream_direct(conn, &mut writer, size, &mut hasher)
                .await;
            // After a failure, writes may still be in flight, holding pool buffers and the file.
            let drained = writer.drain().await.map_err(write_failed);
            streamed.and(drained)?;
            conn.body_finished();
            sync(writer.file()).await?;
        } else {
            self.stream_buffered(conn, &file, size, &mut hasher).await?;
            conn.body_finished();
            sync(&file).await?;
            let _ = file.close().await;
        }
        Ok(hasher.finalize().into())
    }

    /// O_DIRECT staging: full buffers are written while the next ones arrive (see
    /// [`DirectWriter`]).
    async fn stream_direct(
        &self,
        conn: &mut Conn,
        writer: &mut DirectWriter,
        size: u64,
        hasher: &mut Sha256,
    ) -> Result<(), Failure> {
        let mut offset = 0u64;
        while offset < size {
            body_waiting(conn).await?;
            let empty = self.direct_buffer(writer).await?;
            let (buf, chunk_offset) = self
                .next_chunk(conn, empty, &mut offset, size, hasher)
                .await?;
            if offset < size {
                writer.submit(buf, chunk_offset);
            } else {
                writer
                    .finish(buf, chunk_offset)
                    .await
                    .map_err(write_failed)?;
            }
        }
        Ok(())
    }

    /// The buffer for an O_DIRECT upload's next chunk. A free one from the pool while fewer than
    /// [`WRITES_IN_FLIGHT`] writes are going, otherwise the oldest write's once it is done. When
    /// another transfer waits for the pool, the upload drops back to one buffer and gives the
    /// rest back: overlap must never keep another transfer from starting. Never waits for the
    /// pool while holding a buffer, so uploads cannot deadlock on each other.
    async fn direct_buffer(&self, writer: &mut DirectWriter) -> Result<PooledBuf, Failure> {
        if self.pool.contended() {
            let mut keep = None;
            while let Some(done) = writer.reclaim().await {
                let buf = done.map_err(write_failed)?;
                keep.get_or_insert(buf);
            }
            return Ok(match keep {
                Some(buf) => buf,
                None => self.pool.acquire().await,
            });
        }
        if writer.in_flight() < WRITES_IN_FLIGHT {
            if let Some(buf) = self.pool.try_acquire() {
                return Ok(buf);
            }
        }
        match writer.reclaim().await {
            Some(done) => done.map_err(write_failed),
            None => Ok(self.pool.acquire().await),
        }
    }

    /// Fills `empty` with the body bytes at `*offset`, hashes them and advances `*offset`;
    /// returns the buffer and where its bytes belong in the object.
    async fn next_chunk(
        &self,
        conn: &mut Conn,
        empty: PooledBuf,
        offset: &mut u64,
        size: u64,
        hasher: &mut Sha256,
    ) -> Result<(PooledBuf, u64), Failure> {
        let buf = self
            .fill_body(conn, empty, size - *offset, *offset, size)
            .await?;
        hasher.update(buf.filled());
        let at = *offset;
        *offset += buf.filled().len() as u64;
        Ok((buf, at))
    }

    /// Buffered staging, where the filesystem refuses O_DIRECT: one buffer per chunk, written
    /// through the page cache with writeback started as it goes.
    async fn stream_buffered(
        &self,
        conn: &mut Conn,
        file: &monoio::fs::File,
        size: u64,
        hasher: &mut Sha256,
    ) -> Result<(), Failure> {
        let mut offset = 0u64;
        let mut writeback = Writeback::new(file);
        while offset < size {
            body_waiting(conn).await?;
            let empty = self.pool.acquire().await;
            let (buf, chunk_offset) = self
                .next_chunk(conn, empty, &mut offset, size, hasher)
                .await?;
            let (res, _written) = file.write_all_at(buf, chunk_offset).await;
            res.map_err(write_failed)?;
            writeback.written_to(offset);
        }
        Ok(())
    }

    /// S3: a multipart upload to the final key, fed part by part from pool buffers, completed
    /// only when the SHA-256 matches (aborted otherwise, so nothing becomes visible).
    async fn receive_to_s3(
        &self,
        s3: &S3Client,
        conn: &mut Conn,
        oid: &str,
        size: u64,
    ) -> Result<(), Failure> {
        if size == 0 {
            verify_digest(oid, Sha256::digest([]).into())?;
            return s3.put_empty(oid).await.map_err(Failure::from);
        }
        s3.multipart(oid, async |upload_id: &str| {
            let (digest, etags) = self.upload_parts(s3, conn, oid, upload_id, size).await?;
            verify_digest(oid, digest)?;
            Ok(etags)
        })
        .await
    }

    async fn upload_parts(
        &self,
        s3: &S3Client,
        conn: &mut Conn,
        oid: &str,
        upload_id: &str,
        size: u64,
    ) -> Result<([u8; 32], Vec<String>), Failure> {
        let mut hasher = Sha256::new();
        let mut parts = Parts::new(s3);
        let mut offset = 0u64;
        while offset < size {
            let part_len = s3.part_size().min(size - offset);
            let number = parts
                .next_number()
                .map_err(|_| fail(413, "too many parts"))?;
            let mut part = s3
                .start_part(oid, upload_id, number, part_len)
                .await
                .map_err(Failure::from)?;
            let mut sent = 0u64;
            while sent < part_len {
                body_waiting(conn).await?;
                let buf = self.pool.acquire().await;
                let buf = self
                    .fill_body(conn, buf, part_len - sent, offset + sent, size)
                    .await?;
                let n = buf.filled().len() as u64;
                hasher.update(buf.filled());
                s3.write_part(&mut part, buf).await.0?;
                sent += n;
            }
            parts.sent(part).await?;
            offset += part_len;
        }
        conn.body_finished();
        Ok((hasher.finalize().into(), parts.finish().await?))
    }

    async fn download(
        &self,
        head: &RequestHead,
        conn: &mut Conn,
        repo: &RepoName,
        oid: &str,
    ) -> Result<Reuse, Failure> {
        if !api::valid_oid(oid) {
            return Err(fail(404, "object not found"));
        }
        let who = self.authorize(head, repo, Access::Read).await?;
        let _share = match who.user {
            Some(_) => None,
            None => Some(self.admit_anonymous(head, conn)?),
        };
        let (repo_key, oid_owned) = (repo.to_string(), oid.to_owned());
        let state = self
            .store(move |s| s.lfs_object_state(&repo_key, &oid_owned))
            .await?;
        let size = match state {
            crate::store::ObjectState {
                stored_size: Some(s),
                linked: true,
            } => s,
            _ => return Err(fail(404, "object not found")),
        };
        let (status, start, end) = match head.range.as_deref() {
            None => (200, 0, size.saturating_sub(1)),
            Some(r) => match parse_range(r, size) {
                Some((s, e)) => (206, s, e),
                None => {
                    let cr = format!("bytes */{size}");
                    conn.respond(416, &[("Content-Range", &cr)], b"")
                        .await
                        .map_err(io_failure)?;
                    return Ok(Reuse::KeepAlive);
                }
            },
        };
        let len = if size == 0 { 0 } else { end - start + 1 };
        let content_range = format!("bytes {start}-{end}/{size}");
        let mut headers = vec![
            ("Content-Type", "application/octet-stream"),
            ("Accept-Ranges", "bytes"),
        ];
        if status == 206 {
            headers.push(("Content-Range", &content_range));
        }
        let mut source = match (&self.s3, len) {
            (_, 0) => Source::Empty,
            (Some(s3), _) => Source::S3(s3.get(oid, start, end).await.map_err(Failure::from)?),
            (None, _) => Source::Disk(
                monoio::fs::File::open(self.disk.object_path(oid))
                    .await
                    .map_err(|e| {
                        tracing::error!(%oid, error = %e, "LFS object recorded but unreadable");
                        fail(500, "internal error")
                    })?,
            ),
        };
        let mut out = Vec::with_capacity(256);
        encode_head(
            &mut out,
            status,
            &headers,
            BodyLength::Fixed(len),
            conn.reusable(),
        );
        METRICS.response(status);
        let (res, _) = conn.write_all(out).await;
        res.map_err(io_failure)?;
        METRICS.lfs.active_transfers.inc();
        let rules = conn.send_rules();
        let sent = send_object(conn.stream(), &self.pool, &mut source, start, len, rules).await;
        METRICS.lfs.active_transfers.dec();
        if let Source::Disk(file) = source {
            let _ = file.close().await;
        }
        if let Err(e) = sent {
            match e {
                SendError::Stalled(stall) => {
                    METRICS.cut(Cut::HttpSendIdle);
                    tracing::debug!(peer = %conn.peer, %oid, %stall, "LFS download cut");
                }
                SendError::Source(_) | SendError::Short => {
                    tracing::error!(%oid, error = %e, "LFS download failed")
                }
                SendError::ClientGone(_) => tracing::debug!(%oid, error = %e, "LFS download ended"),
            }
            // The head promised `len` bytes: the connection cannot carry on.
            conn.close_after_response();
            return Ok(Reuse::Close);
        }
        Ok(Reuse::KeepAlive)
    }

    /// A place in the anonymous share of transfers, or 429 (this address has its share) or 503
    /// (anonymous downloads fill the node's share), both with Retry-After.
    fn admit_anonymous(&self, head: &RequestHead, conn: &Conn) -> Result<AddressSlot, Failure> {
        let ip = client_addr(
            conn.peer.ip(),
            head.x_forwarded_for.as_deref(),
            &self.trusted_proxies,
        );
        self.anonymous.try_admit(ip).map_err(|refusal| {
            METRICS.cut(Cut::AnonymousShare);
            tracing::debug!(peer = %conn.peer, %refusal, "anonymous LFS download refused");
            let status = match refusal {
                admission::Refusal::PerSource(_) => 429,
                admission::Refusal::Global(_) => 503,
            };
            Failure {
                retry_after: Some("1"),
                ..fail(
                    status,
                    format!("anonymous downloads: {refusal}; retry later"),
                )
            }
        })
    }

    async fn verify(
        &self,
        head: &RequestHead,
        conn: &mut Conn,
        repo: &RepoName,
    ) -> Result<Reuse, Failure> {
        let v: api::VerifyObject = read_json(head, conn).await?;
        self.authorize(head, repo, Access::Write).await?;
        if !api::valid_oid(&v.oid) {
            return Err(fail(422, "invalid object id"));
        }
        let (repo_key, oid) = (repo.to_string(), v.oid.clone());
        let state = self
            .store(move |s| s.lfs_object_state(&repo_key, &oid))
            .await?;
        match (state.stored_size, state.linked) {
            (Some(s), true) if i64::try_from(s).ok() == Some(v.size) => {
                respond_json(conn, 200, &serde_json::json!({}), &[])
                    .await
                    .map_err(io_failure)?;
                Ok(Reuse::KeepAlive)
            }
            (Some(s), true) => Err(fail(422, format!("object size is {s}, not {}", v.size))),
            _ => Err(fail(404, "object not found")),
        }
    }

    async fn create_lock(
        &self,
        head: &RequestHead,
        conn: &mut Conn,
        repo: &RepoName,
    ) -> Result<Reuse, Failure> {
        let req: api::CreateLock = read_json(head, conn).await?;
        let who = self.authorize(head, repo, Access::Write).await?;
        let user = who
            .user
            .ok_or_else(|| fail(401, "locks need an authenticated user"))?;
        if req.path.is_empty() || req.path.len() > 4096 {
            return Err(fail(422, "invalid lock path"));
        }
        let repo_key = repo.to_string();
        let created = self
            .store(move |s| s.lfs_create_lock(&repo_key, &req.path, &user))
            .await?;
        match created {
            Ok(lock) => {
                respond_json(
                    conn,
                    201,
                    &api::LockBody {
                        lock: lock_json(&lock),
                    },
                    &[],
                )
                .await
            }
            Err(existing) => {
                let body = api::LockConflict {
                    lock: lock_json(&existing),
                    message: format!("already locked by {}", existing.owner),
                };
                respond_json(conn, 409, &body, &[]).await
            }
        }
        .map_err(io_failure)?;
        Ok(Reuse::KeepAlive)
    }

    fn lock_query(
        head: &RequestHead,
        cursor: Option<&str>,
        limit: Option<usize>,
    ) -> Result<LockQuery, Failure> {
        let parse_id = |s: &str| {
            s.parse::<i64>()
                .map_err(|_| fail(422, format!("invalid id or cursor `{s}`")))
        };
        let q = head.query.as_deref();
        let limit = match (limit, query_param(q, "limit")) {
            (Some(l), _) => l,
            (None, Some(l)) => l.parse().map_err(|_| fail(422, "invalid limit"))?,
            (None, None) => DEFAULT_LOCK_PAGE,
        };
        Ok(LockQuery {
            path: query_param(q, "path").map(|p| p.replace("%2F", "/").replace("%2f", "/")),
            id: query_param(q, "id").map(parse_id).transpose()?,
            after_id: cursor
                .or(query_param(q, "cursor"))
                .map(parse_id)
                .transpose()?,
            limit: limit.clamp(1, MAX_LOCK_PAGE),
        })
    }

    async fn list_locks(
        &self,
        head: &RequestHead,
        conn: &mut Conn,
        repo: &RepoName,
    ) -> Result<Reuse, Failure> {
        self.authorize(head, repo, Access::Read).await?;
        let query = Self::lock_query(head, None, None)?;
        let repo_key = repo.to_string();
        let (locks, more) = self
            .store(move |s| s.lfs_list_locks(&repo_key, &query))
            .await?;
        let body = api::LockList {
            next_cursor: more
                .then(|| locks.last().map(|l| l.id.to_string()))
                .flatten(),
            locks: locks.iter().map(lock_json).collect(),
        };
        respond_json(conn, 200, &body, &[])
            .await
            .map_err(io_failure)?;
        Ok(Reuse::KeepAlive)
    }

    async fn verify_locks(
        &self,
        head: &RequestHead,
        conn: &mut Conn,
        repo: &RepoName,
    ) -> Result<Reuse, Failure> {
        let req: api::VerifyLocks = read_json(head, conn).await?;
        let who = self.authorize(head, repo, Access::Write).await?;
        let user = who
            .user
            .ok_or_else(|| fail(401, "locks need an authenticated user"))?;
        let query = Self::lock_query(head, req.cursor.as_deref(), req.limit)?;
        let repo_key = repo.to_string();
        let (locks, more) = self
            .store(move |s| s.lfs_list_locks(&repo_key, &query))
            .await?;
        let (ours, theirs): (Vec<_>, Vec<_>) = locks.iter().partition(|l| l.owner == user);
        let body = api::VerifyLocksBody {
            ours: ours.into_iter().map(lock_json).collect(),
            theirs: theirs.into_iter().map(lock_json).collect(),
            next_cursor: more
                .then(|| locks.last().map(|l| l.id.to_string()))
                .flatten(),
        };
        respond_json(conn, 200, &body, &[])
            .await
            .map_err(io_failure)?;
        Ok(Reuse::KeepAlive)
    }

    async fn unlock(
        &self,
        head: &RequestHead,
        conn: &mut Conn,
        repo: &RepoName,
        id: &str,
    ) -> Result<Reuse, Failure> {
        let req: api::Unlock = read_json(head, conn).await.or_else(|f| {
            if f.status == 422 {
                Ok(api::Unlock::default())
            } else {
                Err(f)
            }
        })?;
        let id: i64 = id.parse().map_err(|_| fail(404, "lock not found"))?;
        let who = self.authorize(head, repo, Access::Write).await?;
        let user = who
            .user
            .ok_or_else(|| fail(401, "locks need an authenticated user"))?;
        let repo_key = repo.to_string();
        let query = LockQuery {
            id: Some(id),
            limit: 1,
            ..LockQuery::default()
        };
        let (found, _) = self
            .store(move |s| s.lfs_list_locks(&repo_key, &query))
            .await?;
        let lock = found
            .into_iter()
            .next()
            .ok_or_else(|| fail(404, "lock not found"))?;
        if lock.owner != user {
            if !req.force {
                return Err(fail(
                    403,
                    format!(
                        "locked by {}; unlock with --force if you are an admin",
                        lock.owner
                    ),
                ));
            }
            // Breaking someone else's lock is an admin's right.
            self.authorize(head, repo, Access::Admin)
                .await
                .map_err(|_| {
                    fail(
                        403,
                        "only a repository admin may force-unlock another user's lock",
                    )
                })?;
        }
        let repo_key = repo.to_string();
        let removed = self
            .store(move |s| s.lfs_delete_lock(&repo_key, id))
            .await?;
        let removed = removed.ok_or_else(|| fail(404, "lock not found"))?;
        respond_json(
            conn,
            200,
            &api::LockBody {
                lock: lock_json(&removed),
            },
            &[],
        )
        .await
        .map_err(io_failure)?;
        Ok(Reuse::KeepAlive)
    }
}

fn write_failed(e: io::Error) -> Failure {
    tracing::error!(error = %e, "writing LFS staging file");
    fail(507, "cannot store the object")
}

async fn sync(file: &monoio::fs::File) -> Result<(), Failure> {
    file.sync_all().await.map_err(|e| {
        tracing::error!(error = %e, "fsync of LFS staging file");
        fail(507, "cannot store the object")
    })
}

fn verify_digest(oid: &str, digest: [u8; 32]) -> Result<(), Failure> {
    if hex::encode(digest) == oid {
        return Ok(());
    }
    METRICS.lfs.verify_failures.inc();
    Err(fail(422, "content does not match the object id (SHA-256)"))
}

impl From<S3Error> for Failure {
    fn from(e: S3Error) -> Self {
        tracing::error!(error = %e, "S3 request failed");
        fail(502, "object storage failed")
    }
}

/// Waits, holding no buffer, until the uploader has sent more body bytes (those that arrived
/// with the head wait in the connection's buffer already).
async fn body_waiting(conn: &mut Conn) -> Result<(), Failure> {
    if !conn.buffered().is_empty() {
        return Ok(());
    }
    conn.body_ready().await.map_err(body_failure)
}

/// A stalled body is 408; a broken connection has no one left to answer.
fn body_failure(e: BodyReadError) -> Failure {
    match e {
        BodyReadError::Stalled(stall) => fail(408, format!("request body stalled: {stall}")),
        BodyReadError::Io(e) => io_failure(e),
    }
}

fn io_failure(e: io::Error) -> Failure {
    tracing::debug!(error = %e, "LFS connection failed");
    fail(499, "connection failed")
}

async fn respond_json<T: Serialize>(
    conn: &mut Conn,
    status: u16,
    body: &T,
    extra: &[(&str, &str)],
) -> io::Result<()> {
    let json = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    let mut headers = Vec::with_capacity(extra.len() + 1);
    headers.push(("Content-Type", CONTENT_TYPE));
    headers.extend_from_slice(extra);
    conn.respond(status, &headers, &json).await
}

/// Reads a bounded JSON request body.
async fn read_json<T: DeserializeOwned>(head: &RequestHead, conn: &mut Conn) -> Result<T, Failure> {
    if let BodyFraming::Length(n) = head.framing {
        if n > MAX_JSON_BODY {
            conn.close_after_response();
            return Err(fail(413, "request body too large"));
        }
    }
    let mut reader = BodyReader::new(head, MAX_JSON_BODY);
    let mut body = Vec::new();
    loop {
        let more = reader.read(conn, &mut body).await.map_err(|e| {
            conn.close_after_response();
            fail(e.status(), e.to_string())
        })?;
        if body.len() as u64 > MAX_JSON_BODY {
            conn.close_after_response();
            return Err(fail(413, "request body too large"));
        }
        if !more {
            break;
        }
    }
    serde_json::from_slice(&body).map_err(|e| fail(422, format!("invalid JSON: {e}")))
}

#[cfg(test)]
mod tests {
    use super::parse_range;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-99", 1000), Some((0, 99)));
        assert_eq!(parse_range("bytes=900-", 1000), Some((900, 999)));
        assert_eq!(parse_range("bytes=-100", 1000), Some((900, 999)));
        assert_eq!(parse_range("bytes=990-2000", 1000), Some((990, 999)));
        assert_eq!(parse_range("bytes=1000-", 1000), None);
        assert_eq!(parse_range("bytes=5-1", 1000), None);
        assert_eq!(parse_range("bytes=0-1,5-6", 1000), None);
        assert_eq!(parse_range("items=0-1", 1000), None);
        assert_eq!(parse_range("bytes=0-0", 0), None);
    }
}
