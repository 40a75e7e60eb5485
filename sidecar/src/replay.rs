//! Delivering a recorded decision on a fresh authenticated connection: the link broke in
//! the commit window, the daemon restarted, or the operator ran `ferry recover`. The
//! retry rule (every second, through refused connections and restarted peers, for the
//! replay window) is the session's; this is one attempt.
//!
//! (A daemon that starts with a committed, unconfirmed decision on disk replays it on its
//! own: `outgoing::resume_recorded`.) A fenced VMM that re-registers learns from the
//! record what became of its VM ([`settle_fenced`]).
//!
//! An aborted migration whose destination may still hold a loaded copy leaves a pending
//! release on disk ([`queue_release`]); the releaser thread ([`spawn_releaser`]) tells
//! the destination to discard it (`Decision{commit: false}`), with back-off, until it
//! answers. A record still saying "undecided" when no migration of the VM runs here is a
//! session that died before deciding: it becomes such a release ([`settle_undecided`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;

use ferry_engine::session::{DecisionState, Failure, FailureKind, SessionId, SourceEvent};
use ferry_proto::common::MAX_FRAME;
use ferry_proto::frame::{read_msg, write_msg};
use ferry_proto::peer::PeerMsg;
use ferry_proto::vmm::{Fence, VmmMsg};

use crate::context::Daemon;
use crate::offer::Negotiated;
use crate::peer::connect_control;
use crate::registry::SourceVm;
use crate::vmm::request_ok;
use ferry_proto::records::{self, Decision, RecordError, Release};

/// How long the destination may take to answer a replayed decision: longer than its own
/// wait for its VMM's `Start` (`VMM_REPLY_TIMEOUT`), so a slow start is answered, not cut.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(crate::vmm::VMM_REPLY_TIMEOUT.as_secs() + 30);

/// The releaser's back-off between attempts at one release: doubling, up to this.
const RELEASE_BACKOFF_MAX: Duration = Duration::from_secs(60);

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

