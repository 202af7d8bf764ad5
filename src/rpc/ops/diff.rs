//! CommitDiff and CompareRefs: file stats and patches between two trees, streamed as a summary,
//! batches of files, and totals.
//!
//! Memory stays bounded whatever the commit: a file whose either side is larger than
//! [`BIG_FILE`] is reported as binary without loading it (`git diff` would also call a 200 MB
//! random blob binary), each patch is cut at `max_patch_bytes`, the call's patch text at
//! `max_total_patch_bytes`, and files past `max_files` are only counted.

use git2::{Delta, DiffFindOptions, DiffOptions, Oid, Patch, Repository, Sort, Tree};

use super::{commit_pb, git, resolve_commit, Emitter, OpError, OpResult};
use crate::rpc::pb::v1 as pb;

/// Blobs above this are not diffed line by line (they would be loaded whole).
pub const BIG_FILE: usize = 32 << 20;
const DEFAULT_MAX_PATCH: usize = 256 << 10;
const MAX_MAX_PATCH: usize = 16 << 20;
const DEFAULT_MAX_TOTAL: u64 = 8 << 20;
const MAX_MAX_TOTAL: u64 = 256 << 20;
const DEFAULT_MAX_FILES: usize = 5000;
/// A batch message is sent once it holds this many files or this many patch bytes.
const BATCH_FILES: usize = 100;
const BATCH_BYTES: usize = 1 << 20;
/// Most commits CompareRefs lists.
const MAX_COMMITS: usize = 1000;

struct Limits {
    include_patch: bool,
    max_patch: usize,
    max_total: u64,
    max_files: usize,
    renames: bool,
}

impl Limits {
    fn from(opts: Option<&pb::DiffOptions>) -> Self {
        let o = opts.cloned().unwrap_or_default();
        Self {
            include_patch: o.include_patch,
            max_patch: match o.max_patch_bytes {
                0 => DEFAULT_MAX_PATCH,
                n => (n as usize).min(MAX_MAX_PATCH),
            },
            max_total: match o.max_total_patch_bytes {
                0 => DEFAULT_MAX_TOTAL,
                n => n.min(MAX_MAX_TOTAL),
            },
            max_files: match o.max_files {
                0 => DEFAULT_MAX_FILES,
                n => n as usize,
            },
            renames: o.detect_renames,
        }
    }
}

fn status_of(d: Delta) -> Option<pb::FileStatus> {
    Some(match d {
        Delta::Added => pb::FileStatus::Added,
        Delta::Deleted => pb::FileStatus::Deleted,
        Delta::Modified => pb::FileStatus::Modified,
        Delta::Renamed => pb::FileStatus::Renamed,
        Delta::Copied => pb::FileStatus::Copied,
        Delta::Typechange => pb::FileStatus::TypeChanged,
        _ => return None,
    })
}

fn id_or_empty(id: Oid) -> String {
    if id.is_zero() {
        String::new()
    } else {
        id.to_string()
    }
}

/// Size of a blob without loading it; 0 for an absent side or a submodule commit.
fn blob_size(odb: &git2::Odb<'_>, id: Oid) -> usize {
    if id.is_zero() {
        return 0;
    }
    match odb.read_header(id) {
        Ok((size, git2::ObjectType::Blob)) => size,
        _ => 0,
    }
}

/// Streams the diff old..new; returns the totals.
fn stream_diff(
    repo: &Repository,
    old: Option<&Tree<'_>>,
    new: &Tree<'_>,
    limits: &Limits,
    out: &Emitter,
) -> OpResult<pb::DiffTotals> {
    let mut opts = DiffOptions::new();
    opts.context_lines(3).ignore_submodules(true);
    let mut diff = repo
        .diff_tree_to_tree(old, Some(new), Some(&mut opts))
        .map_err(git("computing the diff"))?;
    if limits.renames {
        let mut find = DiffFindOptions::new();
        find.renames(true).rename_threshold(50);
        diff.find_similar(Some(&mut find))
            .map_err(git("detecting renames"))?;
    }
    let odb = repo.odb().map_err(git("opening the object database"))?;
    let mut totals = pb::DiffTotals::default();
    let mut batch: Vec<pb::FileDiff> = Vec::new();
    let mut batch_bytes = 0usize;
    let mut patch_budget = limits.max_total;
    for (i, delta) in diff.deltas().enumerate() {
        let Some(status) = status_of(delta.status()) else {
            continue;
        };
        totals.files += 1;
        if totals.files as usize > limits.max_files {
            totals.files_truncated = true;
            continue;
        }
        out.ctx().check()?;
        let (of, nf) = (delta.old_file(), delta.new_file());
        let path_of = |f: &git2::DiffFile<'_>| {
            f.path_bytes()
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .unwrap_or_default()
        };
        let mut file = pb::FileDiff {
            status: status as i32,
            old_path: path_of(&of),
            new_path: path_of(&nf),
            old_id: id_or_empty(of.id()),
            new_id: id_or_empty(nf.id()),
            old_mode: if of.id().is_zero() {
                0
            } else {
                u32::from(of.mode())
            },
            new_mode: if nf.id().is_zero() {
                0
            } else {
                u32::from(nf.mode())
            },
            ..pb::FileDiff::default()
        };
        let big = blob_size(&odb, of.id()).max(blob_size(&odb, nf.id())) > BIG_FILE;
        if big {
            file.binary = true;
            file.patch_truncated = limits.include_patch;
        } else if let Some(mut patch) =
            Patch::from_diff(&diff, i).map_err(git("computing a patch"))?
        {
            let (_, adds, dels) = patch.line_stats().map_err(git("counting lines"))?;
            file.binary = patch.delta().flags().is_binary();
            if !file.binary {
                file.additions = u32::try_from(adds).unwrap_or(u32::MAX);
                file.deletions = u32::try_from(dels).unwrap_or(u32::MAX);
            }
            if limits.include_patch {
                if patch_budget == 0 {
                    file.patch_truncated = true;
                } else {
                    let text = patch.to_buf().map_err(git("formatting a patch"))?;
                    let cap = limits
                        .max_patch
                        .min(usize::try_from(patch_budget).unwrap_or(usize::MAX));
                    let keep = text.len().min(cap);
                    file.patch_truncated = keep < text.len();
                    file.patch = bytes::Bytes::copy_from_slice(&text[..keep]);
                    patch_budget -= keep as u64;
                    batch_bytes += keep;
                }
            }
        }
        if let Some(sim) = similarity(&delta) {
            file.similarity = sim;
        }
        totals.additions = totals.additions.saturating_add(file.additions);
        totals.deletions = totals.deletions.saturating_add(file.deletions);
        batch.push(file);
        if batch.len() >= BATCH_FILES || batch_bytes >= BATCH_BYTES {
            out.send(&pb::DiffResponse {
                files: std::mem::take(&mut batch),
                ..pb::DiffResponse::default()
            })?;
            batch_bytes = 0;
        }
    }
    if !batch.is_empty() {
        out.send(&pb::DiffResponse {
            files: batch,
            ..pb::DiffResponse::default()
        })?;
    }
    Ok(totals)
}

