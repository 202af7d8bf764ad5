//! Git smart HTTP (protocol v0, v1 and v2) on the shard's HTTP server.
//!
//! - `GET  /OWNER/NAME[.git]/info/refs?service=git-upload-pack|git-receive-pack`
//! - `POST /OWNER/NAME[.git]/git-upload-pack` and `.../git-receive-pack`
//!
//! Each request authenticates ([`crate::access`]: HTTP Basic, or anonymous for public reads),
//! resolves the repository under the data dir, reads the request body ahead (all of a fetch
//! negotiation, the first bytes of a push) so that a client that stalls never holds a pack slot,
//! takes a pack slot, spawns git, streams the rest of the body into git's stdin and git's stdout
//! to the socket with splice. Bodies and responses run under progress deadlines
//! ([`crate::progress`]); anonymous requests get their own smaller share of pack slots, per client
//! address too. Dumb HTTP is refused.

use std::io;
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::access::{HttpAuth, Principal, Refusal};
use crate::admission::{AddressLimiter, AddressSlot};
use crate::config::ServeConfig;
use crate::git::limiter::{PackLimiter, PackPermit, Requester};
use crate::git::process::{sanitize_git_protocol, GitCommand, Mode, Service};
use crate::git::repo::RepoRoot;
use crate::git::repo_name::RepoName;
use crate::git::stream::{Framing, RunningGit, StreamError};
use crate::git::v2;
use crate::http::body::{BodyError, BodyReader};
use crate::http::conn::Conn;
use crate::http::forwarded::client_addr;
use crate::http::head::RequestHead;
use crate::http::query_param;
use crate::http::response::{encode_head, BodyLength, NO_CACHE};
use crate::http::server::Reuse;
use crate::metrics::{Cut, Route, METRICS};
use crate::store::Access;

/// Largest inflated gzip request body (git gzips upload-pack negotiation requests; git's own
/// http-backend caps them at 10 MB by default).
const MAX_INFLATED_REQUEST: u64 = 64 << 20;
/// A fetch negotiation up to this size is read whole before a pack slot is taken (they are a few
/// KiB; one with many `have`s can reach hundreds). A larger one has shown it keeps sending and
/// streams the rest under the body deadline.
const READ_AHEAD_LIMIT: usize = 1 << 20;
pub const WWW_AUTHENTICATE: (&str, &str) = (
    "WWW-Authenticate",
    "Basic realm=\"gitplane\", charset=\"UTF-8\"",
);

/// State shared by all shards.
pub struct AppState {
    pub config: Arc<ServeConfig>,
    pub repos: RepoRoot,
    pub limiter: Arc<PackLimiter>,
    /// Anonymous pack requests, running or waiting, node-wide and per client address.
    anonymous: Arc<AddressLimiter>,
    /// What git advertises under protocol v2, captured at start-up; None if that failed, and
    /// then every advertisement spawns git.
    v2_advertisement: Option<Arc<[u8]>>,
}

impl AppState {
    pub fn new(config: Arc<ServeConfig>, v2_advertisement: Option<Arc<[u8]>>) -> Self {
        let g = &config.git;
        Self {
            v2_advertisement,
            repos: RepoRoot::new(&config.data_dir),
            limiter: PackLimiter::new(
                g.max_concurrent,
                g.max_concurrent_per_repo,
                g.max_queued,
                g.anonymous_max_concurrent,
            ),
            // Anonymous requests may hold their slots and half of the wait queue, no more.
            anonymous: AddressLimiter::new(
                g.anonymous_max_concurrent + g.max_queued / 2,
                g.anonymous_max_per_ip,
            ),
            config,
        }
    }
}

/// One shard's Git smart-HTTP handler.
pub struct SmartHttp {
    state: Arc<AppState>,
    auth: Rc<HttpAuth>,
}

