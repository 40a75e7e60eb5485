//! The destination side of a migration: check the offer, prepare memory, receive windows,
//! and carry out the [`DestSession`]'s commands (load, Ready, record, start, discard,
//! hold). What may happen to the VM is the session's rule; this module does the I/O.

use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use ferry_engine::session::{DestEvent, DestPhase, DestSession, Failure, FailureKind, SessionId};
use ferry_proto::common::{Message, RegionInfo, MAX_FRAME};
use ferry_proto::frame::{read_msg, write_msg};
use ferry_proto::peer::PeerMsg;
use ferry_proto::vmm::VmmMsg;
use ferry_tcp_fallback::TcpReceiver;
use ferry_verbs::RdmaPuller;

use crate::context::Daemon;
use crate::dest_exec::{settle_vmm, Executor};
use crate::intake::{expect_data, prepare, Intake};
use crate::peer::{refuse, Control, PeerStream};
use crate::queue::Slot;
use crate::registry::WaitingVmm;
use crate::vmm::request;
use ferry_proto::records::{self};

/// Longest silence on the control connection between steps.
const CONTROL_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// How long a replayed decision waits for the old control connection's handler to
/// notice the link is gone and park the loaded VM.
const SETTLE_WAIT: Duration = Duration::from_secs(30);

/// How long after this daemon starts a VMM holding a loaded VM may still be reattaching
/// (VMMs retry every half second): until then "nothing of that session here" is not an
/// answer a release may rely on.
const REATTACH_GRACE: Duration = Duration::from_secs(10);

/// Handles an authenticated control connection carrying an offer.
///
/// # Errors
///
/// Whatever ended the migration; the waiting VMM gets the VM only on `Commit`.
pub fn run(d: &Arc<Daemon>, mut ctl: Control, offer: PeerMsg) -> anyhow::Result<()> {
    let PeerMsg::Offer {
        vm_id,
        page_size,
        regions,
        channels,
        transports,
        cpu_profile,
        session,
        backing_page_size,
    } = offer
    else {
        bail!("not an offer");
    };
    let checked =
        crate::offer::check_offer(page_size, &regions, channels, transports, backing_page_size);
    if let Err(reason) = checked {
        return Err(refuse(&mut ctl.stream, reason));
    }
    let Some(_slot) = admit(d, &mut ctl, &vm_id)? else {
        return Ok(());
    };
    let t0 = std::time::Instant::now();
    let peer = peer_ip(&ctl);
    let Some(vmm) = d.registry.take_waiting(&vm_id) else {
        return Err(refuse(
            &mut ctl.stream,
            format!("no VMM on this host waits for VM {vm_id}"),
        ));
    };
    // The waiting VMM decides whether this host can run the VM, before any memory moves.
    if let Err(e) = request(&vmm.link, &VmmMsg::CheckCompat { cpu_profile }, &[]) {
        let _ = d.registry.add_waiting(&vm_id, vmm);
        return Err(refuse(
            &mut ctl.stream,
            format!("the destination cannot run this VM: {e}"),
        ));
    }
    d.registry
        .begin_incoming(session, &vm_id, ctl.stream.tcp().try_clone().ok());
    let mut s = DestSession::new();
    let mut ex_vmm = Some(vmm);
    let res = receive(
        d,
        &mut ctl,
        &vm_id,
        &regions,
        (channels, transports, backing_page_size),
        session,
        &mut s,
        &mut ex_vmm,
    );
    if let Err(e) = &res {
        tracing::warn!(vm = %vm_id, %session, "incoming migration: {e:#}");
        let lost = e
            .downcast_ref::<ferry_proto::ProtoError>()
            .is_some_and(ferry_proto::ProtoError::is_disconnect);
        // Only the source's own `Abort` discards a loaded VM: a broken, corrupted or
        // out-of-step link leaves it held for the source's decision.
        s.handle(if lost {
            DestEvent::LinkLost
        } else {
            DestEvent::Failed(Failure::new(FailureKind::PeerRefused, format!("{e:#}")))
        });
        let mut ex = Executor {
            d,
            vm_id: vm_id.clone(),
            session,
            vmm: ex_vmm.take(),
            ctl: (!lost).then_some(&mut ctl.stream),
            landing: None,
            regions: regions.clone(),
            intake: None,
        };
        let held = ex.drive(&mut s);
        ex_vmm = ex.vmm.take();
        finished(d, &vm_id, &peer, &s, t0);
        // Parked before the session stops counting as incoming: a decision arriving in
        // between finds one or the other (`Registry::take_held`).
        settle_vmm(d, &vm_id, session, s, ex_vmm, held);
        d.registry.end_incoming(session);
        return res;
    }
    let held = matches!(s.phase(), DestPhase::Held);
    finished(d, &vm_id, &peer, &s, t0);
    settle_vmm(d, &vm_id, session, s, ex_vmm, held);
    d.registry.end_incoming(session);
    res
}

