//! Decoder for the HTTP/1.1 chunked transfer coding (RFC 9112 §7.1), sans-I/O: it walks the
//! framing byte by byte and hands body bytes back as ranges of the caller's buffer, so data is
//! never copied. Every line it has to remember is bounded, so a peer cannot make it buffer.

use std::ops::Range;

use thiserror::Error;

use crate::hex::hex_value;

/// Longest chunk-size line, extensions included, line ending excluded.
pub const MAX_SIZE_LINE: usize = 1024;
/// Most hex digits in a chunk size; 16 always fit a `u64`.
pub const MAX_SIZE_DIGITS: usize = 16;
/// Most bytes of trailer section, line endings included.
pub const MAX_TRAILERS: usize = 8 * 1024;

#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum ChunkedError {
    /// Also reported for a 17th hex digit, at offset 16.
    #[error(
        "bad chunk-size line: byte {found:#04x} at offset {offset} \
         (expected 1 to 16 hex digits, then `;` extensions or a line end)"
    )]
    BadSize { found: u8, offset: usize },
    #[error("chunk-size line is longer than {limit} bytes")]
    SizeLineTooLong { limit: usize },
    #[error("expected a line end, found byte {found:#04x}")]
    MissingCrlf { found: u8 },
    #[error("chunked trailers are longer than {limit} bytes")]
    TrailersTooLarge { limit: usize },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading the hex digits; `line` bytes of the size line seen so far.
    Size {
        value: u64,
        line: usize,
    },
    /// After the digits: whitespace, then `;` extensions (`ext`) or the line end.
    SizeTail {
        value: u64,
        line: usize,
        ext: bool,
    },
    /// Saw the CR ending a size line.
    SizeLf {
        value: u64,
    },
    /// Inside a chunk's data; never zero.
    Data {
        remaining: u64,
    },
    /// After a chunk's data, before its line end.
    DataEnd,
    /// Saw the CR after a chunk's data.
    DataLf,
    /// In the trailer section; `line_start` when at the start of a line (an empty line ends it).
    Trailer {
        total: usize,
        line_start: bool,
    },
    /// Saw a CR in the trailer section; `last` if it ends the empty line that closes the body.
    TrailerLf {
        total: usize,
        last: bool,
    },
    Done,
    /// A malformed body stays malformed: every later call reports the same error.
    Failed(ChunkedError),
}

#[derive(Debug, Clone)]
pub struct ChunkedDecoder {
    state: State,
}

