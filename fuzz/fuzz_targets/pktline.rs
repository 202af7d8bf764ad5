//! Pkt-line codec: decoding a stream packet by packet never panics, stays in bounds, and
//! re-encoding what was decoded gives back the same bytes.
#![no_main]

use gitplane_wire::git::pktline::{
    decode, encode_data, Packet, PktDecode, DELIM, FLUSH, MAX_PKT_LEN, RESPONSE_END,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut pos = 0;
    loop {
        let rest = &data[pos..];
        match decode(rest) {
            Ok(PktDecode::Complete { packet, consumed }) => {
                assert!((4..=MAX_PKT_LEN).contains(&consumed) && consumed <= rest.len());
                let mut again = Vec::new();
                match packet {
                    Packet::Flush => again.extend_from_slice(FLUSH),
                    Packet::Delim => again.extend_from_slice(DELIM),
                    Packet::ResponseEnd => again.extend_from_slice(RESPONSE_END),
                    Packet::Data(payload) => {
                        assert_eq!(payload, &rest[4..consumed]);
                        encode_data(&mut again, payload).unwrap();
                    }
                }
                // Equal but for the case of the hex length.
                assert!(again[..4].eq_ignore_ascii_case(&rest[..4]));
                assert_eq!(again[4..], rest[4..consumed]);
                pos += consumed;
            }
            Ok(PktDecode::Incomplete { needed }) => {
                assert!(needed > 0);
                // Once the length is known, exactly `needed` more bytes complete the packet.
                let mut longer = rest.to_vec();
                longer.resize(rest.len() + needed, b'0');
                let after = decode(&longer);
                if rest.len() >= 4 {
                    assert!(
                        matches!(after, Ok(PktDecode::Complete { consumed, .. }) if consumed == longer.len())
                    );
                }
                break;
            }
            Err(_) => break,
        }
    }
});
