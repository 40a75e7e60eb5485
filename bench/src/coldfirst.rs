//! `ferry-bench coldfirst`: what sending recently written pages last saves.
//!
//! Round 1 sends every page. In plain address order a hot set at the start of RAM goes
//! first, so the guest dirties most of it again before round 1 ends and it is sent
//! twice. With an observation window (`ferry migrate --observe-ms`), pages written
//! during the window go last in round 1 (least recently used memory first, as Hyper-V
//! does), so fewer of them are dirtied again. Same guest, same link, same run: the
//! difference in bytes moved is the saving.
//!
//! The order only pays because the source reads (and clears) the dirty log right before
//! each 64 MiB window of a round (sidecar `WINDOW_PAGES`): a hot page sent in the last
//! window carries every write made before that window, so only writes made after it
//! count for round 2. (With one read per round, round 2 held every page written during
//! round 1 whatever the order: measured -0.4 %.) The observation window must be long
//! enough to see most of the hot set written; pages it misses are sent in address order.

use std::time::Duration;

use anyhow::{bail, Context};

use crate::local::LocalPair;

/// Options of `ferry-bench coldfirst`.
#[derive(clap::Args, Debug)]
pub struct ColdFirstArgs {
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 1024)]
    pub mem_mib: u64,
    /// Hot set (the guest writes only here) in MiB, at the start of RAM.
    #[arg(long, default_value_t = 128)]
    pub hot_mib: u64,
    /// Guest dirtying rate in MiB/s.
    #[arg(long, default_value_t = 256)]
    pub rate_mib: u64,
    /// Observation window for the cold-first order, ms.
    #[arg(long, default_value_t = 1000)]
    pub observe_ms: u32,
    /// Runs per order (alternating); medians reported.
    #[arg(long, default_value_t = 3)]
    pub runs: u32,
}

struct Sample {
    bytes: u64,
    round2_bytes: u64,
    rounds: u64,
}

fn once(a: &ColdFirstArgs, observe_ms: u32, run: u32) -> anyhow::Result<Sample> {
    let tag = format!("cold{observe_ms}-{run}");
    let mut pair = LocalPair::start(&tag, 28_000 + (run as u16) * 10 + u16::from(observe_ms > 0))?;
    let sa = pair.socket("a").display().to_string();
    let sb = pair.socket("b").display().to_string();
    pair.spawn_vmm(
        "ferry-workload-vmm",
        "vmm-a",
        &[
            "--socket".into(),
            sa,
            "--vm-id".into(),
            "cold".into(),
            "--mem-mib".into(),
            a.mem_mib.to_string(),
            "--regions".into(),
            "1".into(),
            "--fill-pct".into(),
            "100".into(),
            "--pattern".into(),
            "hot".into(),
            "--hot-mib".into(),
            a.hot_mib.to_string(),
            "--rate-mib".into(),
            a.rate_mib.to_string(),
            "--max-runtime-s".into(),
            "300".into(),
        ],
    )?;
    pair.spawn_vmm(
        "ferry-workload-vmm",
        "vmm-b",
        &[
            "--socket".into(),
            sb,
            "--vm-id".into(),
            "cold".into(),
            "--incoming".into(),
            "--no-verify".into(),
            "--max-runtime-s".into(),
            "300".into(),
        ],
    )?;
    pair.wait_ready(Duration::from_secs(120))?;
    std::thread::sleep(Duration::from_secs(1));
    let s = pair.migrate(
        "cold",
        &[
            "--streams".into(),
            "4".into(),
            "--observe-ms".into(),
            observe_ms.to_string(),
            "--downtime-ms".into(),
            "50".into(),
        ],
    )?;
    if s["result"] != "committed" || s["digest_match"] != true {
        bail!("migration failed: {s}");
    }
    Ok(Sample {
        bytes: s["bytes_transferred"].as_u64().context("bytes")?,
        round2_bytes: s["per_round"][1]["bytes"].as_u64().unwrap_or(0),
        rounds: s["rounds"].as_u64().unwrap_or(0),
    })
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

/// Runs both orders alternately and prints the saving.
///
/// # Errors
///
/// When a migration fails.
pub fn run(a: &ColdFirstArgs) -> anyhow::Result<()> {
    println!(
        "ferry-bench coldfirst: {} MiB guest writing {} MiB/s into a {} MiB hot set at the start of RAM; 4 streams over loopback; {} runs each",
        a.mem_mib, a.rate_mib, a.hot_mib, a.runs
    );
    let (mut plain, mut cold) = (Vec::new(), Vec::new());
    for r in 0..a.runs {
        for (observe, out) in [(0, &mut plain), (a.observe_ms, &mut cold)] {
            let s = once(a, observe, r)?;
            println!(
                "  run {r} order={:<10} bytes {:>6} MiB, round 2 {:>5} MiB, {} rounds",
                if observe == 0 {
                    "address"
                } else {
                    "cold-first"
                },
                s.bytes >> 20,
                s.round2_bytes >> 20,
                s.rounds
            );
            out.push(s);
        }
    }
    let p = median(plain.iter().map(|s| s.bytes).collect());
    let c = median(cold.iter().map(|s| s.bytes).collect());
    let p2 = median(plain.iter().map(|s| s.round2_bytes).collect());
    let c2 = median(cold.iter().map(|s| s.round2_bytes).collect());
    println!(
        "median bytes moved: address order {} MiB, cold-first {} MiB",
        p >> 20,
        c >> 20
    );
    println!(
        "median round 2: address order {} MiB, cold-first {} MiB",
        p2 >> 20,
        c2 >> 20
    );
    let mib = |v: u64| v as f64 / f64::from(1u32 << 20);
    let sample = |v: &[Sample]| -> Vec<serde_json::Value> {
        v.iter()
            .map(|s| serde_json::json!({"bytes": s.bytes, "round2_bytes": s.round2_bytes, "rounds": s.rounds}))
            .collect()
    };
    crate::report::record(
        "coldfirst",
        &serde_json::json!({"mem_mib": a.mem_mib, "rate_mib": a.rate_mib, "hot_mib": a.hot_mib,
            "address_order": sample(&plain), "cold_first": sample(&cold)}),
        &[(
            "bytes",
            crate::report::grouped_bars(
                &format!("Bytes moved by send order (median of {} runs)", a.runs),
                "MiB",
                &["address order", "cold-first"],
                &[
                    ("whole migration".into(), vec![mib(p), mib(c)]),
                    ("round 2".into(), vec![mib(p2), mib(c2)]),
                ],
            ),
        )],
    )?;
    let saved = p as i64 - c as i64;
    println!(
        "cold-first saved {} MiB ({:.1} % of address order)",
        saved >> 20,
        saved as f64 * 100.0 / p.max(1) as f64
    );
    Ok(())
}
