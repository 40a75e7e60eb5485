//! `ferry-kvm-vmm`: run the test guest standalone, as a migration source or destination
//! behind a Ferry sidecar, or migrate it within one process.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use ferry_kvm_glue::dirty::DirtyModeRequest;
use ferry_kvm_glue::endpoint::{IncomingEndpoint, ServeEnd, SourceEndpoint};
use ferry_kvm_vmm::guest::{self, GuestConfig, Pattern};
use ferry_kvm_vmm::machine::{Machine, RunOptions};
use ferry_kvm_vmm::migrate::{migrate_local, DestVm, RecordCheck, SourceVm};
use ferry_kvm_vmm::status::StatusFile;
use ferry_proto::common::RegionInfo;

#[derive(Parser)]
#[command(
    name = "ferry-kvm-vmm",
    about = "A KVM test VMM whose CPL3 guest dirties memory verifiably"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Boot the guest, run it for a while printing progress, then pause and verify.
    Run {
        #[command(flatten)]
        guest: GuestArgs,
        /// Seconds to run.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
    },
    /// Boot the guest, register it with a sidecar and serve migration requests. The VM
    /// runs until it is migrated away (or --max-runtime-s); when the sidecar goes away
    /// it keeps running and registers again once the sidecar is back.
    Source {
        #[command(flatten)]
        guest: GuestArgs,
        /// The sidecar's VMM socket.
        #[arg(long)]
        sidecar: PathBuf,
        /// VM id to register.
        #[arg(long, default_value = "vm0")]
        vm_id: String,
        #[command(flatten)]
        process: ProcessArgs,
    },
    /// Wait for an incoming VM from a sidecar; load and verify it, run it on Commit, then
    /// register it with the sidecar so it can migrate on (or, with --verify-after-s,
    /// pause, verify again and exit).
    Dest {
        /// The sidecar's VMM socket.
        #[arg(long)]
        sidecar: PathBuf,
        /// VM id to wait for.
        #[arg(long, default_value = "vm0")]
        vm_id: String,
        /// Run this many seconds after the migration, pause, verify the guest's record
        /// again and exit.
        #[arg(long)]
        verify_after_s: Option<u64>,
        /// Refuse every incoming VM at load (fault injection: the source must resume).
        #[arg(long)]
        refuse_load: bool,
        /// Fail Start this many times (fault injection: a destination that cannot run
        /// the committed VM; the VM stays loaded, not running).
        #[arg(long, default_value_t = 0)]
        refuse_start: u32,
        /// Pretend this host's CPU vendor string is this (fault injection for the CPU
        /// compatibility check, e.g. GenuineIntel on an AMD host).
        #[arg(long)]
        pretend_cpu_vendor: Option<String>,
        /// When to check the incoming guest's data pages: at load (inside the downtime),
        /// after start (while it runs, outcome in the status file's record_check) or off.
        /// Counters and generation sums are checked at load in every case.
        #[arg(long, value_enum, default_value_t = RecordCheck::AtLoad)]
        check_record: RecordCheck,
        #[command(flatten)]
        process: ProcessArgs,
    },
    /// Migrate the guest within this process (no sidecar): a self-test of the VMM side.
    MigrateLocal {
        #[command(flatten)]
        guest: GuestArgs,
        /// Seconds to run before migrating.
        #[arg(long, default_value_t = 1)]
        warmup_seconds: u64,
        /// Pre-copy round limit.
        #[arg(long, default_value_t = 10)]
        max_rounds: u32,
        /// Downtime budget in milliseconds (pre-copy stops once the dirty set fits it).
        #[arg(long, default_value_t = 5)]
        downtime_ms: u64,
        /// Seconds to run the destination before the final verification.
        #[arg(long, default_value_t = 2)]
        run_seconds: u64,
    },
}

#[derive(Args)]
struct ProcessArgs {
    /// Keep a JSON status here (state, per-vCPU counters, detail), rewritten every 100 ms.
    #[arg(long)]
    status_file: Option<PathBuf>,
    /// Exit (status 3) after this many seconds whatever happens: bounds test and
    /// benchmark processes.
    #[arg(long, default_value_t = 900)]
    max_runtime_s: u64,
}

