//! End-to-end: live migration over TCP between two hosts (network namespaces), and the
//! faults that must never cost the VM.

use std::io::Write;
use std::time::Duration;

use ferry_tests::*;

fn committed(s: &serde_json::Value) -> bool {
    s["result"] == "committed"
}

#[test]
fn migrates_a_dirtying_vm_between_two_hosts() -> anyhow::Result<()> {
    let _g = serial();
    let cl = Cluster::start(&ClusterOpts::default())?;
    let a = cl.procs[SIDECAR_A].child.id();
    assert!(
        memfd_bytes(a, "ferry-workload-")? > 0,
        "the source sidecar maps the registered VM's memory"
    );
    let s = cl.migrate(&["--streams", "4", "--downtime-ms", "100"])?;
    assert!(committed(&s), "{s:#}\n{}", cl.logs());
    assert_eq!(s["digest_match"], true);
    assert_eq!(s["transport"], "tcp");
    // The hosts have no RDMA device: auto selection must say why it chose TCP.
    assert!(
        s["transport_reason"]
            .as_str()
            .is_some_and(|r| r.contains("no RDMA on the source")),
        "{s:#}"
    );
    assert_eq!(s["channels"], 4);
    assert!(s["rounds"].as_u64() >= Some(2), "{s:#}");
    assert!(s["zero_pages_skipped"].as_u64() > Some(0), "{s:#}");
    assert!(s["bytes_transferred"].as_u64() >= Some(150 << 20), "{s:#}");
    let rounds = s["per_round"].as_array().expect("per_round");
    assert_eq!(rounds.len() as u64, s["rounds"].as_u64().unwrap_or(0));
    assert_eq!(
        rounds.last().map(|r| r["final_round"].clone()),
        Some(true.into())
    );
    // The source stopped for good; the destination verified every page and runs on.
    wait_for("source stopped", Duration::from_secs(10), || {
        cl.vm_a().is_some_and(|v| v.state == "migrated")
    })?;
    // (The status file is rewritten every 100 ms.)
    wait_for("destination running", Duration::from_secs(5), || {
        cl.vm_b().is_some_and(|v| v.state == "running")
    })?;
    // The source sidecar lets go of the VM's memory (mapped and open memfds), released
    // after the summary went out rather than before it.
    wait_for(
        "the source sidecar releasing the VM's memory",
        Duration::from_secs(10),
        || memfd_bytes(a, "ferry-workload-").is_ok_and(|b| b == 0),
    )?;
    let b1 = cl.vm_b().expect("destination status");
    assert!(b1.detail.contains("verified 65536 pages"), "{b1:?}");
    std::thread::sleep(Duration::from_millis(500));
    let b2 = cl.vm_b().expect("destination status");
    assert!(
        b2.total > b1.total,
        "destination counters did not move: {b1:?} {b2:?}"
    );
    Ok(())
}

#[test]
fn killing_the_destination_in_round_one_keeps_the_source_running() -> anyhow::Result<()> {
    let _g = serial();
    let mut cl = Cluster::start(&ClusterOpts::default())?;
    let child = cl.spawn_slow_migration()?;
    std::thread::sleep(Duration::from_millis(800));
    cl.procs[SIDECAR_B].kill9();
    let s = summary_of(child)?;
    assert_eq!(s["result"], "aborted", "{s:#}");
    assert_eq!(s["rounds"], 0, "no round may have completed: {s:#}");
    cl.source_keeps_running()?;
    Ok(())
}

