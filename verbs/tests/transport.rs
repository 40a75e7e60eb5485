//! The RDMA transport ([`RdmaExport`] / [`RdmaPuller`]) against a real RDMA
//! device: run inside the SoftRoCE guest by `scripts/rdma-tests.sh` (one `rxe0`
//! on `lo` serves both ends).
//!
//! Each test is `#[ignore]`d, so a host without RDMA lists it as ignored rather than
//! passed; `scripts/rdma-tests.sh` runs them with `--include-ignored`, and an explicitly
//! requested test that finds no device fails.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ferry_engine::plan::PageRange;
use ferry_engine::transport::TransportError;
use ferry_proto::mem::GuestRegion;
use ferry_verbs::{RdmaExport, RdmaPuller};

const PAGE: u64 = 4096;
const MIB: u64 = 1 << 20;
const STALL: Duration = Duration::from_secs(10);

/// Fails the test unless this run has an RDMA device.
fn require_rdma() {
    match ferry_verbs::Context::open_first() {
        Ok(_) => {}
        Err(e) if e.is_no_rdma() => {
            panic!("this test needs an RDMA device and there is none: {e}")
        }
        Err(e) => panic!("cannot open the RDMA device: {e}"),
    }
}

/// Guest RAM like a VMM's: memfd-backed shared mappings (fds kept open).
struct Ram {
    regions: Vec<GuestRegion>,
    _fds: Vec<OwnedFd>,
}

impl Ram {
    fn new(sizes: &[u64]) -> Ram {
        let (regions, fds) = sizes
            .iter()
            .enumerate()
            .map(|(i, &s)| GuestRegion::create(&format!("ferry-test-{i}"), s).expect("memfd"))
            .unzip();
        Ram { regions, _fds: fds }
    }

    /// Fill every region with a position-dependent pattern. No RDMA may be
    /// writing these regions meanwhile.
    fn fill(&self, seed: u64) {
        for (r, region) in self.regions.iter().enumerate() {
            let p = region.as_ptr().cast::<u64>();
            for i in 0..region.len() / 8 {
                let v = ((i as u64) ^ seed ^ ((r as u64) << 40))
                    .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                    .rotate_left(23);
                // SAFETY: `i * 8 + 8 <= len`, page-aligned mapping (so u64
                // aligned); no device access is in flight.
                unsafe { p.add(i).write(v) };
            }
        }
    }

    /// Region `r` as bytes.
    ///
    /// # Safety
    /// Nothing (NIC or thread) writes the region while the slice lives.
    unsafe fn bytes(&self, r: usize) -> &[u8] {
        // SAFETY: forwarded to the caller.
        unsafe { self.regions[r].as_slice() }
    }

    /// Pages (region, page) where `self` and `other` differ.
    fn differing_pages(&self, other: &Ram) -> Vec<(u32, u64)> {
        let mut out = Vec::new();
        for r in 0..self.regions.len() {
            // SAFETY: called only when no pull is running.
            let (a, b) = unsafe { (self.bytes(r), other.bytes(r)) };
            for (i, (pa, pb)) in a
                .chunks(PAGE as usize)
                .zip(b.chunks(PAGE as usize))
                .enumerate()
            {
                if pa != pb {
                    out.push((r as u32, i as u64));
                }
            }
        }
        out
    }

    /// Copy `range` from `src` by CPU (the TCP fallback's job, simulated).
    fn copy_from(&self, src: &Ram, range: &PageRange) {
        let r = range.region as usize;
        let from = src.regions[r]
            .pages_ptr(range.first, range.count)
            .expect("range inside the source region");
        let to = self.regions[r]
            .pages_ptr(range.first, range.count)
            .expect("range inside the destination region");
        // SAFETY: both are valid for `count` pages of distinct mappings; no
        // RDMA is in flight (the puller destroyed its QPs on failure).
        unsafe { std::ptr::copy_nonoverlapping(from, to, (range.count * PAGE) as usize) };
    }
}

/// Mebibytes of pinned memory of this process (`VmPin` in /proc/self/status):
/// every non-ODP memory registration pins its pages.
fn pinned_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmPin:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmPin in /proc/self/status")
}

/// Export `src` over `channels` QPs and connect a puller into `dst`, with
/// registrations split into pieces (20 MiB at the source, 12 MiB at the
/// destination) so that reads are cut at different boundaries on each side.
fn connect(src: &Ram, dst: &Ram, channels: usize) -> (RdmaExport, RdmaPuller) {
    let mut export =
        RdmaExport::new_with_piece_limit(&src.regions, channels, 20 * MIB).expect("export");
    let offer = export.offer();
    let (puller, answer) =
        RdmaPuller::new_with_piece_limit(&dst.regions, &offer, 12 * MIB).expect("puller");
    export.connect(&answer).expect("export connect");
    assert!(
        export.connect(&answer).is_err(),
        "a second connect is refused"
    );
    assert_eq!(puller.channels(), channels);
    println!(
        "export {} ({} offer bytes), puller {}",
        export.describe(),
        offer.len(),
        puller.describe()
    );
    assert!(export.describe().contains(" gid "), "{}", export.describe());
    (export, puller)
}