/// Answers a refused request as git expects: text, with a Basic challenge on 401.
pub async fn respond_refusal(conn: &mut Conn, refusal: &Refusal) -> io::Result<Reuse> {
    let extra: &[(&str, &str)] = match refusal.status() {
        401 => &[WWW_AUTHENTICATE],
        // The store is unreachable: git retries nothing by itself, but scripts and balancers do.
        503 => &[("Retry-After", "2")],
        _ => &[],
    };
    conn.respond_text(refusal.status(), extra, &format!("{}\n", refusal.message()))
        .await?;
    Ok(if refusal.status() >= 500 {
        Reuse::Close
    } else {
        Reuse::KeepAlive
    })
}

impl SmartHttp {
    pub fn new(state: Arc<AppState>, auth: Rc<HttpAuth>) -> Self {
        Self { state, auth }
    }

    /// Waits for a pack slot, bounded in queue length and time.
    async fn pack_slot(&self, repo: &str, requester: Requester) -> Option<PackPermit> {
        let limiter = &self.state.limiter;
        if let Some(p) = limiter.try_acquire(repo, requester) {
            return Some(p);
        }
        let Some(_ticket) = limiter.enqueue() else {
            METRICS.pack_queue_rejected.inc();
            return None;
        };
        METRICS.pack_queue_waits.inc();
        let deadline = Instant::now() + self.state.config.git.queue_timeout;
        let mut delay = Duration::from_millis(1);
        loop {
            monoio::time::sleep(delay).await;
            if let Some(p) = limiter.try_acquire(repo, requester) {
                return Some(p);
            }
            if Instant::now() >= deadline {
                METRICS.pack_queue_rejected.inc();
                return None;
            }
            delay = (delay * 2).min(Duration::from_millis(20));
        }
    }

    /// The client's address: the peer, or what a trusted proxy says.
    fn client_ip(&self, head: &RequestHead, conn: &Conn) -> IpAddr {
        client_addr(
            conn.peer.ip(),
            head.x_forwarded_for.as_deref(),
            &self.state.config.http.trusted_proxies,
        )
    }

    /// An anonymous request's place in the anonymous share; None (already counted) when its
    /// address has used up its share.
    fn admit_anonymous(&self, head: &RequestHead, conn: &Conn) -> Option<AddressSlot> {
        match self.state.anonymous.try_admit(self.client_ip(head, conn)) {
            Ok(slot) => Some(slot),
            Err(refusal) => {
                METRICS.cut(Cut::AnonymousShare);
                tracing::debug!(peer = %conn.peer, %refusal, "anonymous pack request refused");
                None
            }
        }
    }

    fn spawn_git(
        &self,
        head: &RequestHead,
        conn: &Conn,
        repo: &RepoName,
        service: Service,
        mode: Mode,
        who: &Principal,
    ) -> Result<RunningGit, String> {
        let dir = self.state.repos.path_of(repo);
        let client = self.client_ip(head, conn).to_string();
        let repo_text = repo.to_string();
        let env = [
            ("GITPLANE_REPO", repo_text.as_str()),
            ("GITPLANE_USER", who.user.as_deref().unwrap_or("")),
            ("GITPLANE_REMOTE_ADDR", client.as_str()),
        ];
        let cmd = GitCommand {
            git: &self.state.config.git.binary,
            service,
            repo_dir: &dir,
            mode,
            protocol: head.git_protocol.as_deref().and_then(sanitize_git_protocol),
            env: &env,
            remote: who.remote.as_ref(),
        };
        let spawned = cmd.spawn().map_err(|e| e.to_string())?;
        METRICS.git_spawned.inc();
        RunningGit::start(spawned).map_err(|e| format!("cannot drive git child: {e}"))
    }