#[test]
fn killing_the_destination_during_stop_and_copy_resumes_the_source() -> anyhow::Result<()> {
    let _g = serial();
    // The source sidecar holds for 5 s right after the VM paused (a test hook): the
    // destination sidecar is killed in that window, before the final round.
    let mut cl = Cluster::start(&ClusterOpts {
        source_env: hold_at("paused"),
        ..ClusterOpts::default()
    })?;
    let child = cl.spawn_migrate(&[])?;
    cl.wait_hold(SIDECAR_A, "paused")?;
    wait_for("source paused", Duration::from_secs(5), || {
        cl.vm_a().is_some_and(|v| v.state == "paused")
    })?;
    cl.procs[SIDECAR_B].kill9();
    let s = summary_of(child)?;
    assert_eq!(s["result"], "aborted", "{s:#}");
    assert!(
        s["per_round"].as_array().is_some_and(|r| !r.is_empty()),
        "pre-copy ran before the pause: {s:#}"
    );
    cl.source_keeps_running()?;
    // The destination VMM never ran the VM.
    let b = cl.vm_b().expect("destination status");
    assert_ne!(b.state, "running", "{b:?}");
    Ok(())
}

#[test]
fn a_cut_link_aborts_and_the_source_keeps_running() -> anyhow::Result<()> {
    let _g = serial();
    let cl = Cluster::start(&ClusterOpts::default())?;
    let child = cl.spawn_slow_migration()?;
    std::thread::sleep(Duration::from_millis(500));
    cl.hosts.cut()?;
    let t = std::time::Instant::now();
    let s = summary_of(child)?;
    assert_eq!(s["result"], "aborted", "{s:#}");
    assert!(
        t.elapsed() < Duration::from_secs(60),
        "a dead link must be noticed in seconds, took {:?}",
        t.elapsed()
    );
    cl.source_keeps_running()?;
    Ok(())
}

#[test]
fn a_destination_that_refuses_the_state_leaves_the_source_running() -> anyhow::Result<()> {
    let _g = serial();
    let cl = Cluster::start(&ClusterOpts {
        dest_vmm_args: vec!["--refuse-load".into()],
        ..ClusterOpts::default()
    })?;
    let s = cl.migrate(&[])?;
    assert_eq!(s["result"], "aborted", "{s:#}");
    assert!(
        s["error"]
            .as_str()
            .is_some_and(|e| e.contains("--refuse-load")),
        "the reason must reach the operator: {s:#}"
    );
    cl.source_keeps_running()?;
    // The destination discarded the attempt and waits again.
    cl.wait_registered()?;
    Ok(())
}

#[test]
fn a_peer_with_the_wrong_key_is_refused_before_any_memory_moves() -> anyhow::Result<()> {
    let _g = serial();
    let cl = Cluster::start(&ClusterOpts {
        psk: true,
        wrong_key: true,
        ..ClusterOpts::default()
    })?;
    let s = cl.migrate(&[])?;
    assert_eq!(s["result"], "aborted", "{s:#}");
    assert!(
        s["error"]
            .as_str()
            .is_some_and(|e| e.contains("Authentication failed")),
        "{s:#}"
    );
    assert_eq!(s["bytes_transferred"], 0);
    cl.source_keeps_running()?;
    Ok(())
}

