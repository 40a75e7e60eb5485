//! Migration integration: this VMM as a source ([`MigratableVm`]) and as a destination
//! ([`IncomingVm`]) of kvm-glue's sidecar protocol, and [`migrate_local`]: the engine's
//! own sessions driving both sides in one process, without a sidecar (a self-test of the
//! VMM side, and a third driver of the same sessions the sidecar and the simulator run).

use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use ferry_cpl3_guest::GuestRam;
use ferry_engine::bitmap::DirtyBitmap;
use ferry_engine::digest::MemoryDigest;
use ferry_engine::precopy::ConvergencePolicy;
use ferry_engine::session::{
    DestCommand, DestEvent, DestPhase, DestSession, Failure, FailureKind, SourceCommand,
    SourceConfig, SourceEvent, SourceOutcome, SourceSession, TransportKind, VerifyMode,
};
use ferry_engine::transport::{RoundStats, Transport, TransportError, Window, WindowOutcome};
use ferry_kvm_glue::cpu::CpuProfile;
use ferry_kvm_glue::endpoint::{IncomingVm, MigratableVm, VmError};
use ferry_proto::common::RegionInfo;

use crate::guest::{self, Counters};
use crate::machine::{host_cpu_profile, Machine, RunOptions};
use crate::status::{DirtyLogCost, StatusFile};

/// The source side: a running machine the sidecar migrates away.
pub struct SourceVm {
    /// The machine.
    pub machine: Machine,
    /// Counters read at the last pause (for the operator).
    pub paused_counters: Option<Vec<Counters>>,
    /// Whether the VM was stopped for good.
    pub stopped: bool,
    /// Where the state is shown.
    pub status: StatusFile,
}

impl SourceVm {
    /// Wraps a started machine; shows its counters in `status`.
    pub fn new(machine: Machine, status: StatusFile) -> Self {
        status.watch(machine.ram_shared(), machine.cfg.vcpus);
        Self {
            machine,
            paused_counters: None,
            stopped: false,
            status,
        }
    }
}

fn boxed(e: anyhow::Error) -> VmError {
    format!("{e:#}").into()
}

fn writes_of(c: &[Counters]) -> Vec<u64> {
    c.iter().map(|c| c.writes).collect()
}

impl MigratableVm for SourceVm {
    fn start_dirty_log(&mut self) -> Result<(), VmError> {
        self.status.clear_dirty_log();
        self.machine.start_dirty_log().map_err(boxed)
    }

    fn take_dirty(&mut self, final_round: bool) -> Result<Vec<Vec<u64>>, VmError> {
        let log = self.machine.take_dirty().map_err(boxed)?;
        tracing::info!(
            final_round,
            pages = log.stats.dirty_pages,
            get_us = log.stats.get.as_micros() as u64,
            clear_us = log.stats.clear.as_micros() as u64,
            clear_calls = log.stats.clear_calls,
            "dirty log"
        );
        self.status.dirty_log(DirtyLogCost {
            final_round,
            pages: log.stats.dirty_pages,
            get_us: log.stats.get.as_micros() as u64,
            clear_us: log.stats.clear.as_micros() as u64,
        });
        Ok(log.slots.into_iter().map(|s| s.bitmap).collect())
    }

    fn pause(&mut self) -> Result<Duration, VmError> {
        let r = self.machine.pause().map_err(boxed)?;
        let c = self.machine.counters().map_err(boxed)?;
        self.status.set(
            "paused",
            format!("paused for migration at counters {:?}", writes_of(&c)),
        );
        self.paused_counters = Some(c);
        Ok(r.elapsed)
    }

    fn save_state(&mut self) -> Result<Vec<u8>, VmError> {
        self.machine.save_state().map_err(boxed)
    }

    fn resume(&mut self) -> Result<(), VmError> {
        self.machine.stop_dirty_log().map_err(boxed)?;
        self.machine.resume();
        let detail = match self.paused_counters.take() {
            Some(c) => format!(
                "resumed after a failed migration (paused at counters {:?})",
                writes_of(&c)
            ),
            None => "running on after a failed migration".to_owned(),
        };
        self.status.set("running", detail);
        Ok(())
    }

