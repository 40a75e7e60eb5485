//! The VM: memfd RAM, KVM VM and vCPUs, one thread per vCPU, pacing, dirty tracking,
//! pause/resume/stop and state save/restore through kvm-glue.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use ferry_cpl3_guest::{self as cpl3, GuestRam};
use ferry_kvm_glue::cpu::CpuProfile;
use ferry_kvm_glue::dirty::{DirtyLog, DirtyModeRequest, DirtyTracker};
use ferry_kvm_glue::state::VmState;
use ferry_kvm_glue::vcpu::{PauseReport, RunState, VcpuControl};
use kvm_bindings::{kvm_mp_state, KVM_MAX_CPUID_ENTRIES, KVM_MP_STATE_RUNNABLE};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

use crate::device::DeviceState;
use crate::guest::{self, Counters, GuestConfig, PROGRESS_PORT};

/// How long a pause may take before it is an error (docs/platform.md: p99 ~87 us).
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Run-time options beyond the guest's own configuration.
#[derive(Debug, Clone, Copy)]
pub struct RunOptions {
    /// Pages per second per vCPU (0 = as fast as the guest goes).
    pub rate: u64,
    /// Dirty-tracking mechanism.
    pub dirty: DirtyModeRequest,
    /// Create an in-kernel irqchip (LAPIC, IOAPIC, PIC).
    pub irqchip: bool,
}

/// A running (or ready) VM.
pub struct Machine {
    /// Guest configuration.
    pub cfg: GuestConfig,
    /// Run-time options.
    pub opts: RunOptions,
    kvm: Kvm,
    control: VcpuControl,
    tracker: Arc<DirtyTracker>,
    threads: Vec<JoinHandle<()>>,
    failure: Arc<Mutex<Option<String>>>,
    outs: Arc<Vec<AtomicU64>>,
    /// vCPUs created but not started yet.
    pending: Vec<VcpuFd>,
    profile: CpuProfile,
    // Dropped after every vCPU fd (threads are joined in Drop), RAM last. Other holders
    // of the RAM (the status file's counter probe) only keep it mapped longer.
    vm: Arc<VmFd>,
    ram: Arc<GuestRam>,
}

impl Machine {
    fn create(cfg: GuestConfig, opts: RunOptions, ram: GuestRam, irqchip: bool) -> Result<Self> {
        cfg.layout()?;
        let kvm = Kvm::new().context("opening /dev/kvm")?;
        let vm = kvm.create_vm().context("KVM_CREATE_VM")?;
        // SAFETY: `ram` is stored in the Machine (in an Arc: other holders only extend its
        // life) and so stays mapped until after `vm` and every vCPU are dropped.
        unsafe { ram.register(&vm, 0) }.context("registering guest RAM")?;
        // Before any vCPU exists: the dirty ring can only be enabled then.
        // SAFETY: the slots are exactly those just registered; RAM outlives the VM.
        let tracker =
            unsafe { DirtyTracker::new(&vm, ram.slots(0), opts.dirty) }.context("dirty tracker")?;
        if irqchip {
            vm.create_irq_chip().context("KVM_CREATE_IRQCHIP")?;
        }
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .context("KVM_GET_SUPPORTED_CPUID")?;
        let profile = CpuProfile::from_cpuid(supported.as_slice());
        let mut pending = Vec::new();
        for v in 0..cfg.vcpus {
            let vcpu = vm.create_vcpu(u64::from(v)).context("KVM_CREATE_VCPU")?;
            tracker.attach_vcpu(&vcpu).context("dirty ring")?;
            pending.push(vcpu);
        }
        let control = VcpuControl::new(cfg.vcpus as usize)?;
        Ok(Self {
            cfg,
            opts,
            kvm,
            control,
            tracker: Arc::new(tracker),
            threads: Vec::new(),
            failure: Arc::new(Mutex::new(None)),
            outs: Arc::new((0..cfg.vcpus).map(|_| AtomicU64::new(0)).collect()),
            pending,
            profile,
            vm: Arc::new(vm),
            ram: Arc::new(ram),
        })
    }

