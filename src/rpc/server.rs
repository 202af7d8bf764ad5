//! The gRPC connection loop on a shard: h2 (HTTP/2 with prior knowledge, no TLS) over a monoio
//! socket through `monoio-compat`, one monoio task per stream.
//!
//! Per stream: check the head (POST, `application/grpc`, a known method, the bearer token, a
//! supported `grpc-encoding`, `grpc-timeout`), read exactly one request message through the
//! [`MessageReader`](super::frame::MessageReader), run the call, write the response messages
//! with HTTP/2 flow control (never buffering past the send window), and end with `grpc-status`
//! / `grpc-message` trailers, or a trailers-only response when nothing was sent. The whole call
//! runs under its deadline (`grpc-timeout`, else `rpc.default_deadline_secs`): when it passes
//! the client gets DEADLINE_EXCEEDED and the worker is told to stop. A malformed frame ends only
//! its stream (INTERNAL or RESOURCE_EXHAUSTED); the connection and its other streams go on.
//!
//! Per connection: admission by address ([`super::conns`]) before the handshake, then a loop
//! that accepts streams and obeys the connection's [`ConnWatch`]: it sends keepalive PINGs and,
//! when a rule fires (idle, no authenticated call in time, unanswered PING), sends GOAWAY and
//! closes, counting the cut in `gitplane_stalled_cuts_total`.

use std::cell::RefCell;
use std::future::poll_fn;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::server::SendResponse;
use h2::{RecvStream, SendStream};
use http::{HeaderMap, HeaderValue, Request, Response};
use monoio::net::TcpStream;
use tokio::sync::Notify;

use super::conns::{ConnSlot, ShardShare};
use super::frame::{Encoding, MessageReader, ACCEPT_ENCODING};
use super::pool::CallCtx;
use super::service::{Method, Reply, RpcState};
use super::status::{parse_timeout, Code, Status};
use super::watch::{ConnWatch, Due};
use crate::lifecycle::ShutdownSignal;
use crate::metrics::{Cut, METRICS};

/// Longest time a new connection has to send the HTTP/2 preface and settings (also bounded by
/// `rpc.first_request_secs`, which runs from the accept).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a closing connection gets to flush its GOAWAY before the socket is dropped.
const CLOSE_FLUSH: Duration = Duration::from_secs(1);
/// A stream whose client opens no send window for this long is cut (a stalled reader must not
/// pin a worker forever).
const SEND_STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Socket buffers of the compat layer: one HTTP/2 frame of 64 KiB moves in one syscall.
const IO_BUFFER: usize = 64 << 10;

/// What one shard's RPC connections share.
pub struct ShardRpc {
    pub state: Arc<RpcState>,
    pub shutdown: Rc<ShutdownSignal>,
    /// Connections on this shard that have not shown a valid token yet.
    pub unauthenticated: Rc<ShardShare>,
}

/// What a connection's loop and its stream tasks share.
struct ConnShared {
    watch: RefCell<ConnWatch>,
    slot: RefCell<ConnSlot>,
    /// Wakes the loop when a stream ends or the token was shown, so it re-reads its deadline.
    changed: Notify,
}

impl ConnShared {
    fn authenticated(&self) {
        let mut watch = self.watch.borrow_mut();
        if !watch.is_authenticated() {
            watch.authenticated();
            self.slot.borrow_mut().authenticated();
            self.changed.notify_one();
        }
    }
}

/// An open stream, counted in the connection's [`ConnWatch`] until dropped.
struct StreamGuard(Rc<ConnShared>);

impl StreamGuard {
    fn new(conn: &Rc<ConnShared>) -> Self {
        conn.watch.borrow_mut().stream_opened(Instant::now());
        Self(Rc::clone(conn))
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.watch.borrow_mut().stream_closed(Instant::now());
        self.0.changed.notify_one();
    }
}

/// What `accept` gives: a new stream, a connection error, or the end of the connection.
type Accepted = Option<Result<(Request<RecvStream>, SendResponse<Bytes>), h2::Error>>;

/// What woke the connection loop.
enum Event {
    /// Boxed: the stream's handles are large and the other events are tiny.
    Stream(Box<Accepted>),
    Drain,
    Timer,
    Changed,
    Pong(Result<h2::Pong, h2::Error>),
    Evicted,
}

