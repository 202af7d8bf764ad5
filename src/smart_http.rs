//! Git smart HTTP (protocol v0, v1 and v2) on the shard's HTTP server, plus `/healthz` and
//! `/metrics`.
//!
//! - `GET  /OWNER/NAME[.git]/info/refs?service=git-upload-pack|git-receive-pack`
//! - `POST /OWNER/NAME[.git]/git-upload-pack` and `.../git-receive-pack`
//!
//! Each request authenticates (HTTP Basic, or anonymous for public reads), resolves the repository
//! under the data dir, takes a pack slot, spawns git, streams the request body into git's stdin
//! and git's stdout to the socket with splice. Dumb HTTP is refused.

use std::cell::RefCell;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::auth::{decide, parse_basic, BasicCredentials, CredentialCache, Decision};
use crate::config::ServeConfig;
use crate::git::limiter::{PackLimiter, PackPermit};
use crate::git::process::{sanitize_git_protocol, GitCommand, Mode, Service};
use crate::git::repo::RepoRoot;
use crate::git::repo_name::RepoName;
use crate::git::stream::{Framing, RunningGit, StreamError};
use crate::http::body::BodyReader;
use crate::http::conn::Conn;
use crate::http::head::{Method, RequestHead};
use crate::http::response::{encode_head, BodyLength, NO_CACHE};
use crate::http::server::{Handler, Reuse};
use crate::lifecycle::ShutdownSignal;
use crate::metrics::{Route, METRICS};
use crate::store::{Access, RepoAccess, Store, StoreError};

/// Largest inflated gzip request body (git gzips upload-pack negotiation requests; git's own
/// http-backend caps them at 10 MB by default).
const MAX_INFLATED_REQUEST: u64 = 64 << 20;
const WWW_AUTHENTICATE: (&str, &str) = (
    "WWW-Authenticate",
    "Basic realm=\"gitplane\", charset=\"UTF-8\"",
);
/// How long a verified password is trusted without re-hashing it.
const CREDENTIAL_TTL: Duration = Duration::from_secs(60);

/// State shared by all shards.
pub struct AppState {
    pub config: Arc<ServeConfig>,
    pub repos: RepoRoot,
    pub limiter: Arc<PackLimiter>,
}

impl AppState {
    pub fn new(config: Arc<ServeConfig>) -> Self {
        let g = &config.git;
        Self {
            repos: RepoRoot::new(&config.data_dir),
            limiter: PackLimiter::new(g.max_concurrent, g.max_concurrent_per_repo, g.max_queued),
            config,
        }
    }
}

/// What a request path asks for.
#[derive(Debug, PartialEq, Eq)]
enum Target<'a> {
    Health,
    Metrics,
    InfoRefs(&'a str),
    Rpc(&'a str, Service),
    /// A dumb-HTTP path inside a repository (objects/, HEAD, ...).
    Dumb,
    Unknown,
}

fn classify(path: &str) -> Target<'_> {
    match path {
        "/healthz" => return Target::Health,
        "/metrics" => return Target::Metrics,
        _ => {}
    }
    let Some(rest) = path.strip_prefix('/') else {
        return Target::Unknown;
    };
    if let Some(repo) = rest.strip_suffix("/info/refs") {
        return Target::InfoRefs(repo);
    }
    for service in [Service::UploadPack, Service::ReceivePack] {
        if let Some(repo) = rest
            .strip_suffix(service.wire_name())
            .and_then(|r| r.strip_suffix('/'))
        {
            return Target::Rpc(repo, service);
        }
    }
    const DUMB: [&str; 4] = ["/HEAD", "/objects/", "/info/packs", "/info/alternates"];
    if DUMB.iter().any(|d| rest.contains(d)) {
        return Target::Dumb;
    }
    Target::Unknown
}

fn query_param<'a>(query: Option<&'a str>, key: &str) -> Option<&'a str> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find_map(|(k, v)| (k == key).then_some(v))
}

