//! `grpc`: one chosen RPC of gitplane's repository API (`proto/gitplane/v1/repository.proto`)
//! over HTTP/2 cleartext with prior knowledge, h2 on the thread's tokio runtime. Messages are the
//! server's own generated types ([`gitplane::rpc::pb`]) framed with its codec
//! ([`gitplane::rpc::frame`]); the request is encoded once and sent by every call.
//!
//! Connections: a client keeps one HTTP/2 connection and makes its calls on it, one after the
//! other in closed loop; in open loop the iterations of one thread share that thread's
//! connection as concurrent streams. A connection that fails is dropped and the next call opens
//! a new one. A call succeeds with `grpc-status: 0` and exactly one response message that
//! decodes as the method's response type; any other status counts as an error of its own kind
//! (`grpc_NOT_FOUND`, ...).

use std::cell::RefCell;
use std::net::SocketAddr;

use bytes::Bytes;
use gitplane::rpc::frame::{self, Encoding, FrameError, MessageReader};
use gitplane::rpc::pb::v1 as pb;
use gitplane::rpc::status::Code;
use h2::client::SendRequest;
use prost::Message;
use thiserror::Error;

use super::{IterError, Iteration, Outcome, Workload};
use crate::net::NetError;
use crate::runtime::Tokio;
use crate::url::{percent_decode, Target};

/// Largest response message accepted.
const MAX_MESSAGE: usize = 16 << 20;
const SERVICE: &str = "/gitplane.v1.RepositoryService/";

/// The RPCs a load can make.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Rpc {
    /// ListBranches (first page, the server's default limit).
    ListBranches,
    /// FindCommit of `--revision`.
    FindCommit,
    /// RepositoryInfo (sizes and counts; the server walks the repository directory).
    RepositoryInfo,
}

impl Rpc {
    fn method(self) -> &'static str {
        match self {
            Self::ListBranches => "ListBranches",
            Self::FindCommit => "FindCommit",
            Self::RepositoryInfo => "RepositoryInfo",
        }
    }

    /// The framed request for `repository`.
    fn request(self, repository: &str, revision: &str) -> Result<Bytes, FrameError> {
        let repository = repository.to_owned();
        match self {
            Self::ListBranches => frame::encode_message(&pb::ListBranchesRequest {
                repository,
                ..Default::default()
            }),
            Self::FindCommit => frame::encode_message(&pb::FindCommitRequest {
                repository,
                revision: revision.to_owned(),
            }),
            Self::RepositoryInfo => {
                frame::encode_message(&pb::RepositoryInfoRequest { repository })
            }
        }
    }

    /// Checks that `message` is a well-formed response of this method.
    fn check(self, message: &[u8]) -> Result<(), prost::DecodeError> {
        match self {
            Self::ListBranches => pb::ListBranchesResponse::decode(message).map(drop),
            Self::FindCommit => pb::FindCommitResponse::decode(message).map(drop),
            Self::RepositoryInfo => pb::RepositoryInfoResponse::decode(message).map(drop),
        }
    }
}