/// Serves one HTTP/2 connection until the client closes it, a [`ConnWatch`] rule closes it, or
/// the shard drains.
pub async fn serve_connection(stream: TcpStream, peer: SocketAddr, shard: Rc<ShardRpc>) {
    let accepted = Instant::now();
    let limits = &shard.state.limits;
    let slot = match ConnSlot::admit(&shard.state.address_caps, &shard.unauthenticated, peer.ip()) {
        Ok(slot) => slot,
        Err(e) => {
            METRICS.cut(Cut::RpcPerAddress);
            tracing::debug!(%peer, error = %e, "rpc: connection refused");
            return;
        }
    };
    let eviction = slot.eviction();
    let io = monoio_compat::TcpStreamCompat::new_with_buffer_size(stream, IO_BUFFER, IO_BUFFER);
    let mut builder = h2::server::Builder::new();
    builder
        .max_concurrent_streams(limits.max_concurrent_streams)
        // Request messages are small; a 1 MiB stream window lets a maximum-size one arrive in a
        // few round trips without letting many streams park megabytes each.
        .initial_window_size(1 << 20)
        .initial_connection_window_size(4 << 20)
        .max_frame_size(1 << 16)
        .max_header_list_size(16 << 10)
        .max_send_buffer_size(256 << 10);
    let handshake = builder.handshake::<_, Bytes>(io);
    let handshake_limit = HANDSHAKE_TIMEOUT.min(limits.conn_timers.first_request);
    let handshake = monoio::select! {
        h = monoio::time::timeout(handshake_limit, handshake) => h,
        _ = eviction.wait() => {
            METRICS.cut(Cut::RpcNoRequest);
            tracing::debug!(%peer, "rpc: evicted during the HTTP/2 handshake");
            return;
        }
    };
    let mut conn = match handshake {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "rpc: HTTP/2 handshake failed");
            return;
        }
        Err(_) => {
            METRICS.cut(Cut::RpcNoRequest);
            tracing::debug!(%peer, "rpc: HTTP/2 handshake timed out");
            return;
        }
    };
    let mut pings = conn.ping_pong();
    let shared = Rc::new(ConnShared {
        watch: RefCell::new(ConnWatch::new(limits.conn_timers, accepted)),
        slot: RefCell::new(slot),
        changed: Notify::new(),
    });
    let mut draining = false;
    let cut = loop {
        let (next, awaiting_pong, authenticated) = {
            let w = shared.watch.borrow();
            (w.next(), w.awaiting_pong(), w.is_authenticated())
        };
        let pong = poll_fn(|cx| match pings.as_mut() {
            Some(p) => p.poll_pong(cx),
            None => Poll::Pending,
        });
        let event = monoio::select! {
            n = conn.accept() => Event::Stream(Box::new(n)),
            _ = shard.shutdown.wait(), if !draining => Event::Drain,
            _ = monoio::time::sleep_until(monoio::time::Instant::from_std(next)) => Event::Timer,
            _ = shared.changed.notified() => Event::Changed,
            p = pong, if awaiting_pong => Event::Pong(p),
            // A newer connection took this one's place before it showed a token.
            _ = eviction.wait(), if !authenticated => Event::Evicted,
        };
        match event {
            Event::Stream(accepted) => match *accepted {
                Some(Ok((req, respond))) => {
                    let guard = StreamGuard::new(&shared);
                    monoio::spawn(handle_stream(Rc::clone(&shard), guard, req, respond));
                }
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "rpc: connection error");
                    break None;
                }
                None => break None,
            },
            Event::Drain => {
                // GOAWAY: in-flight streams finish, new ones go elsewhere.
                conn.graceful_shutdown();
                draining = true;
            }
            Event::Changed => {}
            Event::Evicted => break Some(Cut::RpcNoRequest),
            Event::Pong(Ok(_)) => shared.watch.borrow_mut().pong_received(Instant::now()),
            Event::Pong(Err(e)) => {
                tracing::debug!(error = %e, "rpc: keepalive ping failed");
                break None;
            }
            Event::Timer => {
                let now = Instant::now();
                let due = shared.watch.borrow().due(now);
                match due {
                    None => {}
                    // send_ping/poll_pong rather than `ping().await`: the loop must keep
                    // accepting streams while the PONG is on its way.
                    Some(Due::Ping) => {
                        match pings.as_mut().map(|p| p.send_ping(h2::Ping::opaque())) {
                            Some(Ok(())) => shared.watch.borrow_mut().ping_sent(now),
                            // The connection is broken, or h2 gave out no pinger: nothing can
                            // prove the peer is still there.
                            _ => break Some(Cut::RpcKeepalive),
                        }
                    }
                    Some(Due::Close(cut)) => break Some(cut),
                }
            }
        }
    };
    if let Some(cut) = cut {
        METRICS.cut(cut);
        tracing::debug!(%peer, ?cut, "rpc: closing the connection");
        // GOAWAY naming the last stream we took, then close even if streams are still open.
        conn.abrupt_shutdown(h2::Reason::NO_ERROR);
        let _ = monoio::time::timeout(CLOSE_FLUSH, poll_fn(|cx| conn.poll_closed(cx))).await;
    }
}

