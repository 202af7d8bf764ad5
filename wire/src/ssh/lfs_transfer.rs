//! The `git-lfs-transfer` wire protocol (Git LFS "SSH protocol proposal", version 1), sans-I/O.
//!
//! Every message is a run of pkt-lines ([`crate::git::pktline`]): a command line, `key=value`
//! argument lines, optionally a delimiter followed by text lines (`batch`) or binary data
//! (`put-object`), and a flush. [`Decoder`] turns bytes into [`Event`]s one packet at a time and
//! never touches a socket; the SSH channel loop in the gitplane crate feeds it channel data
//! and acts on the events. The `encode_*` functions build the server's answers.
//!
//! Decoding is bounded: argument and text lines are capped in length and number, and a
//! `put-object` body is handed out packet by packet ([`Event::Data`]) so nobody buffers an object.
//! A malformed message is consumed up to its flush and reported as [`Event::Invalid`], which the
//! loop answers with an error status; only broken pkt-line framing ([`FramingError`]) ends the
//! session, because after it nothing can be resynchronised.
//!
//! Where the proposal and git-lfs 3.x's client differ, the client wins: `verify-object` carries
//! its size as a `size=` argument (the proposal puts it on the command line; both are accepted),
//! `lock` has no delimiter, the lock-verification listing is sent as `list-locks`, and error
//! texts are sent as plain lines (the client shows the first one as is).

use crate::git::pktline::{self, Packet, PktDecode, PktError, DELIM, FLUSH};
use crate::lfs::api::valid_oid;

/// Longest argument line kept (a lock path is at most 4096 bytes, plus its key).
pub const MAX_ARG_LEN: usize = 4200;
/// Most argument lines in one message (git-lfs sends at most a handful).
pub const MAX_ARGS: usize = 32;
/// Longest `batch` object line kept: `OID SIZE` plus a few optional `key=value` pairs.
pub const MAX_OBJECT_LINE: usize = 1024;
/// Longest lock path accepted (as over HTTP).
pub const MAX_LOCK_PATH: usize = 4096;

/// The pkt-line stream itself is broken: the session cannot continue.
pub type FramingError = PktError;

/// A message the server understood as a message but cannot accept; answered with `status`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("empty request: expected a command")]
    Empty,
    #[error("unknown command `{0}`")]
    UnknownCommand(String),
    #[error("malformed `{command}` command line")]
    BadCommandLine { command: &'static str },
    #[error("request lines must be UTF-8 text")]
    NotUtf8,
    #[error("line longer than {limit} bytes")]
    LineTooLong { limit: usize },
    #[error("too many {what}: more than {limit}")]
    TooMany { what: &'static str, limit: usize },
    #[error("argument `{0}` is not of the form key=value")]
    BadArgument(String),
    #[error("missing argument `{0}`")]
    MissingArgument(&'static str),
    #[error("invalid value for `{key}`")]
    BadValue { key: &'static str },
    #[error("invalid object id: expected 64 lowercase hex digits")]
    BadOid,
    #[error("malformed batch line `{0}`: expected `OID SIZE`")]
    BadObjectLine(String),
    #[error("`{command}` does not take {what}")]
    Unexpected {
        command: &'static str,
        what: &'static str,
    },
    #[error("unsupported protocol version `{0}`: this server speaks version 1")]
    Version(String),
    #[error("unsupported hash algorithm `{0}`: this server uses sha256")]
    HashAlgo(String),
}

impl RequestError {
    /// The HTTP-style status the protocol answers with, as the HTTP API would.
    pub fn status(&self) -> u16 {
        match self {
            Self::TooMany { .. } => 413,
            Self::BadOid => 422,
            Self::HashAlgo(_) => 409,
            _ => 400,
        }
    }
}

/// One object of a `batch` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectSpec {
    pub oid: String,
    pub size: u64,
}

/// A complete request other than `put-object` (whose body streams).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Version(u32),
    Batch {
        hash_algo: Option<String>,
        objects: Vec<ObjectSpec>,
    },
    GetObject {
        oid: String,
    },
    VerifyObject {
        oid: String,
        size: u64,
    },
    Lock {
        path: String,
    },
    ListLocks {
        path: Option<String>,
        id: Option<i64>,
        cursor: Option<i64>,
        limit: Option<usize>,
    },
    Unlock {
        id: String,
        force: bool,
    },
    Quit,
}

/// What one decoded packet means.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// A whole request: answer it.
    Request(Request),
    /// A `put-object` header: [`Event::Data`] packets and then [`Event::DataEnd`] follow.
    PutObject { oid: String, size: u64 },
    /// A piece of the `put-object` body, borrowed from the input.
    Data(&'a [u8]),
    /// The flush that ends a `put-object` body.
    DataEnd,
    /// A malformed request, consumed through its flush: answer with an error status.
    Invalid(RequestError),
}

/// The result of one [`Decoder::decode`] call.
#[derive(Debug, PartialEq, Eq)]
pub enum Step<'a> {
    /// A packet was consumed; `event` says what it completed, if anything.
    Packet {
        consumed: usize,
        event: Option<Event<'a>>,
    },
    /// At least `needed` more bytes are required (a partial packet is normal).
    Incomplete { needed: usize },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Command {
    Version(u32),
    Batch,
    PutObject,
    GetObject,
    VerifyObject(Option<u64>),
    Lock,
    ListLocks,
    Unlock,
    Quit,
}

impl Command {
    fn name(self) -> &'static str {
        match self {
            Self::Version(_) => "version",
            Self::Batch => "batch",
            Self::PutObject => "put-object",
            Self::GetObject => "get-object",
            Self::VerifyObject(_) => "verify-object",
            Self::Lock => "lock",
            Self::ListLocks => "list-lock",
            Self::Unlock => "unlock",
            Self::Quit => "quit",
        }
    }
}

