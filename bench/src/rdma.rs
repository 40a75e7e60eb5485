//! `ferry-bench rdma`: Ferry's RDMA READ pull throughput against `ib_read_bw` (perftest)
//! on the same device with the same queue-pair count, in the same run, plus the source
//! sidecar's CPU seconds per GiB over RDMA and over TCP.
//!
//! Without an RDMA device on this host (`/sys/class/infiniband` empty or missing) the
//! benchmark boots the SoftRoCE guest (`scripts/rxe-vm.sh`, repository shared at the same
//! path) and runs itself there with `--in-guest`, using the binaries built on the host.
//!
//! The source CPU is sampled every 25 ms; the round-1 figure is the CPU spent between
//! `prepare_ms` and `prepare_ms + per_round[0].ms` after `ferry migrate` started (the
//! full copy of an idle guest), the whole-migration figure also counts the source's
//! memory digest (XXH3 of the region, the same work for both transports).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::local::{bin, cpu_seconds, Kid, LocalPair};
use crate::report::spread;

/// Options of `ferry-bench rdma`.
#[derive(clap::Args, Debug)]
pub struct RdmaArgs {
    /// Region size in MiB (random-filled, idle guest).
    #[arg(long, default_value_t = 256)]
    pub mem_mib: u64,
    /// Queue-pair counts to measure (Ferry `--streams`, ib_read_bw `-q`).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    pub qps: Vec<u16>,
    /// RDMA device for ib_read_bw.
    #[arg(long, default_value = "rxe0")]
    pub dev: String,
    /// GID index for ib_read_bw (1 is RoCE v2 ::ffff:127.0.0.1 on rxe over `lo`).
    #[arg(long, default_value_t = 1)]
    pub gid_index: u8,
    /// Wall-clock limit of the SoftRoCE guest run, seconds.
    #[arg(long, default_value_t = 300)]
    pub guest_timeout_s: u64,
    /// Runs per queue-pair count, each a Ferry migration and an ib_read_bw transfer:
    /// medians, and the ratio run by run as median [min-max] (3 runs of 1/2/4 QPs take
    /// ~150 s in the SoftRoCE guest: raise --guest-timeout-s with more).
    #[arg(long, default_value_t = 3)]
    pub runs: u32,
    /// Measure here (an RDMA device must exist); the host run passes this to the guest.
    #[arg(long)]
    pub in_guest: bool,
    /// Results directory (JSON and SVG); by default `bench-results/rdma-<time>` (the
    /// host's, passed to the guest, which sees the repository).
    #[arg(long)]
    pub results_dir: Option<std::path::PathBuf>,
}

/// Ferry's message (RDMA READ) size: it splits pulls at 1 MiB.
const FERRY_READ_BYTES: u64 = 1 << 20;
/// ib_read_bw message sizes tried, largest first (1 MiB often reports nothing on rxe).
const IB_SIZES: [u64; 3] = [1 << 20, 256 << 10, 64 << 10];
/// Bytes each ib_read_bw attempt reads in total (~2-3 s at rxe-in-TCG speed).
const IB_TOTAL_BYTES: u64 = 64 << 20;

fn has_rdma_device() -> bool {
    std::fs::read_dir("/sys/class/infiniband").is_ok_and(|mut d| d.next().is_some())
}

/// The repository root: from the binary's path (`<root>/target/<profile>/ferry-bench`),
/// else where this crate was built from.
fn repo_root() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let from_exe = exe
        .ancestors()
        .find(|d| d.join("scripts/rxe-vm.sh").is_file())
        .map(Path::to_path_buf);
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    from_exe
        .or_else(|| built.join("scripts/rxe-vm.sh").is_file().then_some(built))
        .context("cannot find the repository (scripts/rxe-vm.sh) for the SoftRoCE guest")
}

