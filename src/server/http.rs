//! The HTTP front end on the shards: routes each request to Git smart HTTP, Git LFS,
//! `/healthz` or `/metrics`.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;

use crate::access::HttpAuth;
use crate::admission::AddressLimiter;
use crate::git::process::Service;
use crate::http::conn::Conn;
use crate::http::head::{Method, RequestHead};
use crate::http::server::{serve_connection, Handler, Reuse};
use crate::lfs::http::{anonymous_share, LfsHttp};
use crate::lifecycle::ShutdownSignal;
use crate::metrics::{Route, METRICS};
use crate::runtime::shard::{accept_loop, AcceptOptions, ListenerSet, ShardContext, ShardService};
use crate::smart_http::{AppState, SmartHttp};
use crate::token::TokenSecret;

/// What a request path asks for.
#[derive(Debug, PartialEq, Eq)]
enum Target<'a> {
    Health,
    /// SSH over WebSocket.
    Ssh,
    Metrics,
    InfoRefs(&'a str),
    Rpc(&'a str, Service),
    /// (repository, path below `info/lfs/`)
    Lfs(&'a str, &'a str),
    /// A dumb-HTTP path inside a repository (objects/, HEAD, ...).
    Dumb,
    Unknown,
}

fn classify(path: &str) -> Target<'_> {
    match path {
        "/healthz" => return Target::Health,
        "/metrics" => return Target::Metrics,
        crate::ssh::websocket::PATH => return Target::Ssh,
        _ => {}
    }
    let Some(rest) = path.strip_prefix('/') else {
        return Target::Unknown;
    };
    if let Some((repo, lfs)) = rest.split_once("/info/lfs/") {
        return Target::Lfs(repo, lfs);
    }
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

/// One shard's HTTP request router.
struct Router {
    git: SmartHttp,
    lfs: LfsHttp,
    shutdown: Rc<ShutdownSignal>,
}

impl Handler for Router {
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
            (Method::Get, Target::Ssh) => ssh_upgrade(&head, conn).await,
            (Method::Get, Target::InfoRefs(repo)) => self.git.info_refs(&head, conn, repo).await,
            (Method::Post, Target::Rpc(repo, service)) => {
                self.git.rpc(&head, conn, repo, service).await
            }
            (_, Target::Lfs(repo, path)) => {
                METRICS.request(Route::Lfs);
                self.lfs.handle(&head, conn, repo, path).await
            }
            (_, Target::InfoRefs(_)) => method_not_allowed(conn, "GET").await,
            (_, Target::Rpc(..)) => method_not_allowed(conn, "POST").await,
            (_, Target::Dumb) => {
                METRICS.request(Route::Other);
                conn.respond_text(
                    404,
                    &[],
                    "dumb HTTP protocol is not supported; use a git client that speaks smart HTTP\n",
                )
                .await?;
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

/// Replaces the peer with the client a balancer's PROXY protocol header names; false (after
/// answering 400 and closing) when there is no valid header in time.
async fn take_proxy_header(conn: &mut Conn, limits: &crate::config::HttpLimits) -> bool {
    match conn.read_proxy_header(limits.head_timeout).await {
        Ok(client) => {
            conn.peer = client;
            true
        }
        Err(reason) => {
            METRICS.bad_requests.inc();
            tracing::info!(peer = %conn.peer, %reason, "HTTP connection from a PROXY protocol balancer refused");
            conn.close_after_response();
            let _ = conn.respond_text(400, &[], &format!("{reason}\n")).await;
            conn.shutdown().await;
            false
        }
    }
}

/// `GET /ssh` with a WebSocket upgrade: answers 101 and hands the socket to an SSH sidecar,
/// which runs the WebSocket and SSH over it (see [`crate::ssh::websocket`]).
async fn ssh_upgrade(head: &RequestHead, conn: &mut Conn) -> io::Result<Reuse> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    METRICS.request(Route::Other);
    let key = match (
        head.websocket_upgrade,
        head.websocket_key.as_deref(),
        head.websocket_version.as_deref(),
    ) {
        (true, Some(key), Some("13")) if conn.buffered().is_empty() => key,
        _ => {
            conn.close_after_response();
            conn.respond_text(
                426,
                &[("Upgrade", "websocket"), ("Sec-WebSocket-Version", "13")],
                "SSH is carried here over a WebSocket (RFC 6455, version 13): use `gitplane ssh-proxy`\n",
            )
            .await?;
            return Ok(Reuse::Close);
        }
    };
    // The socket must outlive this connection's task: a second fd on it goes to the sidecar.
    // SAFETY: F_DUPFD_CLOEXEC on our open socket returns a new fd we own, or -1.
    let dup = unsafe { libc::fcntl(conn.stream().as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
    if dup < 0 {
        let e = io::Error::last_os_error();
        tracing::warn!(peer = %conn.peer, error = %e, "cannot hand an SSH WebSocket over");
        conn.close_after_response();
        conn.respond_text(
            503,
            &[("Retry-After", "1")],
            "cannot take the connection now\n",
        )
        .await?;
        return Ok(Reuse::Close);
    }
    // SAFETY: dup is a fresh fd that nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(dup) };
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    let (written, _) = conn
        .write_all(
            format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
            )
            .into_bytes(),
        )
        .await;
    written?;
    match crate::ssh::websocket::hand_off(crate::ssh::websocket::Handoff {
        socket,
        peer: conn.peer,
    }) {
        Ok(()) => Ok(Reuse::HandedOff),
        // No SSH service: the dropped fd and the closed connection end it.
        Err(_) => Ok(Reuse::Close),
    }
}

async fn method_not_allowed(conn: &mut Conn, allow: &str) -> io::Result<Reuse> {
    METRICS.request(Route::Other);
    conn.close_after_response();
    conn.respond_text(405, &[("Allow", allow)], "method not allowed\n")
        .await?;
    Ok(Reuse::Close)
}

pub struct HttpService {
    listeners: ListenerSet,
    state: Arc<AppState>,
    token_secret: TokenSecret,
    /// The node-wide share of anonymous LFS downloads.
    lfs_anonymous: Arc<AddressLimiter>,
}

impl HttpService {
    pub fn new(listeners: ListenerSet, state: Arc<AppState>, token_secret: TokenSecret) -> Self {
        Self {
            listeners,
            lfs_anonymous: anonymous_share(&state.config),
            state,
            token_secret,
        }
    }
}

impl ShardService for HttpService {
    fn serve(&self, ctx: ShardContext) -> Pin<Box<dyn Future<Output = ()>>> {
        let listener = self.listeners.take(ctx.shard);
        let state = Arc::clone(&self.state);
        let secret = self.token_secret.clone();
        let lfs_anonymous = Arc::clone(&self.lfs_anonymous);
        Box::pin(async move {
            let Some(listener) = listener else { return };
            let config = Arc::clone(&state.config);
            let auth = Rc::new(HttpAuth::new(
                config.store.clone(),
                config.cluster_routing(),
                secret,
            ));
            let router = Rc::new(Router {
                git: SmartHttp::new(Arc::clone(&state), Rc::clone(&auth)),
                lfs: LfsHttp::new(&config, auth, lfs_anonymous),
                shutdown: Rc::clone(&ctx.shutdown),
            });
            let opts = AcceptOptions {
                name: "http",
                max_connections: config.http.max_connections_per_shard,
                tcp: &config.tcp,
            };
            let serve = |stream, peer| {
                let router = Rc::clone(&router);
                let shutdown = Rc::clone(&ctx.shutdown);
                let config = Arc::clone(&config);
                // Made before the task, not in it: a value an async block moves from stays in its
                // state for the task's whole life, and every idle connection would carry the
                // socket and the address twice.
                let mut conn = Conn::new(stream, peer, &config.http);
                async move {
                    let limits = &config.http;
                    let proxied = limits
                        .proxy_protocol_from
                        .iter()
                        .any(|r| r.contains(peer.ip()));
                    // Boxed: its state is needed once, not while the connection idles.
                    if proxied && !Box::pin(take_proxy_header(&mut conn, limits)).await {
                        return;
                    }
                    serve_connection(&*router, &mut conn, limits, &shutdown).await;
                }
            };
            let reject = |stream, peer| {
                let config = Arc::clone(&config);
                async move {
                    let mut conn = Conn::new(stream, peer, &config.http);
                    conn.close_after_response();
                    let _ = conn
                        .respond_text(503, &[("Retry-After", "1")], "too many connections\n")
                        .await;
                    conn.shutdown().await;
                }
            };
            accept_loop(listener, &ctx, opts, serve, reject).await;
        })
    }
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
        assert_eq!(
            classify("/a/b.git/info/lfs/objects/batch"),
            Target::Lfs("a/b.git", "objects/batch")
        );
        assert_eq!(classify("/a/b.git/objects/12/3456"), Target::Dumb);
        assert_eq!(classify("/a/b.git/HEAD"), Target::Dumb);
        assert_eq!(classify("/"), Target::Unknown);
        assert_eq!(classify("/git-upload-pack"), Target::Unknown);
    }
}
