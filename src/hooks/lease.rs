//! One dispatcher per data directory. During a hot upgrade two generations of the server run on
//! the same data directory for a while; if both read the outbox, both would start the jobs of
//! the same events, and a job that has not recorded its end yet would run twice. So the outbox
//! is read (embedded dispatcher, AMQP relay) only by the process that holds an exclusive `flock`
//! on `DATA/hooks/dispatch.lock`. The holder keeps it until it exits, that is until its own
//! in-flight jobs have ended; the next generation waits for it, so events reach it late by at
//! most the old one's drain (bounded by `shutdown.grace_secs`), and never twice.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use crate::runtime::sidecar::{stopped, StopSignal};

/// Where the lock lives, set once at start-up.
static PATH: OnceLock<PathBuf> = OnceLock::new();
/// The lock, once this process holds it: kept open until the process exits.
static HELD: OnceLock<File> = OnceLock::new();

const RETRY: Duration = Duration::from_millis(250);

/// Names the lock file (`DATA/hooks/dispatch.lock`).
pub fn init(path: PathBuf) {
    let _ = PATH.set(path);
}

/// Waits until this process holds the lease; false if told to stop first.
pub async fn acquire(stop: &mut StopSignal) -> bool {
    let Some(path) = PATH.get() else {
        return true;
    };
    let mut told = false;
    loop {
        if HELD.get().is_some() {
            return true;
        }
        match try_lock(path) {
            Ok(Some(file)) => {
                // Another core of this process may have won meanwhile: either way we hold it.
                let _ = HELD.set(file);
                return true;
            }
            Ok(None) if !told => {
                told = true;
                tracing::info!(lock = %path.display(), "another gitplane process dispatches this data directory's push events (a previous generation draining?); waiting for it");
            }
            Ok(None) => {}
            Err(e) => {
                // Without a lock file there is nothing to coordinate with: dispatch anyway.
                tracing::warn!(lock = %path.display(), error = %e, "cannot open the dispatch lock; dispatching without it");
                return true;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(RETRY) => {}
            _ = stopped(stop) => return false,
        }
    }
}

fn try_lock(path: &PathBuf) -> std::io::Result<Option<File>> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    // SAFETY: flock on an fd we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(Some(file));
    }
    let e = std::io::Error::last_os_error();
    if e.kind() == std::io::ErrorKind::WouldBlock {
        Ok(None)
    } else {
        Err(e)
    }
}