impl ProcessArgs {
    fn status(&self) -> Result<StatusFile> {
        let s = StatusFile::new(self.status_file.clone());
        s.spawn(Duration::from_secs(self.max_runtime_s))
            .context("starting the status thread")?;
        Ok(s)
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum DirtyArg {
    /// Manual-protect bitmap where available, else classic.
    Auto,
    /// Classic bitmap.
    Classic,
    /// Dirty ring (64 KiB per vCPU).
    Ring,
}

#[derive(Args)]
struct GuestArgs {
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 1024)]
    ram_mib: u64,
    /// RAM regions (memfds, KVM slots).
    #[arg(long, default_value_t = 1)]
    regions: u32,
    /// vCPUs.
    #[arg(long, default_value_t = 2)]
    vcpus: u32,
    /// Page pattern.
    #[arg(long, value_enum, default_value_t = Pattern::Random)]
    pattern: Pattern,
    /// Hot-set size in pages (with --pattern hot).
    #[arg(long, default_value_t = 4096)]
    hot_pages: u64,
    /// Pages per vCPU per second (0 = unpaced).
    #[arg(long, default_value_t = 20_000)]
    rate: u64,
    /// Pages per progress exit.
    #[arg(long, default_value_t = 64)]
    burst: u64,
    /// Words filled per page written (0..=510) besides the stamp.
    #[arg(long, default_value_t = 8)]
    fill_words: u64,
    /// Dirty tracking mechanism.
    #[arg(long, value_enum, default_value_t = DirtyArg::Auto)]
    dirty: DirtyArg,
    /// Run without an in-kernel irqchip.
    #[arg(long)]
    no_irqchip: bool,
    /// Before the guest starts, write a word into the last 8 bytes of every data page
    /// (words the record check never reads), so that its RAM holds data everywhere, as a
    /// booted operating system's does, instead of holes the migration may skip.
    #[arg(long)]
    ballast: bool,
}

impl GuestArgs {
    fn config(&self) -> (GuestConfig, RunOptions) {
        (
            GuestConfig {
                ram: self.ram_mib << 20,
                regions: self.regions,
                vcpus: self.vcpus,
                pattern: self.pattern,
                hot_pages: self.hot_pages,
                burst: self.burst,
                fill_words: self.fill_words,
            },
            RunOptions {
                rate: self.rate,
                dirty: match self.dirty {
                    DirtyArg::Auto => DirtyModeRequest::Auto,
                    DirtyArg::Classic => DirtyModeRequest::Classic,
                    DirtyArg::Ring => DirtyModeRequest::Ring { bytes: 64 * 1024 },
                },
                irqchip: !self.no_irqchip,
            },
        )
    }
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().cmd {
        Cmd::Run { guest, seconds } => run(&guest, seconds),
        Cmd::Source {
            guest,
            sidecar,
            vm_id,
            process,
        } => source(&guest, &sidecar, &vm_id, &process),
        Cmd::Dest {
            sidecar,
            vm_id,
            verify_after_s,
            refuse_load,
            refuse_start,
            pretend_cpu_vendor,
            check_record,
            process,
        } => {
            let status = process.status()?;
            let mut vm = DestVm::new(
                RunOptions {
                    rate: 0,
                    dirty: DirtyModeRequest::Auto,
                    irqchip: true,
                },
                status,
            );
            vm.refuse_load = refuse_load;
            vm.refuse_start = refuse_start;
            vm.host_vendor = pretend_cpu_vendor;
            vm.check = check_record;
            vm.prepare()?;
            dest(vm, &sidecar, &vm_id, verify_after_s)
        }
        Cmd::MigrateLocal {
            guest,
            warmup_seconds,
            max_rounds,
            downtime_ms,
            run_seconds,
        } => local(&guest, warmup_seconds, max_rounds, downtime_ms, run_seconds),
    }
}

/// Prints progress once a second for `seconds`.
fn progress(m: &Machine, seconds: u64) -> Result<()> {
    let start = Instant::now();
    let mut last = m.counters()?;
    for s in 1..=seconds {
        std::thread::sleep(
            (start + Duration::from_secs(s)).saturating_duration_since(Instant::now()),
        );
        if let Some(f) = m.failure() {
            bail!("{f}");
        }
        let now = m.counters()?;
        let rates: Vec<u64> = now
            .iter()
            .zip(&last)
            .map(|(n, l)| n.writes - l.writes)
            .collect();
        println!(
            "t={s}s writes={:?} pages/s={rates:?} outs={:?}",
            now.iter().map(|c| c.writes).collect::<Vec<_>>(),
            m.outs()
        );
        last = now;
    }
    Ok(())
}

fn pause_and_verify(m: &Machine, what: &str) -> Result<()> {
    let p = m.pause()?;
    let t = Instant::now();
    let r =
        guest::verify(m.ram(), &m.cfg).with_context(|| format!("{what}: verification FAILED"))?;
    println!(
        "{what}: paused in {:?}; verified {} data pages ({} written) in {:?}; writes {:?}",
        p.elapsed,
        r.pages,
        r.written_pages,
        t.elapsed(),
        r.counters.iter().map(|c| c.writes).collect::<Vec<_>>()
    );
    Ok(())
}

fn run(g: &GuestArgs, seconds: u64) -> Result<()> {
    let (cfg, opts) = g.config();
    let mut m = Machine::boot(cfg, opts)?;
    println!("booted: {cfg:?}, {opts:?}, layout {:?}", cfg.layout()?);
    m.start()?;
    progress(&m, seconds)?;
    pause_and_verify(&m, "standalone")?;
    m.stop()
}

