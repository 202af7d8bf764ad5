//! gRPC message framing (sans-I/O): each message on an HTTP/2 stream is
//! `compressed-flag (1 byte) | length (4 bytes, big endian) | payload`.
//!
//! - [`decode`] looks at buffered bytes and says `Complete { .. }` or `Incomplete { needed }`; it
//!   refuses a frame whose declared length exceeds the limit as soon as its 5-byte prefix is in,
//!   so a peer can never make us buffer more than one maximum-size message.
//! - [`MessageReader`] accumulates DATA chunks as they arrive and hands out whole messages.
//! - [`encode_message`] frames a prost message into one buffer (one allocation, no copy).
//! - [`gunzip`] inflates a compressed message, bounded by the same limit.
//!
//! No I/O and no runtime here: the server's connection loop feeds bytes in.

use std::io::Read;

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Length of the prefix before each message.
pub const PREFIX_LEN: usize = 5;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The flag byte must be 0 (identity) or 1 (compressed).
    #[error("invalid compressed flag {0:#04x} in gRPC message prefix")]
    BadFlag(u8),
    #[error("gRPC message of {len} bytes is larger than the limit of {max}")]
    TooLarge { len: u64, max: usize },
    #[error("gRPC message is compressed but the request declared no grpc-encoding")]
    CompressedWithoutEncoding,
    #[error("compressed gRPC message is not valid gzip: {0}")]
    Corrupt(String),
    #[error("stream ended inside a gRPC message ({have} of {want} bytes)")]
    Truncated { have: usize, want: usize },
}

/// What [`decode`] found at the start of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// A whole message: `consumed` bytes (prefix included) can be dropped from the buffer.
    Complete {
        compressed: bool,
        payload: &'a [u8],
        consumed: usize,
    },
    /// At least `needed` more bytes are required; not an error.
    Incomplete { needed: usize },
}

/// Decodes the message at the start of `buf`, allowing payloads of at most `max_len` bytes.
///
/// # Errors
/// [`FrameError::BadFlag`] for a flag other than 0 or 1, [`FrameError::TooLarge`] when the
/// declared length exceeds `max_len` (known from the prefix alone).
pub fn decode(buf: &[u8], max_len: usize) -> Result<Decoded<'_>, FrameError> {
    let Some(prefix) = buf.get(..PREFIX_LEN) else {
        return Ok(Decoded::Incomplete {
            needed: PREFIX_LEN - buf.len(),
        });
    };
    let compressed = match prefix[0] {
        0 => false,
        1 => true,
        other => return Err(FrameError::BadFlag(other)),
    };
    let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]);
    let len_usize = usize::try_from(len).unwrap_or(usize::MAX);
    if len_usize > max_len {
        return Err(FrameError::TooLarge {
            len: u64::from(len),
            max: max_len,
        });
    }
    let end = PREFIX_LEN + len_usize;
    match buf.get(PREFIX_LEN..end) {
        Some(payload) => Ok(Decoded::Complete {
            compressed,
            payload,
            consumed: end,
        }),
        None => Ok(Decoded::Incomplete {
            needed: end - buf.len(),
        }),
    }
}

/// Writes the 5-byte prefix for a payload of `len` bytes.
pub fn encode_prefix(out: &mut impl BufMut, compressed: bool, len: u32) {
    out.put_u8(u8::from(compressed));
    out.put_u32(len);
}

/// Frames a prost message, uncompressed, into one buffer.
///
/// # Errors
/// [`FrameError::TooLarge`] if the encoded message does not fit a 4-byte length.
pub fn encode_message<M: prost::Message>(msg: &M) -> Result<Bytes, FrameError> {
    let len = msg.encoded_len();
    let len32 = u32::try_from(len).map_err(|_| FrameError::TooLarge {
        len: len as u64,
        max: u32::MAX as usize,
    })?;
    let mut buf = BytesMut::with_capacity(PREFIX_LEN + len);
    encode_prefix(&mut buf, false, len32);
    // Cannot fail: the buffer has exactly the capacity the message asked for.
    msg.encode_raw(&mut buf);
    Ok(buf.freeze())
}