/// A fenced VMM that re-registered while its migration was being settled, and was not
/// stopped by it: the VM runs elsewhere now.
pub fn stop_reattached(d: &Daemon, vm_id: &str) {
    if let Some(v) = d.registry.take_reattached(vm_id, Duration::ZERO) {
        if let Err(e) = request_ok(&v.link, &VmmMsg::Stop) {
            tracing::warn!(vm = vm_id, "the VMM did not stop cleanly: {e}");
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
        Some(DecisionState::Aborted | DecisionState::Undecided) | None => {
            // No commit was recorded (the sidecar died before it could be): the VM is
            // still this host's. Resume it, and have the destination discard its copy.
            tracing::warn!(vm = vm_id, session = %fence.session, "fenced VMM re-registered and no commit decision is recorded: resuming it here");
            match request_ok(&vm.link, &VmmMsg::Resume) {
                Ok(()) => vm.fence = None,
                Err(e) => tracing::error!(vm = vm_id, "the VMM did not resume: {e}"),
            }
            if mine.is_none_or(|r| r.state == DecisionState::Undecided) {
                let dec = Decision {
                    state: DecisionState::Undecided,
                    session: fence.session,
                    to: fence.to.clone(),
                };
                if let Err(e) = settle_undecided(d, vm_id, &dec) {
                    tracing::error!(vm = vm_id, "{:#}", anyhow::Error::new(e));
                }
            }
            Some(vm)
        }
    }
}

/// Hands a destination's possible copy of the aborted `session` to the releaser,
/// durably: the pending release survives a restart of this daemon.
///
/// # Errors
///
/// The release could not be recorded (the caller keeps "undecided" on disk instead).
pub fn queue_release(
    d: &Daemon,
    vm_id: &str,
    to: &str,
    session: SessionId,
) -> Result<(), RecordError> {
    let r = Release {
        session,
        vm_id: vm_id.to_owned(),
        to: to.to_owned(),
    };
    records::write_release(&d.cfg.state_dir, &r)?;
    tracing::info!(vm = vm_id, %session, to, "the destination may hold a loaded copy: it will be told to discard it");
    Ok(())
}

/// A VM whose record says "undecided" while no migration of it runs here: that session
/// died before it decided. The VM is this host's; its destination is told to discard
/// (a pending release), then the record says "aborted".
///
/// # Errors
///
/// Recording the release or the abort failed; "undecided" stays, and is settled again
/// at the next start or `ferry recover`.
pub fn settle_undecided(d: &Daemon, vm_id: &str, dec: &Decision) -> Result<(), RecordError> {
    queue_release(d, vm_id, &dec.to, dec.session)?;
    records::write_decision(
        &d.cfg.state_dir,
        vm_id,
        &Decision {
            state: DecisionState::Aborted,
            ..dec.clone()
        },
    )
}

/// One attempt at a release: `Ok` once the destination holds no copy of the session.
///
/// # Errors
///
/// Unreachable, or an answer other than `Discarded`.
pub fn release_once(d: &Daemon, r: &Release) -> anyhow::Result<()> {
    match deliver(d, &r.to, r.session, false)? {
        PeerMsg::Discarded => {
            records::remove_release(&d.cfg.state_dir, r.session);
            tracing::info!(vm = %r.vm_id, session = %r.session, to = %r.to, "released: the destination holds no copy of the aborted migration");
            Ok(())
        }
        PeerMsg::Refused { reason } => bail!("{} refused to discard: {reason}", r.to),
        other => bail!(
            "{} answered {} to the release",
            r.to,
            ferry_proto::common::Message::name(&other)
        ),
    }
}

/// `ferry recover`: attempts every pending release of `vm_id` now; a line for each.
pub fn release_vm_now(d: &Daemon, vm_id: &str) -> Vec<String> {
    let (pending, _) = records::pending_releases(&d.cfg.state_dir);
    pending
        .iter()
        .filter(|r| r.vm_id == vm_id)
        .map(|r| match release_once(d, r) {
            Ok(()) => format!("{} discarded its copy (session {})", r.to, r.session),
            Err(e) => format!(
                "{} may still hold a copy (session {}): {e:#}; retried in the background",
                r.to, r.session
            ),
        })
        .collect()
}

/// Starts the releaser: every pending release in the state directory is attempted, each
/// with its own back-off (1 s doubling to a minute), until the destination answers.
pub fn spawn_releaser(d: &Arc<Daemon>) {
    let (_, bad) = records::pending_releases(&d.cfg.state_dir);
    for e in bad {
        tracing::error!("{:#}", anyhow::Error::new(e));
    }
    let d = Arc::clone(d);
    std::thread::spawn(move || {
        let mut next: HashMap<SessionId, (Instant, Duration)> = HashMap::new();
        loop {
            let (pending, _) = records::pending_releases(&d.cfg.state_dir);
            next.retain(|s, _| pending.iter().any(|r| r.session == *s));
            for r in pending {
                let now = Instant::now();
                let (due, backoff) = next
                    .get(&r.session)
                    .copied()
                    .unwrap_or((now, Duration::ZERO));
                if now < due {
                    continue;
                }
                if let Err(e) = release_once(&d, &r) {
                    let backoff = (backoff * 2).clamp(Duration::from_secs(1), RELEASE_BACKOFF_MAX);
                    tracing::warn!(vm = %r.vm_id, session = %r.session, retry_in_s = backoff.as_secs(), "release not delivered yet: {e:#}");
                    next.insert(r.session, (Instant::now() + backoff, backoff));
                } else {
                    next.remove(&r.session);
                }
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    });
}

/// How long a destination that may hold a loaded copy has to confirm `Abort` (its VMM
/// drops the VM: no more than a request).
const ABORT_CONFIRM_TIMEOUT: Duration = Duration::from_secs(15);

/// `Abort` on the control link; with `confirm`, waits for `Discarded` (a `Ready` the
/// destination sent before it read the `Abort` comes first).
pub fn abort_peer(
    n: &mut Negotiated,
    reason: String,
    confirm: bool,
) -> anyhow::Result<SourceEvent> {
    write_msg(&mut n.ctl.stream, &PeerMsg::Abort { reason })?;
    if !confirm {
        return Ok(SourceEvent::PeerTold);
    }
    n.ctl
        .stream
        .tcp()
        .set_read_timeout(Some(ABORT_CONFIRM_TIMEOUT))?;
    for _ in 0..2 {
        match read_msg(&mut n.ctl.stream, MAX_FRAME)? {
            PeerMsg::Discarded => return Ok(SourceEvent::PeerTold),
            PeerMsg::Ready { .. } => continue,
            other => return Err(ferry_proto::peer::unexpected("Discarded", other).into()),
        }
    }
    anyhow::bail!("the destination did not confirm the abort")
}

/// The destination's answer to a decision, as an event.
pub fn decision_answer(m: PeerMsg) -> Result<SourceEvent, Failure> {
    match m {
        PeerMsg::Running { detail } => Ok(SourceEvent::PeerRunning(detail)),
        PeerMsg::StartFailed { reason } => Ok(SourceEvent::PeerStartFailed(reason)),
        PeerMsg::Discarded => Ok(SourceEvent::PeerDiscarded),
        PeerMsg::Refused { reason } => Err(Failure::new(
            FailureKind::PeerRefused,
            format!("the destination refused: {reason}"),
        )),
        other => Err(Failure::new(
            FailureKind::PeerRefused,
            format!(
                "the destination answered {} to the decision",
                ferry_proto::common::Message::name(&other)
            ),
        )),
    }
}
