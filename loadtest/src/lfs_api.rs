//! The client side of the Git LFS batch API and its basic transfer, sans-I/O: the batch request
//! and the parts of its answer a transfer needs ([`object_answer`]), action hrefs ([`Href`]),
//! and the objects `lfs-upload` sends ([`ObjectMaker`]).
//!
//! Objects are generated, never read from disk: each is a shared pseudo-random prefix (one
//! 64 KiB block repeated, handed to the socket as [`Bytes`] slices without copying) followed by
//! a short tail holding a per-run nonce and the object's number, so every object of every run
//! has its own id and the server really stores it. The SHA-256 state after the prefix is computed
//! once per run; an object id then costs hashing its tail only, so the generator's CPU stays out
//! of the measured latency and no client holds more than the tail in memory, whatever the size.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

/// The media type of batch and verify requests and answers.
pub const MEDIA_TYPE: &str = "application/vnd.git-lfs+json";
/// Size of the shared block objects are made of.
const BLOCK: usize = 64 * 1024;
/// Bytes at the end of each object that make it unique (nonce, number, filler).
const TAIL: u64 = 64;
/// Smallest object that still has room for the nonce and the number.
pub const MIN_OBJECT_SIZE: u64 = 16;

#[derive(Debug, Error)]
pub enum LfsError {
    #[error("malformed LFS answer: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the batch answer does not mention object {oid}")]
    MissingObject { oid: String },
    #[error("the server refused object {oid}: {code} {message}")]
    Object {
        oid: String,
        code: u16,
        message: String,
    },
    #[error("the batch answer for {oid} has no `{action}` action")]
    NoAction { oid: String, action: &'static str },
    #[error("action href `{href}` is not an http:// URL")]
    BadHref { href: String },
    #[error("cannot resolve the action href's host `{authority}`: {reason}")]
    HrefHost { authority: String, reason: String },
    #[error("object {oid}: received {got} bytes, expected {expected}")]
    SizeMismatch {
        oid: String,
        expected: u64,
        got: u64,
    },
    #[error("object {oid}: received content hashes to {got}")]
    HashMismatch { oid: String, got: String },
}

impl LfsError {
    /// The key in the errors-by-kind table.
    pub fn kind(&self) -> String {
        match self {
            Self::Json(_) | Self::MissingObject { .. } | Self::BadHref { .. } => {
                "lfs_protocol".into()
            }
            Self::HrefHost { .. } => "lfs_href_host".into(),
            Self::Object { code, .. } => format!("lfs_object_{code}"),
            Self::NoAction { action, .. } => format!("lfs_no_{action}_action"),
            Self::SizeMismatch { .. } => "lfs_size_mismatch".into(),
            Self::HashMismatch { .. } => "lfs_sha256_mismatch".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Upload,
    Download,
}

impl Operation {
    fn as_str(self) -> &'static str {
        match self {
            Self::Upload => "upload",
            Self::Download => "download",
        }
    }
}

#[derive(Serialize)]
struct BatchRequest<'a> {
    operation: &'static str,
    transfers: [&'static str; 1],
    objects: [ObjectSpec<'a>; 1],
    hash_algo: &'static str,
}

#[derive(Serialize)]
struct ObjectSpec<'a> {
    oid: &'a str,
    size: u64,
}

/// The batch request for one object, basic transfer, SHA-256.
pub fn batch_request(op: Operation, oid: &str, size: u64) -> Vec<u8> {
    let req = BatchRequest {
        operation: op.as_str(),
        transfers: ["basic"],
        objects: [ObjectSpec { oid, size }],
        hash_algo: "sha256",
    };
    // Plain strings and numbers: serialisation cannot fail.
    serde_json::to_vec(&req).unwrap_or_default()
}

/// The verify request's body.
pub fn verify_request(oid: &str, size: u64) -> Vec<u8> {
    serde_json::to_vec(&ObjectSpec { oid, size }).unwrap_or_default()
}

#[derive(Debug, Deserialize)]
struct BatchResponse {
    objects: Vec<ObjectAnswer>,
}

/// What the batch answer says about one object.
#[derive(Debug, Deserialize)]
pub struct ObjectAnswer {
    pub oid: String,
    #[serde(default)]
    pub actions: Actions,
    #[serde(default)]
    error: Option<ObjectError>,
}

#[derive(Debug, Default, Deserialize)]
pub struct Actions {
    pub upload: Option<Action>,
    pub download: Option<Action>,
    pub verify: Option<Action>,
}

/// Where to transfer and the headers to send there.
#[derive(Debug, Clone, Deserialize)]
pub struct Action {
    pub href: String,
    #[serde(default)]
    pub header: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
struct ObjectError {
    code: u16,
    message: String,
}

/// The answer for `oid` in a batch answer body.
///
/// # Errors
/// On malformed JSON, an answer without the object, or a per-object error.
pub fn object_answer(body: &[u8], oid: &str) -> Result<ObjectAnswer, LfsError> {
    let resp: BatchResponse = serde_json::from_slice(body)?;
    let answer = resp
        .objects
        .into_iter()
        .find(|o| o.oid == oid)
        .ok_or_else(|| LfsError::MissingObject { oid: oid.into() })?;
    match answer.error {
        Some(e) => Err(LfsError::Object {
            oid: oid.into(),
            code: e.code,
            message: e.message,
        }),
        None => Ok(answer),
    }
}

/// An action's href split for an HTTP/1.1 request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Href {
    /// `HOST[:PORT]`, for the `Host` header and to pick the connection.
    pub authority: String,
    /// Path and query, starting with `/`.
    pub path: String,
}

impl Href {
    /// # Errors
    /// When `href` is not an `http://` URL with a host.
    pub fn parse(href: &str) -> Result<Self, LfsError> {
        let bad = || LfsError::BadHref { href: href.into() };
        let rest = href.strip_prefix("http://").ok_or_else(bad)?;
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, "/"),
        };
        if authority.is_empty() || authority.contains('@') {
            return Err(bad());
        }
        Ok(Self {
            authority: authority.into(),
            path: path.into(),
        })
    }
}

