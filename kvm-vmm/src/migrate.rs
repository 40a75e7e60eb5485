//! Migration integration: this VMM as a source ([`MigratableVm`]) and as a destination
//! ([`IncomingVm`]) of kvm-glue's sidecar protocol, and [`migrate_local`], the same calls
//! driven in one process without a sidecar (a self-test of the VMM side).

use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use ferry_kvm_glue::cpl3::GuestRam;
use ferry_kvm_glue::endpoint::{IncomingVm, MigratableVm, VmError};
use ferry_proto::msg::RegionInfo;

use crate::guest::{self, Counters};
use crate::machine::{Machine, RunOptions};

/// The source side: a running machine the sidecar migrates away.
pub struct SourceVm {
    /// The machine.
    pub machine: Machine,
    /// Counters read at the last pause (for the operator).
    pub paused_counters: Option<Vec<Counters>>,
    /// Whether the VM was stopped for good.
    pub stopped: bool,
}

impl SourceVm {
    /// Wraps a started machine.
    pub fn new(machine: Machine) -> Self {
        Self {
            machine,
            paused_counters: None,
            stopped: false,
        }
    }
}

fn boxed(e: anyhow::Error) -> VmError {
    format!("{e:#}").into()
}

impl MigratableVm for SourceVm {
    fn start_dirty_log(&mut self) -> Result<(), VmError> {
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
        Ok(log.slots.into_iter().map(|s| s.bitmap).collect())
    }

    fn pause(&mut self) -> Result<Duration, VmError> {
        let r = self.machine.pause().map_err(boxed)?;
        self.paused_counters = Some(self.machine.counters().map_err(boxed)?);
        Ok(r.elapsed)
    }

    fn save_state(&mut self) -> Result<Vec<u8>, VmError> {
        self.machine.save_state().map_err(boxed)
    }

    fn resume(&mut self) -> Result<(), VmError> {
        self.machine.stop_dirty_log().map_err(boxed)?;
        self.machine.resume();
        self.paused_counters = None;
        Ok(())
    }

    fn stop(&mut self) -> Result<(), VmError> {
        self.stopped = true;
        self.machine.stop().map_err(boxed)
    }
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
}

impl DestVm {
    /// A destination that will run incoming VMs with `opts` (the pacing rate comes from
    /// the source's device state).
    pub fn new(opts: RunOptions) -> Self {
        Self {
            opts,
            machine: None,
            expected: Vec::new(),
            report: None,
        }
    }

    fn load_inner(&mut self, regions: Vec<(RegionInfo, OwnedFd)>, blob: &[u8]) -> Result<()> {
        let regions = regions
            .into_iter()
            .map(|(r, fd)| (r.gpa, r.size, r.offset, fd))
            .collect();
        let (m, dev) = Machine::incoming(regions, blob, self.opts)?;
        // The guest's record in the migrated RAM must be intact ...
        let report =
            guest::verify(m.ram(), &m.cfg).context("verifying the migrated guest's record")?;
        // ... and exactly at the point where the source paused.
        ensure!(
            report.counters == dev.counters,
            "guest counters {:?} differ from the source's at pause {:?}",
            report.counters,
            dev.counters
        );
        self.expected = dev.counters;
        self.report = Some(report);
        self.machine = Some(m);
        Ok(())
    }

    fn start_inner(&mut self) -> Result<String> {
        let m = self.machine.as_mut().context("nothing loaded")?;
        m.start()?;
        // Confirm it runs: every vCPU's write counter moves past the migrated value.
        let t0 = Instant::now();
        loop {
            let now = m.counters()?;
            if now
                .iter()
                .zip(&self.expected)
                .all(|(n, e)| n.writes > e.writes)
            {
                let r = self.report.as_ref().map_or(0, |r| r.written_pages);
                return Ok(format!(
                    "guest record verified ({r} written pages, counters at pause {:?}); running: writes {:?} after {:?}",
                    self.expected.iter().map(|c| c.writes).collect::<Vec<_>>(),
                    now.iter().map(|c| c.writes).collect::<Vec<_>>(),
                    t0.elapsed()
                ));
            }
            if let Some(f) = m.failure() {
                anyhow::bail!("guest failed after start: {f}");
            }
            ensure!(
                t0.elapsed() < Duration::from_secs(10),
                "guest does not make progress after start"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl IncomingVm for DestVm {
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
        self.load_inner(regions, &blob).map_err(boxed)
    }

    fn start(&mut self) -> Result<String, VmError> {
        self.start_inner().map_err(boxed)
    }

    fn discard(&mut self) {
        self.machine = None;
        self.report = None;
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

/// Migrates `src` into a new machine in this process through the same trait calls a
/// sidecar makes: logging on, round 1 (all non-zero pages), pre-copy rounds until fewer
/// than `converge_pages` are dirty (at most `max_rounds`), pause, final round, state,
/// load + verify, start. Returns the destination and a report; the source is stopped.
///
/// # Errors
///
/// Any failing step (the source is resumed before the error is returned if it was
/// paused and the destination did not start).
pub fn migrate_local(
    src: &mut SourceVm,
    max_rounds: u32,
    converge_pages: u64,
) -> Result<(DestVm, LocalReport)> {
    let to_anyhow = |e: VmError| anyhow::anyhow!("{e}");
    let regions = src.machine.cfg.region_layout();
    let dst_ram = GuestRam::new_memfd(&regions).context("destination memfds")?;
    src.start_dirty_log().map_err(to_anyhow)?;
    let mut rounds = vec![copy_pages(src.machine.ram(), &dst_ram, None)?];
    for _ in 0..max_rounds {
        let b = src.take_dirty(false).map_err(to_anyhow)?;
        let n = copy_pages(src.machine.ram(), &dst_ram, Some(&b))?;
        rounds.push(n);
        if n < converge_pages {
            break;
        }
    }
    let t_pause = Instant::now();
    let pause = src.pause().map_err(to_anyhow)?;
    let result = (|| -> Result<(DestVm, String)> {
        let b = src.take_dirty(true).map_err(to_anyhow)?;
        rounds.push(copy_pages(src.machine.ram(), &dst_ram, Some(&b))?);
        let blob = src.save_state().map_err(to_anyhow)?;
        let mut dst = DestVm::new(src.machine.opts);
        let fds = dst_ram
            .regions()
            .iter()
            .map(|r| {
                let fd = r.memfd.try_clone().context("dup memfd")?;
                Ok((
                    RegionInfo {
                        gpa: r.gpa,
                        size: r.size,
                        offset: r.offset,
                    },
                    fd,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        dst.load("local", fds, blob).map_err(to_anyhow)?;
        let detail = dst.start().map_err(to_anyhow)?;
        Ok((dst, detail))
    })();
    match result {
        Ok((dst, detail)) => {
            let downtime = t_pause.elapsed();
            src.stop().map_err(to_anyhow)?;
            Ok((
                dst,
                LocalReport {
                    rounds,
                    pause,
                    downtime,
                    detail,
                },
            ))
        }
        Err(e) => {
            let _ = src.resume();
            Err(e)
        }
    }
}
