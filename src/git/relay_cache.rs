//! A relaying node's copies of the answers it relayed (#14). A node holding no current copy of a
//! repository relays each read to one that does ([`super::relay`]), and every byte of a clone
//! then crosses both nodes' TCP stacks: on the 52 MB bench fixture the relaying node spent 65-70%
//! of what the serving node spends, however little it does in user space. Many clients ask the
//! same (a CI fleet cloning one commit), so the second time a smart HTTP upload-pack request
//! comes (the advertisement, ls-refs, a fetch), a relaying node keeps the answer it relays, and
//! serves later identical requests from its own disk, as a node holding a copy serves its pack
//! cache.
//!
//! Validity: an entry is keyed on the repository's row and generation in the shared store (one
//! more per acknowledged write), the request's mode, protocol and whole body. The relaying node
//! reads the generation when it routes; the holding node, asked with
//! [`CACHE_GENERATION_VAR`], answers with a `current` frame only if, before git starts, its copy
//! had no write between vote and commit (the coordinator's copy lags its generation in that
//! window) and the store still counted it current at that generation: so the answer shows that
//! generation's refs or later ones, never earlier. Without that frame nothing is kept. Entries
//! share the pack cache's directory, disk budget, age limit and eviction; `[cluster] relay_cache
//! = false` turns this off, `[git] pack_cache = false` both.

use std::collections::{HashSet, VecDeque};
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{LazyLock, Mutex};

use sha2::{Digest, Sha256};

pub use gitplane_wire::cluster::CACHE_GENERATION_VAR;

use super::pack_cache::{self, Entry, PackCacheSettings};
use super::process::{Mode, RepoGeneration, Service};
use crate::metrics::METRICS;

/// A request body larger than this (a fetch with a long have list) is relayed, not kept.
const MAX_KEYED_REQUEST: usize = 64 * 1024;
/// How many recent keys [`SEEN`] remembers.
const SEEN_KEYS: usize = 8192;

/// Keys asked for once. An answer is kept the second time its request comes: writing a 52 MB
/// pack into the page cache while relaying it cost the relaying node 94-139 ms against 26-27 ms
/// for the relay alone, and most fetches (a developer's, with haves) are asked once and never
/// again.
static SEEN: LazyLock<Mutex<Seen>> = LazyLock::new(Mutex::default);

/// The last [`SEEN_KEYS`] keys asked for.
#[derive(Default)]
struct Seen {
    keys: HashSet<String>,
    /// The same keys, oldest first.
    order: VecDeque<String>,
}

impl Seen {
    /// Whether `key` was asked for before; remembers it either way.
    fn saw(&mut self, key: String) -> bool {
        if self.keys.contains(&key) {
            return true;
        }
        if self.order.len() == SEEN_KEYS {
            if let Some(oldest) = self.order.pop_front() {
                self.keys.remove(&oldest);
            }
        }
        self.keys.insert(key.clone());
        self.order.push_back(key);
        false
    }
}

/// What a relay sends up as git's stdin.
pub enum Request {
    /// The whole body, read already (empty for an advertisement).
    Whole(Vec<u8>),
    /// Its first part, read already, then the rest of the stream.
    Rest(Vec<u8>, UnixStream),
    /// All of it still to come, sent before the answer is read (git reads it whole first).
    First(UnixStream),
    /// All of it still to come, sent while the answer comes back (git talks both ways).
    Alongside(UnixStream),
}

/// What the cache makes of one relayed request.
pub enum Plan {
    /// Serve this entry of `len` bytes; nothing goes to the holding node.
    Hit(File, u64),
    /// Relay, asking the holder whether its answer may be kept, into the entry under its lock.
    Keep(Keeping, Request),
    /// Relay as if there were no cache.
    Relay(Request),
}

/// A miss being written: the entry's lock and its temp file.
pub struct Keeping {
    pub generation: i64,
    settings: PackCacheSettings,
    entry: Entry,
    temp: (PathBuf, File),
    _lock: File,
}

impl Keeping {
    pub fn file(&self) -> &File {
        &self.temp.1
    }

    /// Publishes the entry when the relay `complete`d with the holder's `current` frame.
    pub fn finish(self, complete: bool) {
        if self.entry.publish(self.temp, complete, &self.settings) {
            METRICS.relay_cache_stored.inc();
        }
    }
}

/// Which relayed requests can be kept: smart HTTP upload-pack, whose answer depends only on the
/// repository's state and the request (SSH's interactive conversations cannot be replayed).
pub fn applies(service: Service, mode: Mode) -> bool {
    service == Service::UploadPack && matches!(mode, Mode::StatelessRpc | Mode::AdvertiseRefs)
}

/// The entry name: SHA-256 over the repository's state, the request's shape and its body.
pub fn key(
    repo: &str,
    generation: RepoGeneration,
    mode: Mode,
    protocol: Option<&str>,
    body: &[u8],
) -> String {
    let mut h = Sha256::new();
    h.update(b"gitplane-relay-cache-v1\0");
    // Length-prefixed, so no two field lists hash alike.
    for field in [
        repo.as_bytes(),
        &generation.repo_id.to_le_bytes(),
        &generation.number.to_le_bytes(),
        format!("{mode:?}").as_bytes(),
        protocol.unwrap_or("").as_bytes(),
        body,
    ] {
        h.update((field.len() as u64).to_le_bytes());
        h.update(field);
    }
    format!("relay-{}", hex::encode(h.finalize()))
}

