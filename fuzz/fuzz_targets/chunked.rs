//! Chunked decoder: never panics, returns the same body however the input is split, and
//! decodes exactly what an encoder produced.
#![no_main]

use gitplane_wire::http::chunked::{ChunkedDecoder, ChunkedError};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    body: Vec<u8>,
    done: bool,
    consumed: usize,
    error: Option<ChunkedError>,
}

/// Feeds `pieces` one after another, keeping unconsumed bytes buffered as a socket reader would.
fn run(pieces: &[&[u8]]) -> Outcome {
    let mut dec = ChunkedDecoder::new();
    let mut buf = Vec::new();
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
                    assert!(d.data.start <= d.data.end && d.data.end <= d.consumed);
                    assert_eq!(d.done, dec.is_done());
                    out.body.extend_from_slice(&buf[d.data.clone()]);
                    buf.drain(..d.consumed);
                    out.consumed += d.consumed;
                    if d.done {
                        let again = dec.decode(&buf).unwrap();
                        assert_eq!((again.consumed, again.data.len(), again.done), (0, 0, true));
                        out.done = true;
                        return out;
                    }
                    if d.consumed == 0 && d.data.is_empty() {
                        break;
                    }
                }
                Err(e) => {
                    // Errors are sticky.
                    assert_eq!(dec.decode(b"0\r\n\r\n"), Err(e));
                    out.error = Some(e);
                    return out;
                }
            }
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, input)) = data.split_first() else {
        return;
    };

    // Any input: one piece, two pieces split at a data-derived point, and (when short) byte by
    // byte all give the same outcome.
    let whole = run(&[input]);
    let cut = usize::from(selector) * input.len() / 255;
    let (a, b) = input.split_at(cut);
    assert_eq!(run(&[a, b]), whole, "split at {cut}");
    if input.len() <= 512 {
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(run(&bytes), whole, "byte by byte");
    }

    // The input as a body: encode it with chunk sizes and extensions taken from the data, then
    // decode it back.
    let mut encoded = Vec::new();
    let mut rest = input;
    let mut sizes = input.iter().cycle().map(|&b| usize::from(b) % 64 + 1);
    while !rest.is_empty() {
        let n = sizes.next().unwrap_or(1).min(rest.len());
        let (chunk, tail) = rest.split_at(n);
        let ext = if selector & 1 == 1 { ";x=\"y\"" } else { "" };
        let crlf = if selector & 2 == 2 { "\n" } else { "\r\n" };
        encoded.extend_from_slice(format!("{n:X}{ext}{crlf}").as_bytes());
        encoded.extend_from_slice(chunk);
        encoded.extend_from_slice(crlf.as_bytes());
        rest = tail;
    }
    encoded.extend_from_slice(b"0\r\nTrailer: t\r\n\r\n");
    let decoded = run(&[
        &encoded[..cut.min(encoded.len())],
        &encoded[cut.min(encoded.len())..],
    ]);
    assert_eq!(
        decoded,
        Outcome {
            body: input.to_vec(),
            done: true,
            consumed: encoded.len(),
            error: None
        }
    );
});
