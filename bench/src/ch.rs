//! `ferry-bench ch`: an unmodified Cloud Hypervisor VM (Ferry's PVH test guest, dirtying
//! memory) migrated over loopback two ways in one run, alternating: by CH's own TCP
//! transport with N connections ("ch-direct"), and through two Ferry sidecars with N
//! streams (mutual TLS by default). Reported per run: CH's own figures (total time and
//! effective downtime, from its log), the wall time from the request to the destination
//! running, and CPU seconds per side (CH processes, plus the sidecars on Ferry's path).
//! A third way, Ferry's post-copy (`--postcopy`), runs in the same rounds: its downtime
//! (CH's own figure, the source's pause to the destination running) and its pull time
//! (the destination running to its last page landed, from Ferry's summary). Every way runs
//! the same guest; post-copy's has shared memory (local mode needs it), the others private
//! memory (CH then sends every page in its first round; with shared memory it skips the
//! pages never written, which this guest leaves most of).
//! The last line is `speed ratio ferry/ch-direct <mem> streams=<n>: <x>`: CH-direct's
//! median total time over Ferry's pre-copy (>= 1.0: Ferry costs no time).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::report::spread;
use anyhow::{bail, Context};

use crate::local::{bin, cpu_seconds, Kid, LocalPair, PairAuth};

/// Options of `ferry-bench ch`.
#[derive(clap::Args, Debug)]
pub struct ChArgs {
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 1024)]
    pub mem_mib: u64,
    /// Connections (CH) and streams (Ferry).
    #[arg(long, default_value_t = 4)]
    pub streams: u16,
    /// Runs of each way.
    #[arg(long, default_value_t = 3)]
    pub runs: u32,
    /// Ferry's sidecars authenticate with a shared key instead of TLS (nothing encrypted,
    /// as CH's own transport without `tls_dir`).
    #[arg(long)]
    pub psk: bool,
}

struct Run {
    ch_total_s: f64,
    downtime_ms: f64,
    wall_s: f64,
    cpu_src: f64,
    cpu_dst: f64,
    /// Post-copy: the destination running to its last page landed.
    pull_s: f64,
    /// Post-copy: bytes pulled over the network (the rest were holes at the source,
    /// zero-filled at the destination).
    pulled: u64,
}

/// A CH process with its API socket and log.
struct Ch {
    kid: Kid,
    api: PathBuf,
    log: PathBuf,
}

