//! The node-to-node transport of a gitplane cluster (`--cluster-listen`).
//!
//! A connection carries one request. The client sends one header line (JSON, at most
//! [`MAX_HEADER`] bytes, `\n`-terminated); for `exec`, its standard input follows as raw bytes
//! until it half-closes. The server answers with frames: a kind byte, a big-endian `u32` length,
//! and that many bytes (at most [`MAX_FRAME`]): the command's stdout and stderr as they come,
//! then one `exit` frame (an `i32`) or one `error` frame (a message), after which it closes.
//! An `exec` whose header carries [`CACHE_GENERATION_VAR`] may first get an empty `current`
//! frame: the node's copy held that generation's writes when git started, so a relaying node may
//! keep the answer for others asking the same of that generation. Nodes that predate it never
//! send it (the variable is one of the `GITPLANE_*` they pass to git), and are asked only by
//! nodes that understand it.
//! Framing stderr and the exit status apart from stdout is what lets a relayed `git` behave, to
//! the client that started it, like a local one.

use serde::{Deserialize, Serialize};

/// Longest header line, newline included.
pub const MAX_HEADER: usize = 16 * 1024;
/// Largest frame payload.
pub const MAX_FRAME: usize = 1 << 20;
/// Bytes before a frame's payload.
pub const FRAME_HEAD: usize = 5;
/// The header variable naming the repository generation a relaying node keys its copy of the
/// answer on; a node whose copy holds it answers with a [`Kind::Current`] frame first.
pub const CACHE_GENERATION_VAR: &str = "GITPLANE_RELAY_CACHE_GENERATION";

/// What a request asks of the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Op {
    /// Nothing: checks that the node answers and the credentials hold.
    Ping,
    /// Create the bare repository `repo` on this node.
    Init,
    /// Delete this node's copy of `repo`.
    Delete,
    /// Run `service` (a git service) on this node's copy of `repo`, stdio relayed.
    Exec,
}

/// The request header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    pub op: Op,
    /// `v1.<unix seconds>.<hex HMAC-SHA256 of "<seconds>.<op>.<repo>" under the cluster secret>`.
    pub auth: String,
    /// `OWNER/NAME`; empty for `ping`.
    #[serde(default)]
    pub repo: String,
    /// `git-upload-pack`, `git-receive-pack` or `git-upload-archive` (exec only).
    #[serde(default)]
    pub service: String,
    /// `--stateless-rpc` and `--advertise-refs` only (exec only).
    #[serde(default)]
    pub args: Vec<String>,
    /// Variables for git and its hooks: `GIT_PROTOCOL` and `GITPLANE_*` only (exec only).
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// The push is a replica's copy of a write another node coordinates: its hooks record no
    /// event and replicate nothing.
    #[serde(default)]
    pub replica: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("request header longer than {MAX_HEADER} bytes")]
    TooLong,
    #[error("malformed request header: {0}")]
    Malformed(String),
    #[error("argument `{0}` is not allowed")]
    Argument(String),
    #[error("variable `{0}` is not allowed")]
    Variable(String),
    #[error("service `{0}` is not a git service")]
    Service(String),
}

const ALLOWED_ARGS: [&str; 2] = ["--stateless-rpc", "--advertise-refs"];
const SERVICES: [&str; 3] = ["git-upload-pack", "git-receive-pack", "git-upload-archive"];

impl Header {
    /// The header line, newline included.
    pub fn encode(&self) -> Vec<u8> {
        // A struct of strings, bools and a unit enum always serialises.
        let mut line = serde_json::to_vec(self).unwrap_or_default();
        line.push(b'\n');
        line
    }

    /// Parses and checks one header line (without its newline).
    pub fn decode(line: &[u8]) -> Result<Self, HeaderError> {
        if line.len() >= MAX_HEADER {
            return Err(HeaderError::TooLong);
        }
        let h: Header =
            serde_json::from_slice(line).map_err(|e| HeaderError::Malformed(e.to_string()))?;
        if h.op == Op::Exec && !SERVICES.contains(&h.service.as_str()) {
            return Err(HeaderError::Service(h.service));
        }
        if let Some(a) = h.args.iter().find(|a| !ALLOWED_ARGS.contains(&a.as_str())) {
            return Err(HeaderError::Argument(a.clone()));
        }
        let allowed = |k: &str| k == "GIT_PROTOCOL" || k.starts_with("GITPLANE_");
        if let Some((k, _)) = h
            .env
            .iter()
            .find(|(k, v)| !allowed(k) || k.len() > 64 || v.len() > 1024 || v.contains('\0'))
        {
            return Err(HeaderError::Variable(k.clone()));
        }
        Ok(h)
    }

    /// The text the `auth` token signs.
    pub fn signed_text(op: Op, repo: &str, unix_seconds: u64) -> String {
        let op = match op {
            Op::Ping => "ping",
            Op::Init => "init",
            Op::Delete => "delete",
            Op::Exec => "exec",
        };
        format!("{unix_seconds}.{op}.{repo}")
    }
}

