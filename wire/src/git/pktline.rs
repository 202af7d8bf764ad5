//! Git pkt-line framing (gitprotocol-common(5)), sans-I/O: [`decode`] borrows one packet from the
//! front of a buffer, [`encode_data`] appends one. Every Git protocol conversation, the smart-HTTP
//! advertisement included, is a sequence of these.

use thiserror::Error;

use crate::hex::hex_value;

/// Largest packet, the 4-byte length header included (Git's `LARGE_PACKET_MAX`).
pub const MAX_PKT_LEN: usize = 65520;
/// Largest payload of a data packet.
pub const MAX_PAYLOAD_LEN: usize = MAX_PKT_LEN - HEADER_LEN;
pub const FLUSH: &[u8; 4] = b"0000";
pub const DELIM: &[u8; 4] = b"0001";
pub const RESPONSE_END: &[u8; 4] = b"0002";

const HEADER_LEN: usize = 4;

#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum PktError {
    #[error("pkt-line length header `{}` is not 4 hex digits", header.escape_ascii())]
    BadHeader { header: [u8; 4] },
    #[error("pkt-line length {len} is reserved and invalid")]
    InvalidLength { len: usize },
    #[error("pkt-line length {len} exceeds the maximum of {max}")]
    TooLong { len: usize, max: usize },
    #[error("pkt-line payload of {len} bytes exceeds the maximum of {max}")]
    PayloadTooLarge { len: usize, max: usize },
}

#[derive(Debug, PartialEq, Eq)]
pub enum Packet<'a> {
    Flush,
    Delim,
    ResponseEnd,
    Data(&'a [u8]),
}

#[derive(Debug, PartialEq, Eq)]
pub enum PktDecode<'a> {
    Complete {
        packet: Packet<'a>,
        consumed: usize,
    },
    /// At least `needed` more bytes must be appended before the packet can be decoded.
    Incomplete {
        needed: usize,
    },
}

/// Decodes the packet at the front of `buf`. A data packet borrows its payload from `buf`.
pub fn decode(buf: &[u8]) -> Result<PktDecode<'_>, PktError> {
    let Some(header) = buf.first_chunk::<HEADER_LEN>() else {
        return Ok(PktDecode::Incomplete {
            needed: HEADER_LEN.saturating_sub(buf.len()),
        });
    };
    let mut len = 0usize;
    for &b in header {
        let digit = hex_value(b).ok_or(PktError::BadHeader { header: *header })?;
        len = (len << 4) | usize::from(digit);
    }
    let packet = match len {
        0 => Packet::Flush,
        1 => Packet::Delim,
        2 => Packet::ResponseEnd,
        3 => return Err(PktError::InvalidLength { len }),
        _ if len > MAX_PKT_LEN => {
            return Err(PktError::TooLong {
                len,
                max: MAX_PKT_LEN,
            })
        }
        _ => match buf.get(HEADER_LEN..len) {
            Some(payload) => Packet::Data(payload),
            None => {
                return Ok(PktDecode::Incomplete {
                    needed: len.saturating_sub(buf.len()),
                })
            }
        },
    };
    let consumed = match packet {
        Packet::Data(_) => len,
        _ => HEADER_LEN,
    };
    Ok(PktDecode::Complete { packet, consumed })
}

/// Appends `payload` as one data packet.
pub fn encode_data(out: &mut Vec<u8>, payload: &[u8]) -> Result<(), PktError> {
    if payload.len() > MAX_PAYLOAD_LEN {
        return Err(PktError::PayloadTooLarge {
            len: payload.len(),
            max: MAX_PAYLOAD_LEN,
        });
    }
    let len = payload.len() + HEADER_LEN;
    out.reserve(len);
    out.extend_from_slice(&[
        hex_digit(len >> 12),
        hex_digit(len >> 8),
        hex_digit(len >> 4),
        hex_digit(len),
    ]);
    out.extend_from_slice(payload);
    Ok(())
}

/// Appends `line` as one data packet, exactly as given: no `\n` is added, so text lines should
/// carry their own (Git strips at most one on reading).
pub fn encode_str(out: &mut Vec<u8>, line: &str) -> Result<(), PktError> {
    encode_data(out, line.as_bytes())
}