    /// Boots a fresh guest (not yet running: call [`start`](Self::start)).
    ///
    /// # Errors
    ///
    /// Any KVM or memory setup failure.
    pub fn boot(cfg: GuestConfig, opts: RunOptions) -> Result<Self> {
        cfg.layout()?;
        let ram = GuestRam::new_memfd(&cfg.region_layout()).context("guest RAM memfds")?;
        cpl3::write_tables(&ram)?;
        guest::install(&ram, &cfg)?;
        let mut m = Self::create(cfg, opts, ram, opts.irqchip)?;
        for (v, vcpu) in m.pending.iter().enumerate() {
            cpl3::set_supported_cpuid(&m.kvm, vcpu).context("KVM_SET_CPUID2")?;
            if v == 0 {
                m.profile = effective_profile(vcpu)?;
            }
            cpl3::setup_long_mode_cpl3(vcpu, guest::CODE_GPA).context("long mode")?;
            let mut regs = vcpu.get_regs()?;
            regs.rdi = guest::ctrl_gpa(v as u32);
            vcpu.set_regs(&regs)?;
            if opts.irqchip && v > 0 {
                // With an in-kernel LAPIC, APs wait for INIT/SIPI; these start at once.
                vcpu.set_mp_state(kvm_mp_state {
                    mp_state: KVM_MP_STATE_RUNNABLE,
                })?;
            }
        }
        Ok(m)
    }

    /// Builds a VM from migrated RAM (memfds: gpa, size, offset, fd) and a state blob, and
    /// restores the vCPUs (not yet running). Returns the machine and the device state.
    ///
    /// Before anything is created, the CPUID the source's vCPUs had (carried in the blob)
    /// is checked against `host`, what a vCPU gets on this host ([`host_cpu_profile`]):
    /// [`CpuProfile::check_runs_on`] names every feature the guest had that this host
    /// cannot give.
    ///
    /// # Errors
    ///
    /// A blob this VMM cannot use, a guest CPU this host cannot run, RAM not matching the
    /// blob, KVM failures.
    pub fn incoming(
        regions: Vec<(u64, u64, u64, OwnedFd)>,
        blob: &[u8],
        opts: RunOptions,
        host: &CpuProfile,
    ) -> Result<(Self, DeviceState)> {
        let state = VmState::decode(blob).context("decoding the state blob")?;
        let guest_cpu = CpuProfile::from_cpuid(
            &state
                .vcpus
                .first()
                .context("the state blob has no vCPUs")?
                .cpuid,
        );
        guest_cpu
            .check_runs_on(host)
            .context("the guest's CPU cannot run on this host")?;
        let dev = DeviceState::decode(&state.device).context("decoding the device state")?;
        let cfg = dev.cfg;
        cfg.layout()?;
        let got: Vec<(u64, u64)> = regions.iter().map(|r| (r.0, r.1)).collect();
        ensure!(
            got == cfg.region_layout(),
            "migrated RAM layout {got:x?} is not the guest's {:x?}",
            cfg.region_layout()
        );
        ensure!(
            state.vcpus.len() == cfg.vcpus as usize,
            "state has {} vCPUs, config {}",
            state.vcpus.len(),
            cfg.vcpus
        );
        let ram = GuestRam::from_memfds(regions).context("mapping the migrated memfds")?;
        let opts = RunOptions {
            rate: dev.rate,
            irqchip: !state.irqchip.is_empty(),
            ..opts
        };
        let mut m = Self::create(cfg, opts, ram, opts.irqchip)?;
        m.profile = guest_cpu;
        let vcpus: Vec<&VcpuFd> = m.pending.iter().collect();
        let report = state
            .restore(&m.vm, &vcpus)
            .context("restoring vCPU and VM state")?;
        for (v, r) in report.rejected_msrs.iter().enumerate() {
            if !r.is_empty() {
                tracing::warn!(vcpu = v, msrs = ?r, "MSRs rejected on restore");
            }
        }
        Ok((m, dev))
    }

