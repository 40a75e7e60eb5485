//! `ferry-bench total`: the whole migration as a user waits for it (`ferry migrate` to
//! committed, default verification, the destination's preparation included) of a
//! random-filled idle guest over loopback, against the *wire time* of the same bytes: the
//! bytes Ferry moved divided by iperf3's rate with the same stream count on the same link,
//! measured in the same run, alternating. Per run: each phase (destination preparation,
//! round 1, final round, verification, the rest: handshake, commit, resume); the last line
//! is `total/wire <mem> streams=<n>: <x>` (the median of the per-run ratios).

use std::time::Instant;

use anyhow::{bail, Context};

use crate::report::spread;
use crate::tcp::{idle_pair, iperf_once};

/// Options of `ferry-bench total`.
#[derive(clap::Args, Debug)]
pub struct TotalArgs {
    /// Guest RAM in MiB (random-filled, idle).
    #[arg(long, default_value_t = 2048)]
    pub mem_mib: u64,
    /// Streams (Ferry) and parallel connections (iperf3).
    #[arg(long, default_value_t = 4)]
    pub streams: u16,
    /// Runs (each a Ferry migration and an iperf3 transfer of the same size).
    #[arg(long, default_value_t = 3)]
    pub runs: u32,
    /// Mutual TLS 1.3 between the sidecars (default: `--insecure-psk`, as `ferry-bench tcp`).
    #[arg(long)]
    pub tls: bool,
    /// How the destination fills the guest's memory (`ferry serve --populate`).
    #[arg(long, default_value = "overlap", value_parser = ["overlap", "ahead"])]
    pub populate: String,
    /// The host's transparent huge pages for shared memory during the runs
    /// (`/sys/kernel/mm/transparent_hugepage/shmem_enabled`, put back afterwards): with
    /// `advise` the destination's memory is filled 2 MiB at a time; `keep` leaves the
    /// host's setting, which the header prints.
    #[arg(long, default_value = "keep", value_parser = ["keep", "never", "advise"])]
    pub shmem_thp: String,
}

/// One run's phases, in seconds.
struct Run {
    total_s: f64,
    wire_s: f64,
    prepare_s: f64,
    round1_s: f64,
    final_s: f64,
    verify_s: f64,
}

/// The payload bytes a committed migration's summary says it moved.
///
/// # Errors
///
/// The migration did not commit, or the summary lacks the figure.
pub(crate) fn committed_bytes(s: &serde_json::Value) -> anyhow::Result<u64> {
    if s["result"] != "committed" {
        bail!("benchmark migration failed: {s}");
    }
    s["bytes_transferred"].as_u64().context("bytes_transferred")
}

fn once(a: &TotalArgs, run: u32) -> anyhow::Result<Run> {
    let pair = idle_pair(
        &format!("total{run}"),
        28_000 + run as u16 * 10,
        a.mem_mib,
        a.tls,
        &["--populate", &a.populate],
    )?;
    let t = Instant::now();
    let s = pair.migrate("bench", &["--streams".into(), a.streams.to_string()])?;
    let total_s = t.elapsed().as_secs_f64();
    let bytes = committed_bytes(&s)?;
    drop(pair);
    let wire = iperf_once(bytes, a.streams, 28_900 + run as u16)?;
    let rounds = s["per_round"].as_array().context("per_round")?;
    let ms = |v: &serde_json::Value| v.as_f64().unwrap_or(0.0) / 1e3;
    let round1_s = rounds.first().map_or(0.0, |r| ms(&r["ms"]));
    let final_s = rounds
        .iter()
        .filter(|r| r["final_round"] == true)
        .map(|r| ms(&r["ms"]))
        .sum();
    Ok(Run {
        total_s,
        wire_s: bytes as f64 * 8.0 / (wire.gbps * 1e9),
        prepare_s: ms(&s["prepare_ms"]),
        round1_s,
        final_s,
        verify_s: ms(&s["downtime_breakdown"]["verify_ms"]) + ms(&s["verify_after_resume_ms"]),
    })
}

