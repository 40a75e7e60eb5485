//! `ferry-bench control-path`: how much guest memory the source's per-round control work
//! handles per second on one core: the dirty bitmap scanned and coalesced into ranges
//! (`ranges_of`), cut into the windows the session sends (`windows`), and each window
//! dealt to the channels (`plan`), exactly as `SourceSession` does it every round. Dirty
//! pages are scattered at random (the worst case for coalescing) at 1, 10 and 50 %.
//! Reported as GB of dirty guest memory planned per second (the bytes the link will carry;
//! the strict reading: the whole guest scanned per second is reported too, and is 10x to
//! 100x that), median and spread of several runs; the last line is `control path GB/s per
//! core dirty=10%: <x>` (target >= 50: a 400 Gb/s link with 4 KiB pages must never wait for
//! the planner).

use std::hint::black_box;
use std::time::Instant;

use crate::report::spread;
use ferry_engine::bitmap::DirtyBitmap;
use ferry_engine::plan::{plan, ranges_of, windows, DEFAULT_CHUNK_PAGES};
use ferry_engine::session::DEFAULT_WINDOW_PAGES;

/// Options of `ferry-bench control-path`.
#[derive(clap::Args, Debug)]
pub struct ControlArgs {
    /// Guest RAM in GiB (the bitmap covers it in 4 KiB pages).
    #[arg(long, default_value_t = 16)]
    pub gib: u64,
    /// Runs per dirty fraction.
    #[arg(long, default_value_t = 9)]
    pub runs: u32,
    /// Channels the windows are dealt to.
    #[arg(long, default_value_t = 4)]
    pub channels: usize,
}

/// A bitmap of `pages` with about `pct` % of them set, scattered (xorshift, fixed seed).
fn scattered(pages: u64, pct: u64) -> DirtyBitmap {
    let mut b = DirtyBitmap::new(pages);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let threshold = u64::MAX / 100 * pct;
    for p in 0..pages {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if x < threshold {
            b.set(p);
        }
    }
    b
}

/// One round's control work over `b`; returns the pages planned (so nothing is skipped).
fn control_round(b: &DirtyBitmap, channels: usize) -> u64 {
    let ranges = ranges_of(std::slice::from_ref(b));
    let mut planned = 0;
    for w in windows(&ranges, DEFAULT_WINDOW_PAGES) {
        planned += plan(&w, channels, DEFAULT_CHUNK_PAGES).pages();
    }
    planned
}

/// Runs the benchmark and prints one line per dirty fraction; the last line is the 10 %
/// figure.
///
/// # Errors
///
/// Bad options.
pub fn run(a: &ControlArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        a.runs > 0 && a.gib > 0 && a.channels > 0,
        "--runs, --gib and --channels must be at least 1"
    );
    let pages = a.gib << 18;
    let guest = (pages * 4096) as f64;
    println!(
        "ferry-bench control-path: {} GiB guest ({} pages), dirty pages scattered at random; bitmap -> ranges -> windows of {} pages -> plan over {} channels; {} runs each, one core",
        a.gib, pages, DEFAULT_WINDOW_PAGES, a.channels, a.runs
    );
    let mut at10 = 0.0;
    let (mut rows, mut records) = (Vec::new(), Vec::new());
    for pct in [1, 10, 50] {
        let b = scattered(pages, pct);
        let dirty = b.count();
        let runs = ranges_of(std::slice::from_ref(&b)).len();
        let (mut rates, mut scanned) = (Vec::new(), Vec::new());
        for _ in 0..a.runs {
            let t = Instant::now();
            let planned = control_round(black_box(&b), a.channels);
            let s = t.elapsed().as_secs_f64();
            anyhow::ensure!(planned == dirty, "planned {planned} of {dirty} dirty pages");
            rates.push((dirty * 4096) as f64 / s / 1e9);
            scanned.push(guest / s / 1e9);
        }
        let (m, lo, hi) = spread(rates);
        let (g, _, _) = spread(scanned);
        println!(
            "  dirty {pct:>2} %: {dirty} pages in {runs} ranges; planned {m:.1} GB/s per core [{lo:.1}-{hi:.1}], guest scanned {g:.0} GB/s"
        );
        if pct == 10 {
            at10 = m;
        }
        rows.push((format!("dirty {pct} %"), vec![m]));
        records.push(serde_json::json!({
            "dirty_pct": pct, "dirty_pages": dirty, "ranges": runs,
            "planned_gbps_median": m, "planned_gbps_min": lo, "planned_gbps_max": hi,
            "guest_scanned_gbps_median": g,
        }));
    }
    crate::report::record(
        "control-path",
        &serde_json::json!({"gib": a.gib, "channels": a.channels, "runs": a.runs, "by_dirty": records}),
        &[(
            "planned",
            crate::report::stacked_bars(
                &format!(
                    "Control path, {} GiB guest: dirty memory planned per core",
                    a.gib
                ),
                "GB/s",
                &["planned"],
                &rows,
            ),
        )],
    )?;
    println!("control path GB/s per core dirty=10%: {at10:.1}");
    Ok(())
}
