//! The upload-pack conversation of a clone or of an up-to-date fetch, sans-I/O: which request
//! follows each response, whatever carries them. Smart HTTP ([`crate::scenario::git`]) sends
//! each request as a POST and reads the answer as its body; a byte stream (git://, an SSH exec
//! channel: [`crate::stream`]) writes it and reads on. Both feed the server's packets to
//! [`UploadSession::on_pkt`] and take the next step from [`UploadSession::next_step`] once a
//! response is complete.
//!
//! - Protocol v2: advertisement, `ls-refs`, then for a clone `fetch` of every branch head with
//!   `done` (no negotiation: a clone has nothing to offer); a stream ends with a flush, which
//!   makes upload-pack exit.
//! - Protocol v0, when the server ignored our request for v2 (OpenSSH without
//!   `AcceptEnv GIT_PROTOCOL`, an old `git daemon`): the ref advertisement, then for a clone
//!   `want` lines with `done`, the server's `NAK` and the pack, after which it hangs up; an
//!   up-to-date fetch (or an empty repository) says it wants nothing with a flush.

use std::mem;

use gitplane::git::pktline::FLUSH;

use crate::proto::{
    self, Advert, AdvertParser, FetchParser, LsRefsParser, Pkt, ProtoError, V2Caps,
};

/// What the conversation is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Goal {
    /// Fetch every branch head; keep the pack when `capture` (for `--verify`).
    Clone { capture: bool },
    /// Learn the refs only (what an up-to-date `git fetch` costs).
    Refs,
}

/// The step after a complete response.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Send this request and read its response.
    Request(Vec<u8>),
    /// The conversation is over. On a stream, send these bytes (if any) and expect the server
    /// to end the stream; over HTTP they are always empty.
    Finish(Vec<u8>),
}

enum State {
    Advert(AdvertParser),
    LsRefs(V2Caps, LsRefsParser),
    Fetch(FetchParser),
    Over,
}

/// One upload-pack conversation.
pub struct UploadSession {
    goal: Goal,
    /// Over a stream (git://, SSH) rather than stateless HTTP requests.
    stream: bool,
    state: State,
    next: Option<Next>,
    /// The protocol version the server answered with (2 or 0), once known.
    pub version: Option<u8>,
    /// Pack bytes received.
    pub pack_bytes: u64,
    /// The pack itself, when the goal asked to capture it.
    pub pack: Option<Vec<u8>>,
}

impl UploadSession {
    pub fn new(goal: Goal, stream: bool) -> Self {
        Self {
            goal,
            stream,
            state: State::Advert(AdvertParser::default()),
            next: None,
            version: None,
            pack_bytes: 0,
            pack: None,
        }
    }

    /// Feeds one packet of the current response.
    ///
    /// # Errors
    /// On anything the protocol does not allow here: an `ERR` or side-band error from the
    /// server, a malformed line, a v2 server without `ls-refs` and `fetch`, a fetch answer
    /// without a pack, or packets after a response ended.
    pub fn on_pkt(&mut self, p: Pkt<'_>) -> Result<(), ProtoError> {
        if self.next.is_some() {
            return Err(ProtoError::Unexpected(
                "a packet after the end of a response".into(),
            ));
        }
        match &mut self.state {
            State::Advert(a) => {
                a.on_pkt(p)?;
                if a.done {
                    self.after_advert()?;
                }
            }
            State::LsRefs(_, l) => {
                l.on_pkt(p)?;
                if l.done {
                    self.after_ls_refs()?;
                }
            }
            State::Fetch(f) => {
                f.on_pkt(p)?;
                if f.done {
                    self.after_fetch()?;
                }
            }
            State::Over => {
                return Err(ProtoError::Unexpected(
                    "a packet after the end of the conversation".into(),
                ))
            }
        }
        Ok(())
    }

    /// What to do now: `None` while the current response is still incomplete.
    pub fn next_step(&mut self) -> Option<Next> {
        self.next.take()
    }

