//! The channel idle deadline (`ssh.channel_idle_secs`): a git or git-lfs-transfer channel whose
//! client moves no byte for that long is cut (channel closed, git killed, its pack slot and
//! buffers returned).
//!
//! russh's `inactivity_timeout` (`ssh.idle_timeout_secs`) sees only the connection as a whole:
//! keepalive replies, or traffic on another channel, keep it alive. A client can therefore keep
//! the transport up and stall one channel, by not sending while git waits on stdin or by not
//! reading so that the channel window stays shut, and hold that channel's git process forever.
//! The deadline here watches the bytes of the channel itself.
//!
//! - A git exec ([`Activity`]): no byte either way for the idle time. git reports progress or
//!   sends keepalives (`uploadpack.keepAlive`, `receive.keepAlive`, 5 s by default) while it works
//!   silently, so a channel quiet that long is waiting for its client.
//! - git-lfs-transfer ([`client_wait`]): each wait for the client (the next message, or a write
//!   its window must admit) is bounded; time the server spends on its own work (fsync, an S3
//!   upload) does not count.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::metrics::{Cut, METRICS};

/// The client moved no byte on the channel within the idle time.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("no byte moved on the channel for {0:?}")]
pub(super) struct ChannelStalled(pub Duration);

/// When bytes last moved on one channel, either way.
pub(super) struct Activity {
    idle: Duration,
    base: Instant,
    /// Milliseconds after `base` of the last byte.
    last_ms: AtomicU64,
}

impl Activity {
    pub fn new(idle: Duration) -> Self {
        Self {
            idle,
            base: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    /// Records that bytes moved now.
    pub fn moved(&self) {
        let ms = u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// Resolves once no byte has moved for the idle time; counts the cut.
    pub async fn stalled(&self) -> ChannelStalled {
        loop {
            let last = self.base + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let deadline = last + self.idle;
            if Instant::now() >= deadline {
                METRICS.cut(Cut::SshChannelIdle);
                return ChannelStalled(self.idle);
            }
            tokio::time::sleep_until(deadline.into()).await;
        }
    }
}

/// Runs one wait for the client; [`ChannelStalled`] (counted) when it does not end within `idle`.
pub(super) async fn client_wait<T>(
    idle: Duration,
    wait: impl Future<Output = T>,
) -> Result<T, ChannelStalled> {
    tokio::time::timeout(idle, wait).await.map_err(|_| {
        METRICS.cut(Cut::SshChannelIdle);
        ChannelStalled(idle)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn activity_fires_only_after_a_quiet_idle_window() {
        let a = Activity::new(Duration::from_millis(300));
        tokio::time::sleep(Duration::from_millis(200)).await;
        a.moved();
        let started = Instant::now();
        a.stalled().await;
        // The quiet before the byte did not count: the window restarted at it.
        assert!(
            started.elapsed() >= Duration::from_millis(250),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn a_client_wait_is_bounded() {
        let idle = Duration::from_millis(50);
        assert_eq!(client_wait(idle, async { 7 }).await.unwrap(), 7);
        let never = std::future::pending::<()>();
        assert!(client_wait(idle, never).await.is_err());
    }
}
