//! Tests against the real `/dev/kvm` (PVM on the project's machines: CPL3 guests only).
//!
//! They need `/dev/kvm` and fail loudly without it: they never pass silently.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ferry_cpl3_guest::{self as cpl3, GuestRam, FREE_GPA};
use ferry_kvm_glue::dirty::{DirtyMode, DirtyModeRequest, DirtyTracker};
use ferry_kvm_glue::state::VmState;
use ferry_kvm_glue::vcpu::{RunState, VcpuControl};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

const MIB: u64 = 1 << 20;
const CODE_GPA: u64 = FREE_GPA;

/// Writer: `mov [rsi], rax; add rsi, rdx; dec rcx; jnz start; out 0x10, al; jmp start`.
/// Writes `rcx` qwords at `rsi`, `rsi + rdx`, ... then exits to the VMM.
const WRITER: &[u8] = &[
    0x48, 0x89, 0x06, // mov [rsi], rax
    0x48, 0x01, 0xd6, // add rsi, rdx
    0x48, 0xff, 0xc9, // dec rcx
    0x75, 0xf5, //       jnz -11 (start)
    0xe6, 0x10, //       out 0x10, al
    0xeb, 0xf1, //       jmp -15 (start)
];

/// Counter: `inc rax; mov [rdi], rax; test eax, 0xfffff; jnz loop; out 0x11, al; jmp loop`.
/// Counts forever in rax and [rdi]; exits every 2^20 increments.
const COUNTER: &[u8] = &[
    0x48, 0xff, 0xc0, //                   inc rax
    0x48, 0x89, 0x07, //                   mov [rdi], rax
    0xa9, 0xff, 0xff, 0x0f, 0x00, //       test eax, 0xfffff
    0x75, 0xf3, //                         jnz -13 (loop)
    0xe6, 0x11, //                         out 0x11, al
    0xeb, 0xef, //                         jmp -17 (loop)
];

struct TestVm {
    kvm: Kvm,
    vm: VmFd,
    // Declared after `vm`: dropped after it, so the slots never point at unmapped memory.
    ram: GuestRam,
}

fn kvm() -> Kvm {
    Kvm::new().expect("this test needs /dev/kvm (it is present on every project machine and in CI)")
}

fn new_vm(layout: &[(u64, u64)], irqchip: bool, code: &[u8]) -> TestVm {
    let kvm = kvm();
    let vm = kvm.create_vm().expect("create VM");
    let ram = GuestRam::new_memfd(layout).expect("guest RAM");
    // SAFETY: `ram` lives in the same TestVm as `vm` and is dropped after it.
    unsafe { ram.register(&vm, 0) }.expect("register RAM");
    cpl3::write_tables(&ram).expect("page tables");
    ram.write(CODE_GPA, code).expect("code in RAM");
    if irqchip {
        vm.create_irq_chip().expect("irqchip");
    }
    TestVm { kvm, vm, ram }
}

fn new_vcpu(t: &TestVm, id: u64) -> VcpuFd {
    let vcpu = t.vm.create_vcpu(id).expect("create vCPU");
    cpl3::set_supported_cpuid(&t.kvm, &vcpu).expect("cpuid");
    cpl3::setup_long_mode_cpl3(&vcpu, CODE_GPA).expect("long mode");
    vcpu
}

/// Runs the writer for one batch: `count` qwords from `start` every `stride` bytes.
fn write_batch(
    t: &TestVm,
    tracker: &DirtyTracker,
    vcpu: &mut VcpuFd,
    start: u64,
    stride: u64,
    count: u64,
) {
    let mut regs = vcpu.get_regs().expect("regs");
    regs.rsi = start;
    regs.rdx = stride;
    regs.rcx = count;
    regs.rax = 0x5a5a_0000 + count;
    vcpu.set_regs(&regs).expect("regs");
    loop {
        match vcpu.run().expect("KVM_RUN") {
            VcpuExit::IoOut(0x10, _) => return,
            VcpuExit::Unsupported(31) => tracker.handle_ring_full(&t.vm).expect("ring full"),
            e => panic!("unexpected exit {e:?}"),
        }
    }
}

