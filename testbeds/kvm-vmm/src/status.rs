//! The VMM's status file: what an operator (or an end-to-end test) reads to see whether
//! the guest runs and makes progress.
//!
//! The file holds one JSON object, replaced atomically (write to `F.tmp`, rename):
//!
//! ```json
//! {"state":"running","pid":123,"counters":[5120,4992],"total":10112,
//!  "detail":"...","dirty_log":[{"final_round":false,"pages":51000,"get_us":14,"clear_us":1139}],
//!  "record_check":""}
//! ```
//!
//! `state` is one of `starting`, `running`, `paused`, `migrated`, `waiting`, `loaded`;
//! `counters` are the guest's per-vCPU `writes` counters, read from guest memory (see
//! [`crate::guest`]); `dirty_log` lists the cost of each dirty-log read of the last
//! migration attempt (source side); `record_check` is the outcome of a destination's
//! `--check-record after-start` check (empty otherwise). Same shape as `ferry-workload-vmm`'s status file, so
//! the same test support reads both.
//!
//! # Threads
//!
//! [`StatusFile::spawn`] starts one thread that rewrites the file every 100 ms and exits
//! the process (status 3) once `--max-runtime-s` is over, so a test or benchmark process
//! can never run forever. State changes are written at once, not at the next tick.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use ferry_cpl3_guest::GuestRam;
use serde::Serialize;

use crate::guest;

/// How often the file is rewritten.
pub const TICK: Duration = Duration::from_millis(100);

/// Exit status when `--max-runtime-s` ends the process.
pub const EXIT_MAX_RUNTIME: i32 = 3;

/// One dirty-log read, as the source VMM measured it.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct DirtyLogCost {
    /// Read with the vCPUs paused (the stop-and-copy round).
    pub final_round: bool,
    /// Dirty pages it returned.
    pub pages: u64,
    /// Time in `KVM_GET_DIRTY_LOG` (or harvesting the ring), microseconds.
    pub get_us: u64,
    /// Time re-protecting (`KVM_CLEAR_DIRTY_LOG`), microseconds.
    pub clear_us: u64,
}

/// Reads the guest's per-vCPU write counters of the VM running here.
type Probe = Arc<GuestRam>;

#[derive(Default)]
struct Inner {
    state: &'static str,
    detail: String,
    probe: Option<(Probe, u32)>,
    /// Counters to show when no probe is set (e.g. after the VM left).
    frozen: Vec<u64>,
    dirty_log: Vec<DirtyLogCost>,
    record_check: String,
}

#[derive(Serialize)]
struct Json<'a> {
    state: &'a str,
    pid: u32,
    counters: &'a [u64],
    total: u64,
    detail: &'a str,
    dirty_log: &'a [DirtyLogCost],
    record_check: &'a str,
}

/// A handle on the status file (cheap to clone; a no-op without a path).
#[derive(Clone)]
pub struct StatusFile {
    path: Option<PathBuf>,
    inner: Arc<Mutex<Inner>>,
}

impl StatusFile {
    /// A status kept in `path` (or nowhere), starting in state `starting`.
    pub fn new(path: Option<PathBuf>) -> Self {
        Self {
            path,
            inner: Arc::new(Mutex::new(Inner {
                state: "starting",
                ..Inner::default()
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts the thread that rewrites the file every [`TICK`] and ends the process
    /// with [`EXIT_MAX_RUNTIME`] after `max_runtime`.
    ///
    /// # Errors
    ///
    /// When the thread cannot be spawned.
    pub fn spawn(&self, max_runtime: Duration) -> std::io::Result<()> {
        let me = self.clone();
        let deadline = Instant::now() + max_runtime;
        std::thread::Builder::new()
            .name("status".into())
            .spawn(move || loop {
                me.write();
                if Instant::now() >= deadline {
                    eprintln!("ferry-kvm-vmm: --max-runtime-s reached, exiting");
                    std::process::exit(EXIT_MAX_RUNTIME);
                }
                std::thread::sleep(TICK);
            })
            .map(|_| ())
    }

    /// Sets the state and detail and writes the file now.
    pub fn set(&self, state: &'static str, detail: impl Into<String>) {
        {
            let mut i = self.lock();
            i.state = state;
            i.detail = detail.into();
        }
        self.write();
    }

    /// Shows the counters of the guest in `ram` (with `vcpus` vCPUs) from now on.
    pub fn watch(&self, ram: Arc<GuestRam>, vcpus: u32) {
        self.lock().probe = Some((ram, vcpus));
    }

    /// Stops reading guest memory; the last counters stay in the file.
    pub fn unwatch(&self) {
        let mut i = self.lock();
        if let Some((ram, vcpus)) = i.probe.take() {
            i.frozen = writes(&ram, vcpus);
        }
    }

    /// Stops reading guest memory and shows no counters (the VM here was thrown away).
    pub fn forget(&self) {
        let mut i = self.lock();
        i.probe = None;
        i.frozen.clear();
    }

    /// Sets the outcome of the destination's record check and writes the file now.
    pub fn record_check(&self, line: impl Into<String>) {
        self.lock().record_check = line.into();
        self.write();
    }

    /// Records one dirty-log read.
    pub fn dirty_log(&self, cost: DirtyLogCost) {
        self.lock().dirty_log.push(cost);
    }

    /// Forgets the dirty-log costs (a new migration attempt starts).
    pub fn clear_dirty_log(&self) {
        self.lock().dirty_log.clear();
    }

    /// Writes the file now (no-op without a path).
    pub fn write(&self) {
        let Some(path) = &self.path else { return };
        let json = {
            let i = self.lock();
            let counters = match &i.probe {
                Some((ram, vcpus)) => writes(ram, *vcpus),
                None => i.frozen.clone(),
            };
            serde_json::to_string(&Json {
                state: i.state,
                pid: std::process::id(),
                total: counters.iter().sum(),
                counters: &counters,
                detail: &i.detail,
                dirty_log: &i.dirty_log,
                record_check: &i.record_check,
            })
        };
        let Ok(mut json) = json else { return };
        json.push('\n');
        let tmp = path.with_extension("tmp");
        if std::fs::write(&tmp, json).is_ok() {
            let _ = std::fs::rename(&tmp, path);
        }
    }
}

/// Per-vCPU `writes` counters (volatile reads; approximate while the guest runs).
fn writes(ram: &GuestRam, vcpus: u32) -> Vec<u64> {
    guest::counters(ram, vcpus)
        .map(|c| c.iter().map(|c| c.writes).collect())
        .unwrap_or_default()
}
