//! The Cloud Hypervisor adapter: unmodified CH VMs migrate through Ferry
//! (`docs/cloud-hypervisor.md`).
//!
//! `ferry ch register` attaches a running CH VM (its API socket) to this sidecar;
//! `ferry ch await` attaches a CH started without a VM that is to receive one. A
//! migration of a CH VM goes through the same queue, limits, caps, cancel and status as
//! any other; its session is CH's own pre-copy: the source sidecar asks the source CH to
//! send to a local listener (`connections` = the migration's streams), carries its
//! connections byte for byte over Ferry's authenticated control and data connections
//! (`ferry_ch::proxy`), and the destination sidecar lands the memory in memfds it hands to
//! the destination CH, which runs the VM from them (`ferry_ch::relay`).

use std::io::Write;
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ferry_ch::relay::MemoryConnections;
use ferry_engine::session::SessionId;
use ferry_proto::cli::{CliMsg, MigrateRequest, OnLimit, Phase, UNKNOWN};
use ferry_proto::common::MAX_FRAME;
use ferry_proto::frame::{read_msg, write_msg};
use ferry_proto::net::Timeouts;
use ferry_proto::peer::PeerMsg;
use ferry_proto::records::{self, ChKind, ChRecord};

use crate::ch_vms::{lock, ChVm};
use crate::context::Daemon;
use crate::offer::DestinationBusy;
use crate::peer::{connect_control, connect_data, refuse, Control, PeerStream};
use crate::queue::Job;
use crate::source::Reporter;
use crate::summary::Summary;

/// How long a silent peer is waited for on a CH migration's connections (a 64 MiB chunk
/// under a low bandwidth cap takes a while).
const PEER_IDLE: Duration = Duration::from_secs(300);

/// How long `vm.receive-migration` may run (it returns when the migration ends).
const RECEIVE_LIMIT: Duration = Duration::from_secs(24 * 3600);

/// `ferry ch register` / `ferry ch await`: attaches the CH answering at `api`.
///
/// # Errors
///
/// No CH there, a source without a VM (or a waiting CH with one), or the id taken.
pub fn attach(d: &Daemon, vm_id: &str, api: &Path, incoming: bool) -> anyhow::Result<String> {
    let version = ferry_ch::api::ping(api)?;
    let info = ferry_ch::api::call(api, "GET", "vm.info", None, Duration::from_secs(5))?;
    let has_vm = info.status == 200;
    if d.registry.can_migrate(vm_id).is_ok() || d.ch.has_source(vm_id) {
        bail!("VM {vm_id} is already registered with this sidecar");
    }
    if incoming {
        if has_vm {
            bail!("the CH at {} already runs a VM: start it without one (only --api-socket) to receive {vm_id}", api.display());
        }
        lock(&d.ch.waiting).insert(
            vm_id.to_owned(),
            ChVm {
                api: api.to_owned(),
                ram_bytes: 0,
            },
        );
        Ok(format!(
            "Cloud Hypervisor {version} at {} waits for VM {vm_id}",
            api.display()
        ))
    } else {
        if !has_vm {
            bail!(
                "the CH at {} runs no VM ({}): start the VM first",
                api.display(),
                info.body
            );
        }
        let v: serde_json::Value = serde_json::from_str(&info.body)?;
        let ram_bytes = v["config"]["memory"]["size"].as_u64().unwrap_or(0);
        lock(&d.ch.sources).insert(
            vm_id.to_owned(),
            ChVm {
                api: api.to_owned(),
                ram_bytes,
            },
        );
        Ok(format!(
            "VM {vm_id} ({} MiB, Cloud Hypervisor {version} at {}) is registered",
            ram_bytes >> 20,
            api.display()
        ))
    }
}

/// Accepts the source CH's main connection, waiting at most `limit`.
fn accept_main(l: &TcpListener, limit: Duration) -> anyhow::Result<std::net::TcpStream> {
    l.set_nonblocking(true)?;
    let end = Instant::now() + limit;
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                return Ok(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < end => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e).context("waiting for the source CH to connect"),
        }
    }
}

/// Where the keeper of `vm_id`'s source CH connection listens.
pub fn keeper_path(d: &Daemon, vm_id: &str) -> PathBuf {
    d.cfg.state_dir.join(format!("ch-{vm_id}.keeper"))
}

