//! `git-lfs-transfer` message decoder: any byte stream, fed in any split, never panics, always
//! makes progress, gives the same events however it is split, and only hands out body data
//! between a `put-object` header and its end. Seeds in `fuzz/corpus/lfs_transfer/` are the
//! messages git-lfs 3.3 sends (as seen with `GIT_TRACE_PACKET=1`) plus a few malformed ones.
#![no_main]

use gitplane_wire::ssh::lfs_transfer::{Decoder, Event, Step};
use libfuzzer_sys::fuzz_target;

/// Decodes `data` arriving in pieces of `step` bytes; returns the events as text and whether a
/// framing error ended the stream.
fn run(data: &[u8], step: usize) -> (Vec<String>, bool) {
    let mut dec = Decoder::new(8);
    let mut buf: Vec<u8> = Vec::new();
    let mut fed = 0;
    let mut events = Vec::new();
    let mut in_body = false;
    loop {
        match dec.decode(&buf) {
            Ok(Step::Packet { consumed, event }) => {
                assert!((4..=buf.len()).contains(&consumed));
                if let Some(e) = event {
                    match &e {
                        Event::PutObject { .. } => {
                            assert!(!in_body);
                            in_body = true;
                        }
                        Event::Data(_) => assert!(in_body),
                        Event::DataEnd | Event::Invalid(_) => in_body = false,
                        Event::Request(_) => assert!(!in_body),
                    }
                    events.push(format!("{e:?}"));
                }
                buf.drain(..consumed);
            }
            Ok(Step::Incomplete { needed }) => {
                assert!(needed > 0);
                if fed == data.len() {
                    return (events, false);
                }
                let end = (fed + step).min(data.len());
                buf.extend_from_slice(&data[fed..end]);
                fed = end;
            }
            Err(_) => return (events, true),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&split, data)) = data.split_first() else {
        return;
    };
    let whole = run(data, data.len().max(1));
    let pieces = run(data, usize::from(split % 17) + 1);
    assert_eq!(whole, pieces);
});
