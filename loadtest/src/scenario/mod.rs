//! What one iteration of each scenario does on the wire, behind [`Workload`]: the runner calls
//! [`Workload::iterate`] in a loop (closed loop) or on a schedule (open loop), under the run's
//! per-iteration timeout, and records the [`Outcome`] or the [`IterError`] by its kind.
//!
//! - [`git`]: `clone`, `fetch-noop` and `push` over smart HTTP; `clone` and `fetch-noop` over
//!   git:// (monoio);
//! - [`lfs`]: `lfs-upload` and `lfs-download` through the Git LFS batch API (monoio);
//! - [`ssh`]: `ssh-clone`, a russh client (tokio);
//! - [`grpc`]: one chosen RPC of the repository API over HTTP/2 (h2 on tokio).

pub mod git;
pub mod grpc;
pub mod lfs;
pub mod ssh;

use std::future::Future;
use std::time::Duration;

use thiserror::Error;

use crate::http::HttpError;
use crate::net::NetError;
use crate::proto::ProtoError;
use crate::runtime::Rt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    Clone,
    FetchNoop,
    Push,
    LfsDownload,
    LfsUpload,
    SshClone,
    Grpc,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Self::Clone => "clone",
            Self::FetchNoop => "fetch-noop",
            Self::Push => "push",
            Self::LfsDownload => "lfs-download",
            Self::LfsUpload => "lfs-upload",
            Self::SshClone => "ssh-clone",
            Self::Grpc => "grpc",
        }
    }
}

/// Why one iteration failed.
#[derive(Debug, Error)]
pub enum IterError {
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error(transparent)]
    Proto(#[from] ProtoError),
    #[error(transparent)]
    Lfs(#[from] crate::lfs_api::LfsError),
    #[error(transparent)]
    Ssh(#[from] ssh::SshError),
    #[error(transparent)]
    Grpc(#[from] grpc::GrpcError),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

impl IterError {
    /// The key in the errors-by-kind table.
    pub fn kind(&self) -> String {
        match self {
            Self::Net(e) => e.kind().into(),
            Self::Http(e) => e.kind(),
            Self::Proto(e) => e.kind().into(),
            Self::Lfs(e) => e.kind(),
            Self::Ssh(e) => e.kind().into(),
            Self::Grpc(e) => e.kind(),
            Self::Timeout(_) => "timeout".into(),
        }
    }
}

/// What one successful iteration moved.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Payload bytes: pack bytes received (clone) or sent (push), object bytes (LFS), response
    /// message bytes (gRPC).
    pub bytes: u64,
    /// The received pack, when the iteration was asked to capture it for `--verify`.
    pub pack: Option<Vec<u8>>,
    /// Git upload-pack conversations: the protocol version the server answered with.
    pub protocol: Option<u8>,
}

/// What the runner tells one iteration.
#[derive(Debug, Clone, Copy)]
pub struct Iteration<'a> {
    /// A name unique among the iterations in flight (push: the branch to move).
    pub slot: &'a str,
    /// Keep the received pack for `--verify`.
    pub capture: bool,
}

/// A kind of load. Shared read-only by every thread; all per-client state is in
/// [`Workload::Client`].
pub trait Workload: Send + Sync + 'static {
    /// The runtime its iterations need.
    type Rt: Rt;
    /// What a virtual client keeps between its iterations (e.g. a kept HTTP/2 connection). The
    /// runner makes one per closed-loop client, and one per thread that its open-loop
    /// iterations share.
    type Client: 'static;

    fn client(&self) -> Self::Client;

    /// One iteration (the runner bounds it with the run's timeout).
    fn iterate(
        &self,
        client: &Self::Client,
        it: Iteration<'_>,
    ) -> impl Future<Output = Result<Outcome, IterError>>;
}
