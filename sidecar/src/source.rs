//! The source side of a migration: a loop that carries out the [`SourceSession`]'s
//! commands against the VMM, the peer and the transports. Every rule (windows, log
//! reads, convergence, fallback, verification, the commit point, replay) is the
//! session's; this module only does the I/O and reports what happened.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use ferry_engine::bitmap::DirtyBitmap;
use ferry_engine::session::{
    DecisionState, Failure, FailureKind, SessionId, SourceCommand, SourceEvent, SourceSession,
};
use ferry_proto::cli::{CliMsg, MigrateRequest};
use ferry_proto::common::{Message, MAX_FRAME};
use ferry_proto::frame::{read_msg, write_msg};
use ferry_proto::mem::GuestRegion;
use ferry_proto::peer::PeerMsg;
use ferry_proto::vmm::{Fence, VmmMsg};

use crate::context::Daemon;
use crate::memory::{digest_of, memory_shrank};
use crate::offer::{negotiate, DestinationBusy, Negotiated};
use crate::peer::failure_kind;
use crate::queue::Job;
use crate::registry::SourceVm;
use crate::replay;
use crate::vmm::{request, request_ok, VmmError};
use ferry_proto::records::{self, Decision};

/// Sends progress to whoever asked for the migration.
pub type Reporter<'a> = &'a (dyn Fn(CliMsg) + Sync);

/// A VMM reply that does not answer `req`, named (never printed whole: a reply may carry
/// megabytes), as the failure the session sees.
fn unexpected(req: &VmmMsg, got: &VmmMsg) -> Failure {
    VmmError::Unexpected {
        request: req.name(),
        got: got.name(),
    }
    .failure()
}

/// How long a VMM that lost its link may take to re-register before `Stop`/`Resume`
/// gives up on it (it learns the outcome from the record when it comes back later).
const REATTACH_WAIT: Duration = Duration::from_secs(5);

/// One migration's I/O.
pub struct Driver<'a> {
    pub(crate) d: &'a Daemon,
    pub(crate) vm_id: String,
    pub(crate) to: String,
    pub(crate) session: SessionId,
    /// The VM, while this driver holds it (its link may have died).
    pub(crate) vm: Option<SourceVm>,
    pub(crate) vmm_alive: bool,
    pub(crate) net: Option<Negotiated>,
    pub(crate) req: Option<&'a MigrateRequest>,
    pub(crate) report: Option<Reporter<'a>>,
    /// The queue's job (a migration; not a settlement): cancel, bandwidth, live numbers.
    pub(crate) job: Option<Arc<Job>>,
    /// The destination answered `Busy` to the offer: the migration goes back to the queue.
    pub(crate) dest_busy: Option<String>,
    pub(crate) total: AtomicU64,
    pub(crate) round_bytes: (u32, u64),
    pub(crate) t0: Instant,
    /// The memfds' holes before negotiating (an RDMA registration allocates them).
    pub(crate) holes_before: Vec<DirtyBitmap>,
}

impl<'a> Driver<'a> {
    /// A driver for `vm_id`'s migration `session` to `to`.
    pub fn new(
        d: &'a Daemon,
        vm_id: &str,
        to: &str,
        session: SessionId,
        vm: Option<SourceVm>,
    ) -> Self {
        Self {
            d,
            vm_id: vm_id.to_owned(),
            to: to.to_owned(),
            session,
            vm,
            vmm_alive: true,
            net: None,
            req: None,
            report: None,
            job: None,
            dest_busy: None,
            total: AtomicU64::new(0),
            round_bytes: (0, 0),
            t0: Instant::now(),
            holes_before: Vec::new(),
        }
    }

    /// Runs `s` to its end.
    pub fn run(&mut self, s: &mut SourceSession) {
        while let Some(cmd) = s.poll() {
            let phase = s.phase().name();
            self.d
                .registry
                .update_outgoing(&self.vm_id, |o| o.phase = phase);
            let round = s.current_round();
            if let Some(job) = &self.job {
                s.set_rate_cap(job.flow.rate());
                let e = s.estimate();
                job.update(|l| {
                    l.phase = phase;
                    if let Some((r, _, _)) = round {
                        l.round = r;
                    }
                    l.dirty_rate = e.dirty_rate;
                    l.expected_downtime = e.expected_downtime;
                });
            }
            #[cfg(feature = "fault-injection")]
            let point = crate::faults::point_of(&cmd);
            let ev = self.execute(cmd, round);
            #[cfg(feature = "fault-injection")]
            crate::faults::after(self.net.as_ref().map(|n| n.ctl.stream.tcp()), point, &ev);
            s.handle(self.t0.elapsed(), ev);
            self.answer_cancel(s);
        }
    }

