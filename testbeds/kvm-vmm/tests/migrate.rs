//! The VMM side end to end in one process, on the real `/dev/kvm` (fails without it).

use std::time::Duration;

use ferry_kvm_glue::dirty::DirtyModeRequest;
use ferry_kvm_vmm::guest::{self, GuestConfig, Pattern};
use ferry_kvm_vmm::machine::{Machine, RunOptions};
use ferry_kvm_vmm::migrate::{migrate_local, SourceVm};
use ferry_kvm_vmm::status::StatusFile;

fn migrate(pattern: Pattern, dirty: DirtyModeRequest, regions: u32) {
    assert!(
        std::path::Path::new("/dev/kvm").exists(),
        "this test needs /dev/kvm (present on every project machine and in CI)"
    );
    let cfg = GuestConfig {
        ram: 64 << 20,
        regions,
        vcpus: 2,
        pattern,
        hot_pages: 256,
        burst: 32,
        fill_words: 16,
    };
    let opts = RunOptions {
        rate: 20_000,
        dirty,
        irqchip: true,
    };
    let mut m = Machine::boot(cfg, opts).expect("boot");
    m.start().expect("start");
    std::thread::sleep(Duration::from_millis(300));
    let mut src = SourceVm::new(m, StatusFile::new(None));
    let (dst, report) = migrate_local(
        &mut src,
        ferry_engine::precopy::ConvergencePolicy {
            downtime_budget: Duration::from_millis(1),
            max_rounds: 10,
            timeout: Duration::from_secs(60),
            on_limit: ferry_engine::precopy::LimitAction::ForceStopAndCopy,
        },
    )
    .expect("migration");
    assert!(src.stopped);
    eprintln!(
        "{pattern:?}/{dirty:?}: rounds {:?}, pause {:?}, downtime {:?}",
        report.rounds, report.pause, report.downtime
    );
    let at_pause = dst.expected.clone();
    assert!(
        at_pause.iter().all(|c| c.writes > 0),
        "the guest ran before the migration"
    );
    let m = dst.machine.as_ref().expect("running");
    std::thread::sleep(Duration::from_millis(200));
    m.pause().expect("pause");
    let r = guest::verify(m.ram(), &m.cfg).expect("record intact after migration");
    for (now, then) in r.counters.iter().zip(&at_pause) {
        assert!(now.writes > then.writes, "continued past {then:?}: {now:?}");
    }
}

#[test]
fn random_pattern_manual_protect_two_regions() {
    migrate(Pattern::Random, DirtyModeRequest::Auto, 2);
}

#[test]
fn sequential_pattern_classic() {
    migrate(Pattern::Sequential, DirtyModeRequest::Classic, 1);
}

#[test]
fn hot_pattern_dirty_ring() {
    migrate(Pattern::Hot, DirtyModeRequest::Ring { bytes: 64 * 1024 }, 1);
}

#[test]
fn a_skipped_final_round_is_caught_by_verification() {
    use ferry_cpl3_guest::GuestRam;
    use ferry_kvm_glue::endpoint::{IncomingVm, MigratableVm};
    use ferry_kvm_vmm::migrate::{copy_pages, DestVm};
    use ferry_proto::common::RegionInfo;

    let cfg = GuestConfig {
        ram: 64 << 20,
        regions: 1,
        vcpus: 2,
        pattern: Pattern::Hot,
        hot_pages: 64,
        burst: 32,
        fill_words: 4,
    };
    let opts = RunOptions {
        rate: 0,
        dirty: DirtyModeRequest::Auto,
        irqchip: true,
    };
    let mut m = Machine::boot(cfg, opts).expect("boot");
    m.start().expect("start");
    let mut src = SourceVm::new(m, StatusFile::new(None));
    src.start_dirty_log().expect("log");
    let dst_ram = GuestRam::new_memfd(&cfg.region_layout()).expect("ram");
    copy_pages(src.machine.ram(), &dst_ram, None).expect("round 1");
    std::thread::sleep(Duration::from_millis(50)); // the hot set is rewritten meanwhile
    src.pause().expect("pause");
    // The final round is skipped on purpose: the destination gets stale pages.
    let blob = src.save_state().expect("state");
    let r = &dst_ram.regions()[0];
    let fds = vec![(
        RegionInfo {
            gpa: r.gpa,
            size: r.size,
            offset: r.offset,
        },
        r.memfd.try_clone().expect("dup"),
    )];
    let mut dst = DestVm::new(opts, StatusFile::new(None));
    let e = dst
        .load("stale", fds, blob)
        .expect_err("stale memory must be refused");
    eprintln!("refused as expected: {e}");
    src.resume().expect("source runs on");
}
