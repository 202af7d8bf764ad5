//! Git LFS: the Batch API, basic transfers (PUT/GET with Range), verify, and the Locking API,
//! on the shard's HTTP server at `/OWNER/NAME.git/info/lfs/...`.
//!
//! - [`api`]: the JSON and the batch decision (no I/O);
//! - [`pool`]: the per-shard pool of pinned, page-aligned transfer buffers that bounds memory;
//! - [`storage`]: verified objects on local disk; [`s3`] and [`sigv4`]: or in S3-compatible storage;
//! - [`s3_bridge`]: that S3 client on a thread of its own, for the tokio SSH sidecars;
//! - [`http`]: the request handlers; [`send`]: a download's paced send loop.

pub mod http;
pub mod pool;
pub mod s3;
pub mod s3_bridge;
mod send;
pub mod sigv4;
pub mod storage;

pub use gitplane_wire::lfs::api;