/// Lower-case hex of the low 4 bits of `n`, as Git writes lengths.
fn hex_digit(n: usize) -> u8 {
    let d = (n & 0xf) as u8;
    if d < 10 {
        b'0' + d
    } else {
        b'a' + d - 10
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes every packet in `stream`, feeding it to a growing buffer one `step` at a time as a
    /// socket reader would, and checks that `needed` never overshoots.
    fn decode_stream(stream: &[u8], step: usize) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = Vec::new();
        let mut fed = 0;
        loop {
            match decode(&buf).unwrap() {
                PktDecode::Complete { packet, consumed } => {
                    out.push(match packet {
                        Packet::Flush => b"<flush>".to_vec(),
                        Packet::Delim => b"<delim>".to_vec(),
                        Packet::ResponseEnd => b"<end>".to_vec(),
                        Packet::Data(d) => d.to_vec(),
                    });
                    buf.drain(..consumed);
                }
                PktDecode::Incomplete { needed } => {
                    assert!(needed > 0);
                    if fed == stream.len() {
                        assert!(buf.is_empty(), "trailing partial packet");
                        return out;
                    }
                    assert!(needed <= stream.len() - fed, "needed overshoots");
                    let end = (fed + step).min(stream.len());
                    buf.extend_from_slice(&stream[fed..end]);
                    fed = end;
                }
            }
        }
    }

    const ADVERT: &[u8] = b"001e# service=git-upload-pack\n0000\
        003de3d2a9b5c6f7e8d9c0b1a2f3e4d5c6b7a8f9e0d1 refs/heads/main\n0001000200040000";

    fn expected_advert() -> Vec<Vec<u8>> {
        vec![
            b"# service=git-upload-pack\n".to_vec(),
            b"<flush>".to_vec(),
            b"e3d2a9b5c6f7e8d9c0b1a2f3e4d5c6b7a8f9e0d1 refs/heads/main\n".to_vec(),
            b"<delim>".to_vec(),
            b"<end>".to_vec(),
            b"".to_vec(),
            b"<flush>".to_vec(),
        ]
    }

    #[test]
    fn decodes_real_advertisement_byte_by_byte() {
        assert_eq!(decode_stream(ADVERT, 1), expected_advert());
    }

    #[test]
    fn decodes_at_every_step_size() {
        for step in 1..=ADVERT.len() {
            assert_eq!(
                decode_stream(ADVERT, step),
                expected_advert(),
                "step {step}"
            );
        }
    }

    #[test]
    fn every_split_point_reports_exact_need() {
        let pkt = b"000ahello\n";
        for cut in 0..pkt.len() {
            let needed = if cut < 4 { 4 - cut } else { pkt.len() - cut };
            assert_eq!(
                decode(&pkt[..cut]).unwrap(),
                PktDecode::Incomplete { needed },
                "cut {cut}"
            );
        }
        assert_eq!(
            decode(pkt).unwrap(),
            PktDecode::Complete {
                packet: Packet::Data(b"hello\n"),
                consumed: 10
            }
        );
    }

    #[test]
    fn special_packets_and_empty_data() {
        for (raw, packet) in [
            (FLUSH, Packet::Flush),
            (DELIM, Packet::Delim),
            (RESPONSE_END, Packet::ResponseEnd),
            (b"0004", Packet::Data(b"")),
        ] {
            assert_eq!(
                decode(raw).unwrap(),
                PktDecode::Complete {
                    packet,
                    consumed: 4
                }
            );
        }
    }

    #[test]
    fn upper_case_hex_is_accepted() {
        let mut pkt = b"000A".to_vec();
        pkt.extend_from_slice(b"abcdef");
        assert_eq!(
            decode(&pkt).unwrap(),
            PktDecode::Complete {
                packet: Packet::Data(b"abcdef"),
                consumed: 10
            }
        );
    }

    #[test]
    fn malformed_headers() {
        assert_eq!(decode(b"0003"), Err(PktError::InvalidLength { len: 3 }));
        for bad in [&b"00g4"[..], b"-004", b" 004", b"0x04", b"\xff\x00\x00\x00"] {
            let mut header = [0u8; 4];
            header.copy_from_slice(bad);
            assert_eq!(decode(bad), Err(PktError::BadHeader { header }));
        }
        assert_eq!(
            decode(b"fff1"),
            Err(PktError::TooLong {
                len: 0xfff1,
                max: MAX_PKT_LEN
            })
        );
        assert_eq!(
            decode(b"ffff"),
            Err(PktError::TooLong {
                len: 0xffff,
                max: MAX_PKT_LEN
            })
        );
        // The header is judged before the payload arrives.
        assert_eq!(
            decode(b"0003extra"),
            Err(PktError::InvalidLength { len: 3 })
        );
    }

    #[test]
    fn largest_packet_round_trips() {
        let payload = vec![b'x'; MAX_PAYLOAD_LEN];
        let mut out = Vec::new();
        encode_data(&mut out, &payload).unwrap();
        assert_eq!(&out[..4], b"fff0");
        assert_eq!(out.len(), MAX_PKT_LEN);
        assert_eq!(
            decode(&out[..out.len() - 1]).unwrap(),
            PktDecode::Incomplete { needed: 1 }
        );
        assert_eq!(
            decode(&out).unwrap(),
            PktDecode::Complete {
                packet: Packet::Data(&payload),
                consumed: MAX_PKT_LEN
            }
        );
    }

    #[test]
    fn oversized_payload_is_rejected_and_nothing_written() {
        let payload = vec![0u8; MAX_PAYLOAD_LEN + 1];
        let mut out = b"keep".to_vec();
        assert_eq!(
            encode_data(&mut out, &payload),
            Err(PktError::PayloadTooLarge {
                len: MAX_PAYLOAD_LEN + 1,
                max: MAX_PAYLOAD_LEN
            })
        );
        assert_eq!(out, b"keep");
    }

    #[test]
    fn encodes_exactly_what_git_sends() {
        let mut out = Vec::new();
        encode_str(&mut out, "# service=git-upload-pack\n").unwrap();
        out.extend_from_slice(FLUSH);
        encode_data(&mut out, b"").unwrap();
        assert_eq!(out, b"001e# service=git-upload-pack\n00000004");
    }

    #[test]
    fn every_length_round_trips() {
        let mut out = Vec::new();
        for n in [
            0usize,
            1,
            9,
            10,
            15,
            16,
            255,
            256,
            4095,
            4096,
            MAX_PAYLOAD_LEN,
        ] {
            out.clear();
            let payload = vec![b'a'; n];
            encode_data(&mut out, &payload).unwrap();
            assert_eq!(
                decode(&out).unwrap(),
                PktDecode::Complete {
                    packet: Packet::Data(&payload),
                    consumed: n + 4
                }
            );
        }
    }
}