/// Decides how to relay one request of `repo` at `generation`, reading its body (`stdin`) first.
pub fn plan(
    repo: &str,
    generation: Option<RepoGeneration>,
    service: Service,
    mode: Mode,
    protocol: Option<&str>,
    stdin: Option<UnixStream>,
) -> io::Result<Plan> {
    let (Some(generation), Some(settings)) = (
        generation.filter(|_| applies(service, mode)),
        pack_cache::settings(),
    ) else {
        return Ok(Plan::Relay(match stdin {
            Some(s) if super::process::reads_request_first(service, mode) => Request::First(s),
            Some(s) => Request::Alongside(s),
            None => Request::Whole(Vec::new()),
        }));
    };
    let mut body = Vec::new();
    if let Some(mut stream) = stdin {
        (&mut stream)
            .take(MAX_KEYED_REQUEST as u64 + 1)
            .read_to_end(&mut body)?;
        if body.len() > MAX_KEYED_REQUEST {
            return Ok(Plan::Relay(Request::Rest(body, stream)));
        }
    }
    let name = key(repo, generation, mode, protocol, &body);
    let entry = Entry::named(&settings, &name);
    let hit = |entry: &Entry| {
        let file = entry.fresh_pack(settings.max_age)?;
        let len = file.metadata().ok()?.len();
        METRICS.relay_cache_hits.inc();
        METRICS.relay_cache_hit_bytes.add(len);
        Some(Plan::Hit(file, len))
    };
    if let Some(plan) = hit(&entry) {
        return Ok(plan);
    }
    if !SEEN.lock().unwrap_or_else(|p| p.into_inner()).saw(name) {
        return Ok(Plan::Relay(Request::Whole(body)));
    }
    // Concurrent misses of one key wait here for the first, then serve its entry.
    let Ok(lock) = entry.lock() else {
        return Ok(Plan::Relay(Request::Whole(body)));
    };
    if let Some(plan) = hit(&entry) {
        return Ok(plan);
    }
    let Some(temp) = entry.temp_file() else {
        return Ok(Plan::Relay(Request::Whole(body)));
    };
    let keeping = Keeping {
        generation: generation.number,
        settings,
        entry,
        temp,
        _lock: lock,
    };
    Ok(Plan::Keep(keeping, Request::Whole(body)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_separates_states_modes_protocols_and_requests() {
        let g = |repo_id, number| RepoGeneration { repo_id, number };
        let base = key(
            "o/r",
            g(1, 7),
            Mode::StatelessRpc,
            Some("version=2"),
            b"fetch",
        );
        assert!(base.starts_with("relay-") && base.len() == 6 + 64);
        assert_eq!(
            base,
            key(
                "o/r",
                g(1, 7),
                Mode::StatelessRpc,
                Some("version=2"),
                b"fetch"
            )
        );
        for other in [
            key(
                "o/s",
                g(1, 7),
                Mode::StatelessRpc,
                Some("version=2"),
                b"fetch",
            ),
            // The same name deleted and created again: another row.
            key(
                "o/r",
                g(2, 7),
                Mode::StatelessRpc,
                Some("version=2"),
                b"fetch",
            ),
            // One more acknowledged write.
            key(
                "o/r",
                g(1, 8),
                Mode::StatelessRpc,
                Some("version=2"),
                b"fetch",
            ),
            key(
                "o/r",
                g(1, 7),
                Mode::AdvertiseRefs,
                Some("version=2"),
                b"fetch",
            ),
            key("o/r", g(1, 7), Mode::StatelessRpc, None, b"fetch"),
            key(
                "o/r",
                g(1, 7),
                Mode::StatelessRpc,
                Some("version=2"),
                b"fetch ",
            ),
        ] {
            assert_ne!(base, other);
        }
    }

    #[test]
    fn an_answer_is_kept_the_second_time_it_is_asked_for() {
        let mut seen = Seen::default();
        assert!(!seen.saw("a".into()));
        assert!(seen.saw("a".into()));
        for i in 0..SEEN_KEYS {
            seen.saw(format!("k{i}"));
        }
        // Pushed out by newer keys: once more a first time.
        assert!(!seen.saw("a".into()));
        assert_eq!(seen.keys.len(), SEEN_KEYS);
        assert_eq!(seen.order.len(), SEEN_KEYS);
    }

    #[test]
    fn only_smart_http_upload_pack_is_kept() {
        assert!(applies(Service::UploadPack, Mode::StatelessRpc));
        assert!(applies(Service::UploadPack, Mode::AdvertiseRefs));
        assert!(!applies(Service::UploadPack, Mode::Interactive));
        assert!(!applies(Service::ReceivePack, Mode::StatelessRpc));
        assert!(!applies(Service::ReceivePack, Mode::AdvertiseRefs));
    }
}