#[test]
fn hostile_peers_get_errors_and_the_sidecar_still_migrates() -> anyhow::Result<()> {
    let _g = serial();
    let cl = Cluster::start(&ClusterOpts {
        mem_mib: 64,
        psk: true,
        ..ClusterOpts::default()
    })?;
    // From host A, talk garbage to B's sidecar: HTTP, a 4 GiB frame header, a data
    // hello with a forged proof, a truncated frame. Each must be refused or dropped.
    let probe = |bytes: Vec<u8>| -> anyhow::Result<()> {
        let mut c = cl.hosts.cmd(0, std::path::Path::new("bash"));
        c.args([
            "-c",
            &format!("exec 3<>/dev/tcp/{ADDR_B}/{PORT}; cat >&3; timeout 3 cat <&3 || true"),
        ]);
        let mut ch = c
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        ch.stdin.take().expect("stdin").write_all(&bytes)?;
        ch.wait_with_output()?;
        Ok(())
    };
    probe(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec())?;
    // Frames of the peer protocol: 8-byte header (len, tag, magic "FP"), then the payload.
    let frame = |tag: u16, payload: &[u8]| -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        f.extend_from_slice(&tag.to_le_bytes());
        f.extend_from_slice(b"FP");
        f.extend_from_slice(payload);
        f
    };
    let mut big = frame(4, &[]);
    big[..4].copy_from_slice(&u32::MAX.to_le_bytes());
    probe(big)?;
    // DataHello{session, channel 0}, then DataProof{zeros} for whatever challenge comes.
    let hello: Vec<u8> = [[7u8; 16].as_slice(), &0u16.to_le_bytes()].concat();
    let forged = [frame(10, &hello), frame(12, &[0u8; 32])].concat();
    probe(forged)?;
    probe(vec![1, 2, 3])?;
    // Each probe was refused with a reason the sidecar logged; none may have hurt it.
    let log = cl.procs[SIDECAR_B].log_text();
    assert!(log.contains("Not a Ferry frame"), "{log}");
    assert!(log.contains("exceeds the limit"), "{log}");
    assert!(log.contains("proof does not match"), "{log}");
    let s = cl.migrate(&[])?;
    assert!(committed(&s), "{s:#}\n{}", cl.logs());
    assert_eq!(s["digest_match"], true);
    Ok(())
}

#[test]
fn killing_the_source_sidecar_never_lets_the_destination_run_a_partial_vm() -> anyhow::Result<()> {
    let _g = serial();
    let mut cl = Cluster::start(&ClusterOpts::default())?;
    let _child = cl.spawn_slow_migration()?;
    std::thread::sleep(Duration::from_millis(500));
    cl.procs[SIDECAR_A].kill9();
    // The destination notices, discards, and its VMM waits again; nothing runs there.
    cl.destination_discarded()?;
    // The source VM never depended on its sidecar: it keeps running.
    cl.source_keeps_running()?;
    Ok(())
}

