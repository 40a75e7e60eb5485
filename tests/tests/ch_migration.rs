//! End-to-end with an unmodified Cloud Hypervisor (CH) running Ferry's PVH test guest
//! (`testbeds/ch-guest`) on `/dev/kvm`, hosts as network namespaces.
//!
//! `#[ignore]`d where CH cannot be found (listed as ignored, with the reason);
//! `scripts/test.sh` runs them with `--include-ignored` whenever it finds CH, and an
//! explicitly requested test without CH fails (`ferry_tests::ch` says where CH is looked
//! for, and why this host preloads a shim).

use std::time::Duration;

use ferry_tests::ch::{guest_kernel, require_ch, Ch};
use ferry_tests::*;

/// CH's own migration of the test guest, TCP with 4 connections: the reference Ferry is
/// measured against, and the proof that the guest, the shim and the harness work. The
/// guest keeps counting at the destination and never finds a page it wrote missing.
#[test]
#[ignore = "needs Cloud Hypervisor: scripts/test.sh runs it when it finds CH"]
fn ch_migrates_the_test_guest_by_itself() -> anyhow::Result<()> {
    require_ch();
    require_kvm();
    let _g = serial();
    let hosts = TwoHosts::new()?;
    let kernel = guest_kernel(&hosts.dir)?;
    let src = Ch::start(&hosts, 0, "src", Some(&kernel), 256, false)?;
    wait_for(
        "the guest counting at the source",
        Duration::from_secs(20),
        || src.guest().pass >= 16,
    )?;
    let dst = Ch::start(&hosts, 1, "dst", None, 0, false)?;
    let url = format!("tcp:{ADDR_B}:6000");
    let before = src.guest().pass;
    let recv = dst.remote(
        &hosts,
        1,
        &["receive-migration", &format!("receiver_url={url}")],
    )?;
    wait_for(
        "the destination CH listening",
        Duration::from_secs(10),
        || {
            hosts
                .cmd(1, std::path::Path::new("ss"))
                .args(["-Hltn", "sport = :6000"])
                .output()
                .is_ok_and(|o| !o.stdout.is_empty())
        },
    )?;
    let send = src.remote(
        &hosts,
        0,
        &[
            "send-migration",
            &format!("destination_url={url},connections=4,downtime_ms=300"),
        ],
    )?;
    let sent = send.wait_with_output()?;
    assert!(
        sent.status.success(),
        "{}",
        String::from_utf8_lossy(&sent.stderr)
    );
    let received = recv.wait_with_output()?;
    assert!(
        received.status.success(),
        "receive-migration: {}\n{}\n{}",
        String::from_utf8_lossy(&received.stderr),
        src.proc.log_text(),
        dst.proc.log_text()
    );
    // The source CH exits after a successful migration; the destination runs the guest,
    // which writes to the serial file the source's config named (the same path here: CH
    // truncates it at the destination). A guest that kept its memory counts on from
    // where it was; a restarted one would start again from 8.
    wait_for(
        "the guest counting on at the destination",
        Duration::from_secs(20),
        || src.guest().pass >= before + 16,
    )?;
    let g = src.guest();
    assert_eq!(g.bad, 0, "{:?}", g.bad_lines);
    assert!(g.bad_lines.is_empty(), "{:?}", g.bad_lines);
    let state = dst.vm_state()?;
    assert_eq!(state.as_deref(), Some("Running"));
    Ok(())
}
