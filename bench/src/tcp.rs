//! `ferry-bench tcp`: Ferry's full-copy throughput over loopback against iperf3 on the
//! same link in the same run, with CPU seconds per GiB on each side.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::report::spread;
use anyhow::{bail, Context};

use crate::local::{cpu_seconds, Kid, LocalPair, PairAuth};

/// Options of `ferry-bench tcp`.
#[derive(clap::Args, Debug)]
pub struct TcpArgs {
    /// Region size in MiB (random-filled, idle guest).
    #[arg(long, default_value_t = 2048)]
    pub mem_mib: u64,
    /// Stream counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    pub streams: Vec<u16>,
    /// Runs per stream count (median, min and max are reported for both Ferry and
    /// iperf3, alternating).
    #[arg(long, default_value_t = 3)]
    pub runs: u32,
    /// Encrypt: mutual TLS 1.3 on the control and data connections (default: the plain
    /// `--insecure-psk` setting, as every figure before TLS was measured).
    #[arg(long)]
    pub tls: bool,
    /// How the destination fills the guest's memory (`ferry serve --populate`): with
    /// `overlap` (the default) round 1 includes filling it, with `ahead` it does not.
    #[arg(long, default_value = "overlap", value_parser = ["overlap", "ahead"])]
    pub populate: String,
}

/// One measurement.
pub(crate) struct Sample {
    pub(crate) gbps: f64,
    cpu_src_per_gib: f64,
    cpu_dst_per_gib: f64,
    /// Ferry's data-thread CPU s/GiB by phase (summary `cpu_s_per_gib`): source send,
    /// source hash, destination receive, destination hash, destination fill.
    phases: [f64; 5],
}

/// The phases of [`Sample::phases`], as printed.
const PHASES: [&str; 5] = [
    "src send",
    "src hash",
    "dst receive",
    "dst hash",
    "dst fill",
];

/// Two sidecars on loopback (`tag`, ports from `port`) with a random-filled idle guest of
/// `mem_mib` MiB registered at A and an incoming VMM waiting at B, ready to migrate.
pub(crate) fn idle_pair(
    tag: &str,
    port: u16,
    mem_mib: u64,
    tls: bool,
    serve: &[&str],
) -> anyhow::Result<LocalPair> {
    let auth = if tls { PairAuth::Tls } else { PairAuth::Psk };
    let mut pair = LocalPair::start_serving(tag, port, auth, serve)?;
    let a = pair.socket("a").display().to_string();
    let b = pair.socket("b").display().to_string();
    let mem = mem_mib.to_string();
    pair.spawn_vmm(
        "ferry-workload-vmm",
        "vmm-a",
        &[
            "--socket",
            &a,
            "--vm-id",
            "bench",
            "--mem-mib",
            &mem,
            "--fill-pct",
            "100",
            "--rate-mib",
            "0",
            "--max-runtime-s",
            "600",
        ]
        .map(String::from),
    )?;
    pair.spawn_vmm(
        "ferry-workload-vmm",
        "vmm-b",
        &[
            "--socket",
            &b,
            "--vm-id",
            "bench",
            "--incoming",
            "--no-verify",
            "--max-runtime-s",
            "600",
        ]
        .map(String::from),
    )?;
    pair.wait_ready(Duration::from_secs(120))?;
    Ok(pair)
}

