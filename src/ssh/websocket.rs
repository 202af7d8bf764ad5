//! SSH over WebSocket (#16): for clients on networks that let only HTTP(S) out. `GET /ssh` with
//! a WebSocket upgrade on the HTTP listener is answered `101` by the shard, which then hands the
//! socket itself (no loopback hop, no byte relayed through the shard) to an SSH sidecar. There
//! the WebSocket protocol layer (tungstenite) runs over it and the SSH session over the binary
//! messages, through the same admission, pre-auth deadline, limits and supervision as the SSH
//! port ([`super::conn::serve_transport`]); the supervisor cuts the TCP socket under it.
//!
//! Frames that break RFC 6455 end the connection with close code 1002, messages or frames over
//! [`MAX_MESSAGE`] with 1009, text messages with 1003: SSH is binary.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tungstenite::Message;

use super::SshShared;
use crate::runtime::sidecar::StopSignal;

/// Largest WebSocket message (and frame) accepted. An SSH packet is at most 256 KiB; the
/// client sends what it reads from stdin, in pieces no larger than that.
pub const MAX_MESSAGE: usize = 512 * 1024;

/// The path the HTTP listener answers WebSocket upgrades for SSH on.
pub const PATH: &str = "/ssh";

/// A socket the HTTP side upgraded, on its way to a sidecar.
pub struct Handoff {
    pub socket: OwnedFd,
    pub peer: SocketAddr,
}

/// Each sidecar core's queue of handed-off sockets.
static QUEUES: Mutex<Vec<mpsc::UnboundedSender<Handoff>>> = Mutex::new(Vec::new());
static NEXT: AtomicUsize = AtomicUsize::new(0);

/// Called by each SSH sidecar core: its queue of upgraded sockets.
pub(super) fn register() -> mpsc::UnboundedReceiver<Handoff> {
    let (tx, rx) = mpsc::unbounded_channel();
    QUEUES.lock().unwrap_or_else(|p| p.into_inner()).push(tx);
    rx
}

/// Gives an upgraded socket to an SSH sidecar (round robin); back when SSH does not run.
pub fn hand_off(handoff: Handoff) -> Result<(), Handoff> {
    let queues = QUEUES.lock().unwrap_or_else(|p| p.into_inner());
    if queues.is_empty() {
        return Err(handoff);
    }
    let mut h = handoff;
    for _ in 0..queues.len() {
        let i = NEXT.fetch_add(1, Ordering::Relaxed) % queues.len();
        match queues[i].send(h) {
            Ok(()) => return Ok(()),
            // That core stopped: try the next.
            Err(mpsc::error::SendError(back)) => h = back,
        }
    }
    Err(h)
}

/// Serves one handed-off socket as SSH over WebSocket.
pub(super) async fn serve(shared: Arc<SshShared>, handoff: Handoff, stop: StopSignal) {
    let peer = handoff.peer;
    let std = std::net::TcpStream::from(handoff.socket);
    let tcp = match std
        .set_nonblocking(true)
        .and_then(|()| tokio::net::TcpStream::from_std(std))
    {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(%peer, error = %e, "cannot take over an SSH WebSocket");
            return;
        }
    };
    let fd = tcp.as_raw_fd();
    let local = tcp.local_addr().ok();
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE));
    let ws = WebSocketStream::from_raw_socket(tcp, Role::Server, Some(config)).await;
    super::conn::serve_transport(shared, WsIo::new(ws), fd, peer, local, stop).await;
}

/// A byte stream over a WebSocket's binary messages.
pub struct WsIo<S> {
    ws: WebSocketStream<S>,
    /// The message being read, and how much of it was.
    pending: Bytes,
    closed: bool,
}

impl<S> WsIo<S> {
    pub fn new(ws: WebSocketStream<S>) -> Self {
        Self {
            ws,
            pending: Bytes::new(),
            closed: false,
        }
    }
}

fn io_error(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

/// The close code a read error earns.
fn close_code(e: &tungstenite::Error) -> CloseCode {
    match e {
        tungstenite::Error::Capacity(_) => CloseCode::Size,
        _ => CloseCode::Protocol,
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsIo<S> {
    /// Best effort: queue a close frame and push it out; the connection ends right after.
    fn send_close(&mut self, cx: &mut Context<'_>, code: CloseCode, reason: &str) {
        if self.closed {
            return;
        }
        self.closed = true;
        let frame = CloseFrame {
            code,
            reason: reason.to_owned().into(),
        };
        let mut ws = Pin::new(&mut self.ws);
        if let Poll::Ready(Ok(())) = ws.as_mut().poll_ready(cx) {
            if ws.as_mut().start_send(Message::Close(Some(frame))).is_ok() {
                let _ = ws.as_mut().poll_flush(cx);
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                buf.put_slice(&self.pending.split_to(n));
                return Poll::Ready(Ok(()));
            }
            if self.closed {
                return Poll::Ready(Ok(()));
            }
            match Pin::new(&mut self.ws).poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                // EOF: the peer closed (tungstenite answers its close frame).
                Poll::Ready(None) | Poll::Ready(Some(Ok(Message::Close(_)))) => {
                    self.closed = true;
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(Some(Ok(Message::Binary(data)))) => self.pending = data,
                // Answered by tungstenite on the next write or flush.
                Poll::Ready(Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)))) => {
                    let _ = Pin::new(&mut self.ws).poll_flush(cx);
                }
                Poll::Ready(Some(Ok(Message::Text(_)))) => {
                    self.send_close(
                        cx,
                        CloseCode::Unsupported,
                        "SSH is carried in binary messages",
                    );
                    return Poll::Ready(Err(io_error("text message on an SSH WebSocket")));
                }
                Poll::Ready(Some(Err(e))) => {
                    let code = close_code(&e);
                    self.send_close(cx, code, "malformed or oversized frame");
                    return Poll::Ready(Err(io_error(e)));
                }
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut ws = Pin::new(&mut self.ws);
        match ws.as_mut().poll_ready(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(io_error(e))),
            Poll::Ready(Ok(())) => {}
        }
        let n = buf.len().min(MAX_MESSAGE);
        ws.as_mut()
            .start_send(Message::Binary(Bytes::copy_from_slice(&buf[..n])))
            .map_err(io_error)?;
        // Like a socket write, the bytes leave now, not at the next flush: an SSH peer may
        // wait for them (the server's version line) before it says anything itself.
        if let Poll::Ready(Err(e)) = ws.poll_flush(cx) {
            return Poll::Ready(Err(io_error(e)));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.ws).poll_flush(cx).map_err(io_error)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.ws).poll_close(cx).map_err(io_error)
    }
}
