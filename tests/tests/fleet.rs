//! End-to-end: Ferry on a fleet. Per-host limits and the queue (`ferry drain`), a
//! destination that is full, bandwidth caps (fixed, shared by the host, changed live),
//! `ferry cancel` at each point before the decision and after it, one daemon per state
//! directory and socket, and SIGTERM in the middle of a migration.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ferry_tests::*;

/// Samples `ferry status --json` of host `i` every 100 ms while `f` runs.
fn sampled<T>(
    cl: &Cluster,
    i: usize,
    f: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<(T, Vec<(Instant, serde_json::Value)>)> {
    let stop = AtomicBool::new(false);
    let samples = Mutex::new(Vec::new());
    let r = std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Acquire) {
                if let Some(st) = cl.ferry_status(i) {
                    samples.lock().expect("samples").push((Instant::now(), st));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let r = f();
        stop.store(true, Ordering::Release);
        r
    });
    Ok((r?, samples.into_inner().expect("samples")))
}

fn migrations<'a>(
    st: &'a serde_json::Value,
    direction: &'a str,
    state: &'a str,
) -> impl Iterator<Item = &'a serde_json::Value> + 'a {
    st["migrations"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(move |m| m["direction"] == direction && m["state"] == state)
}

fn ids(n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("vm{i}")).collect()
}

/// Six VMs drained with a limit of 2 on the source and 3 on the destination, and a host
/// cap of 200 MiB/s shared by the two running: never more than 2 at once, each running
/// one capped at its fair half, all six committed with matching digests.
#[test]
fn six_vms_drain_two_at_a_time_and_all_commit() -> anyhow::Result<()> {
    let _g = serial();
    let mut cl = Cluster::start(&ClusterOpts {
        mem_mib: 192,
        rate_mib: 4,
        source_sidecar_args: vec![
            "--max-outgoing".into(),
            "2".into(),
            "--max-bandwidth-mibps".into(),
            "200".into(),
        ],
        dest_sidecar_args: vec!["--max-incoming".into(), "3".into()],
        ..ClusterOpts::default()
    })?;
    for id in &ids(6)[1..] {
        cl.add_vm(id, 192, 4)?;
    }
    cl.wait_vms(6)?;
    let to = format!("{ADDR_B}:{PORT}");
    let (out, samples) = sampled(&cl, 0, || {
        Ok(cl
            .spawn_ferry(0, &["drain", "--to", &to, "--json", "--transport", "tcp"])?
            .wait_with_output()?)
    })?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "drain failed: {stdout}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        cl.logs()
    );
    let results: Vec<serde_json::Value> = serde_json::from_str(stdout.trim())?;
    assert_eq!(results.len(), 6, "{stdout}");
    for r in &results {
        assert_eq!(r["result"], "committed", "{r:#}");
        assert_eq!(r["digest_match"], true, "{r:#}");
    }
    // Sampled while it ran: never more than 2 running, 2 seen at once, the rest queued.
    let running: Vec<usize> = samples
        .iter()
        .map(|(_, st)| migrations(st, "outgoing", "running").count())
        .collect();
    assert!(running.iter().all(|&n| n <= 2), "{running:?}");
    assert!(running.contains(&2), "never two at once: {running:?}");
    assert!(
        samples
            .iter()
            .any(|(_, st)| migrations(st, "outgoing", "queued").count() >= 3),
        "never saw the queue"
    );
    assert!(samples.iter().all(|(_, st)| st["limits"]["outgoing"] == 2));
    // Two running share the host's 200 MiB/s: 100 each.
    let shared: Vec<f64> = samples
        .iter()
        .filter(|(_, st)| migrations(st, "outgoing", "running").count() == 2)
        .flat_map(|(_, st)| {
            migrations(st, "outgoing", "running")
                .filter_map(|m| m["bandwidth_mibps"].as_f64())
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(
        !shared.is_empty() && shared.iter().all(|&b| b == 100.0),
        "{shared:?}"
    );
    // Every VM runs at the destination; every source stopped for good.
    for id in ids(6) {
        wait_for(
            &format!("{id} running at B"),
            Duration::from_secs(10),
            || cl.vm(1, &id).is_some_and(|v| v.state == "running"),
        )?;
        wait_for(
            &format!("{id} stopped at A"),
            Duration::from_secs(10),
            || cl.vm(0, &id).is_some_and(|v| v.state == "migrated"),
        )?;
    }
    // Status keeps them as recent, committed.
    let st = cl.ferry_status(0).expect("status");
    assert_eq!(
        migrations(&st, "outgoing", "committed").count(),
        6,
        "{st:#}"
    );
    Ok(())
}

/// A destination allowing one incoming migration: the source (allowing three) keeps the
/// others queued, says why, and offers them again until all three commit.
#[test]
fn a_full_destination_keeps_migrations_queued_until_it_has_room() -> anyhow::Result<()> {
    let _g = serial();
    let mut cl = Cluster::start(&ClusterOpts {
        mem_mib: 128,
        rate_mib: 4,
        source_sidecar_args: vec!["--max-outgoing".into(), "3".into()],
        dest_sidecar_args: vec!["--max-incoming".into(), "1".into()],
        ..ClusterOpts::default()
    })?;
    for id in &ids(3)[1..] {
        cl.add_vm(id, 128, 4)?;
    }
    cl.wait_vms(3)?;
    let to = format!("{ADDR_B}:{PORT}");
    let ((out, source), dest) = sampled(&cl, 1, || {
        sampled(&cl, 0, || {
            Ok(cl
                .spawn_ferry(
                    0,
                    &["drain", "--to", &to, "--json", "--max-bandwidth", "100"],
                )?
                .wait_with_output()?)
        })
    })?;
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        cl.logs()
    );
    let incoming: Vec<usize> = dest
        .iter()
        .map(|(_, st)| {
            st["migrations"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|m| m["direction"] == "incoming" && m["state"] == "running")
                .count()
        })
        .collect();
    assert!(incoming.iter().all(|&n| n <= 1), "{incoming:?}");
    assert!(
        source.iter().any(|(_, st)| {
            migrations(st, "outgoing", "queued").any(|m| {
                m["note"]
                    .as_str()
                    .is_some_and(|n| n.contains("destination busy"))
            })
        }),
        "the source never said the destination was busy"
    );
    let st = cl.ferry_status(1).expect("status");
    assert_eq!(
        migrations(&st, "incoming", "committed").count(),
        3,
        "{st:#}"
    );
    Ok(())
}

