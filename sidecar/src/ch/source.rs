//! The source side of a CH migration: the source CH sent to this sidecar (pre-copy over a
//! local TCP port, post-copy in local mode over a Unix socket), carried to the destination,
//! the decision recorded and the keeper handed the connection before `Complete`.

use std::io::Write;
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
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
use crate::peer::{connect_control, connect_data, PeerStream};
use crate::queue::Job;
use crate::source::Reporter;
use crate::summary::Summary;

use super::keep::{keeper_path, start_keeper, KeeperGuard};
use crate::ch_vms::PEER_IDLE;

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
    let send_buffer = crate::peer::data_send_buffer(ctl.stream.tcp(), req.channels);
    for ch in 0..req.channels {
        let s = connect_data(&d.auth, &req.to, session, &ctl.key, ch, send_buffer)?;
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
