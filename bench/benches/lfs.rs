//! Criterion benches of the two LFS hot paths that are not I/O:
//!
//! - `lfs_batch`: an `objects/batch` round without the store and the socket: parse a git-lfs
//!   upload request with serde_json, check it, answer every object (a quarter are already
//!   linked, the rest get upload and verify actions), serialise the answer. Throughput in
//!   objects.
//! - `lfs_upload_sha256`: the upload loop's per-chunk work on a shard: take a buffer from the
//!   pinned [`BufferPool`], fill it whole (a memcpy here, where the server's socket read copies),
//!   hash it, give it back; beside it the same loop through one reused heap buffer, to show what
//!   the pool costs. Throughput in object bytes.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use gitplane::lfs::pool::BufferPool;
use gitplane_icount::inputs;
use gitplane_icount::paths::LfsBatch;
use sha2::{Digest, Sha256};

fn batch_benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("lfs_batch");
    for objects in [100, 1000] {
        let batch = LfsBatch::upload(objects);
        g.throughput(Throughput::Elements(batch.objects() as u64));
        g.bench_with_input(
            BenchmarkId::new("upload", format!("{objects}-objects")),
            &batch,
            |b, batch| b.iter(|| batch.run().len()),
        );
    }
    g.finish();
}

/// The server's default pool buffer (`lfs.buffer_kib` = 256).
const BUFFER: usize = 256 << 10;

fn sha256_benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("lfs_upload_sha256");
    let object = inputs::bytes(8 << 20);
    g.throughput(Throughput::Bytes(object.len() as u64));
    let pool = BufferPool::new(BUFFER, 32);
    assert_eq!(pool.stats().1, 32, "pool allocation failed");
    g.bench_function("8MiB/pool-256KiB", |b| {
        b.iter(|| {
            let mut h = Sha256::new();
            for piece in black_box(&object).chunks(BUFFER) {
                // As the upload loop takes its spare buffer (the first comes from `acquire`,
                // which returns at once when one is free, as here).
                let mut buf = pool
                    .try_acquire()
                    .expect("one buffer is taken and given back per chunk");
                buf.fill_from(piece);
                h.update(buf.filled());
            }
            h.finalize()
        })
    });
    let mut heap = vec![0u8; BUFFER];
    g.bench_function("8MiB/heap-256KiB", |b| {
        b.iter(|| {
            let mut h = Sha256::new();
            for piece in black_box(&object).chunks(BUFFER) {
                heap[..piece.len()].copy_from_slice(piece);
                h.update(&heap[..piece.len()]);
            }
            h.finalize()
        })
    });
    g.finish();
}

criterion_group!(benches, batch_benches, sha256_benches);
criterion_main!(benches);
