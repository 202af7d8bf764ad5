//! The client side of Git's wire protocol, sans-I/O: incremental parsers for what the server
//! sends ([`PktStream`] turns body or stream pieces into packets; [`AdvertParser`] reads a v2
//! capability advertisement or a v0 ref advertisement, whichever comes; [`LsRefsParser`];
//! [`FetchParser`] demultiplexes the side-band of a pack, v2 `packfile` section or v0 after
//! `NAK`; [`ReportParser`]) and the request bodies (`ls-refs`, `fetch`, v0 wants, a v0 push).
//! Framing is gitplane's own [`gitplane::git::pktline`] codec. The order of a conversation is in
//! [`crate::upload`].

use gitplane::git::pktline::{self, Packet, PktDecode, PktError, DELIM, FLUSH};
use thiserror::Error;

pub const ZERO_OID: &str = "0000000000000000000000000000000000000000";
const AGENT: &str = concat!("agent=gitplane-load/", env!("CARGO_PKG_VERSION"));

#[derive(Debug, Error)]
pub enum ProtoError {
    #[error("pkt-line framing: {0}")]
    Pkt(#[from] PktError),
    #[error("the server sent an error: {0}")]
    Remote(String),
    #[error("unexpected response: {0}")]
    Unexpected(String),
    #[error("response ended early: {0}")]
    Truncated(&'static str),
    #[error("push of {refname} rejected: {reason}")]
    Rejected { refname: String, reason: String },
}

impl ProtoError {
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Pkt(_) | Self::Unexpected(_) | Self::Truncated(_) => "git_protocol",
            Self::Remote(_) => "git_remote_error",
            Self::Rejected { .. } => "push_rejected",
        }
    }
}

/// A decoded packet that owns nothing: data packets are handed out as borrowed slices.
#[derive(Debug, PartialEq, Eq)]
pub enum Pkt<'a> {
    Flush,
    Delim,
    End,
    Data(&'a [u8]),
}

/// Reassembles pkt-lines from body pieces of any size. Bytes are copied once into an internal
/// buffer only when a packet straddles two pieces; whole packets are decoded in place.
#[derive(Default)]
pub struct PktStream {
    carry: Vec<u8>,
}

