//! One HTTP connection's socket and read buffer: the I/O half that the sans-I/O codecs
//! ([`super::head`], [`super::chunked`]) are fed from.
//!
//! Memory per idle connection is kept small: between requests the read buffer is released and
//! the connection waits for readability (an io_uring poll, which holds no buffer) before it
//! allocates one again.
//!
//! Request bodies and responses run under progress deadlines ([`crate::progress`]): a body read
//! first waits for readability within the body deadline, holding no buffer, and a client that
//! stops sending (or trickles) gets [`BodyReadError::Stalled`]; a response write that the client
//! does not accept within the send deadline fails with `TimedOut`.

use std::io;
use std::net::SocketAddr;

use std::time::Instant;

use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt};
use monoio::net::TcpStream;

use gitplane_wire::net::proxy_protocol::{self, ProxyParse};

use super::response::{encode_head, BodyLength};
use crate::config::HttpLimits;
use crate::metrics::{Cut, METRICS};
use crate::progress::{PeerClock, ProgressRules, Stall};

/// First read buffer size; it grows (up to the head limit, or this for bodies) as needed.
const INITIAL_BUF: usize = 4 * 1024;
/// Read buffer for request bodies.
const BODY_BUF: usize = 64 * 1024;
/// Lingering close: at most this long and this much of an unread body is drained.
const LINGER_TIME: std::time::Duration = std::time::Duration::from_secs(2);
const LINGER_BYTES: usize = 4 << 20;

/// Why a request body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BodyReadError {
    #[error("reading the request body: {0}")]
    Io(#[from] io::Error),
    #[error("request body stalled: {0}")]
    Stalled(Stall),
}

pub struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    /// Unconsumed bytes are `buf[start..]`.
    start: usize,
    pub peer: SocketAddr,
    /// Whether the current request allows reusing the connection afterwards.
    keep_alive: bool,
    /// The current request has body bytes not yet read: the connection cannot be reused.
    body_pending: bool,
    body_rules: ProgressRules,
    send_rules: ProgressRules,
    /// The current request body's progress, from its first read.
    body: Option<PeerClock>,
}

impl Conn {
    pub fn new(stream: TcpStream, peer: SocketAddr, limits: &HttpLimits) -> Self {
        Self {
            stream,
            buf: Vec::new(),
            start: 0,
            peer,
            keep_alive: false,
            body_pending: false,
            body_rules: limits.body_progress,
            send_rules: limits.send_progress,
            body: None,
        }
    }

    /// When a response the client does not read counts as stalled.
    pub fn send_rules(&self) -> ProgressRules {
        self.send_rules
    }

    pub fn stream(&mut self) -> &mut TcpStream {
        &mut self.stream
    }

    pub fn buffered(&self) -> &[u8] {
        self.buf.get(self.start..).unwrap_or_default()
    }

