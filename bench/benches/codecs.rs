//! Criterion benches of the sans-I/O codecs on the request and response paths, with throughput
//! in bytes so figures compare across input sizes: pkt-line decode/encode (every Git
//! conversation), HTTP request-head parse (every request), chunked decode (pushes through
//! proxies), gzip request-body inflation (git gzips large negotiation bodies), and SHA-256
//! streaming in 64 KiB buffers (LFS uploads are hashed as they stream).

use std::io::Write;

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use gitplane::git::pktline::{self, PktDecode};
use gitplane::http::chunked::ChunkedDecoder;
use gitplane::http::head::{parse_request_head, HeadLimits, HeadParse};
use sha2::{Digest, Sha256};

/// A realistic v2 fetch negotiation: `want`/`have` lines of 40-hex ids, as git sends them.
fn negotiation(lines: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..lines {
        let verb = if i % 4 == 0 { "want" } else { "have" };
        let line = format!("{verb} {:040x}\n", i as u128 * 0x9e37_79b9_7f4a_7c15);
        pktline::encode_str(&mut out, &line).expect("short line");
    }
    out.extend_from_slice(pktline::FLUSH);
    out
}

/// Side-band pack data: full-size packets, as upload-pack streams a pack.
fn sideband(bytes: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes + bytes / 100);
    let mut payload = vec![0x5a; pktline::MAX_PAYLOAD_LEN];
    payload[0] = 1;
    while out.len() < bytes {
        pktline::encode_data(&mut out, &payload).expect("max payload");
    }
    out
}

fn decode_all(mut buf: &[u8]) -> usize {
    let mut n = 0;
    while let Ok(PktDecode::Complete { consumed, .. }) = pktline::decode(buf) {
        n += 1;
        buf = &buf[consumed..];
    }
    n
}

fn pktline_benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("pktline");
    for (name, input) in [
        ("decode/negotiation-1000", negotiation(1000)),
        ("decode/sideband-4MiB", sideband(4 << 20)),
    ] {
        g.throughput(Throughput::Bytes(input.len() as u64));
        g.bench_function(name, |b| b.iter(|| decode_all(black_box(&input))));
    }
    let lines: Vec<String> = (0..1000).map(|i| format!("have {i:040x}\n")).collect();
    let bytes: usize = lines.iter().map(|l| l.len() + 4).sum();
    g.throughput(Throughput::Bytes(bytes as u64));
    let mut out = Vec::with_capacity(bytes);
    g.bench_function("encode/negotiation-1000", |b| {
        b.iter(|| {
            out.clear();
            for l in &lines {
                pktline::encode_str(&mut out, black_box(l)).expect("short line");
            }
            out.len()
        })
    });
    g.finish();
}

fn head_benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("http_head");
    let limits = HeadLimits::default();
    let heads: [(&str, &[u8]); 2] = [
        (
            "git-upload-pack-post",
            b"POST /acme/widgets.git/git-upload-pack HTTP/1.1\r\nHost: git.example.com\r\n\
User-Agent: git/2.47.3\r\nAccept-Encoding: deflate, gzip\r\n\
Authorization: Basic YWRtaW46c2VjcmV0LXBhc3N3b3Jk\r\n\
Content-Type: application/x-git-upload-pack-request\r\n\
Accept: application/x-git-upload-pack-result\r\nGit-Protocol: version=2\r\n\
Content-Length: 1234\r\n\r\n",
        ),
        (
            "info-refs-get",
            b"GET /acme/widgets.git/info/refs?service=git-upload-pack HTTP/1.1\r\n\
Host: git.example.com\r\nUser-Agent: git/2.47.3\r\nAccept: */*\r\n\
Accept-Encoding: deflate, gzip\r\nGit-Protocol: version=2\r\nPragma: no-cache\r\n\r\n",
        ),
    ];
    for (name, raw) in heads {
        g.throughput(Throughput::Bytes(raw.len() as u64));
        g.bench_function(name, |b| {
            b.iter(|| match parse_request_head(black_box(raw), &limits) {
                Ok(HeadParse::Complete { consumed, .. }) => consumed,
                other => panic!("head did not parse: {other:?}"),
            })
        });
    }
    g.finish();
}

/// `body` framed as chunks of `chunk` bytes, as git sends a pushed pack through a proxy.
fn chunked(body: &[u8], chunk: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + body.len() / chunk * 10 + 16);
    for piece in body.chunks(chunk) {
        write!(out, "{:x}\r\n", piece.len()).expect("vec");
        out.extend_from_slice(piece);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

fn chunked_benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("chunked_decode");
    let body = vec![0xa5u8; 4 << 20];
    for chunk in [1024usize, 65536] {
        let framed = chunked(&body, chunk);
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_with_input(BenchmarkId::new("4MiB", chunk), &framed, |b, framed| {
            b.iter(|| {
                let mut dec = ChunkedDecoder::new();
                let mut input = &framed[..];
                let mut data = 0;
                while !dec.is_done() {
                    let d = dec.decode(input).expect("valid framing");
                    data += d.data.len();
                    input = &input[d.consumed..];
                }
                data
            })
        });
    }
    g.finish();
}

fn gzip_benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("gzip_body_decode");
    let plain = negotiation(20_000);
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(&plain).expect("vec");
    let compressed = enc.finish().expect("vec");
    // Throughput of inflated bytes: what the server hands to git.
    g.throughput(Throughput::Bytes(plain.len() as u64));
    g.bench_function("negotiation-1KiB-steps", |b| {
        // As the server does (http::body): 1 KiB writes into a GzDecoder, output drained each time.
        b.iter(|| {
            let mut gz = flate2::write::GzDecoder::new(Vec::with_capacity(8192));
            let mut total = 0;
            for piece in compressed.chunks(1024) {
                gz.write_all(piece).expect("valid gzip");
                total += gz.get_ref().len();
                gz.get_mut().clear();
            }
            gz.try_finish().expect("valid gzip");
            total + gz.get_ref().len()
        })
    });
    g.finish();
}

fn sha256_benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("sha256_stream");
    let data = vec![0x3cu8; 8 << 20];
    for buf in [16 * 1024usize, 64 * 1024, 1 << 20] {
        g.throughput(Throughput::Bytes(data.len() as u64));
        g.bench_with_input(BenchmarkId::new("8MiB", buf), &buf, |b, &buf| {
            b.iter(|| {
                let mut h = Sha256::new();
                for piece in data.chunks(buf) {
                    h.update(piece);
                }
                h.finalize()
            })
        });
    }
    g.finish();
}

criterion_group!(
    benches,
    pktline_benches,
    head_benches,
    chunked_benches,
    gzip_benches,
    sha256_benches
);
criterion_main!(benches);