impl PktStream {
    /// Feeds `input`, calling `on_pkt` for every complete packet.
    ///
    /// # Errors
    /// On bad framing or the first error of `on_pkt`.
    pub fn feed<E: From<ProtoError>>(
        &mut self,
        mut input: &[u8],
        mut on_pkt: impl FnMut(Pkt<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        // Finish a packet started by an earlier piece.
        while !self.carry.is_empty() && !input.is_empty() {
            match pktline::decode(&self.carry).map_err(ProtoError::from)? {
                PktDecode::Complete { packet, consumed } => {
                    on_pkt(convert(packet))?;
                    self.carry.drain(..consumed);
                }
                PktDecode::Incomplete { needed } => {
                    let take = needed.min(input.len());
                    self.carry.extend_from_slice(&input[..take]);
                    input = &input[take..];
                }
            }
        }
        if !self.carry.is_empty() {
            // Still incomplete, or it completed exactly with the last byte.
            if let PktDecode::Complete { packet, consumed } =
                pktline::decode(&self.carry).map_err(ProtoError::from)?
            {
                on_pkt(convert(packet))?;
                self.carry.drain(..consumed);
            }
            if !self.carry.is_empty() {
                return Ok(());
            }
        }
        loop {
            match pktline::decode(input).map_err(ProtoError::from)? {
                PktDecode::Complete { packet, consumed } => {
                    on_pkt(convert(packet))?;
                    input = &input[consumed..];
                }
                PktDecode::Incomplete { .. } => {
                    self.carry.extend_from_slice(input);
                    return Ok(());
                }
            }
        }
    }

    /// No partial packet is pending.
    pub fn is_clean(&self) -> bool {
        self.carry.is_empty()
    }
}

fn convert(p: Packet<'_>) -> Pkt<'_> {
    match p {
        Packet::Flush => Pkt::Flush,
        Packet::Delim => Pkt::Delim,
        Packet::ResponseEnd => Pkt::End,
        Packet::Data(d) => Pkt::Data(d),
    }
}

fn text(d: &[u8]) -> &str {
    let d = d.strip_suffix(b"\n").unwrap_or(d);
    std::str::from_utf8(d).unwrap_or("<non-utf8>")
}

fn check_err(d: &[u8]) -> Result<(), ProtoError> {
    match d.strip_prefix(b"ERR ") {
        Some(msg) => Err(ProtoError::Remote(text(msg).to_owned())),
        None => Ok(()),
    }
}

/// The v2 capabilities a client needs to know about.
#[derive(Debug, Default, Clone)]
pub struct V2Caps {
    pub object_format: Option<String>,
    pub fetch: bool,
    pub ls_refs: bool,
}

impl V2Caps {
    fn on_line(&mut self, line: &str) {
        if let Some(f) = line.strip_prefix("object-format=") {
            self.object_format = Some(f.to_owned());
        } else if line == "ls-refs" || line.starts_with("ls-refs=") {
            self.ls_refs = true;
        } else if line == "fetch" || line.starts_with("fetch=") {
            self.fetch = true;
        }
    }
}

/// What the first response of a conversation advertised.
#[derive(Debug, Clone)]
pub enum Advert {
    /// Protocol v2: commands and capabilities; refs come from `ls-refs`.
    V2(V2Caps),
    /// Protocol v0 (or v1, which only adds a `version 1` line): the refs themselves, and the
    /// capabilities that followed the first one.
    V0 { refs: Vec<Ref>, caps: Vec<String> },
}

/// Reads the advertisement that opens every upload-pack and receive-pack conversation: over
/// smart HTTP after a `# service=` line and its flush (skipped), over a stream at once. The
/// first line tells the version: `version 2` and capability lines, or v0 ref lines (the first
/// carrying the capabilities after a NUL), up to a flush.
#[derive(Default)]
pub struct AdvertParser {
    /// A `# service=` line was read and its flush is still to come.
    in_preamble: bool,
    v2: Option<V2Caps>,
    v0_caps: Option<Vec<String>>,
    refs: Vec<Ref>,
    pub done: bool,
}

impl AdvertParser {
    /// # Errors
    /// On an `ERR` packet, a malformed ref line, or a special packet other than flush.
    pub fn on_pkt(&mut self, p: Pkt<'_>) -> Result<(), ProtoError> {
        let fresh = self.v2.is_none() && self.v0_caps.is_none();
        match p {
            Pkt::Data(d) => {
                check_err(d)?;
                let line = text(d);
                if fresh && line.starts_with("# service=") {
                    self.in_preamble = true;
                } else if let Some(caps) = &mut self.v2 {
                    caps.on_line(line);
                } else if fresh && line == "version 2" {
                    self.v2 = Some(V2Caps::default());
                } else if fresh && line == "version 1" {
                    // v1 is v0 with this line in front.
                } else {
                    self.on_ref_line(line)?;
                }
            }
            Pkt::Flush if self.in_preamble => self.in_preamble = false,
            Pkt::Flush => self.done = true,
            _ => {
                return Err(ProtoError::Unexpected(
                    "special packet in the advertisement".into(),
                ))
            }
        }
        Ok(())
    }

    fn on_ref_line(&mut self, line: &str) -> Result<(), ProtoError> {
        let (reference, caps) = match line.split_once('\0') {
            Some((r, c)) => (r, Some(c)),
            None => (line, None),
        };
        if self.v0_caps.is_none() {
            self.v0_caps = Some(
                caps.unwrap_or_default()
                    .split(' ')
                    .filter(|c| !c.is_empty())
                    .map(str::to_owned)
                    .collect(),
            );
        }
        let (oid, name) = reference
            .split_once(' ')
            .ok_or_else(|| ProtoError::Unexpected(format!("advertised ref `{line}`")))?;
        // An empty repository advertises `capabilities^{}` with the zero id.
        if oid != ZERO_OID {
            self.refs.push(Ref {
                oid: oid.into(),
                name: name.into(),
            });
        }
        Ok(())
    }

    /// The advertisement, once its closing flush was read.
    ///
    /// # Errors
    /// When the closing flush has not come, or nothing was advertised.
    pub fn finish(self) -> Result<Advert, ProtoError> {
        if !self.done {
            return Err(ProtoError::Truncated(
                "advertisement without its closing flush",
            ));
        }
        match (self.v2, self.v0_caps) {
            (Some(caps), _) => Ok(Advert::V2(caps)),
            (None, Some(caps)) => Ok(Advert::V0 {
                refs: self.refs,
                caps,
            }),
            (None, None) => Err(ProtoError::Unexpected("an empty advertisement".into())),
        }
    }
}

fn common_caps(out: &mut Vec<u8>, command: &str, caps: &V2Caps) -> Result<(), PktError> {
    pktline::encode_str(out, &format!("command={command}\n"))?;
    pktline::encode_str(out, &format!("{AGENT}\n"))?;
    if let Some(f) = &caps.object_format {
        pktline::encode_str(out, &format!("object-format={f}\n"))?;
    }
    out.extend_from_slice(DELIM);
    Ok(())
}

/// `ls-refs` for the branch heads and HEAD, as `git clone` asks.
///
/// # Errors
/// Never in practice (every line is short); typed for the codec's sake.
pub fn ls_refs_request(caps: &V2Caps) -> Result<Vec<u8>, PktError> {
    let mut out = Vec::with_capacity(256);
    common_caps(&mut out, "ls-refs", caps)?;
    for line in [
        "peel\n",
        "symrefs\n",
        "ref-prefix HEAD\n",
        "ref-prefix refs/heads/\n",
    ] {
        pktline::encode_str(&mut out, line)?;
    }
    out.extend_from_slice(FLUSH);
    Ok(out)
}

/// `fetch` of `wants` with `done` (no negotiation: a clone has nothing to offer).
///
/// # Errors
/// Never in practice; typed for the codec's sake.
pub fn fetch_request(caps: &V2Caps, wants: &[String]) -> Result<Vec<u8>, PktError> {
    let mut out = Vec::with_capacity(64 + wants.len() * 50);
    common_caps(&mut out, "fetch", caps)?;
    pktline::encode_str(&mut out, "ofs-delta\n")?;
    pktline::encode_str(&mut out, "no-progress\n")?;
    for w in wants {
        pktline::encode_str(&mut out, &format!("want {w}\n"))?;
    }
    pktline::encode_str(&mut out, "done\n")?;
    out.extend_from_slice(FLUSH);
    Ok(out)
}

/// One advertised ref.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ref {
    pub oid: String,
    pub name: String,
}

/// The `ls-refs` response: `OID NAME [attributes]` lines, then a flush.
#[derive(Default)]
pub struct LsRefsParser {
    pub refs: Vec<Ref>,
    pub done: bool,
}

impl LsRefsParser {
    /// # Errors
    /// On an `ERR` packet or a line that is not `OID NAME`.
    pub fn on_pkt(&mut self, p: Pkt<'_>) -> Result<(), ProtoError> {
        match p {
            Pkt::Data(d) => {
                check_err(d)?;
                let line = text(d);
                let mut parts = line.split(' ');
                match (parts.next(), parts.next()) {
                    (Some(oid), Some(name)) if oid.len() >= 40 => self.refs.push(Ref {
                        oid: oid.to_owned(),
                        name: name.to_owned(),
                    }),
                    _ => return Err(ProtoError::Unexpected(format!("ls-refs line `{line}`"))),
                }
            }
            Pkt::Flush => self.done = true,
            _ => return Err(ProtoError::Unexpected("special packet in ls-refs".into())),
        }
        Ok(())
    }
}

/// The distinct object ids of the branch heads among `refs` (what `git clone` wants).
pub fn branch_wants(refs: &[Ref]) -> Vec<String> {
    let mut w: Vec<String> = refs
        .iter()
        .filter(|r| r.name.starts_with("refs/heads/"))
        .map(|r| r.oid.clone())
        .collect();
    w.sort();
    w.dedup();
    w
}

/// A v0 upload request: `want` lines (the first carrying our capabilities), a flush, `done`.
/// The pack must come side-band multiplexed, so `side-band-64k` is required of the server.
///
/// # Errors
/// When the server does not offer `side-band-64k`.
pub fn v0_want_request(wants: &[String], server_caps: &[String]) -> Result<Vec<u8>, ProtoError> {
    let offered = |c: &str| server_caps.iter().any(|s| s == c);
    if !offered("side-band-64k") {
        return Err(ProtoError::Unexpected(
            "the server does not offer side-band-64k".into(),
        ));
    }
    let mut caps = vec!["side-band-64k".to_owned()];
    for c in ["ofs-delta", "no-progress"] {
        if offered(c) {
            caps.push(c.into());
        }
    }
    caps.push(AGENT.into());
    if let Some(f) = server_caps
        .iter()
        .find(|c| c.starts_with("object-format=") && *c != "object-format=sha1")
    {
        caps.push(f.clone());
    }
    let mut out = Vec::with_capacity(64 + wants.len() * 50);
    for (i, w) in wants.iter().enumerate() {
        let line = if i == 0 {
            format!("want {w} {}\n", caps.join(" "))
        } else {
            format!("want {w}\n")
        };
        pktline::encode_str(&mut out, &line)?;
    }
    out.extend_from_slice(FLUSH);
    pktline::encode_str(&mut out, "done\n")?;
    Ok(out)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Section {
    /// v0: `NAK` / `ACK` lines before the side-band pack.
    Acks,
    /// Before the first section header, or right after a delimiter.
    Header,
    /// A section other than `packfile` (its lines are skipped).
    Other,
    Packfile,
}

/// The response to a fetch. v2: sections separated by delimiters, the pack in the `packfile`
/// section; v0: `NAK` (or `ACK` lines), then the pack. Either way the pack comes as side-band
/// packets (band 1 pack data, 2 progress, 3 fatal error) and ends with a flush. Pack bytes are
/// counted, and copied to `capture` when the caller asks for them (`--verify`).
pub struct FetchParser {
    section: Section,
    pub pack_bytes: u64,
    pub capture: Option<Vec<u8>>,
    pub done: bool,
}

impl FetchParser {
    /// For a v2 `fetch` response.
    pub fn new(capture: bool) -> Self {
        Self {
            section: Section::Header,
            pack_bytes: 0,
            capture: capture.then(Vec::new),
            done: false,
        }
    }

    /// For the response to a v0 upload request.
    pub fn v0(capture: bool) -> Self {
        Self {
            section: Section::Acks,
            ..Self::new(capture)
        }
    }

    /// # Errors
    /// On a side-band error, an `ERR` packet, or an unknown band.
    pub fn on_pkt(&mut self, p: Pkt<'_>) -> Result<(), ProtoError> {
        match (self.section, p) {
            (_, Pkt::Flush) => self.done = true,
            (_, Pkt::Delim) => self.section = Section::Header,
            (_, Pkt::End) => {
                return Err(ProtoError::Unexpected(
                    "response-end packet in fetch".into(),
                ))
            }
            (Section::Acks, Pkt::Data(d)) => {
                check_err(d)?;
                let line = text(d);
                if line != "NAK" && !line.starts_with("ACK ") {
                    // The first side-band packet: the pack has begun.
                    self.section = Section::Packfile;
                    return self.on_pkt(Pkt::Data(d));
                }
            }
            (Section::Header, Pkt::Data(d)) => {
                check_err(d)?;
                self.section = if text(d) == "packfile" {
                    Section::Packfile
                } else {
                    Section::Other
                };
            }
            (Section::Other, Pkt::Data(d)) => check_err(d)?,
            (Section::Packfile, Pkt::Data(d)) => match d.split_first() {
                Some((1, data)) => {
                    self.pack_bytes += data.len() as u64;
                    if let Some(c) = &mut self.capture {
                        c.extend_from_slice(data);
                    }
                }
                Some((2, _)) => {}
                Some((3, msg)) => return Err(ProtoError::Remote(text(msg).to_owned())),
                _ => return Err(ProtoError::Unexpected("unknown side-band".into())),
            },
        }
        Ok(())
    }
}

/// A push of one ref update with `pack` appended, asking for `report-status`.
///
/// # Errors
/// Never in practice; typed for the codec's sake.
pub fn push_request(old: &str, new: &str, refname: &str, pack: &[u8]) -> Result<Vec<u8>, PktError> {
    let mut out = Vec::with_capacity(pack.len() + 200);
    pktline::encode_data(
        &mut out,
        format!("{old} {new} {refname}\0report-status {AGENT}\n").as_bytes(),
    )?;
    out.extend_from_slice(FLUSH);
    out.extend_from_slice(pack);
    Ok(out)
}

/// The `report-status` response: `unpack ok`, then `ok REF` or `ng REF REASON`, then a flush.
#[derive(Default)]
pub struct ReportParser {
    pub unpack_ok: bool,
    pub refs_ok: usize,
    pub done: bool,
}

impl ReportParser {
    /// # Errors
    /// On a failed unpack, a rejected ref, or an `ERR` packet.
    pub fn on_pkt(&mut self, p: Pkt<'_>) -> Result<(), ProtoError> {
        match p {
            Pkt::Data(d) => {
                check_err(d)?;
                let line = text(d);
                if let Some(status) = line.strip_prefix("unpack ") {
                    if status != "ok" {
                        return Err(ProtoError::Remote(format!("unpack failed: {status}")));
                    }
                    self.unpack_ok = true;
                } else if line.starts_with("ok ") {
                    self.refs_ok += 1;
                } else if let Some(rest) = line.strip_prefix("ng ") {
                    let (refname, reason) = rest.split_once(' ').unwrap_or((rest, ""));
                    return Err(ProtoError::Rejected {
                        refname: refname.into(),
                        reason: reason.into(),
                    });
                }
            }
            Pkt::Flush => self.done = true,
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Pkt-lines from payloads, with `<flush>` and `<delim>` for the special packets.
    pub(crate) fn pkts(lines: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for l in lines {
            match *l {
                b"<flush>" => out.extend_from_slice(FLUSH),
                b"<delim>" => out.extend_from_slice(DELIM),
                d => pktline::encode_data(&mut out, d).unwrap(),
            }
        }
        out
    }

    /// Feeds `stream` in pieces of `step` bytes.
    fn feed_all(stream: &[u8], step: usize, mut f: impl FnMut(Pkt<'_>) -> Result<(), ProtoError>) {
        let mut s = PktStream::default();
        for piece in stream.chunks(step) {
            s.feed(piece, &mut f).unwrap();
        }
        assert!(s.is_clean());
    }

    #[test]
    fn fetch_response_demuxes_sideband_at_any_split() {
        let mut band1 = vec![1u8];
        band1.extend_from_slice(b"PACKdata");
        let stream = pkts(&[
            b"packfile\n",
            b"\x02progress",
            &band1,
            b"\x01more",
            b"<flush>",
        ]);
        for step in 1..=stream.len() {
            let mut p = FetchParser::new(true);
            feed_all(&stream, step, |pkt| p.on_pkt(pkt));
            assert!(p.done);
            assert_eq!(p.pack_bytes, 12, "step {step}");
            assert_eq!(p.capture.as_deref(), Some(&b"PACKdatamore"[..]));
        }
    }

    #[test]
    fn fetch_sideband_error_is_reported() {
        let stream = pkts(&[b"packfile\n", b"\x03fatal: nope\n", b"<flush>"]);
        let mut p = FetchParser::new(false);
        let mut s = PktStream::default();
        let err = s.feed(&stream, |pkt| p.on_pkt(pkt)).unwrap_err();
        assert!(matches!(err, ProtoError::Remote(m) if m == "fatal: nope"));
    }

    /// The advertisement parsed from `stream` fed in pieces of every size.
    fn advert_at_every_split(stream: &[u8]) -> Advert {
        let mut last = None;
        for step in 1..=stream.len() {
            let mut a = AdvertParser::default();
            feed_all(stream, step, |p| a.on_pkt(p));
            last = Some(a.finish().unwrap());
        }
        last.unwrap()
    }

    #[test]
    fn v2_caps_over_http_and_ls_refs() {
        let advert = pkts(&[
            b"# service=git-upload-pack\n",
            b"<flush>",
            b"version 2\n",
            b"ls-refs=unborn\n",
            b"fetch=shallow\n",
            b"object-format=sha1\n",
            b"<flush>",
        ]);
        let Advert::V2(caps) = advert_at_every_split(&advert) else {
            panic!("not v2")
        };
        assert!(caps.fetch && caps.ls_refs);
        assert_eq!(caps.object_format.as_deref(), Some("sha1"));
        let req = ls_refs_request(&caps).unwrap();
        assert!(req.starts_with(b"0014command=ls-refs\n"));
        assert!(req.ends_with(b"0000"));

        let a = "a".repeat(40);
        let b = "b".repeat(40);
        let l1 = format!("{a} HEAD symref-target:refs/heads/main\n");
        let l2 = format!("{a} refs/heads/main\n");
        let l3 = format!("{b} refs/heads/dev\n");
        let resp = pkts(&[l1.as_bytes(), l2.as_bytes(), l3.as_bytes(), b"<flush>"]);
        let mut l = LsRefsParser::default();
        feed_all(&resp, 7, |p| l.on_pkt(p));
        assert!(l.done);
        assert_eq!(branch_wants(&l.refs), vec![a, b]);
    }

    #[test]
    fn v0_upload_pack_advert_on_a_stream_and_its_want_request() {
        let a = "a".repeat(40);
        let head = format!("{a} HEAD\0multi_ack side-band-64k ofs-delta no-progress agent=git/2\n");
        let main = format!("{a} refs/heads/main\n");
        let tag = format!("{} refs/tags/v1\n", "c".repeat(40));
        let advert = pkts(&[head.as_bytes(), main.as_bytes(), tag.as_bytes(), b"<flush>"]);
        let Advert::V0 { refs, caps } = advert_at_every_split(&advert) else {
            panic!("not v0")
        };
        assert_eq!(refs.len(), 3);
        assert_eq!(branch_wants(&refs), vec![a.clone()]);
        assert!(caps.iter().any(|c| c == "side-band-64k"));
        let req = v0_want_request(&branch_wants(&refs), &caps).unwrap();
        let text = String::from_utf8(req).unwrap();
        let first = format!("want {a} side-band-64k ofs-delta no-progress {AGENT}\n");
        assert_eq!(&text[..4], format!("{:04x}", first.len() + 4), "{text}");
        assert!(text[4..].starts_with(&first), "{text}");
        assert!(text.ends_with("00000009done\n"), "{text}");
        // Without side-band the pack would come unframed: refused.
        assert!(v0_want_request(&[a], &["ofs-delta".into()]).is_err());

        // A v1 answer is v0 with a version line in front.
        let v1 = pkts(&[b"version 1\n", head.as_bytes(), b"<flush>"]);
        assert!(matches!(advert_at_every_split(&v1), Advert::V0 { refs, .. } if refs.len() == 1));
    }

    #[test]
    fn advert_errors() {
        let mut a = AdvertParser::default();
        let mut s = PktStream::default();
        let err = s
            .feed(&pkts(&[b"ERR access denied\n"]), |p| a.on_pkt(p))
            .unwrap_err();
        assert!(matches!(err, ProtoError::Remote(m) if m == "access denied"));
        let mut a = AdvertParser::default();
        feed_all(&pkts(&[b"version 2\n"]), 2, |p| a.on_pkt(p));
        assert!(matches!(a.finish(), Err(ProtoError::Truncated(_))));
        let mut a = AdvertParser::default();
        feed_all(&pkts(&[b"<flush>"]), 1, |p| a.on_pkt(p));
        assert!(matches!(a.finish(), Err(ProtoError::Unexpected(_))));
    }

    #[test]
    fn v0_fetch_response_skips_nak_then_demuxes() {
        let stream = pkts(&[b"NAK\n", b"\x02Counting\n", b"\x01PACKxyz", b"<flush>"]);
        for step in 1..=stream.len() {
            let mut p = FetchParser::v0(true);
            feed_all(&stream, step, |pkt| p.on_pkt(pkt));
            assert!(p.done);
            assert_eq!(p.capture.as_deref(), Some(&b"PACKxyz"[..]), "step {step}");
        }
    }

    #[test]
    fn receive_advert_and_report() {
        let oid = "c".repeat(40);
        let first = format!("{ZERO_OID} capabilities^{{}}\0report-status\n");
        let empty = pkts(&[
            b"# service=git-receive-pack\n",
            b"<flush>",
            first.as_bytes(),
            b"<flush>",
        ]);
        let Advert::V0 { refs, caps } = advert_at_every_split(&empty) else {
            panic!("not v0")
        };
        assert!(refs.is_empty());
        assert_eq!(caps, vec!["report-status".to_owned()]);
        let line = format!("{oid} refs/heads/x\0report-status\n");
        let full = pkts(&[
            b"# service=git-receive-pack\n",
            b"<flush>",
            line.as_bytes(),
            b"<flush>",
        ]);
        let Advert::V0 { refs, .. } = advert_at_every_split(&full) else {
            panic!("not v0")
        };
        assert_eq!(
            refs,
            vec![Ref {
                oid,
                name: "refs/heads/x".into()
            }]
        );

        let mut r = ReportParser::default();
        feed_all(
            &pkts(&[b"unpack ok\n", b"ok refs/heads/x\n", b"<flush>"]),
            2,
            |p| r.on_pkt(p),
        );
        assert!(r.done && r.unpack_ok && r.refs_ok == 1);
        let mut r = ReportParser::default();
        let mut s = PktStream::default();
        let err = s
            .feed(
                &pkts(&[b"unpack ok\n", b"ng refs/heads/x stale info\n"]),
                |p| r.on_pkt(p),
            )
            .unwrap_err();
        assert!(matches!(err, ProtoError::Rejected { .. }));
    }
}
