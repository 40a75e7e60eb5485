//! Micro-benchmarks of the per-page work on guest memory, per core: finding an all-zero
//! page (what skipping zero pages over RDMA would cost the source: a read of every page),
//! hashing pages (XXH3-64, the per-page check), and a region's digest.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ferry_engine::digest::{is_zero, page_hash, region_digest};
use ferry_engine::PAGE_SIZE;

/// 64 MiB: larger than the caches, so memory bandwidth counts as it would on a guest.
const BYTES: usize = 64 << 20;

fn random_bytes() -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..BYTES / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect()
}

fn pages(c: &mut Criterion) {
    let zero = vec![0u8; BYTES];
    let data = random_bytes();
    let mut g = c.benchmark_group("pages-64MiB");
    g.throughput(Throughput::Bytes(BYTES as u64));
    g.sample_size(20);
    g.bench_function("is_zero (all zero: every byte read)", |b| {
        b.iter(|| {
            black_box(&zero)
                .chunks(PAGE_SIZE as usize)
                .filter(|p| is_zero(p))
                .count()
        });
    });
    g.bench_function("page_hash", |b| {
        b.iter(|| {
            black_box(&data)
                .chunks(PAGE_SIZE as usize)
                .fold(0u64, |a, p| a ^ page_hash(p))
        });
    });
    g.bench_function("region_digest", |b| {
        b.iter(|| region_digest(black_box(&data)));
    });
    g.finish();
}

criterion_group!(benches, pages);
criterion_main!(benches);
