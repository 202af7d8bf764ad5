//! A minimal gRPC client for tests: the h2 crate over one TCP connection, frames built and
//! checked by hand, so tests can send what a well-behaved client never would.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use gitplane::rpc::frame::{decode, Decoded};

/// What came back on one stream.
#[derive(Debug)]
pub struct Answer {
    pub http_status: u16,
    pub headers: http::HeaderMap,
    pub messages: Vec<Bytes>,
    pub trailers: Option<http::HeaderMap>,
}

impl Answer {
    /// grpc-status from the trailers, or from the headers of a trailers-only response.
    pub fn grpc_status(&self) -> Option<u8> {
        let h = self.trailers.as_ref().unwrap_or(&self.headers);
        h.get("grpc-status")?.to_str().ok()?.parse().ok()
    }

    pub fn grpc_message(&self) -> String {
        let h = self.trailers.as_ref().unwrap_or(&self.headers);
        h.get("grpc-message")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    }
}

pub fn frame(flag: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = vec![flag];
    v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    v.extend_from_slice(payload);
    v
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

pub async fn connect(addr: SocketAddr) -> h2::client::SendRequest<Bytes> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    connect_io(tcp).await.0
}

/// An HTTP/2 client over `io`, with the task that drives the connection: it ends when the
/// server closes the connection.
pub async fn connect_io<T>(
    io: T,
) -> (
    h2::client::SendRequest<Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
)
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (client, conn) = h2::client::handshake(io).await.unwrap();
    (client, tokio::spawn(conn))
}

/// Sends one request (its body in `chunks`; the stream is ended unless `keep_open`) and reads
/// the whole answer.
pub async fn call(
    client: &h2::client::SendRequest<Bytes>,
    path: &str,
    headers: &[(&str, &str)],
    chunks: &[Vec<u8>],
    keep_open: bool,
) -> Answer {
    let mut req = http::Request::builder()
        .method("POST")
        .uri(format!("http://gitplane{path}"))
        .header("te", "trailers");
    if !headers.iter().any(|(k, _)| *k == "content-type") {
        req = req.header("content-type", "application/grpc");
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let mut client = client.clone().ready().await.unwrap();
    let (resp, mut send) = client.send_request(req.body(()).unwrap(), false).unwrap();
    for c in chunks {
        send.send_data(Bytes::copy_from_slice(c), false).unwrap();
    }
    if !keep_open {
        send.send_data(Bytes::new(), true).unwrap();
    }
    let resp = tokio::time::timeout(Duration::from_secs(10), resp)
        .await
        .expect("no response within 10 s")
        .expect("response");
    let (parts, mut body) = resp.into_parts();
    let mut raw = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.expect("response body");
        let _ = body.flow_control().release_capacity(chunk.len());
        raw.extend_from_slice(&chunk);
    }
    let trailers = body.trailers().await.expect("trailers");
    let mut messages = Vec::new();
    let mut rest = &raw[..];
    while !rest.is_empty() {
        match decode(rest, 64 << 20).expect("server frames are well-formed") {
            Decoded::Complete {
                payload, consumed, ..
            } => {
                messages.push(Bytes::copy_from_slice(payload));
                rest = &rest[consumed..];
            }
            Decoded::Incomplete { .. } => panic!("server sent a cut-off message"),
        }
    }
    drop(send);
    Answer {
        http_status: parts.status.as_u16(),
        headers: parts.headers,
        messages,
        trailers,
    }
}
