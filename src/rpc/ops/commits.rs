//! FindCommit and CommitLog.
//!
//! CommitLog walks as `git log --date-order --full-history [-- PATH]`: parents before children
//! never, otherwise newest committer date first; with a path, a commit is listed when the path's
//! tree entry differs from at least one parent (for a root commit: when the path exists). The
//! page token pins the start commit and counts listed commits, so later pages stay consistent
//! while the branch moves.

use std::path::Path;

use git2::{Oid, Repository, Sort};

use super::{commit_pb, decode_token, encode_token, git, page_limit, resolve_commit, tree_path};
use super::{OpError, OpResult};
use crate::rpc::pb::v1 as pb;
use crate::rpc::pool::CallCtx;

const DEFAULT_PAGE: usize = 50;
const MAX_PAGE: usize = 1000;

pub fn find_commit(
    repo: &Repository,
    req: &pb::FindCommitRequest,
) -> OpResult<pb::FindCommitResponse> {
    let c = resolve_commit(repo, &req.revision)?;
    Ok(pb::FindCommitResponse {
        commit: Some(commit_pb(&c, true)),
    })
}

/// The id of what `path` names in `tree`, or None if absent.
fn entry_id(tree: &git2::Tree<'_>, path: &str) -> Option<Oid> {
    tree.get_path(Path::new(path)).ok().map(|e| e.id())
}

/// Whether `commit` changes `path` (see the module docs for the rule).
fn touches(repo: &Repository, commit: &git2::Commit<'_>, path: &str) -> OpResult<bool> {
    let tree = commit.tree().map_err(git("reading a tree"))?;
    let mine = entry_id(&tree, path);
    if commit.parent_count() == 0 {
        return Ok(mine.is_some());
    }
    for parent in commit.parents() {
        let ptree = repo
            .find_tree(parent.tree_id())
            .map_err(git("reading a parent tree"))?;
        if entry_id(&ptree, path) != mine {
            return Ok(true);
        }
    }
    Ok(false)
}

pub fn commit_log(
    repo: &Repository,
    req: &pb::CommitLogRequest,
    ctx: &CallCtx,
) -> OpResult<pb::CommitLogResponse> {
    let limit = page_limit(req.limit, DEFAULT_PAGE, MAX_PAGE);
    let path = tree_path("path", &req.path)?;
    if req.since < 0 || req.until < 0 || (req.until > 0 && req.since > req.until) {
        return Err(OpError::InvalidArgument(
            "since and until must be non-negative and since <= until".into(),
        ));
    }
    let (start, skip) = match decode_token("log", &req.page_token)? {
        Some(t) => {
            let (id, n) = t
                .split_once(':')
                .ok_or_else(|| OpError::InvalidArgument("page_token is malformed".into()))?;
            let id = Oid::from_str(id)
                .map_err(|_| OpError::InvalidArgument("page_token is malformed".into()))?;
            let n: usize = n
                .parse()
                .map_err(|_| OpError::InvalidArgument("page_token is malformed".into()))?;
            (id, n)
        }
        None => {
            let rev = if req.revision.is_empty() {
                "HEAD"
            } else {
                req.revision.as_str()
            };
            (resolve_commit(repo, rev)?.id(), 0)
        }
    };
    let mut walk = repo.revwalk().map_err(git("starting a history walk"))?;
    walk.set_sorting(Sort::TOPOLOGICAL | Sort::TIME)
        .map_err(git("starting a history walk"))?;
    walk.push(start).map_err(git("starting a history walk"))?;
    let mut commits = Vec::with_capacity(limit.min(64));
    let mut matched = 0usize;
    let mut more = false;
    for (n, oid) in walk.enumerate() {
        // Checking the clock on every commit is cheap next to reading it.
        if n % 64 == 0 {
            ctx.check()?;
        }
        let oid = oid.map_err(git("walking history"))?;
        let commit = repo.find_commit(oid).map_err(git("reading a commit"))?;
        let time = commit.committer().when().seconds();
        if (req.since > 0 && time < req.since) || (req.until > 0 && time > req.until) {
            continue;
        }
        if !path.is_empty() && !touches(repo, &commit, &path)? {
            continue;
        }
        matched += 1;
        if matched <= skip {
            continue;
        }
        if commits.len() == limit {
            more = true;
            break;
        }
        commits.push(commit_pb(&commit, true));
    }
    let next_page_token = if more {
        encode_token("log", &format!("{start}:{}", skip + commits.len()))
    } else {
        String::new()
    };
    Ok(pb::CommitLogResponse {
        commits,
        next_page_token,
    })
}
