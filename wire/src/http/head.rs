//! HTTP/1.x request-head parser on top of `httparse`, sans-I/O: the caller re-parses its growing
//! buffer until the head is complete, and gets back only the fields the server uses, with the
//! body framing already decided. Framing is strict on purpose (RFC 9112 §6): an ambiguous head
//! is refused rather than guessed at, because a guess that differs from a proxy's guess is how
//! request smuggling works.

use thiserror::Error;

use crate::hex::hex_value;

/// Malformed-input excerpts keep at most this many bytes of the input.
const EXCERPT_MAX: usize = 64;
/// Header slots kept on the stack; more (only with a raised limit) come from the heap.
const STACK_SLOTS: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadLimits {
    /// Longest head, request line and final empty line included.
    pub max_head_bytes: usize,
    pub max_headers: usize,
}

impl Default for HeadLimits {
    fn default() -> Self {
        Self {
            max_head_bytes: 16 * 1024,
            max_headers: 64,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Post,
    Put,
    Delete,
    Options,
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyFraming {
    None,
    Length(u64),
    Chunked,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    pub method: Method,
    /// Percent-decoded path, starting with `/`; never contains an encoded `/`, NUL or other
    /// control character.
    pub path: String,
    /// Raw query after `?`, not decoded.
    pub query: Option<String>,
    pub http10: bool,
    pub framing: BodyFraming,
    pub gzip: bool,
    /// Only ever set for HTTP/1.1: HTTP/1.0 clients do not understand `100 Continue`.
    pub expect_continue: bool,
    pub keep_alive: bool,
    pub authorization: Option<String>,
    pub git_protocol: Option<String>,
    pub content_type: Option<String>,
    pub range: Option<String>,
    pub host: Option<String>,
    pub user_agent: Option<String>,
    /// Every `X-Forwarded-For` header, joined with `", "` in order.
    pub x_forwarded_for: Option<String>,
    /// A WebSocket opening handshake (RFC 6455 §4.2.1): `Upgrade: websocket` with `upgrade`
    /// among the `Connection` options.
    pub websocket_upgrade: bool,
    pub websocket_key: Option<String>,
    pub websocket_version: Option<String>,
}

// Returned once per request and destructured at once: boxing the head would only add an
// allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadParse {
    /// `consumed` bytes of the buffer were the head; the body, if any, follows.
    Complete {
        head: RequestHead,
        consumed: usize,
    },
    Incomplete,
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum HeadError {
    #[error("request head is larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("request head has more than {limit} header fields")]
    TooManyHeaders { limit: usize },
    #[error("malformed request head, {reason}: `{excerpt}`")]
    Malformed {
        reason: &'static str,
        excerpt: String,
    },
    #[error("bad request target, {reason}: `{excerpt}`")]
    BadTarget {
        reason: &'static str,
        excerpt: String,
    },
    #[error("invalid {name} header: `{excerpt}`")]
    InvalidHeader { name: &'static str, excerpt: String },
    #[error("more than one {name} header")]
    DuplicateHeader { name: &'static str },
    #[error("conflicting Content-Length values {first} and {second}")]
    ConflictingContentLength { first: u64, second: u64 },
    #[error("both Content-Length and Transfer-Encoding are present")]
    LengthAndTransferEncoding,
    #[error("Transfer-Encoding in an HTTP/1.0 request")]
    TransferEncodingInHttp10,
    #[error("unsupported Transfer-Encoding `{excerpt}`")]
    UnsupportedTransferEncoding { excerpt: String },
    #[error("unsupported Content-Encoding `{excerpt}`")]
    UnsupportedContentEncoding { excerpt: String },
    #[error("unsupported expectation `{excerpt}`")]
    UnsupportedExpectation { excerpt: String },
}

impl HeadError {
    /// The response status for this error.
    pub fn status(&self) -> u16 {
        match self {
            Self::TooLarge { .. } | Self::TooManyHeaders { .. } => 431,
            Self::UnsupportedTransferEncoding { .. } => 501,
            Self::UnsupportedContentEncoding { .. } => 415,
            Self::UnsupportedExpectation { .. } => 417,
            Self::Malformed { .. }
            | Self::BadTarget { .. }
            | Self::InvalidHeader { .. }
            | Self::DuplicateHeader { .. }
            | Self::ConflictingContentLength { .. }
            | Self::LengthAndTransferEncoding
            | Self::TransferEncodingInHttp10 => 400,
        }
    }
}

/// Parses the request head at the start of `buf`. Returns [`HeadParse::Incomplete`] while the
/// head may still complete within `limits.max_head_bytes`.
pub fn parse_request_head(buf: &[u8], limits: &HeadLimits) -> Result<HeadParse, HeadError> {
    // Never look past the limit, so a peer cannot make each re-parse longer than that.
    let window = buf.get(..limits.max_head_bytes).unwrap_or(buf);
    // A header line takes at least 3 bytes ("a:\n"), so more slots than this could never fill;
    // the cap keeps an absurd configured limit from becoming an absurd allocation.
    let slot_count = limits.max_headers.min(limits.max_head_bytes / 3 + 1);
    let mut stack = [httparse::EMPTY_HEADER; STACK_SLOTS];
    let mut heap = Vec::new();
    let slots = match stack.get_mut(..slot_count) {
        Some(slots) => slots,
        None => {
            heap.resize(slot_count, httparse::EMPTY_HEADER);
            heap.as_mut_slice()
        }
    };
    let mut req = httparse::Request::new(slots);
    match req.parse(window) {
        Ok(httparse::Status::Complete(consumed)) => Ok(HeadParse::Complete {
            head: build(&req)?,
            consumed,
        }),
        Ok(httparse::Status::Partial) if buf.len() >= limits.max_head_bytes => {
            Err(HeadError::TooLarge {
                limit: limits.max_head_bytes,
            })
        }
        Ok(httparse::Status::Partial) => Ok(HeadParse::Incomplete),
        Err(httparse::Error::TooManyHeaders) => Err(HeadError::TooManyHeaders {
            limit: limits.max_headers,
        }),
        Err(e) => Err(HeadError::Malformed {
            reason: describe(e),
            excerpt: excerpt(error_context(window, slot_count)),
        }),
    }
}

fn describe(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::HeaderName => "invalid header name",
        httparse::Error::HeaderValue => "invalid header value",
        httparse::Error::NewLine => "invalid line ending",
        httparse::Error::Status => "invalid status",
        httparse::Error::Token => "invalid method or target",
        httparse::Error::TooManyHeaders => "too many headers",
        httparse::Error::Version => "invalid or unsupported HTTP version",
    }
}

/// The line that `httparse` refused, up to and including the offending byte. `httparse` does not
/// say where it stopped, but it reads front to back, so the shortest failing prefix ends there;
/// this bisects for it (errors only, so the extra parses cost nothing on the good path).
fn error_context(window: &[u8], slot_count: usize) -> &[u8] {
    let mut slots = vec![httparse::EMPTY_HEADER; slot_count];
    let mut fails = |len: usize| {
        let prefix = window.get(..len).unwrap_or(window);
        httparse::Request::new(&mut slots).parse(prefix).is_err()
    };
    let (mut ok, mut bad) = (0, window.len());
    while bad.saturating_sub(ok) > 1 {
        let mid = ok + (bad - ok) / 2;
        if fails(mid) {
            bad = mid;
        } else {
            ok = mid;
        }
    }
    let end = bad;
    let line_start = window
        .get(..end.saturating_sub(1))
        .and_then(|before| before.iter().rposition(|&b| b == b'\n'))
        .map_or(0, |nl| nl + 1);
    window
        .get(line_start.max(end.saturating_sub(EXCERPT_MAX))..end)
        .unwrap_or_default()
}

fn excerpt(bytes: &[u8]) -> String {
    bytes
        .get(..EXCERPT_MAX)
        .unwrap_or(bytes)
        .escape_ascii()
        .to_string()
}

/// The headers the server acts on; all others are ignored.
#[derive(Clone, Copy)]
enum Field {
    ContentLength,
    TransferEncoding,
    ContentEncoding,
    Expect,
    Connection,
    Authorization,
    GitProtocol,
    ContentType,
    Range,
    Host,
    UserAgent,
    XForwardedFor,
    Upgrade,
    WebSocketKey,
    WebSocketVersion,
}

/// The field a header name names (with its canonical spelling), if the server acts on it. Dispatched on the name's length
/// first, so an ignored header costs one jump and at most two compares instead of a walk of the
/// whole table (the walk grew with every field: +16% instructions per head at 15 fields).
fn field_named(name: &str) -> Option<(&'static str, Field)> {
    let candidates: &[(&'static str, Field)] = match name.len() {
        4 => &[("Host", Field::Host)],
        5 => &[("Range", Field::Range)],
        6 => &[("Expect", Field::Expect)],
        7 => &[("Upgrade", Field::Upgrade)],
        10 => &[
            ("Connection", Field::Connection),
            ("User-Agent", Field::UserAgent),
        ],
        12 => &[
            ("Git-Protocol", Field::GitProtocol),
            ("Content-Type", Field::ContentType),
        ],
        13 => &[("Authorization", Field::Authorization)],
        14 => &[("Content-Length", Field::ContentLength)],
        15 => &[("X-Forwarded-For", Field::XForwardedFor)],
        16 => &[("Content-Encoding", Field::ContentEncoding)],
        17 => &[
            ("Transfer-Encoding", Field::TransferEncoding),
            ("Sec-WebSocket-Key", Field::WebSocketKey),
        ],
        21 => &[("Sec-WebSocket-Version", Field::WebSocketVersion)],
        _ => &[],
    };
    candidates
        .iter()
        .find(|(known, _)| same_name_ignoring_case(known, name))
        .copied()
}

/// Case-insensitive equality of a known header name (letters and '-') with a received one.
/// httparse admits only RFC 9110 token bytes in names, and among those `| 0x20` folds exactly
/// the ASCII letters (a '-' stays a '-'; only CR, never a token byte, would fold onto it), so
/// one OR per byte replaces `eq_ignore_ascii_case`'s two lowercasings.
fn same_name_ignoring_case(known: &str, name: &str) -> bool {
    known.len() == name.len()
        && known
            .bytes()
            .zip(name.bytes())
            .all(|(k, n)| k | 0x20 == n | 0x20)
}

fn build(req: &httparse::Request<'_, '_>) -> Result<RequestHead, HeadError> {
    let method = match req.method.unwrap_or_default() {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        "POST" => Method::Post,
        "PUT" => Method::Put,
        "DELETE" => Method::Delete,
        "OPTIONS" => Method::Options,
        _ => Method::Other,
    };
    let http10 = match req.version {
        Some(0) => true,
        Some(1) => false,
        _ => {
            return Err(HeadError::Malformed {
                reason: describe(httparse::Error::Version),
                excerpt: String::new(),
            })
        }
    };
    let (path, query) = parse_target(req.path.unwrap_or_default())?;
    let mut head = RequestHead {
        method,
        path,
        query,
        http10,
        framing: BodyFraming::None,
        gzip: false,
        expect_continue: false,
        keep_alive: false,
        authorization: None,
        git_protocol: None,
        content_type: None,
        range: None,
        host: None,
        user_agent: None,
        x_forwarded_for: None,
        websocket_upgrade: false,
        websocket_key: None,
        websocket_version: None,
    };
    let mut content_length: Option<u64> = None;
    let (mut upgrade_option, mut upgrade_websocket) = (false, false);
    let (mut chunked, mut content_encoding_seen) = (false, false);
    let (mut close, mut keep_alive) = (false, false);

    for header in req.headers.iter() {
        let Some((name, field)) = field_named(header.name) else {
            continue;
        };
        let value = header.value.trim_ascii();
        match field {
            Field::ContentLength => {
                let n = parse_content_length(value)?;
                match content_length {
                    Some(first) if first != n => {
                        return Err(HeadError::ConflictingContentLength { first, second: n })
                    }
                    _ => content_length = Some(n),
                }
            }
            Field::TransferEncoding => {
                if chunked {
                    return Err(HeadError::DuplicateHeader { name });
                }
                // Only a lone "chunked" is supported: a list would need the other codings, and
                // "chunked" not last leaves the body length undefined.
                if !value.eq_ignore_ascii_case(b"chunked") {
                    return Err(HeadError::UnsupportedTransferEncoding {
                        excerpt: excerpt(value),
                    });
                }
                chunked = true;
            }
            Field::ContentEncoding => {
                if content_encoding_seen {
                    return Err(HeadError::DuplicateHeader { name });
                }
                content_encoding_seen = true;
                head.gzip = if value.eq_ignore_ascii_case(b"gzip")
                    || value.eq_ignore_ascii_case(b"x-gzip")
                {
                    true
                } else if value.eq_ignore_ascii_case(b"identity") {
                    false
                } else {
                    return Err(HeadError::UnsupportedContentEncoding {
                        excerpt: excerpt(value),
                    });
                };
            }
            Field::Expect => {
                if !value.eq_ignore_ascii_case(b"100-continue") {
                    return Err(HeadError::UnsupportedExpectation {
                        excerpt: excerpt(value),
                    });
                }
                head.expect_continue = true;
            }
            Field::Connection => {
                for option in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                    close |= option.eq_ignore_ascii_case(b"close");
                    keep_alive |= option.eq_ignore_ascii_case(b"keep-alive");
                    upgrade_option |= option.eq_ignore_ascii_case(b"upgrade");
                }
            }
            Field::XForwardedFor => {
                let value = utf8(name, value)?;
                match &mut head.x_forwarded_for {
                    Some(list) => {
                        list.push_str(", ");
                        list.push_str(value);
                    }
                    None => head.x_forwarded_for = Some(value.to_owned()),
                }
            }
            Field::Authorization => set_once(&mut head.authorization, name, value)?,
            Field::GitProtocol => set_once(&mut head.git_protocol, name, value)?,
            Field::ContentType => set_once(&mut head.content_type, name, value)?,
            Field::Range => set_once(&mut head.range, name, value)?,
            Field::Host => set_once(&mut head.host, name, value)?,
            Field::UserAgent => set_once(&mut head.user_agent, name, value)?,
            Field::Upgrade => {
                upgrade_websocket |= value
                    .split(|&b| b == b',')
                    .any(|p| p.trim_ascii().eq_ignore_ascii_case(b"websocket"));
            }
            Field::WebSocketKey => set_once(&mut head.websocket_key, name, value)?,
            Field::WebSocketVersion => set_once(&mut head.websocket_version, name, value)?,
        }
    }
    head.websocket_upgrade = upgrade_option && upgrade_websocket && !http10;

    if chunked && http10 {
        // RFC 9112 §6.1: the framing of such a message cannot be trusted.
        return Err(HeadError::TransferEncodingInHttp10);
    }
    head.framing = match (chunked, content_length) {
        (true, Some(_)) => return Err(HeadError::LengthAndTransferEncoding),
        (true, None) => BodyFraming::Chunked,
        (false, Some(n)) => BodyFraming::Length(n),
        (false, None) => BodyFraming::None,
    };
    // RFC 9110 §10.1.1: a 100-continue expectation from an HTTP/1.0 client is ignored.
    head.expect_continue &= !http10;
    head.keep_alive = !close && (!http10 || keep_alive);
    Ok(head)
}

fn set_once(slot: &mut Option<String>, name: &'static str, value: &[u8]) -> Result<(), HeadError> {
    if slot.is_some() {
        return Err(HeadError::DuplicateHeader { name });
    }
    *slot = Some(utf8(name, value)?.to_owned());
    Ok(())
}

fn utf8<'v>(name: &'static str, value: &'v [u8]) -> Result<&'v str, HeadError> {
    std::str::from_utf8(value).map_err(|_| HeadError::InvalidHeader {
        name,
        excerpt: excerpt(value),
    })
}

/// Digits only: no sign, no list, no hex, nothing that another parser might read differently.
fn parse_content_length(value: &[u8]) -> Result<u64, HeadError> {
    let invalid = || HeadError::InvalidHeader {
        name: "Content-Length",
        excerpt: excerpt(value),
    };
    if value.is_empty() {
        return Err(invalid());
    }
    value.iter().try_fold(0u64, |n, &b| {
        if !b.is_ascii_digit() {
            return Err(invalid());
        }
        n.checked_mul(10)
            .and_then(|n| n.checked_add(u64::from(b - b'0')))
            .ok_or_else(invalid)
    })
}

/// Splits an origin-form target into its decoded path and raw query.
fn parse_target(target: &str) -> Result<(String, Option<String>), HeadError> {
    let bad = |reason| HeadError::BadTarget {
        reason,
        excerpt: excerpt(target.as_bytes()),
    };
    let (raw_path, query) = match target.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (target, None),
    };
    if !raw_path.starts_with('/') {
        return Err(bad("not origin-form (must start with '/')"));
    }
    if target.contains('#') {
        return Err(bad("contains a fragment"));
    }
    let raw = raw_path.as_bytes();
    let mut path = Vec::with_capacity(raw.len());
    let mut i = 0;
    while let Some(&b) = raw.get(i) {
        if b != b'%' {
            path.push(b);
            i += 1;
            continue;
        }
        let hex = |at: usize| raw.get(at).copied().and_then(hex_value);
        let (Some(hi), Some(lo)) = (hex(i + 1), hex(i + 2)) else {
            return Err(bad("bad percent-encoding"));
        };
        let decoded = (hi << 4) | lo;
        // An encoded '/' would let one path segment pose as two to whoever decodes it again.
        if decoded == b'/' {
            return Err(bad("encoded '/'"));
        }
        if decoded.is_ascii_control() {
            return Err(bad("encoded control character"));
        }
        path.push(decoded);
        i += 3;
    }
    let path = String::from_utf8(path).map_err(|_| bad("path is not UTF-8"))?;
    Ok((path, query.map(str::to_owned)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: HeadLimits = HeadLimits {
        max_head_bytes: 16 * 1024,
        max_headers: 64,
    };

    /// What git 2.43 sends for the pack request of a clone.
    const GIT_POST: &[u8] = b"POST /alice/project.git/git-upload-pack HTTP/1.1\r\n\
        Host: git.example.com\r\n\
        User-Agent: git/2.43.0\r\n\
        Accept-Encoding: deflate, gzip, br, zstd\r\n\
        Content-Type: application/x-git-upload-pack-request\r\n\
        Accept: application/x-git-upload-pack-result\r\n\
        Git-Protocol: version=2\r\n\
        Content-Encoding: gzip\r\n\
        Content-Length: 1234\r\n\
        Authorization: Basic YWxpY2U6c2VjcmV0\r\n\
        \r\n";

    fn parse(buf: &[u8]) -> Result<HeadParse, HeadError> {
        parse_request_head(buf, &LIMITS)
    }

    /// Parses a whole head, also checking that every shorter prefix is incomplete and that
    /// body bytes after it are left alone.
    fn head_of(raw: &[u8]) -> RequestHead {
        for cut in 0..raw.len() {
            assert_eq!(
                parse(&raw[..cut]),
                Ok(HeadParse::Incomplete),
                "prefix {cut}: {}",
                raw[..cut].escape_ascii()
            );
        }
        let mut with_body = raw.to_vec();
        with_body.extend_from_slice(b"0032want \r\n\r\n");
        let Ok(HeadParse::Complete { head, consumed }) = parse(&with_body) else {
            panic!("{:?}", parse(&with_body));
        };
        assert_eq!(consumed, raw.len());
        assert_eq!(
            parse(raw),
            Ok(HeadParse::Complete {
                head: head.clone(),
                consumed
            })
        );
        head
    }

    /// The error for a complete head, checking that its prefixes are incomplete or the same
    /// error (the parser never errs on a prefix of a good head, nor changes its mind).
    fn error_of(raw: &[u8]) -> HeadError {
        let err = parse(raw).unwrap_err();
        for cut in 0..raw.len() {
            match parse(&raw[..cut]) {
                Ok(HeadParse::Incomplete) => {}
                Err(e) if e.status() == err.status() => {}
                other => panic!("prefix {cut}: {other:?}, whole: {err:?}"),
            }
        }
        err
    }

    fn request(version: &str, headers: &str) -> Vec<u8> {
        let mut raw = format!("GET /r HTTP/{version}\r\n");
        for line in headers.split_terminator("\r\n") {
            raw.push_str(line);
            raw.push_str("\r\n");
        }
        raw.push_str("\r\n");
        raw.into_bytes()
    }

    fn get(headers: &str) -> Vec<u8> {
        request("1.1", headers)
    }

    fn get10(headers: &str) -> Vec<u8> {
        request("1.0", headers)
    }

    #[test]
    fn real_git_post_byte_by_byte() {
        let head = head_of(GIT_POST);
        assert_eq!(
            head,
            RequestHead {
                method: Method::Post,
                path: "/alice/project.git/git-upload-pack".into(),
                query: None,
                http10: false,
                framing: BodyFraming::Length(1234),
                gzip: true,
                expect_continue: false,
                keep_alive: true,
                authorization: Some("Basic YWxpY2U6c2VjcmV0".into()),
                git_protocol: Some("version=2".into()),
                content_type: Some("application/x-git-upload-pack-request".into()),
                range: None,
                host: Some("git.example.com".into()),
                user_agent: Some("git/2.43.0".into()),
                x_forwarded_for: None,
                websocket_upgrade: false,
                websocket_key: None,
                websocket_version: None,
            }
        );
    }

    #[test]
    fn every_acted_on_field_is_found_in_any_case() {
        for name in [
            "Content-Length",
            "Transfer-Encoding",
            "Content-Encoding",
            "Expect",
            "Connection",
            "Authorization",
            "Git-Protocol",
            "Content-Type",
            "Range",
            "Host",
            "User-Agent",
            "X-Forwarded-For",
            "Upgrade",
            "Sec-WebSocket-Key",
            "Sec-WebSocket-Version",
        ] {
            let found = field_named(&name.to_ascii_uppercase()).map(|(canonical, _)| canonical);
            assert_eq!(found, Some(name));
        }
        assert!(field_named("X-Request-Id").is_none());
        assert!(field_named("Hostx").is_none());
    }

    #[test]
    fn websocket_opening_handshake() {
        let head = head_of(
            b"GET /ssh HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n\
              Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
              Sec-WebSocket-Version: 13\r\n\r\n",
        );
        assert!(head.websocket_upgrade);
        assert_eq!(
            head.websocket_key.as_deref(),
            Some("dGhlIHNhbXBsZSBub25jZQ==")
        );
        assert_eq!(head.websocket_version.as_deref(), Some("13"));
        // Without `Connection: upgrade` it is a plain request.
        let head = head_of(b"GET /ssh HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n\r\n");
        assert!(!head.websocket_upgrade);
    }

    #[test]
    fn real_git_advertisement_request() {
        let raw = b"GET /alice/project.git/info/refs?service=git-upload-pack HTTP/1.1\r\n\
            Host: localhost:8080\r\nUser-Agent: git/2.43.0\r\nAccept: */*\r\n\
            Accept-Encoding: deflate, gzip\r\nPragma: no-cache\r\nGit-Protocol: version=2\r\n\r\n";
        let head = head_of(raw);
        assert_eq!(head.method, Method::Get);
        assert_eq!(head.path, "/alice/project.git/info/refs");
        assert_eq!(head.query.as_deref(), Some("service=git-upload-pack"));
        assert_eq!(head.framing, BodyFraming::None);
        assert!(head.keep_alive && !head.gzip && !head.expect_continue);
        assert_eq!(head.authorization, None);
    }

    #[test]
    fn chunked_push_with_expect_and_bare_lf() {
        let raw = b"POST /a/b/git-receive-pack HTTP/1.1\n\
            host: h\ntransfer-encoding:  Chunked \nEXPECT: 100-Continue\n\n";
        let head = head_of(raw);
        assert_eq!(head.framing, BodyFraming::Chunked);
        assert!(head.expect_continue);
        assert_eq!(head.host.as_deref(), Some("h"));
    }

    #[test]
    fn methods() {
        for (m, want) in [
            ("GET", Method::Get),
            ("HEAD", Method::Head),
            ("POST", Method::Post),
            ("PUT", Method::Put),
            ("DELETE", Method::Delete),
            ("OPTIONS", Method::Options),
            ("PATCH", Method::Other),
            ("get", Method::Other),
        ] {
            let raw = format!("{m} / HTTP/1.1\r\n\r\n");
            assert_eq!(head_of(raw.as_bytes()).method, want, "{m}");
        }
    }

    #[test]
    fn path_decoding() {
        for (target, path, query) in [
            ("/", "/", None),
            ("/a%41%62/%7e", "/aAb/~", None),
            ("/caf%C3%A9", "/café", None),
            ("/café", "/café", None),
            ("/a?", "/a", Some("")),
            ("/a?x=%2F&y=%00?z", "/a", Some("x=%2F&y=%00?z")),
            ("/a%3F?b", "/a?", Some("b")),
            ("/a%20b", "/a b", None),
            ("//double", "//double", None),
        ] {
            let head = head_of(format!("GET {target} HTTP/1.1\r\n\r\n").as_bytes());
            assert_eq!(head.path, path, "{target}");
            assert_eq!(head.query.as_deref(), query, "{target}");
        }
    }

    #[test]
    fn bad_targets() {
        for (target, reason) in [
            ("/a%2Fb", "encoded '/'"),
            ("/a%2fb", "encoded '/'"),
            ("/a%00", "encoded control character"),
            ("/a%0a", "encoded control character"),
            ("/a%7F", "encoded control character"),
            ("/a%", "bad percent-encoding"),
            ("/a%4", "bad percent-encoding"),
            ("/a%zz", "bad percent-encoding"),
            ("/a%%41", "bad percent-encoding"),
            ("/a%ff", "path is not UTF-8"),
            ("/a%C3", "path is not UTF-8"),
            ("/a#frag", "contains a fragment"),
            ("/a?b#frag", "contains a fragment"),
            (
                "http://example.com/a",
                "not origin-form (must start with '/')",
            ),
            ("example.com:443", "not origin-form (must start with '/')"),
            ("*", "not origin-form (must start with '/')"),
            ("a/b", "not origin-form (must start with '/')"),
            ("?q", "not origin-form (must start with '/')"),
        ] {
            let raw = format!("GET {target} HTTP/1.1\r\n\r\n");
            assert_eq!(
                error_of(raw.as_bytes()),
                HeadError::BadTarget {
                    reason,
                    excerpt: target.into()
                },
                "{target}"
            );
        }
    }

    #[test]
    fn framing() {
        assert_eq!(
            head_of(&get("Content-Length: 0")).framing,
            BodyFraming::Length(0)
        );
        assert_eq!(
            head_of(&get("content-length: 18446744073709551615")).framing,
            BodyFraming::Length(u64::MAX)
        );
        assert_eq!(
            head_of(&get("Content-Length: 5\r\nContent-Length:5 ")).framing,
            BodyFraming::Length(5)
        );
        assert_eq!(
            head_of(&get("Transfer-Encoding: chunked")).framing,
            BodyFraming::Chunked
        );
    }

    #[test]
    fn smuggling_is_refused() {
        for (headers, err) in [
            (
                "Content-Length: 5\r\nTransfer-Encoding: chunked",
                HeadError::LengthAndTransferEncoding,
            ),
            (
                "Transfer-Encoding: chunked\r\nContent-Length: 5",
                HeadError::LengthAndTransferEncoding,
            ),
            (
                "Content-Length: 5\r\nContent-Length: 6",
                HeadError::ConflictingContentLength {
                    first: 5,
                    second: 6,
                },
            ),
            (
                "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked",
                HeadError::DuplicateHeader {
                    name: "Transfer-Encoding",
                },
            ),
        ] {
            let err_got = error_of(&get(headers));
            assert_eq!(err_got, err, "{headers}");
            assert_eq!(err_got.status(), 400);
        }
        for value in [
            "gzip, chunked",
            "chunked, gzip",
            "identity",
            "chunked;q=1",
            "xchunked",
            "",
        ] {
            let err = error_of(&get(&format!("Transfer-Encoding: {value}")));
            assert_eq!(
                err,
                HeadError::UnsupportedTransferEncoding {
                    excerpt: value.into()
                }
            );
            assert_eq!(err.status(), 501);
        }
        assert_eq!(
            error_of(&get10("Transfer-Encoding: chunked")),
            HeadError::TransferEncodingInHttp10
        );
        for value in [
            "",
            "+5",
            "-1",
            "0x5",
            "5 5",
            "5,5",
            "5, 5",
            "1e3",
            "18446744073709551616",
            "99999999999999999999999",
            "５",
        ] {
            let err = error_of(&get(&format!("Content-Length: {value}")));
            assert_eq!(
                err,
                HeadError::InvalidHeader {
                    name: "Content-Length",
                    excerpt: value.as_bytes().escape_ascii().to_string()
                },
                "{value}"
            );
            assert_eq!(err.status(), 400);
        }
    }

    #[test]
    fn whitespace_around_header_names_is_malformed() {
        for headers in [
            "Content-Length : 5",
            "Transfer-Encoding\t: chunked",
            " Transfer-Encoding: chunked",
            "X: a\r\n folded",
        ] {
            let err = error_of(&get(headers));
            assert!(
                matches!(err, HeadError::Malformed { .. }),
                "{headers}: {err:?}"
            );
            assert_eq!(err.status(), 400);
        }
    }

    #[test]
    fn content_encoding() {
        for (value, gzip) in [
            ("gzip", true),
            ("GZip", true),
            ("x-gzip", true),
            ("identity", false),
        ] {
            let head = head_of(&get(&format!("Content-Encoding: {value}")));
            assert_eq!(head.gzip, gzip, "{value}");
        }
        for value in ["br", "deflate", "gzip, gzip", "zstd", ""] {
            let err = error_of(&get(&format!("Content-Encoding: {value}")));
            assert_eq!(
                err,
                HeadError::UnsupportedContentEncoding {
                    excerpt: value.into()
                }
            );
            assert_eq!(err.status(), 415);
        }
        assert_eq!(
            error_of(&get("Content-Encoding: gzip\r\nContent-Encoding: gzip")),
            HeadError::DuplicateHeader {
                name: "Content-Encoding"
            }
        );
    }

    #[test]
    fn expectations() {
        assert!(head_of(&get("Expect: 100-continue")).expect_continue);
        assert!(!head_of(&get("")).expect_continue);
        assert!(!head_of(&get10("Expect: 100-continue")).expect_continue);
        for value in ["200-ok", "100-continue, foo", ""] {
            let err = error_of(&get(&format!("Expect: {value}")));
            assert_eq!(
                err,
                HeadError::UnsupportedExpectation {
                    excerpt: value.into()
                }
            );
            assert_eq!(err.status(), 417);
        }
    }

    #[test]
    fn keep_alive() {
        for (raw, want) in [
            (get(""), true),
            (get("Connection: keep-alive"), true),
            (get("Connection: close"), false),
            (get("Connection: Upgrade, CLOSE"), false),
            (get("Connection: keep-alive\r\nConnection: close"), false),
            (get("Connection: closed"), true),
            (get10(""), false),
            (get10("Connection: Keep-Alive"), true),
            (get10("Connection: keep-alive, close"), false),
        ] {
            assert_eq!(head_of(&raw).keep_alive, want, "{}", raw.escape_ascii());
        }
        assert!(head_of(&get10("")).http10);
    }

    #[test]
    fn captured_fields() {
        let head = head_of(&get(
            "RANGE: bytes=0-99\r\nx-forwarded-for: 10.0.0.1\r\nX-Forwarded-For: 10.0.0.2, \
             10.0.0.3\r\nUSER-AGENT: curl/8.5.0",
        ));
        assert_eq!(head.range.as_deref(), Some("bytes=0-99"));
        assert_eq!(
            head.x_forwarded_for.as_deref(),
            Some("10.0.0.1, 10.0.0.2, 10.0.0.3")
        );
        assert_eq!(head.user_agent.as_deref(), Some("curl/8.5.0"));
        assert_eq!(
            head_of(&get("Authorization:")).authorization.as_deref(),
            Some("")
        );
    }

    #[test]
    fn duplicate_single_valued_headers() {
        for name in [
            "Authorization",
            "Host",
            "Git-Protocol",
            "Content-Type",
            "Range",
            "User-Agent",
        ] {
            let lower = name.to_ascii_lowercase();
            let err = error_of(&get(&format!("{name}: a\r\n{lower}: a")));
            assert_eq!(err, HeadError::DuplicateHeader { name });
            assert_eq!(err.status(), 400);
        }
    }

    #[test]
    fn non_utf8_captured_values() {
        let mut raw = b"GET / HTTP/1.1\r\nUser-Agent: git/\xc3\x28\r\n\r\n".to_vec();
        assert_eq!(
            error_of(&raw),
            HeadError::InvalidHeader {
                name: "User-Agent",
                excerpt: "git/\\xc3(".into()
            }
        );
        raw = b"GET / HTTP/1.1\r\nAuthorization: Basic \xff\r\n\r\n".to_vec();
        assert_eq!(error_of(&raw).status(), 400);
        raw = b"GET / HTTP/1.1\r\nX-Forwarded-For: \x80\r\n\r\n".to_vec();
        assert_eq!(error_of(&raw).status(), 400);
        // Headers the server does not use may hold anything httparse allows.
        raw = b"GET / HTTP/1.1\r\nX-Other: \xff\r\n\r\n".to_vec();
        assert_eq!(head_of(&raw).path, "/");
        // Valid UTF-8 beyond ASCII is kept.
        raw = "GET / HTTP/1.1\r\nUser-Agent: gît\r\n\r\n"
            .as_bytes()
            .to_vec();
        assert_eq!(head_of(&raw).user_agent.as_deref(), Some("gît"));
    }

    #[test]
    fn malformed_heads_carry_an_excerpt() {
        for (raw, reason, excerpt) in [
            (
                &b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n"[..],
                "invalid header name",
                "Bad ",
            ),
            (
                b"GET / HTTP/1.1\r\nX: a\x00b\r\n\r\n",
                "invalid header value",
                "X: a\\x00",
            ),
            (
                b"GET / HTTP/1.1\r\nX: a\rb\r\n\r\n",
                "invalid header value",
                "X: a\\rb",
            ),
            (
                b"GET / HTTP/2.0\r\n\r\n",
                "invalid or unsupported HTTP version",
                "GET / HTTP/2",
            ),
            (
                b"GET / HTTP/1.1\rX",
                "invalid line ending",
                "GET / HTTP/1.1\\rX",
            ),
            (
                b"GET  / HTTP/1.1\r\n\r\n",
                "invalid method or target",
                "GET  ",
            ),
            (
                b"G\x01T / HTTP/1.1\r\n\r\n",
                "invalid method or target",
                "G\\x01",
            ),
            (
                b"GET /\x7f HTTP/1.1\r\n\r\n",
                "invalid method or target",
                "GET /\\x7f",
            ),
            (
                b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
                "invalid or unsupported HTTP version",
                "PRI * HTTP/2",
            ),
            (
                b"\x16\x03\x01\x02\x00\x01",
                "invalid method or target",
                "\\x16",
            ),
        ] {
            assert_eq!(
                error_of(raw),
                HeadError::Malformed {
                    reason,
                    excerpt: excerpt.into()
                },
                "{}",
                raw.escape_ascii()
            );
        }
    }

    #[test]
    fn excerpts_are_truncated() {
        let name = "N".repeat(200);
        let raw = format!("GET / HTTP/1.1\r\n{name} x: y\r\n\r\n");
        let HeadError::Malformed { excerpt, .. } = error_of(raw.as_bytes()) else {
            panic!()
        };
        // The 64 bytes ending at the offending space.
        assert_eq!(excerpt, format!("{} ", &name[..63]));

        let value = "é".repeat(100);
        let err = error_of(format!("GET / HTTP/1.1\r\nExpect: {value}\r\n\r\n").as_bytes());
        let HeadError::UnsupportedExpectation { excerpt } = err else {
            panic!()
        };
        assert_eq!(excerpt, "\\xc3\\xa9".repeat(32));
    }

    #[test]
    fn size_limit_is_exact() {
        let limits = HeadLimits {
            max_head_bytes: GIT_POST.len(),
            max_headers: 64,
        };
        for cut in 0..GIT_POST.len() {
            assert_eq!(
                parse_request_head(&GIT_POST[..cut], &limits),
                Ok(HeadParse::Incomplete)
            );
        }
        let mut buf = GIT_POST.to_vec();
        buf.extend_from_slice(b"body");
        assert!(matches!(
            parse_request_head(&buf, &limits),
            Ok(HeadParse::Complete { consumed, .. }) if consumed == GIT_POST.len()
        ));

        let limits = HeadLimits {
            max_head_bytes: GIT_POST.len() - 1,
            max_headers: 64,
        };
        for cut in 0..GIT_POST.len() - 1 {
            assert_eq!(
                parse_request_head(&GIT_POST[..cut], &limits),
                Ok(HeadParse::Incomplete)
            );
        }
        for len in [GIT_POST.len() - 1, GIT_POST.len(), buf.len()] {
            let err = parse_request_head(&buf[..len], &limits).unwrap_err();
            assert_eq!(
                err,
                HeadError::TooLarge {
                    limit: GIT_POST.len() - 1
                }
            );
            assert_eq!(err.status(), 431);
        }
    }

    #[test]
    fn endless_head_is_too_large() {
        let mut buf = b"GET / HTTP/1.1\r\n".to_vec();
        while buf.len() < 100 * 1024 {
            buf.extend_from_slice(b"X-Filler: 0123456789abcdef\r\n");
        }
        assert_eq!(parse(&buf), Err(HeadError::TooManyHeaders { limit: 64 }));
        let roomy = HeadLimits {
            max_head_bytes: 16 * 1024,
            max_headers: usize::MAX,
        };
        assert_eq!(
            parse_request_head(&buf, &roomy),
            Err(HeadError::TooLarge { limit: 16 * 1024 })
        );
        // A single endless line too.
        let line = [b"GET /".as_slice(), &[b'a'; 20_000]].concat();
        assert_eq!(parse(&line), Err(HeadError::TooLarge { limit: 16 * 1024 }));
        assert_eq!(parse(&line[..16 * 1024 - 1]), Ok(HeadParse::Incomplete));
    }

    #[test]
    fn header_count_limit_is_exact() {
        let limits = HeadLimits {
            max_head_bytes: 16 * 1024,
            max_headers: 3,
        };
        let three = get("A: 1\r\nB: 2\r\nC: 3");
        assert!(matches!(
            parse_request_head(&three, &limits),
            Ok(HeadParse::Complete { .. })
        ));
        let four = get("A: 1\r\nB: 2\r\nC: 3\r\nD: 4");
        let err = parse_request_head(&four, &limits).unwrap_err();
        assert_eq!(err, HeadError::TooManyHeaders { limit: 3 });
        assert_eq!(err.status(), 431);
        // Reported as soon as the extra header is seen, before the head ends.
        assert_eq!(
            parse_request_head(&four[..four.len() - 2], &limits),
            Err(HeadError::TooManyHeaders { limit: 3 })
        );
        let none = HeadLimits {
            max_head_bytes: 16 * 1024,
            max_headers: 0,
        };
        assert!(matches!(
            parse_request_head(b"GET / HTTP/1.1\r\n\r\n", &none),
            Ok(HeadParse::Complete { .. })
        ));
        let zero = HeadLimits {
            max_head_bytes: 0,
            max_headers: 64,
        };
        assert_eq!(
            parse_request_head(b"", &zero),
            Err(HeadError::TooLarge { limit: 0 })
        );
    }

    #[test]
    fn leading_empty_lines_are_skipped() {
        let raw = b"\r\n\r\nGET / HTTP/1.1\r\n\r\n";
        let Ok(HeadParse::Complete { consumed, head }) = parse(raw) else {
            panic!()
        };
        assert_eq!(consumed, raw.len());
        assert_eq!(head.path, "/");
    }
}
