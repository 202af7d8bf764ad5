//! `gitplane ssh-proxy ws://HOST:PORT/ssh` (or `wss://` through a TLS-terminating balancer):
//! OpenSSH's `ProxyCommand` for SSH over WebSocket (#16). Connects (TLS by rustls for `wss://`,
//! trusting the system's roots or `--ca-file`), upgrades (with extra headers for an
//! identity-aware proxy, as wsgate-client does), then carries stdin to binary messages and
//! binary messages to stdout until either side ends. Blocking I/O: one process per SSH
//! connection, two threads.

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use tungstenite::client::IntoClientRequest;
use tungstenite::http::{HeaderName, HeaderValue};
use tungstenite::protocol::WebSocketConfig;
use tungstenite::{Message, WebSocket};

use super::websocket::MAX_MESSAGE;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a read waits for the rest of a frame (or TLS record) poll(2) saw begin to arrive.
const READ_WAIT: Duration = Duration::from_millis(1);
/// Bytes read from stdin at a time (one binary message each).
const CHUNK: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("{0}: expected ws://HOST[:PORT]/PATH or wss://HOST[:PORT]/PATH")]
    Url(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("bad --header `{0}`: expected `Name: value`")]
    Header(String),
    #[error("connecting to {addr}: {source}")]
    Connect { addr: String, source: io::Error },
    #[error("WebSocket: {0}")]
    WebSocket(Box<tungstenite::Error>),
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl From<tungstenite::Error> for ProxyError {
    fn from(e: tungstenite::Error) -> Self {
        Self::WebSocket(Box::new(e))
    }
}

/// Runs the proxy on this process's stdin and stdout; `ca_file` replaces the system's roots for
/// `wss://`.
pub fn run(url: &str, headers: &[String], ca_file: Option<&Path>) -> Result<(), ProxyError> {
    let (tls, rest) = match (url.strip_prefix("wss://"), url.strip_prefix("ws://")) {
        (Some(rest), _) => (true, rest),
        (None, Some(rest)) => (false, rest),
        (None, None) => return Err(ProxyError::Url(url.to_owned())),
    };
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.is_empty() {
        return Err(ProxyError::Url(url.to_owned()));
    }
    let host = match authority.rsplit_once(':') {
        Some((host, port)) if !port.is_empty() && !port.contains(']') => host,
        _ => authority,
    };
    let target = if host.len() < authority.len() {
        authority.to_owned()
    } else if tls {
        format!("{authority}:443")
    } else {
        format!("{authority}:80")
    };
    let mut request = url
        .into_client_request()
        .map_err(|_| ProxyError::Url(url.to_owned()))?;
    for h in headers {
        let (name, value) = h
            .split_once(':')
            .ok_or_else(|| ProxyError::Header(h.clone()))?;
        let name = HeaderName::from_bytes(name.trim().as_bytes())
            .map_err(|_| ProxyError::Header(h.clone()))?;
        let value =
            HeaderValue::from_str(value.trim()).map_err(|_| ProxyError::Header(h.clone()))?;
        request.headers_mut().append(name, value);
    }
    let connect_err = |source| ProxyError::Connect {
        addr: target.clone(),
        source,
    };
    let addr = target
        .to_socket_addrs()
        .map_err(connect_err)?
        .next()
        .ok_or_else(|| connect_err(io::Error::new(io::ErrorKind::NotFound, "no address")))?;
    let stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).map_err(connect_err)?;
    stream.set_nodelay(true)?;
    // The handshake may wait this long for the server; the relay loop shortens it (READ_WAIT).
    stream.set_read_timeout(Some(CONNECT_TIMEOUT))?;
    let socket = stream.try_clone()?;
    if tls {
        let config =
            crate::tls_client::trusting(ca_file).map_err(|e| ProxyError::Tls(e.to_string()))?;
        let name = rustls::pki_types::ServerName::try_from(
            host.trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
        )
        .map_err(|e| ProxyError::Tls(format!("server name {host}: {e}")))?;
        let conn = rustls::ClientConnection::new(Arc::new(config), name)
            .map_err(|e| ProxyError::Tls(e.to_string()))?;
        relay(
            handshake(request, rustls::StreamOwned::new(conn, stream))?,
            &socket,
        )
    } else {
        relay(handshake(request, stream)?, &socket)
    }
}