fn ferry_once(args: &TcpArgs, streams: u16, run: u32) -> anyhow::Result<Sample> {
    let pair = idle_pair(
        &format!("tcp{streams}-{run}"),
        27_000 + streams * 10 + run as u16 * 100,
        args.mem_mib,
        args.tls,
        &["--populate", &args.populate],
    )?;
    let (src0, dst0) = (
        cpu_seconds(pair.sidecar_pid(0))?,
        cpu_seconds(pair.sidecar_pid(1))?,
    );
    let s = pair.migrate(
        "bench",
        &[
            "--streams".into(),
            streams.to_string(),
            "--downtime-ms".into(),
            "60000".into(),
            "--verify".into(),
            "strict".into(),
        ],
    )?;
    let (src1, dst1) = (
        cpu_seconds(pair.sidecar_pid(0))?,
        cpu_seconds(pair.sidecar_pid(1))?,
    );
    if s["result"] != "committed" || s["digest_match"] != true {
        bail!("benchmark migration failed: {s}");
    }
    // The full copy is round 1 (the guest is idle: the final round is empty).
    let r1 = &s["per_round"][0];
    let bytes = r1["bytes"].as_f64().context("round bytes")?;
    let ms = r1["ms"].as_f64().context("round ms")?;
    let moved_gib = s["bytes_transferred"].as_f64().unwrap_or(bytes) / (1u64 << 30) as f64;
    let c = &s["cpu_s_per_gib"];
    let phase = |k: &str| c[k].as_f64().unwrap_or(0.0);
    Ok(Sample {
        gbps: bytes * 8.0 / (ms / 1e3) / 1e9,
        cpu_src_per_gib: (src1 - src0) / moved_gib,
        cpu_dst_per_gib: (dst1 - dst0) / moved_gib,
        phases: [
            phase("source_data"),
            phase("source_hash"),
            phase("dest_data"),
            phase("dest_hash"),
            phase("dest_populate"),
        ],
    })
}

pub(crate) fn iperf_once(bytes: u64, streams: u16, port: u16) -> anyhow::Result<Sample> {
    let server = Kid(Command::new("iperf3")
        .args(["-s", "-1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting iperf3 (apt-get install iperf3)")?);
    std::thread::sleep(Duration::from_millis(300));
    let out = Command::new("iperf3")
        .args([
            "-c",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-J",
            "-P",
            &streams.to_string(),
        ])
        .args(["-n", &bytes.to_string()])
        .output()?;
    drop(server);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("iperf3 output: {}", String::from_utf8_lossy(&out.stderr)))?;
    let end = &v["end"];
    let bps = end["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 bits_per_second")?;
    let secs = end["sum_received"]["seconds"].as_f64().unwrap_or(0.0);
    let cpu = &end["cpu_utilization_percent"];
    let gib = bytes as f64 / (1u64 << 30) as f64;
    Ok(Sample {
        gbps: bps / 1e9,
        cpu_src_per_gib: cpu["host_total"].as_f64().unwrap_or(0.0) / 100.0 * secs / gib,
        cpu_dst_per_gib: cpu["remote_total"].as_f64().unwrap_or(0.0) / 100.0 * secs / gib,
        phases: [0.0; 5],
    })
}