/// MiB/s between two status samples of one migration's bytes.
fn rate_between(samples: &[(Instant, serde_json::Value)], from: Instant, to: Instant) -> f64 {
    let bytes = |(t, st): &(Instant, serde_json::Value)| {
        let b = migrations(st, "outgoing", "running")
            .next()
            .and_then(|m| m["bytes"].as_u64())?;
        Some((*t, b))
    };
    let inside: Vec<(Instant, u64)> = samples
        .iter()
        .filter(|(t, _)| *t >= from && *t <= to)
        .filter_map(bytes)
        .collect();
    let (Some(a), Some(b)) = (inside.first(), inside.last()) else {
        return 0.0;
    };
    (b.1 - a.1) as f64 / (1u64 << 20) as f64 / (b.0 - a.0).as_secs_f64()
}

/// A 100 MiB/s cap holds within 10 % over a migration moving more than 1 GiB (the
/// workload's zero pages are skipped, so its RAM is larger).
#[test]
fn a_bandwidth_cap_holds_over_a_whole_migration() -> anyhow::Result<()> {
    let _g = serial();
    let cl = Cluster::start(&ClusterOpts {
        mem_mib: 1400,
        rate_mib: 4,
        ..ClusterOpts::default()
    })?;
    let s = cl.migrate(&["--max-bandwidth", "100", "--transport", "tcp"])?;
    assert_eq!(s["result"], "committed", "{s:#}\n{}", cl.logs());
    let bytes = s["bytes_transferred"].as_u64().unwrap_or(0);
    assert!(bytes >= 1 << 30, "{s:#}");
    let data_ms: f64 = s["per_round"]
        .as_array()
        .expect("rounds")
        .iter()
        .filter_map(|r| r["ms"].as_f64())
        .sum();
    let rate = bytes as f64 / (1u64 << 20) as f64 / (data_ms / 1e3);
    eprintln!("capped at 100 MiB/s: {rate:.1} MiB/s over {bytes} bytes");
    assert!((90.0..=110.0).contains(&rate), "{rate:.1} MiB/s\n{s:#}");
    assert_eq!(s["max_bandwidth_mibps"], 100, "{s:#}");
    Ok(())
}