/// Runs a store call on the blocking pool, with one connection per pool thread.
async fn with_store<R: Send + 'static>(
    data_dir: PathBuf,
    f: impl FnOnce(&Store) -> Result<R, StoreError> + Send + 'static,
) -> Result<R, StoreError> {
    thread_local! {
        static STORE: RefCell<Option<Store>> = const { RefCell::new(None) };
    }
    let job = move || {
        STORE.with(|cell| {
            let mut slot = cell.borrow_mut();
            if slot.is_none() {
                *slot = Some(Store::open(&data_dir)?);
            }
            match slot.as_ref() {
                Some(store) => f(store),
                None => Err(StoreError::NoSuchRepo(String::new())),
            }
        })
    };
    match monoio::spawn_blocking(job).await {
        Ok(r) => r,
        Err(_) => Err(StoreError::Hash("blocking pool task failed".into())),
    }
}

/// Who the client is and what it may do to the repository.
struct Authorized {
    user: Option<String>,
}

/// One shard's request handler.
pub struct SmartHttp {
    state: Arc<AppState>,
    credentials: RefCell<CredentialCache>,
    shutdown: std::rc::Rc<ShutdownSignal>,
}

impl SmartHttp {
    pub fn new(state: Arc<AppState>, shutdown: std::rc::Rc<ShutdownSignal>) -> Self {
        Self {
            state,
            credentials: RefCell::new(CredentialCache::new(CREDENTIAL_TTL, 10_000)),
            shutdown,
        }
    }

