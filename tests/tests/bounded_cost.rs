//! What a misbehaving peer or local client can cost a sidecar: 3000 idle connections, a
//! slowloris peer, descriptor exhaustion, silent local clients, VMMs that go away. The
//! daemon must stay responsive, and its threads, descriptors and memory bounded.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;
use ferry_tests::*;

/// Threads, open descriptors and resident memory (KiB) of a process.
fn usage(pid: u32) -> (u64, u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64);
    (field("Threads:"), fds, field("VmRSS:"))
}

/// CPU seconds a process used.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(") ").map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    ticks / 100.0
}

/// Runs `f` on a thread that joined host `ns`'s network namespace (the sockets it makes
/// live there).
fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(path).expect("namespace");
        // SAFETY: setns on this thread only, with an open namespace descriptor.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("namespace thread")
}

fn raise_fd_limit(n: u64) {
    let lim = libc::rlimit {
        rlim_cur: n,
        rlim_max: n,
    };
    // SAFETY: setrlimit with a valid rlimit value; raising the test's own limit.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
}

fn status_answers(cl: &Cluster, i: usize) -> bool {
    let t = Instant::now();
    cl.ferry_status(i).is_some() && t.elapsed() < Duration::from_secs(5)
}

#[test]
fn three_thousand_idle_connections_cost_bounded_threads_and_the_daemon_still_migrates(
) -> anyhow::Result<()> {
    let _g = serial();
    raise_fd_limit(16_384);
    let cl = Cluster::start(&ClusterOpts {
        mem_mib: 64,
        ..ClusterOpts::default()
    })?;
    let pid = cl.procs[SIDECAR_B].child.id();
    let before = usage(pid);
    let conns = in_ns(&cl.hosts.ns[0].clone(), || {
        (0..3000)
            .filter_map(|_| TcpStream::connect((ADDR_B, PORT)).ok())
            .collect::<Vec<_>>()
    });
    assert!(
        conns.len() >= 2900,
        "only {} connections opened",
        conns.len()
    );
    std::thread::sleep(Duration::from_secs(2));
    let during = usage(pid);
    eprintln!("before {before:?}, with 3000 connections {during:?} (threads, fds, RSS KiB)");
    // 256 connection slots, each one thread and a watchdog descriptor: bounded, whatever
    // the number of connections.
    assert!(
        during.0 <= before.0 + 260,
        "threads {before:?} -> {during:?}"
    );
    assert!(
        during.1 <= before.1 + 2 * 260,
        "descriptors {before:?} -> {during:?}"
    );
    assert!(
        during.2 <= before.2 + 128 * 1024,
        "memory {before:?} -> {during:?}"
    );
    assert!(status_answers(&cl, 1), "the daemon answers while flooded");
    drop(conns);
    std::thread::sleep(Duration::from_secs(1));
    let s = cl.migrate(&[])?;
    assert_eq!(s["result"], "committed", "{s:#}\n{}", cl.logs());
    let after = usage(pid);
    assert!(
        after.0 <= before.0 + 16,
        "threads not released: {before:?} -> {after:?}"
    );
    Ok(())
}

#[test]
fn a_slowloris_peer_is_cut_off_at_the_handshake_deadline() -> anyhow::Result<()> {
    let _g = serial();
    let cl = Cluster::start(&ClusterOpts {
        mem_mib: 64,
        psk: true,
        ..ClusterOpts::default()
    })?;
    // One byte of a PskHello every 2 s: each read returns long before any per-read
    // timeout, but the handshake as a whole must end at 10 s.
    let elapsed = in_ns(&cl.hosts.ns[0].clone(), || {
        let mut s = TcpStream::connect((ADDR_B, PORT)).expect("connect");
        let t = Instant::now();
        let hello = [42u8, 0, 0, 0, 4, 0, b'F', b'P', 2, 0];
        for b in hello.iter().cycle() {
            if s.write_all(&[*b]).is_err() {
                break;
            }
            s.set_read_timeout(Some(Duration::from_secs(2)))
                .expect("timeout");
            let mut buf = [0u8; 64];
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => break,
            }
            if t.elapsed() > Duration::from_secs(40) {
                break;
            }
        }
        t.elapsed()
    });
    assert!(
        elapsed >= Duration::from_secs(9) && elapsed < Duration::from_secs(16),
        "the trickling connection lived {elapsed:?}"
    );
    assert!(status_answers(&cl, 1));
    Ok(())
}

