//! A destination is never left holding a copy of a migration that did not happen, and a
//! migration that cannot be recorded does not start. Real sidecars and workload VMMs in
//! two network namespaces (the fault-injection build of `ferry`).

use anyhow::Context;
use ferry_tests::*;

/// A destination that is alive but stuck (it holds after loading the VM, for longer than
/// the source waits for an answer): the source gives up, resumes the VM, and the stuck
/// copy is released once the destination listens again.
#[test]
fn a_stuck_destination_times_out_and_its_copy_is_released() -> anyhow::Result<()> {
    let _g = serial();
    let opts = ClusterOpts {
        dest_env: hold_for("loaded", 12_000),
        source_env: vec![("FERRY_TEST_CONTROL_TIMEOUT_MS".into(), "3000".into())],
        ..ClusterOpts::default()
    };
    let cl = Cluster::start(&opts)?;
    let s = cl.migrate(&[])?;
    assert_eq!(s["result"], "aborted", "{s:#}");
    let error = s["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("Ready") || error.to_lowercase().contains("timed out"),
        "{s:#}"
    );
    cl.source_keeps_running().with_context(|| cl.logs())?;
    // The destination loaded the VM and held it; after its hold it finds the link gone,
    // keeps the copy, and the source's releaser has it discarded.
    cl.destination_discarded().with_context(|| cl.logs())?;
    let log = cl.procs[SIDECAR_A].log_text();
    assert!(
        log.contains("released: the destination holds no copy"),
        "{}",
        cl.logs()
    );
    // Nothing is left pending on the source.
    let pending = std::fs::read_dir(cl.hosts.path("state-a"))?
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "release"))
        .count();
    assert_eq!(pending, 0, "{}", cl.logs());
    Ok(())
}

/// A state directory that cannot take the migration's first record: the migration is
/// refused with the reason before anything reaches the destination; the VM runs on.
#[test]
fn a_full_state_directory_refuses_the_migration_before_it_starts() -> anyhow::Result<()> {
    let _g = serial();
    let opts = ClusterOpts {
        state_tmpfs: true,
        ..ClusterOpts::default()
    };
    let cl = Cluster::start(&opts)?;
    cl.tmpfs.as_ref().context("tmpfs")?.fill()?;
    let s = cl.migrate(&[])?;
    assert_eq!(s["result"], "aborted", "{s:#}");
    let error = s["error"].as_str().unwrap_or_default();
    assert!(error.contains("before it started"), "{s:#}");
    assert!(error.contains("No space left"), "{s:#}");
    assert_eq!(s["bytes_transferred"].as_u64().unwrap_or(0), 0, "{s:#}");
    cl.source_keeps_running().with_context(|| cl.logs())?;
    let b = cl.vm_b().context("destination status")?;
    assert_eq!(b.state, "waiting", "{b:?}");
    Ok(())
}
