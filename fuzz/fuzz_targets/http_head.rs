//! Request-head parser: never panics, and its answer is consistent across how much of the
//! stream has arrived (a complete head's prefixes are all incomplete, and re-parsing exactly the
//! head gives the same result).
#![no_main]

use gitplane_wire::http::forwarded::{client_addr, IpRange};
use gitplane_wire::http::head::{parse_request_head, HeadLimits, HeadParse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Small limits as well as the defaults, so short inputs reach the limit paths too.
    let small = HeadLimits {
        max_head_bytes: 256,
        max_headers: 4,
    };
    for limits in [HeadLimits::default(), small] {
        check(data, &limits);
    }
});

fn check(data: &[u8], limits: &HeadLimits) {
    let whole = parse_request_head(data, limits);
    // A prefix length derived from the input, so the fuzzer can steer it.
    let pick = |len: usize| {
        let seed = data
            .iter()
            .fold(0usize, |h, &b| h.wrapping_mul(31).wrapping_add(b.into()));
        if len == 0 {
            0
        } else {
            seed % len
        }
    };
    match &whole {
        Ok(HeadParse::Complete { head, consumed }) => {
            let consumed = *consumed;
            assert!(consumed <= data.len() && consumed <= limits.max_head_bytes);
            assert!(head.path.starts_with('/'));
            assert!(!head.path.bytes().any(|b| b.is_ascii_control()));
            assert!(!head.expect_continue || !head.http10);
            assert_eq!(parse_request_head(&data[..consumed], limits), whole);
            check_forwarded(head.x_forwarded_for.as_deref());
            let cut = pick(consumed);
            assert_eq!(
                parse_request_head(&data[..cut], limits),
                Ok(HeadParse::Incomplete),
                "prefix {cut} of a complete head"
            );
        }
        Ok(HeadParse::Incomplete) => {
            assert!(data.len() < limits.max_head_bytes);
            let cut = pick(data.len());
            assert_eq!(
                parse_request_head(&data[..cut], limits),
                Ok(HeadParse::Incomplete),
                "prefix {cut} of an incomplete head"
            );
        }
        Err(e) => {
            assert!(matches!(e.status(), 400 | 415 | 417 | 431 | 501), "{e:?}");
            let _ = e.to_string();
        }
    }
}

/// The client address taken from `X-Forwarded-For` is the peer or one of the header's entries,
/// and never one that only an untrusted hop could have written.
fn check_forwarded(header: Option<&str>) {
    let peer: std::net::IpAddr = [10, 0, 0, 1].into();
    let trusted: Vec<IpRange> = ["10.0.0.0/8", "fd00::/8"]
        .iter()
        .map(|r| r.parse().unwrap())
        .collect();
    let got = client_addr(peer, header, &trusted);
    let entries: Vec<std::net::IpAddr> = header
        .unwrap_or("")
        .split(',')
        .filter_map(|e| e.trim().parse().ok())
        .map(|a: std::net::IpAddr| a.to_canonical())
        .collect();
    assert!(got == peer || entries.contains(&got), "{got} from {header:?}");
    assert_eq!(client_addr(peer, header, &[]), peer);
}
