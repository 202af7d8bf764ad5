//! The handle of a running git: a child process of ours, or a relay thread running git on
//! another node's copy of the repository (see [`super::relay`]). The shard and the SSH sidecar
//! treat both alike: an fd that becomes readable when it ends, a kill, and a reap that never
//! blocks.

use std::sync::Arc;

use super::relay::Ending;

#[derive(Clone)]
pub enum Child {
    /// A process of ours, the leader of its own process group.
    Process(libc::pid_t),
    /// A relay thread.
    Relay(Arc<Ending>),
}

impl std::fmt::Debug for Child {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Child::Process(pid) => write!(f, "git process {pid}"),
            Child::Relay(_) => f.write_str("relayed git"),
        }
    }
}

impl Child {
    /// Stops it now: SIGKILL to the process group (pack-objects too), or a relay's connection
    /// shut down (the node at the other end then kills its git).
    pub fn kill(&self) {
        match self {
            Child::Process(pid) => super::process::kill_group(*pid),
            Child::Relay(ending) => ending.cancel(),
        }
    }

    /// Some(exit code, or 128 + signal) once it has ended; reaps a process.
    pub fn try_reap(&self) -> Option<i32> {
        match self {
            Child::Process(pid) => super::process::try_reap(*pid),
            Child::Relay(ending) => ending.code(),
        }
    }

    /// Blocks until it has ended (for a thread that may block, or a child just killed); its
    /// exit code, or 128 + signal.
    pub fn wait_blocking(&self) -> i32 {
        match self {
            Child::Process(pid) => super::process::wait_blocking(*pid),
            Child::Relay(ending) => ending.wait(),
        }
    }

    /// The process id, for a process.
    pub fn pid(&self) -> Option<libc::pid_t> {
        match self {
            Child::Process(pid) => Some(*pid),
            Child::Relay(_) => None,
        }
    }
}