    fn after_advert(&mut self) -> Result<(), ProtoError> {
        let State::Advert(parser) = mem::replace(&mut self.state, State::Over) else {
            return Err(ProtoError::Unexpected("advertisement out of order".into()));
        };
        match parser.finish()? {
            Advert::V2(caps) => {
                self.version = Some(2);
                if !caps.ls_refs || !caps.fetch {
                    return Err(ProtoError::Unexpected(
                        "the server speaks protocol v2 without ls-refs and fetch".into(),
                    ));
                }
                self.next = Some(Next::Request(proto::ls_refs_request(&caps)?));
                self.state = State::LsRefs(caps, LsRefsParser::default());
            }
            Advert::V0 { refs, caps } => {
                self.version = Some(0);
                let wants = proto::branch_wants(&refs);
                match self.goal {
                    Goal::Clone { capture } if !wants.is_empty() => {
                        self.next = Some(Next::Request(proto::v0_want_request(&wants, &caps)?));
                        self.state = State::Fetch(FetchParser::v0(capture));
                    }
                    // Refs only, or an empty repository: tell upload-pack we want nothing.
                    _ => self.finish(true),
                }
            }
        }
        Ok(())
    }

    fn after_ls_refs(&mut self) -> Result<(), ProtoError> {
        let State::LsRefs(caps, refs) = mem::replace(&mut self.state, State::Over) else {
            return Err(ProtoError::Unexpected("ls-refs out of order".into()));
        };
        let wants = proto::branch_wants(&refs.refs);
        match self.goal {
            Goal::Clone { capture } if !wants.is_empty() => {
                self.next = Some(Next::Request(proto::fetch_request(&caps, &wants)?));
                self.state = State::Fetch(FetchParser::new(capture));
            }
            _ => self.finish(true),
        }
        Ok(())
    }

    fn after_fetch(&mut self) -> Result<(), ProtoError> {
        let State::Fetch(fetch) = mem::replace(&mut self.state, State::Over) else {
            return Err(ProtoError::Unexpected("fetch out of order".into()));
        };
        if fetch.pack_bytes == 0 {
            return Err(ProtoError::Truncated("fetch response without a packfile"));
        }
        self.pack_bytes = fetch.pack_bytes;
        self.pack = fetch.capture;
        // v2 upload-pack waits for the next command (a flush ends it); v0 hangs up by itself.
        self.finish(self.version == Some(2));
        Ok(())
    }