/// Runs the benchmark and prints the table; the last line is the median ratio at 4
/// streams (or the largest stream count measured).
///
/// # Errors
///
/// When a run fails.
pub fn run(args: &TcpArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.runs > 0, "--runs must be at least 1");
    let mode = if args.tls {
        "TLS 1.3 (control and data encrypted)"
    } else {
        "plain TCP (--insecure-psk)"
    };
    println!(
        "ferry-bench tcp: {} MiB random-filled region over loopback, {mode}, destination memory populated {}, {} run(s) each, Ferry and iperf3 alternating",
        args.mem_mib,
        if args.populate == "ahead" { "ahead (not in round 1)" } else { "while pages arrive (in round 1)" },
        args.runs
    );
    println!("Ferry verifies a per-page XXH3 checksum of every page and both memory digests (strict mode).");
    println!("Per stream count: median [min-max] of the runs; the ratio is taken run by run.");
    println!(
        "{:>8} {:>22} {:>22} {:>22} {:>16} {:>16}",
        "streams", "ferry Gb/s", "iperf3 Gb/s", "ratio", "ferry src s/GiB", "ferry dst s/GiB"
    );
    let mut last = None;
    let (mut groups, mut cpu_groups, mut records) = (Vec::new(), Vec::new(), Vec::new());
    for &n in &args.streams {
        let mut f = Vec::new();
        let mut i = Vec::new();
        for run in 0..args.runs {
            f.push(ferry_once(args, n, run)?);
            i.push(iperf_once(args.mem_mib << 20, n, 27_900 + n)?);
        }
        let ratios: Vec<f64> = f.iter().zip(&i).map(|(a, b)| a.gbps / b.gbps).collect();
        let show = |(m, lo, hi): (f64, f64, f64), p: usize| format!("{m:.p$} [{lo:.p$}-{hi:.p$}]");
        let (ratio, ..) = spread(ratios.clone());
        println!(
            "{:>8} {:>22} {:>22} {:>22} {:>16} {:>16}",
            n,
            show(spread(f.iter().map(|s| s.gbps).collect()), 2),
            show(spread(i.iter().map(|s| s.gbps).collect()), 2),
            show(spread(ratios), 3),
            show(spread(f.iter().map(|s| s.cpu_src_per_gib).collect()), 2),
            show(spread(f.iter().map(|s| s.cpu_dst_per_gib).collect()), 2),
        );
        let phases: Vec<String> = (0..PHASES.len())
            .map(|k| {
                let (m, lo, hi) = spread(f.iter().map(|s| s.phases[k]).collect());
                format!("{} {m:.2} [{lo:.2}-{hi:.2}]", PHASES[k])
            })
            .collect();
        println!(
            "{:>8}   Ferry's data threads, CPU s/GiB: {}",
            "",
            phases.join(", ")
        );
        let (m, lo, hi) = spread(f.iter().map(|s| s.phases[2] - s.phases[4]).collect());
        println!(
            "{:>8}   destination without filling memory: {m:.2} [{lo:.2}-{hi:.2}] (target <= 0.3)",
            ""
        );
        last = Some((n, ratio));
        let med = |v: &[Sample], f: fn(&Sample) -> f64| spread(v.iter().map(f).collect()).0;
        groups.push((
            format!("{n} streams"),
            vec![med(&f, |s| s.gbps), med(&i, |s| s.gbps)],
        ));
        cpu_groups.push((
            format!("{n} streams"),
            (0..PHASES.len())
                .map(|k| spread(f.iter().map(|s| s.phases[k]).collect()).0)
                .collect(),
        ));
        let runs = |v: &[Sample]| -> Vec<serde_json::Value> {
            v.iter()
                .map(|s| {
                    serde_json::json!({"gbps": s.gbps, "cpu_src_s_per_gib": s.cpu_src_per_gib,
                        "cpu_dst_s_per_gib": s.cpu_dst_per_gib, "phases_s_per_gib": s.phases})
                })
                .collect()
        };
        records.push(serde_json::json!({"streams": n, "ferry": runs(&f), "iperf3": runs(&i), "ratio_median": ratio}));
    }
    crate::report::record(
        "tcp",
        &serde_json::json!({"mem_mib": args.mem_mib, "tls": args.tls, "populate": args.populate,
            "phases": PHASES, "by_streams": records}),
        &[
            (
                "throughput",
                crate::report::grouped_bars(
                    &format!(
                        "Throughput by stream count, {} MiB over loopback (medians)",
                        args.mem_mib
                    ),
                    "Gb/s",
                    &["ferry", "iperf3"],
                    &groups,
                ),
            ),
            (
                "cpu",
                crate::report::grouped_bars(
                    "Ferry's data threads: CPU s/GiB by phase (medians)",
                    "CPU s/GiB",
                    &PHASES,
                    &cpu_groups,
                ),
            ),
        ],
    )?;
    let (n, ratio) = last.context("no stream count given")?;
    if args.tls {
        println!("ratio ferry-tls/iperf3 streams={n}: {ratio:.3}");
    } else {
        println!("ratio ferry/iperf3 streams={n}: {ratio:.3}");
    }
    Ok(())
}
