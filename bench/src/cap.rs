//! `ferry-bench cap`: how closely a bandwidth cap (`ferry migrate --max-bandwidth`) holds.
//!
//! A fully written guest (no zero pages to skip) migrates over loopback, once uncapped as
//! the reference (the cap must bind: each cap is checked to be below it) and then under
//! each cap, several runs each, alternating. The figure is the achieved rate (payload
//! bytes over the rounds' wall time, from the summary) over the cap: 1.00 means the cap
//! held exactly. The last line is the median ratio over every capped run with its range.

use std::time::Duration;

use crate::report::spread;
use anyhow::{bail, Context};

use crate::local::LocalPair;

/// Options of `ferry-bench cap`.
#[derive(clap::Args, Debug)]
pub struct CapArgs {
    /// Guest RAM in MiB (every page written).
    #[arg(long, default_value_t = 512)]
    pub mem_mib: u64,
    /// Caps to measure, MiB/s.
    #[arg(long, value_delimiter = ',', default_values_t = [50u32, 100, 200])]
    pub caps: Vec<u32>,
    /// Runs per cap.
    #[arg(long, default_value_t = 3)]
    pub runs: u32,
}

/// Achieved MiB/s of one migration under `cap` (None: uncapped).
fn once(a: &CapArgs, cap: Option<u32>, run: u32) -> anyhow::Result<f64> {
    let tag = format!("cap{}-{run}", cap.unwrap_or(0));
    let port = 29_000 + (run as u16) * 20 + (cap.unwrap_or(0) / 10) as u16 % 20;
    let mut pair = LocalPair::start(&tag, port)?;
    let sa = pair.socket("a").display().to_string();
    let sb = pair.socket("b").display().to_string();
    let vmm = |s: &str| -> Vec<String> {
        ["--socket", s, "--vm-id", "capped", "--max-runtime-s", "300"]
            .iter()
            .map(|x| (*x).to_owned())
            .collect()
    };
    let mut src = vmm(&sa);
    src.extend(
        [
            "--mem-mib",
            &a.mem_mib.to_string(),
            "--fill-pct",
            "100",
            "--rate-mib",
            "2",
        ]
        .map(String::from),
    );
    pair.spawn_vmm("ferry-workload-vmm", "vmm-a", &src)?;
    let mut dst = vmm(&sb);
    dst.push("--incoming".into());
    pair.spawn_vmm("ferry-workload-vmm", "vmm-b", &dst)?;
    pair.wait_ready(Duration::from_secs(120))?;
    let mut extra: Vec<String> = ["--streams", "4", "--transport", "tcp"]
        .map(String::from)
        .to_vec();
    if let Some(c) = cap {
        extra.extend(["--max-bandwidth".to_owned(), c.to_string()]);
    }
    let s = pair.migrate("capped", &extra)?;
    if s["result"] != "committed" || s["digest_match"] != true {
        bail!("migration failed: {s}");
    }
    let bytes = s["bytes_transferred"].as_u64().context("bytes")? as f64;
    let ms: f64 = s["per_round"]
        .as_array()
        .context("per_round")?
        .iter()
        .filter_map(|r| r["ms"].as_f64())
        .sum();
    Ok(bytes / (1u64 << 20) as f64 / (ms / 1e3))
}

/// Runs the benchmark; the last line is the median achieved/cap ratio with its range.
///
/// # Errors
///
/// When a migration fails, or a cap would not bind on this link.
pub fn run(a: &CapArgs) -> anyhow::Result<()> {
    anyhow::ensure!(a.runs > 0 && !a.caps.is_empty(), "need runs and caps");
    println!(
        "ferry-bench cap: {} MiB fully written guest, 4 TCP streams over loopback (--insecure-psk), caps {:?} MiB/s, {} runs each",
        a.mem_mib, a.caps, a.runs
    );
    let free = once(a, None, 0)?;
    println!("  uncapped reference: {free:.1} MiB/s");
    for &c in &a.caps {
        if f64::from(c) > free * 0.8 {
            bail!("a cap of {c} MiB/s would not bind on a link doing {free:.0} MiB/s: choose lower caps");
        }
    }
    let mut ratios = Vec::new();
    for r in 0..a.runs {
        for &c in &a.caps {
            let got = once(a, Some(c), r)?;
            println!(
                "  run {r} cap {c:>4} MiB/s: achieved {got:>6.1} MiB/s, ratio {:.3}",
                got / f64::from(c)
            );
            ratios.push(got / f64::from(c));
        }
    }
    let (mut groups, mut records) = (Vec::new(), Vec::new());
    for &c in &a.caps {
        let per: Vec<f64> = ratios
            .iter()
            .skip(a.caps.iter().position(|&x| x == c).unwrap_or(0))
            .step_by(a.caps.len())
            .copied()
            .collect();
        let (m, lo, hi) = spread(per.clone());
        println!("  cap {c:>4} MiB/s: ratio median {m:.3} [{lo:.3}-{hi:.3}]");
        groups.push((
            format!("cap {c} MiB/s"),
            vec![f64::from(c), m * f64::from(c)],
        ));
        records.push(serde_json::json!({"cap_mib_s": c, "achieved_over_cap": per}));
    }
    crate::report::record(
        "cap",
        &serde_json::json!({"mem_mib": a.mem_mib, "uncapped_mib_s": free, "caps": records}),
        &[(
            "caps",
            crate::report::grouped_bars(
                &format!("Bandwidth caps: achieved rate (median of {} runs)", a.runs),
                "MiB/s",
                &["cap", "achieved"],
                &groups,
            ),
        )],
    )?;
    let n = ratios.len();
    let (m, lo, hi) = spread(ratios);
    println!("cap: achieved/cap median {m:.3} [{lo:.3}-{hi:.3}] over {n} runs");
    Ok(())
}