#[test]
fn a_link_lost_in_the_commit_window_is_settled_by_replaying_the_decision() -> anyhow::Result<()> {
    let _g = serial();
    // The source records its Commit decision, then the control link drops before
    // `Commit` is sent: the destination holds the loaded VM (not running), the source
    // keeps its VM paused (never resumed), and the recorded decision is replayed.
    let cl = Cluster::start(&ClusterOpts {
        source_env: vec![("FERRY_TEST_DROP_COMMIT".into(), "1".into())],
        ..ClusterOpts::default()
    })?;
    let child = cl.spawn_migrate(&[])?;
    // While the decision is in flight, never may both VMs run: watch both status
    // files until the source has stopped for good.
    let (s, ran_twice) = std::thread::scope(|scope| {
        let watcher = scope.spawn(|| {
            let end = std::time::Instant::now() + Duration::from_secs(60);
            while std::time::Instant::now() < end {
                let a = cl.vm_a().map(|v| v.state);
                let b = cl.vm_b().map(|v| v.state);
                if a.as_deref() == Some("migrated") {
                    return false;
                }
                if a.as_deref() == Some("running") && b.as_deref() == Some("running") {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            false
        });
        (summary_of(child), watcher.join().unwrap_or(true))
    });
    let s = s?;
    assert!(
        !ran_twice,
        "source and destination ran the VM at the same time"
    );
    assert_eq!(s["result"], "committed", "{s:#}\n{}", cl.logs());
    assert!(
        s["error"]
            .as_str()
            .is_some_and(|e| e.contains("replayed and confirmed")),
        "{s:#}"
    );
    assert_eq!(s["digest_match"], true);
    wait_for("source stopped for good", Duration::from_secs(10), || {
        cl.vm_a().is_some_and(|v| v.state == "migrated")
    })?;
    wait_for("destination running", Duration::from_secs(10), || {
        cl.vm_b().is_some_and(|v| v.state == "running")
    })?;
    let log_b = cl.procs[SIDECAR_B].log_text();
    assert!(log_b.contains("holding the loaded"), "{log_b}");
    assert!(log_b.contains("replayed Commit"), "{log_b}");
    Ok(())
}

#[test]
fn after_resume_verification_keeps_the_digest_out_of_the_downtime() -> anyhow::Result<()> {
    let _g = serial();
    let cl = Cluster::start(&ClusterOpts::default())?;
    let s = cl.migrate(&["--verify", "after-resume"])?;
    assert!(committed(&s), "{s:#}\n{}", cl.logs());
    assert_eq!(s["verify_mode"], "after-resume");
    // Compared after the destination resumed, and it matched.
    assert_eq!(s["digest_match"], true);
    assert!(s["verify_after_resume_ms"].as_f64() > Some(0.0), "{s:#}");
    wait_for(
        "source stopped after the comparison",
        Duration::from_secs(10),
        || cl.vm_a().is_some_and(|v| v.state == "migrated"),
    )?;
    Ok(())
}

#[test]
fn a_source_vmm_killed_mid_migration_aborts_and_nothing_runs_at_the_destination(
) -> anyhow::Result<()> {
    let _g = serial();
    let mut cl = Cluster::start(&ClusterOpts::default())?;
    let child = cl.spawn_slow_migration()?;
    std::thread::sleep(Duration::from_millis(500));
    cl.procs[VMM_A].kill9();
    let s = summary_of(child)?;
    assert_eq!(s["result"], "aborted", "{s:#}");
    assert!(
        s["error"].as_str().is_some_and(|e| e.contains("VMM")),
        "the operator must learn the VMM is gone: {s:#}"
    );
    // The destination discarded the partial VM; its VMM waits again, running nothing.
    cl.destination_discarded()?;
    // The source sidecar survives and reports no VM stuck in a migration.
    let st = cl.ferry_status(0).expect("source sidecar answers");
    assert!(
        st["migrating"].as_object().is_some_and(|m| m.is_empty()),
        "{st}"
    );
    Ok(())
}

#[test]
fn an_unconfirmed_commit_is_delivered_later_by_ferry_recover() -> anyhow::Result<()> {
    let _g = serial();
    // The link dies right after the source records its Commit decision and stays down
    // past the source's replay window: the migration ends "committed-unconfirmed" with
    // the source VM paused (never resumed) and the destination holding the loaded VM
    // (not running). Once the link is back, `ferry recover` delivers the decision.
    let cl = Cluster::start(&ClusterOpts {
        source_env: vec![("FERRY_TEST_DROP_COMMIT".into(), "2000".into())],
        source_sidecar_args: vec!["--replay-window-s".into(), "2".into()],
        ..ClusterOpts::default()
    })?;
    let child = cl.spawn_migrate(&[])?;
    wait_for(
        "the commit decision recorded and the link dropped",
        Duration::from_secs(60),
        || {
            cl.procs[SIDECAR_A]
                .log_text()
                .contains("dropping the link instead of sending Commit")
        },
    )?;
    cl.hosts.cut()?;
    let s = summary_of(child)?;
    assert_eq!(s["result"], "committed-unconfirmed", "{s:#}\n{}", cl.logs());
    assert!(
        s["error"]
            .as_str()
            .is_some_and(|e| e.contains("ferry recover")),
        "{s:#}"
    );
    // Neither side runs the VM now, and a new migration of it is refused.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(cl.vm_a().map(|v| v.state), Some("paused".into()));
    assert_ne!(cl.vm_b().map(|v| v.state), Some("running".into()));
    let again = cl.migrate(&[])?;
    assert_eq!(again["result"], "refused", "{again:#}");
    assert!(
        again["error"]
            .as_str()
            .is_some_and(|e| e.contains("unconfirmed")),
        "{again:#}"
    );
    cl.hosts.restore()?;
    let recover = || {
        cl.hosts
            .cmd(0, &bin("ferry"))
            .args(["recover", "vm1", "--socket"])
            .arg(cl.hosts.path("a.sock"))
            .output()
    };
    let out = recover()?;
    assert!(
        out.status.success(),
        "ferry recover failed: {}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        cl.logs()
    );
    wait_for("destination running", Duration::from_secs(10), || {
        cl.vm_b().is_some_and(|v| v.state == "running")
    })?;
    wait_for("source stopped for good", Duration::from_secs(10), || {
        cl.vm_a().is_some_and(|v| v.state == "migrated")
    })?;
    // A second recover has nothing left to do and says so.
    let out = recover()?;
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("already confirmed"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(())
}

/// The source opens its data connections as soon as it reads `Accept`: the destination
/// must already know the session's key by then (it once registered it only after sending
/// `Accept`, and a busy host refused the first connection's proof). Held right after
/// `Accept`, the migration still commits.
#[test]
fn data_connections_opened_right_after_accept_are_taken() -> anyhow::Result<()> {
    let _g = serial();
    let cl = Cluster::start(&ClusterOpts {
        dest_env: hold_for("accept-sent", 1000),
        ..ClusterOpts::default()
    })?;
    let s = cl.migrate(&[])?;
    assert!(committed(&s), "{s:#}\n{}", cl.logs());
    assert!(
        cl.procs[SIDECAR_B]
            .log_text()
            .contains("test hook: holding at accept-sent"),
        "the hold never happened"
    );
    Ok(())
}

/// Bytes the memfds named `name…` that process `pid` holds open or mapped have allocated.
fn memfd_bytes(pid: u32, name: &str) -> anyhow::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let mut seen = std::collections::HashMap::new();
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))?;
    let mapped = std::fs::read_dir(format!("/proc/{pid}/map_files"))?;
    for fd in open.chain(mapped) {
        let fd = fd?.path();
        let Ok(target) = std::fs::read_link(&fd) else {
            continue;
        };
        if target.to_string_lossy().contains(name) {
            // One memfd may be open more than once.
            let m = std::fs::metadata(&fd)?;
            seen.insert(m.ino(), m.blocks() * 512);
        }
    }
    Ok(seen.values().sum())
}

