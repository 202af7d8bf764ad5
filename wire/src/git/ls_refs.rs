//! The protocol v2 `ls-refs` command as one stateless request body (gitprotocol-v2(5)): which
//! requests the server may answer itself, and the lines of the answer. Sans-I/O.
//!
//! [`parse_request`] accepts exactly the requests git's own `upload-pack --stateless-rpc` would
//! answer with a ref listing, and declines everything else with a reason. A declined request is
//! meant to go to git itself, which then answers, or fails, with git's own words: serving the
//! common shape here must never change what a client sees for an unusual one.

use thiserror::Error;

use super::pktline::{self, Packet, PktDecode, PktError};

/// From this many `ref-prefix` lines on, git ignores them all and lists every ref; such requests
/// are declined rather than imitated.
pub const TOO_MANY_PREFIXES: usize = 65536;

/// A well-formed `command=ls-refs` request.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LsRefsRequest<'a> {
    /// Show what annotated tags point to (`peeled:`).
    pub peel: bool,
    /// Show the targets of symbolic refs (`symref-target:`).
    pub symrefs: bool,
    /// Show HEAD even when the branch it names does not exist yet.
    pub unborn: bool,
    /// List only refs starting with one of these; none means every ref.
    pub prefixes: Vec<&'a [u8]>,
}

impl LsRefsRequest<'_> {
    /// Whether `refname` is asked for (git's `ref_match`).
    pub fn wants(&self, refname: &[u8]) -> bool {
        self.prefixes.is_empty() || self.prefixes.iter().any(|p| refname.starts_with(p))
    }
}

/// Why a request body is not answered here.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum Decline {
    #[error("not an ls-refs request")]
    NotLsRefs,
    #[error("malformed pkt-line: {0}")]
    Malformed(#[from] PktError),
    #[error("the request ends before its flush packet")]
    Truncated,
    #[error("capability line `{}` is not one this server answers itself", .0.escape_ascii())]
    Capability(Vec<u8>),
    #[error("argument line `{}` is not one of ls-refs' arguments", .0.escape_ascii())]
    Argument(Vec<u8>),
    #[error("a special packet where ls-refs expects an argument or the flush")]
    UnexpectedPacket,
    #[error("bytes after the request's flush packet")]
    Trailing,
    #[error("{TOO_MANY_PREFIXES} or more ref-prefix lines")]
    TooManyPrefixes,
}

/// Parses a whole request body: capability lines with `command=ls-refs`, then optionally a
/// delimiter and arguments, then the flush, and nothing after it.
pub fn parse_request(body: &[u8]) -> Result<LsRefsRequest<'_>, Decline> {
    let mut rest = body;
    let mut command = false;
    // Capability section, as git's serve.c reads it: every line is the command or a
    // capability the server advertised.
    let has_arguments = loop {
        match next_packet(&mut rest)? {
            Packet::Data(line) => {
                let line = chomp(line)?;
                if let Some(name) = line.strip_prefix(b"command=") {
                    if command || name != b"ls-refs" {
                        return Err(Decline::NotLsRefs);
                    }
                    command = true;
                } else if !is_answered_capability(line) {
                    return Err(Decline::Capability(line.to_vec()));
                }
            }
            Packet::Delim => break true,
            Packet::Flush => break false,
            Packet::ResponseEnd => return Err(Decline::UnexpectedPacket),
        }
    };
    if !command {
        return Err(Decline::NotLsRefs);
    }
    let mut request = LsRefsRequest::default();
    if has_arguments {
        loop {
            match next_packet(&mut rest)? {
                Packet::Data(line) => {
                    let line = chomp(line)?;
                    match line {
                        b"peel" => request.peel = true,
                        b"symrefs" => request.symrefs = true,
                        b"unborn" => request.unborn = true,
                        _ => match line.strip_prefix(b"ref-prefix ") {
                            Some(prefix) => {
                                if request.prefixes.len() + 1 >= TOO_MANY_PREFIXES {
                                    return Err(Decline::TooManyPrefixes);
                                }
                                request.prefixes.push(prefix);
                            }
                            None => return Err(Decline::Argument(line.to_vec())),
                        },
                    }
                }
                Packet::Flush => break,
                Packet::Delim | Packet::ResponseEnd => return Err(Decline::UnexpectedPacket),
            }
        }
    }
    if !rest.is_empty() {
        return Err(Decline::Trailing);
    }
    Ok(request)
}