    /// Carries out an operator's cancel between two steps (the session decides whether it
    /// is still possible).
    fn answer_cancel(&self, s: &mut SourceSession) {
        let Some(job) = self.job.as_ref().filter(|j| j.cancel_requested()) else {
            return;
        };
        let answer = s
            .cancel(self.t0.elapsed())
            .map(|()| {
                tracing::info!(vm = %self.vm_id, phase = s.phase().name(), "cancelled by the operator: rolling back");
                format!(
                    "the migration of {} to {} is cancelled: the VM keeps running here and the destination discards its copy",
                    self.vm_id, self.to
                )
            })
            .map_err(|e| format!("cannot cancel the migration of {}: {e}", self.vm_id));
        job.answer_cancel(answer);
    }

    fn vmm_request(&mut self, m: &VmmMsg) -> Result<VmmMsg, Failure> {
        let Some(vm) = self.vm.as_ref() else {
            return Err(Failure::new(
                FailureKind::VmmLost,
                "the source VMM is not connected",
            ));
        };
        request(&vm.link, m, &[]).map_err(|e| {
            let f = e.failure();
            if f.kind == FailureKind::VmmLost {
                self.vmm_alive = false;
            }
            f
        })
    }

    /// `Stop`/`Resume` on the VMM's link, or on the link of a VMM that re-registered.
    fn vmm_final(&mut self, m: &VmmMsg) -> Result<(), Failure> {
        if !self.vmm_alive {
            if let Some(v) = self.d.registry.take_reattached(&self.vm_id, REATTACH_WAIT) {
                self.vm = Some(v);
                self.vmm_alive = true;
            }
        }
        let vm = self
            .vm
            .as_ref()
            .ok_or_else(|| Failure::new(FailureKind::VmmLost, "the source VMM is not connected"))?;
        request_ok(&vm.link, m).map_err(|e| {
            let f = e.failure();
            if f.kind == FailureKind::VmmLost {
                // A late reply would answer the next request: this link is done.
                self.vmm_alive = false;
            }
            f
        })
    }

    pub(crate) fn mem(&self) -> Option<&Arc<Vec<GuestRegion>>> {
        self.vm.as_ref().map(|v| &v.mem)
    }

    fn peer<T>(
        &mut self,
        f: impl FnOnce(&mut Negotiated) -> anyhow::Result<T>,
    ) -> Result<T, Failure> {
        let net = self.net.as_mut().ok_or_else(|| {
            Failure::new(FailureKind::PeerLost, "no connection to the destination")
        })?;
        f(net).map_err(|e| Failure::new(failure_kind(&e), format!("{e:#}")))
    }