/// Inflates a gzip-compressed payload, refusing output past `max_len` bytes (a zip bomb stops at
/// the limit instead of filling memory).
///
/// # Errors
/// [`FrameError::Corrupt`] for invalid gzip, [`FrameError::TooLarge`] past the limit.
pub fn gunzip(payload: &[u8], max_len: usize) -> Result<Vec<u8>, FrameError> {
    let mut out = Vec::new();
    let limit = max_len as u64 + 1;
    flate2::read::GzDecoder::new(payload)
        .take(limit)
        .read_to_end(&mut out)
        .map_err(|e| FrameError::Corrupt(e.to_string()))?;
    if out.len() > max_len {
        return Err(FrameError::TooLarge {
            len: out.len() as u64,
            max: max_len,
        });
    }
    Ok(out)
}

/// Compression a request's messages may use (`grpc-encoding`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Identity,
    Gzip,
}

impl Encoding {
    /// `None` for an encoding we do not implement (the caller answers UNIMPLEMENTED).
    pub fn from_header(value: Option<&str>) -> Option<Self> {
        match value.map(str::trim) {
            None | Some("identity") | Some("") => Some(Self::Identity),
            Some("gzip") => Some(Self::Gzip),
            Some(_) => None,
        }
    }
}

/// The value of `grpc-accept-encoding` we send.
pub const ACCEPT_ENCODING: &str = "gzip,identity";

/// Accumulates a stream's DATA chunks and yields whole, decompressed messages. Holds at most one
/// message's worth of bytes plus the chunk being added.
#[derive(Debug)]
pub struct MessageReader {
    buf: BytesMut,
    max_len: usize,
    encoding: Encoding,
}

impl MessageReader {
    pub fn new(max_len: usize, encoding: Encoding) -> Self {
        Self {
            buf: BytesMut::new(),
            max_len,
            encoding,
        }
    }

    /// Appends received bytes.
    pub fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// Bytes held but not yet returned as a message.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next whole message, `Ok(None)` if more bytes are needed.
    ///
    /// # Errors
    /// Any [`FrameError`] from the prefix or decompression; the stream must then be ended.
    pub fn next_message(&mut self) -> Result<Option<Bytes>, FrameError> {
        let (compressed, consumed) = match decode(&self.buf, self.max_len)? {
            Decoded::Incomplete { .. } => return Ok(None),
            Decoded::Complete {
                compressed,
                consumed,
                ..
            } => (compressed, consumed),
        };
        let mut frame = self.buf.split_to(consumed);
        frame.advance(PREFIX_LEN);
        if !compressed {
            return Ok(Some(frame.freeze()));
        }
        match self.encoding {
            Encoding::Identity => Err(FrameError::CompressedWithoutEncoding),
            Encoding::Gzip => Ok(Some(Bytes::from(gunzip(&frame, self.max_len)?))),
        }
    }

