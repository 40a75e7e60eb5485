//! `ferry-bench link`: Ferry on links shaped like the networks it is for. Two network
//! namespaces joined by veth, each end's egress limited with `tbf` (and delayed with
//! `netem` where the kernel has it: `--rtt-ms`); the machine's own ceiling (iperf3 over
//! the unshaped veth) is measured first and printed, and rates above 90 % of it are
//! skipped with a note. Per rate and run: a whole migration of a random-filled idle guest
//! (`ferry migrate` to committed, default verification, destination preparation
//! included) and iperf3 with the same stream count moving the same bytes on the same
//! link. The last line is `ratio ferry/iperf3 link=<first rate> streams=<n>: <x>`: the
//! median over runs of round 1's rate over iperf3's.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ferry_tests::{summary_of, Cluster, ClusterOpts, TwoHosts, ADDR_B};

use crate::report::spread;
use crate::total::{committed_bytes, TotalArgs};

/// Options of `ferry-bench link`.
#[derive(clap::Args, Debug)]
pub struct LinkArgs {
    /// Link rates to shape, in `tc` notation, comma-separated; the last line is the first.
    #[arg(long, default_value = "10gbit,25gbit,40gbit")]
    pub rates: String,
    /// Round-trip time to add with `netem` (half each way), where the kernel has it.
    #[arg(long)]
    pub rtt_ms: Option<f64>,
    /// The guest, streams, runs (per rate), authentication and memory filling, as
    /// `ferry-bench total`.
    #[command(flatten)]
    pub whole: TotalArgs,
}

/// `tc` rate notation to bits per second (`10gbit`, `500mbit`).
fn bits_per_second(rate: &str) -> anyhow::Result<f64> {
    let r = rate.trim().to_ascii_lowercase();
    let (num, mul) = if let Some(n) = r.strip_suffix("gbit") {
        (n, 1e9)
    } else if let Some(n) = r.strip_suffix("mbit") {
        (n, 1e6)
    } else if let Some(n) = r.strip_suffix("kbit") {
        (n, 1e3)
    } else {
        bail!("rate {rate:?}: give it as <n>gbit, <n>mbit or <n>kbit")
    };
    let n: f64 = num.parse().with_context(|| format!("rate {rate:?}"))?;
    anyhow::ensure!(n > 0.0, "rate {rate:?} must be positive");
    Ok(n * mul)
}