/// A command line with its argument (an oid or lock id) once parsed.
#[derive(Debug)]
struct Pending {
    command: Command,
    target: String,
    args: Vec<(String, String)>,
    objects: Vec<ObjectSpec>,
}

#[derive(Debug)]
enum State {
    /// Expecting a command line.
    Command,
    /// Collecting `key=value` lines until a delimiter or flush.
    Args(Pending),
    /// After the delimiter of a `batch` (object lines) or `lock` (nothing) request.
    Lines(Pending),
    /// Inside a `put-object` body.
    Data,
    /// Discarding the rest of a malformed message up to its flush.
    Skip(RequestError),
}

/// Incremental decoder of client messages.
#[derive(Debug)]
pub struct Decoder {
    state: State,
    max_objects: usize,
}

impl Decoder {
    /// `max_objects` bounds the objects of one `batch` (as `lfs.max_batch_objects` does over HTTP).
    pub fn new(max_objects: usize) -> Self {
        Self {
            state: State::Command,
            max_objects,
        }
    }

    /// True between messages: nothing partial is pending.
    pub fn is_idle(&self) -> bool {
        matches!(self.state, State::Command)
    }

    /// Decodes the packet at the front of `buf`.
    ///
    /// # Errors
    /// Only when the pkt-line framing itself is broken; malformed messages come back as
    /// [`Event::Invalid`].
    pub fn decode<'a>(&mut self, buf: &'a [u8]) -> Result<Step<'a>, FramingError> {
        let (packet, consumed) = match pktline::decode(buf)? {
            PktDecode::Incomplete { needed } => return Ok(Step::Incomplete { needed }),
            PktDecode::Complete { packet, consumed } => (packet, consumed),
        };
        let event = self.on_packet(packet);
        Ok(Step::Packet { consumed, event })
    }

    fn on_packet<'a>(&mut self, packet: Packet<'a>) -> Option<Event<'a>> {
        let state = std::mem::replace(&mut self.state, State::Command);
        let (next, event) = match state {
            State::Command => match packet {
                Packet::Flush => (State::Command, Some(Event::Invalid(RequestError::Empty))),
                Packet::Data(d) => match text(d, MAX_ARG_LEN).and_then(parse_command_line) {
                    Ok(p) => (State::Args(p), None),
                    Err(e) => (State::Skip(e), None),
                },
                Packet::Delim | Packet::ResponseEnd => (State::Skip(RequestError::Empty), None),
            },
            State::Args(mut p) => match packet {
                Packet::Data(d) => match text(d, MAX_ARG_LEN).and_then(parse_arg) {
                    Ok(_) if p.args.len() >= MAX_ARGS => (
                        State::Skip(RequestError::TooMany {
                            what: "arguments",
                            limit: MAX_ARGS,
                        }),
                        None,
                    ),
                    Ok(kv) => {
                        p.args.push(kv);
                        (State::Args(p), None)
                    }
                    Err(e) => (State::Skip(e), None),
                },
                Packet::Flush => match p.command {
                    Command::PutObject => (
                        State::Command,
                        Some(Event::Invalid(RequestError::MissingArgument(
                            "put-object data (after a delimiter)",
                        ))),
                    ),
                    _ => (State::Command, Some(finish(p))),
                },
                Packet::Delim => match p.command {
                    Command::PutObject => match put_header(&p) {
                        Ok(event) => (State::Data, Some(event)),
                        Err(e) => (State::Skip(e), None),
                    },
                    Command::Batch | Command::Lock => (State::Lines(p), None),
                    c => (
                        State::Skip(RequestError::Unexpected {
                            command: c.name(),
                            what: "a delimiter",
                        }),
                        None,
                    ),
                },
                Packet::ResponseEnd => (State::Skip(unexpected_end(p.command)), None),
            },
            State::Lines(mut p) => match packet {
                Packet::Flush => (State::Command, Some(finish(p))),
                Packet::Data(d) if p.command == Command::Batch => {
                    match text(d, MAX_OBJECT_LINE).and_then(parse_object_line) {
                        Ok(_) if p.objects.len() >= self.max_objects => (
                            State::Skip(RequestError::TooMany {
                                what: "objects in one batch",
                                limit: self.max_objects,
                            }),
                            None,
                        ),
                        Ok(o) => {
                            p.objects.push(o);
                            (State::Lines(p), None)
                        }
                        Err(e) => (State::Skip(e), None),
                    }
                }
                Packet::Data(_) => (
                    State::Skip(RequestError::Unexpected {
                        command: p.command.name(),
                        what: "data lines",
                    }),
                    None,
                ),
                Packet::Delim | Packet::ResponseEnd => {
                    (State::Skip(unexpected_end(p.command)), None)
                }
            },
            State::Data => match packet {
                Packet::Data(d) => (State::Data, Some(Event::Data(d))),
                Packet::Flush => (State::Command, Some(Event::DataEnd)),
                // Only a flush ends a body: a stray delimiter means the client lost track. The
                // rest is skipped and the upload ends as Invalid, so it never succeeds.
                Packet::Delim | Packet::ResponseEnd => (
                    State::Skip(RequestError::Unexpected {
                        command: "put-object",
                        what: "a delimiter inside its data",
                    }),
                    None,
                ),
            },
            State::Skip(e) => match packet {
                Packet::Flush => (State::Command, Some(Event::Invalid(e))),
                _ => (State::Skip(e), None),
            },
        };
        self.state = next;
        event
    }
}

