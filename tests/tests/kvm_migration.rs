//! End-to-end: live migration of a running KVM guest (`ferry-kvm-vmm`: a CPL3 program
//! on each vCPU stamping pages and counting its writes in guest memory) between two
//! hosts (network namespaces) through two `ferry serve` daemons, and the faults that must
//! never cost the guest.
//!
//! These tests need `/dev/kvm` and fail loudly without it ([`require_kvm`]).

use std::time::Duration;

use ferry_tests::*;

fn kvm(mem_mib: u64, rate_mib: u64) -> ClusterOpts {
    require_kvm();
    ClusterOpts {
        mem_mib,
        rate_mib,
        vmm: VmmKind::Kvm { vcpus: 2 },
        ..ClusterOpts::default()
    }
}

/// The `[a, b, ...]` list after `key` in a status detail line.
fn counters_after(detail: &str, key: &str) -> Option<Vec<u64>> {
    let rest = &detail[detail.find(key)? + key.len()..];
    let list = rest.strip_prefix('[')?.split(']').next()?;
    list.split(',').map(|n| n.trim().parse().ok()).collect()
}

/// The source's counters at its last pause, from the line it writes when it resumes.
fn paused_counters_of_resumed_source(cl: &Cluster) -> anyhow::Result<Vec<u64>> {
    wait_for("source VM resumed", Duration::from_secs(30), || {
        cl.vm_a().is_some_and(|s| s.state == "running")
    })?;
    let s = cl.vm_a().expect("source status");
    counters_after(&s.detail, "paused at counters ")
        .ok_or_else(|| anyhow::anyhow!("no paused counters in {s:?}"))
}

#[test]
fn a_running_kvm_guest_migrates_between_two_hosts_and_continues() -> anyhow::Result<()> {
    let _g = serial();
    let cl = Cluster::start(&kvm(1024, 64))?;
    // Let the guest run and dirty memory for a moment before it moves.
    std::thread::sleep(Duration::from_millis(500));
    let s = cl.migrate(&["--streams", "4", "--downtime-ms", "300"])?;
    eprintln!("summary: {s:#}");
    assert_eq!(s["result"], "committed", "{s:#}\n{}", cl.logs());
    assert_eq!(s["digest_match"], true, "{s:#}");
    assert_eq!(s["verify_mode"], "strict", "{s:#}");
    assert_eq!(s["channels"], 4);
    assert_eq!(s["ram_bytes"], 1u64 << 30);
    assert_eq!(s["guest_continued"], true, "{s:#}");
    let detail = s["guest_detail"].as_str().unwrap_or_default();
    // 1 GiB minus the page tables and the generation table: 261,120 data pages.
    assert!(
        detail.starts_with("guest_continued=true; verified 261120 data pages"),
        "{detail}"
    );
    let b = &s["downtime_breakdown"];
    for part in [
        "pause_ms",
        "final_copy_ms",
        "state_ms",
        "verify_ms",
        "restore_ms",
    ] {
        assert!(b[part].as_f64().is_some_and(|v| v >= 0.0), "{s:#}");
    }
    assert!(s["downtime_ms"].as_f64() > Some(0.0), "{s:#}");

    // The source stopped for good at its paused counters ...
    wait_for("source stopped", Duration::from_secs(10), || {
        cl.vm_a().is_some_and(|v| v.state == "migrated")
    })?;
    let paused = cl.vm_a().expect("source status").counters;
    assert_eq!(paused.len(), 2, "one counter per vCPU");
    assert_eq!(
        counters_after(detail, "counters continued from the paused ").as_ref(),
        Some(&paused),
        "the destination continued from exactly the source's paused counters: {detail}"
    );
    // ... and the destination's keep increasing from them, on every vCPU.
    wait_for("destination running", Duration::from_secs(5), || {
        cl.vm_b().is_some_and(|v| v.state == "running")
    })?;
    let b1 = cl.vm_b().expect("destination status");
    assert!(
        b1.counters.iter().zip(&paused).all(|(n, p)| n > p),
        "{b1:?} vs paused {paused:?}"
    );
    std::thread::sleep(Duration::from_millis(500));
    let b2 = cl.vm_b().expect("destination status");
    assert!(
        b2.counters.iter().zip(&b1.counters).all(|(n, p)| n > p),
        "destination counters did not keep increasing: {b1:?} -> {b2:?}"
    );
    // The source's VMM process exits once the VM runs elsewhere; the destination VMM
    // registered the VM with its own sidecar, so it could migrate on.
    wait_for(
        "VM registered on the destination",
        Duration::from_secs(10),
        || {
            cl.ferry_status(1)
                .is_some_and(|s| s["registered"].as_array().is_some_and(|a| !a.is_empty()))
        },
    )?;
    Ok(())
}