/// Runs the benchmark in the SoftRoCE guest; stdout and stderr are passed through, the
/// ratio line is printed last (after `scripts/rxe-vm.sh`'s own log lines).
fn run_in_guest(args: &RdmaArgs) -> anyhow::Result<()> {
    let root = repo_root()?.canonicalize()?;
    let exe = std::env::current_exe()?.canonicalize()?;
    if !exe.starts_with(&root) {
        bail!(
            "{} is outside {}: the guest sees only the repository",
            exe.display(),
            root.display()
        );
    }
    println!(
        "ferry-bench rdma: no RDMA device on this host; running in the SoftRoCE guest \
         (scripts/rxe-vm.sh, timeout {} s)",
        args.guest_timeout_s
    );
    let qps: Vec<String> = args.qps.iter().map(u16::to_string).collect();
    let mut child = Command::new(root.join("scripts/rxe-vm.sh"))
        .arg("--timeout")
        .arg(args.guest_timeout_s.to_string())
        .arg("--")
        .arg(&exe)
        .args(["rdma", "--in-guest", "--mem-mib"])
        .arg(args.mem_mib.to_string())
        .arg("--qps")
        .arg(qps.join(","))
        .args(["--dev", "rxe0", "--gid-index", "1", "--runs"])
        .arg(args.runs.to_string())
        .arg("--results-dir")
        .arg(match &args.results_dir {
            Some(d) => d.clone(),
            None => crate::report::results_dir("rdma")?.canonicalize()?,
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting scripts/rxe-vm.sh")?;
    let err = child.stderr.take().context("stderr")?;
    let err_thread = std::thread::spawn(move || {
        for l in BufReader::new(err).lines().map_while(Result::ok) {
            eprintln!("{l}");
        }
    });
    let mut ratio = None;
    for l in BufReader::new(child.stdout.take().context("stdout")?)
        .lines()
        .map_while(Result::ok)
    {
        if l.starts_with("ratio ferry/ib_read_bw") {
            ratio = Some(l);
        } else {
            println!("{l}");
        }
    }
    let status = child.wait()?;
    let _ = err_thread.join();
    if !status.success() {
        bail!("guest run failed: scripts/rxe-vm.sh exited {status}");
    }
    println!("{}", ratio.context("the guest run printed no ratio line")?);
    Ok(())
}

/// One Ferry migration.
struct FerrySample {
    transport: String,
    gbps: f64,
    round1_src_per_gib: f64,
    total_src_per_gib: f64,
    total_dst_per_gib: f64,
}

/// Samples a process's CPU time every 25 ms until stopped: (time since start, seconds).
struct CpuSampler {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<Vec<(f64, f64)>>,
}

impl CpuSampler {
    fn start(pid: u32, t0: Instant) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let s = Arc::clone(&stop);
        let handle = std::thread::spawn(move || {
            let mut v = Vec::new();
            while !s.load(Ordering::Relaxed) {
                if let Ok(c) = cpu_seconds(pid) {
                    v.push((t0.elapsed().as_secs_f64(), c));
                }
                std::thread::sleep(Duration::from_millis(25));
            }
            v
        });
        Self { stop, handle }
    }

    fn finish(self) -> Vec<(f64, f64)> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap_or_default()
    }
}

/// CPU seconds at time `t` (the last sample at or before it).
fn cpu_at(samples: &[(f64, f64)], t: f64) -> f64 {
    samples
        .iter()
        .take_while(|(at, _)| *at <= t)
        .last()
        .or(samples.first())
        .map_or(0.0, |s| s.1)
}

/// The tails of the scratch directory's logs (sidecars, VMMs), for error messages.
fn log_tails(dir: &Path) -> String {
    let mut out = String::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "log") {
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            out.push_str(&format!("----- {} -----\n", p.display()));
            for l in &lines[lines.len().saturating_sub(8)..] {
                out.push_str(l);
                out.push('\n');
            }
        }
    }
    out
}

fn ferry_once(mem_mib: u64, transport: &str, qps: u16) -> anyhow::Result<FerrySample> {
    // Fresh ports for every pair: a killed sidecar's ports may still be held.
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let k = NEXT.fetch_add(1, Ordering::Relaxed);
    let mut pair = LocalPair::start(&format!("rdma-{transport}{qps}-{k}"), 28_000 + k * 10)?;
    match ferry_migration(&mut pair, mem_mib, transport, qps) {
        Ok(s) => Ok(s),
        Err(e) => Err(e.context(format!(
            "{transport} migration, {qps} streams; logs:\n{}",
            log_tails(&pair.dir)
        ))),
    }
}

