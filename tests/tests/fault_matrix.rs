//! The fault matrix (`ferry_tests::matrix::MATRIX`), one test per cell: real sidecars and
//! workload VMMs in two network namespaces, the fault injected at its exact point (the
//! sidecars' test build holds there: `FERRY_TEST_HOLD`), the operator's action if the cell
//! has one, and the end checked: the VM runs on exactly one host (with the latest memory
//! at the destination: its VMM verified every page), or died with its own VMM. A watcher
//! checks the whole time that the two VMs never run at once.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use ferry_tests::matrix::{Ends, Fault, Phase, Proc, Then, MATRIX};
use ferry_tests::*;

/// How long a sidecar holds at a fault point: long enough to strike, short enough to keep
/// the suite quick.
const HOLD_MS: u64 = 4000;

fn proc_index(p: Proc) -> usize {
    match p {
        Proc::SourceSidecar => SIDECAR_A,
        Proc::DestSidecar => SIDECAR_B,
        Proc::SourceVmm => VMM_A,
        Proc::DestVmm => VMM_B,
    }
}

/// Watches both status files until stopped; true if both VMs ever ran at once.
struct NeverTwice {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<bool>>,
}

impl NeverTwice {
    fn watch(cl: &Cluster) -> Self {
        let (a, b) = (cl.hosts.path("vm-a.json"), cl.hosts.path("vm-b.json"));
        let stop = Arc::new(AtomicBool::new(false));
        let s = Arc::clone(&stop);
        let handle = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let ra = status(&a).is_some_and(|v| v.runs());
                let rb = status(&b).is_some_and(|v| v.runs());
                if ra && rb {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            false
        });
        Self {
            stop,
            handle: Some(handle),
        }
    }

    fn ran_twice(mut self) -> bool {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.take().is_some_and(|h| h.join().unwrap_or(true))
    }
}

/// A TCP proxy inside host A's namespace, in front of B's sidecar, that flips one byte of
/// the first data connection's source-to-destination stream: with `plaintext`, in the
/// middle of the first page batch's payload (found by parsing the frames); else at a
/// fixed offset past the TLS handshake.
fn corrupting_proxy(cl: &Cluster, plaintext: bool) -> anyhow::Result<(String, Arc<AtomicUsize>)> {
    let ns = std::fs::File::open(format!("/var/run/netns/{}", cl.hosts.ns[0]))?;
    let listen = format!("{ADDR_A}:7781");
    let upstream = format!("{ADDR_B}:{PORT}");
    let flipped = Arc::new(AtomicUsize::new(0));
    let (tx, rx) = std::sync::mpsc::channel();
    let f = Arc::clone(&flipped);
    std::thread::spawn(move || {
        // SAFETY: setns on this thread only (CLONE_NEWNET), with an open namespace fd; the
        // sockets this thread creates live in host A's namespace.
        let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        let l = match (rc == 0).then(|| TcpListener::bind(&listen)) {
            Some(Ok(l)) => l,
            _ => {
                let _ = tx.send(false);
                return;
            }
        };
        let _ = tx.send(true);
        for (n, down) in l.incoming().flatten().enumerate() {
            let Ok(up) = TcpStream::connect(&upstream) else {
                continue;
            };
            let corrupt = n == 1; // the control connection is first, then data 0
            let (d2, u2) = (
                down.try_clone().expect("clone"),
                up.try_clone().expect("clone"),
            );
            let f = Arc::clone(&f);
            std::thread::spawn(move || copy(down, up, corrupt, plaintext, &f));
            std::thread::spawn(move || copy(u2, d2, false, plaintext, &AtomicUsize::new(0)));
        }
    });
    if !rx.recv_timeout(Duration::from_secs(5)).unwrap_or(false) {
        bail!("the proxy could not start in host A's namespace");
    }
    Ok((format!("{ADDR_A}:7781"), flipped))
}

