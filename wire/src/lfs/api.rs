//! The Git LFS API's JSON (batch, verify, locks) and the batch decision, free of I/O.
//! See the Git LFS API spec: batch requests list objects; the answer gives each object either
//! actions (hrefs the client transfers with) or a per-object error.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub const CONTENT_TYPE: &str = "application/vnd.git-lfs+json";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Operation {
    Upload,
    Download,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Download => "download",
            Self::Upload => "upload",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "download" => Some(Self::Download),
            "upload" => Some(Self::Upload),
            _ => None,
        }
    }
}

#[derive(Debug, Deserialize)]
pub struct BatchRequest {
    pub operation: Operation,
    #[serde(default)]
    pub transfers: Vec<String>,
    pub objects: Vec<ObjectSpec>,
    #[serde(default)]
    pub hash_algo: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
pub struct ObjectSpec {
    pub oid: String,
    pub size: i64,
}

#[derive(Debug, Serialize)]
pub struct BatchResponse {
    pub transfer: &'static str,
    pub objects: Vec<ObjectResponse>,
    pub hash_algo: &'static str,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct ObjectResponse {
    pub oid: String,
    pub size: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authenticated: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actions: Option<BTreeMap<&'static str, Action>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ObjectError>,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct Action {
    pub href: String,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub header: BTreeMap<String, String>,
    pub expires_in: u64,
    pub expires_at: String,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct ObjectError {
    pub code: u16,
    pub message: String,
}

/// A whole-request error body.
#[derive(Debug, Serialize)]
pub struct ErrorBody<'a> {
    pub message: &'a str,
}

/// What the store and disk say about an object, for one repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Known {
    pub stored_size: Option<u64>,
    pub linked: bool,
}

/// Where actions point and what they carry.
pub struct ActionContext<'a> {
    /// `http://host/OWNER/NAME.git/info/lfs`
    pub base: &'a str,
    /// Headers the client must send with the transfer (its own Authorization).
    pub header: &'a BTreeMap<String, String>,
    pub expires_in: u64,
    pub expires_at: &'a str,
    pub max_object_size: u64,
}