fn ferry_migration(
    pair: &mut LocalPair,
    mem_mib: u64,
    transport: &str,
    qps: u16,
) -> anyhow::Result<FerrySample> {
    let a = pair.socket("a").display().to_string();
    let b = pair.socket("b").display().to_string();
    let mem = mem_mib.to_string();
    let common = ["--vm-id", "bench", "--max-runtime-s", "600"];
    let mut src = vec!["--socket", a.as_str(), "--mem-mib", mem.as_str()];
    src.extend(["--fill-pct", "100", "--rate-mib", "0"]);
    src.extend(common);
    let mut dst = vec!["--socket", b.as_str(), "--incoming", "--no-verify"];
    dst.extend(common);
    pair.spawn_vmm("ferry-workload-vmm", "vmm-a", &src.map_strings())?;
    pair.spawn_vmm("ferry-workload-vmm", "vmm-b", &dst.map_strings())?;
    pair.wait_ready(Duration::from_secs(120))?;
    let (src_pid, dst_pid) = (pair.sidecar_pid(0), pair.sidecar_pid(1));
    let (src0, dst0) = (cpu_seconds(src_pid)?, cpu_seconds(dst_pid)?);
    let t0 = Instant::now();
    let sampler = CpuSampler::start(src_pid, t0);
    let s = pair.migrate(
        "bench",
        &[
            "--transport",
            transport,
            "--streams",
            &qps.to_string(),
            "--downtime-ms",
            "60000",
            "--verify",
            "strict",
        ]
        .map(String::from),
    )?;
    let samples = sampler.finish();
    let (src1, dst1) = (cpu_seconds(src_pid)?, cpu_seconds(dst_pid)?);
    if s["result"] != "committed" || s["digest_match"] != true {
        bail!("benchmark migration failed: {s}");
    }
    let got = s["transport"].as_str().unwrap_or("?").to_string();
    if got != transport {
        bail!("asked for transport {transport}, the migration used {got}: {s}");
    }
    // The full copy is round 1 (the guest is idle: the final round is empty).
    let r1 = &s["per_round"][0];
    let bytes = r1["bytes"].as_f64().context("round bytes")?;
    let ms = r1["ms"].as_f64().context("round ms")?;
    let prepare_s = s["prepare_ms"].as_f64().unwrap_or(0.0) / 1e3;
    let r1_cpu = cpu_at(&samples, prepare_s + ms / 1e3) - cpu_at(&samples, prepare_s);
    let gib = (1u64 << 30) as f64;
    let moved_gib = s["bytes_transferred"].as_f64().unwrap_or(bytes) / gib;
    Ok(FerrySample {
        transport: got,
        gbps: bytes * 8.0 / (ms / 1e3) / 1e9,
        round1_src_per_gib: r1_cpu / (bytes / gib),
        total_src_per_gib: (src1 - src0) / moved_gib,
        total_dst_per_gib: (dst1 - dst0) / moved_gib,
    })
}

trait MapStrings {
    fn map_strings(&self) -> Vec<String>;
}

impl MapStrings for Vec<&str> {
    fn map_strings(&self) -> Vec<String> {
        self.iter().map(|s| (*s).to_string()).collect()
    }
}

/// One ib_read_bw result.
struct IbSample {
    gbps: f64,
    size: u64,
    /// What did not work before this result (for the notes).
    failed: Vec<String>,
}