/// Starts a keeper (`ferry ch keep`, in a session of its own so it outlives this
/// sidecar), before the migration starts: starting a process inside the downtime would
/// lengthen it. [`KeeperGuard`] ends one that was never handed anything.
fn start_keeper(socket: &Path) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    let _ = std::fs::remove_file(socket);
    let mut c = std::process::Command::new(std::env::current_exe()?);
    c.args(["ch", "keep", "--socket"])
        .arg(socket)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null());
    let parent = i32::try_from(std::process::id()).context("pid")?;
    // SAFETY: setsid, sigemptyset, sigprocmask, prctl, getppid and _exit are
    // async-signal-safe and touch nothing of the parent.
    unsafe {
        c.pre_exec(move || {
            libc::setsid();
            // The daemon blocks the signals it waits for; the keeper takes them as usual.
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
            // Until it is handed a connection, the keeper ends with this sidecar (a
            // sidecar killed before its decision leaves no keeper behind); it clears this
            // once it holds one, and outlives the sidecar from then on.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    let mut child = c.spawn().context("starting the keeper")?;
    let end = Instant::now() + Duration::from_secs(5);
    while !socket.exists() {
        if Instant::now() > end || child.try_wait()?.is_some() {
            bail!("the keeper did not start");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    // Reaped by a thread: the keeper ends when released, answered or dismissed.
    std::thread::spawn(move || child.wait());
    Ok(())
}

/// A started keeper: one that was never handed the source CH's connection is dismissed
/// when this drops (a link that hands nothing over makes it exit).
struct KeeperGuard<'a> {
    socket: &'a Path,
    handed: bool,
}

impl Drop for KeeperGuard<'_> {
    fn drop(&mut self) {
        if !self.handed {
            drop(UnixStream::connect(self.socket));
        }
    }
}

/// `ferry recover` of a CH VM whose migration's outcome was not settled: its source CH
/// waits, paused, held by the keeper (its sidecar died in the commit window, or the
/// destination's answer to `Complete` was lost). The recorded decision names the
/// destination, which is asked what became of the VM there (`ChQuery`): running, the
/// source CH is told Ok (it stops its VM for good); absent, it is told Error (it resumes).
/// `--abort` rolls back only when the destination does not run it; `--abort --force`
/// without asking.
///
/// Returns `None` when nothing is held for `vm_id`.
///
/// # Errors
///
/// The destination unreachable, or in a state that needs the operator (the error says
/// what to do); the keeper not answering.
pub fn recover(
    d: &Daemon,
    vm_id: &str,
    mode: ferry_proto::cli::RecoverMode,
) -> anyhow::Result<Option<String>> {
    use ferry_proto::cli::RecoverMode;
    use ferry_proto::peer::{CH_ABSENT, CH_PAUSED, CH_RUNNING};
    let socket = keeper_path(d, vm_id);
    if !socket.exists() {
        return Ok(None);
    }
    let rec = records::read_ch(&d.cfg.state_dir, vm_id, ChKind::Decision)?;
    let commit = match (mode, &rec) {
        (RecoverMode::ForceAbort, _) => false,
        // No record (a keeper left by an older build): as the operator says.
        (_, None) => mode == RecoverMode::Deliver,
        (_, Some(rec)) => {
            let (state, detail) = ask_destination(d, vm_id, rec).map_err(|e| {
                anyhow::anyhow!(
                    "cannot ask the destination {} what became of {vm_id}: {e:#}. Its source CH stays paused: if the VM runs there, stop the source CH; if not, `ferry recover {vm_id} --abort --force` resumes it here",
                    rec.at
                )
            })?;
            match (state, mode) {
                (CH_RUNNING, RecoverMode::Deliver) => true,
                (CH_RUNNING, _) => bail!(
                    "the destination {} runs {vm_id} ({detail}): rolling back would run it twice; `ferry recover {vm_id}` stops the source instead",
                    rec.at
                ),
                (CH_ABSENT, _) => false,
                (CH_PAUSED, _) => bail!(
                    "the destination {} holds {vm_id} restored but paused ({detail}): resume it there and run `ferry recover {vm_id}`, or delete it there and run `ferry recover {vm_id} --abort`",
                    rec.at
                ),
                _ => bail!(
                    "the destination {} has no record of this migration of {vm_id} ({detail}): check it; `ferry recover {vm_id} --abort --force` resumes the source CH",
                    rec.at
                ),
            }
        }
    };
    ferry_ch::keeper::answer(&socket, commit)?;
    lock(&d.ch.unsettled).remove(vm_id);
    records::remove_ch(&d.cfg.state_dir, vm_id, ChKind::Decision);
    Ok(Some(if commit {
        format!("the destination runs {vm_id}: its source CH was told the migration completed and stops its VM")
    } else {
        format!("{vm_id} does not run at the destination: its source CH was told the migration failed and resumes its VM")
    }))
}

/// Asks the destination of `rec` what became of `vm_id` (`ChQuery`).
fn ask_destination(d: &Daemon, vm_id: &str, rec: &ChRecord) -> anyhow::Result<(u8, String)> {
    let mut ctl = connect_control(&d.auth, &rec.at)?;
    ctl.stream
        .tcp()
        .set_timeouts(Some(Duration::from_secs(15)))?;
    write_msg(
        &mut ctl.stream,
        &PeerMsg::ChQuery {
            vm_id: vm_id.to_owned(),
            session: rec.session,
        },
    )?;
    match read_msg(&mut ctl.stream, MAX_FRAME)? {
        PeerMsg::ChState { state, detail } => Ok((state, detail)),
        other => Err(ferry_proto::peer::unexpected("ChState", other).into()),
    }
}

/// The destination's answer to `ChQuery`: what its CH says of the VM it received in
/// `session`.
///
/// # Errors
///
/// The connection failed.
pub fn answer_query(
    d: &Daemon,
    mut ctl: Control,
    vm_id: &str,
    session: SessionId,
) -> anyhow::Result<()> {
    use ferry_proto::peer::{CH_ABSENT, CH_PAUSED, CH_RUNNING, CH_UNKNOWN};
    let rec = records::read_ch(&d.cfg.state_dir, vm_id, ChKind::Incoming)
        .ok()
        .flatten()
        .filter(|r| r.session == session);
    let (state, detail) = match rec {
        None => (CH_UNKNOWN, format!("no record here of migration {session}")),
        Some(r) => {
            let api = Path::new(&r.at);
            match UnixStream::connect(api) {
                Err(e) => (
                    CH_ABSENT,
                    format!("the destination CH at {} is gone ({e})", r.at),
                ),
                Ok(_) => match ferry_ch::api::vm_state(api) {
                    Ok(Some(s)) if s == "Running" => (CH_RUNNING, format!("{} runs it", r.at)),
                    Ok(Some(s)) if s == "Paused" => {
                        (CH_PAUSED, format!("{} holds it paused", r.at))
                    }
                    Ok(Some(s)) => (
                        CH_ABSENT,
                        format!("{} has only its configuration ({s})", r.at),
                    ),
                    Ok(None) => (CH_ABSENT, format!("{} has no VM", r.at)),
                    Err(e) => (CH_UNKNOWN, format!("{} does not answer: {e:#}", r.at)),
                },
            }
        }
    };
    write_msg(&mut ctl.stream, &PeerMsg::ChState { state, detail })?;
    Ok(())
}

/// Migrates a CH source VM (from the queue: `outgoing::run_queued`).
///
/// # Errors
///
/// The destination was busy (nothing happened; the job waits again).
pub fn migrate(
    d: &Daemon,
    req: &MigrateRequest,
    job: Option<&Arc<Job>>,
    report: Reporter<'_>,
) -> Result<Summary, String> {
    let mut summary = Summary::new(req, d.auth.encrypted());
    summary.transport = "tcp".into();
    summary.verify_mode = "none (Cloud Hypervisor's own pre-copy)".into();
    let Some(vm) = lock(&d.ch.sources).remove(&req.vm_id) else {
        summary.error = format!("no Cloud Hypervisor VM {} is registered here", req.vm_id);
        return Ok(summary);
    };
    summary.ram_bytes = vm.ram_bytes;
    let t0 = Instant::now();
    let outcome = run_source(d, req, &vm, job, report, &mut summary);
    summary.total_ms = t0.elapsed().as_secs_f64() * 1e3;
    match outcome {
        Ok(()) => {
            summary.result = "committed".into();
            tracing::info!(vm = %req.vm_id, to = %req.to, "Cloud Hypervisor VM migrated");
        }
        Err(e) if e.downcast_ref::<DestinationBusy>().is_some() => {
            lock(&d.ch.sources).insert(req.vm_id.clone(), vm);
            return Err(e.to_string());
        }
        Err(e) => {
            summary.error = format!("{e:#}");
            if summary.result != "committed-unconfirmed" {
                if summary.result != "cancelled" {
                    summary.result = "aborted".into();
                }
                // The source CH resumed its VM (it does on any failure before Complete).
                lock(&d.ch.sources).insert(req.vm_id.clone(), vm);
            }
            tracing::warn!(vm = %req.vm_id, "Cloud Hypervisor migration: {}", summary.error);
        }
    }
    Ok(summary)
}

fn run_source(
    d: &Daemon,
    req: &MigrateRequest,
    vm: &ChVm,
    job: Option<&Arc<Job>>,
    report: Reporter<'_>,
    summary: &mut Summary,
) -> anyhow::Result<()> {
    let session = SessionId(ferry_proto::auth::random()?);
    summary.session = session.to_string();
    let mut ctl = connect_control(&d.auth, &req.to)?;
    ctl.stream.tcp().set_timeouts(Some(PEER_IDLE))?;
    write_msg(
        &mut ctl.stream,
        &PeerMsg::ChOffer {
            vm_id: req.vm_id.clone(),
            session,
            channels: req.channels,
            postcopy: req.postcopy,
        },
    )?;
    match read_msg(&mut ctl.stream, MAX_FRAME)? {
        PeerMsg::Accept { .. } => {}
        PeerMsg::Busy { running, limit } => return Err(DestinationBusy { running, limit }.into()),
        other => return Err(ferry_proto::peer::unexpected("Accept", other).into()),
    }
    let mut data = Vec::with_capacity(usize::from(req.channels));
    for ch in 0..req.channels {
        let s = connect_data(&d.auth, &req.to, session, &ctl.key, ch)?;
        s.tcp().set_timeouts(Some(PEER_IDLE))?;
        data.push(s);
    }
    summary.channels = req.channels;
    // The keeper is started now, outside the downtime; handed the source CH's connection
    // at the decision, or dismissed when the migration ends before it.
    let keeper_socket = keeper_path(d, &req.vm_id);
    start_keeper(&keeper_socket)?;
    let mut keeper = KeeperGuard {
        socket: &keeper_socket,
        handed: false,
    };
    let kept: Mutex<Option<ferry_ch::keeper::Kept>> = Mutex::new(None);
    let moved = AtomicU64::new(0);
    let last = Mutex::new(Instant::now());
    let phase = Mutex::new("precopy");
    let cancelled = AtomicBool::new(false);
    let pace = |b: u64| -> anyhow::Result<()> {
        let total = moved.fetch_add(b, Ordering::Relaxed) + b;
        let phase = *lock(&phase);
        if let Some(j) = job.filter(|j| j.cancel_requested()) {
            if phase == "postcopy" {
                j.answer_cancel(Err(format!(
                    "{} runs at the destination already (post-copy pull): nothing to cancel",
                    req.vm_id
                )));
            } else {
                // The memory connection this piece came on ends; the source CH gives the
                // migration up with its VM running.
                cancelled.store(true, Ordering::Release);
                j.answer_cancel(Ok(format!(
                    "the migration of {} was cancelled: its VM runs on here",
                    req.vm_id
                )));
                bail!("cancelled by the operator");
            }
        }
        if let Some(j) = job {
            j.flow.take(b);
            j.update(|l| {
                l.phase = phase;
                l.observe(total, Instant::now());
            });
        }
        let mut t = lock(&last);
        if t.elapsed() >= Duration::from_millis(200) {
            *t = Instant::now();
            report(CliMsg::Progress {
                phase: if phase == "postcopy" {
                    Phase::Postcopy
                } else {
                    Phase::Precopy
                },
                round: 0,
                round_done: total,
                round_total: 0,
                total_done: total,
                rate: UNKNOWN,
                dirty_rate: UNKNOWN,
                expected_downtime_ms: UNKNOWN,
            });
        }
        Ok(())
    };
    // From the decision on, a dying sidecar must not let the source CH resume: the keeper
    // holds (a duplicate of) its connection until the outcome is settled.
    let decide = |ch: std::os::fd::BorrowedFd<'_>| -> anyhow::Result<()> {
        records::write_ch(
            &d.cfg.state_dir,
            &req.vm_id,
            ChKind::Decision,
            &ChRecord {
                session,
                at: req.to.clone(),
            },
        )?;
        *lock(&kept) = Some(ferry_ch::keeper::Kept::hand_over(&keeper_socket, ch)?);
        tracing::info!(vm = %req.vm_id, %session, "Cloud Hypervisor VM: the destination holds it restored; committing");
        #[cfg(feature = "fault-injection")]
        crate::faults::hold("ch-decided");
        Ok(())
    };
    let carried_complete = || {
        #[cfg(feature = "fault-injection")]
        crate::faults::hold("ch-complete-carried");
    };
    let carried = if req.postcopy {
        source_postcopy(
            d,
            req,
            vm,
            ctl.stream,
            data,
            &pace,
            &phase,
            decide,
            carried_complete,
            summary,
        )
    } else {
        source_precopy(
            req,
            vm,
            ctl.stream,
            data,
            &pace,
            decide,
            carried_complete,
            summary,
        )
    };
    d.metrics.add_bytes(false, moved.load(Ordering::Relaxed));
    let kept = lock(&kept).take();
    keeper.handed = kept.is_some();
    let settled = || records::remove_ch(&d.cfg.state_dir, &req.vm_id, ChKind::Decision);
    match carried {
        Ok(bytes) => {
            // The source CH got its answer from this sidecar: the keeper lets go.
            if let Some(k) = kept {
                k.release();
            }
            settled();
            summary.bytes_transferred = bytes;
            Ok(())
        }
        Err(Unsettled { error, kept_open }) => {
            if let Some(s) = kept_open {
                // The keeper goes on holding it too (its link ends here, not released):
                // `ferry recover` settles it through the keeper.
                drop(kept);
                // The VM may run at the destination: the source CH must not resume. Keep
                // its connection open (it waits, paused) until the outcome is settled.
                lock(&d.ch.unsettled).insert(req.vm_id.clone(), s);
                summary.result = "committed-unconfirmed".into();
                return Err(error.context(
                    "the destination's answer to Complete was lost: the source CH stays paused (check the destination, then stop or resume the source CH)",
                ));
            }
            // The source CH was answered Error (it resumes its VM, or never paused it).
            if let Some(k) = kept {
                k.release();
            }
            settled();
            if cancelled.load(Ordering::Acquire) {
                summary.result = "cancelled".into();
                return Err(error.context("cancelled by the operator"));
            }
            Err(error)
        }
    }
}

/// Why a CH migration's source half stopped; `kept_open`: the source CH's connection,
/// `Complete` carried and its answer lost (the source CH waits, paused).
struct Unsettled {
    error: anyhow::Error,
    kept_open: Option<std::os::fd::OwnedFd>,
}

impl<C: Into<std::os::fd::OwnedFd>> From<ferry_ch::proxy::Failed<C>> for Unsettled {
    fn from(f: ferry_ch::proxy::Failed<C>) -> Self {
        Self {
            error: f.error,
            kept_open: f.unsettled.map(Into::into),
        }
    }
}

/// Pre-copy: the source CH sends to a local TCP port (`connections` = the streams), and
/// its connections are carried over Ferry's. Returns the memory bytes carried.
#[allow(clippy::too_many_arguments)]
fn source_precopy(
    req: &MigrateRequest,
    vm: &ChVm,
    peer: PeerStream,
    data: Vec<PeerStream>,
    pace: &ferry_ch::proxy::Pace<'_>,
    decide: impl FnOnce(std::os::fd::BorrowedFd<'_>) -> anyhow::Result<()>,
    carried_complete: impl FnOnce(),
    summary: &mut Summary,
) -> Result<u64, Unsettled> {
    summary.transport = "tcp".into();
    summary.verify_mode = "none (Cloud Hypervisor's own pre-copy)".into();
    summary.transport_reason = "Cloud Hypervisor pre-copy carried over Ferry's TCP streams".into();
    let start = || -> anyhow::Result<_> {
        let listener =
            TcpListener::bind("127.0.0.1:0").context("a local port for the source CH")?;
        let url = format!("tcp:127.0.0.1:{}", listener.local_addr()?.port());
        let body = serde_json::json!({
            "destination_url": url,
            "connections": req.channels,
            "downtime_ms": req.downtime_ms.max(1),
            "timeout_s": (req.timeout_ms / 1000).max(1),
            "timeout_strategy": match req.on_limit { OnLimit::Abort => "Cancel", OnLimit::Force => "Ignore" },
        });
        send_migration(vm, &body)?;
        let main = accept_main(&listener, Duration::from_secs(30))?;
        // The keeper's copy of the source CH's connection (see `ferry_ch::keeper`).
        let for_keeper = main.try_clone()?;
        Ok((listener, main, for_keeper))
    };
    let (listener, main, for_keeper) = start().map_err(|error| Unsettled {
        error,
        kept_open: None,
    })?;
    let data: Vec<_> = data.into_iter().enumerate().map(Tamper::new).collect();
    let carried = ferry_ch::proxy::proxy(
        main,
        Some(&listener),
        peer,
        data,
        pace,
        || decide(std::os::fd::AsFd::as_fd(&for_keeper)),
        carried_complete,
    )?;
    Ok(carried.memory_bytes)
}

/// A data connection of a CH pre-copy. With the `fault-injection` feature a test may have
/// one byte it writes flipped (`FERRY_TEST_CORRUPT_CH_BYTE=<n>`: the n-th byte written on
/// data connection 0), to see the destination's page checks catch it.
struct Tamper<S> {
    s: S,
    flip_at: Option<u64>,
    written: u64,
}

impl<S> Tamper<S> {
    fn new((i, s): (usize, S)) -> Self {
        #[cfg(feature = "fault-injection")]
        let flip_at = std::env::var("FERRY_TEST_CORRUPT_CH_BYTE")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|_| i == 0);
        #[cfg(not(feature = "fault-injection"))]
        let flip_at = {
            let _ = i;
            None
        };
        Self {
            s,
            flip_at,
            written: 0,
        }
    }
}

impl<S: std::io::Read> std::io::Read for Tamper<S> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.s.read(buf)
    }
}