/// True for a SHA-256 hex object id (lowercase, as git-lfs writes them).
pub fn valid_oid(oid: &str) -> bool {
    oid.len() == 64 && oid.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BatchError {
    #[error("unsupported hash algorithm `{0}`: this server uses sha256")]
    HashAlgo(String),
    #[error("no supported transfer adapter: this server offers `basic`")]
    Transfer,
    #[error("too many objects in one batch: {count} > {limit}")]
    TooMany { count: usize, limit: usize },
}

impl BatchError {
    pub fn status(&self) -> u16 {
        match self {
            Self::HashAlgo(_) => 409,
            Self::Transfer => 422,
            Self::TooMany { .. } => 413,
        }
    }
}

/// Checks the request as a whole.
pub fn check_request(req: &BatchRequest, max_objects: usize) -> Result<(), BatchError> {
    if let Some(algo) = req.hash_algo.as_deref() {
        if algo != "sha256" {
            return Err(BatchError::HashAlgo(algo.to_owned()));
        }
    }
    if !req.transfers.is_empty() && !req.transfers.iter().any(|t| t == "basic") {
        return Err(BatchError::Transfer);
    }
    if req.objects.len() > max_objects {
        return Err(BatchError::TooMany {
            count: req.objects.len(),
            limit: max_objects,
        });
    }
    Ok(())
}

fn action(ctx: &ActionContext<'_>, href: String) -> Action {
    Action {
        href,
        header: ctx.header.clone(),
        expires_in: ctx.expires_in,
        expires_at: ctx.expires_at.to_owned(),
    }
}

fn object_error(spec: &ObjectSpec, code: u16, message: String) -> ObjectResponse {
    ObjectResponse {
        oid: spec.oid.clone(),
        size: spec.size,
        authenticated: None,
        actions: None,
        error: Some(ObjectError { code, message }),
    }
}

/// Answers one object of a batch.
pub fn answer(
    op: Operation,
    spec: &ObjectSpec,
    known: Known,
    ctx: &ActionContext<'_>,
) -> ObjectResponse {
    if !valid_oid(&spec.oid) {
        return object_error(
            spec,
            422,
            "invalid object id: expected 64 lowercase hex digits".into(),
        );
    }
    let Ok(size) = u64::try_from(spec.size) else {
        return object_error(spec, 422, "invalid object size".into());
    };
    if size > ctx.max_object_size {
        return object_error(
            spec,
            422,
            format!(
                "object larger than this server's limit of {} bytes",
                ctx.max_object_size
            ),
        );
    }
    let href = format!("{}/objects/{}", ctx.base, spec.oid);
    let mut actions = BTreeMap::new();
    match op {
        Operation::Download => match known {
            Known {
                stored_size: Some(s),
                linked: true,
            } if s == size => {
                actions.insert("download", action(ctx, href));
            }
            Known {
                stored_size: Some(s),
                linked: true,
            } => {
                return object_error(spec, 422, format!("object size is {s}, not {size}"));
            }
            _ => return object_error(spec, 404, "object not found".into()),
        },
        Operation::Upload => {
            // Already here for this repository: nothing to do. Stored for another repository
            // only: the client must still upload (and so prove it has the content).
            if known.linked && known.stored_size == Some(size) {
                return ObjectResponse {
                    oid: spec.oid.clone(),
                    size: spec.size,
                    authenticated: Some(true),
                    actions: None,
                    error: None,
                };
            }
            actions.insert("upload", action(ctx, href));
            actions.insert("verify", action(ctx, format!("{}/verify", ctx.base)));
        }
    }
    ObjectResponse {
        oid: spec.oid.clone(),
        size: spec.size,
        authenticated: Some(true),
        actions: Some(actions),
        error: None,
    }
}

/// Formats unix seconds as RFC 3339 UTC (`2026-01-02T03:04:05Z`).
pub fn rfc3339(unix: u64) -> String {
    let days = (unix / 86_400) as i64;
    let secs = unix % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

// ---- Locks ----

#[derive(Debug, Deserialize)]
pub struct CreateLock {
    pub path: String,
}

#[derive(Debug, Default, Deserialize)]
pub struct VerifyLocks {
    #[serde(default)]
    pub cursor: Option<String>,
    #[serde(default)]
    pub limit: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
pub struct Unlock {
    #[serde(default)]
    pub force: bool,
}

#[derive(Debug, Serialize, Clone, PartialEq)]
pub struct Owner {
    pub name: String,
}

#[derive(Debug, Serialize, Clone, PartialEq)]
pub struct Lock {
    pub id: String,
    pub path: String,
    pub locked_at: String,
    pub owner: Owner,
}

#[derive(Debug, Serialize)]
pub struct LockBody {
    pub lock: Lock,
}

#[derive(Debug, Serialize)]
pub struct LockConflict {
    pub lock: Lock,
    pub message: String,
}

#[derive(Debug, Serialize)]
pub struct LockList {
    pub locks: Vec<Lock>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct VerifyLocksBody {
    pub ours: Vec<Lock>,
    pub theirs: Vec<Lock>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

#[derive(Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct VerifyObject {
    pub oid: String,
    pub size: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx<'a>(header: &'a BTreeMap<String, String>) -> ActionContext<'a> {
        ActionContext {
            base: "http://h/o/r.git/info/lfs",
            header,
            expires_in: 3600,
            expires_at: "2026-01-01T01:00:00Z",
            max_object_size: 1000,
        }
    }

    #[test]
    fn parses_a_real_batch_request() {
        let body = r#"{"operation":"upload","objects":[{"oid":"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef","size":12}],"transfers":["lfs-standalone-file","basic","ssh"],"ref":{"name":"refs/heads/main"},"hash_algo":"sha256"}"#;
        let req: BatchRequest = serde_json::from_str(body).unwrap();
        assert_eq!(req.operation, Operation::Upload);
        assert!(check_request(&req, 10).is_ok());
        assert!(matches!(
            check_request(&req, 0),
            Err(BatchError::TooMany { .. })
        ));
        let bad: BatchRequest =
            serde_json::from_str(r#"{"operation":"download","objects":[],"hash_algo":"md5"}"#)
                .unwrap();
        assert_eq!(check_request(&bad, 10).unwrap_err().status(), 409);
        assert!(
            serde_json::from_str::<BatchRequest>(r#"{"operation":"delete","objects":[]}"#).is_err()
        );
    }

    #[test]
    fn batch_answers() {
        let h = BTreeMap::new();
        let c = ctx(&h);
        let oid = "a".repeat(64);
        let spec = ObjectSpec {
            oid: oid.clone(),
            size: 10,
        };
        let absent = Known {
            stored_size: None,
            linked: false,
        };
        let elsewhere = Known {
            stored_size: Some(10),
            linked: false,
        };
        let here = Known {
            stored_size: Some(10),
            linked: true,
        };
        assert_eq!(
            answer(Operation::Download, &spec, absent, &c)
                .error
                .unwrap()
                .code,
            404
        );
        assert_eq!(
            answer(Operation::Download, &spec, elsewhere, &c)
                .error
                .unwrap()
                .code,
            404,
            "other repo's object"
        );
        let dl = answer(Operation::Download, &spec, here, &c)
            .actions
            .unwrap();
        assert_eq!(
            dl["download"].href,
            format!("http://h/o/r.git/info/lfs/objects/{oid}")
        );
        let up = answer(Operation::Upload, &spec, elsewhere, &c)
            .actions
            .unwrap();
        assert!(up.contains_key("upload") && up.contains_key("verify"));
        assert!(answer(Operation::Upload, &spec, here, &c).actions.is_none());
        let bad = ObjectSpec {
            oid: "XYZ".into(),
            size: 1,
        };
        assert_eq!(
            answer(Operation::Upload, &bad, absent, &c)
                .error
                .unwrap()
                .code,
            422
        );
        let neg = ObjectSpec {
            oid: oid.clone(),
            size: -1,
        };
        assert_eq!(
            answer(Operation::Upload, &neg, absent, &c)
                .error
                .unwrap()
                .code,
            422
        );
        let huge = ObjectSpec { oid, size: 1001 };
        assert_eq!(
            answer(Operation::Upload, &huge, absent, &c)
                .error
                .unwrap()
                .code,
            422
        );
    }

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_798_761_599), "2026-12-31T23:59:59Z");
    }
}