    /// Guest RAM.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// Guest RAM, shared (for readers on other threads, e.g. the status file).
    pub fn ram_shared(&self) -> Arc<GuestRam> {
        Arc::clone(&self.ram)
    }

    /// The CPU profile the vCPUs have: the CPUID KVM reports for vCPU 0 after it was
    /// given the host's supported CPUID (see [`host_cpu_profile`]), or for a migrated VM
    /// the CPUID carried in its state.
    pub fn cpu_profile(&self) -> &CpuProfile {
        &self.profile
    }

    /// Starts a thread per created vCPU.
    ///
    /// # Errors
    ///
    /// Thread spawn failures.
    pub fn start(&mut self) -> Result<()> {
        for (i, vcpu) in std::mem::take(&mut self.pending).into_iter().enumerate() {
            let control = self.control.clone();
            let tracker = Arc::clone(&self.tracker);
            let vm = Arc::clone(&self.vm);
            let failure = Arc::clone(&self.failure);
            let outs = Arc::clone(&self.outs);
            let rate = self.opts.rate;
            let burst = self.cfg.burst;
            let h = std::thread::Builder::new()
                .name(format!("vcpu{i}"))
                .spawn(move || {
                    if let Err(e) = vcpu_loop(i, vcpu, &control, &tracker, &vm, &outs, rate, burst)
                    {
                        let msg = format!("vCPU {i} failed: {e:#}");
                        tracing::error!("{msg}");
                        let mut f = failure
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner);
                        f.get_or_insert(msg);
                    }
                })
                .context("spawning a vCPU thread")?;
            self.threads.push(h);
        }
        Ok(())
    }

    /// The first vCPU failure, if any.
    pub fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Number of `out` exits per vCPU.
    pub fn outs(&self) -> Vec<u64> {
        self.outs
            .iter()
            .map(|o| o.load(Ordering::Relaxed))
            .collect()
    }

    /// The guest's counters (exact while paused).
    ///
    /// # Errors
    ///
    /// Control block outside RAM.
    pub fn counters(&self) -> Result<Vec<Counters>> {
        guest::counters(&self.ram, self.cfg.vcpus)
    }

    /// Pauses every vCPU.
    ///
    /// # Errors
    ///
    /// A vCPU that does not park within [`PAUSE_TIMEOUT`].
    pub fn pause(&self) -> Result<PauseReport> {
        if let Some(f) = self.failure() {
            bail!("cannot pause: {f}");
        }
        Ok(self.control.pause(PAUSE_TIMEOUT)?)
    }

    /// Resumes the vCPUs.
    pub fn resume(&self) {
        self.control.resume();
    }

    /// Switches dirty logging on.
    ///
    /// # Errors
    ///
    /// KVM refusing.
    pub fn start_dirty_log(&self) -> Result<()> {
        Ok(self.tracker.start(&self.vm)?)
    }

    /// Switches dirty logging off.
    ///
    /// # Errors
    ///
    /// KVM refusing.
    pub fn stop_dirty_log(&self) -> Result<()> {
        Ok(self.tracker.stop(&self.vm)?)
    }

    /// Gets and clears the dirty log.
    ///
    /// # Errors
    ///
    /// KVM failures.
    pub fn take_dirty(&self) -> Result<DirtyLog> {
        Ok(self.tracker.get_and_clear(&self.vm)?)
    }

    /// Saves the whole state (vCPUs must be paused) with the device state.
    ///
    /// # Errors
    ///
    /// Not paused; KVM failures.
    pub fn save_state(&self) -> Result<Vec<u8>> {
        let dev = DeviceState {
            cfg: self.cfg,
            rate: self.opts.rate,
            counters: self.counters()?,
        };
        let state = self
            .control
            .with_vcpus(|v| VmState::save(&self.kvm, &self.vm, v, dev.encode()))??;
        Ok(state.encode())
    }

    /// Stops every vCPU thread for good (idempotent).
    ///
    /// # Errors
    ///
    /// A vCPU thread that does not leave within a second.
    pub fn stop(&mut self) -> Result<()> {
        if self.threads.is_empty() {
            return Ok(());
        }
        self.control.stop(Duration::from_secs(1))?;
        for t in self.threads.drain(..) {
            t.join().map_err(|_| anyhow!("a vCPU thread panicked"))?;
        }
        Ok(())
    }
}