#[derive(Debug, Error)]
pub enum GrpcError {
    #[error("HTTP/2: {0}")]
    H2(#[from] h2::Error),
    #[error("building the request: {0}")]
    Request(#[from] http::Error),
    #[error("HTTP status {0} instead of a gRPC answer")]
    HttpStatus(u16),
    #[error("{code}: {message}")]
    Status { code: &'static str, message: String },
    #[error("grpc-status `{0}` is not a status code")]
    BadStatus(String),
    #[error("the answer ended without grpc-status")]
    NoStatus,
    #[error("gRPC framing: {0}")]
    Frame(#[from] FrameError),
    #[error("the answer's grpc-encoding `{0}` is not supported")]
    Encoding(String),
    #[error("the answer does not decode: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("{0} response messages to a unary call")]
    Messages(usize),
}

impl GrpcError {
    /// The key in the errors-by-kind table.
    pub fn kind(&self) -> String {
        match self {
            Self::H2(_) => "grpc_http2".into(),
            Self::HttpStatus(s) => format!("grpc_http_{s}"),
            Self::Status { code, .. } => format!("grpc_{code}"),
            Self::Request(_)
            | Self::BadStatus(_)
            | Self::NoStatus
            | Self::Frame(_)
            | Self::Encoding(_)
            | Self::Decode(_)
            | Self::Messages(_) => "grpc_protocol".into(),
        }
    }

    /// Whether the connection is no good for further calls.
    fn breaks_connection(&self) -> bool {
        matches!(self, Self::H2(e) if e.is_io() || e.is_go_away() || e.reason().is_none())
    }
}

/// The canonical codes, to name a `grpc-status` value as the server does.
const CODES: [Code; 17] = [
    Code::Ok,
    Code::Cancelled,
    Code::Unknown,
    Code::InvalidArgument,
    Code::DeadlineExceeded,
    Code::NotFound,
    Code::AlreadyExists,
    Code::PermissionDenied,
    Code::ResourceExhausted,
    Code::FailedPrecondition,
    Code::Aborted,
    Code::OutOfRange,
    Code::Unimplemented,
    Code::Internal,
    Code::Unavailable,
    Code::DataLoss,
    Code::Unauthenticated,
];

/// The call's outcome from `grpc-status` / `grpc-message` in `headers`, `None` when absent.
fn status_of(headers: &http::HeaderMap) -> Option<Result<(), GrpcError>> {
    let raw = headers.get("grpc-status")?;
    let text = raw.to_str().unwrap_or("?");
    let code = text
        .parse::<u8>()
        .ok()
        .and_then(|n| CODES.iter().find(|c| c.as_u8() == n));
    Some(match code {
        Some(Code::Ok) => Ok(()),
        Some(c) => Err(GrpcError::Status {
            code: c.name(),
            message: headers
                .get("grpc-message")
                .and_then(|m| m.to_str().ok())
                .map(percent_decode)
                .unwrap_or_default(),
        }),
        None => Err(GrpcError::BadStatus(text.escape_default().to_string())),
    })
}

pub struct GrpcLoad {
    addr: SocketAddr,
    uri: http::Uri,
    authorization: http::HeaderValue,
    rpc: Rpc,
    request: Bytes,
    display_url: String,
}

/// Why a grpc load cannot start.
#[derive(Debug, Error)]
pub enum GrpcSetupError {
    #[error("the token is not a valid header value")]
    Token,
    #[error("`{0}` does not make a request URI")]
    Uri(String),
    #[error("encoding the request: {0}")]
    Encode(#[from] FrameError),
}

impl GrpcLoad {
    /// Calls of `rpc` on the repository `target` names, at `target`'s address (the gRPC
    /// listener), with the bearer `token`.
    ///
    /// # Errors
    /// When the token or the URL cannot be put in a request.
    pub fn new(
        target: &Target,
        rpc: Rpc,
        token: &str,
        revision: &str,
    ) -> Result<Self, GrpcSetupError> {
        let uri = format!("http://{}{SERVICE}{}", target.authority, rpc.method());
        Ok(Self {
            addr: target.addr,
            uri: uri.parse().map_err(|_| GrpcSetupError::Uri(uri.clone()))?,
            authorization: http::HeaderValue::from_str(&format!("Bearer {}", token.trim()))
                .map_err(|_| GrpcSetupError::Token)?,
            rpc,
            request: rpc.request(target.repository(), revision)?,
            display_url: format!("{} ({})", target.display_url(), rpc.method()),
        })
    }

    /// The URL and method, for reports.
    pub fn display_url(&self) -> &str {
        &self.display_url
    }

    async fn connect(&self) -> Result<SendRequest<Bytes>, IterError> {
        let addr = self.addr;
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|source| NetError::Connect { addr, source })?;
        let _ = tcp.set_nodelay(true);
        let (send, conn) = h2::client::Builder::new()
            .initial_window_size(1 << 20)
            .initial_connection_window_size(4 << 20)
            .handshake::<_, Bytes>(tcp)
            .await
            .map_err(GrpcError::from)?;
        // The connection task ends when the last `SendRequest` is dropped or the server closes.
        tokio::task::spawn_local(async move {
            let _ = conn.await;
        });
        Ok(send)
    }

    /// One call on `send`; returns the response message bytes.
    async fn call(&self, send: SendRequest<Bytes>) -> Result<u64, GrpcError> {
        let mut send = send.ready().await?;
        let req = http::Request::builder()
            .method(http::Method::POST)
            .uri(self.uri.clone())
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("authorization", self.authorization.clone())
            .header(
                "user-agent",
                concat!("gitplane-load/", env!("CARGO_PKG_VERSION")),
            )
            .body(())?;
        let (response, mut body) = send.send_request(req, false)?;
        body.send_data(self.request.clone(), true)?;
        let (head, mut recv) = response.await?.into_parts();
        if head.status != http::StatusCode::OK {
            return Err(GrpcError::HttpStatus(head.status.as_u16()));
        }
        // Trailers-only: the status is in the headers and there is no body.
        if let Some(status) = status_of(&head.headers) {
            status?;
            return Err(GrpcError::Messages(0));
        }
        let encoding_header = head
            .headers
            .get("grpc-encoding")
            .map(|v| v.to_str().unwrap_or("?"));
        let encoding = Encoding::from_header(encoding_header)
            .ok_or_else(|| GrpcError::Encoding(encoding_header.unwrap_or_default().to_owned()))?;
        let mut reader = MessageReader::new(MAX_MESSAGE, encoding);
        let (mut messages, mut bytes) = (0usize, 0u64);
        while let Some(chunk) = recv.data().await {
            let chunk = chunk?;
            let _ = recv.flow_control().release_capacity(chunk.len());
            reader.push(&chunk);
            while let Some(m) = reader.next_message()? {
                self.rpc.check(&m)?;
                messages += 1;
                bytes += m.len() as u64;
            }
        }
        reader.finish()?;
        let trailers = recv.trailers().await?.ok_or(GrpcError::NoStatus)?;
        status_of(&trailers).ok_or(GrpcError::NoStatus)??;
        if messages != 1 {
            return Err(GrpcError::Messages(messages));
        }
        Ok(bytes)
    }
}

/// A client's HTTP/2 connection, made on first use.
#[derive(Default)]
pub struct GrpcClient {
    conn: RefCell<Option<SendRequest<Bytes>>>,
}

impl Workload for GrpcLoad {
    type Rt = Tokio;
    type Client = GrpcClient;

    fn client(&self) -> GrpcClient {
        GrpcClient::default()
    }

    async fn iterate(&self, client: &GrpcClient, _it: Iteration<'_>) -> Result<Outcome, IterError> {
        let kept = client.conn.borrow().clone();
        let send = match kept {
            Some(s) => s,
            None => {
                let s = self.connect().await?;
                *client.conn.borrow_mut() = Some(s.clone());
                s
            }
        };
        match self.call(send).await {
            Ok(bytes) => Ok(Outcome {
                bytes,
                ..Outcome::default()
            }),
            Err(e) => {
                if e.breaks_connection() {
                    client.conn.borrow_mut().take();
                }
                Err(e.into())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_named_as_the_server_names_them() {
        let mut h = http::HeaderMap::new();
        assert!(status_of(&h).is_none());
        h.insert("grpc-status", http::HeaderValue::from_static("0"));
        assert!(matches!(status_of(&h), Some(Ok(()))));
        h.insert("grpc-status", http::HeaderValue::from_static("5"));
        h.insert(
            "grpc-message",
            http::HeaderValue::from_static("no%20such%20repository"),
        );
        let e = status_of(&h).unwrap().unwrap_err();
        assert_eq!(e.kind(), "grpc_NOT_FOUND");
        assert_eq!(e.to_string(), "NOT_FOUND: no such repository");
        h.insert("grpc-status", http::HeaderValue::from_static("99"));
        assert_eq!(status_of(&h).unwrap().unwrap_err().kind(), "grpc_protocol");
        for (i, c) in CODES.iter().enumerate() {
            assert_eq!(usize::from(c.as_u8()), i);
        }
    }

    #[test]
    fn requests_decode_as_the_server_reads_them() {
        let f = Rpc::FindCommit.request("o/r", "main").unwrap();
        let frame::Decoded::Complete { payload, .. } = frame::decode(&f, 1024).unwrap() else {
            panic!("incomplete")
        };
        let back = pb::FindCommitRequest::decode(payload).unwrap();
        assert_eq!(
            (back.repository.as_str(), back.revision.as_str()),
            ("o/r", "main")
        );
    }
}
