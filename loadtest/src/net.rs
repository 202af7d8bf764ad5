//! Transport failures every client of the tool shares, whichever runtime carries the socket
//! (monoio for HTTP/1.1, git:// and LFS; tokio for SSH and gRPC): connecting, reading and
//! writing, and an early end of stream.

use std::net::SocketAddr;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum NetError {
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("server closed the connection {during}")]
    Eof { during: &'static str },
}

impl NetError {
    /// A short, stable name for the errors-by-kind table.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Connect { .. } => "connect",
            Self::Io { .. } => "io",
            Self::Eof { .. } => "eof",
        }
    }

    /// An I/O failure while doing `op`.
    pub fn io(op: &'static str) -> impl FnOnce(std::io::Error) -> Self {
        move |source| Self::Io { op, source }
    }
}