/// A frame's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Stdout = 1,
    Stderr = 2,
    Exit = 3,
    Error = 4,
    /// Empty: the copy was current at the [`CACHE_GENERATION_VAR`] generation.
    Current = 5,
}

impl Kind {
    fn from_byte(b: u8) -> Option<Self> {
        match b {
            1 => Some(Self::Stdout),
            2 => Some(Self::Stderr),
            3 => Some(Self::Exit),
            4 => Some(Self::Error),
            5 => Some(Self::Current),
            _ => None,
        }
    }
}

/// A frame's head: its kind and payload length.
pub fn frame_head(kind: Kind, len: usize) -> [u8; FRAME_HEAD] {
    let n = u32::try_from(len.min(MAX_FRAME))
        .unwrap_or(u32::MAX)
        .to_be_bytes();
    [kind as u8, n[0], n[1], n[2], n[3]]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("unknown frame kind {0}")]
    Kind(u8),
    #[error("frame of {0} bytes is over the {MAX_FRAME}-byte limit")]
    TooLong(usize),
    #[error("exit frame of {0} bytes (expected 4)")]
    BadExit(usize),
    #[error("current frame of {0} bytes (expected none)")]
    BadCurrent(usize),
}

/// Reads a frame head: (kind, payload length).
pub fn parse_frame_head(head: [u8; FRAME_HEAD]) -> Result<(Kind, usize), FrameError> {
    let kind = Kind::from_byte(head[0]).ok_or(FrameError::Kind(head[0]))?;
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLong(len));
    }
    if kind == Kind::Exit && len != 4 {
        return Err(FrameError::BadExit(len));
    }
    if kind == Kind::Current && len != 0 {
        return Err(FrameError::BadCurrent(len));
    }
    Ok((kind, len))
}

/// The payload of an exit frame.
pub fn exit_payload(code: i32) -> [u8; 4] {
    code.to_be_bytes()
}

/// Reads an exit frame's payload.
pub fn parse_exit(payload: &[u8]) -> Result<i32, FrameError> {
    let b: [u8; 4] = payload
        .try_into()
        .map_err(|_| FrameError::BadExit(payload.len()))?;
    Ok(i32::from_be_bytes(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exec() -> Header {
        Header {
            op: Op::Exec,
            auth: "v1.1.ab".into(),
            repo: "o/r".into(),
            service: "git-upload-pack".into(),
            args: vec!["--stateless-rpc".into()],
            env: vec![("GIT_PROTOCOL".into(), "version=2".into())],
            replica: false,
        }
    }

    #[test]
    fn headers_round_trip_and_refuse_what_is_not_allowed() {
        let line = exec().encode();
        assert_eq!(*line.last().unwrap(), b'\n');
        assert_eq!(Header::decode(&line[..line.len() - 1]).unwrap(), exec());
        let mut h = exec();
        h.args = vec!["--upload-pack=sh".into()];
        assert!(matches!(
            Header::decode(&h.encode()[..]).map_err(|e| e.to_string()),
            Err(e) if e.contains("not allowed")
        ));
        let mut h = exec();
        h.env = vec![("LD_PRELOAD".into(), "x".into())];
        assert_eq!(
            Header::decode(h.encode().trim_ascii_end()),
            Err(HeaderError::Variable("LD_PRELOAD".into()))
        );
        let mut h = exec();
        h.service = "sh".into();
        assert_eq!(
            Header::decode(h.encode().trim_ascii_end()),
            Err(HeaderError::Service("sh".into()))
        );
        assert_eq!(
            Header::decode(&vec![b' '; MAX_HEADER]),
            Err(HeaderError::TooLong)
        );
        assert!(Header::decode(b"{\"op\":\"exec\"").is_err());
        assert!(Header::decode(b"{\"op\":\"ping\",\"auth\":\"x\",\"extra\":1}").is_err());
    }

    #[test]
    fn frames() {
        let head = frame_head(Kind::Stdout, 7);
        assert_eq!(parse_frame_head(head), Ok((Kind::Stdout, 7)));
        assert_eq!(parse_frame_head([9, 0, 0, 0, 0]), Err(FrameError::Kind(9)));
        assert_eq!(
            parse_frame_head([1, 0xff, 0, 0, 0]),
            Err(FrameError::TooLong(0xff00_0000))
        );
        assert_eq!(
            parse_frame_head([3, 0, 0, 0, 5]),
            Err(FrameError::BadExit(5))
        );
        assert_eq!(parse_exit(&exit_payload(-3)), Ok(-3));
        assert_eq!(
            parse_frame_head(frame_head(Kind::Current, 0)),
            Ok((Kind::Current, 0))
        );
        assert_eq!(
            parse_frame_head([5, 0, 0, 0, 1]),
            Err(FrameError::BadCurrent(1))
        );
    }
}
