//! Reading a request body off a [`Conn`]: Content-Length or chunked framing, optionally gzip
//! coded, streamed piece by piece so a 2 GB push never sits in memory.

use std::io::Write;

use flate2::write::GzDecoder;

use super::chunked::{ChunkedDecoder, ChunkedError};
use super::conn::{BodyReadError, Conn};
use super::head::{BodyFraming, RequestHead};
use crate::progress::Stall;

/// Compressed input is inflated in slices this small so that one step's output stays bounded
/// (deflate expands at most ~1032:1).
const GZIP_STEP: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("connection closed before the request body was complete")]
    Truncated,
    #[error("reading the request body: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad chunked body: {0}")]
    Chunked(#[from] ChunkedError),
    #[error("bad gzip body: {0}")]
    Gzip(std::io::Error),
    #[error("request body inflates beyond {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("request body not received in time: {0}")]
    Stalled(Stall),
}

impl From<BodyReadError> for BodyError {
    fn from(e: BodyReadError) -> Self {
        match e {
            BodyReadError::Io(e) => Self::Io(e),
            BodyReadError::Stalled(s) => Self::Stalled(s),
        }
    }
}

impl BodyError {
    /// The status to answer with, when an answer is still possible.
    pub fn status(&self) -> u16 {
        match self {
            Self::TooLarge { .. } => 413,
            Self::Stalled(_) => 408,
            _ => 400,
        }
    }
}

enum Framing {
    Remaining(u64),
    Chunked(ChunkedDecoder),
    Done,
}

pub struct BodyReader {
    framing: Framing,
    gzip: Option<GzDecoder<Vec<u8>>>,
    inflated: u64,
    max_inflated: u64,
}

impl BodyReader {
    /// `max_inflated` bounds the decoded size of a gzip body (a "zip bomb" defence); plain bodies
    /// are streamed and need no bound here.
    pub fn new(head: &RequestHead, max_inflated: u64) -> Self {
        let framing = match head.framing {
            BodyFraming::None | BodyFraming::Length(0) => Framing::Done,
            BodyFraming::Length(n) => Framing::Remaining(n),
            BodyFraming::Chunked => Framing::Chunked(ChunkedDecoder::new()),
        };
        Self {
            framing,
            gzip: head.gzip.then(|| GzDecoder::new(Vec::new())),
            inflated: 0,
            max_inflated,
        }
    }

    /// Appends the next decoded body bytes to `out`. Returns `Ok(false)` once the whole body has
    /// been read (then `out` may still have received the last bytes).
    pub async fn read(&mut self, conn: &mut Conn, out: &mut Vec<u8>) -> Result<bool, BodyError> {
        loop {
            if matches!(self.framing, Framing::Done) {
                self.finish_gzip(out)?;
                conn.body_finished();
                return Ok(false);
            }
            if conn.buffered().is_empty() && conn.fill_body().await? == 0 {
                return Err(BodyError::Truncated);
            }
            let input = conn.buffered();
            let (consumed, data, done) = match &mut self.framing {
                Framing::Remaining(n) => {
                    let take = input.len().min(usize::try_from(*n).unwrap_or(usize::MAX));
                    *n -= take as u64;
                    (take, 0..take, *n == 0)
                }
                Framing::Chunked(dec) => {
                    let d = dec.decode(input)?;
                    (d.consumed, d.data, d.done)
                }
                Framing::Done => (0, 0..0, true),
            };
            let made_progress = consumed > 0 || done;
            let raw = input.get(data).unwrap_or_default();
            let had_data = !raw.is_empty();
            match self.gzip.as_mut() {
                Some(gz) => {
                    for piece in raw.chunks(GZIP_STEP) {
                        gz.write_all(piece).map_err(BodyError::Gzip)?;
                        let produced = std::mem::take(gz.get_mut());
                        self.inflated += produced.len() as u64;
                        if self.inflated > self.max_inflated {
                            return Err(BodyError::TooLarge {
                                limit: self.max_inflated,
                            });
                        }
                        out.extend_from_slice(&produced);
                        *gz.get_mut() = produced;
                        gz.get_mut().clear();
                    }
                }
                None => out.extend_from_slice(raw),
            }
            conn.consume(consumed);
            if done {
                self.framing = Framing::Done;
            }
            if !made_progress {
                // The decoder needs more bytes than are buffered.
                if conn.fill_body().await? == 0 {
                    return Err(BodyError::Truncated);
                }
                continue;
            }
            if had_data && !out.is_empty() {
                return Ok(true);
            }
        }
    }

    fn finish_gzip(&mut self, out: &mut Vec<u8>) -> Result<(), BodyError> {
        if let Some(mut gz) = self.gzip.take() {
            gz.try_finish().map_err(BodyError::Gzip)?;
            out.extend_from_slice(gz.get_ref());
        }
        Ok(())
    }
}