/// Copies `from` to `to`, flipping one byte if `corrupt`.
fn copy(
    mut from: TcpStream,
    mut to: TcpStream,
    corrupt: bool,
    plaintext: bool,
    flipped: &AtomicUsize,
) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut seen: Vec<u8> = Vec::new();
    let mut target: Option<usize> = None;
    let mut at = 0usize;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if corrupt && flipped.load(Ordering::Relaxed) == 0 {
            if plaintext && target.is_none() {
                seen.extend_from_slice(&buf[..n]);
                target = first_payload_byte(&seen);
            } else if !plaintext {
                target = Some(200_000);
            }
            if let Some(t) = target {
                if t >= at && t < at + n {
                    buf[t - at] ^= 0x5a;
                    flipped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        at += n;
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}

/// The offset of a byte in the middle of the first page batch's payload of a plaintext
/// data connection: peer frames (8-byte header: len, tag, "FP") until the handshake ends,
/// then data frames (32-byte header "FDAT", kind 1 = pages, count at 24; hashes; pages).
fn first_payload_byte(s: &[u8]) -> Option<usize> {
    let mut at = 0;
    while s.len() >= at + 8 && &s[at + 6..at + 8] == b"FP" {
        let len = u32::from_le_bytes(s[at..at + 4].try_into().ok()?) as usize;
        at += 8 + len;
    }
    while s.len() >= at + 32 {
        if &s[at..at + 4] != b"FDAT" {
            return None;
        }
        let kind = u16::from_le_bytes([s[at + 4], s[at + 5]]);
        let count = u64::from_le_bytes(s[at + 24..at + 32].try_into().ok()?) as usize;
        match kind {
            1 => return Some(at + 32 + count * 8 + (count * 4096) / 2),
            2 => at += 32,
            _ => return None,
        }
    }
    None
}

fn recover(cl: &Cluster, abort: bool) -> anyhow::Result<String> {
    let mut c = cl.hosts.cmd(0, &bin("ferry"));
    c.args(["recover", "vm1", "--socket"])
        .arg(cl.hosts.path("a.sock"));
    if abort {
        c.arg("--abort");
    }
    let out = c.output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!("ferry recover failed: {text}\n{}", cl.logs());
    }
    Ok(text)
}

/// The destination runs the VM, verified, and keeps running; the source stopped its copy.
fn ends_at_dest(cl: &Cluster, source_vmm_alive: bool) -> anyhow::Result<()> {
    wait_for("destination running", Duration::from_secs(90), || {
        cl.vm_b().is_some_and(|v| v.state == "running")
    })
    .with_context(|| cl.logs())?;
    let b1 = cl.vm_b().context("destination status")?;
    assert!(
        b1.detail.contains("verified"),
        "the destination VMM verified every page: {b1:?}"
    );
    std::thread::sleep(Duration::from_millis(500));
    let b2 = cl.vm_b().context("destination status")?;
    assert!(
        b2.total > b1.total,
        "the destination VM does not run on: {b1:?} -> {b2:?}"
    );
    if source_vmm_alive {
        wait_for("source stopped for good", Duration::from_secs(60), || {
            cl.vm_a().is_some_and(|v| v.state == "migrated")
        })
        .with_context(|| format!("{:?}\n{}", cl.vm_a(), cl.logs()))?;
    }
    Ok(())
}

/// The source runs the VM on; the destination never ran it.
fn ends_at_source(cl: &mut Cluster) -> anyhow::Result<()> {
    cl.source_keeps_running().with_context(|| cl.logs())?;
    let b = cl.vm_b();
    assert!(
        b.as_ref().is_none_or(|v| v.state != "running"),
        "the destination must not run the VM: {b:?}"
    );
    // Nor keep a copy: a destination VMM and sidecar that survived end up waiting again,
    // told to discard by the source (over the control link, or released later).
    if cl.procs[VMM_B].alive() && cl.procs[SIDECAR_B].alive() {
        cl.destination_discarded().with_context(|| cl.logs())?;
    }
    Ok(())
}

fn run_cell(i: usize) -> anyhow::Result<()> {
    let _g = serial();
    let c = MATRIX[i];
    eprintln!(
        "cell {i}: {} / {:?} -> {:?}",
        c.fault.name(),
        c.phase,
        c.ends
    );
    let mut opts = ClusterOpts::default();
    let hold = c.phase.map(Phase::hold);
    if let Some((point, side)) = hold {
        let env = hold_for(point, HOLD_MS);
        if side == 0 {
            opts.source_env = env;
        } else {
            opts.dest_env = env;
        }
    }
    match c.fault {
        Fault::StartFails => opts.dest_vmm_args = vec!["--refuse-start".into(), "1".into()],
        Fault::ShortMemfd => {
            opts.source_vmm_args = vec!["--register-extra-mib".into(), "16".into()]
        }
        Fault::ShrinkingMemfd => opts.source_vmm_args = vec!["--truncate-on-migrate".into()],
        Fault::CorruptPsk => opts.psk = true,
        Fault::CorruptTls => opts.dest_sans = vec![ADDR_A.into()],
        Fault::DecisionReadOnly | Fault::DecisionFull => {
            opts.source_env = hold_for("paused", HOLD_MS);
            opts.state_tmpfs = true;
        }
        _ => {}
    }
    if matches!(c.fault, Fault::ShortMemfd) {
        // The registration is refused: the VM never registers, and runs on.
        let mut cl = Cluster::start_unregistered(&opts)?;
        wait_for("the refusal logged", Duration::from_secs(30), || {
            cl.procs[VMM_A]
                .log_text()
                .contains("extends past the end of its memory fd")
        })
        .with_context(|| cl.logs())?;
        assert!(cl.ferry_status(0).is_some(), "the sidecar answers");
        return ends_at_source(&mut cl);
    }
    let mut cl = Cluster::start(&opts)?;
    let watch = NeverTwice::watch(&cl);
    let flipped = match c.fault {
        Fault::CorruptTls | Fault::CorruptPsk => {
            Some(corrupting_proxy(&cl, c.fault == Fault::CorruptPsk)?)
        }
        _ => None,
    };
    // A later round needs a budget the first round cannot meet (then the round limit
    // forces the switch-over).
    let args: &[&str] = if c.phase == Some(Phase::Round2) {
        &["--downtime-ms", "1", "--max-rounds", "4"]
    } else {
        &[]
    };
    let child = match &flipped {
        Some((to, _)) => cl.spawn_migrate_to(to, args)?,
        None => cl.spawn_migrate(args)?,
    };
    if let Some((point, side)) = hold {
        cl.wait_hold(side, point)?;
    } else if matches!(c.fault, Fault::DecisionReadOnly | Fault::DecisionFull) {
        cl.wait_hold(SIDECAR_A, "paused")?;
    }
    let mut summary = None;
    match c.fault {
        Fault::Kill(p) => {
            cl.procs[proc_index(p)].kill9();
        }
        Fault::Cut => {
            cl.hosts.cut()?;
            // Past the sidecars' dead-peer time (5 s), then the link comes back.
            std::thread::sleep(Duration::from_secs(7));
            cl.hosts.restore()?;
        }
        Fault::DecisionReadOnly => cl.tmpfs.as_ref().context("tmpfs")?.read_only()?,
        Fault::DecisionFull => cl.tmpfs.as_ref().context("tmpfs")?.fill()?,
        _ => {}
    }
    // The operator starts a killed sidecar again while the source still retries.
    if c.then == Then::RestartSidecar {
        let i = match c.fault {
            Fault::Kill(p) => proc_index(p),
            _ => bail!("nothing to restart"),
        };
        std::thread::sleep(Duration::from_secs(1));
        cl.restart_sidecar(&opts, i)?;
    }
    // The migration's own end, unless its sidecar was killed.
    if c.fault != Fault::Kill(Proc::SourceSidecar) {
        let s = summary_of(child)?;
        eprintln!("summary: {s}");
        summary = Some(s);
    }
    match c.then {
        Then::Nothing | Then::RestartSidecar => {}
        Then::Recover => {
            recover(&cl, false)?;
        }
        Then::RecoverAbort => {
            let out = recover(&cl, true)?;
            assert!(out.contains("rolled back"), "{out}");
        }
    }
    match c.ends {
        Ends::Source => ends_at_source(&mut cl)?,
        Ends::Dest => ends_at_dest(&cl, c.fault != Fault::Kill(Proc::SourceVmm))?,
        Ends::DiedWithVmm => {
            if c.fault == Fault::Kill(Proc::SourceVmm) {
                let s = summary.as_ref().context("summary")?;
                assert_eq!(s["result"], "aborted", "{s:#}");
                cl.destination_discarded().with_context(|| cl.logs())?;
            } else {
                let s = summary.as_ref().context("summary")?;
                assert_eq!(s["result"], "committed", "{s:#}");
                wait_for("source stopped for good", Duration::from_secs(30), || {
                    cl.vm_a().is_some_and(|v| v.state == "migrated")
                })?;
            }
        }
    }
    // What the summary says, where the cell has a characteristic line.
    if let Some(s) = &summary {
        match c.fault {
            Fault::DecisionReadOnly | Fault::DecisionFull => {
                assert_eq!(s["result"], "aborted", "{s:#}");
                assert!(
                    s["error"]
                        .as_str()
                        .is_some_and(|e| e.contains("could not be recorded durably")),
                    "{s:#}"
                );
            }
            Fault::StartFails => {
                assert_eq!(s["result"], "start-failed", "{s:#}");
                assert!(
                    s["error"]
                        .as_str()
                        .is_some_and(|e| e.contains("ferry recover")),
                    "{s:#}"
                );
            }
            Fault::Kill(Proc::DestVmm)
                if c.ends == Ends::Source && c.then == Then::RecoverAbort =>
            {
                assert_eq!(s["result"], "start-failed", "{s:#}");
            }
            Fault::CorruptPsk => {
                assert_eq!(s["result"], "committed", "{s:#}");
                assert_eq!(s["digest_match"], true, "{s:#}");
                let torn: u64 = s["per_round"].as_array().map_or(0, |r| {
                    r.iter()
                        .map(|x| x["torn_pages"].as_u64().unwrap_or(0))
                        .sum()
                });
                assert!(
                    torn >= 1,
                    "the corrupted page was caught and re-sent: {s:#}"
                );
            }
            Fault::CorruptTls => assert_eq!(s["result"], "aborted", "{s:#}"),
            Fault::ShrinkingMemfd => {
                assert_eq!(s["result"], "aborted", "{s:#}");
                assert!(
                    s["error"].as_str().is_some_and(|e| e.contains("shrank")),
                    "{s:#}"
                );
                assert!(cl.ferry_status(0).is_some(), "the source sidecar survived");
            }
            _ => {}
        }
    }
    if let Some((_, f)) = &flipped {
        assert!(f.load(Ordering::Relaxed) >= 1, "the proxy flipped a byte");
    }
    assert!(
        !watch.ran_twice(),
        "the VM ran on both hosts at once\n{}",
        cl.logs()
    );
    Ok(())
}

macro_rules! cells {
    ($($name:ident = $i:expr;)*) => {
        $(
            #[test]
            fn $name() -> anyhow::Result<()> {
                run_cell($i)
            }
        )*
        /// Every cell of the matrix has its test above.
        #[test]
        fn every_cell_has_a_test() {
            let tested = [$($i),*];
            assert_eq!(tested.len(), MATRIX.len(), "cells without a test");
            for (k, i) in tested.iter().enumerate() {
                assert_eq!(*i, k);
            }
        }
    };
}

cells! {
    kill_source_sidecar_round1 = 0;
    kill_source_sidecar_later_round = 1;
    kill_source_sidecar_paused = 2;
    kill_source_sidecar_loaded = 3;
    kill_source_sidecar_after_decision = 4;
    kill_source_sidecar_after_commit = 5;
    kill_source_sidecar_after_running = 6;
    kill_dest_sidecar_round1 = 7;
    kill_dest_sidecar_later_round = 8;
    kill_dest_sidecar_paused = 9;
    kill_dest_sidecar_loaded = 10;
    kill_dest_sidecar_after_decision = 11;
    kill_dest_sidecar_after_commit = 12;
    kill_dest_sidecar_after_running = 13;
    kill_source_vmm_round1 = 14;
    kill_source_vmm_later_round = 15;
    kill_source_vmm_paused = 16;
    kill_source_vmm_loaded = 17;
    kill_source_vmm_after_decision = 18;
    kill_source_vmm_after_commit = 19;
    kill_source_vmm_after_running = 20;
    kill_dest_vmm_round1 = 21;
    kill_dest_vmm_later_round = 22;
    kill_dest_vmm_paused = 23;
    kill_dest_vmm_loaded = 24;
    kill_dest_vmm_after_decision = 25;
    kill_dest_vmm_after_commit = 26;
    kill_dest_vmm_after_running = 27;
    cut_round1 = 28;
    cut_later_round = 29;
    cut_paused = 30;
    cut_loaded = 31;
    cut_after_decision = 32;
    cut_after_commit = 33;
    cut_after_running = 34;
    decision_write_read_only = 35;
    decision_write_full = 36;
    start_fails_then_recover = 37;
    start_fails_then_roll_back = 38;
    corrupted_in_flight_tls = 39;
    corrupted_in_flight_psk = 40;
    short_memfd = 41;
    shrinking_memfd = 42;
}

#[test]
fn the_readme_shows_the_current_matrix() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .expect("README.md");
    assert!(
        readme.contains(&ferry_tests::matrix::markdown()),
        "README.md's fault matrix is stale: regenerate it with `cargo run -p ferry-tests --bin fault-matrix`"
    );
}
