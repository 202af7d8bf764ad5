//! Shard-local shutdown signal. The shard's watcher flips it when the process is told to stop;
//! the accept loop and idle keep-alive connections wait on it alongside their I/O. Also
//! [`running_exe`], the binary this generation runs, for the commands its git children start.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

/// Every waiting future has one entry, removed when it is dropped: a connection that waited and
/// went away leaves nothing behind (a kept waker would keep its whole task allocated until
/// shutdown: 4 KB per closed connection, measured, before this).
#[derive(Default)]
pub struct ShutdownSignal {
    triggered: Cell<bool>,
    waiters: RefCell<HashMap<u64, Waker>>,
    next_key: Cell<u64>,
}

impl ShutdownSignal {
    pub fn trigger(&self) {
        if !self.triggered.replace(true) {
            let waiters = std::mem::take(&mut *self.waiters.borrow_mut());
            for (_, w) in waiters {
                w.wake();
            }
        }
    }

    pub fn is_triggered(&self) -> bool {
        self.triggered.get()
    }

    /// Resolves once [`Self::trigger`] has been called.
    pub fn wait(&self) -> Triggered<'_> {
        Triggered {
            signal: self,
            key: None,
        }
    }

    /// Futures waiting now.
    #[cfg(test)]
    fn waiting(&self) -> usize {
        self.waiters.borrow().len()
    }
}

pub struct Triggered<'a> {
    signal: &'a ShutdownSignal,
    key: Option<u64>,
}

impl Future for Triggered<'_> {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.signal.triggered.get() {
            return Poll::Ready(());
        }
        let signal = self.signal;
        let mut waiters = signal.waiters.borrow_mut();
        match self.key {
            Some(key) => match waiters.get_mut(&key) {
                Some(w) if w.will_wake(cx.waker()) => {}
                Some(w) => w.clone_from(cx.waker()),
                None => {
                    waiters.insert(key, cx.waker().clone());
                }
            },
            None => {
                let key = signal.next_key.get();
                signal.next_key.set(key.wrapping_add(1));
                waiters.insert(key, cx.waker().clone());
                drop(waiters);
                self.key = Some(key);
            }
        }
        Poll::Pending
    }
}

impl Drop for Triggered<'_> {
    fn drop(&mut self) {
        if let Some(key) = self.key {
            self.signal.waiters.borrow_mut().remove(&key);
        }
    }
}

/// The binary this process runs, for the hook commands git children run (pack-objects cache,
/// push hooks): `/proc/PID/exe`, which keeps naming this generation's binary after a package
/// upgrade replaced the file on disk, so in-flight work never runs a different (or broken) build.
/// It is valid while this process lives. Git children normally end first (with their request, or
/// at shutdown); one that outlives a `kill -9` cannot start its hooks, so its
/// `reference-transaction` refuses the update and nothing moves (see docs/HOOKS.md). Falls back
/// to the path on disk where /proc is missing.
pub fn running_exe() -> std::io::Result<PathBuf> {
    let proc_exe = PathBuf::from(format!("/proc/{}/exe", std::process::id()));
    if proc_exe.exists() {
        Ok(proc_exe)
    } else {
        std::env::current_exe()
    }
}

/// [`running_exe`], looked up once (for the commands this process starts many of, such as
/// `gitplane cluster-exec` relays).
pub fn exe() -> std::sync::Arc<PathBuf> {
    static EXE: std::sync::OnceLock<std::sync::Arc<PathBuf>> = std::sync::OnceLock::new();
    EXE.get_or_init(|| {
        std::sync::Arc::new(running_exe().unwrap_or_else(|_| PathBuf::from("gitplane")))
    })
    .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dropped_wait_leaves_nothing_and_a_trigger_wakes_the_rest() {
        let signal = ShutdownSignal::default();
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .unwrap();
        rt.block_on(async {
            for _ in 0..200 {
                let waited =
                    monoio::time::timeout(std::time::Duration::from_micros(1), signal.wait()).await;
                assert!(waited.is_err());
            }
            assert_eq!(
                signal.waiting(),
                0,
                "timed-out waits left their wakers behind"
            );
            let rc = std::rc::Rc::new(signal);
            let waiter = monoio::spawn({
                let rc = std::rc::Rc::clone(&rc);
                async move { rc.wait().await }
            });
            monoio::time::sleep(std::time::Duration::from_millis(5)).await;
            assert_eq!(rc.waiting(), 1);
            rc.trigger();
            waiter.await;
            assert_eq!(rc.waiting(), 0);
        });
    }
}
