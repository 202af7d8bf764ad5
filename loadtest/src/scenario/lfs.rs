//! `lfs-upload` and `lfs-download` on monoio, as git-lfs's basic transfer does them:
//!
//! - upload: a new object per iteration ([`ObjectMaker`]), `POST info/lfs/objects/batch`
//!   (upload), `PUT` of the object to the action's href with its headers, the body streamed
//!   from shared blocks; then `POST` to the verify action when the answer has one;
//! - download: `POST objects/batch` (download) for one object uploaded before the run (or named
//!   with `--oid`), then `GET` of the href, the body streamed through SHA-256 and counted; a
//!   wrong size or hash is an error of its own kind.
//!
//! A new connection per iteration, kept alive across its requests while they go to the same
//! host. Action hrefs on another host get their own connection (their host is resolved with the
//! system resolver, a blocking call: instant for the IP literals gitplane answers with).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};

use super::{IterError, Iteration, Outcome, Workload};
use crate::http::{Link, Request};
use crate::lfs_api::{self, Action, Href, LfsError, ObjectMaker, Operation, MEDIA_TYPE};
use crate::runtime::Monoio;
use crate::url::{self, Target};

/// Largest batch or verify answer read.
const MAX_JSON: usize = 1 << 20;

/// An object stored on the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub oid: String,
    pub size: u64,
}

/// `lfs-upload`: a new object per iteration.
pub struct LfsUpload {
    target: Target,
    maker: ObjectMaker,
    /// Number of the next object (shared by all threads).
    next: AtomicU64,
}

impl Workload for LfsUpload {
    type Rt = Monoio;
    type Client = ();

    fn client(&self) {}

    async fn iterate(&self, _client: &(), _it: Iteration<'_>) -> Result<Outcome, IterError> {
        Ok(Outcome {
            bytes: self.upload().await?.size,
            ..Outcome::default()
        })
    }
}

impl LfsUpload {
    /// Uploads to `target` (an http:// repository URL) of objects of `object_size` bytes
    /// unique to `nonce`.
    pub fn new(target: Target, object_size: u64, nonce: u64) -> Self {
        Self {
            target,
            maker: ObjectMaker::new(object_size, nonce),
            next: AtomicU64::new(0),
        }
    }

    /// Uploads one new object, as an iteration does, and says which.
    ///
    /// # Errors
    /// Whatever failed first.
    pub async fn upload(&self) -> Result<Stored, IterError> {
        let object = self.maker.object(self.next.fetch_add(1, Ordering::Relaxed));
        let target = &self.target;
        let mut link = Link::default();
        let answer = batch(
            target,
            &mut link,
            Operation::Upload,
            &object.oid,
            object.size,
        )
        .await?;
        let upload = answer.actions.upload.ok_or_else(|| LfsError::NoAction {
            oid: object.oid.clone(),
            action: "upload",
        })?;
        let (href, addr) = resolve(target, &upload)?;
        let h = action_headers(
            target,
            &upload,
            &[("Content-Type", "application/octet-stream")],
        );
        let req = Request {
            method: "PUT",
            path: &href.path,
            headers: &h,
            body: &[],
        };
        let c = link.to(addr).await?;
        let head = c
            .send_streamed(&req, &href.authority, object.size, self.maker.body(&object))
            .await?;
        c.read_small_body(head.framing, MAX_JSON).await?;
        if let Some(verify) = &answer.actions.verify {
            let body = lfs_api::verify_request(&object.oid, object.size);
            let (href, addr) = resolve(target, verify)?;
            let h = action_headers(
                target,
                verify,
                &[("Content-Type", MEDIA_TYPE), ("Accept", MEDIA_TYPE)],
            );
            let req = Request {
                method: "POST",
                path: &href.path,
                headers: &h,
                body: &body,
            };
            let c = link.to(addr).await?;
            let head = c.send(&req, &href.authority).await?;
            c.read_small_body(head.framing, MAX_JSON).await?;
        }
        Ok(Stored {
            oid: object.oid,
            size: object.size,
        })
    }
}

/// `lfs-download`: the same stored object every iteration.
pub struct LfsDownload {
    target: Target,
    object: Stored,
}

