//! CheckMergeability and Merge: what a pull request needs.
//!
//! A merge is computed in memory (libgit2's `merge_commits`, recursive with rename detection,
//! as `git merge-tree`); nothing touches a worktree or the index file. The branch is then moved
//! with a compare-and-swap under the ref lock (`git_reference_create_matching`): it changes only
//! if it still points at the caller's `expected_target_id`, so two concurrent merges into one
//! branch cannot both win and none is lost.

use git2::{Oid, Repository, Signature, Time};

use super::refs::{branch_ref, ref_target};
use super::{git, parse_oid, resolve_commit, BeforeRefWrite, OpError, OpResult};
use crate::hooks::event::RefUpdate;
use crate::rpc::pb::v1 as pb;

/// Most conflicting paths reported (a pull request UI shows a list, not thousands).
const MAX_CONFLICTS: usize = 1000;

/// Paths that conflict when merging `theirs` into `ours`, sorted; empty for a clean merge.
fn conflicts(
    repo: &Repository,
    ours: &git2::Commit<'_>,
    theirs: &git2::Commit<'_>,
) -> OpResult<(git2::Index, Vec<String>)> {
    let index = repo
        .merge_commits(ours, theirs, None)
        .map_err(git("merging in memory"))?;
    let mut paths = Vec::new();
    if index.has_conflicts() {
        for c in index.conflicts().map_err(git("listing conflicts"))? {
            let c = c.map_err(git("listing conflicts"))?;
            if let Some(e) = c.our.or(c.their).or(c.ancestor) {
                paths.push(String::from_utf8_lossy(&e.path).into_owned());
            }
        }
        paths.sort_unstable();
        paths.dedup();
        paths.truncate(MAX_CONFLICTS);
    }
    Ok((index, paths))
}

fn merge_base(repo: &Repository, a: Oid, b: Oid) -> OpResult<Option<Oid>> {
    match repo.merge_base(a, b) {
        Ok(id) => Ok(Some(id)),
        Err(e) if e.code() == git2::ErrorCode::NotFound => Ok(None),
        Err(e) => Err(git("finding the merge base")(e)),
    }
}

pub fn check_mergeability(
    repo: &Repository,
    req: &pb::CheckMergeabilityRequest,
) -> OpResult<pb::CheckMergeabilityResponse> {
    let target = resolve_commit(repo, &req.target)?;
    let source = resolve_commit(repo, &req.source)?;
    let base = merge_base(repo, target.id(), source.id())?;
    let (ahead, behind) = repo
        .graph_ahead_behind(source.id(), target.id())
        .map_err(git("counting commits ahead and behind"))?;
    let mut resp = pb::CheckMergeabilityResponse {
        target_id: target.id().to_string(),
        source_id: source.id().to_string(),
        merge_base_id: base.map(|b| b.to_string()).unwrap_or_default(),
        ahead: u32::try_from(ahead).unwrap_or(u32::MAX),
        behind: u32::try_from(behind).unwrap_or(u32::MAX),
        ..pb::CheckMergeabilityResponse::default()
    };
    match base {
        Some(b) if b == source.id() => {
            resp.up_to_date = true;
            resp.mergeable = true;
        }
        Some(b) if b == target.id() => {
            resp.fast_forward = true;
            resp.mergeable = true;
        }
        Some(_) => {
            let (_, paths) = conflicts(repo, &target, &source)?;
            resp.mergeable = paths.is_empty();
            resp.conflicting_paths = paths;
        }
        // Unrelated histories: `git merge` refuses them without --allow-unrelated-histories.
        None => resp.mergeable = false,
    }
    Ok(resp)
}

fn signature_from(field: &str, s: Option<&pb::Signature>) -> OpResult<Option<Signature<'static>>> {
    let Some(s) = s else { return Ok(None) };
    if s.name.trim().is_empty() || s.email.trim().is_empty() {
        return Err(OpError::InvalidArgument(format!(
            "{field} needs a name and an email"
        )));
    }
    let sig = if s.time == 0 {
        Signature::now(&s.name, &s.email)
    } else {
        Signature::new(&s.name, &s.email, &Time::new(s.time, s.offset_minutes))
    };
    sig.map(Some)
        .map_err(|e| OpError::InvalidArgument(format!("{field}: {}", e.message())))
}