fn handshake<S: Read + Write>(
    request: tungstenite::handshake::client::Request,
    stream: S,
) -> Result<WebSocket<S>, ProxyError> {
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE));
    tungstenite::client::client_with_config(request, stream, Some(config))
        .map(|(ws, _response)| ws)
        .map_err(|e| match e {
            tungstenite::HandshakeError::Failure(e) => ProxyError::from(e),
            tungstenite::HandshakeError::Interrupted(_) => ProxyError::Io(io::Error::new(
                io::ErrorKind::WouldBlock,
                "handshake interrupted",
            )),
        })
}

/// stdin to binary messages, binary messages to stdout, until either side ends; `socket` is the
/// TCP connection under `ws`, for its read timeout.
fn relay<S: Read + Write>(mut ws: WebSocket<S>, socket: &TcpStream) -> Result<(), ProxyError> {
    // A read waits at most READ_WAIT for the rest of what poll(2) said had arrived; the loop
    // otherwise sleeps in poll(2) on the socket and the stdin thread's wake socket, so stdin's
    // bytes go out at once instead of after the server's side times out.
    socket.set_read_timeout(Some(READ_WAIT))?;
    let (wake_rx, wake_tx) = UnixStream::pair()?;
    wake_rx.set_nonblocking(true)?;
    wake_tx.set_nonblocking(true)?;

    // stdin on its own thread: a read there blocks for as long as ssh has nothing to say.
    let (tx, rx) = mpsc::sync_channel::<Option<Vec<u8>>>(8);
    std::thread::Builder::new()
        .name("ssh-proxy-stdin".into())
        .spawn(move || {
            let mut stdin = io::stdin().lock();
            let mut buf = vec![0u8; CHUNK];
            loop {
                let chunk = match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => None,
                    Ok(n) => Some(buf[..n].to_vec()),
                };
                let last = chunk.is_none();
                if tx.send(chunk).is_err() {
                    return;
                }
                // A full wake socket already says "wake".
                let _ = (&wake_tx).write(&[1]);
                if last {
                    return;
                }
            }
        })?;
    let mut stdout = io::stdout().lock();
    let mut stdin_open = true;
    loop {
        while stdin_open {
            match rx.try_recv() {
                Ok(Some(chunk)) => ws.send(Message::Binary(chunk.into()))?,
                Ok(None) | Err(mpsc::TryRecvError::Disconnected) => {
                    stdin_open = false;
                    ws.close(None)?;
                    ws.flush()?;
                }
                Err(mpsc::TryRecvError::Empty) => break,
            }
        }
        let wake = stdin_open.then(|| wake_rx.as_raw_fd());
        if !wait_readable(socket.as_raw_fd(), wake)? {
            // Only stdin's side: drain the wake socket and send.
            let mut sink = [0u8; 64];
            while matches!((&wake_rx).read(&mut sink), Ok(n) if n > 0) {}
            continue;
        }
        // The server's side: every message already here, then back to waiting.
        loop {
            match ws.read() {
                Ok(Message::Binary(data)) => {
                    stdout.write_all(&data)?;
                    stdout.flush()?;
                }
                Ok(Message::Close(_)) => {
                    let _ = ws.flush();
                    return Ok(());
                }
                Ok(_) => {}
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    // Nothing more for now: flush pongs, look at stdin again.
                    match ws.flush() {
                        Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                        }
                        other => other?,
                    }
                    break;
                }
                Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                    return Ok(())
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Blocks until `socket` (true) or `wake` (false) is readable; a hang-up counts as readable.
fn wait_readable(socket: RawFd, wake: Option<RawFd>) -> io::Result<bool> {
    let mut fds = [
        libc::pollfd {
            fd: socket,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            // poll(2) ignores a negative fd: stdin is done.
            fd: wake.unwrap_or(-1),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: two valid pollfds.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r >= 0 {
            return Ok(fds[0].revents != 0);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}