    fn execute(&mut self, cmd: SourceCommand, round: Option<(u32, bool, u64)>) -> SourceEvent {
        use SourceCommand as C;
        use SourceEvent as E;
        let r = match cmd {
            C::Negotiate => self.negotiate(),
            C::StartDirtyLog => self.vmm_request(&VmmMsg::StartDirtyLog).map(|_| {
                // With the log on, a hole is zero until a write the log will show.
                let zero = self.vm.as_ref().map_or(Ok(Vec::new()), |v| {
                    crate::memory::known_zero(&v.regions, &v.memfds, &v.mem, &self.holes_before)
                });
                E::DirtyLogStarted(zero.unwrap_or_else(|e| {
                    tracing::warn!(vm = %self.vm_id, "finding the memfds' holes: {e:#}; round 1 sends every page");
                    Vec::new()
                }))
            }),
            C::TakeDirty { final_round, delay } => {
                std::thread::sleep(delay);
                self.take_dirty(final_round)
            }
            C::SendWindow(w) => self.send_window(&w, round),
            C::Pause => match self.vmm_request(&VmmMsg::Pause) {
                Ok(VmmMsg::Paused { pause_us }) => Ok(E::Paused(Duration::from_micros(pause_us))),
                Ok(other) => Err(unexpected(&VmmMsg::Pause, &other)),
                Err(f) => Err(f),
            },
            C::SaveState => match self.vmm_request(&VmmMsg::SaveState) {
                Ok(VmmMsg::State { blob }) => Ok(E::StateSaved(blob)),
                Ok(other) => Err(unexpected(&VmmMsg::SaveState, &other)),
                Err(f) => Err(f),
            },
            C::SendState(blob) => self
                .peer(|n| Ok(write_msg(&mut n.ctl.stream, &PeerMsg::StateBlob { blob })?))
                .map(|()| E::StateSent),
            C::HashSource => match self.mem().cloned() {
                Some(mem) => {
                    // Holes read as zero: hashing them would allocate them (paused VM:
                    // nothing fills one meanwhile).
                    let holes = self.vm.as_ref().map_or_else(Vec::new, |v| {
                        crate::memory::holes(&v.regions, &v.memfds).unwrap_or_default()
                    });
                    let d = digest_of(&mem, &holes);
                    memory_shrank(&mem).map_or(Ok(E::SourceHashed(d)), Err)
                }
                None => Err(Failure::new(FailureKind::Local, "no source memory")),
            },
            C::AwaitReady => self.peer(|n| {
                match read_msg(&mut n.ctl.stream, MAX_FRAME)
                    .context("waiting for the destination's Ready")?
                {
                    PeerMsg::Ready { digest } => Ok(E::PeerReady(digest)),
                    other => Err(ferry_proto::peer::unexpected("Ready", other).into()),
                }
            }),
            C::Fence => {
                let fence = Fence {
                    session: self.session,
                    to: self.to.clone(),
                };
                match self.vmm_request(&VmmMsg::Fence(fence.clone())) {
                    Ok(VmmMsg::Ok) => {
                        if let Some(vm) = self.vm.as_mut() {
                            vm.fence = Some(fence);
                        }
                        Ok(E::Fenced)
                    }
                    Ok(other) => Err(unexpected(&VmmMsg::Fence(fence), &other)),
                    Err(f) => Err(f),
                }
            }
            C::Record(state) => Ok(self.record(state)),
            C::SendCommit => self
                .peer(|n| {
                    write_msg(&mut n.ctl.stream, &PeerMsg::Commit)?;
                    read_msg(&mut n.ctl.stream, MAX_FRAME)
                        .context("waiting for the destination's answer to Commit")
                })
                .and_then(replay::decision_answer),
            C::ReplayCommit => replay::deliver(self.d, &self.to, self.session, true)
                .map_err(|e| Failure::new(failure_kind(&e), format!("{e:#}")))
                .and_then(replay::decision_answer),
            C::AskDiscard => replay::deliver(self.d, &self.to, self.session, false)
                .map_err(|e| Failure::new(failure_kind(&e), format!("{e:#}")))
                .and_then(replay::decision_answer),
            C::Sleep(d) => {
                std::thread::sleep(d);
                Ok(E::Slept)
            }
            C::AbortPeer { reason, confirm } => {
                self.peer(|n| replay::abort_peer(n, reason, confirm))
            }
            C::ReleasePeer => replay::queue_release(self.d, &self.vm_id, &self.to, self.session)
                .map(|()| E::PeerTold)
                .map_err(|e| {
                    Failure::new(FailureKind::Local, format!("{:#}", anyhow::Error::new(e)))
                }),
            C::Resume => self.vmm_final(&VmmMsg::Resume).map(|()| {
                if let Some(vm) = self.vm.as_mut() {
                    vm.fence = None;
                }
                E::Resumed
            }),
            C::Stop => self.vmm_final(&VmmMsg::Stop).map(|()| E::Stopped),
        };
        r.unwrap_or_else(E::Failed)
    }

    fn negotiate(&mut self) -> Result<SourceEvent, Failure> {
        let (Some(req), Some(vm)) = (self.req, self.vm.as_ref()) else {
            return Err(Failure::new(FailureKind::Local, "nothing to negotiate"));
        };
        self.holes_before = crate::memory::holes(&vm.regions, &vm.memfds).unwrap_or_default();
        let n = negotiate(self.d, req, vm, self.session).map_err(|e| {
            if let Some(b) = e.downcast_ref::<DestinationBusy>() {
                self.dest_busy = Some(b.to_string());
            }
            Failure::new(failure_kind(&e), format!("{e:#}"))
        })?;
        let list = n.transports.clone();
        self.net = Some(n);
        Ok(SourceEvent::Negotiated(list))
    }

    fn take_dirty(&mut self, final_round: bool) -> Result<SourceEvent, Failure> {
        let req = VmmMsg::TakeDirty { final_round };
        let bitmaps = match self.vmm_request(&req)? {
            VmmMsg::Dirty { bitmaps } => bitmaps,
            other => return Err(unexpected(&req, &other)),
        };
        let mem = self.mem().cloned().unwrap_or_default();
        if bitmaps.len() != mem.len() {
            return Err(Failure::new(
                FailureKind::VmmRefused,
                format!(
                    "VMM sent {} dirty bitmaps for {} regions",
                    bitmaps.len(),
                    mem.len()
                ),
            ));
        }
        bitmaps
            .into_iter()
            .zip(mem.iter())
            .map(|(w, r)| DirtyBitmap::from_words(w, r.npages()))
            .collect::<Result<Vec<_>, _>>()
            .map(SourceEvent::Dirty)
            .map_err(|e| Failure::new(FailureKind::VmmRefused, e.to_string()))
    }

    fn record(&mut self, state: DecisionState) -> SourceEvent {
        let d = Decision {
            state,
            session: self.session,
            to: self.to.clone(),
        };
        match records::write_decision(&self.d.cfg.state_dir, &self.vm_id, &d) {
            Ok(()) => {
                tracing::info!(vm = %self.vm_id, session = %self.session, state = state.name(), "decision recorded");
                SourceEvent::Recorded
            }
            Err(e) => {
                tracing::error!(vm = %self.vm_id, "{e:#}");
                SourceEvent::RecordFailed(format!("{:#}", anyhow::Error::new(e)))
            }
        }
    }
}