/// One generated object.
#[derive(Debug, Clone)]
pub struct Object {
    /// Lowercase hex SHA-256 of the content.
    pub oid: String,
    pub size: u64,
    tail: Bytes,
}

/// Makes the distinct objects of one run (see the module docs for their shape).
pub struct ObjectMaker {
    size: u64,
    nonce: u64,
    block: Bytes,
    prefix_len: u64,
    /// SHA-256 state after the shared prefix.
    prefix_hash: Sha256,
}

impl ObjectMaker {
    /// Objects of `size` bytes (at least [`MIN_OBJECT_SIZE`]) unique to `nonce`. Hashes the
    /// shared prefix once, here, in 64 KiB steps.
    pub fn new(size: u64, nonce: u64) -> Self {
        let size = size.max(MIN_OBJECT_SIZE);
        let block = Bytes::from(pseudo_random(BLOCK, 0x9e37_79b9_7f4a_7c15));
        let prefix_len = size - size.min(TAIL);
        let mut maker = Self {
            size,
            nonce,
            block,
            prefix_len,
            prefix_hash: Sha256::new(),
        };
        let mut h = Sha256::new();
        for piece in maker.prefix() {
            h.update(&piece);
        }
        maker.prefix_hash = h;
        maker
    }

    /// Object number `n` of this run.
    pub fn object(&self, n: u64) -> Object {
        let tail_len = usize::try_from(self.size - self.prefix_len).unwrap_or(0);
        let mut tail = Vec::with_capacity(tail_len);
        tail.extend_from_slice(&self.nonce.to_le_bytes());
        tail.extend_from_slice(&n.to_le_bytes());
        tail.extend(pseudo_random(
            tail_len.saturating_sub(16),
            self.nonce ^ n.rotate_left(32),
        ));
        tail.truncate(tail_len);
        let mut h = self.prefix_hash.clone();
        h.update(&tail);
        Object {
            oid: hex::encode(h.finalize()),
            size: self.size,
            tail: Bytes::from(tail),
        }
    }

