//! gRPC message framing: decoding never panics, stays in bounds, honours the size limit, and a
//! stream split anywhere into two DATA chunks yields the same messages (or the same error) as
//! the stream in one piece. The `grpc-timeout` parser is fed the same bytes.
//!
//! Input: one control byte (bits 0-1: size limit, bit 2: gzip allowed, bits 3-7: split point),
//! then the stream bytes.
#![no_main]

use gitplane_wire::rpc::frame::{decode, Decoded, Encoding, FrameError, MessageReader, PREFIX_LEN};
use gitplane_wire::rpc::status::parse_timeout;
use libfuzzer_sys::fuzz_target;

fn read_all(
    chunks: &[&[u8]],
    max: usize,
    encoding: Encoding,
) -> (Vec<Vec<u8>>, Option<FrameError>) {
    let mut r = MessageReader::new(max, encoding);
    let mut out = Vec::new();
    for c in chunks {
        r.push(c);
        loop {
            match r.next_message() {
                Ok(Some(m)) => {
                    assert!(m.len() <= max);
                    out.push(m.to_vec());
                }
                Ok(None) => break,
                Err(e) => return (out, Some(e)),
            }
        }
    }
    (out, r.finish().err())
}

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, stream)) = data.split_first() else {
        return;
    };
    let max = [0usize, 16, 1024, 4 << 20][usize::from(ctl & 3)];
    let encoding = if ctl & 4 != 0 {
        Encoding::Gzip
    } else {
        Encoding::Identity
    };
    match decode(stream, max) {
        Ok(Decoded::Complete {
            payload, consumed, ..
        }) => {
            assert_eq!(consumed, PREFIX_LEN + payload.len());
            assert!(consumed <= stream.len() && payload.len() <= max);
            assert_eq!(payload, &stream[PREFIX_LEN..consumed]);
        }
        Ok(Decoded::Incomplete { needed }) => {
            assert!(needed > 0);
            // Exactly `needed` more bytes complete a frame whose prefix is known.
            if stream.len() >= PREFIX_LEN {
                let mut longer = stream.to_vec();
                longer.resize(stream.len() + needed, 0);
                assert!(matches!(
                    decode(&longer, max),
                    Ok(Decoded::Complete { consumed, .. }) if consumed == longer.len()
                ));
            }
        }
        Err(_) => {}
    }
    let split = usize::from(ctl >> 3) * stream.len() / 31;
    let whole = read_all(&[stream], max, encoding);
    let (a, b) = stream.split_at(split.min(stream.len()));
    assert_eq!(read_all(&[a, b], max, encoding), whole);
    if let Ok(text) = std::str::from_utf8(stream) {
        let _ = parse_timeout(text);
    }
});