    pub fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.buf.len());
        if self.start == self.buf.len() {
            self.start = 0;
            self.buf.clear();
        }
    }

    /// Frees the read buffer while the connection is idle.
    pub fn release_buffer(&mut self) {
        if self.buffered().is_empty() {
            self.buf = Vec::new();
            self.start = 0;
        }
    }

    pub(super) fn begin_request(&mut self, keep_alive: bool, has_body: bool) {
        self.keep_alive = keep_alive;
        self.body_pending = has_body;
        self.body = None;
    }

    /// Records that the request body has been read to its end.
    pub fn body_finished(&mut self) {
        self.body_pending = false;
    }

    /// Whether the response may promise `Connection: keep-alive`.
    pub fn reusable(&self) -> bool {
        self.keep_alive && !self.body_pending
    }

    /// Marks the connection for closing after this response.
    pub fn close_after_response(&mut self) {
        self.keep_alive = false;
    }

    /// Reads the PROXY protocol header (v1 or v2) that a trusted TCP balancer sends before the
    /// first request, within `within`, and returns the client's address it names (the
    /// balancer's own for its health checks and unknown families). What follows the header stays
    /// buffered for the request parser.
    pub async fn read_proxy_header(
        &mut self,
        within: std::time::Duration,
    ) -> Result<SocketAddr, String> {
        let deadline = monoio::time::Instant::now() + within;
        loop {
            match proxy_protocol::parse(self.buffered()) {
                Ok(ProxyParse::Complete { consumed, source }) => {
                    self.consume(consumed);
                    return Ok(source.unwrap_or(self.peer));
                }
                Ok(ProxyParse::Incomplete) => {}
                Err(e) => return Err(e.to_string()),
            }
            let left = deadline.saturating_duration_since(monoio::time::Instant::now());
            match monoio::time::timeout(left, self.fill(proxy_protocol::MAX_HEADER)).await {
                Ok(Ok(0)) => return Err("closed before its PROXY protocol header".into()),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e.to_string()),
                Err(_) => return Err("no PROXY protocol header in time".into()),
            }
        }
    }

    /// Waits until the socket has bytes (or EOF) without holding a buffer.
    pub async fn readable(&self) -> io::Result<()> {
        self.stream.readable(false).await
    }

    /// Reads more bytes into the buffer, growing it up to `limit` bytes in total. Returns the
    /// count read; 0 means EOF (or the buffer is full at `limit`).
    pub async fn fill(&mut self, limit: usize) -> io::Result<usize> {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        let len = self.buf.len();
        if len >= limit {
            return Ok(0);
        }
        if self.buf.capacity() == len {
            let target = (len * 2).clamp(INITIAL_BUF, limit.max(INITIAL_BUF));
            self.buf.reserve_exact(target - len);
        }
        let cap = self.buf.capacity().min(limit.max(len + 1));
        let buf = std::mem::take(&mut self.buf);
        let (res, slice) = self.stream.read(buf.slice_mut(len..cap)).await;
        self.buf = slice.into_inner();
        let n = res?;
        METRICS.bytes_received.add(n as u64);
        Ok(n)
    }

    /// Reads more body bytes into the connection's buffer, within the body buffer size and the
    /// body deadline. 0 means EOF.
    pub async fn fill_body(&mut self) -> Result<usize, BodyReadError> {
        self.body_ready().await?;
        let n = self.fill(BODY_BUF).await?;
        self.body_moved(n);
        Ok(n)
    }

    /// Reads body bytes straight into `buf` (for example a pooled buffer), within the body
    /// deadline. Nothing is read while the client is silent, so a stalled upload holds `buf` only
    /// if the caller took it before calling. 0 means EOF.
    pub async fn read_body<T: IoBufMut>(&mut self, buf: T) -> (Result<usize, BodyReadError>, T) {
        if let Err(e) = self.body_ready().await {
            return (Err(e), buf);
        }
        let (res, buf) = self.stream.read(buf).await;
        match res {
            Ok(n) => {
                METRICS.bytes_received.add(n as u64);
                self.body_moved(n);
                (Ok(n), buf)
            }
            Err(e) => (Err(e.into()), buf),
        }
    }

    /// Waits, holding no buffer, until the socket has body bytes (or EOF), or the body deadline
    /// passes: then the stall is counted and returned. A reader that takes a buffer per chunk
    /// calls this first, so a silent client holds none.
    pub async fn body_ready(&mut self) -> Result<(), BodyReadError> {
        let rules = self.body_rules;
        let clock = self.body.get_or_insert_with(|| PeerClock::new(rules));
        let started = Instant::now();
        let ready = monoio::time::timeout(clock.budget(), self.stream.readable(false)).await;
        clock.waited(started.elapsed());
        match ready {
            Ok(ready) => Ok(ready?),
            Err(_) => {
                let stall = clock.stall();
                METRICS.cut(match stall {
                    Stall::Idle => Cut::HttpBodyIdle,
                    Stall::Slow => Cut::HttpBodySlow,
                });
                Err(BodyReadError::Stalled(stall))
            }
        }
    }

    fn body_moved(&mut self, n: usize) {
        if let Some(clock) = self.body.as_mut() {
            clock.moved(n as u64);
        }
    }

    /// Writes all of `data`, or fails with `TimedOut` when the client accepts no byte within
    /// the send deadline (then the connection must end: the response is cut).
    pub async fn write_all(&mut self, data: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
        let len = data.len();
        // A response written from memory is small (heads, JSON, error text): one idle window
        // bounds it; streamed bodies track their progress chunk by chunk.
        match monoio::time::timeout(self.send_rules.idle, self.stream.write_all(data)).await {
            Ok((res, data)) => {
                if res.is_ok() {
                    METRICS.bytes_written.add(len as u64);
                }
                (res.map(|_| ()), data)
            }
            Err(_) => {
                METRICS.cut(Cut::HttpSendIdle);
                let timed_out = io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the client accepted no response bytes within the send deadline",
                );
                (Err(timed_out), Vec::new())
            }
        }
    }

    /// Tells a client that sent `Expect: 100-continue` to go ahead with the body.
    pub async fn send_continue(&mut self) -> io::Result<()> {
        self.write_all(b"HTTP/1.1 100 Continue\r\n\r\n".to_vec())
            .await
            .0
    }

    /// Sends a complete response with a small in-memory body.
    pub async fn respond(
        &mut self,
        status: u16,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> io::Result<()> {
        let mut out = Vec::with_capacity(256 + body.len());
        encode_head(
            &mut out,
            status,
            headers,
            BodyLength::Fixed(body.len() as u64),
            self.reusable(),
        );
        out.extend_from_slice(body);
        METRICS.response(status);
        self.write_all(out).await.0
    }

    /// A plain-text response, the usual shape of an error.
    pub async fn respond_text(
        &mut self,
        status: u16,
        extra: &[(&str, &str)],
        text: &str,
    ) -> io::Result<()> {
        let mut headers = Vec::with_capacity(extra.len() + 1);
        headers.push(("Content-Type", "text/plain; charset=utf-8"));
        headers.extend_from_slice(extra);
        self.respond(status, &headers, text.as_bytes()).await
    }

    /// Ends the connection. When the client may still be sending a body we refused to read,
    /// drain a bounded amount first: closing with unread bytes makes the kernel send a reset,
    /// which can destroy the error response before the client reads it.
    pub async fn shutdown(&mut self) {
        let _ = self.stream.shutdown().await;
        if self.body_pending {
            let deadline = monoio::time::Instant::now() + LINGER_TIME;
            let mut drained = 0;
            let mut buf = vec![0u8; 16 * 1024];
            while drained < LINGER_BYTES {
                let left = deadline.saturating_duration_since(monoio::time::Instant::now());
                match monoio::time::timeout(left, self.stream.read(buf)).await {
                    Ok((Ok(n), b)) if n > 0 => {
                        drained += n;
                        buf = b;
                    }
                    _ => break,
                }
            }
        }
    }
}
