//! The v2 ls-refs request parser: never panics, and what it accepts means the same once written
//! out again in the canonical order (command, delimiter, flags, prefixes, flush).
#![no_main]

use gitplane_wire::git::ls_refs::parse_request;
use gitplane_wire::git::pktline::{encode_data, DELIM, FLUSH};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(request) = parse_request(data) else {
        return;
    };
    let mut again = Vec::new();
    encode_data(&mut again, b"command=ls-refs\n").unwrap();
    again.extend_from_slice(DELIM);
    for (on, name) in [
        (request.peel, &b"peel\n"[..]),
        (request.symrefs, b"symrefs\n"),
        (request.unborn, b"unborn\n"),
    ] {
        if on {
            encode_data(&mut again, name).unwrap();
        }
    }
    for prefix in &request.prefixes {
        assert!(!prefix.contains(&0));
        encode_data(&mut again, &[b"ref-prefix ", *prefix, b"\n"].concat()).unwrap();
    }
    again.extend_from_slice(FLUSH);
    assert_eq!(parse_request(&again).as_ref(), Ok(&request));
});
