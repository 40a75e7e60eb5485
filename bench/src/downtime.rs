//! `ferry-bench downtime`: downtime and total migration time of a running KVM guest
//! (`ferry-kvm-vmm`) between two sidecars on loopback, per guest size and dirtying rate.
//!
//! Each run starts a fresh sidecar pair on 127.0.0.1 and a fresh guest (pages it never
//! wrote are zero), lets it run `--warmup-s`, measures its write rate from its status
//! file, migrates it with `ferry migrate --json` and reads the summary and the source
//! VMM's dirty-log costs (its status file). The sidecar's default verification mode is
//! used (after-resume: the destination's digest, kept as pages landed, is compared with
//! the source's once the destination runs, the source VM kept paused meanwhile; the
//! output states the mode the summary reports, and a mismatch fails the run). The
//! destination VMM checks the guest's record with `--check-record` (default
//! `after-start`: counters and generation sums at load, data pages once the guest runs;
//! the output states the outcome, and a failed check fails the run).
//!
//! Dirtying rates: `0` runs the guest on one hot page per vCPU (at most one dirty page
//! per vCPU per round); `N` MiB/s writes random pages of the guest at N MiB/s over all
//! vCPUs (paced by the VMM). The last line of the output is
//! `downtime_ms p50 guest=1GiB dirty=64MiB/s: <x>`.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Deserialize;

use crate::local::LocalPair;

/// Options of `ferry-bench downtime`.
#[derive(clap::Args, Debug)]
pub struct DowntimeArgs {
    /// Guest sizes in MiB.
    #[arg(long, value_delimiter = ',', default_value = "1024,4096")]
    pub sizes_mib: Vec<u64>,
    /// Dirtying rates in MiB/s over all vCPUs (0: one hot page per vCPU).
    #[arg(long, value_delimiter = ',', default_value = "0,64,256")]
    pub dirty_mib: Vec<u64>,
    /// Runs per configuration.
    #[arg(long, default_value_t = 3)]
    pub runs: u32,
    /// Data streams.
    #[arg(long, default_value_t = 4)]
    pub streams: u16,
    /// Guest vCPUs.
    #[arg(long, default_value_t = 2)]
    pub vcpus: u32,
    /// Seconds the guest runs before each migration.
    #[arg(long, default_value_t = 2)]
    pub warmup_s: u64,
    /// Downtime budget passed to `ferry migrate`: what pre-copy leaves for the final copy
    /// (switch over once the dirty bytes fit it at the last round's bandwidth). 25 ms
    /// leaves half of a 50 ms downtime target to pause, state, load and resume.
    #[arg(long, default_value_t = 25)]
    pub downtime_ms: u32,
    /// The destination VMM's `--check-record` (at-load puts a read of every data page
    /// into the downtime).
    #[arg(long, default_value = "after-start")]
    pub check_record: String,
    /// Pre-copy round limit passed to `ferry migrate`.
    #[arg(long, default_value_t = 30)]
    pub max_rounds: u32,
    /// First loopback port (two per run).
    #[arg(long, default_value_t = 28_000)]
    pub port_base: u16,
}

/// The source VMM's status file, as far as this benchmark reads it.
#[derive(Deserialize)]
struct VmStatus {
    state: String,
    total: u64,
    #[serde(default)]
    record_check: String,
    #[serde(default)]
    dirty_log: Vec<DirtyLogCost>,
}

#[derive(Deserialize, Clone, Copy)]
struct DirtyLogCost {
    pages: u64,
    get_us: u64,
    clear_us: u64,
}

/// One migration's numbers.
struct Run {
    committed: bool,
    downtime_ms: f64,
    total_ms: f64,
    rounds: u64,
    parts: [f64; 5],
    dirty_log: Vec<DirtyLogCost>,
    write_mib_s: f64,
    verify_mode: String,
    final_pages: u64,
    /// The destination VMM's own load timing ("VM built in .., record checked in ..").
    load: String,
    record_check: String,
    error: String,
    /// The migration's summary (`ferry migrate --json`).
    summary: serde_json::Value,
}