    fn finish(&mut self, flush: bool) {
        let bytes = if self.stream && flush {
            FLUSH.to_vec()
        } else {
            Vec::new()
        };
        self.state = State::Over;
        self.next = Some(Next::Finish(bytes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::tests::pkts;
    use crate::proto::PktStream;

    /// Plays a scripted server: each response is fed in pieces of `step` bytes, and every
    /// step the session takes is collected.
    fn play(
        goal: Goal,
        stream: bool,
        responses: &[Vec<u8>],
        step: usize,
    ) -> (Vec<Next>, UploadSession) {
        let mut s = UploadSession::new(goal, stream);
        let mut steps = Vec::new();
        for r in responses {
            let mut ps = PktStream::default();
            for piece in r.chunks(step) {
                ps.feed(piece, |p| s.on_pkt(p)).unwrap();
            }
            assert!(ps.is_clean());
            steps.push(s.next_step().expect("a step after each complete response"));
        }
        (steps, s)
    }

    fn v2_advert() -> Vec<u8> {
        pkts(&[
            b"version 2\n",
            b"ls-refs=unborn\n",
            b"fetch=shallow\n",
            b"<flush>",
        ])
    }

    fn ls_refs_answer() -> Vec<u8> {
        let a = format!("{} refs/heads/main\n", "a".repeat(40));
        pkts(&[a.as_bytes(), b"<flush>"])
    }

    #[test]
    fn v2_clone_over_a_stream_ends_with_a_flush() {
        let fetch = pkts(&[b"packfile\n", b"\x01PACK", b"<flush>"]);
        let responses = [v2_advert(), ls_refs_answer(), fetch];
        for step in [1, 3, 1000] {
            let (steps, s) = play(Goal::Clone { capture: true }, true, &responses, step);
            assert!(
                matches!(&steps[0], Next::Request(b) if b.starts_with(b"0014command=ls-refs\n"))
            );
            assert!(matches!(&steps[1], Next::Request(b) if b.starts_with(b"0012command=fetch\n")));
            assert_eq!(steps[2], Next::Finish(FLUSH.to_vec()));
            assert_eq!((s.version, s.pack_bytes), (Some(2), 4));
            assert_eq!(s.pack.as_deref(), Some(&b"PACK"[..]));
        }
    }

    #[test]
    fn refs_only_over_http_sends_nothing_more() {
        let mut http_advert = pkts(&[b"# service=git-upload-pack\n", b"<flush>"]);
        http_advert.extend(v2_advert());
        let (steps, _) = play(Goal::Refs, false, &[http_advert, ls_refs_answer()], 5);
        assert_eq!(steps[1], Next::Finish(Vec::new()));
        // The same on a stream closes with a flush.
        let (steps, _) = play(Goal::Refs, true, &[v2_advert(), ls_refs_answer()], 5);
        assert_eq!(steps[1], Next::Finish(FLUSH.to_vec()));
    }

    #[test]
    fn v0_clone_and_v0_empty_repository() {
        let a = "a".repeat(40);
        let head = format!("{a} HEAD\0side-band-64k ofs-delta\n");
        let main = format!("{a} refs/heads/main\n");
        let advert = pkts(&[head.as_bytes(), main.as_bytes(), b"<flush>"]);
        let pack = pkts(&[b"NAK\n", b"\x01PACKv0", b"<flush>"]);
        let (steps, s) = play(Goal::Clone { capture: false }, true, &[advert, pack], 2);
        assert!(matches!(&steps[0], Next::Request(b) if b.windows(4).any(|w| w == b"done")));
        // v0 upload-pack hangs up after the pack: nothing to send.
        assert_eq!(steps[1], Next::Finish(Vec::new()));
        assert_eq!((s.version, s.pack_bytes, s.pack), (Some(0), 6, None));

        let empty = format!("{} capabilities^{{}}\0side-band-64k\n", proto::ZERO_OID);
        let (steps, _) = play(
            Goal::Clone { capture: false },
            true,
            &[pkts(&[empty.as_bytes(), b"<flush>"])],
            3,
        );
        assert_eq!(steps[0], Next::Finish(FLUSH.to_vec()));
    }

    #[test]
    fn refusals() {
        // v2 without fetch.
        let mut s = UploadSession::new(Goal::Refs, true);
        let mut ps = PktStream::default();
        let err = ps
            .feed(&pkts(&[b"version 2\n", b"ls-refs\n", b"<flush>"]), |p| {
                s.on_pkt(p)
            })
            .unwrap_err();
        assert!(matches!(err, ProtoError::Unexpected(_)));
        // A fetch answer without pack data.
        let fetch = pkts(&[b"packfile\n", b"<flush>"]);
        let mut s = UploadSession::new(Goal::Clone { capture: false }, false);
        for r in [v2_advert(), ls_refs_answer()] {
            PktStream::default().feed(&r, |p| s.on_pkt(p)).unwrap();
            assert!(s.next_step().is_some());
        }
        let err = PktStream::default()
            .feed(&fetch, |p| s.on_pkt(p))
            .unwrap_err();
        assert!(matches!(err, ProtoError::Truncated(_)));
        // A packet after a complete response, before the next request went out.
        let mut s = UploadSession::new(Goal::Refs, true);
        let mut twice = v2_advert();
        twice.extend(v2_advert());
        let err = PktStream::default()
            .feed(&twice, |p| s.on_pkt(p))
            .unwrap_err();
        assert!(matches!(err, ProtoError::Unexpected(_)));
    }
}
