//! Git LFS: the Batch API, basic transfers (PUT/GET with Range), verify, and the Locking API,
//! on the shard's HTTP server at `/OWNER/NAME.git/info/lfs/...`.
//!
//! - [`api`]: the JSON and the batch decision (no I/O);
//! - [`pool`]: the per-shard pool of pinned, page-aligned transfer buffers that bounds memory;
//! - [`storage`]: verified objects on local disk; [`s3`] and [`sigv4`]: or in S3-compatible storage;
//! - [`http`]: the request handlers.

pub mod http;
pub mod pool;
pub mod s3;
pub mod sigv4;
pub mod storage;

pub use gitplane_wire::lfs::api;