/// Where the destination fills the VM's memory (`ferry serve --populate`). By default
/// (`overlap`) nothing is filled before `Accept`: each receiver fills a frame's pages just
/// before they land, so the pages the source sends as zero markers (three quarters of this
/// guest) are never allocated at the destination. With `ahead` every page is allocated
/// before the first one arrives. Both migrate the VM intact.
#[test]
fn destination_memory_is_filled_as_pages_arrive_unless_asked_to_fill_it_ahead() -> anyhow::Result<()>
{
    let _g = serial();
    for (how, lo, hi) in [("overlap", 0.2, 0.45), ("ahead", 0.99, 1.01)] {
        let cl = Cluster::start(&ClusterOpts {
            mem_mib: 256,
            rate_mib: 0,
            source_vmm_args: vec!["--fill-pct".into(), "25".into()],
            // The destination VM stays idle too: its writers would allocate pages.
            dest_vmm_args: vec!["--no-verify".into(), "--rate-mib".into(), "0".into()],
            dest_sidecar_args: vec!["--populate".into(), how.into()],
            ..ClusterOpts::default()
        })?;
        let s = cl.migrate(&["--streams", "4"])?;
        assert!(committed(&s), "{how}: {s:#}\n{}", cl.logs());
        assert_eq!(s["digest_match"], true, "{how}: {s:#}");
        assert!(s["zero_pages_skipped"].as_u64() > Some(30_000), "{s:#}");
        // The 75 % never written are holes of the source's memfds: round 1 leaves them
        // out without reading them.
        assert!(s["hole_pages_skipped"].as_u64() > Some(45_000), "{s:#}");
        wait_for("destination running", Duration::from_secs(5), || {
            cl.vm_b().is_some_and(|v| v.state == "running")
        })?;
        let held = memfd_bytes(cl.procs[VMM_B].child.id(), "ferry-in-vm1")?;
        let share = held as f64 / f64::from(256u32 << 20);
        assert!(
            (lo..hi).contains(&share),
            "{how}: the destination's memfds hold {} MiB of 256 MiB ({share:.2}); {} zero pages, {} bytes moved",
            held >> 20,
            s["zero_pages_skipped"],
            s["bytes_transferred"]
        );
    }
    Ok(())
}