fn tc(hosts: &TwoHosts, i: usize, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &hosts.ns[i],
            "tc",
            "qdisc",
            "replace",
            "dev",
        ])
        .arg(&hosts.veth[i])
        .arg("root")
        .args(args)
        .output()
        .context("running tc (apt-get install iproute2)")?;
    if !out.status.success() {
        bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Shapes both ends' egress to `rate`: `netem` with the delay and its own rate where
/// `rtt_ms` is asked for and the kernel has it, else `tbf` with a burst of 2 ms at the
/// rate (a smaller burst caps a fast link below its rate). Returns what was set up.
fn shape(hosts: &TwoHosts, rate: &str, rtt_ms: Option<f64>) -> anyhow::Result<String> {
    let burst = ((bits_per_second(rate)? / 8.0 * 0.002) as u64).max(256 << 10);
    let mut netem_missing = None;
    if let Some(rtt) = rtt_ms {
        let delay = format!("{:.3}ms", rtt / 2.0);
        let with_netem = (0..2).try_for_each(|i| {
            tc(
                hosts,
                i,
                &["netem", "delay", &delay, "rate", rate, "limit", "100000"],
            )
        });
        match with_netem {
            Ok(()) => return Ok(format!("netem rate {rate}, delay {delay} each way")),
            Err(e) => netem_missing = Some(e),
        }
    }
    for i in 0..2 {
        tc(
            hosts,
            i,
            &[
                "tbf",
                "rate",
                rate,
                "burst",
                &burst.to_string(),
                "latency",
                "50ms",
            ],
        )?;
    }
    Ok(match netem_missing {
        Some(e) => format!(
            "tbf rate {rate}, burst {} KiB; no delay: this kernel has no netem ({e})",
            burst >> 10
        ),
        None => format!("tbf rate {rate}, burst {} KiB", burst >> 10),
    })
}

/// iperf3 from host A to host B: `streams` connections moving `bytes` (or for `secs`).
fn iperf(hosts: &TwoHosts, streams: u16, bytes: Option<u64>) -> anyhow::Result<f64> {
    let port = "5201";
    let mut server = Command::new("ip")
        .args([
            "netns",
            "exec",
            &hosts.ns[1],
            "iperf3",
            "-s",
            "-1",
            "-p",
            port,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting iperf3 (apt-get install iperf3)")?;
    std::thread::sleep(Duration::from_millis(300));
    let mut c = Command::new("ip");
    c.args([
        "netns",
        "exec",
        &hosts.ns[0],
        "iperf3",
        "-c",
        ADDR_B,
        "-p",
        port,
    ])
    .args(["-J", "-P", &streams.to_string()]);
    match bytes {
        Some(b) => c.args(["-n", &b.to_string()]),
        None => c.args(["-t", "3"]),
    };
    let out = c.output()?;
    let _ = server.kill();
    let _ = server.wait();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("iperf3 output: {}", String::from_utf8_lossy(&out.stderr)))?;
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 bits_per_second")?;
    Ok(bps / 1e9)
}

/// One run's figures.
struct Run {
    iperf_gbps: f64,
    round1_gbps: f64,
    total_s: f64,
    wire_s: f64,
    prepare_s: f64,
    round1_s: f64,
    rest_s: f64,
    /// The migration's summary as `ferry migrate --json` printed it.
    summary: serde_json::Value,
}

fn once(a: &LinkArgs, rate: &str) -> anyhow::Result<(Run, String)> {
    let opts = ClusterOpts {
        mem_mib: a.whole.mem_mib,
        rate_mib: 0,
        psk: !a.whole.tls,
        source_vmm_args: vec!["--fill-pct".into(), "100".into()],
        // The workload VMM's own check of every page at load is a test instrument a
        // real VMM does not have (as in `ferry-bench total` and `tcp`); Ferry's
        // verification (per-page hashes, digests after resume) stays on.
        dest_vmm_args: vec!["--no-verify".into()],
        dest_sidecar_args: vec!["--populate".into(), a.whole.populate.clone()],
        ..ClusterOpts::default()
    };
    let cl = Cluster::start(&opts)?;
    let how = shape(&cl.hosts, rate, a.rtt_ms)?;
    let t = Instant::now();
    let child = cl.spawn_migrate(&[
        "--streams",
        &a.whole.streams.to_string(),
        "--verify",
        "after-resume",
    ])?;
    let s = summary_of(child)?;
    let total_s = t.elapsed().as_secs_f64();
    let bytes = committed_bytes(&s)?;
    let iperf_gbps = iperf(&cl.hosts, a.whole.streams, Some(bytes))?;
    let r1 = &s["per_round"][0];
    let round1_s = r1["ms"].as_f64().unwrap_or(0.0) / 1e3;
    let round1_gbps = r1["bytes"].as_f64().unwrap_or(0.0) * 8.0 / round1_s.max(1e-9) / 1e9;
    let prepare_s = s["prepare_ms"].as_f64().unwrap_or(0.0) / 1e3;
    Ok((
        Run {
            iperf_gbps,
            round1_gbps,
            total_s,
            wire_s: bytes as f64 * 8.0 / (iperf_gbps * 1e9),
            prepare_s,
            round1_s,
            rest_s: (total_s - prepare_s - round1_s).max(0.0),
            summary: s,
        },
        how,
    ))
}

/// Runs the benchmark; the last line is the ratio at the first rate.
///
/// # Errors
///
/// Not root, no iproute2 or iperf3, or a run failing.
pub fn run(a: &LinkArgs) -> anyhow::Result<()> {
    anyhow::ensure!(a.whole.runs > 0, "--runs must be at least 1");
    let rates: Vec<&str> = a.rates.split(',').map(str::trim).collect();
    for r in &rates {
        bits_per_second(r)?;
    }
    let _thp = ferry_tests::ShmemThp::set(&a.whole.shmem_thp)?;
    println!(
        "ferry-bench link: {} MiB random-filled idle guest, {} streams, {}, destination memory populated {} (shmem THP: {}), {} runs per rate; two namespaces joined by veth, shaped with tc",
        a.whole.mem_mib,
        a.whole.streams,
        if a.whole.tls { "mutual TLS" } else { "--insecure-psk" },
        if a.whole.populate == "ahead" { "ahead" } else { "while pages arrive" },
        ferry_tests::shmem_thp_setting(),
        a.whole.runs
    );
    let ceiling = {
        let hosts = TwoHosts::new()?;
        iperf(&hosts, a.whole.streams, None)?
    };
    println!(
        "  this machine's ceiling (iperf3 over the unshaped veth, {} streams, 3 s): {ceiling:.1} Gb/s",
        a.whole.streams
    );
    println!(
        "{:>8} {:>4} {:>9} {:>10} {:>7} {:>8} {:>7} {:>7} {:>9} {:>9} {:>7}",
        "link",
        "run",
        "iperf3",
        "round 1",
        "ratio",
        "total s",
        "wire s",
        "t/w",
        "prepare s",
        "round1 s",
        "rest s"
    );
    let mut records = Vec::new();
    let mut rows = Vec::new();
    let mut last = None;
    for rate in &rates {
        if bits_per_second(rate)? / 1e9 > 0.9 * ceiling {
            println!(
                "{rate:>8}: skipped, above 90 % of this machine's ceiling ({ceiling:.1} Gb/s)"
            );
            continue;
        }
        let (mut ratios, mut tw) = (Vec::new(), Vec::new());
        for run in 0..a.whole.runs {
            let (x, how) = once(a, rate)?;
            if run == 0 {
                println!("{rate:>8}: {how}");
            }
            let ratio = x.round1_gbps / x.iperf_gbps;
            println!(
                "{:>8} {:>4} {:>7.2}Gb {:>8.2}Gb {:>7.2} {:>8.2} {:>7.2} {:>7.2} {:>9.2} {:>9.2} {:>7.2}",
                rate,
                run,
                x.iperf_gbps,
                x.round1_gbps,
                ratio,
                x.total_s,
                x.wire_s,
                x.total_s / x.wire_s,
                x.prepare_s,
                x.round1_s,
                x.rest_s
            );
            rows.push((
                format!("{rate} run {run}"),
                vec![x.prepare_s, x.round1_s, x.rest_s],
            ));
            rows.push((
                format!("{rate} run {run} wire"),
                vec![0.0, 0.0, 0.0, x.wire_s],
            ));
            records.push(serde_json::json!({
                "link": rate, "run": run, "iperf3_gbps": x.iperf_gbps, "round1_gbps": x.round1_gbps,
                "ratio": ratio, "total_s": x.total_s, "wire_s": x.wire_s,
                "total_over_wire": x.total_s / x.wire_s, "prepare_s": x.prepare_s,
                "round1_s": x.round1_s, "rest_s": x.rest_s, "shaping": how,
                "summary": x.summary,
            }));
            ratios.push(ratio);
            tw.push(x.total_s / x.wire_s);
        }
        let (m, lo, hi) = spread(ratios);
        let (tm, tlo, thi) = spread(tw);
        println!(
            "{rate:>8}: round 1 / iperf3 median {m:.2} [{lo:.2}-{hi:.2}], whole migration / wire time median {tm:.2} [{tlo:.2}-{thi:.2}]"
        );
        if last.is_none() {
            last = Some((rate.to_string(), m));
        }
    }
    crate::report::record(
        "link",
        &serde_json::json!({
            "mem_mib": a.whole.mem_mib, "streams": a.whole.streams, "tls": a.whole.tls, "populate": a.whole.populate, "shmem_thp": ferry_tests::shmem_thp_setting(),
            "rtt_ms": a.rtt_ms, "ceiling_gbps": ceiling, "runs": records,
        }),
        &[(
            "phases",
            crate::report::stacked_bars(
                &format!(
                    "Whole migration of {} MiB on shaped links, {} streams: phases vs wire time (iperf3)",
                    a.whole.mem_mib, a.whole.streams
                ),
                "s",
                &["prepare", "round 1", "rest", "wire"],
                &rows,
            ),
        )],
    )?;
    let Some((rate, m)) = last else {
        bail!("every rate was above this machine's ceiling ({ceiling:.1} Gb/s)");
    };
    println!(
        "ratio ferry/iperf3 link={rate} streams={}: {m:.2}",
        a.whole.streams
    );
    Ok(())
}