fn unexpected_end(command: Command) -> RequestError {
    RequestError::Unexpected {
        command: command.name(),
        what: "a response-end packet",
    }
}

/// A text line: UTF-8, at most `limit` bytes, one trailing LF removed.
fn text(d: &[u8], limit: usize) -> Result<&str, RequestError> {
    if d.len() > limit + 1 {
        return Err(RequestError::LineTooLong { limit });
    }
    let d = d.strip_suffix(b"\n").unwrap_or(d);
    std::str::from_utf8(d).map_err(|_| RequestError::NotUtf8)
}

fn parse_command_line(line: &str) -> Result<Pending, RequestError> {
    let mut words = line.split(' ');
    let name = words.next().unwrap_or_default();
    let rest: Vec<&str> = words.collect();
    let bad = |command| RequestError::BadCommandLine { command };
    let (command, target) = match (name, rest.as_slice()) {
        ("version", [v]) => match v.parse::<u32>() {
            Ok(n) if v.bytes().all(|b| b.is_ascii_digit()) => (Command::Version(n), ""),
            _ => return Err(RequestError::Version(printable(v))),
        },
        ("version", _) => return Err(bad("version")),
        ("batch", []) => (Command::Batch, ""),
        ("put-object", [oid]) => (Command::PutObject, *oid),
        ("get-object", [oid]) => (Command::GetObject, *oid),
        ("verify-object", [oid]) => (Command::VerifyObject(None), *oid),
        ("verify-object", [oid, size]) => (
            Command::VerifyObject(Some(
                parse_u64(size).ok_or(RequestError::BadValue { key: "size" })?,
            )),
            *oid,
        ),
        ("lock", []) => (Command::Lock, ""),
        ("list-lock" | "list-locks", []) => (Command::ListLocks, ""),
        ("unlock", [id]) if !id.is_empty() => (Command::Unlock, *id),
        ("quit", []) => (Command::Quit, ""),
        ("batch", _) => return Err(bad("batch")),
        ("put-object", _) => return Err(bad("put-object")),
        ("get-object", _) => return Err(bad("get-object")),
        ("verify-object", _) => return Err(bad("verify-object")),
        ("lock", _) => return Err(bad("lock")),
        ("list-lock" | "list-locks", _) => return Err(bad("list-lock")),
        ("unlock", _) => return Err(bad("unlock")),
        ("quit", _) => return Err(bad("quit")),
        (other, _) => return Err(RequestError::UnknownCommand(printable(other))),
    };
    if matches!(
        command,
        Command::PutObject | Command::GetObject | Command::VerifyObject(_)
    ) && !valid_oid(target)
    {
        return Err(RequestError::BadOid);
    }
    Ok(Pending {
        command,
        target: target.to_owned(),
        args: Vec::new(),
        objects: Vec::new(),
    })
}

