//! The client side of Git's wire protocol, sans-I/O: request bodies for protocol v2 `ls-refs`
//! and `fetch` and for a v0 `receive-pack` push, and incremental parsers for the responses
//! ([`PktStream`] turns body pieces into packets; [`FetchParser`] demultiplexes the side-band of
//! a `packfile` section). Framing is gitplane's own [`gitplane::git::pktline`] codec.

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

/// The v2 capability advertisement of `GET info/refs` with `Git-Protocol: version=2`.
#[derive(Debug, Default, Clone)]
pub struct V2Caps {
    pub version2: bool,
    pub object_format: Option<String>,
    pub fetch: bool,
    pub ls_refs: bool,
}

/// Collects [`V2Caps`] from the packets of the advertisement (a `# service=` preamble and its
/// flush, when present, are skipped).
#[derive(Default)]
pub struct CapsParser {
    pub caps: V2Caps,
    pub done: bool,
}

impl CapsParser {
    /// # Errors
    /// On an `ERR` packet.
    pub fn on_pkt(&mut self, p: Pkt<'_>) -> Result<(), ProtoError> {
        match p {
            Pkt::Data(d) => {
                check_err(d)?;
                let line = text(d);
                if line.starts_with("# service=") {
                    return Ok(());
                }
                if line == "version 2" {
                    self.caps.version2 = true;
                } else if let Some(f) = line.strip_prefix("object-format=") {
                    self.caps.object_format = Some(f.to_owned());
                } else if line == "ls-refs" || line.starts_with("ls-refs=") {
                    self.caps.ls_refs = true;
                } else if line == "fetch" || line.starts_with("fetch=") {
                    self.caps.fetch = true;
                }
            }
            // The flush after a `# service=` preamble comes before any capability.
            Pkt::Flush if self.caps.version2 => self.done = true,
            _ => {}
        }
        Ok(())
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

    /// The distinct object ids of the branch heads (what `git clone` wants).
    pub fn branch_wants(&self) -> Vec<String> {
        let mut w: Vec<String> = self
            .refs
            .iter()
            .filter(|r| r.name.starts_with("refs/heads/"))
            .map(|r| r.oid.clone())
            .collect();
        w.sort();
        w.dedup();
        w
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Section {
    /// Before the first section header, or right after a delimiter.
    Header,
    /// A section other than `packfile` (its lines are skipped).
    Other,
    Packfile,
}

/// The `fetch` response: sections separated by delimiters; in `packfile`, side-band packets
/// (band 1 pack data, 2 progress, 3 fatal error). Pack bytes are counted, and copied to
/// `capture` when the caller asks for them (`--verify`).
pub struct FetchParser {
    section: Section,
    pub pack_bytes: u64,
    pub capture: Option<Vec<u8>>,
    pub done: bool,
}

impl FetchParser {
    pub fn new(capture: bool) -> Self {
        Self {
            section: Section::Header,
            pack_bytes: 0,
            capture: capture.then(Vec::new),
            done: false,
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

/// The v0 `info/refs?service=git-receive-pack` advertisement.
#[derive(Default)]
pub struct ReceiveAdvertParser {
    pub refs: Vec<Ref>,
    preamble_done: bool,
    pub done: bool,
}

impl ReceiveAdvertParser {
    /// # Errors
    /// On an `ERR` packet or a malformed ref line.
    pub fn on_pkt(&mut self, p: Pkt<'_>) -> Result<(), ProtoError> {
        match p {
            Pkt::Data(d) => {
                check_err(d)?;
                let line = text(d);
                if line.starts_with("# service=") {
                    return Ok(());
                }
                self.preamble_done = true;
                let line = line.split('\0').next().unwrap_or_default();
                let (oid, name) = line
                    .split_once(' ')
                    .ok_or_else(|| ProtoError::Unexpected(format!("advertised ref `{line}`")))?;
                // An empty repository advertises `capabilities^{}` with the zero id.
                if oid != ZERO_OID {
                    self.refs.push(Ref {
                        oid: oid.into(),
                        name: name.into(),
                    });
                }
            }
            Pkt::Flush if self.preamble_done => self.done = true,
            Pkt::Flush => self.preamble_done = true,
            _ => {
                return Err(ProtoError::Unexpected(
                    "special packet in advertisement".into(),
                ))
            }
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
mod tests {
    use super::*;

    fn pkts(lines: &[&[u8]]) -> Vec<u8> {
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

    #[test]
    fn caps_and_ls_refs() {
        let advert = pkts(&[
            b"# service=git-upload-pack\n",
            b"<flush>",
            b"version 2\n",
            b"ls-refs=unborn\n",
            b"fetch=shallow\n",
            b"object-format=sha1\n",
            b"<flush>",
        ]);
        let mut c = CapsParser::default();
        feed_all(&advert, 3, |p| c.on_pkt(p));
        assert!(c.done && c.caps.version2 && c.caps.fetch && c.caps.ls_refs);
        assert_eq!(c.caps.object_format.as_deref(), Some("sha1"));
        let req = ls_refs_request(&c.caps).unwrap();
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
        assert_eq!(l.branch_wants(), vec![a, b]);
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
        let mut a = ReceiveAdvertParser::default();
        feed_all(&empty, 5, |p| a.on_pkt(p));
        assert!(a.done && a.refs.is_empty());
        let line = format!("{oid} refs/heads/x\0report-status\n");
        let full = pkts(&[
            b"# service=git-receive-pack\n",
            b"<flush>",
            line.as_bytes(),
            b"<flush>",
        ]);
        let mut a = ReceiveAdvertParser::default();
        feed_all(&full, 4, |p| a.on_pkt(p));
        assert_eq!(
            a.refs,
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