fn pages(ranges: &[PageRange]) -> u64 {
    ranges.iter().map(|r| r.count).sum()
}

fn whole(ram: &Ram) -> Vec<PageRange> {
    ram.regions
        .iter()
        .enumerate()
        .map(|(i, r)| PageRange {
            region: i as u32,
            first: 0,
            count: r.npages(),
        })
        .collect()
}

#[test]
#[ignore = "needs an RDMA device: scripts/rdma-tests.sh runs it in the SoftRoCE guest"]
fn pulls_scattered_ranges_and_whole_regions_over_four_qps() {
    require_rdma();
    let sizes = [48 * MIB, 16 * MIB];
    let src = Ram::new(&sizes);
    src.fill(0xfe77);
    let dst = Ram::new(&sizes);
    let (_export, mut puller) = connect(&src, &dst, 4);

    // Scattered ranges: single pages, runs across the 12 MiB / 20 MiB
    // registration boundaries, a run longer than one 1 MiB piece, the last
    // page of each region.
    let r = |region, first, count| PageRange {
        region,
        first,
        count,
    };
    let scattered = vec![
        r(0, 0, 1),
        r(0, 7, 3),
        r(0, 3 * 1024 - 5, 10), // local piece boundary at 12 MiB
        r(0, 5 * 1024 - 2, 4),  // remote piece boundary at 20 MiB
        r(0, 9000, 700),        // > 256 pages: several READs
        r(0, 12 * 1024 - 1, 1),
        r(1, 0, 2),
        r(1, 1000, 1),
        r(1, 4 * 1024 - 1, 1),
    ];
    let got = AtomicU64::new(0);
    let progress = |b: u64| {
        got.fetch_add(b, Ordering::Relaxed);
    };
    let stats = puller
        .pull(&scattered, &progress, STALL)
        .expect("scattered pull");
    assert_eq!(stats.pages, pages(&scattered));
    assert_eq!(stats.bytes, pages(&scattered) * PAGE);
    assert_eq!((stats.zero_pages, stats.torn.len()), (0, 0));
    assert_eq!(got.load(Ordering::Relaxed), stats.bytes);
    // Exactly the scattered pages arrived, nothing else was touched.
    let mut want: Vec<(u32, u64)> = Vec::new();
    for (reg, region) in src.regions.iter().enumerate() {
        for p in 0..region.npages() {
            if !scattered
                .iter()
                .any(|s| s.region == reg as u32 && (s.first..s.end()).contains(&p))
            {
                want.push((reg as u32, p));
            }
        }
    }
    assert_eq!(
        src.differing_pages(&dst),
        want,
        "only the scattered pages match"
    );

    // Whole regions.
    let all = whole(&src);
    got.store(0, Ordering::Relaxed);
    let t0 = Instant::now();
    let stats = puller.pull(&all, &progress, STALL).expect("whole pull");
    let secs = t0.elapsed().as_secs_f64();
    assert_eq!(stats.pages, (48 + 16) * MIB / PAGE);
    assert_eq!(stats.bytes, (48 + 16) * MIB);
    assert_eq!(got.load(Ordering::Relaxed), stats.bytes);
    println!(
        "pulled {} MiB in {secs:.2} s: {:.1} MB/s over {} QPs",
        stats.bytes / MIB,
        stats.bytes as f64 / secs / 1e6,
        puller.channels()
    );
    assert!(src.differing_pages(&dst).is_empty(), "every byte matches");

    // Out-of-layout ranges are a protocol error and do not poison the puller.
    for bad in [r(2, 0, 1), r(1, 4 * 1024 - 1, 2), r(0, 0, 0)] {
        assert!(
            matches!(
                puller.pull(&[bad], &progress, STALL),
                Err(TransportError::Protocol(_))
            ),
            "{bad:?}"
        );
    }
    assert_eq!(
        puller
            .pull(&[r(1, 5, 1)], &progress, STALL)
            .expect("still usable")
            .pages,
        1
    );
    assert_eq!(
        puller
            .pull(&[], &progress, STALL)
            .expect("empty pull")
            .pages,
        0
    );
}

