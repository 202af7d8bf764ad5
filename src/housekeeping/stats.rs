//! What a repository looks like on disk, read cheaply from `objects/` and `refs/` (directory
//! listings and pack index headers; no git process): the inputs of [`super::plan`].

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// One pack that geometric and full repacks consider (cruft and `.keep` packs aside).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pack {
    pub bytes: u64,
    pub objects: u64,
    /// Written after the previous maintenance run (by a push).
    pub new: bool,
}

#[derive(Debug, Default, Clone)]
pub struct Stats {
    /// Loose objects, counted over all 256 fan-out directories.
    pub loose_objects: u64,
    pub packs: Vec<Pack>,
    pub cruft_packs: usize,
    /// A pack bitmap or a multi-pack-index bitmap exists.
    pub has_bitmap: bool,
    /// A commit-graph (single file or split chain) exists.
    pub has_commit_graph: bool,
    pub loose_refs: u64,
    /// Temporary and lock files older than their grace period: safe to remove.
    pub stale: Vec<PathBuf>,
}

impl Stats {
    /// Objects in packs written since the previous run.
    pub fn new_pack_objects(&self) -> u64 {
        self.packs.iter().filter(|p| p.new).map(|p| p.objects).sum()
    }
}

/// How old a temporary or lock file must be before it counts as stale.
#[derive(Debug, Clone, Copy)]
pub struct Grace {
    pub tmp: Duration,
    pub lock: Duration,
}

/// Reads the stats of the bare repository `dir`; `last_run` tells new packs from old ones.
pub fn read(dir: &Path, last_run: SystemTime, grace: Grace, now: SystemTime) -> io::Result<Stats> {
    let mut s = Stats::default();
    let objects = dir.join("objects");
    for fanout in 0..=255u8 {
        s.loose_objects += count_entries(&objects.join(format!("{fanout:02x}")), |n| {
            n.len() == 38 && n.bytes().all(|b| b.is_ascii_hexdigit())
        })?;
    }
    let old = |meta: &fs::Metadata, grace: Duration| {
        meta.modified()
            .ok()
            .and_then(|m| now.duration_since(m).ok())
            .is_some_and(|age| age >= grace)
    };
    // git's own temporaries: tmp_obj_*/tmp_pack_* (objects, objects/pack), .tmp-* (repack),
    // incoming-* (a push's quarantine left by a killed receive-pack).
    for d in [objects.clone(), objects.join("pack")] {
        for (path, name, meta) in entries(&d)? {
            let tmp = name.starts_with("tmp_")
                || name.starts_with(".tmp-")
                || name.starts_with("incoming-");
            if tmp && old(&meta, grace.tmp) {
                s.stale.push(path);
            }
        }
    }
    for (path, name, meta) in entries(&objects.join("pack"))? {
        if let Some(stem) = name.strip_suffix(".pack") {
            let idx = objects.join("pack").join(format!("{stem}.idx"));
            let sidecar = |ext: &str| objects.join("pack").join(format!("{stem}.{ext}")).exists();
            if sidecar("keep") || !idx.exists() {
                continue;
            }
            if sidecar("mtimes") {
                s.cruft_packs += 1;
                continue;
            }
            s.packs.push(Pack {
                bytes: meta.len(),
                objects: crate::rpc::ops::info::idx_object_count(&idx).unwrap_or(0),
                new: meta.modified().is_ok_and(|m| m > last_run),
            });
        } else if name.ends_with(".bitmap") {
            s.has_bitmap = true;
        } else if name.ends_with(".lock") && old(&meta, grace.lock) {
            s.stale.push(path);
        }
    }
    let info = objects.join("info");
    s.has_commit_graph = info.join("commit-graph").exists()
        || info.join("commit-graphs/commit-graph-chain").exists();
    for (path, name, meta) in entries(&info.join("commit-graphs"))? {
        if name.ends_with(".lock") && old(&meta, grace.lock) {
            s.stale.push(path);
        }
    }
    for (path, name, meta) in entries(dir)? {
        if name.ends_with(".lock") && meta.is_file() && old(&meta, grace.lock) {
            s.stale.push(path);
        }
    }
    let mut stack = vec![dir.join("refs")];
    while let Some(d) = stack.pop() {
        for (path, name, meta) in entries(&d)? {
            if meta.is_dir() {
                stack.push(path);
            } else if name.ends_with(".lock") {
                if old(&meta, grace.lock) {
                    s.stale.push(path);
                }
            } else {
                s.loose_refs += 1;
            }
        }
    }
    Ok(s)
}

/// The entries of `dir` (none if it does not exist); entries that vanish meanwhile are skipped.
fn entries(dir: &Path) -> io::Result<Vec<(PathBuf, String, fs::Metadata)>> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    Ok(rd
        .filter_map(|e| {
            let e = e.ok()?;
            let meta = e.path().symlink_metadata().ok()?;
            let name = e.file_name().into_string().ok()?;
            Some((e.path(), name, meta))
        })
        .collect())
}

fn count_entries(dir: &Path, keep: impl Fn(&str) -> bool) -> io::Result<u64> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    Ok(rd
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_str().is_some_and(&keep))
        .count() as u64)
}
