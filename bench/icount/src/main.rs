//! `gitplane-icount`: runs one hot path a fixed number of times over fixed inputs, so that
//! `bench/icount.sh` can count its instructions under valgrind's callgrind.
//!
//! ```text
//! gitplane-icount list         # NAME<TAB>ITERATIONS<TAB>WHAT, one case a line
//! gitplane-icount run NAME     # set up, one warm-up pass, then ITERATIONS measured passes
//! ```
//!
//! Only [`gitplane_icount_measured`] is counted: icount.sh passes
//! `--toggle-collect=gitplane_icount_measured`, so process start-up, building the inputs and the
//! warm-up pass (first-use allocations, CPU feature detection) are outside the figure.

use std::hint::black_box;
use std::process::ExitCode;

use gitplane_icount::inputs;
use gitplane_icount::paths::{self, LfsBatch};
use gitplane_wire::http::head::HeadLimits;

type Pass = Box<dyn FnMut() -> u64>;

struct Case {
    name: &'static str,
    iterations: u32,
    what: &'static str,
    setup: fn() -> Pass,
}

const CASES: &[Case] = &[
    Case {
        name: "http_head/upload-pack-post",
        iterations: 2000,
        what: "parse a 327-byte smart HTTP POST head",
        setup: || {
            let limits = HeadLimits::default();
            Box::new(move || paths::http_head(black_box(inputs::UPLOAD_PACK_POST_HEAD), &limits))
        },
    },
    Case {
        name: "http_head/info-refs-get",
        iterations: 2000,
        what: "parse a 203-byte info/refs GET head",
        setup: || {
            let limits = HeadLimits::default();
            Box::new(move || paths::http_head(black_box(inputs::INFO_REFS_GET_HEAD), &limits))
        },
    },
    Case {
        name: "chunked/64KiB-1KiB-chunks",
        iterations: 200,
        what: "decode a 64 KiB body sent as 1 KiB chunks",
        setup: || {
            let framed = inputs::chunked(&inputs::bytes(64 << 10), 1024);
            Box::new(move || paths::chunked_decode(black_box(&framed)))
        },
    },
    Case {
        name: "pktline/decode-negotiation-1000",
        iterations: 100,
        what: "decode 1000 want/have pkt-lines and a flush",
        setup: || {
            let buf = inputs::negotiation(1000);
            Box::new(move || paths::pktline_decode_all(black_box(&buf)))
        },
    },
    Case {
        name: "pktline/encode-negotiation-1000",
        iterations: 100,
        what: "encode 1000 have lines as pkt-lines into a reused buffer",
        setup: || {
            let lines = inputs::have_lines(1000);
            let mut out = Vec::new();
            Box::new(move || paths::pktline_encode(&mut out, black_box(&lines)))
        },
    },
    Case {
        name: "repo_name/parse-16",
        iterations: 2000,
        what: "validate 16 repository names (8 valid, 8 rejected)",
        setup: || Box::new(|| paths::repo_names(black_box(&inputs::REPO_NAMES))),
    },
    Case {
        name: "grpc_frame/100-messages",
        iterations: 100,
        what: "read 100 gRPC messages (40-2000 B) fed as 16 KiB DATA frames",
        setup: || {
            let stream = inputs::grpc_stream(100);
            Box::new(move || paths::grpc_messages(black_box(&stream), 16 << 10))
        },
    },
    Case {
        name: "lfs_batch/upload-100",
        iterations: 20,
        what: "LFS batch: parse 100-object upload JSON, check, answer, serialise",
        setup: || {
            let batch = LfsBatch::upload(100);
            Box::new(move || black_box(&batch).run().len() as u64)
        },
    },
    Case {
        name: "lfs_transfer/upload-session-100",
        iterations: 50,
        what: "git-lfs-transfer: version, batch of 100, put-object of 64 KiB, verify, quit",
        setup: || {
            let session = inputs::lfs_transfer_session(100, 64 << 10, 16 << 10);
            Box::new(move || paths::lfs_transfer_decode(black_box(&session), 1000))
        },
    },
    Case {
        name: "sha256/256KiB-sha2-direct",
        iterations: 8,
        what: "SHA-256 of 256 KiB in 64 KiB updates, sha2 crate directly (no buffer pool)",
        setup: || {
            let data = inputs::bytes(256 << 10);
            Box::new(move || u64::from(paths::sha256_stream(black_box(&data), 64 << 10)[0]))
        },
    },
];

/// The counted region: `iterations` passes of `pass`. Not inlined and not mangled, so that
/// callgrind's `--toggle-collect` finds it by this exact name.
#[unsafe(no_mangle)]
#[inline(never)]
pub fn gitplane_icount_measured(pass: &mut dyn FnMut() -> u64, iterations: u32) -> u64 {
    let mut acc = 0u64;
    for _ in 0..iterations {
        acc = acc.wrapping_add(black_box(pass()));
    }
    acc
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["list"] => {
            for c in CASES {
                println!("{}\t{}\t{}", c.name, c.iterations, c.what);
            }
            ExitCode::SUCCESS
        }
        ["run", name] => match CASES.iter().find(|c| c.name == name) {
            Some(c) => {
                let mut pass = (c.setup)();
                // Warm-up, outside the counted region: the first pass pays one-off costs
                // (allocator growth, lazily detected CPU features) that later passes do not.
                let expect = pass();
                let acc = gitplane_icount_measured(&mut pass, c.iterations);
                // Every pass must produce the same result, or the passes did different work.
                assert_eq!(
                    acc,
                    expect.wrapping_mul(u64::from(c.iterations)),
                    "{name}: passes disagree"
                );
                ExitCode::SUCCESS
            }
            None => {
                eprintln!(
                    "gitplane-icount: unknown case `{name}`; `gitplane-icount list` names them"
                );
                ExitCode::from(2)
            }
        },
        _ => {
            eprintln!("usage: gitplane-icount list | gitplane-icount run NAME");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_case_runs_and_repeats() {
        for c in CASES {
            let mut pass = (c.setup)();
            let one = pass();
            assert_eq!(
                gitplane_icount_measured(&mut pass, 2),
                one.wrapping_mul(2),
                "{}",
                c.name
            );
        }
    }

    #[test]
    fn case_names_are_unique_and_plain() {
        let mut names: Vec<_> = CASES.iter().map(|c| c.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), CASES.len());
        // icount.sh splits `list` output on tabs and baseline lines on spaces.
        assert!(names.iter().all(|n| !n.contains(char::is_whitespace)));
    }
}