const PARTS: [&str; 5] = [
    "pause_ms",
    "final_copy_ms",
    "state_ms",
    "verify_ms",
    "restore_ms",
];

fn read_status(p: &Path) -> Option<VmStatus> {
    serde_json::from_str(&std::fs::read_to_string(p).ok()?).ok()
}

/// Nearest-rank percentile of unsorted samples (NaN when empty).
fn pct(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
    s[rank.clamp(1, s.len()) - 1]
}

fn once(a: &DowntimeArgs, mib: u64, dirty: u64, port: u16, tag: &str) -> anyhow::Result<Run> {
    let mut pair = LocalPair::start(tag, port)?;
    let sa = pair.socket("a").display().to_string();
    let sb = pair.socket("b").display().to_string();
    let st_a = pair.dir.join("vm-a.json");
    let st_b = pair.dir.join("vm-b.json");
    let vcpus = a.vcpus.max(1);
    let (pattern, rate) = if dirty == 0 {
        ("hot", 1000)
    } else {
        ("random", (dirty << 20) / 4096 / u64::from(vcpus))
    };
    let mut src: Vec<String> = [
        "source",
        "--sidecar",
        &sa,
        "--vm-id",
        "bench",
        "--max-runtime-s",
        "900",
        "--pattern",
        pattern,
        "--hot-pages",
        "1",
    ]
    .map(String::from)
    .to_vec();
    src.extend([
        "--ram-mib".into(),
        mib.to_string(),
        "--vcpus".into(),
        vcpus.to_string(),
        "--rate".into(),
        rate.to_string(),
        "--status-file".into(),
        st_a.display().to_string(),
        // Data in every page, as a booted guest's RAM: round 1 moves all of it.
        "--ballast".into(),
    ]);
    pair.spawn_vmm("ferry-kvm-vmm", "vmm-a", &src)?;
    let dst: Vec<String> = vec![
        "dest".into(),
        "--sidecar".into(),
        sb,
        "--vm-id".into(),
        "bench".into(),
        "--max-runtime-s".into(),
        "900".into(),
        "--status-file".into(),
        st_b.display().to_string(),
        "--check-record".into(),
        a.check_record.clone(),
    ];
    pair.spawn_vmm("ferry-kvm-vmm", "vmm-b", &dst)?;
    pair.wait_ready(Duration::from_secs(60))?;
    // Warm up; measure the write rate over the last second of it.
    std::thread::sleep(Duration::from_secs(a.warmup_s.saturating_sub(1)));
    let t0 = Instant::now();
    let w0 = read_status(&st_a).context("source status")?.total;
    std::thread::sleep(Duration::from_secs(1));
    let w1 = read_status(&st_a).context("source status")?.total;
    let write_mib_s =
        (w1.saturating_sub(w0) * 4096) as f64 / t0.elapsed().as_secs_f64() / 1048576.0;
    let s = pair.migrate(
        "bench",
        &[
            "--streams".into(),
            a.streams.to_string(),
            "--downtime-ms".into(),
            a.downtime_ms.to_string(),
            "--max-rounds".into(),
            a.max_rounds.to_string(),
        ],
    )?;
    let committed = s["result"] == "committed";
    let mut dirty_log = Vec::new();
    if committed {
        // The source VMM writes its last status (with the dirty-log costs) as it stops.
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            if let Some(st) = read_status(&st_a).filter(|s| s.state == "migrated") {
                dirty_log = st.dirty_log;
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if s["guest_continued"] != true || s["digest_match"] != true {
            bail!("committed without a verified, continuing guest: {s}");
        }
    }
    let mut record_check = a.check_record.clone();
    if committed && a.check_record == "after-start" {
        // The destination checks the data pages once the guest runs; wait for its outcome.
        let end = Instant::now() + Duration::from_secs(60);
        record_check = "after-start: no outcome within 60 s".into();
        while Instant::now() < end {
            match read_status(&st_b).map(|s| s.record_check) {
                Some(c) if c.starts_with("after-start: ok") => {
                    record_check = c;
                    break;
                }
                Some(c) if c.contains("FAILED") => bail!("destination record check: {c}"),
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        if !record_check.starts_with("after-start: ok") {
            bail!("destination record check: {record_check}");
        }
    }
    let final_pages = s["per_round"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["final_round"] == true))
        .and_then(|r| r["dirty_pages"].as_u64())
        .unwrap_or(0);
    let f = |k: &str| s[k].as_f64().unwrap_or(f64::NAN);
    Ok(Run {
        committed,
        downtime_ms: f("downtime_ms"),
        total_ms: f("total_ms"),
        rounds: s["rounds"].as_u64().unwrap_or(0),
        parts: PARTS.map(|p| s["downtime_breakdown"][p].as_f64().unwrap_or(f64::NAN)),
        dirty_log,
        write_mib_s,
        verify_mode: s["verify_mode"].as_str().unwrap_or("?").to_owned(),
        final_pages,
        load: s["guest_detail"]
            .as_str()
            .and_then(|d| d.rsplit_once("load: "))
            .map_or("?", |(_, l)| l)
            .to_owned(),
        record_check,
        error: s["error"].as_str().unwrap_or_default().to_owned(),
        summary: s,
    })
}

fn size_label(mib: u64) -> String {
    if mib.is_multiple_of(1024) {
        format!("{}GiB", mib / 1024)
    } else {
        format!("{mib}MiB")
    }
}

/// Runs the benchmark.
///
/// # Errors
///
/// When a run cannot be set up or produces no summary.
pub fn run(a: &DowntimeArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        Path::new("/dev/kvm").exists(),
        "/dev/kvm is missing: the downtime benchmark needs KVM"
    );
    println!(
        "ferry-bench downtime: KVM guest ({} vCPUs) over loopback, {} streams, budget {} ms, {} runs per config, warm-up {} s; destination record check {}",
        a.vcpus, a.streams, a.downtime_ms, a.runs, a.warmup_s, a.check_record
    );
    let mut port = a.port_base;
    let mut headline: Option<f64> = None;
    let (mut dist, mut rounds, mut records) = (Vec::new(), Vec::new(), Vec::new());
    for &mib in &a.sizes_mib {
        for &dirty in &a.dirty_mib {
            let label = format!("guest={} dirty={dirty}MiB/s", size_label(mib));
            let mut runs = Vec::new();
            for r in 0..a.runs {
                let tag = format!("dt{mib}-{dirty}-{r}");
                let run =
                    once(a, mib, dirty, port, &tag).with_context(|| format!("{label} run {r}"))?;
                port = port.wrapping_add(2).max(1024);
                println!(
                    "  {label} run {r}: {} downtime {:.1} ms (pause {:.1} + final copy {:.1} ({} pages) + state {:.1} + verify {:.1} (destination VMM load: {}) + restore {:.1}), total {:.0} ms, {} rounds, guest wrote {:.1} MiB/s, verify {}, record check {}{}",
                    if run.committed { "committed" } else { "ABORTED" },
                    run.downtime_ms,
                    run.parts[0],
                    run.parts[1],
                    run.final_pages,
                    run.parts[2],
                    run.parts[3],
                    run.load,
                    run.parts[4],
                    run.total_ms,
                    run.rounds,
                    run.write_mib_s,
                    run.verify_mode,
                    run.record_check,
                    if run.error.is_empty() { String::new() } else { format!(" ({})", run.error) }
                );
                runs.push(run);
            }
            let ok: Vec<&Run> = runs.iter().filter(|r| r.committed).collect();
            let col = |f: &dyn Fn(&Run) -> f64| ok.iter().map(|r| f(r)).collect::<Vec<f64>>();
            let down = col(&|r| r.downtime_ms);
            let total = col(&|r| r.total_ms);
            let parts: Vec<f64> = (0..5).map(|i| pct(&col(&|r| r.parts[i]), 50.0)).collect();
            let logs: Vec<DirtyLogCost> = ok.iter().flat_map(|r| r.dirty_log.clone()).collect();
            let get: Vec<f64> = logs.iter().map(|l| l.get_us as f64).collect();
            let clear: Vec<f64> = logs.iter().map(|l| l.clear_us as f64).collect();
            let pages: Vec<f64> = logs.iter().map(|l| l.pages as f64).collect();
            let modes: Vec<&str> = ok.iter().map(|r| r.verify_mode.as_str()).collect();
            println!(
                "{label}: {}/{} committed (verify {}, record check {}); downtime p50 {:.1} p90 {:.1} ms; total p50 {:.0} p90 {:.0} ms; p50 parts: pause {:.1} + final copy {:.1} + state {:.1} + verify {:.1} + restore {:.1} ms; dirty log per read ({} reads): get p50 {:.0} us, clear p50 {:.0} us p90 {:.0} us, pages p50 {:.0}; guest wrote p50 {:.1} MiB/s",
                ok.len(),
                runs.len(),
                modes.first().copied().unwrap_or("?"),
                a.check_record,
                pct(&down, 50.0),
                pct(&down, 90.0),
                pct(&total, 50.0),
                pct(&total, 90.0),
                parts[0],
                parts[1],
                parts[2],
                parts[3],
                parts[4],
                logs.len(),
                pct(&get, 50.0),
                pct(&clear, 50.0),
                pct(&clear, 90.0),
                pct(&pages, 50.0),
                pct(&runs.iter().map(|r| r.write_mib_s).collect::<Vec<_>>(), 50.0),
            );
            if mib == 1024 && dirty == 64 {
                headline = Some(pct(&down, 50.0));
            }
            // The run whose downtime is the median stands for the configuration's rounds.
            let mut by_down: Vec<&&Run> = ok.iter().collect();
            by_down.sort_by(|x, y| x.downtime_ms.total_cmp(&y.downtime_ms));
            if let Some(m) = by_down.get(by_down.len() / 2) {
                rounds.push((label.clone(), m.summary.clone()));
            }
            dist.push((label.clone(), down.clone()));
            records.push(serde_json::json!({
                "guest_mib": mib, "dirty_mib_s": dirty, "committed": ok.len(), "runs": runs.len(),
                "downtime_ms": down, "total_ms": total,
                "summaries": runs.iter().map(|r| r.summary.clone()).collect::<Vec<_>>(),
            }));
        }
    }
    crate::report::record(
        "downtime",
        &serde_json::json!({"streams": a.streams, "vcpus": a.vcpus, "budget_ms": a.downtime_ms,
            "check_record": a.check_record, "configs": records}),
        &[
            (
                "downtime",
                crate::report::dots(
                    &format!("Downtime per run ({} runs per configuration)", a.runs),
                    "ms",
                    &dist,
                ),
            ),
            (
                "rounds",
                crate::report::rounds_chart("Median-downtime run per configuration", &rounds),
            ),
        ],
    )?;
    match headline {
        Some(x) => println!("downtime_ms p50 guest=1GiB dirty=64MiB/s: {x:.1}"),
        None => println!(
            "downtime_ms p50 guest=1GiB dirty=64MiB/s: not measured (--sizes-mib/--dirty-mib left it out)"
        ),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v = [5.0, 1.0, 4.0, 2.0, 3.0];
        assert_eq!(pct(&v, 50.0), 3.0);
        assert_eq!(pct(&v, 90.0), 5.0);
        assert_eq!(pct(&[7.0], 90.0), 7.0);
        assert!(pct(&[], 50.0).is_nan());
    }
}