/// A VM whose RAM is backed by 2 MiB huge pages (hugetlbfs memfds, `--hugepages`)
/// migrates into huge pages: the offer carries the page size, a destination without
/// enough free huge pages of that size refuses it with the reason (the VM runs on at the
/// source), and once there are, the destination's memfds are huge-page backed too and
/// every page arrives intact while the guest writes.
#[test]
fn a_huge_page_vm_migrates_into_huge_pages_or_is_refused_without_them() -> anyhow::Result<()> {
    let _g = serial();
    // 128 MiB: 64 pages at the source; too few for the destination as well at first.
    let hp = HugePages::reserve(64 + 8)?;
    let cl = Cluster::start(&ClusterOpts {
        mem_mib: 128,
        rate_mib: 16,
        source_vmm_args: vec!["--hugepages".into()],
        ..ClusterOpts::default()
    })?;
    let src_sizes = mapped_page_sizes_kib(cl.procs[VMM_A].child.id(), "memfd:ferry-workload-")?;
    assert!(
        !src_sizes.is_empty() && src_sizes.iter().all(|&k| k == 2048),
        "source mappings: {src_sizes:?}"
    );
    let s = cl.migrate(&["--streams", "4"])?;
    assert_eq!(s["result"], "aborted", "{s:#}");
    assert!(
        s["error"]
            .as_str()
            .is_some_and(|e| e.contains("huge pages of 2048 KiB")),
        "{s:#}"
    );
    cl.source_keeps_running()?;
    hp.set(2 * 64 + 8)?;
    let s = cl.migrate(&["--streams", "4"])?;
    assert!(committed(&s), "{s:#}\n{}", cl.logs());
    assert_eq!(s["digest_match"], true, "{s:#}");
    wait_for("destination running", Duration::from_secs(5), || {
        cl.vm_b().is_some_and(|v| v.state == "running")
    })?;
    let b = cl.vm_b().expect("destination status");
    assert!(b.detail.contains("verified 32768 pages"), "{b:?}");
    let dst_sizes = mapped_page_sizes_kib(cl.procs[VMM_B].child.id(), "memfd:ferry-in-vm1-")?;
    assert!(
        !dst_sizes.is_empty() && dst_sizes.iter().all(|&k| k == 2048),
        "destination mappings: {dst_sizes:?}"
    );
    Ok(())
}

