//! The per-core runtime the services run on: monoio shards ([`shard`]: io_uring front ends,
//! SO_REUSEPORT listeners, the accept loop, shutdown and drain) and tokio sidecars ([`sidecar`]:
//! russh, lapin, the housekeeping and hook workers, with their stop signal). The services (ssh,
//! rpc, hooks, housekeeping, smart HTTP) build on it; the composition root that starts them all
//! is [`crate::server`], which nothing below imports.

pub mod shard;
pub mod sidecar;