impl Workload for LfsDownload {
    type Rt = Monoio;
    type Client = ();

    fn client(&self) {}

    async fn iterate(&self, _client: &(), _it: Iteration<'_>) -> Result<Outcome, IterError> {
        Ok(Outcome {
            bytes: self.download().await?,
            ..Outcome::default()
        })
    }
}

impl LfsDownload {
    /// Downloads of `object` from `target` (an http:// repository URL).
    pub fn new(target: Target, object: Stored) -> Self {
        Self { target, object }
    }

    async fn download(&self) -> Result<u64, IterError> {
        let (target, object) = (&self.target, &self.object);
        let mut link = Link::default();
        let answer = batch(
            target,
            &mut link,
            Operation::Download,
            &object.oid,
            object.size,
        )
        .await?;
        let download = answer.actions.download.ok_or_else(|| LfsError::NoAction {
            oid: object.oid.clone(),
            action: "download",
        })?;
        let (href, addr) = resolve(target, &download)?;
        let h = action_headers(target, &download, &[]);
        let c = link.to(addr).await?;
        let req = Request {
            method: "GET",
            path: &href.path,
            headers: &h,
            body: &[],
        };
        let head = c.send(&req, &href.authority).await?;
        let mut hash = Sha256::new();
        let mut got = 0u64;
        c.read_body(head.framing, |d| {
            got += d.len() as u64;
            hash.update(d);
            Ok::<(), IterError>(())
        })
        .await?;
        if got != object.size {
            return Err(LfsError::SizeMismatch {
                oid: object.oid.clone(),
                expected: object.size,
                got,
            }
            .into());
        }
        let digest = hex::encode(hash.finalize());
        if digest != object.oid {
            return Err(LfsError::HashMismatch {
                oid: object.oid.clone(),
                got: digest,
            }
            .into());
        }
        Ok(got)
    }
}

/// `POST .../info/lfs/objects/batch` for one object.
async fn batch(
    target: &Target,
    link: &mut Link,
    op: Operation,
    oid: &str,
    size: u64,
) -> Result<lfs_api::ObjectAnswer, IterError> {
    let repo = &target.repo_path;
    // git-lfs's default endpoint: the repository URL with `.git` and `/info/lfs`.
    let path = if repo.ends_with(".git") {
        format!("{repo}/info/lfs/objects/batch")
    } else {
        format!("{repo}.git/info/lfs/objects/batch")
    };
    let mut h = vec![("Accept", MEDIA_TYPE), ("Content-Type", MEDIA_TYPE)];
    if let Some(a) = &target.authorization {
        h.push(("Authorization", a.as_str()));
    }
    let body = lfs_api::batch_request(op, oid, size);
    let req = Request {
        method: "POST",
        path: &path,
        headers: &h,
        body: &body,
    };
    let c = link.to(target.addr).await?;
    let head = c.send(&req, &target.authority).await?;
    let answer = c.read_small_body(head.framing, MAX_JSON).await?;
    Ok(lfs_api::object_answer(&answer, oid)?)
}

/// The action's href and the address to send it to.
fn resolve(target: &Target, action: &Action) -> Result<(Href, SocketAddr), LfsError> {
    let href = Href::parse(&action.href)?;
    if href.authority == target.authority {
        return Ok((href, target.addr));
    }
    let addr = url::resolve_authority(&href.authority, 80).map_err(|e| LfsError::HrefHost {
        authority: href.authority.clone(),
        reason: e.to_string(),
    })?;
    Ok((href, addr))
}

/// The action's own headers (its credentials), then `extra`; the target's credentials when the
/// action carries none.
fn action_headers<'a>(
    target: &'a Target,
    action: &'a Action,
    extra: &[(&'a str, &'a str)],
) -> Vec<(&'a str, &'a str)> {
    let mut h: Vec<(&str, &str)> = action
        .header
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    if let Some(a) = &target.authorization {
        if !action
            .header
            .keys()
            .any(|k| k.eq_ignore_ascii_case("authorization"))
        {
            h.push(("Authorization", a.as_str()));
        }
    }
    h.extend_from_slice(extra);
    h
}
