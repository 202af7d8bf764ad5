//! Branches and tags: paged listings (by ref name; the page token is the last name sent, so a
//! ref created or deleted between pages never shifts the others), creating and deleting branches.

use git2::{ObjectType, Oid, Repository};

use super::{commit_pb, decode_token, encode_token, git, page_limit, parse_oid, resolve_commit};
use super::{signature, BeforeRefWrite, OpError, OpResult};
use crate::hooks::event::{RefUpdate, ZERO_OID};
use crate::rpc::pb::v1 as pb;

const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

/// Full names and targets of the refs under `prefix`, sorted bytewise (as `git for-each-ref`
/// sorts them), after `after` if given, at most `limit + 1` of them (the extra one says another
/// page exists). Each ref is read once: the target comes from the same pass as the name.
fn ref_page(
    repo: &Repository,
    prefix: &str,
    after: Option<&str>,
    limit: usize,
) -> OpResult<Vec<(String, Oid)>> {
    let mut refs: Vec<(String, Oid)> = Vec::new();
    let glob = format!("{prefix}*");
    let iter = repo
        .references_glob(&glob)
        .map_err(git("listing references"))?;
    for r in iter {
        let r = r.map_err(git("reading a reference"))?;
        // Non-UTF-8 ref names cannot be named in the API; they are left out.
        let Ok(name) = std::str::from_utf8(r.name_bytes()) else {
            continue;
        };
        if after.is_some_and(|a| name <= a) {
            continue;
        }
        // A symbolic ref under refs/heads/ is rare; resolve it to what it points at.
        let target = match r.target() {
            Some(id) => Some(id),
            None => r.resolve().ok().and_then(|r| r.target()),
        };
        if let Some(id) = target {
            refs.push((name.to_owned(), id));
        }
    }
    refs.sort_unstable();
    refs.truncate(limit + 1);
    Ok(refs)
}

/// Splits a page of `limit + 1` refs into the page and the next token.
fn paginate(
    mut refs: Vec<(String, Oid)>,
    limit: usize,
    kind: &str,
) -> (Vec<(String, Oid)>, String) {
    if refs.len() > limit {
        refs.truncate(limit);
        let token = refs
            .last()
            .map(|(n, _)| encode_token(kind, n))
            .unwrap_or_default();
        (refs, token)
    } else {
        (refs, String::new())
    }
}

/// The short name of the branch HEAD points at, if HEAD is symbolic.
pub fn head_branch(repo: &Repository) -> Option<String> {
    let head = repo.find_reference("HEAD").ok()?;
    let target = head.symbolic_target().ok()??;
    target.strip_prefix("refs/heads/").map(str::to_owned)
}

fn branch_pb(
    repo: &Repository,
    full: &str,
    id: Oid,
    default: Option<&str>,
) -> OpResult<pb::Branch> {
    let short = full.strip_prefix("refs/heads/").unwrap_or(full);
    let target = repo
        .find_object(id, None)
        .and_then(|o| o.peel_to_commit())
        .ok()
        .map(|c| commit_pb(&c, false));
    Ok(pb::Branch {
        name: short.to_owned(),
        target,
        is_default: default == Some(short),
    })
}

pub fn list_branches(
    repo: &Repository,
    req: &pb::ListBranchesRequest,
) -> OpResult<pb::ListBranchesResponse> {
    let limit = page_limit(req.limit, DEFAULT_PAGE, MAX_PAGE);
    let after = decode_token("branches", &req.page_token)?;
    let names = ref_page(repo, "refs/heads/", after.as_deref(), limit)?;
    let (names, next_page_token) = paginate(names, limit, "branches");
    let default = head_branch(repo);
    let branches = names
        .iter()
        .map(|(n, id)| branch_pb(repo, n, *id, default.as_deref()))
        .collect::<OpResult<_>>()?;
    Ok(pb::ListBranchesResponse {
        branches,
        next_page_token,
    })
}

fn tag_pb(repo: &Repository, full: &str, id: Oid) -> OpResult<pb::Tag> {
    let object = repo.find_object(id, None).map_err(git("reading a tag"))?;
    let mut tag = pb::Tag {
        name: full.strip_prefix("refs/tags/").unwrap_or(full).to_owned(),
        id: id.to_string(),
        target: object.peel_to_commit().ok().map(|c| commit_pb(&c, false)),
        ..pb::Tag::default()
    };
    if let Some(annotated) = object.as_tag() {
        tag.annotated = true;
        tag.message =
            String::from_utf8_lossy(annotated.message_bytes().unwrap_or_default()).into_owned();
        tag.tagger = annotated.tagger().map(|s| signature(&s));
    }
    Ok(tag)
}

