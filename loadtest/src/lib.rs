//! `gitplane-load`: a load generator for Git hosting that speaks the wire protocols itself, so
//! one core simulates far more clients than spawning `git` processes could.
//!
//! Layers, top to bottom:
//! - [`cli`]: arguments and their validation into a [`runner::Plan`];
//! - [`runner`]: the load threads, closed and open loop, bounds, progress, on a [`runtime`]
//!   (monoio, or tokio for the tokio-bound SSH and HTTP/2 crates);
//! - [`scenario`]: one iteration of each scenario on the wire (Git over HTTP and git://, push,
//!   LFS, SSH, gRPC);
//! - transports: [`http`] (HTTP/1.1 client on monoio), [`stream`] (Git over a byte stream:
//!   git://, SSH channels), [`net`] (their shared failures);
//! - sans-I/O protocol: [`proto`] (pkt-line parsers and requests), [`upload`] (the clone and
//!   fetch conversation both transports drive), [`lfs_api`] (batch JSON, generated objects),
//!   all framing with gitplane's own codecs;
//! - [`stats`], [`report`], [`plot`]: measurements, the text/JSON report, comparison, SVG;
//! - [`url`]: targets; [`gitcli`]: the real `git`, only outside the measured path (push pack,
//!   `--verify`).

pub mod cli;
pub mod gitcli;
pub mod http;
pub mod lfs_api;
pub mod net;
pub mod plot;
pub mod proto;
pub mod report;
pub mod runner;
pub mod runtime;
pub mod scenario;
pub mod stats;
pub mod stream;
pub mod upload;
pub mod url;