/// `ferry set-bandwidth` changes a running migration's cap within a second.
#[test]
fn a_bandwidth_cap_changes_while_the_migration_runs() -> anyhow::Result<()> {
    let _g = serial();
    let cl = Cluster::start(&ClusterOpts {
        mem_mib: 768,
        rate_mib: 4,
        ..ClusterOpts::default()
    })?;
    let (s, samples) = sampled(&cl, 0, || {
        let child = cl.spawn_migrate(&["--max-bandwidth", "100", "--transport", "tcp"])?;
        wait_for("round 1 under way", Duration::from_secs(30), || {
            cl.ferry_status(0).is_some_and(|st| {
                migrations(&st, "outgoing", "running").any(|m| m["bytes"].as_u64() > Some(50 << 20))
            })
        })?;
        std::thread::sleep(Duration::from_secs(2));
        let changed = Instant::now();
        let (code, out, err) = cl.ferry(0, &["set-bandwidth", "vm1", "40"])?;
        assert_eq!(code, Some(0), "{out}{err}");
        assert!(out.contains("40 MiB/s"), "{out}");
        Ok((summary_of(child)?, changed))
    })?;
    let (s, changed) = s;
    assert_eq!(s["result"], "committed", "{s:#}\n{}", cl.logs());
    let before = rate_between(&samples, changed - Duration::from_secs(2), changed);
    let after = rate_between(
        &samples,
        changed + Duration::from_secs(1),
        changed + Duration::from_secs(4),
    );
    eprintln!("capped at 100 then 40 MiB/s: {before:.1} then {after:.1} MiB/s");
    assert!(
        (90.0..=110.0).contains(&before),
        "before: {before:.1} MiB/s"
    );
    assert!((36.0..=44.0).contains(&after), "after: {after:.1} MiB/s");
    Ok(())
}

/// Cancels `vm1`'s migration once `ready` holds for host A's status; the cancel is
/// accepted, the summary says "cancelled", the VM runs on at A and B holds nothing.
fn cancel_when(
    cl: &Cluster,
    migrate_args: &[&str],
    ready: impl Fn(&serde_json::Value) -> bool,
) -> anyhow::Result<()> {
    let child = cl.spawn_migrate(migrate_args)?;
    wait_for("the point to cancel at", Duration::from_secs(60), || {
        cl.ferry_status(0).is_some_and(|st| ready(&st))
    })?;
    let (code, out, err) = cl.ferry(0, &["cancel", "vm1"])?;
    assert_eq!(code, Some(0), "{out}{err}\n{}", cl.logs());
    assert!(out.contains("cancelled"), "{out}");
    let s = summary_of(child)?;
    assert_eq!(s["result"], "cancelled", "{s:#}");
    cl.source_keeps_running()?;
    cl.destination_discarded()?;
    // A second cancel has nothing to cancel.
    let (code, _, err) = cl.ferry(0, &["cancel", "vm1"])?;
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("no migration of vm1"), "{err}");
    Ok(())
}

#[test]
fn cancel_in_round_one_keeps_the_vm_running_at_the_source() -> anyhow::Result<()> {
    let _g = serial();
    let cl = Cluster::start(&ClusterOpts::default())?;
    cancel_when(&cl, &["--max-bandwidth", "40"], |st| {
        migrations(st, "outgoing", "running")
            .any(|m| m["phase"] == "precopy" && m["round"] == 1 && m["bytes"].as_u64() > Some(0))
    })
}

#[test]
fn cancel_in_a_later_round_keeps_the_vm_running_at_the_source() -> anyhow::Result<()> {
    let _g = serial();
    let cl = Cluster::start(&ClusterOpts {
        mem_mib: 128,
        rate_mib: 32,
        ..ClusterOpts::default()
    })?;
    cancel_when(
        &cl,
        &[
            "--max-bandwidth",
            "60",
            "--downtime-ms",
            "20",
            "--max-rounds",
            "30",
        ],
        |st| migrations(st, "outgoing", "running").any(|m| m["round"].as_u64() >= Some(3)),
    )
}

/// A migration waiting for a slot is cancelled without ever starting; the one running
/// goes on and commits.
#[test]
fn cancel_while_queued_never_starts_the_migration() -> anyhow::Result<()> {
    let _g = serial();
    let mut cl = Cluster::start(&ClusterOpts {
        source_sidecar_args: vec!["--max-outgoing".into(), "1".into()],
        ..ClusterOpts::default()
    })?;
    cl.add_vm("vm2", 64, 4)?;
    cl.wait_vms(2)?;
    let first = cl.spawn_migrate(&["--max-bandwidth", "60"])?;
    wait_for("vm1 running", Duration::from_secs(30), || {
        cl.ferry_status(0)
            .is_some_and(|st| migrations(&st, "outgoing", "running").any(|m| m["vm_id"] == "vm1"))
    })?;
    let to = format!("{ADDR_B}:{PORT}");
    let second = cl.spawn_ferry(0, &["migrate", "vm2", "--to", &to, "--json"])?;
    wait_for("vm2 queued", Duration::from_secs(10), || {
        cl.ferry_status(0).is_some_and(|st| {
            migrations(&st, "outgoing", "queued")
                .any(|m| m["vm_id"] == "vm2" && m["queue_position"] == 1)
        })
    })?;
    let (code, out, err) = cl.ferry(0, &["cancel", "vm2"])?;
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("cancelled while queued"), "{out}");
    let s2 = summary_of(second)?;
    assert_eq!(s2["result"], "cancelled", "{s2:#}");
    assert_eq!(s2["bytes_transferred"], 0, "{s2:#}");
    let s1 = summary_of(first)?;
    assert_eq!(s1["result"], "committed", "{s1:#}\n{}", cl.logs());
    // vm2 never left: it runs at A, and B's VMM still waits for it.
    assert!(cl.vm(0, "vm2").is_some_and(|v| v.state == "running"));
    let st = cl.ferry_status(1).expect("status");
    assert!(
        st["waiting_incoming"]
            .as_array()
            .is_some_and(|w| w.iter().any(|v| v == "vm2")),
        "{st:#}"
    );
    Ok(())
}