fn parse_arg(line: &str) -> Result<(String, String), RequestError> {
    match line.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(RequestError::BadArgument(printable(line))),
    }
}

/// `OID SIZE [key=value...]`; unknown pairs are ignored, as the proposal asks.
fn parse_object_line(line: &str) -> Result<ObjectSpec, RequestError> {
    let mut words = line.split(' ');
    let (Some(oid), Some(size)) = (words.next(), words.next()) else {
        return Err(RequestError::BadObjectLine(printable(line)));
    };
    if !valid_oid(oid) {
        return Err(RequestError::BadOid);
    }
    let size = parse_u64(size).ok_or_else(|| RequestError::BadObjectLine(printable(line)))?;
    Ok(ObjectSpec {
        oid: oid.to_owned(),
        size,
    })
}

/// Decimal digits only: `+5` and `-0` are not sizes.
fn parse_u64(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn arg<'a>(p: &'a Pending, key: &str) -> Option<&'a str> {
    p.args
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

fn size_arg(p: &Pending) -> Result<u64, RequestError> {
    let v = arg(p, "size").ok_or(RequestError::MissingArgument("size"))?;
    parse_u64(v).ok_or(RequestError::BadValue { key: "size" })
}

fn put_header(p: &Pending) -> Result<Event<'static>, RequestError> {
    Ok(Event::PutObject {
        oid: p.target.clone(),
        size: size_arg(p)?,
    })
}

/// Turns a complete message into a request (or the reason it is not one).
fn finish(p: Pending) -> Event<'static> {
    match build(p) {
        Ok(r) => Event::Request(r),
        Err(e) => Event::Invalid(e),
    }
}

fn build(p: Pending) -> Result<Request, RequestError> {
    let id = |key: &'static str| -> Result<Option<i64>, RequestError> {
        arg(&p, key)
            .map(|v| v.parse::<i64>().map_err(|_| RequestError::BadValue { key }))
            .transpose()
    };
    Ok(match p.command {
        Command::Version(n) => Request::Version(n),
        Command::Batch => {
            let hash_algo = arg(&p, "hash-algo").map(str::to_owned);
            if let Some(a) = hash_algo.as_deref().filter(|a| *a != "sha256") {
                return Err(RequestError::HashAlgo(printable(a)));
            }
            Request::Batch {
                hash_algo,
                objects: p.objects,
            }
        }
        // put-object ends in a body; a flush right after the arguments is handled by the caller.
        Command::PutObject => return Err(RequestError::MissingArgument("put-object data")),
        Command::GetObject => Request::GetObject { oid: p.target },
        Command::VerifyObject(inline) => {
            let size = match inline {
                Some(s) => s,
                None => size_arg(&p)?,
            };
            Request::VerifyObject {
                oid: p.target,
                size,
            }
        }
        Command::Lock => {
            let path = arg(&p, "path").ok_or(RequestError::MissingArgument("path"))?;
            if path.is_empty() || path.len() > MAX_LOCK_PATH {
                return Err(RequestError::BadValue { key: "path" });
            }
            Request::Lock {
                path: path.to_owned(),
            }
        }
        Command::ListLocks => {
            let limit = arg(&p, "limit")
                .map(|v| parse_u64(v).ok_or(RequestError::BadValue { key: "limit" }))
                .transpose()?
                .map(|n| usize::try_from(n).unwrap_or(usize::MAX));
            Request::ListLocks {
                path: arg(&p, "path").filter(|s| !s.is_empty()).map(str::to_owned),
                id: id("id")?,
                cursor: id("cursor")?,
                limit,
            }
        }
        Command::Unlock => Request::Unlock {
            force: matches!(arg(&p, "force"), Some("true" | "1")),
            id: p.target,
        },
        Command::Quit => Request::Quit,
    })
}