    pub async fn info_refs(
        &self,
        head: &RequestHead,
        conn: &mut Conn,
        repo: &str,
    ) -> io::Result<Reuse> {
        METRICS.request(Route::InfoRefs);
        let service = match query_param(head.query.as_deref(), "service").map(Service::from_wire) {
            Some(Some(s @ (Service::UploadPack | Service::ReceivePack))) => s,
            Some(_) => {
                conn.respond_text(403, &[], "unsupported service\n").await?;
                return Ok(Reuse::KeepAlive);
            }
            None => {
                conn.respond_text(
                    403,
                    &[],
                    "dumb HTTP protocol is not supported; use a git client that speaks smart HTTP\n",
                )
                .await?;
                return Ok(Reuse::KeepAlive);
            }
        };
        let Some(repo) = self.parse_repo(conn, repo).await? else {
            return Ok(Reuse::KeepAlive);
        };
        let need = if service.writes() {
            Access::Write
        } else {
            Access::Read
        };
        let who = match self
            .auth
            .authorize(head.authorization.as_deref(), &repo, need, false)
            .await
        {
            Ok(w) => w,
            Err(refusal) => return respond_refusal(conn, &refusal).await,
        };
        let content_type = format!("application/x-{}-advertisement", service.wire_name());
        let v2 = speaks_v2(head);
        if v2 && service == Service::UploadPack && who.remote.is_none() {
            if let Some(advertisement) = &self.state.v2_advertisement {
                let config = monoio::fs::read(self.state.repos.path_of(&repo).join("config")).await;
                if config.is_ok_and(|c| !v2::config_needs_git(&c)) {
                    METRICS.v2_advertisements_served.inc();
                    conn.respond(200, &git_headers(&content_type), advertisement)
                        .await?;
                    return Ok(Reuse::KeepAlive);
                }
            }
        }
        let mut git = match self.spawn_git(head, conn, &repo, service, Mode::AdvertiseRefs, &who) {
            Ok(g) => g,
            Err(e) => return self.internal_error(conn, &e).await,
        };
        let mut prefix = Vec::new();
        if !v2 {
            // Smart HTTP v0/v1 starts with a service announcement that git itself does not print.
            let mut pkt = Vec::with_capacity(64);
            let _ = crate::git::pktline::encode_str(
                &mut pkt,
                &format!("# service={}\n", service.wire_name()),
            );
            pkt.extend_from_slice(crate::git::pktline::FLUSH);
            prefix = pkt;
        }
        self.stream_response(conn, head, &content_type, &prefix, &mut git)
            .await?;
        let exit = git.wait().await;
        log_exit(&repo, service, &exit);
        Ok(Reuse::KeepAlive)
    }

    pub async fn rpc(
        &self,
        head: &RequestHead,
        conn: &mut Conn,
        repo: &str,
        service: Service,
    ) -> io::Result<Reuse> {
        METRICS.request(if service.writes() {
            Route::ReceivePack
        } else {
            Route::UploadPack
        });
        let expected = format!("application/x-{}-request", service.wire_name());
        if head.content_type.as_deref() != Some(expected.as_str()) {
            conn.close_after_response();
            conn.respond_text(415, &[], &format!("expected Content-Type: {expected}\n"))
                .await?;
            return Ok(Reuse::Close);
        }
        let Some(repo) = self.parse_repo(conn, repo).await? else {
            return Ok(Reuse::Close);
        };
        let need = if service.writes() {
            Access::Write
        } else {
            Access::Read
        };
        let who = match self
            .auth
            .authorize(head.authorization.as_deref(), &repo, need, false)
            .await
        {
            Ok(w) => w,
            Err(refusal) => return respond_refusal(conn, &refusal).await,
        };
        if head.expect_continue {
            conn.send_continue().await?;
        }
        // Nothing scarce is held while the body is read ahead: a client that stalls here holds
        // only its connection, and the body deadline cuts it.
        let mut reader = BodyReader::new(head, MAX_INFLATED_REQUEST);
        let mut buf = Vec::with_capacity(64 * 1024);
        let mut more = match read_ahead(&mut reader, conn, &mut buf, service).await {
            Ok(more) => more,
            Err(e) => return body_failed(conn, &repo, e).await,
        };
        if !more && service == Service::UploadPack && speaks_v2(head) && who.remote.is_none() {
            buf = match self.ls_refs(conn, &repo, buf).await? {
                LsRefs::Answered(reuse) => return Ok(reuse),
                LsRefs::ToGit(b) => b,
            };
        }
        let requester = if who.user.is_some() {
            Requester::Authenticated
        } else {
            Requester::Anonymous
        };
        let _anonymous_share = match requester {
            Requester::Anonymous => match self.admit_anonymous(head, conn) {
                Some(slot) => Some(slot),
                None => {
                    return server_busy(conn, "too many anonymous pack requests from your address")
                        .await
                }
            },
            Requester::Authenticated => None,
        };
        let Some(_permit) = self.pack_slot(&repo.to_string(), requester).await else {
            return server_busy(conn, "too many pack operations").await;
        };
        let mut git = match self.spawn_git(head, conn, &repo, service, Mode::StatelessRpc, &who) {
            Ok(g) => g,
            Err(e) => return self.internal_error(conn, &e).await,
        };
        // Request body → git's stdin, streamed.
        loop {
            if !buf.is_empty() {
                let (res, b) = git.write_stdin(buf).await;
                buf = b;
                if res.is_err() {
                    // git stopped reading (it failed); its output says why. The unread rest
                    // of the body means this connection cannot be reused.
                    conn.close_after_response();
                    break;
                }
            }
            if !more {
                break;
            }
            buf.clear();
            more = match reader.read(conn, &mut buf).await {
                Ok(more) => more,
                Err(e) => {
                    drop(git);
                    return body_failed(conn, &repo, e).await;
                }
            };
        }
        git.close_stdin().await;
        let content_type = format!("application/x-{}-result", service.wire_name());
        self.stream_response(conn, head, &content_type, &[], &mut git)
            .await?;
        let exit = git.wait().await;
        log_exit(&repo, service, &exit);
        Ok(Reuse::KeepAlive)
    }