#[test]
fn killing_the_destination_sidecar_in_round_one_keeps_the_kvm_guest_running() -> anyhow::Result<()>
{
    let _g = serial();
    let mut cl = Cluster::start(&kvm(256, 32))?;
    // 4 streams (the default) over 200 Mbit/s: a wide window to strike in.
    let child = cl.spawn_slow_migration()?;
    std::thread::sleep(Duration::from_millis(800));
    let before = cl.vm_a().expect("source status").counters;
    cl.procs[SIDECAR_B].kill9();
    let s = summary_of(child)?;
    assert_eq!(s["result"], "aborted", "{s:#}");
    cl.source_continues_from(Some(&before))?;
    Ok(())
}

#[test]
fn killing_the_destination_sidecar_while_the_kvm_guest_is_paused_resumes_it() -> anyhow::Result<()>
{
    let _g = serial();
    // The source sidecar holds for 5 s right after the guest paused (a test hook): the
    // destination sidecar is killed in that window, before the final round.
    let mut cl = Cluster::start(&ClusterOpts {
        source_env: hold_at("paused"),
        ..kvm(256, 32)
    })?;
    let child = cl.spawn_migrate(&["--streams", "4"])?;
    cl.wait_hold(SIDECAR_A, "paused")?;
    wait_for("source paused", Duration::from_secs(5), || {
        cl.vm_a().is_some_and(|v| v.state == "paused")
    })?;
    cl.procs[SIDECAR_B].kill9();
    let s = summary_of(child)?;
    assert_eq!(s["result"], "aborted", "{s:#}\n{}", cl.logs());
    assert!(
        s["per_round"].as_array().is_some_and(|r| !r.is_empty()),
        "pre-copy ran before the pause: {s:#}"
    );
    let paused = paused_counters_of_resumed_source(&cl)?;
    cl.source_continues_from(Some(&paused))?;
    let b = cl.vm_b().expect("destination status");
    assert_ne!(b.state, "running", "{b:?}");
    Ok(())
}

#[test]
fn a_cut_link_aborts_and_the_kvm_guest_keeps_running() -> anyhow::Result<()> {
    let _g = serial();
    let cl = Cluster::start(&kvm(256, 32))?;
    // 4 streams (the default) over 200 Mbit/s: a wide window to strike in.
    let child = cl.spawn_slow_migration()?;
    std::thread::sleep(Duration::from_millis(500));
    let before = cl.vm_a().expect("source status").counters;
    cl.hosts.cut()?;
    let t = std::time::Instant::now();
    let s = summary_of(child)?;
    assert_eq!(s["result"], "aborted", "{s:#}");
    assert!(
        t.elapsed() < Duration::from_secs(60),
        "a dead link must be noticed in seconds, took {:?}",
        t.elapsed()
    );
    cl.source_continues_from(Some(&before))?;
    let b = cl.vm_b().expect("destination status");
    assert_ne!(b.state, "running", "{b:?}");
    Ok(())
}