/// A short, escaped copy of client text for messages.
fn printable(s: &str) -> String {
    let mut out: String = s.chars().take(64).flat_map(char::escape_debug).collect();
    if s.chars().count() > 64 {
        out.push_str("...");
    }
    out
}

// ---- Encoding the server's side ----

/// Appends one text line (with its LF). Lines longer than a packet are cut: every line this
/// server writes is short, and client-supplied parts are bounded on the way in.
pub fn encode_line(out: &mut Vec<u8>, line: &str) {
    let mut bytes = line.as_bytes();
    if bytes.len() >= pktline::MAX_PAYLOAD_LEN {
        bytes = bytes
            .get(..pktline::MAX_PAYLOAD_LEN - 1)
            .unwrap_or_default();
    }
    let mut with_lf = Vec::with_capacity(bytes.len() + 1);
    with_lf.extend_from_slice(bytes);
    with_lf.push(b'\n');
    // Cannot fail: the payload was cut to fit above.
    let _ = pktline::encode_data(out, &with_lf);
}

/// The capability advertisement sent when the session starts.
pub fn encode_capabilities(out: &mut Vec<u8>) {
    encode_line(out, "version=1");
    encode_line(out, "locking");
    out.extend_from_slice(FLUSH);
}

/// `status CODE`, arguments, and (if `lines` is given) a delimiter and text lines; then flush.
pub fn encode_status(out: &mut Vec<u8>, code: u16, args: &[String], lines: Option<&[String]>) {
    encode_line(out, &format!("status {code}"));
    for a in args {
        encode_line(out, a);
    }
    if let Some(lines) = lines {
        out.extend_from_slice(DELIM);
        for l in lines {
            encode_line(out, l);
        }
    }
    out.extend_from_slice(FLUSH);
}

/// An error answer: status, arguments, delimiter, the message, flush. The delimiter is always
/// there because git-lfs reads `get-object` errors as a data response, which needs one.
pub fn encode_error(out: &mut Vec<u8>, code: u16, args: &[String], message: &str) {
    encode_status(out, code, args, Some(&[message.to_owned()]));
}

/// The head of a successful `get-object` answer; data packets and a flush follow.
pub fn encode_object_head(out: &mut Vec<u8>, size: u64) {
    encode_line(out, "status 200");
    encode_line(out, &format!("size={size}"));
    out.extend_from_slice(DELIM);
}