    /// Answers a v2 `ls-refs` request from the refs on disk ([`v2::answer`]), on the blocking
    /// pool. Anything else, or anything that module leaves to git, is handed back for git.
    async fn ls_refs(&self, conn: &mut Conn, repo: &RepoName, body: Vec<u8>) -> io::Result<LsRefs> {
        // Clients send the command first; a fetch never pays for the hop to the pool.
        if !body.starts_with(v2::LS_REFS_COMMAND) {
            return Ok(LsRefs::ToGit(body));
        }
        let dir = self.state.repos.path_of(repo);
        let job = monoio::spawn_blocking(move || {
            let answer = v2::answer_body(&dir, &body);
            (body, answer)
        });
        let Ok((body, answer)) = job.await else {
            return self
                .internal_error(conn, "ls-refs task panicked")
                .await
                .map(LsRefs::Answered);
        };
        match answer {
            Ok(refs) => {
                METRICS.v2_ls_refs_answered.inc();
                let headers = git_headers("application/x-git-upload-pack-result");
                conn.respond(200, &headers, &refs).await?;
                Ok(LsRefs::Answered(Reuse::KeepAlive))
            }
            Err(why) => {
                tracing::debug!(%repo, %why, "ls-refs goes to git");
                Ok(LsRefs::ToGit(body))
            }
        }
    }

    /// Sends a 200 head, an optional user-space prefix, then git's stdout by splice.
    async fn stream_response(
        &self,
        conn: &mut Conn,
        head: &RequestHead,
        content_type: &str,
        prefix: &[u8],
        git: &mut RunningGit,
    ) -> io::Result<()> {
        let (framing, length) = if head.http10 {
            conn.close_after_response();
            (Framing::Raw, BodyLength::UntilClose)
        } else {
            (Framing::Chunked, BodyLength::Chunked)
        };
        let headers = git_headers(content_type);
        let mut out = Vec::with_capacity(512 + prefix.len());
        encode_head(&mut out, 200, &headers, length, conn.reusable());
        if !prefix.is_empty() {
            if framing == Framing::Chunked {
                out.extend_from_slice(format!("{:x}\r\n", prefix.len()).as_bytes());
                out.extend_from_slice(prefix);
                out.extend_from_slice(b"\r\n");
            } else {
                out.extend_from_slice(prefix);
            }
        }
        METRICS.response(200);
        conn.write_all(out).await.0?;
        let send = conn.send_rules();
        match git.splice_stdout(conn.stream(), framing, send).await {
            Ok(_) => Ok(()),
            // Either way the response is cut mid-body: the connection must end.
            Err(StreamError::ClientGone(e) | StreamError::Child(e)) => Err(e),
            Err(StreamError::Stalled(stall)) => {
                METRICS.cut(Cut::HttpSendIdle);
                Err(io::Error::new(io::ErrorKind::TimedOut, stall.to_string()))
            }
        }
    }