/// Capabilities a client may send with `ls-refs` that change nothing in its answer: the agent,
/// the object format this server's repositories use, and server options (which only hooks read).
fn is_answered_capability(line: &[u8]) -> bool {
    line.starts_with(b"agent=")
        || line == b"object-format=sha1"
        || line.starts_with(b"server-option=")
}

fn next_packet<'a>(rest: &mut &'a [u8]) -> Result<Packet<'a>, Decline> {
    match pktline::decode(rest)? {
        PktDecode::Complete { packet, consumed } => {
            *rest = &rest[consumed..];
            Ok(packet)
        }
        PktDecode::Incomplete { .. } => Err(Decline::Truncated),
    }
}

/// Drops one trailing newline, as git's reader does. git handles lines as C strings, so a line
/// with a NUL in it would mean something else to git than to us: declined.
fn chomp(line: &[u8]) -> Result<&[u8], Decline> {
    if line.contains(&0) {
        return Err(Decline::Capability(line.to_vec()));
    }
    Ok(line.strip_suffix(b"\n").unwrap_or(line))
}

/// One line of the answer: `<oid> <name>` or `unborn <name>`, then ` symref-target:<target>`
/// and ` peeled:<oid>` when present, exactly as git's ls-refs.c writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefLine<'a> {
    /// Hex object id; None for an unborn HEAD.
    pub oid: Option<&'a [u8]>,
    pub name: &'a [u8],
    pub symref_target: Option<&'a [u8]>,
    pub peeled: Option<&'a [u8]>,
}

