//! gitplane: a Git hosting data plane, thread-per-core on io_uring.
//!
//! Layers, top to bottom (a module only uses the ones below it):
//! - [`server`]: the composition root: start-up, signals, hot upgrades, graceful shutdown;
//! - the services: [`smart_http`], [`lfs`], [`ssh`], [`rpc`], [`hooks`], [`housekeeping`];
//! - [`runtime`]: the per-core shards and sidecars the services run on;
//! - [`smart_http`]: Git smart HTTP routes on top of [`http`];
//! - [`http`]: the HTTP/1.1 codecs (sans-I/O) and the connection loop;
//! - [`auth`], [`git`], [`store`], [`metrics`]: shared by every front end.

pub mod access;
pub mod admin;
pub mod admission;
pub mod auth;
pub mod clock;
pub mod cluster;
pub mod coarse_timer;
pub mod config;
pub mod git;
pub mod hooks;
pub mod housekeeping;
pub mod http;
pub mod lfs;
pub mod lifecycle;
pub mod metrics;
pub mod procfs;
pub mod progress;
pub mod reused_threads;
pub mod rpc;
pub mod runtime;
pub mod server;
pub mod smart_http;
pub mod ssh;
pub mod store;
pub mod tls_client;
pub mod token;
pub mod tune;