    /// Authenticates and authorises; on refusal the response has been sent and Err carries
    /// the connection's fate.
    async fn authorize(
        &self,
        head: &RequestHead,
        conn: &mut Conn,
        repo: &RepoName,
        need: Access,
    ) -> io::Result<Result<Authorized, Reuse>> {
        let creds: Option<BasicCredentials> = match head.authorization.as_deref().map(parse_basic) {
            None => None,
            Some(Ok(c)) => Some(c),
            Some(Err(e)) => {
                conn.respond_text(401, &[WWW_AUTHENTICATE], &format!("{e}\n"))
                    .await?;
                return Ok(Err(Reuse::KeepAlive));
            }
        };
        let cached = creds
            .as_ref()
            .is_some_and(|c| self.credentials.borrow().is_verified(c, Instant::now()));
        let lookup_repo = repo.clone();
        let lookup_creds = creds.clone();
        let result = with_store(self.state.config.data_dir.clone(), move |store| {
            let verified = match &lookup_creds {
                Some(c) if !cached => store.verify_password(&c.user, &c.password)?,
                _ => true,
            };
            let user = lookup_creds
                .as_ref()
                .filter(|_| verified)
                .map(|c| c.user.as_str());
            let access: Option<RepoAccess> = store.repo_access(&lookup_repo, user)?;
            Ok((verified, access))
        })
        .await;
        let (verified, access) = match result {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "store lookup failed");
                conn.respond_text(500, &[], "internal error\n").await?;
                return Ok(Err(Reuse::Close));
            }
        };
        if let Some(c) = creds.as_ref() {
            if !verified {
                conn.respond_text(401, &[WWW_AUTHENTICATE], "invalid credentials\n")
                    .await?;
                return Ok(Err(Reuse::KeepAlive));
            }
            if !cached {
                self.credentials.borrow_mut().remember(c, Instant::now());
            }
        }
        match decide(access, creds.is_some(), need) {
            Decision::Allow => Ok(Ok(Authorized {
                user: creds.map(|c| c.user),
            })),
            Decision::Unauthorized => {
                conn.respond_text(401, &[WWW_AUTHENTICATE], "authentication required\n")
                    .await?;
                Ok(Err(Reuse::KeepAlive))
            }
            Decision::Forbidden => {
                conn.respond_text(
                    403,
                    &[],
                    &format!(
                        "you may not {} {repo}\n",
                        if need >= Access::Write {
                            "push to"
                        } else {
                            "read"
                        }
                    ),
                )
                .await?;
                Ok(Err(Reuse::KeepAlive))
            }
            Decision::NotFound => {
                conn.respond_text(404, &[], &format!("repository {repo} not found\n"))
                    .await?;
                Ok(Err(Reuse::KeepAlive))
            }
        }
    }

    /// Waits for a pack slot, bounded in queue length and time.
    async fn pack_slot(&self, repo: &str) -> Option<PackPermit> {
        let limiter = &self.state.limiter;
        if let Some(p) = limiter.try_acquire(repo) {
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
            if let Some(p) = limiter.try_acquire(repo) {
                return Some(p);
            }
            if Instant::now() >= deadline {
                METRICS.pack_queue_rejected.inc();
                return None;
            }
            delay = (delay * 2).min(Duration::from_millis(20));
        }
    }

    fn spawn_git(
        &self,
        head: &RequestHead,
        conn: &Conn,
        repo: &RepoName,
        service: Service,
        mode: Mode,
        who: &Authorized,
    ) -> Result<RunningGit, String> {
        let dir = self.state.repos.path_of(repo);
        let peer = conn.peer.ip().to_string();
        let repo_text = repo.to_string();
        let env = [
            ("GITPLANE_REPO", repo_text.as_str()),
            ("GITPLANE_USER", who.user.as_deref().unwrap_or("")),
            ("GITPLANE_REMOTE_ADDR", peer.as_str()),
        ];
        let cmd = GitCommand {
            git: &self.state.config.git.binary,
            service,
            repo_dir: &dir,
            mode,
            protocol: head.git_protocol.as_deref().and_then(sanitize_git_protocol),
            env: &env,
        };
        let spawned = cmd.spawn().map_err(|e| e.to_string())?;
        METRICS.git_spawned.inc();
        RunningGit::start(spawned).map_err(|e| format!("cannot drive git child: {e}"))
    }

    async fn info_refs(
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
        let who = match self.authorize(head, conn, &repo, need).await? {
            Ok(w) => w,
            Err(reuse) => return Ok(reuse),
        };
        let mut git = match self.spawn_git(head, conn, &repo, service, Mode::AdvertiseRefs, &who) {
            Ok(g) => g,
            Err(e) => return self.internal_error(conn, &e).await,
        };
        let content_type = format!("application/x-{}-advertisement", service.wire_name());
        let v2 = head
            .git_protocol
            .as_deref()
            .is_some_and(|p| p.contains("version=2"));
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

    async fn rpc(
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
        let who = match self.authorize(head, conn, &repo, need).await? {
            Ok(w) => w,
            Err(reuse) => return Ok(reuse),
        };
        let Some(_permit) = self.pack_slot(&repo.to_string()).await else {
            conn.respond_text(
                503,
                &[("Retry-After", "5")],
                "server busy: too many pack operations, retry later\n",
            )
            .await?;
            return Ok(Reuse::Close);
        };
        let mut git = match self.spawn_git(head, conn, &repo, service, Mode::StatelessRpc, &who) {
            Ok(g) => g,
            Err(e) => return self.internal_error(conn, &e).await,
        };
        if head.expect_continue {
            let (res, _) = conn
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n".to_vec())
                .await;
            res?;
        }
        // Request body → git's stdin, streamed.
        let mut reader = BodyReader::new(head, MAX_INFLATED_REQUEST);
        let mut buf = Vec::with_capacity(64 * 1024);
        loop {
            buf.clear();
            let more = match reader.read(conn, &mut buf).await {
                Ok(more) => more,
                Err(e) => {
                    tracing::debug!(%repo, error = %e, "bad request body");
                    drop(git);
                    conn.close_after_response();
                    let _ = conn.respond_text(e.status(), &[], &format!("{e}\n")).await;
                    return Ok(Reuse::Close);
                }
            };
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
        }
        git.close_stdin().await;
        let content_type = format!("application/x-{}-result", service.wire_name());
        self.stream_response(conn, head, &content_type, &[], &mut git)
            .await?;
        let exit = git.wait().await;
        log_exit(&repo, service, &exit);
        Ok(Reuse::KeepAlive)
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
        let mut headers = Vec::with_capacity(1 + NO_CACHE.len());
        headers.push(("Content-Type", content_type));
        headers.extend_from_slice(&NO_CACHE);
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
        match git.splice_stdout(conn.stream(), framing).await {
            Ok(_) => Ok(()),
            // Either way the response is cut mid-body: the connection must end.
            Err(StreamError::ClientGone(e) | StreamError::Child(e)) => Err(e),
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

fn log_exit(repo: &RepoName, service: Service, exit: &crate::git::stream::ExitInfo) {
    if exit.code != 0 {
        tracing::warn!(%repo, service = service.wire_name(), code = exit.code, stderr = %exit.stderr.trim(), "git exited with an error");
    } else if !exit.stderr.is_empty() {
        tracing::debug!(%repo, service = service.wire_name(), stderr = %exit.stderr.trim(), "git stderr");
    }
}

impl Handler for SmartHttp {
    async fn handle(&self, head: RequestHead, conn: &mut Conn) -> io::Result<Reuse> {
        match (head.method, classify(&head.path)) {
            (Method::Get | Method::Head, Target::Health) => {
                METRICS.request(Route::Health);
                if self.shutdown.is_triggered() {
                    conn.respond_text(503, &[], "shutting down\n").await?;
                } else {
                    conn.respond_text(200, &[], "ok\n").await?;
                }
                Ok(Reuse::KeepAlive)
            }
            (Method::Get, Target::Metrics) => {
                METRICS.request(Route::Metrics);
                let text = METRICS.render();
                conn.respond(
                    200,
                    &[("Content-Type", "text/plain; version=0.0.4")],
                    text.as_bytes(),
                )
                .await?;
                Ok(Reuse::KeepAlive)
            }
            (Method::Get, Target::InfoRefs(repo)) => self.info_refs(&head, conn, repo).await,
            (Method::Post, Target::Rpc(repo, service)) => {
                self.rpc(&head, conn, repo, service).await
            }
            (_, Target::InfoRefs(_)) => method_not_allowed(conn, "GET").await,
            (_, Target::Rpc(..)) => method_not_allowed(conn, "POST").await,
            (_, Target::Dumb) => {
                METRICS.request(Route::Other);
                conn.respond_text(404, &[], "dumb HTTP protocol is not supported; use a git client that speaks smart HTTP\n").await?;
                Ok(Reuse::KeepAlive)
            }
            _ => {
                METRICS.request(Route::Other);
                conn.respond_text(404, &[], "not found\n").await?;
                Ok(Reuse::KeepAlive)
            }
        }
    }
}

async fn method_not_allowed(conn: &mut Conn, allow: &str) -> io::Result<Reuse> {
    METRICS.request(Route::Other);
    conn.close_after_response();
    conn.respond_text(405, &[("Allow", allow)], "method not allowed\n")
        .await?;
    Ok(Reuse::Close)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_paths() {
        assert_eq!(classify("/healthz"), Target::Health);
        assert_eq!(classify("/a/b.git/info/refs"), Target::InfoRefs("a/b.git"));
        assert_eq!(
            classify("/a/b/git-upload-pack"),
            Target::Rpc("a/b", Service::UploadPack)
        );
        assert_eq!(
            classify("/a/b.git/git-receive-pack"),
            Target::Rpc("a/b.git", Service::ReceivePack)
        );
        assert_eq!(classify("/a/b.git/objects/12/3456"), Target::Dumb);
        assert_eq!(classify("/a/b.git/HEAD"), Target::Dumb);
        assert_eq!(classify("/"), Target::Unknown);
        assert_eq!(classify("/git-upload-pack"), Target::Unknown);
    }

    #[test]
    fn query_params() {
        assert_eq!(
            query_param(Some("service=git-upload-pack"), "service"),
            Some("git-upload-pack")
        );
        assert_eq!(query_param(Some("a=1&service=x"), "service"), Some("x"));
        assert_eq!(query_param(Some("services=x"), "service"), None);
        assert_eq!(query_param(None, "service"), None);
    }
}
