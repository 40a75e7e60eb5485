//! Micro-benchmarks of the per-round planning work: dirty bitmap to coalesced ranges,
//! and ranges to a per-channel plan, for a 4 GiB guest (1 Mi pages) with sparse,
//! clustered and dense dirty sets.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ferry_engine::bitmap::DirtyBitmap;
use ferry_engine::plan::{plan, ranges_of, DEFAULT_CHUNK_PAGES};

const PAGES: u64 = 1 << 20;

fn dirty_set(kind: &str) -> DirtyBitmap {
    let mut b = DirtyBitmap::new(PAGES);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    match kind {
        // 1 % of pages, scattered: the worst case for coalescing.
        "sparse-1pct" => (0..PAGES / 100).for_each(|_| b.set(next() % PAGES)),
        // 64-page clusters covering ~10 %.
        "clustered-10pct" => (0..PAGES / 640).for_each(|_| b.set_range(next() % PAGES, 64)),
        // Everything: round 1.
        _ => b.set_range(0, PAGES),
    }
    b
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("round-planning-4GiB");
    for kind in ["sparse-1pct", "clustered-10pct", "full"] {
        let b = dirty_set(kind);
        g.throughput(Throughput::Elements(PAGES));
        g.bench_with_input(BenchmarkId::new("bitmap-to-ranges", kind), &b, |bn, b| {
            bn.iter(|| ranges_of(black_box(std::slice::from_ref(b))))
        });
        let ranges = ranges_of(std::slice::from_ref(&b));
        g.bench_with_input(
            BenchmarkId::new("plan-4-channels", kind),
            &ranges,
            |bn, r| bn.iter(|| plan(black_box(r), 4, DEFAULT_CHUNK_PAGES)),
        );
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