/// Appends `line` as one pkt-line.
pub fn encode_ref(out: &mut Vec<u8>, line: &RefLine<'_>) -> Result<(), PktError> {
    let mut text = Vec::with_capacity(
        64 + line.name.len() + line.symref_target.map_or(0, |t| 15 + t.len()) + 48,
    );
    match line.oid {
        Some(oid) => text.extend_from_slice(oid),
        None => text.extend_from_slice(b"unborn"),
    }
    text.push(b' ');
    text.extend_from_slice(line.name);
    if let Some(target) = line.symref_target {
        text.extend_from_slice(b" symref-target:");
        text.extend_from_slice(target);
    }
    if let Some(peeled) = line.peeled {
        text.extend_from_slice(b" peeled:");
        text.extend_from_slice(peeled);
    }
    text.push(b'\n');
    pktline::encode_data(out, &text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(lines: &[&str]) -> Vec<u8> {
        let mut out = Vec::new();
        for l in lines {
            match *l {
                "0000" => out.extend_from_slice(pktline::FLUSH),
                "0001" => out.extend_from_slice(pktline::DELIM),
                "0002" => out.extend_from_slice(pktline::RESPONSE_END),
                text => pktline::encode_str(&mut out, text).unwrap(),
            }
        }
        out
    }

    #[test]
    fn a_clone_s_request_is_answered() {
        let b = body(&[
            "command=ls-refs\n",
            "agent=git/2.47.3\n",
            "object-format=sha1\n",
            "0001",
            "peel\n",
            "symrefs\n",
            "unborn\n",
            "ref-prefix HEAD\n",
            "ref-prefix refs/heads/\n",
            "ref-prefix refs/tags/\n",
            "0000",
        ]);
        let r = parse_request(&b).unwrap();
        assert!(r.peel && r.symrefs && r.unborn);
        assert_eq!(
            r.prefixes,
            vec![&b"HEAD"[..], &b"refs/heads/"[..], &b"refs/tags/"[..]]
        );
        assert!(r.wants(b"refs/heads/main") && r.wants(b"HEAD"));
        assert!(!r.wants(b"refs/notes/x"));
    }

    #[test]
    fn no_arguments_and_no_prefixes_list_everything() {
        let no_arguments = body(&["command=ls-refs", "0000"]);
        let r = parse_request(&no_arguments).unwrap();
        assert_eq!(r, LsRefsRequest::default());
        assert!(r.wants(b"refs/anything"));
        let empty_arguments = body(&["command=ls-refs", "0001", "0000"]);
        let r = parse_request(&empty_arguments).unwrap();
        assert_eq!(r, LsRefsRequest::default());
    }

    #[test]
    fn other_commands_and_unusual_requests_go_to_git() {
        let cases: &[(&[&str], Decline)] = &[
            (
                &["command=fetch", "0001", "done", "0000"],
                Decline::NotLsRefs,
            ),
            (&["agent=x", "0000"], Decline::NotLsRefs),
            (
                &["command=ls-refs", "command=ls-refs", "0000"],
                Decline::NotLsRefs,
            ),
            (
                &["command=ls-refs", "object-format=sha256", "0000"],
                Decline::Capability(b"object-format=sha256".to_vec()),
            ),
            (
                &["command=ls-refs", "session-id=1", "0000"],
                Decline::Capability(b"session-id=1".to_vec()),
            ),
            (
                &["command=ls-refs", "0001", "frobnicate", "0000"],
                Decline::Argument(b"frobnicate".to_vec()),
            ),
            (
                &["command=ls-refs", "0001", "peel", "0001", "0000"],
                Decline::UnexpectedPacket,
            ),
            (&["command=ls-refs", "0002"], Decline::UnexpectedPacket),
            (&["command=ls-refs", "0001", "peel"], Decline::Truncated),
            (&["command=ls-refs", "0000", "0000"], Decline::Trailing),
        ];
        for (lines, why) in cases {
            assert_eq!(parse_request(&body(lines)), Err(why.clone()), "{lines:?}");
        }
        assert!(matches!(
            parse_request(b"zzzz"),
            Err(Decline::Malformed(PktError::BadHeader { .. }))
        ));
        assert_eq!(parse_request(b""), Err(Decline::Truncated));
        let mut nul = Vec::new();
        pktline::encode_data(&mut nul, b"command=ls-refs\0x").unwrap();
        nul.extend_from_slice(pktline::FLUSH);
        assert!(matches!(parse_request(&nul), Err(Decline::Capability(_))));
    }

    #[test]
    fn too_many_prefixes_are_declined() {
        let mut lines = vec!["command=ls-refs".to_owned(), "0001".to_owned()];
        for i in 0..TOO_MANY_PREFIXES {
            lines.push(format!("ref-prefix refs/heads/{i}"));
        }
        lines.push("0000".to_owned());
        let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
        let many = body(&refs);
        assert_eq!(parse_request(&many), Err(Decline::TooManyPrefixes));
    }

    #[test]
    fn lines_are_written_as_git_writes_them() {
        let oid = b"1111111111111111111111111111111111111111";
        let peeled = b"2222222222222222222222222222222222222222";
        let mut out = Vec::new();
        encode_ref(
            &mut out,
            &RefLine {
                oid: Some(oid),
                name: b"HEAD",
                symref_target: Some(b"refs/heads/main"),
                peeled: None,
            },
        )
        .unwrap();
        encode_ref(
            &mut out,
            &RefLine {
                oid: Some(oid),
                name: b"refs/tags/v1",
                symref_target: None,
                peeled: Some(peeled),
            },
        )
        .unwrap();
        encode_ref(
            &mut out,
            &RefLine {
                oid: None,
                name: b"HEAD",
                symref_target: Some(b"refs/heads/main"),
                peeled: None,
            },
        )
        .unwrap();
        assert_eq!(
            out,
            b"00501111111111111111111111111111111111111111 HEAD symref-target:refs/heads/main\n\
              006a1111111111111111111111111111111111111111 refs/tags/v1 peeled:2222222222222222222222222222222222222222\n\
              002eunborn HEAD symref-target:refs/heads/main\n"
        );
    }
}
