//! Criterion benches of the sans-I/O codecs on the request and response paths, with throughput
//! in bytes so figures compare across input sizes: pkt-line decode/encode (every Git
//! conversation), HTTP request-head parse (every request), chunked decode (pushes through
//! proxies), gzip request-body inflation (git gzips large negotiation bodies), and SHA-256
//! streaming in 64 KiB buffers (LFS uploads are hashed as they stream).
//!
//! Inputs and the decode loops come from `gitplane-icount` (`bench/icount`), so these figures and
//! the instruction counts of `bench/icount.sh` are taken on the same bytes through the same code.

use std::io::Write;

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use gitplane::http::head::HeadLimits;
use gitplane_icount::inputs::{self, chunked, negotiation, sideband};
use gitplane_icount::paths;
use sha2::{Digest, Sha256};

fn pktline_benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("pktline");
    for (name, input) in [
        ("decode/negotiation-1000", negotiation(1000)),
        ("decode/sideband-4MiB", sideband(4 << 20)),
    ] {
        g.throughput(Throughput::Bytes(input.len() as u64));
        g.bench_function(name, |b| {
            b.iter(|| paths::pktline_decode_all(black_box(&input)))
        });
    }
    let lines = inputs::have_lines(1000);
    let bytes: usize = lines.iter().map(|l| l.len() + 4).sum();
    g.throughput(Throughput::Bytes(bytes as u64));
    let mut out = Vec::with_capacity(bytes);
    g.bench_function("encode/negotiation-1000", |b| {
        b.iter(|| paths::pktline_encode(&mut out, black_box(&lines)))
    });
    g.finish();
}

fn head_benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("http_head");
    let limits = HeadLimits::default();
    let heads = [
        ("git-upload-pack-post", inputs::UPLOAD_PACK_POST_HEAD),
        ("info-refs-get", inputs::INFO_REFS_GET_HEAD),
    ];
    for (name, raw) in heads {
        g.throughput(Throughput::Bytes(raw.len() as u64));
        g.bench_function(name, |b| {
            b.iter(|| paths::http_head(black_box(raw), &limits))
        });
    }
    g.finish();
}

fn chunked_benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("chunked_decode");
    let body = vec![0xa5u8; 4 << 20];
    for chunk in [1024usize, 65536] {
        let framed = chunked(&body, chunk);
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_with_input(BenchmarkId::new("4MiB", chunk), &framed, |b, framed| {
            b.iter(|| paths::chunked_decode(black_box(framed)))
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