/// After the commit decision a cancel is refused, says why, and the migration commits.
#[test]
fn cancel_after_the_decision_is_refused_and_the_migration_commits() -> anyhow::Result<()> {
    let _g = serial();
    let cl = Cluster::start(&ClusterOpts {
        source_env: hold_for("decided", 3000),
        ..ClusterOpts::default()
    })?;
    let child = cl.spawn_migrate(&[])?;
    cl.wait_hold(SIDECAR_A, "decided")?;
    let (code, out, err) = cl.ferry(0, &["cancel", "vm1"])?;
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(err.contains("commit decision is taken"), "{err}");
    let s = summary_of(child)?;
    assert_eq!(s["result"], "committed", "{s:#}\n{}", cl.logs());
    wait_for("destination running", Duration::from_secs(10), || {
        cl.vm_b().is_some_and(|v| v.state == "running")
    })?;
    Ok(())
}

/// A second daemon on the same state directory or socket is refused and the first keeps
/// serving; SIGTERM stops a daemon cleanly (exit 0, socket removed).
#[test]
fn a_second_daemon_is_refused_and_sigterm_stops_cleanly() -> anyhow::Result<()> {
    let _g = serial();
    let mut cl = Cluster::start(&ClusterOpts::default())?;
    write_key(
        &cl.hosts.path("key-a-second"),
        "a-second-daemons-key-0123\n",
    )?;
    let (code, out, err) = {
        let o = cl
            .hosts
            .cmd(0, &bin("ferry"))
            .args(["serve", "--listen", "127.0.0.1:0", "--insecure-psk"])
            .arg("--key-file")
            .arg(cl.hosts.path("key-a-second"))
            .arg("--socket")
            .arg(cl.hosts.path("other.sock"))
            .arg("--state-dir")
            .arg(cl.hosts.path("state-a"))
            .output()?;
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(
        err.contains("another ferry daemon") && err.contains("state directory"),
        "{err}"
    );
    let o = cl
        .hosts
        .cmd(0, &bin("ferry"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .arg("--socket")
        .arg(cl.hosts.path("a.sock"))
        .arg("--state-dir")
        .arg(cl.hosts.path("state-other"))
        .args(tls_args(&cl.hosts.dir, "ca", "a"))
        .output()?;
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("another ferry daemon") && err.contains("socket"),
        "{err}"
    );
    // The first still answers.
    assert!(cl.ferry_status(0).is_some());
    // SIGTERM: exits 0 and removes its socket.
    let pid = cl.procs[SIDECAR_B].child.id();
    // SAFETY: signalling a child process this test started.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGTERM) }, 0);
    let status = cl.procs[SIDECAR_B].child.wait()?;
    assert_eq!(status.code(), Some(0), "{}", cl.procs[SIDECAR_B].log_text());
    assert!(!cl.hosts.path("b.sock").exists());
    Ok(())
}

/// SIGTERM to the source sidecar in round 1: the migration is cancelled, the VM runs on
/// at the source only, the destination discards, the daemon exits 0.
#[test]
fn sigterm_mid_migration_leaves_the_vm_running_on_exactly_one_host() -> anyhow::Result<()> {
    let _g = serial();
    let mut cl = Cluster::start(&ClusterOpts::default())?;
    let child = cl.spawn_migrate(&["--max-bandwidth", "40"])?;
    wait_for("round 1 under way", Duration::from_secs(30), || {
        cl.ferry_status(0).is_some_and(|st| {
            migrations(&st, "outgoing", "running").any(|m| m["bytes"].as_u64() > Some(0))
        })
    })?;
    let pid = cl.procs[SIDECAR_A].child.id();
    // SAFETY: signalling a child process this test started.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGTERM) }, 0);
    let s = summary_of(child)?;
    assert_eq!(s["result"], "cancelled", "{s:#}");
    let status = cl.procs[SIDECAR_A].child.wait()?;
    assert_eq!(status.code(), Some(0), "{}", cl.procs[SIDECAR_A].log_text());
    assert!(!cl.hosts.path("a.sock").exists());
    cl.source_keeps_running()?;
    cl.destination_discarded()?;
    Ok(())
}
