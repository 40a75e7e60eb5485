//! `ferry-workload-vmm`: a VMM-shaped process for testing and benchmarking Ferry.
//!
//! It holds guest RAM in memfds, dirties it from writer threads at a set rate and
//! pattern (standing in for vCPUs), tracks its own writes in a dirty bitmap as real
//! VMMs do, and stamps every page with its index and write generation so the
//! destination can prove each page arrived in its latest version. It links
//! `ferry-kvm-glue`'s endpoint like any Rust VMM.
//!
//! Source: `ferry-workload-vmm --socket S --vm-id vm1 --mem-mib 1024 --rate-mib 64`.
//! Destination: `ferry-workload-vmm --socket S --vm-id vm1 --incoming`.
//! With `--status-file F` it keeps a JSON status there (state, counters), which the
//! end-to-end tests read.

mod stamp;
mod workload;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use ferry_kvm_glue::endpoint::{
    IncomingEndpoint, IncomingVm, MigratableVm, ServeEnd, SourceEndpoint, VmError,
};
use ferry_proto::common::RegionInfo;
use ferry_proto::mem::PAGE;
use std::os::fd::{AsFd, OwnedFd};

use workload::{Pattern, Workload, WriterConfig};

#[derive(Parser, Debug)]
#[command(
    name = "ferry-workload-vmm",
    about = "A memory-dirtying workload VMM for Ferry"
)]
struct Args {
    /// The sidecar's Unix socket.
    #[arg(long)]
    socket: PathBuf,
    /// VM id to register (or to wait for with --incoming).
    #[arg(long, default_value = "vm1")]
    vm_id: String,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 1024)]
    mem_mib: u64,
    /// Number of RAM regions the memory is split into (one memfd each).
    #[arg(long, default_value_t = 2)]
    regions: u64,
    /// Percentage of pages written before the migration (the rest stays zero).
    #[arg(long, default_value_t = 75)]
    fill_pct: u8,
    /// Back guest RAM with 2 MiB huge pages (hugetlbfs memfds; reserve them first in
    /// /proc/sys/vm/nr_hugepages). The destination sidecar backs its copy the same way.
    #[arg(long)]
    hugepages: bool,
    /// Writer threads (stand-ins for vCPUs).
    #[arg(long, default_value_t = 2)]
    writers: usize,
    /// Dirtying rate in MiB/s over all writers (0: idle guest).
    #[arg(long, default_value_t = 64)]
    rate_mib: u64,
    /// Where writers write.
    #[arg(long, value_enum, default_value_t = Pattern::Random)]
    pattern: Pattern,
    /// Hot set size for --pattern hot, MiB.
    #[arg(long, default_value_t = 64)]
    hot_mib: u64,
    /// Wait for an incoming migration of --vm-id instead of creating a VM.
    #[arg(long)]
    incoming: bool,
    /// Skip the full page check when an incoming VM is loaded (benchmarks).
    #[arg(long)]
    no_verify: bool,
    /// Refuse every incoming state blob (fault-injection for tests: the source must
    /// resume its VM).
    #[arg(long)]
    refuse_load: bool,
    /// Fail Start this many times (fault injection: a destination that cannot run the
    /// committed VM; it stays loaded, not running).
    #[arg(long, default_value_t = 0)]
    refuse_start: u32,
    /// Register the highest region this many MiB larger than its memfd (fault injection:
    /// the sidecar must refuse the registration; the highest, so it overlaps no other).
    #[arg(long, default_value_t = 0)]
    register_extra_mib: u64,
    /// Truncate the first memfd to half its size when the migration starts (fault
    /// injection: the sidecar must survive and abort the migration).
    #[arg(long)]
    truncate_on_migrate: bool,
    /// Keep a JSON status here, rewritten every 100 ms.
    #[arg(long)]
    status_file: Option<PathBuf>,
    /// Exit after this many seconds whatever happens (bounds test and demo runs).
    #[arg(long, default_value_t = 900)]
    max_runtime_s: u64,
}

/// Reads the writers' counters of the VM running here.
type CounterProbe = Arc<dyn Fn() -> Vec<u64> + Send + Sync>;

/// What the status file says.
#[derive(Clone, Default)]
struct Status {
    state: &'static str,
    counters: Vec<u64>,
    detail: String,
    probe: Option<CounterProbe>,
}