fn source(g: &GuestArgs, sidecar: &Path, vm_id: &str, p: &ProcessArgs) -> Result<()> {
    let status = p.status()?;
    let (cfg, opts) = g.config();
    let mut m = Machine::boot(cfg, opts)?;
    if g.ballast {
        ferry_kvm_vmm::guest::ballast(m.ram(), &cfg)?;
    }
    m.start()?;
    status.set("running", format!("booted {cfg:?}"));
    println!("source: {vm_id} running ({cfg:?})");
    serve_forever(SourceVm::new(m, status), sidecar, vm_id)
}

/// Registers the VM with the sidecar and serves it until it is migrated away. When the
/// sidecar goes away the VM runs on (unless it is paused under a commit fence: then it
/// waits, paused, for the next sidecar to say what became of the migration) and is
/// registered again once the sidecar is back.
fn serve_forever(mut vm: SourceVm, sidecar: &Path, vm_id: &str) -> Result<()> {
    let profile = vm.machine.cpu_profile().encode();
    let ram = vm.machine.ram_shared();
    let regions: Vec<RegionInfo> = ram
        .regions()
        .iter()
        .map(|r| RegionInfo {
            gpa: r.gpa,
            size: r.size,
            offset: r.offset,
        })
        .collect();
    let fds: Vec<_> = ram.regions().iter().map(|r| r.memfd.as_fd()).collect();
    let mut ep = SourceEndpoint::new(sidecar, vm_id, regions, profile);
    let mut linked = true;
    loop {
        if let Some(f) = vm.machine.failure() {
            vm.status.set("failed", f.clone());
            bail!("{f}");
        }
        match ep.serve(&mut vm, &fds) {
            Ok(ServeEnd::MigratedAway) => {
                println!(
                    "source: migrated away; counters at pause {:?}",
                    vm.paused_counters.unwrap_or_default()
                );
                return Ok(());
            }
            Ok(ServeEnd::SidecarGone) => {
                tracing::warn!("the sidecar went away");
                linked = true;
            }
            Err(e) if linked => {
                tracing::warn!("sidecar link: {e:#}");
                linked = false;
            }
            Err(_) => {}
        }
        if !ep.is_paused() {
            // Whatever a broken migration left on: no dirty logging while nobody reads it.
            if let Err(e) = vm.machine.stop_dirty_log() {
                tracing::warn!("switching dirty logging off: {e:#}");
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn dest(mut vm: DestVm, sidecar: &Path, vm_id: &str, verify_after: Option<u64>) -> Result<()> {
    let status = vm.status.clone();
    status.set("waiting", format!("waiting for {vm_id}"));
    let mut ep = IncomingEndpoint::new(sidecar, vm_id);
    let mut linked = true;
    let detail = loop {
        tracing::info!(vm_id, "waiting for the incoming VM");
        match ep.receive(&mut vm) {
            Ok(detail) => break detail,
            Err(e) => {
                if linked {
                    tracing::warn!("sidecar link: {e:#}; waiting again");
                    linked = false;
                }
                if vm.machine.is_none() {
                    status.set("waiting", format!("waiting for {vm_id} (sidecar: {e:#})"));
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    };
    println!("dest: running: {detail}");
    let m = vm.machine.take().context("no machine after start")?;
    if let Some(s) = verify_after {
        progress(&m, s)?;
        return pause_and_verify(&m, "dest after migration");
    }
    // The VM runs here now; it may migrate on from here.
    serve_forever(SourceVm::new(m, status), sidecar, vm_id)
}

fn local(
    g: &GuestArgs,
    warmup: u64,
    max_rounds: u32,
    downtime_ms: u64,
    run_seconds: u64,
) -> Result<()> {
    let (cfg, opts) = g.config();
    let mut m = Machine::boot(cfg, opts)?;
    m.start()?;
    progress(&m, warmup)?;
    let mut src = SourceVm::new(m, StatusFile::new(None));
    let (dst, r) = migrate_local(
        &mut src,
        ferry_engine::precopy::ConvergencePolicy {
            downtime_budget: Duration::from_millis(downtime_ms),
            max_rounds,
            timeout: Duration::from_secs(600),
            on_limit: ferry_engine::precopy::LimitAction::ForceStopAndCopy,
        },
    )?;
    println!(
        "migrated: pages per round {:?}; pause {:?}; downtime (strict: incl. verify) {:?}",
        r.rounds, r.pause, r.downtime
    );
    println!("dest: {}", r.detail);
    let m = dst.machine.as_ref().context("no machine")?;
    progress(m, run_seconds)?;
    pause_and_verify(m, "dest after migration")
}