pub fn list_tags(repo: &Repository, req: &pb::ListTagsRequest) -> OpResult<pb::ListTagsResponse> {
    let limit = page_limit(req.limit, DEFAULT_PAGE, MAX_PAGE);
    let after = decode_token("tags", &req.page_token)?;
    let names = ref_page(repo, "refs/tags/", after.as_deref(), limit)?;
    let (names, next_page_token) = paginate(names, limit, "tags");
    let tags = names
        .iter()
        .map(|(n, id)| tag_pb(repo, n, *id))
        .collect::<OpResult<_>>()?;
    Ok(pb::ListTagsResponse {
        tags,
        next_page_token,
    })
}

/// `refs/heads/NAME` for a valid branch name.
///
/// # Errors
/// INVALID_ARGUMENT if `git check-ref-format --branch` would refuse it.
pub fn branch_ref(name: &str) -> OpResult<String> {
    let full = format!("refs/heads/{name}");
    if name.is_empty()
        || name.starts_with('-')
        || name == "HEAD"
        || !git2::Reference::is_valid_name(&full)
    {
        return Err(OpError::InvalidArgument(format!(
            "{name:?} is not a valid branch name"
        )));
    }
    Ok(full)
}

pub fn create_branch(
    repo: &Repository,
    req: &pb::CreateBranchRequest,
    before_write: BeforeRefWrite<'_>,
) -> OpResult<pb::CreateBranchResponse> {
    let full = branch_ref(&req.name)?;
    let commit = resolve_commit(repo, &req.start_point)?;
    let log = format!("branch: Created from {}", req.start_point);
    before_write(&RefUpdate {
        refname: full.clone(),
        before: ZERO_OID.into(),
        after: commit.id().to_string(),
    })?;
    // force = false: libgit2 refuses (EEXISTS) under the ref lock if it exists, so two
    // concurrent creates cannot both succeed.
    repo.reference(&full, commit.id(), false, &log)
        .map_err(|e| {
            if e.code() == git2::ErrorCode::Exists {
                OpError::AlreadyExists(format!("branch {}", req.name))
            } else {
                OpError::Git {
                    doing: "creating the branch",
                    source: e,
                }
            }
        })?;
    let default = head_branch(repo);
    Ok(pb::CreateBranchResponse {
        branch: Some(branch_pb(repo, &full, commit.id(), default.as_deref())?),
    })
}

pub fn delete_branch(
    repo: &Repository,
    req: &pb::DeleteBranchRequest,
    before_write: BeforeRefWrite<'_>,
) -> OpResult<pb::DeleteBranchResponse> {
    let full = branch_ref(&req.name)?;
    if head_branch(repo).as_deref() == Some(req.name.as_str()) {
        return Err(OpError::FailedPrecondition(format!(
            "branch {} is the default branch",
            req.name
        )));
    }
    let expected: Option<Oid> = if req.expected_old_id.is_empty() {
        None
    } else {
        Some(parse_oid("expected_old_id", &req.expected_old_id)?)
    };
    let mut reference = match repo.find_reference(&full) {
        Ok(r) => r,
        Err(e) if e.code() == git2::ErrorCode::NotFound => {
            return Err(OpError::NotFound(format!("branch {}", req.name)))
        }
        Err(e) => return Err(git("reading the branch")(e)),
    };
    let old = reference
        .target()
        .ok_or_else(|| OpError::FailedPrecondition(format!("{full} is a symbolic ref")))?;
    if let Some(want) = expected {
        if want != old {
            return Err(OpError::Aborted(format!(
                "branch {} points at {old}, not the expected {want}",
                req.name
            )));
        }
    }
    // libgit2 deletes with the value it read as the expected old value (under the ref lock), so
    // a concurrent update between the check above and here fails as MODIFIED -> ABORTED.
    before_write(&RefUpdate {
        refname: full.clone(),
        before: old.to_string(),
        after: ZERO_OID.into(),
    })?;
    reference.delete().map_err(git("deleting the branch"))?;
    Ok(pb::DeleteBranchResponse {
        old_id: old.to_string(),
    })
}

/// The object a full ref name points at, if the ref exists.
pub fn ref_target(repo: &Repository, full: &str) -> OpResult<Option<Oid>> {
    match repo.find_reference(full) {
        Ok(r) => Ok(r.resolve().ok().and_then(|r| r.target())),
        Err(e) if e.code() == git2::ErrorCode::NotFound => Ok(None),
        Err(e) => Err(git("reading a reference")(e)),
    }
}

/// Whether an object is a commit (for ids given by clients).
pub fn is_commit(repo: &Repository, id: Oid) -> bool {
    repo.find_object(id, Some(ObjectType::Commit)).is_ok()
}