/// What KVM reports a vCPU has after `KVM_SET_CPUID2` (`KVM_GET_CPUID2`).
fn effective_profile(vcpu: &VcpuFd) -> Result<CpuProfile> {
    let cpuid = vcpu
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .context("KVM_GET_CPUID2")?;
    Ok(CpuProfile::from_cpuid(cpuid.as_slice()))
}

/// The CPU a guest gets on this host: a throwaway VM's vCPU is given the supported CPUID
/// (as [`Machine::boot`] does) and its CPUID read back.
///
/// Not `KVM_GET_SUPPORTED_CPUID` itself: on the project's PVM hosts that lists a minimal
/// set (leaf 1 ECX `0x81202000`), while a vCPU given exactly that set reads back the
/// host's real features (leaf 1 ECX `0xf7f83203`: SSE3 ... AVX, AVX-512 in leaf 7).
/// A saved vCPU state carries the read-back CPUID, so the check compares like with like.
///
/// # Errors
///
/// KVM failures.
pub fn host_cpu_profile() -> Result<CpuProfile> {
    let kvm = Kvm::new().context("opening /dev/kvm")?;
    let vm = kvm.create_vm().context("KVM_CREATE_VM")?;
    let vcpu = vm.create_vcpu(0).context("KVM_CREATE_VCPU")?;
    cpl3::set_supported_cpuid(&kvm, &vcpu).context("KVM_SET_CPUID2")?;
    effective_profile(&vcpu)
}

impl Drop for Machine {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::error!("stopping vCPUs: {e:#}");
        }
    }
}

enum Event {
    Interrupted,
    Progress,
    RingFull,
    Other(String),
}

#[allow(clippy::too_many_arguments)]
fn vcpu_loop(
    i: usize,
    mut vcpu: VcpuFd,
    control: &VcpuControl,
    tracker: &DirtyTracker,
    vm: &VmFd,
    outs: &[AtomicU64],
    rate: u64,
    burst: u64,
) -> Result<()> {
    let mut th = control.attach(i, &mut vcpu)?;
    // Pacing: pages since `base` must not run ahead of `rate` pages/s. Reset after a pause
    // so the guest does not catch up in a burst.
    let mut base = Instant::now();
    let mut pages: u64 = 0;
    while th.checkpoint() == RunState::Run {
        let ev = match th.run() {
            Ok(None) => Event::Interrupted,
            Ok(Some(VcpuExit::IoOut(PROGRESS_PORT, _))) => Event::Progress,
            Ok(Some(VcpuExit::Unsupported(31))) => Event::RingFull,
            Ok(Some(other)) => Event::Other(format!("{other:?}")),
            Err(e) => return Err(e).context("KVM_RUN"),
        };
        match ev {
            Event::Interrupted => {
                base = Instant::now();
                pages = 0;
            }
            Event::Progress => {
                if let Some(o) = outs.get(i) {
                    o.fetch_add(1, Ordering::Relaxed);
                }
                if rate > 0 {
                    pages += burst;
                    let due = base + Duration::from_secs_f64(pages as f64 / rate as f64);
                    let now = Instant::now();
                    if due > now {
                        th.pace(due - now);
                    } else if now - due > Duration::from_secs(1) {
                        // Far behind (the guest cannot keep up): do not accumulate debt.
                        base = now;
                        pages = 0;
                    }
                }
            }
            Event::RingFull => tracker.handle_ring_full(vm)?,
            Event::Other(e) => bail!("unexpected exit {e}"),
        }
    }
    Ok(())
}