    fn fenced(&mut self, fence: &ferry_proto::vmm::Fence, lost: bool) {
        let what = if lost {
            "the sidecar link was lost after the commit fence: paused until a sidecar says whether the VM moved"
        } else {
            "a commit decision may be recorded: paused, and stays paused if the sidecar is lost"
        };
        self.status.set(
            "paused",
            format!("{what} (session {}, to {})", fence.session, fence.to),
        );
    }

    fn stop(&mut self) -> Result<(), VmError> {
        self.stopped = true;
        let r = self.machine.stop().map_err(boxed);
        self.status.unwatch();
        self.status.set(
            "migrated",
            format!(
                "the destination runs the VM; stopped here at counters {:?}",
                writes_of(self.paused_counters.as_deref().unwrap_or_default())
            ),
        );
        r
    }
}

/// The marker [`DestVm`]'s start line begins with when the guest demonstrably continued
/// from the source's paused counters; the sidecar turns it into the summary's
/// `guest_continued`.
pub const CONTINUED_MARKER: &str = "guest_continued=true; ";

/// When the destination checks the incoming guest's record (see [`crate::guest`]).
///
/// Whatever the choice, loading checks the control blocks, the generation sums and that
/// the counters equal the source's at pause ([`guest::check_counters`], a 2 MiB read per
/// GiB); the choice is about the data pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum RecordCheck {
    /// Every data page before the VM may run ([`guest::verify`]): inside the downtime
    /// (95-230 ms per GiB here).
    #[default]
    AtLoad,
    /// Every data page once the guest runs again ([`guest::verify_running`], sound
    /// without a snapshot; pages the guest rewrites first are skipped and counted). The
    /// outcome goes to the status file's `record_check` and the log, after `Running`.
    AfterStart,
    /// No data page is checked by the VMM (the sidecars' digests still are).
    Off,
}

/// The destination side: loads, verifies, starts.
pub struct DestVm {
    opts: RunOptions,
    /// The loaded (then running) machine.
    pub machine: Option<Machine>,
    /// Counters at the source's pause, from the device state.
    pub expected: Vec<Counters>,
    /// What verification found at load.
    pub report: Option<guest::VerifyReport>,
    /// How long building the VM and checking the record took at load.
    load_times: (Duration, Duration),
    /// Where the state is shown.
    pub status: StatusFile,
    /// Refuse every incoming VM (fault injection: the source must resume its VM).
    pub refuse_load: bool,
    /// Fail `Start` this many times (fault injection: a destination that cannot run the
    /// committed VM), leaving the VM loaded and not running.
    pub refuse_start: u32,
    /// Pretend this host's CPU vendor is this (fault injection for the CPU check).
    pub host_vendor: Option<String>,
    /// When the data pages of the guest's record are checked.
    pub check: RecordCheck,
    host_cpu: Option<CpuProfile>,
}

impl DestVm {
    /// A destination that will run incoming VMs with `opts` (the pacing rate comes from
    /// the source's device state).
    pub fn new(opts: RunOptions, status: StatusFile) -> Self {
        Self {
            opts,
            machine: None,
            expected: Vec::new(),
            report: None,
            load_times: (Duration::ZERO, Duration::ZERO),
            status,
            refuse_load: false,
            refuse_start: 0,
            host_vendor: None,
            check: RecordCheck::AtLoad,
            host_cpu: None,
        }
    }

    /// Measures this host's CPU profile now (a throwaway VM), so loading an incoming VM
    /// does not pay for it inside the downtime window.
    ///
    /// # Errors
    ///
    /// KVM failures.
    pub fn prepare(&mut self) -> Result<()> {
        self.host_cpu().map(|_| ())
    }

    /// This host's CPU profile (measured once), with the vendor fault injection applied.
    fn host_cpu(&mut self) -> Result<CpuProfile> {
        if self.host_cpu.is_none() {
            self.host_cpu = Some(host_cpu_profile()?);
        }
        let mut host = self.host_cpu.clone().context("measured above")?;
        if let Some(v) = &self.host_vendor {
            let mut vendor = [b' '; 12];
            for (d, s) in vendor.iter_mut().zip(v.bytes()) {
                *d = s;
            }
            host.vendor = vendor;
        }
        Ok(host)
    }

