//! The push event: what one push changed, as captured by post-receive and carried through the
//! outbox, the broker and every job. Sans-I/O: parsing git's post-receive input and building the
//! JSON payload never touch a file or a socket.

use serde::{Deserialize, Serialize};

/// The all-zero object id git uses for "no object" (a created or deleted ref).
pub const ZERO_OID: &str = "0000000000000000000000000000000000000000";

/// Most push options kept per event, and longest kept option (git's own limits are similar).
const MAX_PUSH_OPTIONS: usize = 100;
const MAX_PUSH_OPTION_BYTES: usize = 4096;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EventError {
    #[error("post-receive input line {line}: expected `OLD NEW REFNAME`, got {text:?}")]
    BadLine { line: usize, text: String },
    #[error("post-receive input line {line}: `{oid}` is not a hex object id")]
    BadOid { line: usize, oid: String },
    #[error("reference-transaction input line {line}: expected `OLD NEW REFNAME`, got {text:?}")]
    BadTxLine { line: usize, text: String },
    #[error("malformed event payload: {0}")]
    Payload(String),
}

/// One ref changed by a push.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefUpdate {
    #[serde(rename = "ref")]
    pub refname: String,
    /// The old object id ([`ZERO_OID`] when the ref was created).
    pub before: String,
    /// The new object id ([`ZERO_OID`] when the ref was deleted).
    pub after: String,
}

impl RefUpdate {
    pub fn created(&self) -> bool {
        self.before == ZERO_OID || self.before.bytes().all(|b| b == b'0')
    }

    pub fn deleted(&self) -> bool {
        self.after == ZERO_OID || self.after.bytes().all(|b| b == b'0')
    }
}

/// One push, as stored in the outbox and sent to the broker and to webhooks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushEvent {
    /// Unique per push (128 random bits, hex): the idempotency key of every job.
    pub id: String,
    /// `OWNER/NAME`.
    pub repository: String,
    /// The authenticated user who pushed ("" when unknown).
    pub pusher: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub remote_addr: String,
    /// How the refs changed when it was not a `git push`: the gRPC method, e.g. `grpc:Merge`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub via: String,
    pub refs: Vec<RefUpdate>,
    #[serde(default)]
    pub push_options: Vec<String>,
    /// Seconds since the epoch, when the hook ran.
    pub pushed_at: i64,
}

impl PushEvent {
    pub fn to_json(&self) -> String {
        // Serialising plain strings and numbers cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn from_json(text: &[u8]) -> Result<Self, EventError> {
        serde_json::from_slice(text).map_err(|e| EventError::Payload(e.to_string()))
    }
}

/// A fresh event id: 128 random bits in hex.
pub fn new_event_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