/// An incoming migration's end, for status and metrics: "committed" once the VM runs
/// here, else what the session ended in (discarded, held, start-failed).
fn finished(d: &Daemon, vm_id: &str, peer: &str, s: &DestSession, t0: std::time::Instant) {
    let state = match s.phase() {
        DestPhase::Running(_) => "committed",
        p => p.name(),
    };
    record_incoming(d, vm_id, peer, state, t0, String::new());
}

/// An incoming migration (of any VMM) ended in `state`: metrics and status learn it.
pub fn record_incoming(
    d: &Daemon,
    vm_id: &str,
    peer: &str,
    state: &str,
    t0: std::time::Instant,
    error: String,
) {
    let total = t0.elapsed();
    d.metrics.finished("incoming", state, 0, None, total);
    d.queue.record(crate::queue::Finished {
        vm_id: vm_id.to_owned(),
        direction: "incoming",
        peer: peer.to_owned(),
        state: state.to_owned(),
        priority: None,
        rounds: 0,
        bytes: 0,
        downtime_ms: None,
        total_ms: total.as_secs_f64() * 1e3,
        ended_at: std::time::SystemTime::now(),
        error,
    });
}

/// A slot among `max_incoming` for an offered migration; without one (full, or shutting
/// down) the source is told `Busy` and keeps the migration queued, and `None` comes back.
///
/// # Errors
///
/// `Busy` could not be sent.
pub fn admit(d: &Daemon, ctl: &mut Control, vm_id: &str) -> anyhow::Result<Option<Slot>> {
    use std::sync::atomic::Ordering;
    let slot = (!d.stopping.load(Ordering::Acquire))
        .then(|| Slot::take(&d.incoming, d.cfg.max_incoming))
        .flatten();
    if slot.is_none() {
        let running = d.incoming.load(Ordering::Relaxed);
        tracing::info!(vm = %vm_id, running, limit = d.cfg.max_incoming, "incoming migration refused for now: busy");
        write_msg(
            &mut ctl.stream,
            &PeerMsg::Busy {
                running: u32::try_from(running).unwrap_or(u32::MAX),
                limit: u32::try_from(d.cfg.max_incoming).unwrap_or(u32::MAX),
            },
        )?;
    }
    Ok(slot)
}

/// The source's address, for status.
pub fn peer_ip(ctl: &Control) -> String {
    ctl.stream
        .tcp()
        .peer_addr()
        .map(|a| a.ip().to_string())
        .unwrap_or_default()
}