    /// Loads without writing guest RAM (the sidecar hashes it after `Load`): checks the
    /// CPU, rebuilds the VM, restores the vCPUs, checks the guest's record (its data
    /// pages too with [`RecordCheck::AtLoad`]).
    fn load_inner(&mut self, regions: Vec<(RegionInfo, OwnedFd)>, blob: &[u8]) -> Result<()> {
        ensure!(
            !self.refuse_load,
            "this VMM was told to refuse incoming state (--refuse-load)"
        );
        let t = Instant::now();
        let regions = regions
            .into_iter()
            .map(|(r, fd)| (r.gpa, r.size, r.offset, fd))
            .collect();
        let host = self.host_cpu()?;
        let (m, dev) = Machine::incoming(regions, blob, self.opts, &host)?;
        let t_built = t.elapsed();
        // The guest's record in the migrated RAM must be intact (data pages only at load
        // if asked: reading them all costs ~100-230 ms per GiB inside the downtime) ...
        let report = match self.check {
            RecordCheck::AtLoad => guest::verify(m.ram(), &m.cfg),
            RecordCheck::AfterStart | RecordCheck::Off => guest::check_counters(m.ram(), &m.cfg),
        }
        .context("verifying the migrated guest's record")?;
        // ... and exactly at the point where the source paused.
        ensure!(
            report.counters == dev.counters,
            "guest counters {:?} differ from the source's at pause {:?}",
            report.counters,
            dev.counters
        );
        self.load_times = (t_built, t.elapsed() - t_built);
        let what = if self.check == RecordCheck::AtLoad {
            "verified"
        } else {
            "checked the generation sums of"
        };
        self.status.set(
            "loaded",
            format!(
                "{what} {} data pages ({} written) at counters {:?}; not running until Commit",
                report.pages,
                report.written_pages,
                writes_of(&report.counters)
            ),
        );
        self.status.watch(m.ram_shared(), m.cfg.vcpus);
        self.expected = dev.counters;
        self.report = Some(report);
        self.machine = Some(m);
        Ok(())
    }

    fn start_inner(&mut self) -> Result<String> {
        let m = self.machine.as_mut().context("nothing loaded")?;
        m.start()?;
        // Confirm it runs: every vCPU's write counter moves past the migrated value (the
        // guest bumps `writes` once per page, before any pacing pause, so this takes
        // microseconds at any rate).
        let t0 = Instant::now();
        loop {
            let now = m.counters()?;
            if now
                .iter()
                .zip(&self.expected)
                .all(|(n, e)| n.writes > e.writes)
            {
                let (pages, written) = self
                    .report
                    .as_ref()
                    .map_or((0, 0), |r| (r.pages, r.written_pages));
                let record = match self.check {
                    RecordCheck::AtLoad => format!(
                        "verified {pages} data pages ({written} written, every stamp at its generation) at load"
                    ),
                    RecordCheck::AfterStart => format!(
                        "checked counters and generation sums of {pages} data pages ({written} written) at load, \
                         data pages checked after start (status record_check)"
                    ),
                    RecordCheck::Off => format!(
                        "checked counters and generation sums of {pages} data pages ({written} written) at load, \
                         data pages not checked (--check-record off)"
                    ),
                };
                let line = format!(
                    "{CONTINUED_MARKER}{record}; counters continued from the paused {:?} to {:?} within {:?}; load: VM built in {:?}, record checked in {:?}",
                    writes_of(&self.expected),
                    writes_of(&now),
                    t0.elapsed(),
                    self.load_times.0,
                    self.load_times.1,
                );
                self.status.set("running", line.clone());
                if self.check == RecordCheck::AfterStart {
                    spawn_running_check(&self.status, m);
                }
                return Ok(line);
            }
            if let Some(f) = m.failure() {
                anyhow::bail!("guest failed after start: {f}");
            }
            ensure!(
                t0.elapsed() < Duration::from_secs(10),
                "guest does not make progress after start: counters {:?}, paused at {:?}",
                writes_of(&now),
                writes_of(&self.expected)
            );
            std::thread::sleep(Duration::from_micros(100));
        }
    }
}