/// The response side of one stream: headers, messages under flow control, then trailers.
struct Responder {
    respond: SendResponse<Bytes>,
    body: Option<SendStream<Bytes>>,
}

fn grpc_headers() -> Response<()> {
    let mut r = Response::new(());
    let h = r.headers_mut();
    h.insert("content-type", HeaderValue::from_static("application/grpc"));
    h.insert(
        "grpc-accept-encoding",
        HeaderValue::from_static(ACCEPT_ENCODING),
    );
    r
}

fn put_status(h: &mut HeaderMap, status: &Status) {
    h.insert(
        "grpc-status",
        HeaderValue::from_static(status.code.header_value()),
    );
    if !status.message.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&status.encoded_message()) {
            h.insert("grpc-message", v);
        }
    }
}

impl Responder {
    /// Sends one framed message, waiting for send window as needed.
    async fn send(&mut self, mut frame: Bytes) -> Result<(), Status> {
        let gone = |e: h2::Error| Status::new(Code::Cancelled, format!("stream closed: {e}"));
        if self.body.is_none() {
            let s = self
                .respond
                .send_response(grpc_headers(), false)
                .map_err(gone)?;
            self.body = Some(s);
        }
        let Some(body) = self.body.as_mut() else {
            return Err(Status::internal("response stream missing"));
        };
        while !frame.is_empty() {
            body.reserve_capacity(frame.len());
            let mut cap = body.capacity();
            while cap == 0 {
                let polled =
                    monoio::time::timeout(SEND_STALL_TIMEOUT, poll_fn(|cx| body.poll_capacity(cx)))
                        .await;
                cap = match polled {
                    Ok(Some(Ok(n))) => n,
                    Ok(Some(Err(e))) => return Err(gone(e)),
                    Ok(None) => return Err(Status::new(Code::Cancelled, "stream closed")),
                    Err(_) => {
                        return Err(Status::new(
                            Code::Cancelled,
                            "the client stopped reading the response",
                        ))
                    }
                };
            }
            let chunk = frame.split_to(cap.min(frame.len()));
            body.send_data(chunk, false).map_err(gone)?;
        }
        Ok(())
    }

    /// Resolves when the client resets the stream (cancels the call).
    async fn reset(&mut self) -> h2::Reason {
        let r = match self.body.as_mut() {
            Some(b) => poll_fn(|cx| b.poll_reset(cx)).await,
            None => poll_fn(|cx| self.respond.poll_reset(cx)).await,
        };
        r.unwrap_or(h2::Reason::CANCEL)
    }

    /// Ends the stream with `status`: trailers after a body, or a trailers-only response.
    fn finish(mut self, status: &Status) {
        match self.body.as_mut() {
            Some(body) => {
                let mut t = HeaderMap::new();
                put_status(&mut t, status);
                let _ = body.send_trailers(t);
            }
            None => {
                let mut r = grpc_headers();
                put_status(r.headers_mut(), status);
                let _ = self.respond.send_response(r, true);
            }
        }
    }
}

/// Why a request is refused before it runs.
fn check_head(
    state: &RpcState,
    head: &http::request::Parts,
) -> Result<(Method, Encoding, Option<Duration>), Status> {
    let method = Method::from_path(head.uri.path()).ok_or_else(|| {
        Status::new(
            Code::Unimplemented,
            format!("unknown method {}", head.uri.path()),
        )
    })?;
    if method.needs_token()
        && !state
            .token
            .matches_header(head.headers.get("authorization").map(|v| v.as_bytes()))
    {
        return Err(Status::new(
            Code::Unauthenticated,
            "a valid `authorization: Bearer TOKEN` is required",
        ));
    }
    let encoding_header = head
        .headers
        .get("grpc-encoding")
        .map(|v| v.to_str().unwrap_or("?"));
    let encoding = Encoding::from_header(encoding_header).ok_or_else(|| {
        Status::new(
            Code::Unimplemented,
            format!(
                "grpc-encoding {:?} is not supported; use one of {ACCEPT_ENCODING}",
                encoding_header.unwrap_or("")
            ),
        )
    })?;
    let timeout = match head.headers.get("grpc-timeout") {
        None => None,
        Some(v) => Some(
            parse_timeout(v.to_str().unwrap_or(""))
                .map_err(|e| Status::invalid_argument(e.to_string()))?,
        ),
    };
    Ok((method, encoding, timeout))
}

