//! Message types generated from `proto/` by `build.rs` (prost, compiled with protox).

#![allow(clippy::all, clippy::pedantic, missing_docs)]

/// `gitplane.v1`: the repository API.
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/gitplane.v1.rs"));
}

/// `grpc.health.v1`: the standard health service.
pub mod health {
    include!(concat!(env!("OUT_DIR"), "/grpc.health.v1.rs"));
}