#[test]
#[ignore = "needs an RDMA device: scripts/rdma-tests.sh runs it in the SoftRoCE guest"]
fn qp_failure_mid_pull_returns_every_unconfirmed_page() {
    require_rdma();
    let sizes = [48 * MIB, 16 * MIB];
    let src = Ram::new(&sizes);
    src.fill(0x5eed);
    let dst = Ram::new(&sizes);
    dst.fill(0xdead); // every page differs before the pull
    let (_export, mut puller) = connect(&src, &dst, 4);
    let all = whole(&src);
    let total = pages(&all);

    puller.inject_qp_failure(1, 16 * MIB);
    let confirmed = AtomicU64::new(0);
    let progress = |b: u64| {
        confirmed.fetch_add(b, Ordering::Relaxed);
    };
    let t0 = Instant::now();
    let err = puller
        .pull(&all, &progress, STALL)
        .expect_err("the injected failure stops the pull");
    let TransportError::Failed { reason, unfinished } = err else {
        panic!("expected Failed, got {err:?}");
    };
    let confirmed = confirmed.load(Ordering::Relaxed);
    println!(
        "failed after {:.2} s: {reason}; confirmed {} MiB, {} unfinished ranges ({} pages)",
        t0.elapsed().as_secs_f64(),
        confirmed / MIB,
        unfinished.len(),
        pages(&unfinished)
    );
    assert!(reason.contains("injected"), "{reason}");
    assert!(confirmed >= 16 * MIB, "the failure came after 16 MiB");
    assert!(!unfinished.is_empty() && pages(&unfinished) < total);

    // Confirmed and unfinished pages partition the request: the unfinished
    // list is coalesced (sorted, disjoint), and the counts add up.
    assert_eq!(confirmed % PAGE, 0);
    assert_eq!(confirmed / PAGE + pages(&unfinished), total);
    for w in unfinished.windows(2) {
        assert!(
            (w[0].region, w[0].end()) < (w[1].region, w[1].first),
            "not coalesced: {w:?}"
        );
    }
    // Every page that did not arrive is in `unfinished` (so it can be re-sent).
    let missing = dst.differing_pages(&src);
    for (region, page) in &missing {
        assert!(
            unfinished
                .iter()
                .any(|u| u.region == *region && (u.first..u.end()).contains(page)),
            "page {page} of region {region} differs but is not unfinished"
        );
    }
    println!(
        "{} pages differ, {} pages unfinished",
        missing.len(),
        pages(&unfinished)
    );

    // The puller is done: later pulls hand everything back.
    let again = puller.pull(&all[1..], &progress, STALL);
    match again {
        Err(TransportError::Failed { unfinished, .. }) => assert_eq!(unfinished, all[1..]),
        other => panic!("expected Failed, got {other:?}"),
    }

    // Re-sending the unfinished ranges (by CPU here, TCP in Ferry) completes the copy.
    for u in &unfinished {
        dst.copy_from(&src, u);
    }
    assert!(dst.differing_pages(&src).is_empty());
}

#[test]
#[ignore = "needs an RDMA device: scripts/rdma-tests.sh runs it in the SoftRoCE guest"]
fn a_dead_source_is_detected_by_the_stall_timeout() {
    require_rdma();
    let sizes = [8 * MIB];
    let src = Ram::new(&sizes);
    src.fill(7);
    let dst = Ram::new(&sizes);
    let (export, mut puller) = connect(&src, &dst, 2);
    let all = whole(&src);
    assert_eq!(
        puller
            .pull(&all, &|_| {}, STALL)
            .expect("healthy pull")
            .pages,
        8 * MIB / PAGE
    );

    // The source goes away: its QPs are destroyed and its MRs deregistered.
    drop(export);
    let t0 = Instant::now();
    let err = puller
        .pull(&all, &|_| {}, Duration::from_secs(2))
        .expect_err("nobody answers");
    let waited = t0.elapsed();
    println!("dead source: {err} after {waited:.2?}");
    let TransportError::Failed { unfinished, .. } = err else {
        panic!("expected Failed, got {err:?}");
    };
    assert_eq!(unfinished, all, "nothing was confirmed");
    assert!(
        waited < Duration::from_secs(30),
        "stall detection took {waited:?}"
    );
}

#[test]
#[ignore = "needs an RDMA device: scripts/rdma-tests.sh runs it in the SoftRoCE guest"]
fn dropping_export_and_puller_deregisters_their_memory() {
    require_rdma();
    let sizes = [16 * MIB, 8 * MIB];
    let src = Ram::new(&sizes);
    let dst = Ram::new(&sizes);
    let base = pinned_kib();
    let (export, puller) = connect(&src, &dst, 2);
    let registered = pinned_kib() - base;
    println!("pinned {registered} KiB while exported and pulling");
    assert_eq!(
        registered,
        2 * (16 + 8) * 1024,
        "both sides pin their RAM while registered"
    );
    drop(export);
    assert_eq!(
        pinned_kib() - base,
        (16 + 8) * 1024,
        "the export's MRs are gone"
    );
    drop(puller);
    assert_eq!(pinned_kib(), base, "the puller's MRs are gone");

    // A failed puller lets go of its memory at once, not at drop.
    let (_export, mut puller) = connect(&src, &dst, 2);
    puller.inject_qp_failure(0, 0);
    let err = puller.pull(&whole(&src), &|_| {}, STALL);
    assert!(matches!(err, Err(TransportError::Failed { .. })), "{err:?}");
    assert_eq!(
        pinned_kib() - base,
        (16 + 8) * 1024,
        "only the export's MRs remain"
    );
}
