//! `gitplane ssh-proxy ws://HOST:PORT/ssh`: OpenSSH's `ProxyCommand` for SSH over WebSocket
//! (#16). Connects, upgrades (with extra headers for an identity-aware proxy, as wsgate-client
//! does), then carries stdin to binary messages and binary messages to stdout until either side
//! ends. Blocking I/O: one process per SSH connection, two threads.

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::mpsc;
use std::time::Duration;

use tungstenite::client::IntoClientRequest;
use tungstenite::http::{HeaderName, HeaderValue};
use tungstenite::protocol::WebSocketConfig;
use tungstenite::Message;

use super::websocket::MAX_MESSAGE;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a read waits before the loop looks at stdin's side again.
const POLL: Duration = Duration::from_millis(10);
/// Bytes read from stdin at a time (one binary message each).
const CHUNK: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("{0}: expected ws://HOST[:PORT]/PATH")]
    Url(String),
    #[error("wss:// is not built in yet: put a TLS-terminating proxy in front, or use ws://")]
    Tls,
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

/// Runs the proxy on this process's stdin and stdout.
pub fn run(url: &str, headers: &[String]) -> Result<(), ProxyError> {
    if url.starts_with("wss://") {
        return Err(ProxyError::Tls);
    }
    let rest = url
        .strip_prefix("ws://")
        .ok_or_else(|| ProxyError::Url(url.to_owned()))?;
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.is_empty() {
        return Err(ProxyError::Url(url.to_owned()));
    }
    let target = if authority.contains(':') {
        authority.to_owned()
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
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE));
    let (mut ws, _response) =
        tungstenite::client::client_with_config(request, stream.try_clone()?, Some(config))
            .map_err(|e| match e {
                tungstenite::HandshakeError::Failure(e) => ProxyError::from(e),
                tungstenite::HandshakeError::Interrupted(_) => ProxyError::Io(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    "handshake interrupted",
                )),
            })?;
    stream.set_read_timeout(Some(POLL))?;

    // stdin on its own thread: a read there blocks for as long as ssh has nothing to say.
    let (tx, rx) = mpsc::sync_channel::<Option<Vec<u8>>>(8);
    std::thread::Builder::new()
        .name("ssh-proxy-stdin".into())
        .spawn(move || {
            let mut stdin = io::stdin().lock();
            let mut buf = vec![0u8; CHUNK];
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => {
                        let _ = tx.send(None);
                        return;
                    }
                    Ok(n) => {
                        if tx.send(Some(buf[..n].to_vec())).is_err() {
                            return;
                        }
                    }
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
                // Nothing from the server within POLL: flush pongs, look at stdin again.
                match ws.flush() {
                    Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {}
                    other => other?,
                }
            }
            Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                return Ok(())
            }
            Err(e) => return Err(e.into()),
        }
    }
}