fn is_oid(s: &str) -> bool {
    (s.len() == 40 || s.len() == 64) && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Parses post-receive's standard input: one `OLD NEW REFNAME` line per updated ref.
pub fn parse_ref_updates(input: &str) -> Result<Vec<RefUpdate>, EventError> {
    let mut out = Vec::new();
    for (i, line) in input.lines().enumerate() {
        if line.is_empty() {
            continue;
        }
        let mut parts = line.splitn(3, ' ');
        let (Some(before), Some(after), Some(refname)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(EventError::BadLine {
                line: i + 1,
                text: line.chars().take(200).collect(),
            });
        };
        for oid in [before, after] {
            if !is_oid(oid) {
                return Err(EventError::BadOid {
                    line: i + 1,
                    oid: oid.chars().take(80).collect(),
                });
            }
        }
        out.push(RefUpdate {
            refname: refname.to_owned(),
            before: before.to_owned(),
            after: after.to_owned(),
        });
    }
    Ok(out)
}

/// Parses reference-transaction's standard input (`OLD NEW REFNAME` lines) and keeps what a push
/// event is about: updates of `refs/` that change a value. Dropped on purpose: `HEAD` (git adds it
/// beside the branch it points to), symref values (`ref:TARGET`), and no-op lines such as the
/// zero-to-zero deletes of the packed-refs transaction nested inside a branch deletion.
pub fn parse_transaction(input: &str) -> Result<Vec<RefUpdate>, EventError> {
    let mut out = Vec::new();
    for (i, line) in input.lines().enumerate() {
        if line.is_empty() {
            continue;
        }
        let bad = || EventError::BadTxLine {
            line: i + 1,
            text: line.chars().take(200).collect(),
        };
        let mut parts = line.splitn(3, ' ');
        let (Some(before), Some(after), Some(refname)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        if before.starts_with("ref:") || after.starts_with("ref:") {
            continue;
        }
        for oid in [before, after] {
            if !is_oid(oid) {
                return Err(EventError::BadOid {
                    line: i + 1,
                    oid: oid.chars().take(80).collect(),
                });
            }
        }
        if refname.is_empty() {
            return Err(bad());
        }
        if !refname.starts_with("refs/") || before == after {
            continue;
        }
        out.push(RefUpdate {
            refname: refname.to_owned(),
            before: before.to_owned(),
            after: after.to_owned(),
        });
    }
    Ok(out)
}

/// Push options from git's `GIT_PUSH_OPTION_COUNT` / `GIT_PUSH_OPTION_<n>` variables, looked up
/// through `var` (bounded in count and length).
pub fn push_options(var: impl Fn(&str) -> Option<String>) -> Vec<String> {
    let count = var("GIT_PUSH_OPTION_COUNT")
        .and_then(|c| c.trim().parse::<usize>().ok())
        .unwrap_or(0)
        .min(MAX_PUSH_OPTIONS);
    (0..count)
        .filter_map(|i| var(&format!("GIT_PUSH_OPTION_{i}")))
        .map(|mut o| {
            if o.len() > MAX_PUSH_OPTION_BYTES {
                let mut cut = MAX_PUSH_OPTION_BYTES;
                while !o.is_char_boundary(cut) {
                    cut -= 1;
                }
                o.truncate(cut);
            }
            o
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "1111111111111111111111111111111111111111";
    const B: &str = "2222222222222222222222222222222222222222";

    #[test]
    fn parses_ref_updates() {
        let input = format!("{ZERO_OID} {A} refs/heads/new\n{A} {B} refs/heads/main\n{B} {ZERO_OID} refs/tags/x y\n");
        let refs = parse_ref_updates(&input).unwrap();
        assert_eq!(refs.len(), 3);
        assert!(refs[0].created());
        assert!(!refs[1].created() && !refs[1].deleted());
        assert!(refs[2].deleted());
        assert_eq!(refs[2].refname, "refs/tags/x y");
        assert!(matches!(
            parse_ref_updates("abc\n"),
            Err(EventError::BadLine { line: 1, .. })
        ));
        assert!(matches!(
            parse_ref_updates(&format!("{A} zz refs/heads/x\n")),
            Err(EventError::BadOid { .. })
        ));
        assert!(parse_ref_updates("").unwrap().is_empty());
    }

    #[test]
    fn transaction_input_keeps_only_ref_changes_of_refs() {
        let input = format!(
            "{ZERO_OID} {A} refs/heads/main\n{ZERO_OID} {A} HEAD\n{ZERO_OID} {ZERO_OID} refs/heads/gone\n\
             ref:refs/heads/a ref:refs/heads/b HEAD\n{A} {ZERO_OID} refs/heads/gone\n"
        );
        let refs = parse_transaction(&input).unwrap();
        assert_eq!(
            refs.iter().map(|r| r.refname.as_str()).collect::<Vec<_>>(),
            ["refs/heads/main", "refs/heads/gone"]
        );
        assert!(refs[1].deleted());
        assert!(parse_transaction("").unwrap().is_empty());
        // Malformed input is an error naming the line, never a panic.
        for bad in ["x\n", &format!("{A} {B}\n"), &format!("{A} {B} \n")] {
            assert!(
                matches!(
                    parse_transaction(bad),
                    Err(EventError::BadTxLine { line: 1, .. })
                ),
                "{bad:?}"
            );
        }
        let err =
            parse_transaction(&format!("{A} {B} refs/heads/a\n{A} nothex refs/x\n")).unwrap_err();
        assert_eq!(
            err,
            EventError::BadOid {
                line: 2,
                oid: "nothex".into()
            }
        );
        assert!(err.to_string().contains("not a hex object id"), "{err}");
        assert!(parse_transaction("\u{0}\u{ff} \u{1} \u{2}").is_err());
    }

    #[test]
    fn reads_push_options() {
        let vars = |k: &str| match k {
            "GIT_PUSH_OPTION_COUNT" => Some("2".to_owned()),
            "GIT_PUSH_OPTION_0" => Some("ci.skip".to_owned()),
            "GIT_PUSH_OPTION_1" => Some("x".repeat(5000)),
            _ => None,
        };
        let opts = push_options(vars);
        assert_eq!(opts.len(), 2);
        assert_eq!(opts[0], "ci.skip");
        assert_eq!(opts[1].len(), MAX_PUSH_OPTION_BYTES);
        assert!(push_options(|_| None).is_empty());
    }

    #[test]
    fn json_round_trip() {
        let e = PushEvent {
            id: new_event_id(),
            repository: "o/r".into(),
            pusher: "alice".into(),
            remote_addr: String::new(),
            via: "grpc:Merge".into(),
            refs: vec![RefUpdate {
                refname: "refs/heads/main".into(),
                before: A.into(),
                after: B.into(),
            }],
            push_options: vec![],
            pushed_at: 1,
        };
        assert_eq!(e.id.len(), 32);
        let json = e.to_json();
        assert!(json.contains("\"ref\":\"refs/heads/main\""), "{json}");
        assert_eq!(PushEvent::from_json(json.as_bytes()).unwrap(), e);
        assert!(PushEvent::from_json(b"{").is_err());
    }
}