#[allow(clippy::too_many_arguments)]
fn receive(
    d: &Daemon,
    ctl: &mut Control,
    vm_id: &str,
    regions: &[RegionInfo],
    (channels, transports, backing_page_size): (u16, u8, u64),
    session: SessionId,
    s: &mut DestSession,
    vmm: &mut Option<WaitingVmm>,
) -> anyhow::Result<()> {
    // Failures before any data moved are told to the source, with the reason.
    let mut landing = match prepare(vm_id, regions, backing_page_size, d.cfg.populate) {
        Ok(l) => l,
        Err(e) => {
            return Err(refuse(
                &mut ctl.stream,
                format!("the destination cannot prepare the VM's memory: {e:#}"),
            ))
        }
    };
    tracing::info!(vm = %vm_id, ms = landing.prepare.as_millis() as u64, populate = ?d.cfg.populate, "destination memory prepared");
    // Expected before `Accept` leaves: the source connects as soon as it reads it.
    let expected = expect_data(&d.registry, session, ctl.key, channels);
    write_msg(
        &mut ctl.stream,
        &PeerMsg::Accept {
            prepare_us: landing.prepare.as_micros() as u64,
        },
    )?;
    #[cfg(feature = "fault-injection")]
    crate::faults::hold("accept-sent");
    let streams = match expected.collect() {
        Ok(s) => s,
        Err(e) => return Err(refuse(&mut ctl.stream, format!("{e:#}"))),
    }
    .into_iter()
    .map(PeerStream::into_channel)
    .collect::<std::io::Result<Vec<_>>>()?;
    let local = ctl.stream.tcp().local_addr().ok().map(|a| a.ip());
    let placement = crate::placement::for_connection(&d.cfg.data_cpus, local);
    tracing::info!(vm = %vm_id, placement = %placement.why, "data threads placed");
    // This thread pulls with RDMA READ when the source offers it.
    ferry_tcp_fallback::bind_current_thread(&placement.cpus);
    let mut intake = Intake {
        tcp: Some(TcpReceiver::bound(
            streams,
            Arc::clone(&landing.mem),
            Arc::clone(&landing.landed),
            placement.cpus,
        )?),
        rdma: None,
    };
    ctl.stream
        .tcp()
        .set_read_timeout(Some(CONTROL_IDLE_TIMEOUT))?;
    let rdma_offered = transports & ferry_proto::peer::OFFER_RDMA != 0;
    let mut last_round = (0u32, false);
    loop {
        let msg = read_msg(&mut ctl.stream, MAX_FRAME)?;
        // Data moves only before the state blob: after it the memory is the VMM's.
        let receiving = s.phase() == &DestPhase::Receiving;
        let event = match msg {
            PeerMsg::RdmaOffer { .. } | PeerMsg::RoundStart { .. } if !receiving => {
                bail!("{} after the state blob", msg.name())
            }
            PeerMsg::RdmaOffer { .. } if !rdma_offered => {
                bail!("RdmaOffer, but the offer did not include RDMA")
            }
            PeerMsg::RdmaOffer { blob } => {
                let answer = match RdmaPuller::new(&landing.mem, &blob) {
                    Ok((p, answer)) => {
                        #[cfg(feature = "fault-injection")]
                        let p = crate::faults::rdma_puller(p);
                        tracing::info!(vm = %vm_id, rdma = %p.describe(), "pulling with RDMA READ");
                        intake.rdma = Some(p);
                        PeerMsg::RdmaAnswer { blob: answer }
                    }
                    Err(e) => PeerMsg::RdmaUnavailable {
                        reason: e.to_string(),
                    },
                };
                write_msg(&mut ctl.stream, &answer)?;
                continue;
            }
            PeerMsg::RdmaUnavailable { reason } => {
                tracing::info!(vm = %vm_id, %reason, "the source turned RDMA down; TCP it is");
                intake.rdma = None;
                continue;
            }
            PeerMsg::RoundStart { round, final_round } => {
                // Windows are numbered upwards (a window a failed transport handed back is
                // sent again under its number); none follows the final round but its own.
                if round < last_round.0 || (last_round.1 && (round != last_round.0 || !final_round))
                {
                    bail!(
                        "window {round} (final: {final_round}) after window {} (final: {})",
                        last_round.0,
                        last_round.1
                    );
                }
                last_round = (round, final_round);
                let reply = if intake.rdma.is_some() {
                    intake.rdma_window(&mut ctl.stream, &landing.mem, &landing.landed, round)?
                } else {
                    intake.tcp_window(round)?
                };
                write_msg(&mut ctl.stream, &reply)?;
                continue;
            }
            PeerMsg::StateBlob { blob } => DestEvent::StateArrived(blob),
            PeerMsg::Commit => DestEvent::Commit,
            PeerMsg::Abort { reason } => DestEvent::Abort(format!("the source aborted: {reason}")),
            other => bail!("unexpected {} from the source", other.name()),
        };
        s.handle(event);
        let mut ex = Executor {
            d,
            vm_id: vm_id.to_owned(),
            session,
            vmm: vmm.take(),
            ctl: Some(&mut ctl.stream),
            landing: Some(&mut landing),
            regions: regions.to_vec(),
            intake: Some(&mut intake),
        };
        let held = ex.drive(s);
        *vmm = ex.vmm.take();
        if held || s.phase().is_settled() {
            return Ok(());
        }
    }
}