/// Runs ib_read_bw server and client on 127.0.0.1; `Ok(Err(why))` when it gave no
/// bandwidth: a timeout, a failed exit, or 0 Gb/s (no completed iteration, or perftest's
/// CPU-clock calibration failing under TCG, which it reports as 0 Gb/s).
fn ib_read_bw_once(args: &RdmaArgs, qps: u16, size: u64) -> anyhow::Result<Result<f64, String>> {
    let port = (18_600 + qps).to_string();
    let iters = (IB_TOTAL_BYTES / size / u64::from(qps)).max(16).to_string();
    let common = |c: &mut Command| {
        c.args(["-d", &args.dev, "-x", &args.gid_index.to_string(), "-F"])
            .args(["-q", &qps.to_string(), "-s", &size.to_string()])
            .args(["-n", &iters, "-p", &port, "--report_gbits"]);
    };
    let mut sc = Command::new("ib_read_bw");
    common(&mut sc);
    let server = Kid(sc
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting ib_read_bw (perftest)")?);
    std::thread::sleep(Duration::from_millis(1500));
    let mut cc = Command::new("ib_read_bw");
    common(&mut cc);
    // Its output is a few KiB: it fits the pipes until it exits.
    let mut client = Kid(cc
        .arg("127.0.0.1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?);
    let end = Instant::now() + Duration::from_secs(25);
    let status = loop {
        if let Some(st) = client.0.try_wait()? {
            break st;
        }
        if Instant::now() > end {
            return Ok(Err("timed out after 25 s".into())); // Kid's drop kills it.
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    drop(server);
    let (mut out, mut err) = (String::new(), String::new());
    if let Some(mut o) = client.0.stdout.take() {
        std::io::Read::read_to_string(&mut o, &mut out)?;
    }
    if let Some(mut e) = client.0.stderr.take() {
        std::io::Read::read_to_string(&mut e, &mut err)?;
    }
    if !status.success() {
        return Ok(Err(format!("client {status}")));
    }
    // " #bytes  #iterations  BW peak[Gb/sec]  BW average[Gb/sec]  MsgRate[Mpps]"
    let avg = out.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() >= 4 && f[0] == size.to_string())
            .then(|| f[3].parse::<f64>().ok())
            .flatten()
    });
    Ok(match avg {
        Some(g) if g > 0.0 => Ok(g),
        Some(_) if err.contains("Correlation coefficient") => {
            Err("0 Gb/s: perftest's CPU clock calibration failed (r^2 < 0.9 under TCG)".into())
        }
        Some(_) => Err("0 Gb/s (no completed iteration)".into()),
        None => Err("no result line".into()),
    })
}

/// The largest message size (from 1 MiB down) that gives a result, two attempts each.
fn ib_read_bw(args: &RdmaArgs, qps: u16) -> anyhow::Result<IbSample> {
    let mut failed = Vec::new();
    for size in IB_SIZES {
        for attempt in 1..=2 {
            match ib_read_bw_once(args, qps, size)? {
                Ok(gbps) => return Ok(IbSample { gbps, size, failed }),
                Err(why) => failed.push(format!("{} KiB attempt {attempt}: {why}", size >> 10)),
            }
        }
    }
    bail!("ib_read_bw -q {qps} gave no result at any size ({failed:?})")
}

fn measure(args: &RdmaArgs) -> anyhow::Result<()> {
    if !has_rdma_device() {
        bail!("--in-guest: no RDMA device (/sys/class/infiniband is empty)");
    }
    bin("ferry")?;
    println!(
        "ferry-bench rdma: {} MiB random-filled idle region, RDMA READ pull on {} (GID {}), \
         Ferry reads {} KiB per work request; {} run(s) per QP count, each a Ferry migration \
         and an ib_read_bw transfer: medians, ratio run by run as median [min-max]",
        args.mem_mib,
        args.dev,
        args.gid_index,
        FERRY_READ_BYTES >> 10,
        args.runs.max(1)
    );
    println!(
        "{:>4} {:>10} {:>10} {:>10} {:>9} {:>19} {:>14} {:>14} {:>14}",
        "qps",
        "ferry Gb/s",
        "ferry MB/s",
        "ib_rd Gb/s",
        "ib msg",
        "ratio",
        "src r1 s/GiB",
        "src all s/GiB",
        "dst all s/GiB"
    );
    let mut notes = Vec::new();
    let mut last = None;
    let (mut groups, mut records) = (Vec::new(), Vec::new());
    for &n in &args.qps {
        // Every run pairs a Ferry migration with an ib_read_bw transfer; the ratio is taken
        // run by run and stated as median [min-max]; the CPU figures are the median run's.
        let mut runs: Vec<(FerrySample, IbSample)> = Vec::new();
        for _ in 0..args.runs.max(1) {
            let f = ferry_once(args.mem_mib, "rdma", n)?;
            let ib = ib_read_bw(args, n)?;
            runs.push((f, ib));
        }
        let ratios: Vec<f64> = runs.iter().map(|(f, ib)| f.gbps / ib.gbps).collect();
        let (ratio, rlo, rhi) = spread(ratios.clone());
        let mid = ratios
            .iter()
            .position(|&r| r == ratio)
            .context("median run")?;
        let (fm, _, _) = spread(runs.iter().map(|(f, _)| f.gbps).collect());
        let (im, _, _) = spread(runs.iter().map(|(_, i)| i.gbps).collect());
        let (f, ib) = runs.swap_remove(mid);
        println!(
            "{:>4} {:>10.3} {:>10.1} {:>10.3} {:>9} {:>19} {:>14.3} {:>14.3} {:>14.3}",
            n,
            fm,
            fm * 1e9 / 8.0 / 1e6,
            im,
            format!("{} KiB", ib.size >> 10),
            format!("{ratio:.3} [{rlo:.3}-{rhi:.3}]"),
            f.round1_src_per_gib,
            f.total_src_per_gib,
            f.total_dst_per_gib
        );
        if ib.size != FERRY_READ_BYTES || !ib.failed.is_empty() {
            notes.push(format!(
                "qps={n}: ib_read_bw used {} KiB messages (Ferry: {} KiB); before that: {}",
                ib.size >> 10,
                FERRY_READ_BYTES >> 10,
                ib.failed.join(", ")
            ));
        }
        groups.push((format!("{n} QPs"), vec![fm, im]));
        records.push(
            serde_json::json!({"qps": n, "ferry_gbps_median": fm, "ib_read_bw_gbps_median": im,
            "ib_read_bw_msg_bytes": ib.size, "ratio_median": ratio, "ratio_min": rlo,
            "ratio_max": rhi, "ratios": ratios,
            "src_round1_cpu_s_per_gib": f.round1_src_per_gib,
            "src_cpu_s_per_gib": f.total_src_per_gib, "dst_cpu_s_per_gib": f.total_dst_per_gib}),
        );
        last = Some((n, ratio, f));
    }
    let dir = match &args.results_dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => crate::report::results_dir("rdma")?,
    };
    crate::report::record_in(
        &dir,
        "rdma",
        &serde_json::json!({"mem_mib": args.mem_mib, "dev": args.dev, "runs": args.runs,
            "read_bytes": FERRY_READ_BYTES, "by_qps": records}),
        &[(
            "throughput",
            crate::report::grouped_bars(
                &format!(
                    "RDMA READ pull of {} MiB on {} (best of {} runs)",
                    args.mem_mib,
                    args.dev,
                    args.runs.max(1)
                ),
                "Gb/s",
                &["ferry", "ib_read_bw"],
                &groups,
            ),
        )],
    )?;
    let (n, ratio, r) = last.context("no queue-pair count given")?;
    let t = ferry_once(args.mem_mib, "tcp", n)?;
    println!(
        "source CPU, same region, {n} streams (the rdma row is the median qps={n} run above):"
    );
    println!(
        "{:>9} {:>10} {:>14} {:>14} {:>14}",
        "transport", "Gb/s", "src r1 s/GiB", "src all s/GiB", "dst all s/GiB"
    );
    for s in [&r, &t] {
        println!(
            "{:>9} {:>10.3} {:>14.3} {:>14.3} {:>14.3}",
            s.transport, s.gbps, s.round1_src_per_gib, s.total_src_per_gib, s.total_dst_per_gib
        );
    }
    println!(
        "src r1 = source sidecar CPU during round 1 (the full copy); src/dst all = whole \
         migration incl. the strict digest (XXH3 of the region on each side)"
    );
    for note in notes {
        println!("note: {note}");
    }
    println!("ratio ferry/ib_read_bw qps={n}: {ratio:.3}");
    Ok(())
}

/// Runs the benchmark (in the SoftRoCE guest when this host has no RDMA device) and
/// prints the table; the last line is the ratio at 4 queue pairs (or the last count).
///
/// # Errors
///
/// When the guest, a migration or ib_read_bw fails.
pub fn run(args: &RdmaArgs) -> anyhow::Result<()> {
    if args.in_guest || has_rdma_device() {
        measure(args)
    } else {
        run_in_guest(args)
    }
}
