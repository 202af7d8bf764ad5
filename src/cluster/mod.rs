//! The gitplane cluster (#14): every repository on `replication_factor` nodes, any node serves
//! any repository, and a push is acknowledged only once a majority of its replicas hold it.
//! The design, its failure semantics and where it follows or departs from Gitaly's Praefect are
//! in docs/CLUSTER.md.
//!
//! - [`auth`]: the cluster secret and the tokens nodes sign their requests with;
//! - [`transport`]: the node-to-node listener (`--cluster-listen`) and its client;
//! - [`membership`]: heartbeats and who is up;
//! - [`placement`]: which nodes hold a new repository, moves and drains;
//! - [`replicate`]: the coordinator's side of a write (run by the reference-transaction hook);
//! - [`repair`]: bringing outdated replicas up to date.

pub mod auth;
pub mod membership;
pub mod placement;
pub mod repair;
pub mod replicate;
pub mod status;
pub mod transport;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// `[cluster]`, validated.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub listen: SocketAddr,
    pub secret: auth::Secret,
    pub secret_file: PathBuf,
    pub replication_factor: usize,
    /// A node silent this long is down: not read from, not written to, not placed on.
    pub down_after: Duration,
    pub heartbeat: Duration,
    /// Keep relayed answers ([`crate::git::relay_cache`]).
    pub relay_cache: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Transport(#[from] transport::TransportError),
    #[error(transparent)]
    Secret(#[from] auth::SecretError),
    #[error("{0}")]
    Refused(String),
    #[error("git: {0}")]
    Git(String),
}
