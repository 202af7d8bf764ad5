//! What the connection supervisor ([`super::conn`]) needs to know about a connection, written by
//! the handler ([`super::handler`]) and by running execs ([`super::exec`]): whether it has
//! authenticated, and how many git processes run for it.

use std::sync::Arc;

use tokio::sync::watch;

#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Phase {
    pub authenticated: bool,
    /// git processes running for this connection.
    pub execs: usize,
}

/// Counts a running exec in the connection's phase (the supervisor watches it for liveness
/// checks and for shutdown).
pub(super) struct ExecGuard(Arc<watch::Sender<Phase>>);

impl ExecGuard {
    pub fn new(phase: Arc<watch::Sender<Phase>>) -> Self {
        phase.send_modify(|p| p.execs += 1);
        Self(phase)
    }
}

impl Drop for ExecGuard {
    fn drop(&mut self) {
        self.0.send_modify(|p| p.execs = p.execs.saturating_sub(1));
    }
}