/// Runs the benchmark and prints the table; the last line is the total/wire ratio.
///
/// # Errors
///
/// A run failing, or iperf3 missing.
pub fn run(a: &TotalArgs) -> anyhow::Result<()> {
    anyhow::ensure!(a.runs > 0, "--runs must be at least 1");
    let _thp = ferry_tests::ShmemThp::set(&a.shmem_thp)?;
    println!(
        "ferry-bench total: {} MiB random-filled idle guest over loopback, {} streams, default verification, {}, destination memory populated {} (shmem THP: {}); whole migration (migrate to committed) vs the wire time of the same bytes at iperf3's rate (same streams, same run); {} runs",
        a.mem_mib,
        a.streams,
        if a.tls { "mutual TLS" } else { "--insecure-psk" },
        if a.populate == "ahead" { "ahead" } else { "while pages arrive" },
        ferry_tests::shmem_thp_setting(),
        a.runs
    );
    println!(
        "{:>4} {:>9} {:>9} {:>7} {:>10} {:>10} {:>9} {:>9} {:>8}",
        "run",
        "total s",
        "wire s",
        "ratio",
        "prepare s",
        "round1 s",
        "final s",
        "verify s",
        "other s"
    );
    let mut ratios = Vec::new();
    let (mut rows, mut records) = (Vec::new(), Vec::new());
    for r in 0..a.runs {
        let x = once(a, r)?;
        let other = x.total_s - x.prepare_s - x.round1_s - x.final_s - x.verify_s;
        rows.push((
            format!("run {r}"),
            vec![
                x.prepare_s,
                x.round1_s,
                x.final_s,
                x.verify_s,
                other.max(0.0),
            ],
        ));
        rows.push((
            format!("run {r} wire"),
            vec![0.0, 0.0, 0.0, 0.0, 0.0, x.wire_s],
        ));
        records.push(serde_json::json!({
            "run": r, "total_s": x.total_s, "wire_s": x.wire_s, "ratio": x.total_s / x.wire_s,
            "prepare_s": x.prepare_s, "round1_s": x.round1_s, "final_s": x.final_s,
            "verify_s": x.verify_s, "other_s": other,
        }));
        println!(
            "{:>4} {:>9.2} {:>9.2} {:>7.2} {:>10.2} {:>10.2} {:>9.2} {:>9.2} {:>8.2}",
            r,
            x.total_s,
            x.wire_s,
            x.total_s / x.wire_s,
            x.prepare_s,
            x.round1_s,
            x.final_s,
            x.verify_s,
            other
        );
        ratios.push(x.total_s / x.wire_s);
    }
    let (m, lo, hi) = spread(ratios);
    println!("  total/wire median {m:.2} [{lo:.2}-{hi:.2}]");
    crate::report::record(
        "total",
        &serde_json::json!({
            "mem_mib": a.mem_mib, "streams": a.streams, "tls": a.tls, "populate": a.populate, "shmem_thp": ferry_tests::shmem_thp_setting(),
            "runs": records, "ratio_median": m, "ratio_min": lo, "ratio_max": hi,
        }),
        &[(
            "phases",
            crate::report::stacked_bars(
                &format!(
                    "Whole migration of {} MiB, {} streams: phases vs wire time (iperf3)",
                    a.mem_mib, a.streams
                ),
                "s",
                &["prepare", "round 1", "final", "verify", "other", "wire"],
                &rows,
            ),
        )],
    )?;
    let mem = if a.mem_mib.is_multiple_of(1024) {
        format!("{}GiB", a.mem_mib / 1024)
    } else {
        format!("{}MiB", a.mem_mib)
    };
    println!("total/wire {mem} streams={}: {m:.2}", a.streams);
    Ok(())
}
