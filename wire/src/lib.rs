//! The parsers every gitplane front end puts between the network and the rest of the server.
//! Each is sans-I/O: bytes in, typed values or typed errors out, bounded by explicit limits, so
//! each can be unit-tested at every split point and fuzzed on its own.
//!
//! The gitplane crate re-exports these modules at the paths its front ends use
//! (`gitplane::http::head`, `gitplane::git::pktline`, ...).

mod hex;

pub mod cluster;

pub mod http {
    pub mod chunked;
    pub mod forwarded;
    pub mod head;
    pub mod response;
}

pub mod git {
    pub mod ls_refs;
    pub mod pktline;
    pub mod repo_name;
    pub mod service;
}

pub mod net {
    pub mod proxy_protocol;
}

pub mod rpc {
    pub mod frame;
    pub mod status;
}

pub mod lfs {
    pub mod api;
}

pub mod ssh {
    pub mod command;
    pub mod lfs_transfer;
}
