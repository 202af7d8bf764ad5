//! Pack cache counters shared between the hook processes and the server's `/metrics`. Each hook
//! is a short-lived child of `git upload-pack`, with no channel back to the server. So the
//! counters live in a small file in the cache directory that every process maps shared and
//! updates with atomic adds: no locks, no messages, and nothing lost when a hook is killed.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

/// File name inside the cache directory; [`super::pack_cache::evict`] skips it.
pub const STATS_FILE: &str = "stats";

#[derive(Debug, Clone, Copy)]
pub enum Counter {
    /// Fetches answered from an entry.
    Hits,
    /// Fetches that generated a pack and stored it.
    Misses,
    /// Fetches that ran pack-objects without the cache (too large a request, a cache error).
    Bypassed,
    /// Pack bytes sent from entries.
    HitBytes,
}

impl Counter {
    pub const ALL: [Counter; 4] = [
        Counter::Hits,
        Counter::Misses,
        Counter::Bypassed,
        Counter::HitBytes,
    ];

    /// The Prometheus name and help text.
    pub fn describe(self) -> (&'static str, &'static str) {
        match self {
            Counter::Hits => (
                "gitplane_pack_cache_hits_total",
                "Fetches answered from the pack-objects cache.",
            ),
            Counter::Misses => (
                "gitplane_pack_cache_misses_total",
                "Fetches that generated a pack and stored it in the cache.",
            ),
            Counter::Bypassed => (
                "gitplane_pack_cache_bypassed_total",
                "Fetches that ran pack-objects without the cache (oversized request or cache error).",
            ),
            Counter::HitBytes => (
                "gitplane_pack_cache_hit_bytes_total",
                "Pack bytes sent from the cache.",
            ),
        }
    }
}

const SLOTS: usize = Counter::ALL.len();

/// The shared counters, mapped from `DIR/stats`.
pub struct Stats {
    slots: NonNull<AtomicU64>,
}

// SAFETY: the mapping holds only atomics, and it stays mapped for the life of `Stats`.
unsafe impl Send for Stats {}
// SAFETY: as above; every access is an atomic operation.
unsafe impl Sync for Stats {}

impl Stats {
    /// Maps `dir/stats`, creating it (zeroed) if needed.
    pub fn open(dir: &Path) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join(STATS_FILE))?;
        let len = SLOTS * std::mem::size_of::<AtomicU64>();
        if file.metadata()?.len() < len as u64 {
            // Extending only appends zeros, so a process racing us sees zeros or our length.
            file.set_len(len as u64)?;
        }
        // SAFETY: a fresh shared mapping of `len` bytes of a file at least that long; the
        // descriptor may close afterwards, the mapping stays.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let slots = NonNull::new(ptr.cast::<AtomicU64>()).ok_or_else(io::Error::last_os_error)?;
        Ok(Self { slots })
    }

    fn slot(&self, counter: Counter) -> &AtomicU64 {
        // SAFETY: page-aligned mapping of SLOTS u64s; `counter as usize` < SLOTS.
        unsafe { &*self.slots.as_ptr().add(counter as usize) }
    }

    pub fn add(&self, counter: Counter, n: u64) {
        self.slot(counter).fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self, counter: Counter) -> u64 {
        self.slot(counter).load(Ordering::Relaxed)
    }
}

impl Drop for Stats {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `open` mapped; no reference outlives `self`.
        unsafe {
            libc::munmap(
                self.slots.as_ptr().cast(),
                SLOTS * std::mem::size_of::<AtomicU64>(),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_mappings_of_one_directory_share_counts() {
        let dir = tempfile::tempdir().unwrap();
        let a = Stats::open(dir.path()).unwrap();
        let b = Stats::open(dir.path()).unwrap();
        a.add(Counter::Hits, 2);
        b.add(Counter::Hits, 3);
        b.add(Counter::HitBytes, 100);
        assert_eq!(a.get(Counter::Hits), 5);
        assert_eq!(a.get(Counter::HitBytes), 100);
        assert_eq!(a.get(Counter::Misses), 0);
        drop(a);
        assert_eq!(Stats::open(dir.path()).unwrap().get(Counter::Hits), 5);
    }
}
