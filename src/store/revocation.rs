//! Revocation across nodes. A node trusts a verified password for up to a minute (the per-shard
//! credential cache and the node-wide password gate) so that it does not re-hash it on every
//! request. With a shared store, a password changed or a user removed on another node must stop
//! working here too, at once: every change that takes trust away sends a PostgreSQL `NOTIFY` on
//! [`CHANNEL`] in the transaction that makes it, and each node keeps one connection `LISTEN`ing.
//!
//! Trust is tied to an epoch: cached answers are valid only in the epoch they were made in. A
//! notice starts a new epoch (every cached password on the node is checked again once, which is
//! cheap next to how rare revocations are). While the listening connection is down a node could
//! miss a notice, so it trusts nothing cached ([`epoch`] is None) until it listens again, and the
//! reconnect itself starts a new epoch. The bound on revocation is therefore the notice's delivery
//! time, not the cache's lifetime. The embedded store (one node) has no listener: its epoch never
//! changes, and a change made by the admin CLI reaches a running server within the cache's
//! lifetime (60 s), as before.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use postgres::fallible_iterator::FallibleIterator;

use super::Location;

/// The NOTIFY channel; payloads say what was revoked (`user:NAME`, `key:FP`, `grant:REPO:USER`).
pub const CHANNEL: &str = "gitplane_revocations";

static EPOCH: AtomicU64 = AtomicU64::new(1);
/// False while a shared store's listener is not connected.
static LISTENING: AtomicBool = AtomicBool::new(true);

const RETRY: Duration = Duration::from_secs(1);

/// The current trust epoch, or None when nothing cached may be trusted.
pub fn epoch() -> Option<u64> {
    LISTENING
        .load(Ordering::Acquire)
        .then(|| EPOCH.load(Ordering::Acquire))
}

fn new_epoch() {
    EPOCH.fetch_add(1, Ordering::AcqRel);
}

/// Starts the listener thread for a shared store; nothing for the embedded one.
pub fn listen(location: &Location) {
    let Some(pool) = location.pg_pool().cloned() else {
        return;
    };
    let place = location.describe();
    LISTENING.store(false, Ordering::Release);
    let spawned = std::thread::Builder::new()
        .name("gitplane-revocations".into())
        .spawn(move || loop {
            let why = listen_once(&pool).err().map_or_else(|| "closed".to_owned(), |e| e.to_string());
            if LISTENING.swap(false, Ordering::AcqRel) {
                tracing::warn!(store = %place, error = %why, "revocation listener lost its connection: cached passwords are not trusted until it is back");
            }
            std::thread::sleep(RETRY);
        });
    if let Err(e) = spawned {
        // Without a listener nothing cached is ever trusted: slower, never unsafe.
        tracing::error!(error = %e, "cannot start the revocation listener");
    }
}

fn listen_once(pool: &super::pg::PgPool) -> Result<(), postgres::Error> {
    let mut client = pool.dedicated()?;
    client.batch_execute(&format!("LISTEN {CHANNEL}"))?;
    // Notices sent while we were not listening are lost: start afresh.
    new_epoch();
    if !LISTENING.swap(true, Ordering::AcqRel) {
        tracing::info!("revocation listener connected");
    }
    loop {
        let mut notices = client.notifications();
        let mut it = notices.timeout_iter(RETRY);
        while let Some(n) = it.next()? {
            new_epoch();
            tracing::info!(
                revoked = n.payload(),
                "revocation notice: cached passwords checked again"
            );
        }
        drop(it);
        drop(notices);
        if client.is_closed() {
            return Ok(());
        }
        // An idle connection's death shows only when used: ask the server something.
        client.simple_query("")?;
    }
}