fn dirty_set(log: &ferry_kvm_glue::dirty::DirtyLog) -> BTreeSet<u64> {
    let mut s = BTreeSet::new();
    for sb in &log.slots {
        for p in 0..sb.pages {
            if sb.is_dirty(p) {
                s.insert(sb.guest_phys_addr / 4096 + p);
            }
        }
    }
    s
}

fn pages(start: u64, stride: u64, count: u64) -> BTreeSet<u64> {
    (0..count).map(|k| (start + k * stride) / 4096).collect()
}

fn dirty_exactness(request: DirtyModeRequest, expect: fn(DirtyMode) -> bool) {
    let t = new_vm(&[(0, 64 * MIB), (64 * MIB, 64 * MIB)], false, WRITER);
    // SAFETY: the slots are exactly those `new_vm` registered; RAM outlives the VM.
    let tracker = unsafe { DirtyTracker::new(&t.vm, t.ram.slots(0), request) }.expect("tracker");
    assert!(expect(tracker.mode()), "mode {:?}", tracker.mode());
    let mut vcpu = new_vcpu(&t, 0);
    tracker.attach_vcpu(&vcpu).expect("ring");
    let own = tracker.own_writes();

    // Before logging, writes are not tracked at all. This first run also maps the code
    // page: a page first touched after logging starts is reported dirty once even if only
    // read, because the guest PTEs have D=1 and KVM's shadow MMU then maps it writable
    // (conservative, never a miss; see cpl3::write_tables).
    write_batch(&t, &tracker, &mut vcpu, 4 * MIB, 4096, 10);
    tracker.start(&t.vm).expect("start logging");

    // Round 1: guest writes in both slots, plus one host write.
    write_batch(&t, &tracker, &mut vcpu, 2 * MIB, 3 * 4096, 100);
    write_batch(&t, &tracker, &mut vcpu, 64 * MIB + 8192, 64 * 1024, 50);
    t.ram
        .write(5 * MIB + 16, b"host write")
        .expect("host write");
    own.mark(5 * MIB + 16, 10).expect("own write in RAM");
    let mut expected = pages(2 * MIB, 3 * 4096, 100);
    expected.extend(pages(64 * MIB + 8192, 64 * 1024, 50));
    expected.insert(5 * MIB / 4096);
    let t0 = Instant::now();
    let log = tracker.get_and_clear(&t.vm).expect("get and clear");
    let wall = t0.elapsed();
    assert_eq!(dirty_set(&log), expected, "round 1 must be exact");
    assert_eq!(log.stats.own_write_pages, 1);
    eprintln!(
        "{:?}: round 1 {} pages, get {:?}, clear {:?} in {} ioctls (max {:?}), wall {:?}",
        tracker.mode(),
        log.stats.dirty_pages,
        log.stats.get,
        log.stats.clear,
        log.stats.clear_calls,
        log.stats.max_clear,
        wall
    );

    // Nothing ran: the next round is empty (the clear happened).
    let log = tracker.get_and_clear(&t.vm).expect("get and clear");
    assert!(
        dirty_set(&log).is_empty(),
        "round 2 must be empty: {:?}",
        dirty_set(&log)
    );

    // Round 3: rewriting round-1 pages is logged again (they were re-protected).
    write_batch(&t, &tracker, &mut vcpu, 2 * MIB, 6 * 4096, 50);
    write_batch(&t, &tracker, &mut vcpu, 100 * MIB, 4096, 3000);
    let mut expected = pages(2 * MIB, 6 * 4096, 50);
    expected.extend(pages(100 * MIB, 4096, 3000));
    let log = tracker.get_and_clear(&t.vm).expect("get and clear");
    assert_eq!(dirty_set(&log), expected, "round 3 must be exact");
    eprintln!(
        "{:?}: round 3 {} pages, get {:?}, clear {:?} in {} ioctls, ring-full exits {}",
        tracker.mode(),
        log.stats.dirty_pages,
        log.stats.get,
        log.stats.clear,
        log.stats.clear_calls,
        tracker.ring_full_exits()
    );
    if matches!(tracker.mode(), DirtyMode::Ring { .. }) {
        assert!(
            tracker.ring_full_exits() > 0,
            "3000 pages must fill a 1024-entry ring"
        );
    }

    tracker.stop(&t.vm).expect("stop logging");
    assert!(
        tracker.get_and_clear(&t.vm).is_err(),
        "not logging any more"
    );
}