fn write_status(path: &Option<PathBuf>, s: &Status) {
    let Some(path) = path else { return };
    let counters: Vec<String> = s.counters.iter().map(u64::to_string).collect();
    let json = format!(
        "{{\"state\":\"{}\",\"pid\":{},\"counters\":[{}],\"total\":{},\"detail\":{:?}}}\n",
        s.state,
        std::process::id(),
        counters.join(","),
        s.counters.iter().sum::<u64>(),
        s.detail
    );
    let tmp = path.with_extension("tmp");
    if std::fs::write(&tmp, json).is_ok() {
        let _ = std::fs::rename(&tmp, path);
    }
}

/// The VM plus what the status reporter shows.
struct Vm {
    wl: Option<Workload>,
    status: Arc<Mutex<Status>>,
    cfg: WriterConfig,
    verify_on_load: bool,
    refuse_load: bool,
    refuse_start: u32,
    truncate_on_migrate: bool,
    /// What loading found (the start line repeats it).
    loaded_detail: String,
}

impl Vm {
    fn set_state(&self, state: &'static str, detail: String) {
        let mut s = self.status.lock().expect("status lock");
        s.state = state;
        s.detail = detail;
    }

    fn wl(&mut self) -> Result<&mut Workload, VmError> {
        self.wl.as_mut().ok_or_else(|| "no VM here".into())
    }
}

impl MigratableVm for Vm {
    fn start_dirty_log(&mut self) -> Result<(), VmError> {
        let truncate = self.truncate_on_migrate;
        let wl = self.wl()?;
        wl.clear_dirty();
        if truncate {
            tracing::warn!("test fault injection: truncating region 0's memfd to half its size");
            wl.cut_region0().map_err(|e| format!("ftruncate: {e}"))?;
        }
        Ok(())
    }

    fn take_dirty(&mut self, _final_round: bool) -> Result<Vec<Vec<u64>>, VmError> {
        Ok(self.wl()?.take_dirty())
    }

    fn pause(&mut self) -> Result<Duration, VmError> {
        let d = self.wl()?.pause();
        self.set_state("paused", String::new());
        Ok(d)
    }

    fn save_state(&mut self) -> Result<Vec<u8>, VmError> {
        Ok(self.wl()?.save())
    }

    fn resume(&mut self) -> Result<(), VmError> {
        self.wl()?.start();
        self.set_state("running", "resumed after a failed migration".into());
        Ok(())
    }

    fn stop(&mut self) -> Result<(), VmError> {
        let wl = self.wl()?;
        wl.stop();
        self.set_state("migrated", "the destination runs the VM".into());
        Ok(())
    }

    fn fenced(&mut self, fence: &ferry_proto::vmm::Fence, lost: bool) {
        let what = if lost {
            "sidecar lost after the commit fence: paused until a sidecar says whether the VM moved"
        } else {
            "commit fence: paused, and stays paused if the sidecar is lost"
        };
        self.set_state("paused", format!("{what} (session {})", fence.session));
    }
}

impl IncomingVm for Vm {
    fn load(
        &mut self,
        _vm_id: &str,
        regions: Vec<(RegionInfo, OwnedFd)>,
        blob: Vec<u8>,
    ) -> Result<(), VmError> {
        if self.refuse_load {
            return Err("this VMM was told to refuse incoming state (--refuse-load)".into());
        }
        let wl = Workload::restore(regions, &blob, self.cfg)?;
        if self.verify_on_load {
            let v = wl.verify();
            if v.bad > 0 {
                return Err(format!(
                    "{} of {} pages do not hold their latest version (first: page {})",
                    v.bad,
                    v.pages,
                    v.first_bad.unwrap_or(0)
                )
                .into());
            }
            self.loaded_detail = format!("verified {} pages ({} zero)", v.pages, v.zero);
        } else {
            self.loaded_detail = "page check skipped".into();
        }
        self.set_state("loaded", self.loaded_detail.clone());
        self.status.lock().expect("status lock").probe = Some(wl.counter_probe());
        self.wl = Some(wl);
        Ok(())
    }

    fn start(&mut self) -> Result<String, VmError> {
        if self.refuse_start > 0 {
            self.refuse_start -= 1;
            self.set_state(
                "loaded",
                "told to fail Start (--refuse-start); loaded, not running".into(),
            );
            return Err("this VMM was told to fail Start (--refuse-start)".into());
        }
        let detail = self.loaded_detail.clone();
        let wl = self.wl()?;
        let counters = wl.counters();
        wl.start();
        let line = format!("{detail}; writers resumed at counters {counters:?}");
        self.set_state("running", line.clone());
        Ok(line)
    }