/// Checks the data pages of the running guest on a thread of its own and reports the
/// outcome in the status file's `record_check` (and the log).
fn spawn_running_check(status: &StatusFile, m: &Machine) {
    let (ram, cfg, report) = (m.ram_shared(), m.cfg, status.clone());
    status.record_check("after-start: running");
    let spawned = std::thread::Builder::new()
        .name("record-check".into())
        .spawn(move || {
            let t = Instant::now();
            let line = match guest::verify_running(&ram, &cfg) {
                Ok(r) => format!(
                    "after-start: ok: {} data pages at their generation, {} skipped as the guest was writing them, in {:?}",
                    r.checked,
                    r.rewritten,
                    t.elapsed()
                ),
                Err(e) => format!("after-start: FAILED: {e:#}"),
            };
            if line.contains("FAILED") {
                tracing::error!("record check {line}");
            } else {
                tracing::info!("record check {line}");
            }
            report.record_check(line);
        });
    if let Err(e) = spawned {
        status.record_check(format!("after-start: FAILED: no thread: {e}"));
    }
}

impl IncomingVm for DestVm {
    fn check_compat(&mut self, cpu_profile: &[u8]) -> Result<(), VmError> {
        let guest = ferry_kvm_glue::cpu::CpuProfile::decode(cpu_profile)
            .map_err(|e| format!("the source's CPU profile does not decode: {e}"))?;
        let host = self.host_cpu().map_err(|e| format!("{e:#}"))?;
        guest
            .check_runs_on(&host)
            .map_err(|e| format!("the guest's CPU cannot run on this host: {e}"))?;
        Ok(())
    }

    fn load(
        &mut self,
        vm_id: &str,
        regions: Vec<(RegionInfo, OwnedFd)>,
        blob: Vec<u8>,
    ) -> Result<(), VmError> {
        tracing::info!(
            vm_id,
            regions = regions.len(),
            blob = blob.len(),
            "loading incoming VM"
        );
        self.load_inner(regions, &blob).map_err(|e| {
            tracing::warn!("refusing the incoming VM: {e:#}");
            boxed(e)
        })
    }

    fn start(&mut self) -> Result<String, VmError> {
        if self.refuse_start > 0 {
            self.refuse_start -= 1;
            let e = anyhow::anyhow!("this VMM was told to fail Start (--refuse-start)");
            self.status
                .set("loaded", format!("{e:#}; the VM is loaded, not running"));
            return Err(boxed(e));
        }
        self.start_inner().map_err(|e| {
            // A failed start leaves the VM not running (the sidecar reports the failure
            // and keeps both copies for the operator).
            if let Some(m) = self.machine.as_ref() {
                if let Err(p) = m.pause() {
                    tracing::error!("pausing the VM after a failed start: {p:#}");
                }
            }
            self.status
                .set("failed", format!("{e:#}; the VM is paused"));
            boxed(e)
        })
    }

    fn discard(&mut self) {
        self.status.forget();
        self.machine = None;
        self.report = None;
        self.status
            .set("waiting", "discarded an incoming VM; waiting for another");
    }
}

/// Copies every page whose bit is set from `src` to `dst` (same layout). `None` copies
/// every non-zero page (round 1). Returns pages copied.
///
/// # Errors
///
/// Layouts that differ.
pub fn copy_pages(src: &GuestRam, dst: &GuestRam, bitmaps: Option<&[Vec<u64>]>) -> Result<u64> {
    let mut buf = vec![0u8; guest::PAGE as usize];
    let mut n = 0;
    for (i, r) in src.regions().iter().enumerate() {
        let pages = r.size / guest::PAGE;
        for p in 0..pages {
            let take = match bitmaps {
                Some(b) => b
                    .get(i)
                    .and_then(|w| w.get((p / 64) as usize))
                    .is_some_and(|w| w & (1 << (p % 64)) != 0),
                None => true,
            };
            if !take {
                continue;
            }
            let gpa = r.gpa + p * guest::PAGE;
            src.read(gpa, &mut buf).context("source page")?;
            if bitmaps.is_none() && buf.iter().all(|&b| b == 0) {
                continue;
            }
            dst.write(gpa, &buf).context("destination page")?;
            n += 1;
        }
    }
    Ok(n)
}

/// Summary of a local migration.
#[derive(Debug)]
pub struct LocalReport {
    /// Pages copied per round (round 1 first, the final round last).
    pub rounds: Vec<u64>,
    /// Time the vCPUs took to park.
    pub pause: Duration,
    /// From pause to the destination running.
    pub downtime: Duration,
    /// The destination's confirmation line.
    pub detail: String,
}

/// The in-process transport: copies a window's pages from one RAM to the other.
struct LocalCopy<'a> {
    src: &'a GuestRam,
    dst: &'a GuestRam,
}

