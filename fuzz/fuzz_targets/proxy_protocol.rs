//! PROXY protocol header parser: never panics, never claims more bytes than it was given or
//! than a header may have, and agrees with itself on every prefix of a complete header.
#![no_main]

use gitplane_wire::net::proxy_protocol::{parse, ProxyParse, MAX_HEADER};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let whole = parse(data);
    match whole {
        Ok(ProxyParse::Complete { consumed, .. }) => {
            assert!(consumed <= data.len() && consumed <= MAX_HEADER);
            assert_eq!(parse(&data[..consumed]), whole);
            for cut in [0, consumed / 2, consumed.saturating_sub(1)] {
                if cut < consumed {
                    assert_eq!(parse(&data[..cut]), Ok(ProxyParse::Incomplete), "prefix {cut}");
                }
            }
        }
        Ok(ProxyParse::Incomplete) => assert!(data.len() < MAX_HEADER),
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
