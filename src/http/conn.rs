//! One HTTP connection's socket and read buffer: the I/O half that the sans-I/O codecs
//! ([`super::head`], [`super::chunked`]) are fed from.
//!
//! Memory per idle connection is kept small: between requests the read buffer is released and
//! the connection waits for readability (an io_uring poll, which holds no buffer) before it
//! allocates one again.

use std::io;
use std::net::SocketAddr;

use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt};
use monoio::net::TcpStream;

use super::response::{encode_head, BodyLength};
use crate::metrics::METRICS;

/// First read buffer size; it grows (up to the head limit, or this for bodies) as needed.
const INITIAL_BUF: usize = 4 * 1024;
/// Read buffer for request bodies.
const BODY_BUF: usize = 64 * 1024;
/// Lingering close: at most this long and this much of an unread body is drained.
const LINGER_TIME: std::time::Duration = std::time::Duration::from_secs(2);
const LINGER_BYTES: usize = 4 << 20;

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
}

impl Conn {
    pub fn new(stream: TcpStream, peer: SocketAddr) -> Self {
        Self {
            stream,
            buf: Vec::new(),
            start: 0,
            peer,
            keep_alive: false,
            body_pending: false,
        }
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

    /// Reads more body bytes, within the body buffer size.
    pub async fn fill_body(&mut self) -> io::Result<usize> {
        self.fill(BODY_BUF).await
    }

    pub async fn write_all(&mut self, data: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
        let len = data.len();
        let (res, data) = self.stream.write_all(data).await;
        if res.is_ok() {
            METRICS.bytes_written.add(len as u64);
        }
        (res.map(|_| ()), data)
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