    /// Called at end of stream: leftover bytes mean a cut-off message.
    ///
    /// # Errors
    /// [`FrameError::Truncated`] if a partial message is buffered.
    pub fn finish(&self) -> Result<(), FrameError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let want = match decode(&self.buf, self.max_len) {
            Ok(Decoded::Incomplete { needed }) => self.buf.len() + needed,
            _ => PREFIX_LEN,
        };
        Err(FrameError::Truncated {
            have: self.buf.len(),
            want,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn frame(flag: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![flag];
        v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    fn gz(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn decodes_complete_and_incomplete() {
        let f = frame(0, b"hello");
        assert_eq!(
            decode(&f, 100),
            Ok(Decoded::Complete {
                compressed: false,
                payload: b"hello",
                consumed: 10
            })
        );
        assert_eq!(decode(&f[..0], 100), Ok(Decoded::Incomplete { needed: 5 }));
        assert_eq!(decode(&f[..3], 100), Ok(Decoded::Incomplete { needed: 2 }));
        assert_eq!(decode(&f[..7], 100), Ok(Decoded::Incomplete { needed: 3 }));
        // An empty message is valid.
        assert_eq!(
            decode(&frame(0, b""), 0),
            Ok(Decoded::Complete {
                compressed: false,
                payload: b"",
                consumed: 5
            })
        );
    }

    #[test]
    fn refuses_bad_flags_and_oversized_lengths_from_the_prefix() {
        assert_eq!(decode(&[2, 0, 0, 0, 0], 10), Err(FrameError::BadFlag(2)));
        assert_eq!(decode(&[0xff], 10), Ok(Decoded::Incomplete { needed: 4 }));
        // Only the prefix has arrived, and it is already refused.
        assert_eq!(
            decode(&[0, 0xff, 0xff, 0xff, 0xff], 4 << 20),
            Err(FrameError::TooLarge {
                len: u32::MAX as u64,
                max: 4 << 20
            })
        );
    }

    /// Split reads: every way of cutting two messages into two chunks gives the same messages.
    #[test]
    fn reader_handles_every_split() {
        let mut wire = frame(0, b"first message");
        wire.extend(frame(1, &gz(b"second, compressed")));
        for cut in 0..=wire.len() {
            let mut r = MessageReader::new(1024, Encoding::Gzip);
            let mut got = Vec::new();
            for chunk in [&wire[..cut], &wire[cut..]] {
                r.push(chunk);
                while let Some(m) = r.next_message().unwrap() {
                    got.push(m);
                }
            }
            assert_eq!(got, vec![&b"first message"[..], &b"second, compressed"[..]]);
            r.finish().unwrap();
        }
    }

    #[test]
    fn reader_byte_by_byte_and_truncation() {
        let wire = frame(0, b"abc");
        let mut r = MessageReader::new(16, Encoding::Identity);
        for (i, b) in wire.iter().enumerate() {
            assert_eq!(r.next_message().unwrap(), None);
            r.push(std::slice::from_ref(b));
            if i + 1 < wire.len() {
                assert!(matches!(r.finish(), Err(FrameError::Truncated { .. })));
            }
        }
        assert_eq!(r.next_message().unwrap().as_deref(), Some(&b"abc"[..]));
        assert_eq!(r.finish(), Ok(()));
        let mut r = MessageReader::new(16, Encoding::Identity);
        r.push(&wire[..6]);
        assert_eq!(r.next_message().unwrap(), None);
        assert_eq!(r.finish(), Err(FrameError::Truncated { have: 6, want: 8 }));
    }

    #[test]
    fn compression_rules() {
        let mut r = MessageReader::new(64, Encoding::Identity);
        r.push(&frame(1, &gz(b"x")));
        assert_eq!(r.next_message(), Err(FrameError::CompressedWithoutEncoding));
        let mut r = MessageReader::new(16, Encoding::Gzip);
        r.push(&frame(1, b"not gzip"));
        assert!(matches!(r.next_message(), Err(FrameError::Corrupt(_))));
        // A small compressed frame that inflates past the limit is stopped at the limit.
        let bomb = gz(&vec![0u8; 1 << 20]);
        assert!(bomb.len() < 16 << 10);
        let mut r = MessageReader::new(64 << 10, Encoding::Gzip);
        r.push(&frame(1, &bomb));
        assert!(matches!(
            r.next_message(),
            Err(FrameError::TooLarge { max: 65536, .. })
        ));
        assert_eq!(Encoding::from_header(Some("deflate")), None);
        assert_eq!(Encoding::from_header(None), Some(Encoding::Identity));
        assert_eq!(Encoding::from_header(Some("gzip")), Some(Encoding::Gzip));
    }

    #[derive(Clone, PartialEq, prost::Message)]
    struct Probe {
        #[prost(string, tag = "1")]
        service: String,
    }

    #[test]
    fn encode_round_trips() {
        let msg = Probe {
            service: "gitplane.v1.RepositoryService".into(),
        };
        let wire = encode_message(&msg).unwrap();
        let Ok(Decoded::Complete {
            payload, consumed, ..
        }) = decode(&wire, 1024)
        else {
            panic!("not complete")
        };
        assert_eq!(consumed, wire.len());
        let back: Probe = prost::Message::decode(payload).unwrap();
        assert_eq!(back, msg);
    }
}
