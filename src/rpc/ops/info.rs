//! RepositoryInfo: size on disk, default branch, object and ref counts. Object counts are read
//! the way `git count-objects -v` does: loose objects by listing `objects/XX/`, packed ones from
//! each pack index's fan-out table (no pack is opened).

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use git2::Repository;

use super::refs::head_branch;
use super::{git, OpError, OpResult};
use crate::rpc::pb::v1 as pb;
use crate::rpc::pool::CallCtx;

/// Deepest directory nesting followed when adding up the repository's size.
const MAX_DEPTH: usize = 16;

fn io_err(doing: &'static str, path: &Path, source: std::io::Error) -> OpError {
    OpError::Io {
        doing,
        path: path.to_owned(),
        source,
    }
}

/// Apparent size of every file below `dir`.
fn dir_size(dir: &Path, depth: usize, ctx: &CallCtx) -> OpResult<u64> {
    if depth > MAX_DEPTH {
        return Ok(0);
    }
    ctx.check()?;
    let mut total = 0u64;
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        // Files vanish while git gc or a push runs; what is gone takes no space.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io_err("listing", dir, e)),
    };
    for entry in entries.flatten() {
        let Ok(meta) = entry.metadata() else { continue };
        if meta.is_dir() {
            total += dir_size(&entry.path(), depth + 1, ctx)?;
        } else if meta.is_file() {
            total += meta.len();
        }
    }
    Ok(total)
}

/// Objects in a pack index: the last fan-out entry (v1 and v2 formats). Housekeeping reads pack
/// sizes with it too.
pub fn idx_object_count(path: &Path) -> std::io::Result<u64> {
    let mut f = std::fs::File::open(path)?;
    let mut head = [0u8; 8 + 256 * 4];
    f.read_exact(&mut head)?;
    let fanout_start = if head[..4] == [0xff, b't', b'O', b'c'] {
        8
    } else {
        0
    };
    let last = fanout_start + 255 * 4;
    let b = head
        .get(last..last + 4)
        .ok_or_else(|| std::io::Error::other("short index"))?;
    Ok(u64::from(u32::from_be_bytes([b[0], b[1], b[2], b[3]])))
}

pub fn repository_info(
    repo: &Repository,
    name: &str,
    ctx: &CallCtx,
) -> OpResult<pb::RepositoryInfoResponse> {
    let dir = repo.path();
    let objects = dir.join("objects");
    let mut info = pb::RepositoryInfoResponse {
        name: name.to_owned(),
        default_branch: head_branch(repo).unwrap_or_default(),
        ..pb::RepositoryInfoResponse::default()
    };
    let mut refs = 0u32;
    for r in repo.references().map_err(git("listing references"))? {
        let r = r.map_err(git("reading a reference"))?;
        refs += 1;
        let name = r.name_bytes();
        if name.starts_with(b"refs/heads/") {
            info.branches += 1;
        } else if name.starts_with(b"refs/tags/") {
            info.tags += 1;
        }
    }
    info.empty = refs == 0;
    // Loose objects: objects/XX/ with 38 hex digits inside; size as `du` counts it (git reports
    // disk usage for loose objects).
    for fan in 0..=255u8 {
        let sub = objects.join(format!("{fan:02x}"));
        let Ok(entries) = std::fs::read_dir(&sub) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            let ok = name.len() == 38
                && name
                    .to_str()
                    .is_some_and(|n| n.bytes().all(|b| b.is_ascii_hexdigit()));
            if !ok {
                continue;
            }
            if let Ok(meta) = e.metadata() {
                info.loose_objects += 1;
                info.loose_size_bytes += meta.blocks() * 512;
            }
        }
    }
    ctx.check()?;
    // Packs: an index with its pack beside it; sizes are apparent (as git counts them).
    let pack_dir = objects.join("pack");
    if let Ok(entries) = std::fs::read_dir(&pack_dir) {
        for e in entries.flatten() {
            let path = e.path();
            if path.extension().and_then(|x| x.to_str()) != Some("idx") {
                continue;
            }
            let pack = path.with_extension("pack");
            let (Ok(idx_meta), Ok(pack_meta)) = (e.metadata(), std::fs::metadata(&pack)) else {
                continue;
            };
            let count = idx_object_count(&path).map_err(|e| io_err("reading", &path, e))?;
            info.packs += 1;
            info.packed_objects += count;
            info.pack_size_bytes += idx_meta.len() + pack_meta.len();
        }
    }
    info.size_bytes = dir_size(dir, 0, ctx)?;
    Ok(info)
}