    /// `object`'s content, piece by piece: shared slices of the block, then its tail.
    pub fn body<'a>(&'a self, object: &'a Object) -> impl Iterator<Item = Bytes> + 'a {
        self.prefix().chain(std::iter::once(object.tail.clone()))
    }

    fn prefix(&self) -> impl Iterator<Item = Bytes> + '_ {
        let block = BLOCK as u64;
        let (full, rest) = (self.prefix_len / block, self.prefix_len % block);
        let rest = usize::try_from(rest).unwrap_or(0);
        (0..full)
            .map(|_| self.block.clone())
            .chain((rest > 0).then(|| self.block.slice(..rest)))
    }
}

/// `len` bytes of xorshift64 output from `seed` (fast, incompressible enough for transfers).
fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn content(maker: &ObjectMaker, o: &Object) -> Vec<u8> {
        maker.body(o).flat_map(|b| b.to_vec()).collect()
    }

    #[test]
    fn objects_are_distinct_and_their_ids_are_their_hashes() {
        for size in [16, 17, 64, 100, 65_536, 65_600, 200_000] {
            let maker = ObjectMaker::new(size, 42);
            let a = maker.object(0);
            let b = maker.object(1);
            assert_ne!(a.oid, b.oid, "size {size}");
            for o in [&a, &b] {
                let bytes = content(&maker, o);
                assert_eq!(bytes.len() as u64, size);
                assert_eq!(hex::encode(Sha256::digest(&bytes)), o.oid, "size {size}");
            }
            // Another run (nonce) makes other objects.
            assert_ne!(ObjectMaker::new(size, 43).object(0).oid, a.oid);
        }
    }

    #[test]
    fn batch_json_round_trip() {
        let req = String::from_utf8(batch_request(Operation::Upload, "ab", 3)).unwrap();
        assert_eq!(
            req,
            r#"{"operation":"upload","transfers":["basic"],"objects":[{"oid":"ab","size":3}],"hash_algo":"sha256"}"#
        );
        let body = br#"{"transfer":"basic","objects":[
            {"oid":"ab","size":3,"authenticated":true,"actions":{
                "upload":{"href":"http://h:1/o/r.git/info/lfs/objects/ab","header":{"Authorization":"Basic x"},"expires_in":3600},
                "verify":{"href":"http://h:1/o/r.git/info/lfs/verify","expires_in":3600}}}],
            "hash_algo":"sha256"}"#;
        let a = object_answer(body, "ab").unwrap();
        let up = a.actions.upload.unwrap();
        assert_eq!(up.header["Authorization"], "Basic x");
        assert!(a.actions.verify.is_some() && a.actions.download.is_none());
        assert!(matches!(
            object_answer(body, "cd"),
            Err(LfsError::MissingObject { .. })
        ));
        let refused = br#"{"objects":[{"oid":"ab","size":3,"error":{"code":404,"message":"object not found"}}]}"#;
        let e = object_answer(refused, "ab").unwrap_err();
        assert_eq!(e.kind(), "lfs_object_404");
        assert_eq!(
            object_answer(b"{", "ab").unwrap_err().kind(),
            "lfs_protocol"
        );
    }

    #[test]
    fn hrefs() {
        assert_eq!(
            Href::parse("http://127.0.0.1:8080/o/r.git/info/lfs/objects/ab").unwrap(),
            Href {
                authority: "127.0.0.1:8080".into(),
                path: "/o/r.git/info/lfs/objects/ab".into()
            }
        );
        assert!(Href::parse("https://h/x").is_err());
        assert!(Href::parse("http:///x").is_err());
        assert_eq!(Href::parse("http://h").unwrap().path, "/");
    }
}