/// Where the host allows transparent huge pages for shared memory on request
/// (`shmem_enabled` = `advise`), the destination asks for them on the copy it fills
/// (`MADV_HUGEPAGE`), so filling it allocates and zeroes 2 MiB at a time; the source VMM's
/// memfds, never advised, stay in 4 KiB pages, and every page still arrives intact. With
/// the kernel's default (`never`) nothing is held in huge pages. The setting is put back
/// afterwards.
#[test]
fn the_destination_fills_memory_in_transparent_huge_pages_where_the_host_allows(
) -> anyhow::Result<()> {
    let _g = serial();
    for (mode, want_huge) in [("advise", true), ("never", false)] {
        let _thp = ShmemThp::set(mode)?;
        let cl = Cluster::start(&ClusterOpts {
            mem_mib: 256,
            rate_mib: 0,
            source_vmm_args: vec!["--fill-pct".into(), "100".into()],
            dest_vmm_args: vec!["--rate-mib".into(), "0".into()],
            ..ClusterOpts::default()
        })?;
        let before = shmem_huge_kib()?;
        let s = cl.migrate(&["--streams", "4"])?;
        assert!(committed(&s), "{mode}: {s:#}\n{}", cl.logs());
        assert_eq!(s["digest_match"], true, "{mode}: {s:#}");
        wait_for("destination running", Duration::from_secs(5), || {
            cl.vm_b().is_some_and(|v| v.state == "running")
        })?;
        let b = cl.vm_b().expect("destination status");
        assert!(b.detail.contains("verified 65536 pages"), "{mode}: {b:?}");
        let grown = shmem_huge_kib()?.saturating_sub(before);
        if want_huge {
            // The destination's 256 MiB copy, in huge pages (a little slack for 2 MiB
            // units another process may have freed meanwhile).
            assert!(
                grown >= 240 << 10,
                "{mode}: ShmemHugePages grew by {grown} KiB"
            );
        } else {
            assert!(
                grown < 16 << 10,
                "{mode}: ShmemHugePages grew by {grown} KiB"
            );
        }
    }
    Ok(())
}

/// The CPUs each thread named `prefix…` of process `pid` may run on (`Cpus_allowed_list`).
fn thread_cpus(pid: u32, prefix: &str) -> Vec<String> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for t in tasks.flatten() {
        let t = t.path();
        let Ok(comm) = std::fs::read_to_string(t.join("comm")) else {
            continue;
        };
        if !comm.trim().starts_with(prefix) {
            continue;
        }
        let status = std::fs::read_to_string(t.join("status")).unwrap_or_default();
        if let Some(l) = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        {
            out.push(l.trim().to_owned());
        }
    }
    out
}

/// Data threads run where placement puts them: with `--data-cpus 1` on both sidecars,
/// every sending thread of the source and every receiving thread of the destination is
/// bound to CPU 1 alone; without it, on the CPUs hwloc finds local to the interface the
/// migration uses. A veth is virtual (hwloc places no such device), so there they stay
/// unbound, on every online CPU, and the summary says why.
#[test]
fn data_threads_run_on_the_cpus_placement_chose() -> anyhow::Result<()> {
    let _g = serial();
    let online = std::fs::read_to_string("/sys/devices/system/cpu/online")?
        .trim()
        .to_owned();
    let named = vec!["--data-cpus".to_string(), "1".into()];
    for (args, want, why) in [
        (named, "1".to_string(), "CPUs 1 (data_cpus)"),
        (Vec::new(), online, "is not a device hwloc places"),
    ] {
        let cl = Cluster::start(&ClusterOpts {
            source_sidecar_args: args.clone(),
            dest_sidecar_args: args.clone(),
            ..ClusterOpts::default()
        })?;
        let child = cl.spawn_slow_migration()?;
        let (a, b) = (
            cl.procs[SIDECAR_A].child.id(),
            cl.procs[SIDECAR_B].child.id(),
        );
        let mut seen = (Vec::new(), Vec::new());
        wait_for("the data threads", Duration::from_secs(10), || {
            seen = (thread_cpus(a, "ferry-tx-"), thread_cpus(b, "ferry-rx-"));
            !seen.0.is_empty() && !seen.1.is_empty()
        })?;
        assert!(
            seen.0.iter().chain(&seen.1).all(|c| *c == want),
            "{args:?}: sending threads on {:?}, receiving threads on {:?}; want {want}",
            seen.0,
            seen.1
        );
        cl.hosts.limit_rate(0, "20gbit")?;
        let s = summary_of(child)?;
        assert!(committed(&s), "{s:#}\n{}", cl.logs());
        assert!(
            s["placement"].as_str().is_some_and(|p| p.contains(why)),
            "{args:?}: {s:#}"
        );
    }
    Ok(())
}
