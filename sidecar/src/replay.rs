//! Delivering a recorded decision on a fresh authenticated connection: the link broke in
//! the commit window, the daemon restarted, or the operator ran `ferry recover`. The
//! retry rule (every second, through refused connections and restarted peers, for the
//! replay window) is the session's; this is one attempt.
//!
//! A daemon that starts with a committed, unconfirmed decision on disk replays it on its
//! own ([`resume_recorded`]), and a fenced VMM that re-registers learns from the record
//! what became of its VM ([`settle_fenced`]).

use std::sync::Arc;
use std::time::Duration;

use ferry_engine::session::{DecisionState, SessionId, SourceOutcome, SourceSession};
use ferry_proto::common::MAX_FRAME;
use ferry_proto::frame::{read_msg, write_msg};
use ferry_proto::peer::PeerMsg;
use ferry_proto::vmm::{Fence, VmmMsg};

use crate::daemon::Daemon;
use crate::peer::connect_control;
use crate::registry::SourceVm;
use crate::source::Driver;
use crate::vmm::request_ok;
use ferry_proto::records::{self, Decision};

/// How long the destination may take to answer a replayed decision (it may start the VM).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// One attempt to deliver `commit` for `session` to `to`; returns the destination's answer.
///
/// # Errors
///
/// Connection, authentication and protocol errors.
pub fn deliver(d: &Daemon, to: &str, session: SessionId, commit: bool) -> anyhow::Result<PeerMsg> {
    let mut c = connect_control(&d.auth, to)?;
    c.stream.tcp().set_read_timeout(Some(ANSWER_TIMEOUT))?;
    write_msg(&mut c.stream, &PeerMsg::Decision { session, commit })?;
    Ok(read_msg(&mut c.stream, MAX_FRAME)?)
}

/// Settles a recorded, unconfirmed decision with a session of its own (`ferry recover`,
/// or a restarted daemon): deliver it (or roll it back), record the outcome, stop (or
/// resume) the VM if its VMM is registered. Returns the outcome and a line for the
/// operator.
pub fn settle_recorded(
    d: &Daemon,
    vm_id: &str,
    dec: &Decision,
    roll_back: Option<bool>,
    window: Duration,
) -> (SourceOutcome, String) {
    let mut cfg = crate::outgoing::config_of_recovery(d, window);
    cfg.replay_window = window;
    let mut s = match roll_back {
        None => SourceSession::deliver_recorded(cfg),
        Some(force) => SourceSession::roll_back(cfg, force),
    };
    let vm = match d.registry.begin_settle(vm_id, &dec.to, dec.session) {
        Ok(vm) => vm,
        Err(e) => return (SourceOutcome::CommittedUnconfirmed, e),
    };
    let had_vmm = vm.is_some();
    let mut drv = Driver::new(d, vm_id, &dec.to, dec.session, vm);
    drv.vmm_alive = had_vmm;
    drv.run(&mut s);
    let outcome = s
        .outcome()
        .cloned()
        .unwrap_or(SourceOutcome::CommittedUnconfirmed);
    let r = s.report();
    let mut line = match &outcome {
        SourceOutcome::Committed => format!(
            "the migration of {vm_id} to {} is confirmed: {}",
            dec.to,
            r.peer_detail.clone().unwrap_or_default()
        ),
        SourceOutcome::Aborted => format!(
            "rolled back: the destination {} holds no copy; VM {vm_id} runs here again",
            dec.to
        ),
        SourceOutcome::StartFailed(reason) => format!(
            "the destination {} still cannot start VM {vm_id}: {reason}",
            dec.to
        ),
        _ => r.error.clone().unwrap_or_else(|| "not settled".into()),
    };
    for w in &r.warnings {
        line.push_str(&format!("; {w}"));
    }
    // The VM goes back to the registry unless it is gone for good.
    let keep = match outcome {
        SourceOutcome::Committed => None,
        _ if !drv.vmm_alive => None,
        _ => drv.vm.take(),
    };
    if outcome == SourceOutcome::Committed {
        stop_reattached(d, vm_id);
    }
    d.registry.end_outgoing(vm_id, keep);
    (outcome, line)
}

/// A fenced VMM that re-registered while its migration was being settled, and was not
/// stopped by it: the VM runs elsewhere now.
pub fn stop_reattached(d: &Daemon, vm_id: &str) {
    if let Some(v) = d.registry.take_reattached(vm_id, Duration::ZERO) {
        if let Err(e) = request_ok(&v.link, &VmmMsg::Stop) {
            tracing::warn!(vm = vm_id, "the VMM did not stop cleanly: {e}");
        }
    }
}