/// The outcome of one [`ChunkedDecoder::decode`] call.
#[derive(Debug, PartialEq, Eq)]
pub struct Decoded {
    /// Bytes of the input used up, framing and data alike.
    pub consumed: usize,
    /// Body bytes, as a range of the input; may be empty.
    pub data: Range<usize>,
    /// The whole body, trailers included, has been consumed.
    pub done: bool,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl ChunkedDecoder {
    pub fn new() -> Self {
        Self {
            state: State::Size { value: 0, line: 0 },
        }
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Consumes a prefix of `input` and returns at most one contiguous range of body bytes
    /// within it. Call again with the unconsumed rest; `consumed == 0`, empty `data` and
    /// `!done` together mean more input is needed. Bytes after the end of the body are never
    /// consumed. An error is returned by the call whose input starts at the offending byte.
    pub fn decode(&mut self, input: &[u8]) -> Result<Decoded, ChunkedError> {
        if let State::Failed(e) = self.state {
            return Err(e);
        }
        let mut pos = 0;
        let mut data = 0..0;
        loop {
            match self.state {
                State::Done => break,
                State::Data { remaining } => {
                    let avail = input.len().saturating_sub(pos);
                    if !data.is_empty() || avail == 0 {
                        break;
                    }
                    let take = usize::try_from(remaining).map_or(avail, |r| r.min(avail));
                    data = pos..pos + take;
                    pos += take;
                    let left = remaining.saturating_sub(take as u64);
                    self.state = if left == 0 {
                        State::DataEnd
                    } else {
                        State::Data { remaining: left }
                    };
                }
                _ => {
                    let Some(&b) = input.get(pos) else { break };
                    match self.step(b) {
                        Ok(next) => {
                            self.state = next;
                            pos += 1;
                        }
                        Err(e) => {
                            self.state = State::Failed(e);
                            // What came before the bad byte is returned first and the error on
                            // the next call, so how the input was split never changes the body
                            // or the count of bytes consumed.
                            if pos == 0 {
                                return Err(e);
                            }
                            break;
                        }
                    }
                }
            }
        }
        Ok(Decoded {
            consumed: pos,
            data,
            done: self.state == State::Done,
        })
    }

    /// The state after framing byte `b`.
    fn step(&self, b: u8) -> Result<State, ChunkedError> {
        Ok(match self.state {
            State::Size { value, line } => match hex_value(b) {
                Some(d) if line < MAX_SIZE_DIGITS => State::Size {
                    value: (value << 4) | u64::from(d),
                    line: line + 1,
                },
                Some(_) => {
                    return Err(ChunkedError::BadSize {
                        found: b,
                        offset: line,
                    })
                }
                None if line == 0 => {
                    return Err(ChunkedError::BadSize {
                        found: b,
                        offset: 0,
                    })
                }
                None => Self::size_tail(value, line, false, b)?,
            },
            State::SizeTail { value, line, ext } => Self::size_tail(value, line, ext, b)?,
            State::SizeLf { value } => match b {
                b'\n' => Self::after_size_line(value),
                _ => return Err(ChunkedError::MissingCrlf { found: b }),
            },
            State::DataEnd => match b {
                b'\r' => State::DataLf,
                b'\n' => State::Size { value: 0, line: 0 },
                _ => return Err(ChunkedError::MissingCrlf { found: b }),
            },
            State::DataLf => match b {
                b'\n' => State::Size { value: 0, line: 0 },
                _ => return Err(ChunkedError::MissingCrlf { found: b }),
            },
            State::Trailer { total, line_start } => {
                let total = trailer_total(total)?;
                match b {
                    b'\r' => State::TrailerLf {
                        total,
                        last: line_start,
                    },
                    b'\n' if line_start => State::Done,
                    b'\n' => State::Trailer {
                        total,
                        line_start: true,
                    },
                    // Trailer fields are not used, only skipped over.
                    _ => State::Trailer {
                        total,
                        line_start: false,
                    },
                }
            }
            State::TrailerLf { total, last } => {
                let total = trailer_total(total)?;
                match b {
                    b'\n' if last => State::Done,
                    b'\n' => State::Trailer {
                        total,
                        line_start: true,
                    },
                    _ => return Err(ChunkedError::MissingCrlf { found: b }),
                }
            }
            // `decode` handles these without stepping.
            State::Data { .. } | State::Done | State::Failed(_) => self.state,
        })
    }

    /// Steps through the part of a size line after the digits. Only whitespace may separate the
    /// size from `;`: a lenient "5 5" or "5x" is what smuggling attacks rely on.
    fn size_tail(value: u64, line: usize, ext: bool, b: u8) -> Result<State, ChunkedError> {
        match b {
            b'\r' => return Ok(State::SizeLf { value }),
            b'\n' => return Ok(Self::after_size_line(value)),
            _ => {}
        }
        if line >= MAX_SIZE_LINE {
            return Err(ChunkedError::SizeLineTooLong {
                limit: MAX_SIZE_LINE,
            });
        }
        let ext = match b {
            b';' => true,
            b' ' | b'\t' => ext,
            // Extension names and values are ignored, but control bytes never belong there.
            0x21..=0x7e | 0x80..=0xff if ext => true,
            _ => {
                return Err(ChunkedError::BadSize {
                    found: b,
                    offset: line,
                })
            }
        };
        Ok(State::SizeTail {
            value,
            line: line + 1,
            ext,
        })
    }

    fn after_size_line(value: u64) -> State {
        if value == 0 {
            State::Trailer {
                total: 0,
                line_start: true,
            }
        } else {
            State::Data { remaining: value }
        }
    }
}

fn trailer_total(total: usize) -> Result<usize, ChunkedError> {
    if total >= MAX_TRAILERS {
        return Err(ChunkedError::TrailersTooLarge {
            limit: MAX_TRAILERS,
        });
    }
    Ok(total + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Everything the decoder made of a whole body.
    #[derive(Debug, PartialEq, Eq)]
    struct Outcome {
        body: Vec<u8>,
        done: bool,
        /// Bytes of the stream consumed in total.
        consumed: usize,
        error: Option<ChunkedError>,
    }

    /// Feeds `pieces` in turn as a socket reader would: unconsumed bytes stay buffered and the
    /// next piece is appended to them.
    fn run(pieces: &[&[u8]]) -> Outcome {
        let mut dec = ChunkedDecoder::new();
        let mut buf: Vec<u8> = Vec::new();
        let mut out = Outcome {
            body: Vec::new(),
            done: false,
            consumed: 0,
            error: None,
        };
        for piece in pieces {
            buf.extend_from_slice(piece);
            loop {
                match dec.decode(&buf) {
                    Ok(d) => {
                        assert!(d.consumed <= buf.len());
                        assert!(d.data.end <= d.consumed);
                        out.body.extend_from_slice(&buf[d.data.clone()]);
                        buf.drain(..d.consumed);
                        out.consumed += d.consumed;
                        assert_eq!(d.done, dec.is_done());
                        if d.done {
                            out.done = true;
                            return out;
                        }
                        if d.consumed == 0 && d.data.is_empty() {
                            break;
                        }
                    }
                    Err(e) => {
                        out.error = Some(e);
                        return out;
                    }
                }
            }
        }
        out
    }

    fn whole(input: &[u8]) -> Outcome {
        run(&[input])
    }

    /// Checks that byte-by-byte feeding and every two-way split give what one piece gives.
    fn check_splits(input: &[u8]) -> Outcome {
        let expected = whole(input);
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(run(&bytes), expected, "byte by byte");
        for cut in 0..=input.len() {
            let (a, b) = input.split_at(cut);
            assert_eq!(run(&[a, b]), expected, "split at {cut}");
        }
        expected
    }

    fn done(body: &[u8], consumed: usize) -> Outcome {
        Outcome {
            body: body.to_vec(),
            done: true,
            consumed,
            error: None,
        }
    }

    fn failed(body: &[u8], consumed: usize, error: ChunkedError) -> Outcome {
        Outcome {
            body: body.to_vec(),
            done: false,
            consumed,
            error: Some(error),
        }
    }

    #[test]
    fn decodes_in_one_call_when_all_there() {
        let input = b"5\r\nhello\r\n0\r\n\r\nNEXT";
        let mut dec = ChunkedDecoder::new();
        let d = dec.decode(input).unwrap();
        assert_eq!(
            d,
            Decoded {
                consumed: 15,
                data: 3..8,
                done: true
            }
        );
        // Done is sticky and consumes nothing more.
        assert_eq!(
            dec.decode(b"NEXT").unwrap(),
            Decoded {
                consumed: 0,
                data: 0..0,
                done: true
            }
        );
    }

    #[test]
    fn one_range_per_call() {
        let input = b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        let mut dec = ChunkedDecoder::new();
        let d = dec.decode(input).unwrap();
        // The framing after the first chunk is consumed, up to the next chunk's data.
        assert_eq!(
            d,
            Decoded {
                consumed: 11,
                data: 3..6,
                done: false
            }
        );
        let d = dec.decode(&input[11..]).unwrap();
        assert_eq!(
            d,
            Decoded {
                consumed: 9,
                data: 0..2,
                done: true
            }
        );
    }

    #[test]
    fn needs_more_input() {
        let mut dec = ChunkedDecoder::new();
        let empty = Decoded {
            consumed: 0,
            data: 0..0,
            done: false,
        };
        assert_eq!(dec.decode(b"").unwrap(), empty);
        assert_eq!(
            dec.decode(b"1").unwrap(),
            Decoded {
                consumed: 1,
                data: 0..0,
                done: false
            }
        );
        assert_eq!(dec.decode(b"").unwrap(), empty);
    }

    #[test]
    fn real_bodies_at_every_split() {
        // What `git fetch` posts to git-upload-pack, chunked the way git's HTTP client does.
        let pkts: &[u8] = b"0032want 0123456789012345678901234567890123456789\n00000009done\n";
        let mut git = format!("{:x}\r\n", pkts.len()).into_bytes();
        git.extend_from_slice(pkts);
        git.extend_from_slice(b"\r\n0\r\n\r\n");
        assert_eq!(check_splits(&git), done(pkts, git.len()));

        let input = b"5;name=value;flag\r\nhello\r\nA \t; ext\r\n0123456789\r\n\
                      0000\r\nX-Trailer: 1\r\nOther: two\r\n\r\n";
        assert_eq!(check_splits(input), done(b"hello0123456789", input.len()));

        let bare_lf = b"5\nhello\n0\n\n";
        assert_eq!(check_splits(bare_lf), done(b"hello", bare_lf.len()));

        let upper = b"fF\r\n".iter().chain(&[b'z'; 255]).chain(b"\r\n0\r\n\r\n");
        let upper: Vec<u8> = upper.copied().collect();
        assert_eq!(check_splits(&upper), done(&[b'z'; 255], upper.len()));
    }

    #[test]
    fn trailing_bytes_are_left_alone() {
        let input = b"1\r\nx\r\n0\r\n\r\nGET / HTTP/1.1\r\n";
        assert_eq!(check_splits(input), done(b"x", 11));
    }

    #[test]
    fn truncated_bodies_never_finish() {
        let input = b"5\r\nhello\r\n0\r\n\r\n";
        for cut in 0..input.len() {
            let out = run(&[&input[..cut]]);
            assert!(!out.done && out.error.is_none(), "cut {cut}");
            assert_eq!(out.consumed, cut);
            assert_eq!(out.body, &b"hello"[..cut.saturating_sub(3).min(5)]);
        }
    }

    #[test]
    fn bad_sizes() {
        for (input, found, offset) in [
            (&b"\r\n"[..], b'\r', 0),
            (b";ext\r\n", b';', 0),
            (b" 5\r\n", b' ', 0),
            (b"-5\r\n", b'-', 0),
            (b"+5\r\n", b'+', 0),
            (b"0x5\r\n", b'x', 1),
            (b"5 5\r\n", b'5', 2),
            (b"5\x00\r\n", 0x00, 1),
            (b"5;a\x01\r\n", 0x01, 3),
            (b"5;a\rb\n", b'b', 0),
            (b"g\r\n", b'g', 0),
        ] {
            let out = check_splits(input);
            if found == b'b' {
                // A CR inside an extension must end the line.
                assert_eq!(out.error, Some(ChunkedError::MissingCrlf { found }));
                continue;
            }
            assert_eq!(
                out.error,
                Some(ChunkedError::BadSize { found, offset }),
                "{}",
                input.escape_ascii()
            );
            assert!(out.body.is_empty());
        }
    }

    #[test]
    fn size_digits_are_bounded() {
        let max = b"ffffffffffffffff\r\nab";
        let out = check_splits(max);
        assert_eq!(out.body, b"ab");
        assert!(!out.done && out.error.is_none());

        let mut dec = ChunkedDecoder::new();
        dec.decode(b"ffffffffffffffff\r\n").unwrap();
        assert_eq!(
            dec.state,
            State::Data {
                remaining: u64::MAX
            }
        );

        // Leading zeros count too: a 17-digit size is refused even if its value is small.
        let out = check_splits(b"00000000000000001\r\nx\r\n");
        assert_eq!(
            out.error,
            Some(ChunkedError::BadSize {
                found: b'1',
                offset: 16
            })
        );
    }

    #[test]
    fn size_line_length_is_bounded() {
        let mut line = b"1;".to_vec();
        line.resize(MAX_SIZE_LINE, b'e');
        line.extend_from_slice(b"\r\nx\r\n0\r\n\r\n");
        let out = whole(&line);
        assert_eq!(out, done(b"x", line.len()));

        let mut long = b"1;".to_vec();
        long.resize(MAX_SIZE_LINE + 1, b'e');
        long.extend_from_slice(b"\r\nx\r\n0\r\n\r\n");
        let out = check_splits(&long);
        assert_eq!(
            out,
            failed(
                b"",
                MAX_SIZE_LINE,
                ChunkedError::SizeLineTooLong {
                    limit: MAX_SIZE_LINE
                }
            )
        );

        // Whitespace after the digits counts as well.
        let mut spaces = b"1".to_vec();
        spaces.resize(MAX_SIZE_LINE + 1, b' ');
        assert_eq!(
            whole(&spaces).error,
            Some(ChunkedError::SizeLineTooLong {
                limit: MAX_SIZE_LINE
            })
        );
    }

    #[test]
    fn data_must_end_with_a_line_end() {
        assert_eq!(
            check_splits(b"3\r\nabcd\r\n0\r\n\r\n"),
            failed(b"abc", 6, ChunkedError::MissingCrlf { found: b'd' })
        );
        assert_eq!(
            check_splits(b"3\r\nabc\rX"),
            failed(b"abc", 7, ChunkedError::MissingCrlf { found: b'X' })
        );
        assert_eq!(
            check_splits(b"3\r\nabc\r\n0\r\r"),
            failed(b"abc", 10, ChunkedError::MissingCrlf { found: b'\r' })
        );
        assert_eq!(
            check_splits(b"0\r\nX-T: 1\r\rb"),
            failed(b"", 10, ChunkedError::MissingCrlf { found: b'\r' })
        );
    }

    #[test]
    fn errors_are_sticky() {
        let mut dec = ChunkedDecoder::new();
        let err = ChunkedError::BadSize {
            found: b'z',
            offset: 0,
        };
        assert_eq!(dec.decode(b"z"), Err(err));
        assert_eq!(dec.decode(b"5\r\nhello\r\n0\r\n\r\n"), Err(err));
        assert!(!dec.is_done());
    }

    #[test]
    fn error_is_reported_by_the_call_starting_at_the_bad_byte() {
        let mut dec = ChunkedDecoder::new();
        assert_eq!(
            dec.decode(b"5x").unwrap(),
            Decoded {
                consumed: 1,
                data: 0..0,
                done: false
            }
        );
        let err = ChunkedError::BadSize {
            found: b'x',
            offset: 1,
        };
        assert_eq!(dec.decode(b"x"), Err(err));

        let mut dec = ChunkedDecoder::new();
        assert_eq!(
            dec.decode(b"2\r\nabX").unwrap(),
            Decoded {
                consumed: 5,
                data: 3..5,
                done: false
            }
        );
        assert_eq!(
            dec.decode(b"X"),
            Err(ChunkedError::MissingCrlf { found: b'X' })
        );
    }

    #[test]
    fn trailers_are_bounded() {
        // Exactly the limit, counting the final empty line, is fine.
        let mut input = b"0\r\n".to_vec();
        let field_len = MAX_TRAILERS - 2 - 2;
        input.extend(std::iter::repeat_n(b'x', field_len));
        input.extend_from_slice(b"\r\n\r\n");
        assert_eq!(whole(&input), done(b"", input.len()));

        let mut over = b"0\r\n".to_vec();
        over.extend(std::iter::repeat_n(b'x', field_len + 1));
        over.extend_from_slice(b"\r\n\r\n");
        assert_eq!(
            check_splits(&over),
            failed(
                b"",
                3 + MAX_TRAILERS,
                ChunkedError::TrailersTooLarge {
                    limit: MAX_TRAILERS
                }
            )
        );

        // Many short lines add up.
        let mut many = b"0\r\n".to_vec();
        for _ in 0..MAX_TRAILERS {
            many.extend_from_slice(b"a:\r\n");
        }
        assert_eq!(
            whole(&many).error,
            Some(ChunkedError::TrailersTooLarge {
                limit: MAX_TRAILERS
            })
        );
    }

    #[test]
    fn huge_chunk_is_streamed_without_overflow() {
        let mut dec = ChunkedDecoder::new();
        let d = dec.decode(b"ffffffffffffffff\r\n").unwrap();
        assert_eq!(d.consumed, 18);
        let block = [7u8; 4096];
        for _ in 0..4 {
            let d = dec.decode(&block).unwrap();
            assert_eq!(
                d,
                Decoded {
                    consumed: 4096,
                    data: 0..4096,
                    done: false
                }
            );
        }
        assert_eq!(
            dec.state,
            State::Data {
                remaining: u64::MAX - 4 * 4096
            }
        );
    }
}