    async fn parse_repo(&self, conn: &mut Conn, text: &str) -> io::Result<Option<RepoName>> {
        match RepoName::parse(text) {
            Ok(r) => Ok(Some(r)),
            Err(e) => {
                conn.respond_text(400, &[], &format!("invalid repository name: {e}\n"))
                    .await?;
                Ok(None)
            }
        }
    }

    async fn internal_error(&self, conn: &mut Conn, what: &str) -> io::Result<Reuse> {
        tracing::error!(error = %what, "request failed");
        conn.close_after_response();
        conn.respond_text(500, &[], "internal error\n").await?;
        Ok(Reuse::Close)
    }
}

/// What became of an `ls-refs` request.
enum LsRefs {
    Answered(Reuse),
    /// git answers: the request body, untouched.
    ToGit(Vec<u8>),
}

/// The headers of every git response: its type, and never cached.
fn git_headers(content_type: &str) -> Vec<(&str, &str)> {
    let mut headers = Vec::with_capacity(1 + NO_CACHE.len());
    headers.push(("Content-Type", content_type));
    headers.extend_from_slice(&NO_CACHE);
    headers
}

/// Whether the client asked for protocol v2 (`Git-Protocol: version=2`).
fn speaks_v2(head: &RequestHead) -> bool {
    head.git_protocol
        .as_deref()
        .is_some_and(|p| p.contains("version=2"))
}

/// Reads the request body before a pack slot is taken: all of a fetch negotiation (up to
/// [`READ_AHEAD_LIMIT`]), or the first bytes of a push, so a client that never sends its body
/// holds no slot. Returns whether more body follows what is in `buf`.
async fn read_ahead(
    reader: &mut BodyReader,
    conn: &mut Conn,
    buf: &mut Vec<u8>,
    service: Service,
) -> Result<bool, BodyError> {
    loop {
        let more = reader.read(conn, buf).await?;
        let enough = match service {
            Service::ReceivePack => !buf.is_empty(),
            _ => buf.len() >= READ_AHEAD_LIMIT,
        };
        if !more || enough {
            return Ok(more);
        }
    }
}

/// Answers a request body that could not be read (stalled: 408, malformed: 400, too large: 413)
/// and ends the connection.
async fn body_failed(conn: &mut Conn, repo: &RepoName, e: BodyError) -> io::Result<Reuse> {
    tracing::debug!(%repo, peer = %conn.peer, error = %e, "request body failed");
    conn.close_after_response();
    let _ = conn.respond_text(e.status(), &[], &format!("{e}\n")).await;
    Ok(Reuse::Close)
}

async fn server_busy(conn: &mut Conn, why: &str) -> io::Result<Reuse> {
    conn.close_after_response();
    conn.respond_text(
        503,
        &[("Retry-After", "5")],
        &format!("server busy: {why}, retry later\n"),
    )
    .await?;
    Ok(Reuse::Close)
}

fn log_exit(repo: &RepoName, service: Service, exit: &crate::git::stream::ExitInfo) {
    if exit.code != 0 {
        tracing::warn!(%repo, service = service.wire_name(), code = exit.code, stderr = %exit.stderr.trim(), "git exited with an error");
    } else if !exit.stderr.is_empty() {
        tracing::debug!(%repo, service = service.wire_name(), stderr = %exit.stderr.trim(), "git stderr");
    }
}