fn start_ch(dir: &Path, name: &str, vm: Option<(&Path, u64, bool)>) -> anyhow::Result<Ch> {
    let beside = bin("ferry")?
        .ancestors()
        .nth(4)
        .context("the repository's parent")?
        .to_owned();
    let ch = ferry_ch::host::ch_bin(&beside)
        .context("no Cloud Hypervisor: set FERRY_CH_BIN or put cloud-hypervisor on PATH")?;
    let shim = ferry_ch::host::shim(&ch, &dir.join("shim.so"))?;
    let api = dir.join(format!("{name}.api"));
    let log = dir.join(format!("{name}.log"));
    let mut c = Command::new(&ch);
    c.arg("--api-socket")
        .arg(&api)
        .args(["--seccomp", "log", "-v"]);
    if let Some((kernel, mem, shared)) = vm {
        c.arg("--kernel")
            .arg(kernel)
            .args(["--cpus", "boot=1", "--memory"])
            .arg(format!(
                "size={mem}M{}",
                if shared { ",shared=on" } else { "" }
            ))
            .arg("--serial")
            .arg(format!("file={}", dir.join("serial.txt").display()))
            .args(["--console", "off"]);
    }
    if let Some(s) = shim {
        c.env("LD_PRELOAD", s);
    }
    let kid = Kid(c
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()?);
    let end = Instant::now() + Duration::from_secs(10);
    while !api.exists() {
        if Instant::now() > end {
            bail!("{name}: no API socket");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(Ch { kid, api, log })
}

/// CH's own "Migration completed after X s with a downtime of Y ms".
fn ch_figures(log: &Path) -> anyhow::Result<(f64, f64)> {
    let text = std::fs::read_to_string(log)?;
    let line = text
        .lines()
        .find(|l| l.contains("Migration completed after"))
        .context("the source CH did not report a completed migration")?;
    let after = line
        .split("Migration completed after ")
        .nth(1)
        .context("format")?;
    let total: f64 = after.split('s').next().context("format")?.parse()?;
    let dt: f64 = after
        .split("downtime of ")
        .nth(1)
        .and_then(|r| r.split("ms").next())
        .context("format")?
        .parse()?;
    Ok((total, dt))
}

fn wait_counting(dir: &Path) -> anyhow::Result<()> {
    let end = Instant::now() + Duration::from_secs(20);
    while ferry_ch_guest::progress(&dir.join("serial.txt")).pass < 16 {
        if Instant::now() > end {
            bail!("the guest does not run");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn wait_exit(kid: &mut Kid, limit: Duration) -> anyhow::Result<()> {
    let end = Instant::now() + limit;
    while kid.0.try_wait()?.is_none() {
        if Instant::now() > end {
            bail!("the source CH did not exit");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// The source CH exits on success: its CPU seconds read just before, by polling from
/// `t` on (`start`: its CPU when the migration began).
fn cpu_until_exit(kid: &mut Kid, start: f64, t: Instant) -> anyhow::Result<f64> {
    let mut last = start;
    while kid.0.try_wait()?.is_none() {
        if let Ok(c) = cpu_seconds(kid.0.id()) {
            last = c;
        }
        if t.elapsed() > Duration::from_secs(600) {
            bail!("the source CH did not finish");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(last)
}

fn direct(a: &ChArgs, run: u32) -> anyhow::Result<Run> {
    let dir =
        std::env::temp_dir().join(format!("ferry-bench-ch-{}-direct{run}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let kernel = dir.join("guest.elf");
    std::fs::write(&kernel, ferry_ch_guest::GUEST_ELF)?;
    let mut src = start_ch(&dir, "src", Some((&kernel, a.mem_mib, false)))?;
    wait_counting(&dir)?;
    let dst = start_ch(&dir, "dst", None)?;
    let port = 31_000 + run as u16;
    let url = format!("tcp:127.0.0.1:{port}");
    let api = dst.api.clone();
    let recv = {
        let url = url.clone();
        std::thread::spawn(move || {
            ferry_ch::api::call(
                &api,
                "PUT",
                "vm.receive-migration",
                Some(&serde_json::json!({"receiver_url": url})),
                Duration::from_secs(600),
            )
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let cpu0 = (cpu_seconds(src.kid.0.id())?, cpu_seconds(dst.kid.0.id())?);
    let t = Instant::now();
    let body = serde_json::json!({"destination_url": url, "connections": a.streams});
    let r = ferry_ch::api::call(
        &src.api,
        "PUT",
        "vm.send-migration",
        Some(&body),
        Duration::from_secs(30),
    )?;
    anyhow::ensure!(r.ok(), "send-migration: {} {}", r.status, r.body);
    let cpu_src = cpu_until_exit(&mut src.kid, cpu0.0, t)? - cpu0.0;
    let got = recv
        .join()
        .map_err(|_| anyhow::anyhow!("receive thread"))??;
    anyhow::ensure!(got.ok(), "receive-migration: {} {}", got.status, got.body);
    let wall_s = t.elapsed().as_secs_f64();
    let cpu_dst = cpu_seconds(dst.kid.0.id())? - cpu0.1;
    wait_exit(&mut src.kid, Duration::from_secs(10))?;
    let (ch_total_s, downtime_ms) = ch_figures(&src.log)?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Run {
        ch_total_s,
        downtime_ms,
        wall_s,
        cpu_src,
        cpu_dst,
        pull_s: 0.0,
        pulled: 0,
    })
}

fn through_ferry(a: &ChArgs, run: u32, postcopy: bool) -> anyhow::Result<Run> {
    let auth = if a.psk { PairAuth::Psk } else { PairAuth::Tls };
    let name = format!("ch{}{run}", if postcopy { "pc" } else { "" });
    let port = 31_100 + (run as u16) * 4 + if postcopy { 2 } else { 0 };
    let pair = LocalPair::start_with(&name, port, auth)?;
    let dir = pair.dir.clone();
    let kernel = dir.join("guest.elf");
    std::fs::write(&kernel, ferry_ch_guest::GUEST_ELF)?;
    let mut src = start_ch(&dir, "src", Some((&kernel, a.mem_mib, postcopy)))?;
    wait_counting(&dir)?;
    let dst = start_ch(&dir, "dst", None)?;
    let ferry = bin("ferry")?;
    for (side, api, verb) in [("a", &src.api, "register"), ("b", &dst.api, "await")] {
        let o = Command::new(&ferry)
            .args(["ch", verb, "--vm-id", "vm1", "--api-socket"])
            .arg(api)
            .arg("--socket")
            .arg(pair.socket(side))
            .output()?;
        anyhow::ensure!(
            o.status.success(),
            "ferry ch {verb}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let pids = (pair.sidecar_pid(0), pair.sidecar_pid(1));
    let cpu0 = (
        cpu_seconds(src.kid.0.id())? + cpu_seconds(pids.0)?,
        cpu_seconds(dst.kid.0.id())? + cpu_seconds(pids.1)?,
    );
    let t = Instant::now();
    let child = Command::new(&ferry)
        .args([
            "migrate",
            "vm1",
            "--json",
            "--streams",
            &a.streams.to_string(),
            "--to",
        ])
        .arg(format!("127.0.0.1:{}", pair.port_b))
        .args(postcopy.then_some("--postcopy"))
        .arg("--socket")
        .arg(pair.socket("a"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let src_ch_cpu = cpu_until_exit(&mut src.kid, cpu0.0 - cpu_seconds(pids.0)?, t)?;
    let out = child.wait_with_output()?;
    let wall_s = t.elapsed().as_secs_f64();
    let s: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| String::from_utf8_lossy(&out.stderr).into_owned())?;
    anyhow::ensure!(s["result"] == "committed", "ferry migrate: {s}");
    let cpu_src = src_ch_cpu + cpu_seconds(pids.0)? - cpu0.0;
    let cpu_dst = cpu_seconds(dst.kid.0.id())? + cpu_seconds(pids.1)? - cpu0.1;
    let (ch_total_s, downtime_ms) = ch_figures(&src.log)?;
    Ok(Run {
        ch_total_s,
        downtime_ms,
        wall_s,
        cpu_src,
        cpu_dst,
        pull_s: s["postcopy_pull_ms"].as_f64().unwrap_or(0.0) / 1e3,
        pulled: s["bytes_transferred"].as_u64().unwrap_or(0),
    })
}

/// Runs both ways alternately and prints the table; the last line is the speed ratio.
///
/// # Errors
///
/// CH missing, or a migration failing.
pub fn run(a: &ChArgs) -> anyhow::Result<()> {
    anyhow::ensure!(a.runs > 0, "--runs must be at least 1");
    let mode = if a.psk {
        "--insecure-psk"
    } else {
        "mutual TLS 1.3"
    };
    println!(
        "ferry-bench ch: {} MiB PVH guest dirtying memory, Cloud Hypervisor over loopback: its own TCP transport with {} connections vs two Ferry sidecars ({mode}) with {} streams; {} runs each",
        a.mem_mib, a.streams, a.streams, a.runs
    );
    let (mut d, mut f, mut p) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..a.runs {
        for (way, out) in [
            ("ch-direct", &mut d),
            ("ferry", &mut f),
            ("ferry-postcopy", &mut p),
        ] {
            let x = match way {
                "ferry" => through_ferry(a, r, false)?,
                "ferry-postcopy" => through_ferry(a, r, true)?,
                _ => direct(a, r)?,
            };
            println!(
                "  run {r} {way:<14}: CH total {:.2} s, downtime {:.0} ms, wall {:.2} s, CPU source {:.2} s, destination {:.2} s{}",
                x.ch_total_s,
                x.downtime_ms,
                x.wall_s,
                x.cpu_src,
                x.cpu_dst,
                if way == "ferry-postcopy" {
                    format!(", pull {:.2} s ({} MiB pulled)", x.pull_s, x.pulled >> 20)
                } else {
                    String::new()
                }
            );
            out.push(x);
        }
    }
    let (pm, pl, ph) = spread(p.iter().map(|x| x.pull_s).collect());
    let (wm, wl, wh) = spread(p.iter().map(|x| x.wall_s).collect());
    let (bm, _, _) = spread(p.iter().map(|x| x.pulled as f64).collect());
    for (way, v) in [("ch-direct", &d), ("ferry", &f), ("ferry-postcopy", &p)] {
        if way == "ferry-postcopy" {
            let (dt, dl, dh) = spread(v.iter().map(|x| x.downtime_ms).collect());
            let (cs, _, _) = spread(v.iter().map(|x| x.cpu_src).collect());
            let (cd, _, _) = spread(v.iter().map(|x| x.cpu_dst).collect());
            println!(
                "  {way:<14}: wall median {wm:.2} s [{wl:.2}-{wh:.2}], downtime median {dt:.0} ms [{dl:.0}-{dh:.0}], CPU source {cs:.2} s, destination {cd:.2} s"
            );
            continue;
        }
        let (t, tl, th) = spread(v.iter().map(|x| x.ch_total_s).collect());
        let (dt, dl, dh) = spread(v.iter().map(|x| x.downtime_ms).collect());
        let (cs, _, _) = spread(v.iter().map(|x| x.cpu_src).collect());
        let (cd, _, _) = spread(v.iter().map(|x| x.cpu_dst).collect());
        println!(
            "  {way:<14}: total median {t:.2} s [{tl:.2}-{th:.2}], downtime median {dt:.0} ms [{dl:.0}-{dh:.0}], CPU source {cs:.2} s, destination {cd:.2} s"
        );
    }
    println!(
        "  ferry-postcopy: pull median {pm:.2} s [{pl:.2}-{ph:.2}], {:.0} MiB pulled, the rest zero-filled (the VM ran at the destination meanwhile, depending on both hosts)",
        bm / f64::from(1 << 20)
    );
    let med = |v: &[Run], g: fn(&Run) -> f64| spread(v.iter().map(g).collect()).0;
    // One figure's medians for the three ways, in the series' order.
    let three = |g: fn(&Run) -> f64| vec![med(&d, g), med(&f, g), med(&p, g)];
    let rec = |v: &[Run]| -> Vec<serde_json::Value> {
        v.iter()
            .map(|x| {
                serde_json::json!({"ch_total_s": x.ch_total_s, "downtime_ms": x.downtime_ms,
                "wall_s": x.wall_s, "cpu_src_s": x.cpu_src, "cpu_dst_s": x.cpu_dst,
                "pull_s": x.pull_s, "pulled_bytes": x.pulled})
            })
            .collect()
    };
    crate::report::record(
        "ch",
        &serde_json::json!({"mem_mib": a.mem_mib, "streams": a.streams, "psk": a.psk,
            "ch_direct": rec(&d), "ferry": rec(&f), "ferry_postcopy": rec(&p)}),
        &[
            (
                "times",
                crate::report::grouped_bars(
                    &format!(
                        "Cloud Hypervisor migration of {} MiB (median of {} runs)",
                        a.mem_mib, a.runs
                    ),
                    "s",
                    &["ch-direct", "ferry", "ferry-postcopy"],
                    &[
                        ("wall time".into(), three(|x| x.wall_s)),
                        ("CPU source".into(), three(|x| x.cpu_src)),
                        ("CPU destination".into(), three(|x| x.cpu_dst)),
                    ],
                ),
            ),
            (
                "downtime",
                crate::report::dots(
                    "Downtime per run",
                    "ms",
                    &[
                        (
                            "ch-direct".into(),
                            d.iter().map(|x| x.downtime_ms).collect(),
                        ),
                        ("ferry".into(), f.iter().map(|x| x.downtime_ms).collect()),
                        (
                            "ferry-postcopy".into(),
                            p.iter().map(|x| x.downtime_ms).collect(),
                        ),
                    ],
                ),
            ),
        ],
    )?;
    let ratios: Vec<f64> = d
        .iter()
        .zip(&f)
        .map(|(x, y)| x.ch_total_s / y.ch_total_s)
        .collect();
    let (rm, rl, rh) = spread(ratios);
    println!("  per-run ratios median {rm:.2} [{rl:.2}-{rh:.2}]");
    let (dm, _, _) = spread(d.iter().map(|x| x.ch_total_s).collect());
    let (fm, _, _) = spread(f.iter().map(|x| x.ch_total_s).collect());
    println!(
        "speed ratio ferry/ch-direct {}GiB streams={}: {:.2}",
        a.mem_mib as f64 / 1024.0,
        a.streams,
        dm / fm
    );
    Ok(())
}