impl<S: Write> Write for Tamper<S> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = match self.flip_at {
            Some(at) if at >= self.written && at < self.written + buf.len() as u64 => {
                let mut copy = buf.to_vec();
                let i = usize::try_from(at - self.written).expect("inside buf");
                copy[i] ^= 0x5a;
                let n = self.s.write(&copy)?;
                if (i as u64) < n as u64 {
                    self.flip_at = None;
                }
                n
            }
            _ => self.s.write(buf)?,
        };
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.s.flush()
    }
}

/// Asks the source CH to send (`vm.send-migration`).
fn send_migration(vm: &ChVm, body: &serde_json::Value) -> anyhow::Result<()> {
    let a = ferry_ch::api::call(
        &vm.api,
        "PUT",
        "vm.send-migration",
        Some(body),
        Duration::from_secs(30),
    )?;
    if !a.ok() {
        bail!("the source CH refused to send: {} {}", a.status, a.body);
    }
    Ok(())
}

/// Post-copy: the source CH sends in local mode to a Unix socket of this sidecar, which
/// keeps its memfds, carries `Config`, `State` and `Complete` to the destination, and
/// answers the destination's pulls from the memfds until it has every page. Returns the
/// bytes pulled.
#[allow(clippy::too_many_arguments)]
fn source_postcopy(
    d: &Daemon,
    req: &MigrateRequest,
    vm: &ChVm,
    mut peer: PeerStream,
    data: Vec<PeerStream>,
    pace: &ferry_ch::proxy::Pace<'_>,
    phase: &Mutex<&'static str>,
    decide: impl FnOnce(std::os::fd::BorrowedFd<'_>) -> anyhow::Result<()>,
    carried_complete: impl FnOnce(),
    summary: &mut Summary,
) -> Result<u64, Unsettled> {
    use std::os::unix::net::UnixListener;
    summary.postcopy = true;
    summary.transport = "tcp".into();
    summary.verify_mode = "none (Cloud Hypervisor post-copy)".into();
    summary.transport_reason =
        "post-copy: pages pulled over Ferry's TCP streams, faulting pages first".into();
    let sock = d.cfg.state_dir.join(format!("ch-{}.local.sock", req.vm_id));
    let mut start = || -> anyhow::Result<_> {
        let _ = std::fs::remove_file(&sock);
        let listener = UnixListener::bind(&sock).context("a local socket for the source CH")?;
        std::fs::set_permissions(&sock, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        let body = serde_json::json!({
            "destination_url": format!("unix:{}", sock.display()),
            "local": true,
            "downtime_ms": req.downtime_ms.max(1),
            "timeout_s": (req.timeout_ms / 1000).max(1),
        });
        send_migration(vm, &body).context(
            "post-copy needs the source CH in local mode: a VM with shared memory (--memory shared=on)",
        )?;
        listener.set_nonblocking(true)?;
        let end = Instant::now() + Duration::from_secs(30);
        let mut main = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < end => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(e).context("waiting for the source CH to connect"),
            }
        };
        main.set_nonblocking(false)?;
        let _ = std::fs::remove_file(&sock);
        let local = ferry_ch::postcopy::accept_local(&mut main)?;
        let layout = ferry_ch::ram::layout_of(&local.config)?;
        let ram = ferry_ch::ram::Ram::adopt(&layout, local.fds)?;
        // The destination half begins with Start, as from any source CH.
        let mut start = ferry_ch::wire::Request::new(ferry_ch::wire::Command::Start, 0);
        start.version = ferry_ch::wire::CH_PROTOCOL_VERSION;
        peer.write_all(&start.encode())?;
        ferry_ch::link::expect_ok(&mut peer, ferry_ch::wire::Command::Start)
            .context("the destination refused to start")?;
        let for_keeper = main.try_clone()?;
        Ok((ram, local.config_request, main, for_keeper))
    };
    let started = start();
    let _ = std::fs::remove_file(&sock);
    let (ram, config_request, main, for_keeper) = started.map_err(|error| Unsettled {
        error,
        kept_open: None,
    })?;
    summary.ram_bytes = ram.size();
    let ch = ferry_ch::postcopy::Replayed::new(config_request, main);
    let shutters: Vec<_> = data
        .iter()
        .filter_map(|s| s.tcp().try_clone().ok())
        .collect();
    std::thread::scope(|sc| {
        let ram = &ram;
        // RDMA READ is offered unless the operator asked for TCP (or no device works).
        let rdma = (req.transport != ferry_proto::cli::TransportChoice::Tcp)
            .then_some(usize::from(req.channels));
        let servers: Vec<_> = data
            .into_iter()
            .map(|mut s| sc.spawn(move || ferry_ch::postcopy::serve_pulls(&mut s, ram, pace, rdma)))
            .collect();
        let paused_at = ch.first_answer();
        let carried = ferry_ch::proxy::proxy(
            ch,
            None,
            peer,
            Vec::<PeerStream>::new(),
            &|_| Ok(()),
            || decide(std::os::fd::AsFd::as_fd(&for_keeper)),
            carried_complete,
        );
        let complete_carried = match &carried {
            Ok(_) => true,
            Err(f) => f.unsettled.is_some(),
        };
        if complete_carried {
            *lock(phase) = "postcopy";
        } else {
            // Nothing was decided: the destination needs no page from here.
            for s in &shutters {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
        let t = Instant::now();
        // The source CH paused its VM once its Config was answered; the destination ran
        // it before Complete was answered.
        if let Some(at) = paused_at.get() {
            summary.downtime_ms = (t - *at).as_secs_f64() * 1e3;
        }
        let (mut pulled, mut by_rdma, mut rdma_opened) = (0, 0, false);
        let mut pull_error = None;
        for s in servers {
            match s.join().expect("page server thread") {
                Ok(served) if served.end == ferry_ch::postcopy::PullEnd::Done => {
                    pulled += served.tcp_bytes + served.rdma_bytes;
                    by_rdma += served.rdma_bytes;
                    rdma_opened |= served.rdma;
                }
                Ok(served) => {
                    pulled += served.tcp_bytes;
                    pull_error.get_or_insert_with(|| {
                        anyhow::anyhow!(
                            "the destination closed a pull connection before it had every page"
                        )
                    });
                }
                Err(e) => {
                    pull_error.get_or_insert(e);
                }
            }
        }
        summary.postcopy_pull_ms = t.elapsed().as_secs_f64() * 1e3;
        if rdma_opened {
            summary.transport = "rdma".into();
            summary.transport_reason = format!(
                "post-copy: pages pulled with RDMA READ ({} MiB; {} MiB over Ferry's TCP streams), faulting pages first",
                by_rdma >> 20,
                (pulled - by_rdma) >> 20
            );
        }
        match (carried, pull_error) {
            (Ok(_), None) => Ok(pulled),
            (Ok(_), Some(e)) => {
                // Committed all the same: the source CH was told Ok and is gone.
                let e = e.context(
                    "post-copy: the VM runs at the destination but its pull broke off: the VM there may be lost",
                );
                tracing::error!(vm = %req.vm_id, "{e:#}");
                summary.error = format!("{e:#}");
                Ok(pulled)
            }
            (Err(f), _) => Err(f.into()),
        }
    })
}

/// The destination side of a CH migration (a `ChOffer` on a control connection).
///
/// # Errors
///
/// Whatever ended it (the source was told when it could be).
pub fn receive(
    d: &Arc<Daemon>,
    mut ctl: Control,
    vm_id: String,
    session: SessionId,
    channels: u16,
    postcopy: bool,
) -> anyhow::Result<()> {
    if channels == 0 || channels > crate::offer::MAX_CHANNELS {
        return Err(refuse(
            &mut ctl.stream,
            format!("{channels} channels requested"),
        ));
    }
    let Some(_slot) = crate::dest::admit(d, &mut ctl, &vm_id)? else {
        return Ok(());
    };
    let Some(ch) = lock(&d.ch.waiting).remove(&vm_id) else {
        return Err(refuse(
            &mut ctl.stream,
            format!("no Cloud Hypervisor waits for VM {vm_id} here (`ferry ch await`)"),
        ));
    };
    let sock = d.cfg.state_dir.join(format!("ch-{vm_id}.sock"));
    let _ = std::fs::remove_file(&sock);
    // What the destination CH makes of this migration is asked for by `ferry recover` at
    // the source (`answer_query`), across restarts of this sidecar.
    let recorded = records::write_ch(
        &d.cfg.state_dir,
        &vm_id,
        ChKind::Incoming,
        &ChRecord {
            session,
            at: ch.api.to_string_lossy().into_owned(),
        },
    );
    if let Err(e) = recorded {
        lock(&d.ch.waiting).insert(vm_id.clone(), ch);
        return Err(refuse(&mut ctl.stream, format!("{e:#}")));
    }
    let t0 = Instant::now();
    let peer = crate::dest::peer_ip(&ctl);
    let res = receive_into(d, &mut ctl, &vm_id, session, channels, postcopy, &ch, &sock);
    let _ = std::fs::remove_file(&sock);
    let state = if res.is_ok() {
        "committed"
    } else {
        "discarded"
    };
    let error = res
        .as_ref()
        .err()
        .map(|e| format!("{e:#}"))
        .unwrap_or_default();
    crate::dest::record_incoming(d, &vm_id, &peer, state, t0, error);
    match &res {
        Ok(()) => tracing::info!(vm = %vm_id, "Cloud Hypervisor VM runs here"),
        Err(e) => {
            tracing::warn!(vm = %vm_id, "incoming Cloud Hypervisor migration: {e:#}");
            // The destination CH abandoned what it built and can receive again.
            if ferry_ch::api::vm_state(&ch.api).ok() == Some(None) {
                lock(&d.ch.waiting).insert(vm_id.clone(), ch);
            }
        }
    }
    res
}

#[allow(clippy::too_many_arguments)]
fn receive_into(
    d: &Daemon,
    ctl: &mut Control,
    vm_id: &str,
    session: SessionId,
    channels: u16,
    postcopy: bool,
    ch: &ChVm,
    sock: &Path,
) -> anyhow::Result<()> {
    let expected = crate::intake::expect_data(&d.registry, session, ctl.key, channels);
    write_msg(&mut ctl.stream, &PeerMsg::Accept { prepare_us: 0 })?;
    let data: Vec<PeerStream> = expected.collect()?;
    for s in &data {
        s.tcp().set_timeouts(Some(PEER_IDLE))?;
    }
    ctl.stream.tcp().set_timeouts(Some(PEER_IDLE))?;
    let api = ch.api.clone();
    let url = format!("unix:{}", sock.display());
    let body = if postcopy {
        serde_json::json!({ "receiver_url": url, "memory_mode": "Postcopy" })
    } else {
        serde_json::json!({ "receiver_url": url })
    };
    let receiver = std::thread::spawn(move || {
        ferry_ch::api::call(
            &api,
            "PUT",
            "vm.receive-migration",
            Some(&body),
            RECEIVE_LIMIT,
        )
    });
    let end = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        if Instant::now() > end || receiver.is_finished() {
            bail!("the destination CH did not start receiving");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let open_dest = || Ok(UnixStream::connect(sock)?);
    let hold = |_point: &'static str| {
        #[cfg(feature = "fault-injection")]
        crate::faults::hold(_point);
    };
    let outcome = if postcopy {
        ferry_ch::postcopy::receive(&mut ctl.stream, data, vm_id, open_dest, || {
            tracing::info!(vm = %vm_id, "Cloud Hypervisor VM runs here; pulling its memory (post-copy)");
        }, &hold)
        .map(|r| {
            tracing::info!(vm = %vm_id, faults = r.faults, fault_bytes = r.fault_bytes, bulk_bytes = r.bulk_bytes, zero_bytes = r.zero_bytes, rdma_bytes = r.rdma_bytes, transport = %r.transport, pull_ms = r.pull.as_millis() as u64, "post-copy pull ended: every page is here");
        })
        .map_err(|f| f.error)
    } else {
        ferry_ch::relay::relay(
            &mut ctl.stream,
            MemoryConnections::Given(data),
            vm_id,
            open_dest,
            &hold,
        )
        .map(|r| {
            tracing::info!(vm = %vm_id, bytes = r.bytes_landed, connections = r.memory_connections, "Cloud Hypervisor VM landed in Ferry's memfds and runs");
        })
        .map_err(|f| f.error)
    };
    let answer = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("the receive thread panicked"))?;
    outcome?;
    let a = answer?;
    if !a.ok() {
        bail!("the destination CH reported {} {}", a.status, a.body);
    }
    Ok(())
}