    fn discard(&mut self) {
        if let Some(mut wl) = self.wl.take() {
            wl.stop();
        }
        self.set_state("waiting", "discarded an incoming VM".into());
    }
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    anyhow::ensure!(
        args.regions >= 1 && args.mem_mib >= args.regions,
        "bad --regions/--mem-mib"
    );
    anyhow::ensure!(args.writers >= 1, "--writers must be at least 1");
    let cfg = WriterConfig {
        writers: args.writers,
        pages_per_sec: args.rate_mib * (1 << 20) / PAGE as u64,
        pattern: args.pattern,
        hot_pages: args.hot_mib * (1 << 20) / PAGE as u64,
    };
    let status = Arc::new(Mutex::new(Status {
        state: "starting",
        ..Status::default()
    }));
    let deadline = Instant::now() + Duration::from_secs(args.max_runtime_s);
    let mut vm = Vm {
        wl: None,
        status: Arc::clone(&status),
        cfg,
        verify_on_load: !args.no_verify,
        refuse_load: args.refuse_load,
        refuse_start: args.refuse_start,
        truncate_on_migrate: args.truncate_on_migrate,
        loaded_detail: String::new(),
    };

    // Status reporter: counters as of the writers' last save, every 100 ms.
    {
        let status = Arc::clone(&status);
        let path = args.status_file.clone();
        std::thread::spawn(move || loop {
            let mut s = status.lock().expect("status lock").clone();
            if let Some(probe) = &s.probe {
                s.counters = probe();
            }
            write_status(&path, &s);
            if Instant::now() > deadline {
                eprintln!("ferry-workload-vmm: --max-runtime-s reached, exiting");
                std::process::exit(3);
            }
            std::thread::sleep(Duration::from_millis(100));
        });
    }

    if args.incoming {
        status.lock().expect("status lock").state = "waiting";
        let mut ep = IncomingEndpoint::new(&args.socket, &args.vm_id);
        let detail = loop {
            match ep.receive(&mut vm) {
                Ok(d) => break d,
                Err(e) => {
                    tracing::warn!("sidecar link: {e:#}; waiting again");
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
        };
        tracing::info!(%detail, "incoming VM runs");
    } else {
        let page = if args.hugepages { 2 << 20 } else { PAGE as u64 };
        let sizes = split(args.mem_mib << 20, args.regions, page);
        let t0 = Instant::now();
        let mut wl = Workload::create(&sizes, page, args.fill_pct, cfg)?;
        tracing::info!(
            ms = t0.elapsed().as_millis() as u64,
            "guest RAM created and filled"
        );
        wl.start();
        status.lock().expect("status lock").probe = Some(wl.counter_probe());
        vm.wl = Some(wl);
        vm.set_state("running", String::new());
    }
    // Run, and stay migratable: (re)register with the sidecar whenever it is there.
    let (mut layout, fds) = {
        let wl = vm.wl.as_ref().context("no VM to register")?;
        let fds = wl
            .memfds
            .iter()
            .map(OwnedFd::try_clone)
            .collect::<std::io::Result<Vec<_>>>()?;
        (wl.layout.clone(), fds)
    };
    if args.register_extra_mib > 0 {
        let last = layout
            .iter_mut()
            .max_by_key(|r| r.gpa)
            .context("no region")?;
        tracing::warn!(
            "test fault injection: registering the region at {:#x} {} MiB larger than its memfd",
            last.gpa,
            args.register_extra_mib
        );
        last.size += args.register_extra_mib << 20;
    }
    let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
    let mut ep = SourceEndpoint::new(&args.socket, &args.vm_id, layout, Vec::new());
    loop {
        match ep.serve(&mut vm, &borrowed) {
            Ok(ServeEnd::MigratedAway) => {
                write_status(&args.status_file, &status.lock().expect("status lock"));
                tracing::info!("migrated away; exiting");
                return Ok(());
            }
            Ok(ServeEnd::SidecarGone) => tracing::warn!("sidecar went away; the VM keeps running"),
            Err(e) => tracing::warn!("sidecar link: {e:#}; the VM keeps running"),
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// `total` bytes in `parts` regions of whole `page`-byte pages (the last takes the rest).
fn split(total: u64, parts: u64, page: u64) -> Vec<u64> {
    let pages = total / page;
    let per = pages / parts;
    (0..parts)
        .map(|i| {
            let n = if i == parts - 1 {
                pages - per * (parts - 1)
            } else {
                per
            };
            n * page
        })
        .collect()
}