impl Transport for LocalCopy<'_> {
    fn kind(&self) -> TransportKind {
        TransportKind::Tcp
    }

    fn channels(&self) -> usize {
        1
    }

    fn send_window(
        &mut self,
        w: &Window,
        progress: &(dyn Fn(u64) + Sync),
    ) -> std::result::Result<WindowOutcome, TransportError> {
        let mut buf = vec![0u8; guest::PAGE as usize];
        let mut stats = RoundStats::default();
        for r in w.plan.ranges() {
            let region = self
                .src
                .regions()
                .get(r.region as usize)
                .ok_or_else(|| TransportError::Protocol(format!("no region {}", r.region)))?;
            for p in r.first..r.end() {
                let gpa = region.gpa + p * guest::PAGE;
                let copied = self
                    .src
                    .read(gpa, &mut buf)
                    .and_then(|()| self.dst.write(gpa, &buf));
                if copied.is_none() {
                    return Err(TransportError::Protocol(format!(
                        "page {gpa:#x} is outside the RAM"
                    )));
                }
                stats.pages += 1;
                stats.bytes += guest::PAGE;
            }
        }
        progress(stats.bytes);
        Ok(WindowOutcome::Done(stats))
    }
}

fn ram_digest(ram: &GuestRam) -> MemoryDigest {
    MemoryDigest {
        regions: ram
            .regions()
            .iter()
            .map(|r| {
                let mut bytes = vec![0u8; r.size as usize];
                let _ = ram.read(r.gpa, &mut bytes);
                ferry_engine::digest::region_digest(&bytes)
            })
            .collect(),
    }
}

/// Migrates `src` into a new machine in this process, driven by the engine's own
/// sessions (`ferry_engine::session`), as a sidecar pair would: logging on, rounds in
/// windows until the dirty set fits `policy`, pause, final round, state, load and verify
/// (strict), fence, commit, start. Returns the destination and a report; the source is
/// stopped.
///
/// # Errors
///
/// The migration did not commit (the source runs again if it was paused).
pub fn migrate_local(
    src: &mut SourceVm,
    policy: ConvergencePolicy,
) -> Result<(DestVm, LocalReport)> {
    let regions = src.machine.cfg.region_layout();
    let dst_ram = GuestRam::new_memfd(&regions).context("destination memfds")?;
    let npages: Vec<u64> = src
        .machine
        .ram()
        .regions()
        .iter()
        .map(|r| r.size / guest::PAGE)
        .collect();
    let mut cfg = SourceConfig::new(npages);
    cfg.policy = policy;
    cfg.verify = VerifyMode::Strict;
    let mut session = SourceSession::new(cfg);
    let mut dest = DestSession::new();
    let mut dst = DestVm::new(src.machine.opts, StatusFile::new(None));
    let t0 = Instant::now();
    let mut pause = Duration::ZERO;
    let mut paused_at = None;
    let mut detail = String::new();
    let err = |e: VmError| Failure::new(FailureKind::VmmRefused, e.to_string());
    while let Some(cmd) = session.poll() {
        use SourceCommand as C;
        use SourceEvent as E;
        let ev = match cmd {
            C::Negotiate => Ok(E::Negotiated(vec![(TransportKind::Tcp, 1)])),
            C::StartDirtyLog => src
                .start_dirty_log()
                .map(|()| E::DirtyLogStarted(Vec::new()))
                .map_err(err),
            C::TakeDirty { final_round, delay } => {
                std::thread::sleep(delay);
                src.take_dirty(final_round).map_err(err).and_then(|maps| {
                    maps.into_iter()
                        .zip(src.machine.ram().regions())
                        .map(|(w, r)| DirtyBitmap::from_words(w, r.size / guest::PAGE))
                        .collect::<std::result::Result<Vec<_>, _>>()
                        .map(E::Dirty)
                        .map_err(|e| Failure::new(FailureKind::VmmRefused, e.to_string()))
                })
            }
            C::SendWindow(w) => LocalCopy {
                src: src.machine.ram(),
                dst: &dst_ram,
            }
            .send_window(&w, &|_| {})
            .map(E::WindowSent)
            .map_err(|e| Failure::new(FailureKind::Transport, e.to_string())),
            C::Pause => {
                paused_at = Some(Instant::now());
                src.pause()
                    .map(|d| {
                        pause = d;
                        E::Paused(d)
                    })
                    .map_err(err)
            }
            C::SaveState => src.save_state().map(E::StateSaved).map_err(err),
            C::SendState(blob) => {
                dest.handle(DestEvent::StateArrived(blob));
                run_dest(&mut dest, &mut dst, &dst_ram);
                Ok(E::StateSent)
            }
            C::HashSource => Ok(E::SourceHashed(ram_digest(src.machine.ram()))),
            C::AwaitReady => match dest.phase() {
                DestPhase::Loaded => Ok(E::PeerReady(ram_digest(&dst_ram))),
                other => Err(Failure::new(
                    FailureKind::PeerRefused,
                    format!("destination is {}", other.name()),
                )),
            },
            C::Fence | C::Record(_) => Ok(if matches!(cmd, C::Fence) {
                E::Fenced
            } else {
                E::Recorded
            }),
            C::SendCommit | C::ReplayCommit => {
                dest.handle(DestEvent::Commit);
                run_dest(&mut dest, &mut dst, &dst_ram);
                match dest.phase() {
                    DestPhase::Running(d) => {
                        detail = d.clone();
                        Ok(E::PeerRunning(d.clone()))
                    }
                    DestPhase::StartFailed { reason, .. } => Ok(E::PeerStartFailed(reason.clone())),
                    other => Err(Failure::new(
                        FailureKind::PeerRefused,
                        format!("destination is {}", other.name()),
                    )),
                }
            }
            C::AskDiscard => Ok(E::PeerDiscarded),
            C::Sleep(d) => {
                std::thread::sleep(d);
                Ok(E::Slept)
            }
            // The destination is in this process: told at once, and it discards at once.
            C::AbortPeer { reason, .. } => {
                dest.handle(DestEvent::Abort(reason));
                run_dest(&mut dest, &mut dst, &dst_ram);
                Ok(E::PeerTold)
            }
            C::ReleasePeer => {
                dest.handle(DestEvent::Abort("released".into()));
                run_dest(&mut dest, &mut dst, &dst_ram);
                Ok(E::PeerTold)
            }
            C::Resume => src.resume().map(|()| E::Resumed).map_err(err),
            C::Stop => src.stop().map(|()| E::Stopped).map_err(err),
        };
        session.handle(t0.elapsed(), ev.unwrap_or_else(E::Failed));
    }
    match session.outcome() {
        Some(SourceOutcome::Committed) => Ok((
            dst,
            LocalReport {
                rounds: session
                    .report()
                    .rounds
                    .iter()
                    .map(|r| r.stats.pages)
                    .collect(),
                pause,
                downtime: paused_at.map(|t| t.elapsed()).unwrap_or_default(),
                detail,
            },
        )),
        other => anyhow::bail!(
            "the local migration ended {:?}: {}",
            other,
            session.report().error.clone().unwrap_or_default()
        ),
    }
}

