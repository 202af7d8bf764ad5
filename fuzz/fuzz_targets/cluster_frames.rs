//! The cluster transport's header and frame parsers: never panic, refuse what is not allowed
//! (arguments, variables, services, sizes), and a decoded header encodes back to one that
//! decodes the same.
#![no_main]

use gitplane_wire::cluster::{parse_exit, parse_frame_head, Header, Kind, FRAME_HEAD, MAX_FRAME};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = Header::decode(data) {
        assert!(h
            .args
            .iter()
            .all(|a| a == "--stateless-rpc" || a == "--advertise-refs"));
        assert!(h
            .env
            .iter()
            .all(|(k, _)| k == "GIT_PROTOCOL" || k.starts_with("GITPLANE_")));
        let line = h.encode();
        assert_eq!(Header::decode(&line[..line.len() - 1]).as_ref(), Ok(&h));
    }
    if data.len() >= FRAME_HEAD {
        let mut head = [0u8; FRAME_HEAD];
        head.copy_from_slice(&data[..FRAME_HEAD]);
        if let Ok((kind, len)) = parse_frame_head(head) {
            assert!(len <= MAX_FRAME);
            assert!(kind != Kind::Current || len == 0);
            if kind == Kind::Exit {
                let payload = &data[FRAME_HEAD..];
                if payload.len() >= 4 {
                    assert!(parse_exit(&payload[..4]).is_ok());
                }
            }
        }
    }
});