/// A restarted daemon: every VM with a committed, unconfirmed decision gets its
/// decision replayed (in the background, for the replay window).
pub fn resume_recorded(d: &Arc<Daemon>) {
    let Ok(entries) = std::fs::read_dir(&d.cfg.state_dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(vm_id) = name.strip_suffix(".decision") else {
            continue;
        };
        if ferry_proto::common::check_vm_id(vm_id).is_err() {
            continue;
        }
        match records::read_decision(&d.cfg.state_dir, vm_id) {
            Ok(Some(dec)) if dec.state == DecisionState::Committed => {
                tracing::warn!(vm = vm_id, session = %dec.session, to = %dec.to, "a committed, unconfirmed decision is on disk: replaying it");
                let d = Arc::clone(d);
                let vm_id = vm_id.to_owned();
                std::thread::spawn(move || {
                    // Give a fenced VMM a moment to re-register so it can be stopped.
                    std::thread::sleep(Duration::from_secs(1));
                    let (o, line) = settle_recorded(&d, &vm_id, &dec, None, d.cfg.replay_window);
                    tracing::info!(vm = %vm_id, outcome = o.name(), "{line}");
                });
            }
            Ok(_) => {}
            Err(e) => tracing::error!(vm = vm_id, "{:#}", anyhow::Error::new(e)),
        }
    }
}

/// A VMM re-registered paused under `fence` while no migration of its VM runs here: the
/// decision record says what became of it. Returns the VM to register (or `None` when it
/// was stopped for good).
pub fn settle_fenced(
    d: &Arc<Daemon>,
    vm_id: &str,
    fence: &Fence,
    mut vm: SourceVm,
) -> Option<SourceVm> {
    let record = records::read_decision(&d.cfg.state_dir, vm_id)
        .ok()
        .flatten();
    let mine = record.filter(|r| r.session == fence.session);
    match mine.as_ref().map(|r| r.state) {
        Some(DecisionState::Confirmed) => {
            tracing::info!(
                vm = vm_id,
                "fenced VMM re-registered; its VM runs at {}: stopping it here",
                fence.to
            );
            if let Err(e) = request_ok(&vm.link, &VmmMsg::Stop) {
                tracing::warn!(vm = vm_id, "the VMM did not stop cleanly: {e}");
            }
            None
        }
        Some(DecisionState::Committed) => {
            tracing::warn!(vm = vm_id, "fenced VMM re-registered; its commit decision is not confirmed yet: it stays paused (replay in progress, or `ferry recover {vm_id}`)");
            Some(vm)
        }
        Some(DecisionState::Aborted) | None => {
            // No decision was recorded (the sidecar died before it could be): the VM is
            // still this host's. Resume it, and tell the destination to discard its copy.
            tracing::warn!(vm = vm_id, session = %fence.session, "fenced VMM re-registered and no commit decision is recorded: resuming it here");
            match request_ok(&vm.link, &VmmMsg::Resume) {
                Ok(()) => vm.fence = None,
                Err(e) => tracing::error!(vm = vm_id, "the VMM did not resume: {e}"),
            }
            if mine.is_none() {
                let d = Arc::clone(d);
                let (to, session) = (fence.to.clone(), fence.session);
                let vm_id = vm_id.to_owned();
                std::thread::spawn(move || {
                    let r = records::write_decision(
                        &d.cfg.state_dir,
                        &vm_id,
                        &Decision {
                            state: DecisionState::Aborted,
                            session,
                            to: to.clone(),
                        },
                    );
                    if let Err(e) = r {
                        tracing::warn!(vm = %vm_id, "recording the abort: {e:#}");
                    }
                    for _ in 0..5 {
                        match deliver(&d, &to, session, false) {
                            Ok(PeerMsg::Discarded) => return,
                            Ok(other) => {
                                tracing::warn!(vm = %vm_id, "the destination answered {other:?} to the abort");
                                return;
                            }
                            Err(e) => {
                                tracing::warn!(vm = %vm_id, "telling the destination to discard: {e:#}")
                            }
                        }
                        std::thread::sleep(Duration::from_secs(2));
                    }
                });
            }
            Some(vm)
        }
    }
}
