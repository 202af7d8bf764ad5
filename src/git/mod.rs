//! Everything git-facing that every front end shares: repository names and paths, the pkt-line
//! codec, spawning `git` service processes, the pack concurrency limiter, the pack-objects cache
//! and its counters, and streaming a child's output to a socket with splice.

pub mod limiter;
pub mod pack_cache;
pub mod pack_cache_stats;
pub mod process;
pub mod repo;
pub mod stream;
pub mod tokio_child;

pub use gitplane_wire::git::{pktline, repo_name};
