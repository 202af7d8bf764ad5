//! Inputs and hot paths for gitplane's benches, free of the gitplane crate.
//!
//! - [`inputs`]: deterministic fixtures (request heads, pkt-line negotiations, chunked bodies,
//!   gRPC streams, LFS batch JSON, a `git-lfs-transfer` session).
//! - [`paths`]: one pass of each hot path over those inputs, through `gitplane-wire`.
//!
//! The `gitplane-icount` binary runs a path under callgrind (`bench/icount.sh`); the criterion
//! benches in `bench/benches` use the same inputs and paths for wall-clock figures.

pub mod inputs;
pub mod paths;