#[test]
fn out_of_descriptors_the_daemon_backs_off_instead_of_spinning() -> anyhow::Result<()> {
    let _g = serial();
    raise_fd_limit(16_384);
    let hosts = TwoHosts::new()?;
    make_certs(&hosts.dir, "ca", &[("b", ADDR_B)])?;
    // The destination sidecar alone, with 64 descriptors.
    let mut c = hosts.cmd(1, Path::new("bash"));
    let sock = hosts.path("b.sock");
    let args: Vec<String> = [
        "serve".into(),
        "--socket".into(),
        sock.display().to_string(),
        "--listen".into(),
        format!("{ADDR_B}:{PORT}"),
        "--state-dir".into(),
        hosts.path("state-b").display().to_string(),
    ]
    .into_iter()
    .chain(tls_args(&hosts.dir, "ca", "b"))
    .collect();
    c.arg("-c")
        .arg(format!(
            "ulimit -n 64; exec {} \"$@\"",
            bin("ferry").display()
        ))
        .arg("ferry")
        .args(&args);
    let p = Proc::spawn("sidecar-b", c, hosts.path("sidecar-b.log"))?;
    wait_for("socket", Duration::from_secs(10), || sock.exists())?;
    let pid = p.child.id();
    let conns = in_ns(&hosts.ns[0].clone(), || {
        (0..200)
            .filter_map(|_| TcpStream::connect((ADDR_B, PORT)).ok())
            .collect::<Vec<_>>()
    });
    std::thread::sleep(Duration::from_secs(1));
    let (cpu0, lines0) = (cpu_seconds(pid), p.log_text().lines().count());
    std::thread::sleep(Duration::from_secs(3));
    let (cpu1, lines1) = (cpu_seconds(pid), p.log_text().lines().count());
    eprintln!(
        "{} connections; in 3 s: {:.2} CPU s, {} log lines",
        conns.len(),
        cpu1 - cpu0,
        lines1 - lines0
    );
    assert!(
        cpu1 - cpu0 < 0.5,
        "the accept loop spins: {:.2} CPU s in 3 s",
        cpu1 - cpu0
    );
    assert!(lines1 - lines0 < 20, "{} log lines in 3 s", lines1 - lines0);
    assert!(p.log_text().contains("accept failed"), "{}", p.log_text());
    drop(conns);
    // Once descriptors are free again it serves: the CLI gets an answer.
    wait_for("the daemon answers again", Duration::from_secs(20), || {
        Command::new(bin("ferry"))
            .args(["status", "--json", "--socket"])
            .arg(&sock)
            .output()
            .is_ok_and(|o| o.status.success())
    })?;
    Ok(())
}

#[test]
fn a_silent_local_client_is_cut_off_and_a_vmm_that_leaves_unregisters() -> anyhow::Result<()> {
    let _g = serial();
    let mut cl = Cluster::start(&ClusterOpts {
        mem_mib: 64,
        ..ClusterOpts::default()
    })?;
    let sock = cl.hosts.path("a.sock");
    let t = Instant::now();
    let mut s = UnixStream::connect(&sock)?;
    let mut buf = [0u8; 16];
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let n = s.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "the daemon closes a silent client");
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
    // The VMM goes away: its registration (and mapping of its memory) goes too.
    let pid = cl.procs[SIDECAR_A].child.id();
    let memfds = || {
        std::fs::read_to_string(format!("/proc/{pid}/maps"))
            .map(|m| m.lines().filter(|l| l.contains("memfd:")).count())
            .unwrap_or(0)
    };
    assert!(memfds() > 0, "the registered VM's memory is mapped");
    cl.procs[VMM_A].kill9();
    wait_for("registration dropped", Duration::from_secs(10), || {
        cl.ferry_status(0)
            .is_some_and(|s| s["registered"].as_array().is_some_and(|a| a.is_empty()))
    })
    .with_context(|| cl.logs())?;
    wait_for("memory unmapped", Duration::from_secs(5), || memfds() == 0)?;
    Ok(())
}