/// The pkt-line header of a data packet carrying `len` payload bytes.
///
/// # Errors
/// When `len` exceeds [`pktline::MAX_PAYLOAD_LEN`].
pub fn data_header(len: usize) -> Result<[u8; 4], PktError> {
    if len > pktline::MAX_PAYLOAD_LEN {
        return Err(PktError::PayloadTooLarge {
            len,
            max: pktline::MAX_PAYLOAD_LEN,
        });
    }
    let total = len + 4;
    let digit = |shift: usize| {
        b"0123456789abcdef"
            .get((total >> shift) & 0xf)
            .copied()
            .unwrap_or(b'0')
    };
    Ok([digit(12), digit(8), digit(4), digit(0)])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pkt(s: &str) -> Vec<u8> {
        let mut v = Vec::new();
        pktline::encode_str(&mut v, s).unwrap();
        v
    }

    /// Decodes a whole stream fed in `step`-byte pieces, as a channel would deliver it; data
    /// events are rendered as `<data N>`.
    fn run(stream: &[u8], step: usize) -> Vec<String> {
        let mut dec = Decoder::new(3);
        let mut buf = Vec::new();
        let mut fed = 0;
        let mut out = Vec::new();
        loop {
            match dec.decode(&buf) {
                Ok(Step::Packet { consumed, event }) => {
                    if let Some(e) = event {
                        out.push(match e {
                            Event::Data(d) => format!("<data {}>", d.len()),
                            e => format!("{e:?}"),
                        });
                    }
                    buf.drain(..consumed);
                }
                Ok(Step::Incomplete { .. }) => {
                    if fed == stream.len() {
                        return out;
                    }
                    let end = (fed + step).min(stream.len());
                    buf.extend_from_slice(&stream[fed..end]);
                    fed = end;
                }
                Err(e) => {
                    out.push(format!("framing: {e}"));
                    return out;
                }
            }
        }
    }

    const OID: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    fn transcript() -> Vec<u8> {
        // What git-lfs 3.3 sends for an upload of "test" (4 bytes), then a verify and quit.
        let mut s = Vec::new();
        s.extend(pkt("version 1\n"));
        s.extend_from_slice(FLUSH);
        s.extend(pkt("batch\n"));
        s.extend(pkt("transfer=ssh\n"));
        s.extend(pkt("hash-algo=sha256\n"));
        s.extend(pkt("refname=refs/heads/main\n"));
        s.extend_from_slice(DELIM);
        s.extend(pkt(&format!("{OID} 4\n")));
        s.extend_from_slice(FLUSH);
        s.extend(pkt(&format!("put-object {OID}\n")));
        s.extend(pkt("size=4\n"));
        s.extend_from_slice(DELIM);
        s.extend(pkt("te"));
        s.extend(pkt("st"));
        s.extend_from_slice(FLUSH);
        s.extend(pkt(&format!("verify-object {OID}\n")));
        s.extend(pkt("size=4\n"));
        s.extend_from_slice(FLUSH);
        s.extend(pkt("quit\n"));
        s.extend_from_slice(FLUSH);
        s
    }

    #[test]
    fn decodes_a_client_transcript_at_every_split() {
        let stream = transcript();
        let want = run(&stream, stream.len());
        assert_eq!(
            want,
            vec![
                "Request(Version(1))".to_owned(),
                format!("Request(Batch {{ hash_algo: Some(\"sha256\"), objects: [ObjectSpec {{ oid: \"{OID}\", size: 4 }}] }})"),
                format!("PutObject {{ oid: \"{OID}\", size: 4 }}"),
                "<data 2>".into(),
                "<data 2>".into(),
                "DataEnd".into(),
                format!("Request(VerifyObject {{ oid: \"{OID}\", size: 4 }})"),
                "Request(Quit)".into(),
            ]
        );
        for step in [1, 2, 3, 5, 7, 64] {
            assert_eq!(run(&stream, step), want, "step {step}");
        }
    }

    #[test]
    fn locks_as_git_lfs_sends_them() {
        let mut s = Vec::new();
        s.extend(pkt("lock\n"));
        s.extend(pkt("path=a b/c.bin\n"));
        s.extend(pkt("refname=refs/heads/main\n"));
        s.extend_from_slice(FLUSH);
        s.extend(pkt("list-lock\n"));
        s.extend(pkt("limit=100\n"));
        s.extend(pkt("cursor=7\n"));
        s.extend_from_slice(FLUSH);
        s.extend(pkt("list-locks\n"));
        s.extend_from_slice(FLUSH);
        s.extend(pkt("unlock 12\n"));
        s.extend(pkt("force=true\n"));
        s.extend_from_slice(FLUSH);
        s.extend(pkt(&format!("verify-object {OID} 10\n")));
        s.extend_from_slice(FLUSH);
        assert_eq!(
            run(&s, 3),
            vec![
                "Request(Lock { path: \"a b/c.bin\" })".to_owned(),
                "Request(ListLocks { path: None, id: None, cursor: Some(7), limit: Some(100) })"
                    .into(),
                "Request(ListLocks { path: None, id: None, cursor: None, limit: None })".into(),
                "Request(Unlock { id: \"12\", force: true })".into(),
                format!("Request(VerifyObject {{ oid: \"{OID}\", size: 10 }})"),
            ]
        );
    }

    #[test]
    fn malformed_messages_are_consumed_and_reported() {
        let cases: Vec<(Vec<Vec<u8>>, RequestError)> = vec![
            (vec![FLUSH.to_vec()], RequestError::Empty),
            (
                vec![pkt("rm -rf\n"), pkt("x=y\n"), FLUSH.to_vec()],
                RequestError::UnknownCommand("rm".into()),
            ),
            (
                vec![pkt("version x\n"), FLUSH.to_vec()],
                RequestError::Version("x".into()),
            ),
            (
                vec![pkt("get-object ABC\n"), FLUSH.to_vec()],
                RequestError::BadOid,
            ),
            (
                vec![
                    pkt(&format!("put-object {OID}\n")),
                    DELIM.to_vec(),
                    pkt("data"),
                    FLUSH.to_vec(),
                ],
                RequestError::MissingArgument("size"),
            ),
            (
                vec![
                    pkt(&format!("put-object {OID}\n")),
                    pkt("size=-1\n"),
                    DELIM.to_vec(),
                    FLUSH.to_vec(),
                ],
                RequestError::BadValue { key: "size" },
            ),
            (
                vec![
                    pkt("batch\n"),
                    pkt("noequals\n"),
                    DELIM.to_vec(),
                    FLUSH.to_vec(),
                ],
                RequestError::BadArgument("noequals".into()),
            ),
            (
                vec![pkt("batch\n"), pkt("hash-algo=md5\n"), FLUSH.to_vec()],
                RequestError::HashAlgo("md5".into()),
            ),
            (
                vec![
                    pkt("batch\n"),
                    DELIM.to_vec(),
                    pkt(&format!("{OID} +4\n")),
                    FLUSH.to_vec(),
                ],
                RequestError::BadObjectLine(format!("{OID}...")),
            ),
            (
                vec![pkt("quit\n"), DELIM.to_vec(), pkt("x"), FLUSH.to_vec()],
                RequestError::Unexpected {
                    command: "quit",
                    what: "a delimiter",
                },
            ),
            (
                vec![pkt("lock\n"), FLUSH.to_vec()],
                RequestError::MissingArgument("path"),
            ),
            (
                vec![b"0006\xff\xfe".to_vec(), FLUSH.to_vec()],
                RequestError::NotUtf8,
            ),
        ];
        for (packets, err) in cases {
            let stream: Vec<u8> = packets.concat();
            let got = run(&stream, 1);
            assert_eq!(
                got,
                vec![format!("{:?}", Event::Invalid(err.clone()))],
                "{err}"
            );
        }
    }

    #[test]
    fn limits_hold() {
        let mut s = pkt("batch\n");
        s.extend_from_slice(DELIM);
        for _ in 0..4 {
            s.extend(pkt(&format!("{OID} 1\n")));
        }
        s.extend_from_slice(FLUSH);
        assert_eq!(
            run(&s, 9),
            vec![format!(
                "{:?}",
                Event::Invalid(RequestError::TooMany {
                    what: "objects in one batch",
                    limit: 3
                })
            )]
        );
        let mut s = pkt("list-lock\n");
        for i in 0..=MAX_ARGS {
            s.extend(pkt(&format!("k{i}=v\n")));
        }
        s.extend_from_slice(FLUSH);
        assert!(run(&s, 100)[0].contains("TooMany"));
        let mut s = pkt("lock\n");
        s.extend(pkt(&format!("path={}\n", "p".repeat(MAX_ARG_LEN))));
        s.extend_from_slice(FLUSH);
        assert!(run(&s, 100)[0].contains("LineTooLong"));
        // Framing errors end the session instead.
        assert_eq!(
            run(b"zzzz", 4),
            vec!["framing: pkt-line length header `zzzz` is not 4 hex digits".to_owned()]
        );
    }

    #[test]
    fn encodings() {
        let mut out = Vec::new();
        encode_capabilities(&mut out);
        assert_eq!(out, b"000eversion=1\n000clocking\n0000");
        out.clear();
        encode_status(
            &mut out,
            200,
            &["hash-algo=sha256".into()],
            Some(&[format!("{OID} 4 upload")]),
        );
        let want = format!("000fstatus 200\n0015hash-algo=sha256\n0001004e{OID} 4 upload\n0000");
        assert_eq!(String::from_utf8(out.clone()).unwrap(), want);
        out.clear();
        encode_error(&mut out, 404, &[], "not found");
        assert_eq!(out, b"000fstatus 404\n0001000enot found\n0000");
        out.clear();
        encode_object_head(&mut out, 4);
        assert_eq!(out, b"000fstatus 200\n000bsize=4\n0001");
        assert_eq!(data_header(0).unwrap(), *b"0004");
        assert_eq!(data_header(pktline::MAX_PAYLOAD_LEN).unwrap(), *b"fff0");
        assert!(data_header(pktline::MAX_PAYLOAD_LEN + 1).is_err());
    }
}