#[test]
fn dirty_log_manual_protect_is_exact() {
    dirty_exactness(DirtyModeRequest::Auto, |m| m == DirtyMode::ManualProtect);
}

#[test]
fn dirty_log_classic_is_exact() {
    dirty_exactness(DirtyModeRequest::Classic, |m| m == DirtyMode::Classic);
}

#[test]
fn dirty_ring_is_exact_for_cpl3_guests() {
    // 16 KiB = 1024 entries: round 3's 3000 pages force KVM_EXIT_DIRTY_RING_FULL.
    dirty_exactness(DirtyModeRequest::Ring { bytes: 16 * 1024 }, |m| {
        matches!(m, DirtyMode::Ring { .. })
    });
}

#[test]
fn dirty_log_cost_one_gib() {
    let t = new_vm(&[(0, 1024 * MIB)], false, WRITER);
    // SAFETY: as in `dirty_exactness`.
    let tracker = unsafe { DirtyTracker::new(&t.vm, t.ram.slots(0), DirtyModeRequest::Auto) }
        .expect("tracker");
    let mut vcpu = new_vcpu(&t, 0);
    // Warm-up before logging, so the code page is mapped (see `dirty_exactness`).
    write_batch(&t, &tracker, &mut vcpu, 4 * MIB, 4096, 1);
    tracker.start(&t.vm).expect("start");
    for (label, count) in [("few", 10u64), ("65536", 65536)] {
        write_batch(&t, &tracker, &mut vcpu, 64 * MIB, 4096, count);
        let log = tracker.get_and_clear(&t.vm).expect("get and clear");
        assert_eq!(dirty_set(&log), pages(64 * MIB, 4096, count), "{label}");
        eprintln!(
            "1 GiB slot, {label} dirty pages: GET {:?}, CLEAR {:?} in {} ioctls (longest {:?})",
            log.stats.get, log.stats.clear, log.stats.clear_calls, log.stats.max_clear
        );
    }
    tracker.stop(&t.vm).expect("stop");
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

#[test]
fn pause_is_prompt_and_holds() {
    let t = new_vm(&[(0, 16 * MIB)], false, COUNTER);
    let mut vcpus: Vec<VcpuFd> = (0..2).map(|i| new_vcpu(&t, i)).collect();
    for (i, v) in vcpus.iter().enumerate() {
        let mut regs = v.get_regs().expect("regs");
        regs.rdi = 2 * MIB + 4096 * i as u64;
        v.set_regs(&regs).expect("regs");
    }
    let control = VcpuControl::new(2).expect("control");
    let failed = AtomicBool::new(false);
    let mut samples = Vec::new();
    std::thread::scope(|s| {
        for (i, vcpu) in vcpus.iter_mut().enumerate() {
            let control = control.clone();
            let failed = &failed;
            s.spawn(move || {
                let mut th = control.attach(i, vcpu).expect("attach");
                while th.checkpoint() == RunState::Run {
                    match th.run() {
                        Ok(None) | Ok(Some(VcpuExit::IoOut(0x11, _))) => {}
                        other => {
                            eprintln!("vCPU {i}: unexpected {other:?}");
                            failed.store(true, Ordering::SeqCst);
                            break;
                        }
                    }
                }
            });
        }
        std::thread::sleep(Duration::from_millis(50));
        for _ in 0..200 {
            let r = control.pause(Duration::from_secs(1)).expect("pause");
            samples.push(r.elapsed);
            let a = (
                t.ram.read_u64(2 * MIB).expect("ram"),
                t.ram.read_u64(2 * MIB + 4096).expect("ram"),
            );
            std::thread::sleep(Duration::from_micros(500));
            let b = (
                t.ram.read_u64(2 * MIB).expect("ram"),
                t.ram.read_u64(2 * MIB + 4096).expect("ram"),
            );
            assert_eq!(a, b, "counters moved while paused");
            control.resume();
            std::thread::sleep(Duration::from_millis(2));
        }
        control.stop(Duration::from_secs(2)).expect("stop");
    });
    assert!(!failed.load(Ordering::SeqCst));
    samples.sort();
    let (p50, p99, max) = (
        percentile(&samples, 0.5),
        percentile(&samples, 0.99),
        samples[samples.len() - 1],
    );
    eprintln!(
        "pause of 2 vCPUs, {} samples: p50 {p50:?}, p99 {p99:?}, max {max:?}",
        samples.len()
    );
    assert!(
        p99 < Duration::from_millis(20),
        "pause p99 {p99:?} is far above docs/platform.md's ~87 us"
    );
    let counted = t.ram.read_u64(2 * MIB).expect("ram");
    assert!(
        counted > 1 << 20,
        "the guest ran natively ({counted} increments)"
    );
}

#[test]
fn state_moves_to_a_fresh_vm_and_the_guest_continues() {
    const COUNTER_GPA: u64 = 2 * MIB;
    let src = new_vm(&[(0, 16 * MIB)], true, COUNTER);
    let mut vcpu = new_vcpu(&src, 0);
    let mut regs = vcpu.get_regs().expect("regs");
    regs.rdi = COUNTER_GPA;
    vcpu.set_regs(&regs).expect("regs");
    // The `mov [rdi], rax` sits 3 bytes into the loop: a pause that lands on it has
    // incremented the register but not yet stored it.
    let store_rip = regs.rip + 3;
    let control = VcpuControl::new(1).expect("control");
    let (blob, saved_rax, saved_rip) = std::thread::scope(|s| {
        let c = control.clone();
        let vcpu = &mut vcpu;
        s.spawn(move || {
            let mut th = c.attach(0, vcpu).expect("attach");
            while th.checkpoint() == RunState::Run {
                match th.run() {
                    Ok(None) | Ok(Some(VcpuExit::IoOut(0x11, _))) => {}
                    other => panic!("unexpected {other:?}"),
                }
            }
        });
        // Run past the first exit so the counter is well above 2^20.
        let deadline = Instant::now() + Duration::from_secs(10);
        while src.ram.read_u64(COUNTER_GPA).expect("ram") < 3 << 20 {
            assert!(Instant::now() < deadline, "guest does not count");
            std::thread::sleep(Duration::from_millis(5));
        }
        let pause = control.pause(Duration::from_secs(1)).expect("pause");
        eprintln!("paused in {:?}", pause.elapsed);
        let state = control
            .with_vcpus(|v| VmState::save(&src.kvm, &src.vm, v, b"device state".to_vec()))
            .expect("paused")
            .expect("save");
        assert_eq!(state.irqchip.len(), 3, "irqchip saved");
        assert!(state.vcpus[0].lapic.is_some(), "LAPIC saved");
        eprintln!(
            "saved {} MSRs (unreadable: {:x?}), xsave {} bytes",
            state.vcpus[0].msrs.len(),
            state.vcpus[0].unreadable_msrs,
            state.vcpus[0].xsave.len() * 4
        );
        let (rax, rip) = (state.vcpus[0].regs.rax, state.vcpus[0].regs.rip);
        let blob = state.encode();
        control.stop(Duration::from_secs(1)).expect("stop");
        (blob, rax, rip)
    });
    if let Some(path) = std::env::var_os("FERRY_DUMP_STATE_SEED") {
        // The vm_state fuzz target's seed (fuzz/seeds/vm_state): selector byte 0, then the blob.
        std::fs::write(path, [&[0u8][..], &blob].concat()).expect("seed written");
    }
    let stored = if saved_rip == store_rip {
        saved_rax - 1
    } else {
        saved_rax
    };
    assert_eq!(
        src.ram.read_u64(COUNTER_GPA).expect("ram"),
        stored,
        "memory matches the register (paused at rip {saved_rip:#x})"
    );

    // Destination: a fresh VM in the same process; RAM copied, state restored.
    let dst = new_vm(&[(0, 16 * MIB)], true, &[]);
    let mut buf = vec![0u8; 16 * MIB as usize];
    src.ram.read(0, &mut buf).expect("read");
    dst.ram.write(0, &buf).expect("write");
    let state = VmState::decode(&blob).expect("decode");
    assert_eq!(state.device, b"device state");
    let mut vcpu2 = dst.vm.create_vcpu(0).expect("vCPU");
    let report = state.restore(&dst.vm, &[&vcpu2]).expect("restore");
    eprintln!("MSRs rejected on restore: {:x?}", report.rejected_msrs);
    assert_eq!(vcpu2.get_regs().expect("regs"), state.vcpus[0].regs);
    assert_eq!(vcpu2.get_sregs().expect("sregs"), state.vcpus[0].sregs);
    let clock = dst.vm.get_clock().expect("clock").clock;
    let drift = clock.abs_diff(state.clock.clock);
    assert!(drift < 1_000_000_000, "kvmclock jumped by {drift} ns");

    // The guest carries on from the saved count: the next exits come exactly at the next
    // multiples of 2^20, with memory and register in step.
    let step = 1u64 << 20;
    let mut next = (saved_rax / step + 1) * step;
    for _ in 0..3 {
        match vcpu2.run().expect("run") {
            VcpuExit::IoOut(0x11, _) => {}
            e => panic!("unexpected {e:?}"),
        }
        let rax = vcpu2.get_regs().expect("regs").rax;
        assert_eq!(rax, next, "continued exactly from {saved_rax}");
        assert_eq!(dst.ram.read_u64(COUNTER_GPA).expect("ram"), next);
        next += step;
    }
}

#[test]
fn get_dirty_log_refuses_a_bitmap_shorter_than_the_slot() {
    // A 64 MiB slot needs 256 words; a 4-word bitmap would let the kernel write 2 KiB past
    // it. It is refused before the ioctl.
    let t = new_vm(&[(0, 64 * MIB)], false, WRITER);
    let slots = t.ram.slots(0);
    // SAFETY: the slot is registered with these values by `new_vm`.
    let tracker = unsafe { DirtyTracker::new(&t.vm, slots.clone(), DirtyModeRequest::Classic) }
        .expect("tracker");
    tracker.start(&t.vm).expect("logging on");
    let pages = slots[0].memory_size / 4096;
    let mut short = vec![0u64; 4];
    // SAFETY: `pages` is the slot's registered size; the short bitmap must be refused.
    let e = unsafe {
        ferry_kvm_glue::ioctls::get_dirty_log_into(&t.vm, slots[0].slot, pages, &mut short)
    }
    .expect_err("short bitmap");
    assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
    let mut whole = vec![0u64; (pages / 64) as usize];
    // SAFETY: as above, with a bitmap of the slot's size.
    unsafe { ferry_kvm_glue::ioctls::get_dirty_log_into(&t.vm, slots[0].slot, pages, &mut whole) }
        .expect("a whole bitmap is read");
}
