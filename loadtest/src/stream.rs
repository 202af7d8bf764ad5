//! Git over a bidirectional byte stream, with no HTTP framing: the transport of `git://` (a TCP
//! connection to `git daemon`) and of SSH (an exec channel to `git-upload-pack`). [`converse`]
//! drives an [`UploadSession`] over anything that implements [`Duplex`], whichever runtime that
//! lives on; [`daemon_request`] encodes the line that opens a git:// connection.

use std::future::Future;

use gitplane::git::pktline::{self, PktError};

use crate::proto::{PktStream, ProtoError};
use crate::upload::{Goal, Next, UploadSession};

/// A stream to an upload-pack: what the client writes is its stdin, what it reads its stdout.
pub trait Duplex {
    type Error: From<ProtoError>;

    /// Writes all of `data`.
    fn send(&mut self, data: Vec<u8>) -> impl Future<Output = Result<(), Self::Error>>;

    /// The next bytes from the server (never empty), `None` once the server ended the stream.
    fn recv(&mut self) -> impl Future<Output = Result<Option<&[u8]>, Self::Error>>;
}

/// Runs one conversation toward `goal` over `io`: reads the advertisement, sends each request
/// as its response completes, and after the last one waits for the server to end the stream
/// (as a `git` process waits for its upload-pack to exit).
///
/// # Errors
/// The first error of the transport or of the protocol; a stream that ends in the middle of
/// a response, or carries data after the conversation, is a protocol error.
pub async fn converse<D: Duplex>(io: &mut D, goal: Goal) -> Result<UploadSession, D::Error> {
    let mut session = UploadSession::new(goal, true);
    let mut pkts = PktStream::default();
    loop {
        let step = match io.recv().await? {
            Some(piece) => {
                pkts.feed(piece, |p| session.on_pkt(p))?;
                session.next_step()
            }
            None => {
                return Err(
                    ProtoError::Truncated("the stream ended in the middle of a response").into(),
                )
            }
        };
        match step {
            None => {}
            Some(Next::Request(req)) => io.send(req).await?,
            Some(Next::Finish(last)) => {
                if !last.is_empty() {
                    io.send(last).await?;
                }
                break;
            }
        }
    }
    if !pkts.is_clean() || io.recv().await?.is_some() {
        return Err(ProtoError::Unexpected("data after the end of the conversation".into()).into());
    }
    Ok(session)
}

/// The first packet on a git:// connection: which service, which repository, which virtual host,
/// and (after a second NUL, where older daemons ignore it) the request for protocol v2.
///
/// # Errors
/// When the path and host do not fit one pkt-line.
pub fn daemon_request(path: &str, host: &str) -> Result<Vec<u8>, PktError> {
    let mut out = Vec::with_capacity(64 + path.len() + host.len());
    pktline::encode_data(
        &mut out,
        format!("git-upload-pack {path}\0host={host}\0\0version=2\0").as_bytes(),
    )?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use gitplane::git::pktline::FLUSH;

    /// A scripted server: answers each write with the next canned response, delivered in
    /// pieces of `step` bytes, and records what the client sent.
    struct Script {
        answers: Vec<Vec<u8>>,
        pending: Vec<u8>,
        step: usize,
        sent: Vec<Vec<u8>>,
        piece: Vec<u8>,
    }

    impl Duplex for Script {
        type Error = ProtoError;

        async fn send(&mut self, data: Vec<u8>) -> Result<(), ProtoError> {
            self.sent.push(data);
            if !self.answers.is_empty() {
                self.pending = self.answers.remove(0);
            }
            Ok(())
        }

        async fn recv(&mut self) -> Result<Option<&[u8]>, ProtoError> {
            if self.pending.is_empty() {
                return Ok(None);
            }
            let n = self.step.min(self.pending.len());
            self.piece = self.pending.drain(..n).collect();
            Ok(Some(&self.piece))
        }
    }

    fn pkts(lines: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for l in lines {
            match *l {
                b"<flush>" => out.extend_from_slice(FLUSH),
                d => pktline::encode_data(&mut out, d).unwrap(),
            }
        }
        out
    }

    fn block_on<F: Future>(f: F) -> F::Output {
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .build()
            .unwrap();
        rt.block_on(f)
    }

    #[test]
    fn a_v2_clone_over_a_stream() {
        let oid = "a".repeat(40);
        let ls = format!("{oid} refs/heads/main\n");
        for step in [1, 7, 4096] {
            let mut io = Script {
                pending: pkts(&[b"version 2\n", b"ls-refs\n", b"fetch\n", b"<flush>"]),
                answers: vec![
                    pkts(&[ls.as_bytes(), b"<flush>"]),
                    pkts(&[b"packfile\n", b"\x01PACK1234", b"<flush>"]),
                ],
                step,
                sent: Vec::new(),
                piece: Vec::new(),
            };
            let s = block_on(converse(&mut io, Goal::Clone { capture: false })).unwrap();
            assert_eq!(s.pack_bytes, 8);
            assert_eq!(io.sent.len(), 3);
            assert_eq!(io.sent[2], FLUSH);
        }
    }

    #[test]
    fn early_end_and_trailing_data_are_errors() {
        let mut io = Script {
            pending: pkts(&[b"version 2\n", b"ls-refs\n"]),
            answers: Vec::new(),
            step: 3,
            sent: Vec::new(),
            piece: Vec::new(),
        };
        let err = block_on(converse(&mut io, Goal::Refs)).err().unwrap();
        assert!(matches!(err, ProtoError::Truncated(_)));

        let oid = "a".repeat(40);
        let ls = format!("{oid} refs/heads/main\n");
        let mut io = Script {
            pending: pkts(&[b"version 2\n", b"ls-refs\n", b"fetch\n", b"<flush>"]),
            answers: vec![pkts(&[ls.as_bytes(), b"<flush>", b"extra"])],
            step: 1000,
            sent: Vec::new(),
            piece: Vec::new(),
        };
        let err = block_on(converse(&mut io, Goal::Refs)).err().unwrap();
        assert!(matches!(err, ProtoError::Unexpected(_)), "{err}");
    }

    #[test]
    fn daemon_request_line() {
        let r = daemon_request("/o/r.git", "h:9418").unwrap();
        let payload = &b"git-upload-pack /o/r.git\0host=h:9418\0\0version=2\0"[..];
        assert_eq!(&r[..4], format!("{:04x}", payload.len() + 4).as_bytes());
        assert_eq!(&r[4..], payload);
    }
}