#[test]
fn a_destination_that_refuses_the_state_leaves_the_kvm_guest_running() -> anyhow::Result<()> {
    let _g = serial();
    let cl = Cluster::start(&ClusterOpts {
        dest_vmm_args: vec!["--refuse-load".into()],
        ..kvm(256, 32)
    })?;
    let s = cl.migrate(&["--streams", "4"])?;
    assert_eq!(s["result"], "aborted", "{s:#}");
    assert!(
        s["error"]
            .as_str()
            .is_some_and(|e| e.contains("--refuse-load")),
        "the reason must reach the operator: {s:#}"
    );
    let paused = paused_counters_of_resumed_source(&cl)?;
    cl.source_continues_from(Some(&paused))?;
    // The destination discarded the attempt and waits again.
    cl.wait_registered()?;
    assert_eq!(cl.vm_b().expect("destination status").state, "waiting");
    Ok(())
}

#[test]
fn a_destination_whose_cpu_cannot_run_the_guest_refuses_it() -> anyhow::Result<()> {
    let _g = serial();
    // The destination pretends to be the other vendor.
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo")?;
    let other = if cpuinfo.contains("GenuineIntel") {
        "AuthenticAMD"
    } else {
        "GenuineIntel"
    };
    let cl = Cluster::start(&ClusterOpts {
        dest_vmm_args: vec!["--pretend-cpu-vendor".into(), other.into()],
        ..kvm(64, 16)
    })?;
    let s = cl.migrate(&["--streams", "2"])?;
    assert_eq!(s["result"], "aborted", "{s:#}");
    let e = s["error"].as_str().unwrap_or_default();
    assert!(
        e.contains("the guest's CPU cannot run on this host")
            && e.contains(&format!("{other} here")),
        "the CPU check's reason must reach the operator: {s:#}"
    );
    // Refused before the migration started: no memory moved, the guest never paused.
    assert_eq!(s["bytes_transferred"], 0, "{s:#}");
    assert_eq!(s["rounds"], 0, "{s:#}");
    cl.source_keeps_running()?;
    // The destination VMM still waits (for a compatible VM).
    cl.wait_registered()?;
    Ok(())
}

#[test]
fn killing_the_source_sidecar_never_lets_the_destination_run_a_partial_kvm_guest(
) -> anyhow::Result<()> {
    let _g = serial();
    let mut cl = Cluster::start(&kvm(256, 32))?;
    // 4 streams (the default) over 200 Mbit/s: a wide window to strike in.
    let _child = cl.spawn_slow_migration()?;
    std::thread::sleep(Duration::from_millis(500));
    let before = cl.vm_a().expect("source status").counters;
    cl.procs[SIDECAR_A].kill9();
    // The destination notices, discards, and its VMM waits again; nothing runs there.
    let b = cl.destination_discarded()?;
    assert!(b.counters.is_empty(), "no guest exists there: {b:?}");
    assert!(
        !cl.procs[VMM_B].log_text().contains("dest: running"),
        "the destination VMM must never have run the guest"
    );
    // The source guest never depended on its sidecar: it keeps running.
    cl.source_continues_from(Some(&before))?;
    Ok(())
}

#[test]
fn the_guest_record_checked_after_start_verifies_while_the_guest_runs() -> anyhow::Result<()> {
    let _g = serial();
    // The downtime benchmark's setting: only the cheap counter check at load, every data
    // page checked once the guest runs again, with after-resume digest comparison.
    let cl = Cluster::start(&ClusterOpts {
        dest_vmm_args: vec!["--check-record".into(), "after-start".into()],
        ..kvm(256, 32)
    })?;
    let s = cl.migrate(&["--verify", "after-resume"])?;
    assert_eq!(s["result"], "committed", "{s:#}\n{}", cl.logs());
    assert_eq!(s["verify_mode"], "after-resume");
    assert_eq!(s["digest_match"], true);
    assert_eq!(s["guest_continued"], true, "{s:#}");
    wait_for(
        "the after-start record check",
        Duration::from_secs(60),
        || {
            cl.vm_b()
                .is_some_and(|v| v.record_check.starts_with("after-start: ok"))
        },
    )
    .map_err(|e| anyhow::anyhow!("{e}: {:?}", cl.vm_b()))?;
    let b = cl.vm_b().expect("destination status");
    assert!(!b.record_check.contains("FAILED"), "{b:?}");
    assert_eq!(b.state, "running", "{b:?}");
    Ok(())
}
