//! `ferry-kvm-vmm`: run the test guest standalone, as a migration source or destination
//! behind a Ferry sidecar, or migrate it within one process.

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use ferry_kvm_glue::dirty::DirtyModeRequest;
use ferry_kvm_glue::endpoint::{ServeEnd, SidecarLink};
use ferry_kvm_vmm::guest::{self, GuestConfig, Pattern};
use ferry_kvm_vmm::machine::{Machine, RunOptions};
use ferry_kvm_vmm::migrate::{migrate_local, DestVm, SourceVm};
use ferry_proto::msg::RegionInfo;

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
    /// Boot the guest, register it with a sidecar and serve migration requests.
    Source {
        #[command(flatten)]
        guest: GuestArgs,
        /// The sidecar's VMM socket.
        #[arg(long)]
        sidecar: PathBuf,
        /// VM id to register.
        #[arg(long, default_value = "vm0")]
        vm_id: String,
    },
    /// Wait for an incoming VM from a sidecar; load, verify, run it, verify again.
    Dest {
        /// The sidecar's VMM socket.
        #[arg(long)]
        sidecar: PathBuf,
        /// VM id to wait for.
        #[arg(long, default_value = "vm0")]
        vm_id: String,
        /// Seconds to run after the migration before the final verification.
        #[arg(long, default_value_t = 2)]
        run_seconds: u64,
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
        /// Stop pre-copy once a round copies fewer pages.
        #[arg(long, default_value_t = 2048)]
        converge_pages: u64,
        /// Seconds to run the destination before the final verification.
        #[arg(long, default_value_t = 2)]
        run_seconds: u64,
    },
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
        } => source(&guest, &sidecar, &vm_id),
        Cmd::Dest {
            sidecar,
            vm_id,
            run_seconds,
        } => dest(&sidecar, &vm_id, run_seconds),
        Cmd::MigrateLocal {
            guest,
            warmup_seconds,
            max_rounds,
            converge_pages,
            run_seconds,
        } => local(
            &guest,
            warmup_seconds,
            max_rounds,
            converge_pages,
            run_seconds,
        ),
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

fn source(g: &GuestArgs, sidecar: &std::path::Path, vm_id: &str) -> Result<()> {
    let (cfg, opts) = g.config();
    let mut m = Machine::boot(cfg, opts)?;
    let mut link = SidecarLink::connect(sidecar)?;
    let regions: Vec<RegionInfo> = m
        .ram()
        .regions()
        .iter()
        .map(|r| RegionInfo {
            gpa: r.gpa,
            size: r.size,
            offset: r.offset,
        })
        .collect();
    let fds: Vec<_> = m.ram().regions().iter().map(|r| r.memfd.as_fd()).collect();
    link.register(vm_id, &regions, &fds, m.cpu_profile().encode())?;
    m.start()?;
    println!("source: {vm_id} registered and running ({cfg:?})");
    let mut vm = SourceVm::new(m);
    match link.serve(&mut vm)? {
        ServeEnd::MigratedAway => {
            println!(
                "source: migrated away; counters at pause {:?}",
                vm.paused_counters.unwrap_or_default()
            );
            Ok(())
        }
        ServeEnd::SidecarGone => {
            println!("source: sidecar left; the VM keeps running here");
            progress(&vm.machine, 1)?;
            pause_and_verify(&vm.machine, "source")
        }
    }
}

fn dest(sidecar: &std::path::Path, vm_id: &str, run_seconds: u64) -> Result<()> {
    let mut link = SidecarLink::connect(sidecar)?;
    link.await_incoming(vm_id)?;
    println!("dest: waiting for {vm_id}");
    let mut vm = DestVm::new(RunOptions {
        rate: 0,
        dirty: DirtyModeRequest::Auto,
        irqchip: true,
    });
    let detail = link.receive(&mut vm)?;
    println!("dest: running: {detail}");
    let m = vm.machine.as_ref().context("no machine after start")?;
    progress(m, run_seconds)?;
    pause_and_verify(m, "dest after migration")
}

fn local(
    g: &GuestArgs,
    warmup: u64,
    max_rounds: u32,
    converge: u64,
    run_seconds: u64,
) -> Result<()> {
    let (cfg, opts) = g.config();
    let mut m = Machine::boot(cfg, opts)?;
    m.start()?;
    progress(&m, warmup)?;
    let mut src = SourceVm::new(m);
    let (dst, r) = migrate_local(&mut src, max_rounds, converge)?;
    println!(
        "migrated: pages per round {:?}; pause {:?}; downtime (strict: incl. verify) {:?}",
        r.rounds, r.pause, r.downtime
    );
    println!("dest: {}", r.detail);
    let m = dst.machine.as_ref().context("no machine")?;
    progress(m, run_seconds)?;
    pause_and_verify(m, "dest after migration")
}