/// Reads the single request message of a unary or server-streaming call.
async fn read_request(
    body: &mut RecvStream,
    max_len: usize,
    encoding: Encoding,
) -> Result<Bytes, Status> {
    let mut reader = MessageReader::new(max_len, encoding);
    let mut message: Option<Bytes> = None;
    let frame_error = |e: super::frame::FrameError| {
        let code = match e {
            super::frame::FrameError::TooLarge { .. } => Code::ResourceExhausted,
            _ => Code::Internal,
        };
        Status::new(code, e.to_string())
    };
    while let Some(chunk) = body.data().await {
        let chunk =
            chunk.map_err(|e| Status::new(Code::Cancelled, format!("request stream: {e}")))?;
        // Give the window back at once: what we keep is bounded by the reader's limit.
        let _ = body.flow_control().release_capacity(chunk.len());
        reader.push(&chunk);
        while let Some(m) = reader.next_message().map_err(frame_error)? {
            if message.is_some() {
                return Err(Status::new(
                    Code::Unimplemented,
                    "this method takes exactly one request message",
                ));
            }
            message = Some(m);
        }
    }
    reader.finish().map_err(frame_error)?;
    message.ok_or_else(|| Status::internal("the request carried no message"))
}

/// Handles one stream start to end, and counts it.
async fn handle_stream(
    shard: Rc<ShardRpc>,
    stream: StreamGuard,
    req: Request<RecvStream>,
    respond: SendResponse<Bytes>,
) {
    let started = Instant::now();
    let (head, mut body) = req.into_parts();
    let content_type_ok = head
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    let mut respond = respond;
    if head.method != http::Method::POST || !content_type_ok {
        // Not gRPC at all: plain HTTP answers, as the gRPC spec asks.
        let status = if head.method == http::Method::POST {
            415
        } else {
            405
        };
        let mut r = Response::new(());
        *r.status_mut() =
            http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::BAD_REQUEST);
        let _ = respond.send_response(r, true);
        return;
    }
    let mut out = Responder {
        respond,
        body: None,
    };
    let (method, status) = match check_head(&shard.state, &head) {
        Err(s) => (Method::from_path(head.uri.path()), s),
        Ok((method, encoding, timeout)) => {
            if method.needs_token() {
                // check_head has just matched the token.
                stream.0.authenticated();
            }
            let limits = &shard.state.limits;
            // Without a client deadline the server's own default bounds the call.
            let budget = timeout.unwrap_or(limits.default_deadline);
            let ctx = CallCtx::new(Some(started + budget));
            // Tell the worker to stop when this task ends, however it ends.
            let _cancel = ctx.cancel_on_drop();
            let run = run_call(&shard, method, encoding, &mut body, &ctx, &mut out);
            let status = match monoio::time::timeout(budget, run).await {
                Ok(s) => s,
                Err(_) => Status::deadline_exceeded(),
            };
            (Some(method), status)
        }
    };
    if let Some(m) = method {
        METRICS
            .rpc
            .record(m.index(), status.code.as_u8(), started.elapsed());
    }
    if status.code != Code::Ok {
        tracing::debug!(method = head.uri.path(), code = status.code.name(), message = %status.message, "rpc call failed");
    }
    out.finish(&status);
    // Dropping `body` with the request side still open makes h2 send RST_STREAM(NO_ERROR):
    // the client learns we will not read the rest, and the connection stays usable.
    drop(body);
}

async fn run_call(
    shard: &ShardRpc,
    method: Method,
    encoding: Encoding,
    body: &mut RecvStream,
    ctx: &CallCtx,
    out: &mut Responder,
) -> Status {
    let request = match read_request(body, shard.state.limits.max_message_bytes, encoding).await {
        Ok(r) => r,
        Err(s) => return s,
    };
    let reply = monoio::select! {
        r = shard.state.call(method, request, ctx, &shard.shutdown) => r,
        _ = out.reset() => return Status::new(Code::Cancelled, "cancelled by the client"),
    };
    match reply {
        Err(s) => s,
        Ok(Reply::Unary(frame)) => match out.send(frame).await {
            Ok(()) => Status::ok(),
            Err(s) => s,
        },
        Ok(Reply::Stream {
            mut messages,
            mut done,
        }) => {
            loop {
                let next = monoio::select! {
                    m = messages.recv() => m,
                    status = &mut done => {
                        // The producer finished: send what it queued, then its status.
                        while let Ok(m) = messages.try_recv() {
                            if let Err(s) = out.send(m).await {
                                return s;
                            }
                        }
                        return status;
                    }
                    _ = out.reset() => return Status::new(Code::Cancelled, "cancelled by the client"),
                };
                match next {
                    Some(m) => {
                        if let Err(s) = out.send(m).await {
                            return s;
                        }
                    }
                    None => return done.await,
                }
            }
        }
    }
}