/// The similarity score (0..100) libgit2 computed for a rename or copy.
fn similarity(delta: &git2::DiffDelta<'_>) -> Option<u32> {
    use git2::Binding;
    matches!(delta.status(), Delta::Renamed | Delta::Copied).then(|| {
        // SAFETY: `raw()` points at the git_diff_delta owned by the diff that `delta` borrows,
        // alive for the borrow; git2 0.21 does not expose this field (its accessor is commented
        // out), so it is read directly.
        u32::from(unsafe { (*delta.raw()).similarity })
    })
}

pub fn commit_diff(repo: &Repository, req: &pb::CommitDiffRequest, out: &Emitter) -> OpResult<()> {
    let commit = resolve_commit(repo, &req.revision)?;
    let new = commit.tree().map_err(git("reading a tree"))?;
    let base = if req.base.is_empty() {
        match commit.parent_count() {
            0 => None,
            _ => Some(commit.parent(0).map_err(git("reading the first parent"))?),
        }
    } else {
        Some(resolve_commit(repo, &req.base)?)
    };
    let old = match &base {
        Some(b) => Some(b.tree().map_err(git("reading a tree"))?),
        None => None,
    };
    out.send(&pb::DiffResponse {
        summary: Some(pb::DiffSummary {
            base_id: base
                .as_ref()
                .map(|b| b.id().to_string())
                .unwrap_or_default(),
            head_id: commit.id().to_string(),
            ..pb::DiffSummary::default()
        }),
        ..pb::DiffResponse::default()
    })?;
    let totals = stream_diff(
        repo,
        old.as_ref(),
        &new,
        &Limits::from(req.options.as_ref()),
        out,
    )?;
    out.send(&pb::DiffResponse {
        totals: Some(totals),
        ..pb::DiffResponse::default()
    })
}

pub fn compare_refs(
    repo: &Repository,
    req: &pb::CompareRefsRequest,
    out: &Emitter,
) -> OpResult<()> {
    let base = resolve_commit(repo, &req.base)?;
    let head = resolve_commit(repo, &req.head)?;
    let merge_base = match repo.merge_base(base.id(), head.id()) {
        Ok(id) => Some(id),
        Err(e) if e.code() == git2::ErrorCode::NotFound => None,
        Err(e) => return Err(git("finding the merge base")(e)),
    };
    let (ahead, behind) = repo
        .graph_ahead_behind(head.id(), base.id())
        .map_err(git("counting commits ahead and behind"))?;
    let from = if req.direct {
        base.id()
    } else {
        merge_base.ok_or_else(|| {
            OpError::FailedPrecondition(format!(
                "{} and {} have no common history",
                req.base, req.head
            ))
        })?
    };
    let mut commits = Vec::new();
    let want = (req.max_commits as usize).min(MAX_COMMITS);
    if want > 0 {
        let mut walk = repo.revwalk().map_err(git("walking history"))?;
        walk.set_sorting(Sort::TOPOLOGICAL | Sort::TIME)
            .map_err(git("walking history"))?;
        walk.push(head.id()).map_err(git("walking history"))?;
        walk.hide(base.id()).map_err(git("walking history"))?;
        for oid in walk.take(want) {
            out.ctx().check()?;
            let c = repo
                .find_commit(oid.map_err(git("walking history"))?)
                .map_err(git("reading a commit"))?;
            commits.push(commit_pb(&c, false));
        }
    }
    out.send(&pb::DiffResponse {
        summary: Some(pb::DiffSummary {
            base_id: base.id().to_string(),
            head_id: head.id().to_string(),
            merge_base_id: merge_base.map(|m| m.to_string()).unwrap_or_default(),
            ahead: u32::try_from(ahead).unwrap_or(u32::MAX),
            behind: u32::try_from(behind).unwrap_or(u32::MAX),
            commits,
        }),
        ..pb::DiffResponse::default()
    })?;
    let old = repo
        .find_commit(from)
        .and_then(|c| c.tree())
        .map_err(git("reading the base tree"))?;
    let new = head.tree().map_err(git("reading the head tree"))?;
    let totals = stream_diff(
        repo,
        Some(&old),
        &new,
        &Limits::from(req.options.as_ref()),
        out,
    )?;
    out.send(&pb::DiffResponse {
        totals: Some(totals),
        ..pb::DiffResponse::default()
    })
}