/// Settles a session with the source's replayed decision (on a fresh connection).
///
/// # Errors
///
/// Writing the answer failed.
pub fn settle(
    d: &Arc<Daemon>,
    mut ctl: Control,
    session: SessionId,
    commit: bool,
) -> anyhow::Result<()> {
    // The replay may arrive before this side noticed the old link die (a half-open
    // connection can look alive for minutes): cut it, then wait for its handler to park
    // the VM.
    d.registry.cut_incoming(session);
    let held = d.registry.take_held(session, SETTLE_WAIT);
    let (vm_id, mut s, vmm) = match held {
        Some(h) => (h.vm_id, h.session, h.vmm),
        None => match records::find_incoming(&d.cfg.state_dir, session) {
            Some((vm_id, rec)) => (vm_id, DestSession::restored(Some(rec.record), false), None),
            None if !commit && d.started.elapsed() < REATTACH_GRACE => {
                return Err(refuse(
                    &mut ctl.stream,
                    "this sidecar just started: a VMM holding that session's VM may not have reattached yet; try again".into(),
                ))
            }
            None if !commit => {
                // Nothing of that session here: that is what a release asks for.
                tracing::info!(%session, "released: no copy of that session is held here");
                write_msg(&mut ctl.stream, &PeerMsg::Discarded)?;
                return Ok(());
            }
            None => {
                return Err(refuse(
                    &mut ctl.stream,
                    "no VM is held for that session here (the VMM holding it may not have reattached yet)".into(),
                ))
            }
        },
    };
    s.handle(if commit {
        DestEvent::Commit
    } else {
        DestEvent::Abort("the source rolled the decision back".into())
    });
    let mut ex = Executor {
        d,
        vm_id: vm_id.clone(),
        session,
        vmm,
        ctl: Some(&mut ctl.stream),
        landing: None,
        regions: Vec::new(),
        intake: None,
    };
    ex.drive(&mut s);
    let vmm = ex.vmm.take();
    match (commit, s.phase()) {
        (true, DestPhase::Running(_)) => {
            tracing::info!(vm = %vm_id, %session, "the replayed Commit was carried out")
        }
        (false, DestPhase::Discarded) => {
            tracing::info!(vm = %vm_id, %session, "replayed Abort: the held VM is discarded")
        }
        (_, phase) => {
            tracing::warn!(vm = %vm_id, %session, commit, phase = phase.name(), "a replayed decision left the VM {}", phase.name())
        }
    }
    settle_vmm(d, &vm_id, session, s, vmm, false);
    Ok(())
}

/// A VMM reattached holding the loaded VM of `session`: give it to the held session, or
/// rebuild the session from this host's record.
pub fn reattach(d: &Arc<Daemon>, vm_id: &str, session: SessionId, vmm: WaitingVmm) {
    let Some(vmm) = d.registry.attach_held(session, vmm) else {
        tracing::info!(vm = vm_id, %session, "the VMM holding the loaded VM reattached");
        return;
    };
    let rec = records::read_incoming(&d.cfg.state_dir, vm_id)
        .ok()
        .flatten()
        .filter(|r| r.session == session)
        .map(|r| r.record);
    tracing::warn!(vm = vm_id, %session, record = ?rec.as_ref().map(|r| r.name()), "a VMM reattached holding a loaded VM this daemon did not know");
    // A replayed decision arriving meanwhile waits for this to end (take_held).
    d.registry.begin_incoming(session, vm_id, None);
    let mut s = DestSession::restored(rec, true);
    let mut ex = Executor {
        d,
        vm_id: vm_id.to_owned(),
        session,
        vmm: Some(vmm),
        ctl: None,
        landing: None,
        regions: Vec::new(),
        intake: None,
    };
    ex.drive(&mut s);
    let vmm = ex.vmm.take();
    let held = s.phase() == &DestPhase::Held;
    settle_vmm(d, vm_id, session, s, vmm, held);
    d.registry.end_incoming(session);
}

/// What `ferry recover` on a destination host reports (it settles nothing: the source
/// decides).
pub fn describe_held(d: &Daemon, vm_id: &str) -> Option<String> {
    d.registry.held_session_of(vm_id).map(|s| {
        format!("VM {vm_id} is held here (session {s}) for its source's decision; run `ferry recover {vm_id}` on the source host")
    })
}
