//! Shard-local shutdown signal. The shard's watcher flips it when the process is told to stop;
//! the accept loop and idle keep-alive connections wait on it alongside their I/O. Also
//! [`running_exe`], the binary this generation runs, for the commands its git children start.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

#[derive(Default)]
pub struct ShutdownSignal {
    triggered: Cell<bool>,
    waiters: RefCell<Vec<Waker>>,
}

impl ShutdownSignal {
    pub fn trigger(&self) {
        if !self.triggered.replace(true) {
            for w in self.waiters.borrow_mut().drain(..) {
                w.wake();
            }
        }
    }

    pub fn is_triggered(&self) -> bool {
        self.triggered.get()
    }

    /// Resolves once [`Self::trigger`] has been called.
    pub fn wait(&self) -> Triggered<'_> {
        Triggered { signal: self }
    }
}

pub struct Triggered<'a> {
    signal: &'a ShutdownSignal,
}

impl Future for Triggered<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.signal.triggered.get() {
            return Poll::Ready(());
        }
        let mut waiters = self.signal.waiters.borrow_mut();
        if !waiters.iter().any(|w| w.will_wake(cx.waker())) {
            waiters.push(cx.waker().clone());
        }
        Poll::Pending
    }
}

/// The binary this process runs, for the hook commands git children run (pack-objects cache,
/// push hooks): `/proc/PID/exe`, which keeps naming this generation's binary after a package
/// upgrade replaced the file on disk, so in-flight work never runs a different (or broken) build.
/// It is valid while this process lives, which outlasts every git child it starts. Falls back to
/// the path on disk where /proc is missing.
pub fn running_exe() -> std::io::Result<PathBuf> {
    let proc_exe = PathBuf::from(format!("/proc/{}/exe", std::process::id()));
    if proc_exe.exists() {
        Ok(proc_exe)
    } else {
        std::env::current_exe()
    }
}