pub fn merge(
    repo: &Repository,
    req: &pb::MergeRequest,
    before_write: BeforeRefWrite<'_>,
) -> OpResult<pb::MergeResponse> {
    let full = branch_ref(&req.target)?;
    if req.expected_target_id.is_empty() {
        return Err(OpError::InvalidArgument(
            "expected_target_id is required (the id the target branch was seen at)".into(),
        ));
    }
    let expected = parse_oid("expected_target_id", &req.expected_target_id)?;
    let mode = pb::MergeMode::try_from(req.mode)
        .map_err(|_| OpError::InvalidArgument(format!("unknown merge mode {}", req.mode)))?;
    let current = ref_target(repo, &full)?
        .ok_or_else(|| OpError::NotFound(format!("branch {}", req.target)))?;
    if current != expected {
        return Err(stale(&req.target, current, expected));
    }
    let target = repo
        .find_commit(current)
        .map_err(git("reading the target commit"))?;
    let source = resolve_commit(repo, &req.source)?;
    let base = merge_base(repo, target.id(), source.id())?;
    let (new_id, fast_forward) = match base {
        Some(b) if b == source.id() => {
            return Ok(pb::MergeResponse {
                commit_id: current.to_string(),
                fast_forward: false,
                up_to_date: true,
            })
        }
        Some(b) if b == target.id() && mode != pb::MergeMode::NoFastForward => (source.id(), true),
        _ if mode == pb::MergeMode::FastForwardOnly => {
            return Err(OpError::FailedPrecondition(format!(
                "{} cannot be fast-forwarded to {}",
                req.target, req.source
            )))
        }
        None => {
            return Err(OpError::FailedPrecondition(format!(
                "{} and {} have no common history",
                req.target, req.source
            )))
        }
        Some(_) => {
            let (mut index, paths) = conflicts(repo, &target, &source)?;
            if !paths.is_empty() {
                return Err(OpError::FailedPrecondition(format!(
                    "merge conflict in {}",
                    paths.join(", ")
                )));
            }
            let author = signature_from("author", req.author.as_ref())?
                .ok_or_else(|| OpError::InvalidArgument("author is required".into()))?;
            let committer =
                signature_from("committer", req.committer.as_ref())?.unwrap_or(author.clone());
            let message = if req.message.is_empty() {
                format!("Merge {} into {}\n", req.source, req.target)
            } else {
                req.message.clone()
            };
            let tree_id = index
                .write_tree_to(repo)
                .map_err(git("writing the merged tree"))?;
            let tree = repo
                .find_tree(tree_id)
                .map_err(git("reading the merged tree"))?;
            let id = repo
                .commit(
                    None,
                    &author,
                    &committer,
                    &message,
                    &tree,
                    &[&target, &source],
                )
                .map_err(git("writing the merge commit"))?;
            (id, false)
        }
    };
    let log = format!(
        "merge {}: {}",
        req.source,
        if fast_forward {
            "Fast-forward"
        } else {
            "Merge made by gitplane"
        }
    );
    // The update is a compare-and-swap from `expected`: that is the event's before.
    before_write(&RefUpdate {
        refname: full.clone(),
        before: expected.to_string(),
        after: new_id.to_string(),
    })?;
    repo.reference_matching(&full, new_id, true, expected, &log)
        .map_err(|e| match e.code() {
            git2::ErrorCode::Modified | git2::ErrorCode::Locked | git2::ErrorCode::NotFound => {
                let now = ref_target(repo, &full)
                    .ok()
                    .flatten()
                    .unwrap_or(Oid::ZERO_SHA1);
                stale(&req.target, now, expected)
            }
            _ => git("updating the branch")(e),
        })?;
    Ok(pb::MergeResponse {
        commit_id: new_id.to_string(),
        fast_forward,
        up_to_date: false,
    })
}

fn stale(branch: &str, now: Oid, expected: Oid) -> OpError {
    OpError::Aborted(format!(
        "branch {branch} points at {now}, not the expected {expected}: re-read it and retry"
    ))
}
