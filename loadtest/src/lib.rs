//! `gitplane-load`: a load generator for Git hosting that speaks the wire protocol itself on
//! monoio, so one core simulates far more clients than spawning `git` processes could.
//!
//! Layers, top to bottom:
//! - [`cli`]: arguments and their validation into a [`runner::Plan`];
//! - [`runner`]: the monoio threads, closed and open loop, bounds, progress;
//! - [`scenario`]: one clone / fetch-noop / push on the wire;
//! - [`http`] (HTTP/1.1 client) and [`proto`] (Git protocol v2 and receive-pack, sans-I/O), both
//!   framing with gitplane's own codecs;
//! - [`stats`], [`report`], [`plot`]: measurements, the text/JSON report, comparison, SVG;
//! - [`gitcli`]: the real `git`, only outside the measured path (push pack, `--verify`).

pub mod cli;
pub mod gitcli;
pub mod http;
pub mod plot;
pub mod proto;
pub mod report;
pub mod runner;
pub mod scenario;
pub mod stats;
pub mod url;
