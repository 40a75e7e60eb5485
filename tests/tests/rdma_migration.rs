//! End-to-end over RDMA: two sidecars and two workload VMMs on one SoftRoCE device
//! (rxe0 on `lo`; rdma_cm does not work there, so Ferry exchanges QP data over its own
//! authenticated control connection). `#[ignore]`d on hosts without RDMA (listed as
//! ignored, not passed); `scripts/rdma-tests.sh` runs them inside the SoftRoCE guest with
//! `--include-ignored`, and an explicitly requested test without a device fails.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ferry_tests::{bin, make_certs, serial, status, summary_of, tls_args, wait_for, Proc};

/// Fails the test unless this run has an RDMA device.
fn require_rdma() {
    let present = Path::new("/sys/class/infiniband")
        .read_dir()
        .map(|mut d| d.next().is_some())
        .unwrap_or(false);
    assert!(present, "this test needs an RDMA device and there is none");
}

struct Loopback {
    dir: PathBuf,
    procs: Vec<Proc>,
    port_b: u16,
}

impl Loopback {
    fn start(tag: &str, mem_mib: u64, dest_env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("ferry-rdma-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        // Mutual TLS on the control and TCP data connections; RDMA allowed to the peer.
        make_certs(&dir, "ca", &[("a", "127.0.0.1"), ("b", "127.0.0.1")])?;
        let port_a = 7790;
        let port_b = 7791;
        let mut procs = Vec::new();
        for (side, port) in [("a", port_a), ("b", port_b)] {
            let mut c = Command::new(bin("ferry"));
            c.arg("serve")
                .arg("--socket")
                .arg(dir.join(format!("{side}.sock")))
                .args(["--listen", &format!("127.0.0.1:{port}")])
                .args(tls_args(&dir, "ca", side))
                .args(["--rdma-peer", "127.0.0.1"])
                .arg("--state-dir")
                .arg(dir.join(format!("state-{side}")));
            if side == "b" {
                c.envs(dest_env.iter().copied());
            }
            procs.push(Proc::spawn(
                &format!("sidecar-{side}"),
                c,
                dir.join(format!("sidecar-{side}.log")),
            )?);
        }
        for side in ["a", "b"] {
            let s = dir.join(format!("{side}.sock"));
            wait_for("sidecar socket", Duration::from_secs(20), || s.exists())?;
        }
        let mut c = Command::new(bin("ferry-workload-vmm"));
        c.arg("--socket")
            .arg(dir.join("a.sock"))
            .args([
                "--vm-id",
                "vm1",
                "--mem-mib",
                &mem_mib.to_string(),
                "--rate-mib",
                "8",
            ])
            // Writes stay in a 16 MiB hot set at the start of RAM: the quarter never
            // written stays holes, also where shmem is allocated in 2 MiB pages (the
            // SoftRoCE guest's kernel: a write anywhere in 2 MiB makes all of it data).
            .args(["--pattern", "hot", "--hot-mib", "16"])
            .args(["--writers", "1", "--max-runtime-s", "600", "--status-file"])
            .arg(dir.join("vm-a.json"));
        procs.push(Proc::spawn("vmm-a", c, dir.join("vmm-a.log"))?);
        let mut c = Command::new(bin("ferry-workload-vmm"));
        c.arg("--socket")
            .arg(dir.join("b.sock"))
            .args([
                "--vm-id",
                "vm1",
                "--incoming",
                "--writers",
                "1",
                "--max-runtime-s",
                "600",
            ])
            .arg("--status-file")
            .arg(dir.join("vm-b.json"));
        procs.push(Proc::spawn("vmm-b", c, dir.join("vmm-b.log"))?);
        let l = Self { dir, procs, port_b };
        wait_for("source VM running", Duration::from_secs(180), || {
            status(&l.dir.join("vm-a.json")).is_some_and(|s| s.state == "running")
        })?;
        wait_for("destination VMM waiting", Duration::from_secs(60), || {
            status(&l.dir.join("vm-b.json")).is_some_and(|s| s.state == "waiting")
        })?;
        // Registration follows the status file by a moment.
        std::thread::sleep(Duration::from_millis(500));
        Ok(l)
    }

    fn migrate(&self, extra: &[&str]) -> anyhow::Result<serde_json::Value> {
        let child = Command::new(bin("ferry"))
            .args([
                "migrate",
                "vm1",
                "--json",
                "--to",
                &format!("127.0.0.1:{}", self.port_b),
            ])
            .arg("--socket")
            .arg(self.dir.join("a.sock"))
            .args(["--verify", "strict"])
            .args(extra)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        summary_of(child)
    }

    fn logs(&self) -> String {
        self.procs
            .iter()
            .map(|p| format!("----- {} -----\n{}", p.name, p.log_text()))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Loopback {
    fn drop(&mut self) {
        self.procs.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
#[ignore = "needs an RDMA device: scripts/rdma-tests.sh runs it in the SoftRoCE guest"]
fn migrates_over_rdma_read_with_four_queue_pairs() -> anyhow::Result<()> {
    require_rdma();
    let _g = serial();
    let l = Loopback::start("pull", 256, &[])?;
    let s = l.migrate(&[
        "--transport",
        "rdma",
        "--streams",
        "4",
        "--downtime-ms",
        "2000",
    ])?;
    assert_eq!(s["result"], "committed", "{s:#}\n{}", l.logs());
    assert_eq!(s["transport"], "rdma", "{s:#}");
    assert_eq!(s["channels"], 4);
    assert_eq!(s["digest_match"], true);
    // The quarter of the guest never written is holes of the source's memfds: not pulled
    // (known zero without a read); everything else is.
    let holes = s["hole_pages_skipped"].as_u64().unwrap_or(0);
    assert!(holes >= 16_000, "{s:#}");
    assert!(
        s["bytes_transferred"].as_u64().unwrap_or(0) + holes * 4096 >= 256 << 20,
        "{s:#}"
    );
    wait_for("destination guest running", Duration::from_secs(30), || {
        status(&l.dir.join("vm-b.json")).is_some_and(|v| v.state == "running")
    })?;
    let b1 = status(&l.dir.join("vm-b.json")).expect("status").total;
    std::thread::sleep(Duration::from_millis(1500));
    let b2 = status(&l.dir.join("vm-b.json")).expect("status").total;
    assert!(b2 > b1, "destination guest did not continue: {b1} -> {b2}");
    Ok(())
}

/// A bandwidth cap holds on RDMA too: the source hands out the pull list in paced pieces.
#[test]
#[ignore = "needs an RDMA device: scripts/rdma-tests.sh runs it in the SoftRoCE guest"]
fn a_bandwidth_cap_holds_on_rdma() -> anyhow::Result<()> {
    require_rdma();
    let _g = serial();
    let l = Loopback::start("capped", 64, &[])?;
    let s = l.migrate(&[
        "--transport",
        "rdma",
        "--streams",
        "4",
        "--downtime-ms",
        "2000",
        "--max-bandwidth",
        "10",
    ])?;
    assert_eq!(s["result"], "committed", "{s:#}\n{}", l.logs());
    assert_eq!(s["transport"], "rdma", "{s:#}");
    let bytes = s["bytes_transferred"].as_u64().unwrap_or(0);
    let data_ms: f64 = s["per_round"]
        .as_array()
        .expect("rounds")
        .iter()
        .filter_map(|r| r["ms"].as_f64())
        .sum();
    let rate = bytes as f64 / (1u64 << 20) as f64 / (data_ms / 1e3);
    eprintln!("RDMA capped at 10 MiB/s: {rate:.2} MiB/s over {bytes} bytes");
    // Round 1 pulls every page but the holes.
    let holes = s["hole_pages_skipped"].as_u64().unwrap_or(0);
    assert!(bytes + holes * 4096 >= 64 << 20, "{s:#}");
    assert!((9.0..=11.0).contains(&rate), "{rate:.2} MiB/s\n{s:#}");
    Ok(())
}

#[test]
#[ignore = "needs an RDMA device: scripts/rdma-tests.sh runs it in the SoftRoCE guest"]
fn a_failed_queue_pair_falls_back_to_tcp_and_loses_nothing() -> anyhow::Result<()> {
    require_rdma();
    let _g = serial();
    // Queue pair 0 fails after 32 MiB of round 1: the rest must come over TCP.
    let l = Loopback::start(
        "fallback",
        256,
        &[("FERRY_TEST_FAIL_RDMA_AFTER_BYTES", "33554432")],
    )?;
    let s = l.migrate(&[
        "--transport",
        "auto",
        "--streams",
        "4",
        "--downtime-ms",
        "2000",
    ])?;
    assert_eq!(s["result"], "committed", "{s:#}\n{}", l.logs());
    assert_eq!(s["transport"], "rdma+tcp", "{s:#}");
    assert!(
        s["transport_reason"]
            .as_str()
            .is_some_and(|r| r.contains("re-sent over TCP")),
        "{s:#}"
    );
    assert_eq!(s["digest_match"], true, "{s:#}");
    wait_for("destination guest running", Duration::from_secs(30), || {
        status(&l.dir.join("vm-b.json")).is_some_and(|v| v.state == "running")
    })?;
    Ok(())
}

#[test]
#[ignore = "needs an RDMA device: scripts/rdma-tests.sh runs it in the SoftRoCE guest"]
fn ferry_devices_lists_the_softroce_device() {
    require_rdma();
    let out = Command::new(bin("ferry"))
        .arg("devices")
        .output()
        .expect("ferry devices");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("rxe0"), "{text}");
}