/// Carries out the in-process destination's commands against `dst`.
fn run_dest(s: &mut DestSession, dst: &mut DestVm, ram: &GuestRam) {
    while let Some(cmd) = s.poll() {
        let ev = match cmd {
            DestCommand::Load(blob) => {
                let fds = ram
                    .regions()
                    .iter()
                    .map(|r| {
                        r.memfd.try_clone().map(|fd| {
                            (
                                RegionInfo {
                                    gpa: r.gpa,
                                    size: r.size,
                                    offset: r.offset,
                                },
                                fd,
                            )
                        })
                    })
                    .collect::<std::io::Result<Vec<_>>>();
                match fds {
                    Ok(fds) => match dst.load("local", fds, blob) {
                        Ok(()) => DestEvent::Loaded,
                        Err(e) => DestEvent::LoadFailed(e.to_string()),
                    },
                    Err(e) => DestEvent::LoadFailed(e.to_string()),
                }
            }
            DestCommand::Start => match dst.start() {
                Ok(d) => DestEvent::Started(d),
                Err(e) => DestEvent::StartFailed(e.to_string()),
            },
            DestCommand::Discard => {
                dst.discard();
                DestEvent::Discarded
            }
            DestCommand::Record(_) => DestEvent::Recorded,
            DestCommand::Hold => continue,
            DestCommand::SendReady
            | DestCommand::SendRunning(_)
            | DestCommand::SendStartFailed(_)
            | DestCommand::SendDiscarded
            | DestCommand::Refuse(_) => DestEvent::Told,
        };
        s.handle(ev);
    }
}
