//! The commit point: exactly one VM runs, always.
//!
//! The source decides once. Before [`SourcePhase::Committed`] every failure resumes the
//! source VM and the destination discards what it received; from `Committed` on the
//! source never resumes, and a broken link leaves the destination holding the loaded VM
//! until the decision is replayed to it.
//!
//! ```text
//!  source                                   destination
//!  Negotiating --Accepted--> Precopy
//!  Precopy --Paused--> StopAndCopy          Receiving
//!  StopAndCopy --FinalSent--> AwaitingReady            --Loaded--> Loaded (answers Ready)
//!  AwaitingReady --Ready{match}--> Committed  ==Commit==>  Loaded --Commit--> Running
//!  Committed --Running--> Completed (source VM stopped for good)
//!  any phase before Committed --Failed--> Aborted (source VM resumes)
//! ```

/// Where the source side of a migration stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourcePhase {
    /// Connecting, authenticating, agreeing on layout and transport.
    Negotiating,
    /// Pre-copy rounds; the source VM runs.
    Precopy,
    /// The source VM is paused; the final dirty set and the state are being sent.
    StopAndCopy,
    /// Everything is sent; waiting for the destination to load and verify.
    AwaitingReady,
    /// The decision is taken: the destination runs the VM. Never resume the source.
    Committed,
    /// The destination confirmed it runs; the source VM is stopped for good.
    Completed,
    /// Given up before the commit point; the source VM runs.
    Aborted,
}

/// What happened, as the source driver reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceEvent {
    /// The destination accepted the migration.
    Accepted,
    /// The source VM's vCPUs and the VMM's writers stopped.
    Paused,
    /// The final dirty set and the state blob are at the destination.
    FinalSent,
    /// The destination loaded the VM (vCPUs not running) and sent its memory digest.
    Ready {
        /// Whether the destination's digest equals the source's.
        digests_match: bool,
    },
    /// The destination's VM runs.
    Running,
    /// Something failed: the peer went away, a timeout, a bad message, a refused state.
    Failed,
}

/// What the source driver must do next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceAction {
    /// Carry on.
    Continue,
    /// Record the decision durably, then send `Commit`.
    RecordAndSendCommit,
    /// Stop the source VM for good and release its memory registrations.
    StopSourceVm,
    /// Tell the destination to discard (best effort) and resume the source VM.
    AbortAndResume,
    /// Tell the destination to discard (best effort); the source VM never stopped.
    AbortRunning,
    /// Committed but the link failed: keep the source VM paused and replay `Commit`
    /// when the destination is reachable again.
    ReplayCommit,
}

/// A transition the state machine does not allow: a bug or a peer out of protocol.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("Event {event:?} is not allowed in phase {phase:?}")]
pub struct PhaseError {
    /// The phase the machine was in.
    pub phase: SourcePhase,
    /// The event that came.
    pub event: SourceEvent,
}

/// The source's commit/abort state machine.
#[derive(Clone, Debug)]
pub struct SourceCommit {
    phase: SourcePhase,
}

impl Default for SourceCommit {
    fn default() -> Self {
        Self::new()
    }
}

impl SourceCommit {
    /// A machine in [`SourcePhase::Negotiating`].
    pub fn new() -> Self {
        Self {
            phase: SourcePhase::Negotiating,
        }
    }

    /// The current phase.
    pub fn phase(&self) -> SourcePhase {
        self.phase
    }

    /// Whether the source may still resume its VM.
    pub fn may_resume_source(&self) -> bool {
        !matches!(self.phase, SourcePhase::Committed | SourcePhase::Completed)
    }

    /// Applies `event` and says what to do.
    ///
    /// # Errors
    ///
    /// [`PhaseError`] when the event is not allowed in the current phase; the phase is
    /// unchanged. The caller treats it as [`SourceEvent::Failed`].
    pub fn on(&mut self, event: SourceEvent) -> Result<SourceAction, PhaseError> {
        use SourceAction as A;
        use SourceEvent as E;
        use SourcePhase as P;
        let (next, action) = match (self.phase, event) {
            (P::Negotiating, E::Accepted) => (P::Precopy, A::Continue),
            (P::Precopy, E::Paused) => (P::StopAndCopy, A::Continue),
            (P::StopAndCopy, E::FinalSent) => (P::AwaitingReady, A::Continue),
            (
                P::AwaitingReady,
                E::Ready {
                    digests_match: true,
                },
            ) => (P::Committed, A::RecordAndSendCommit),
            (
                P::AwaitingReady,
                E::Ready {
                    digests_match: false,
                },
            ) => (P::Aborted, A::AbortAndResume),
            (P::Committed, E::Running) => (P::Completed, A::StopSourceVm),
            (P::Negotiating | P::Precopy, E::Failed) => (P::Aborted, A::AbortRunning),
            (P::StopAndCopy | P::AwaitingReady, E::Failed) => (P::Aborted, A::AbortAndResume),
            (P::Committed, E::Failed) => (P::Committed, A::ReplayCommit),
            (phase, event) => return Err(PhaseError { phase, event }),
        };
        self.phase = next;
        Ok(action)
    }
}

/// Where the destination side stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DestPhase {
    /// Receiving memory; nothing handed to the VMM yet.
    Receiving,
    /// The VMM loaded memory and state; its vCPUs do not run. `Ready` was sent.
    Loaded,
    /// The VM runs here.
    Running,
    /// Everything received was thrown away.
    Discarded,
}

/// What happened on the destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DestEvent {
    /// The local VMM loaded memory and state.
    Loaded,
    /// The source sent `Commit`.
    Commit,
    /// The source sent `Abort`.
    Abort,
    /// The control link to the source broke or timed out.
    LinkLost,
}

/// What the destination driver must do next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DestAction {
    /// Carry on.
    Continue,
    /// Send `Ready` with the digest.
    SendReady,
    /// Start the VM's vCPUs and answer `Running`.
    StartVm,
    /// Drop everything received; tell the VMM to discard a loaded VM.
    Discard,
    /// Keep the loaded, paused VM and wait for the source's decision to be replayed.
    Hold,
}

/// The destination's state machine.
#[derive(Clone, Debug)]
pub struct DestCommit {
    phase: DestPhase,
}

impl Default for DestCommit {
    fn default() -> Self {
        Self::new()
    }
}

impl DestCommit {
    /// A machine in [`DestPhase::Receiving`].
    pub fn new() -> Self {
        Self {
            phase: DestPhase::Receiving,
        }
    }

    /// The current phase.
    pub fn phase(&self) -> DestPhase {
        self.phase
    }

    /// Applies `event`; an event that makes no sense in the phase discards before the
    /// VM runs, and is ignored once it runs (the VM never stops because of a late message).
    pub fn on(&mut self, event: DestEvent) -> DestAction {
        use DestAction as A;
        use DestEvent as E;
        use DestPhase as P;
        let (next, action) = match (self.phase, event) {
            (P::Receiving, E::Loaded) => (P::Loaded, A::SendReady),
            (P::Loaded, E::Commit) => (P::Running, A::StartVm),
            (P::Loaded, E::LinkLost) => (P::Loaded, A::Hold),
            (P::Receiving | P::Loaded, _) => (P::Discarded, A::Discard),
            (P::Running, _) => (P::Running, A::Continue),
            (P::Discarded, _) => (P::Discarded, A::Continue),
        };
        self.phase = next;
        action
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drive(events: &[SourceEvent]) -> (SourceCommit, Vec<SourceAction>) {
        let mut m = SourceCommit::new();
        let acts = events.iter().map(|&e| m.on(e).expect("allowed")).collect();
        (m, acts)
    }

    #[test]
    fn happy_path_commits_then_stops_source() {
        use SourceEvent::*;
        let (m, acts) = drive(&[
            Accepted,
            Paused,
            FinalSent,
            Ready {
                digests_match: true,
            },
            Running,
        ]);
        assert_eq!(m.phase(), SourcePhase::Completed);
        assert_eq!(acts[3], SourceAction::RecordAndSendCommit);
        assert_eq!(acts[4], SourceAction::StopSourceVm);
    }

    #[test]
    fn every_failure_before_commit_keeps_the_source_vm() {
        use SourceEvent::*;
        let prefixes: [&[SourceEvent]; 4] = [
            &[],
            &[Accepted],
            &[Accepted, Paused],
            &[Accepted, Paused, FinalSent],
        ];
        for p in prefixes {
            let (mut m, _) = drive(p);
            let act = m.on(Failed).expect("failure is always allowed");
            assert!(matches!(
                act,
                SourceAction::AbortAndResume | SourceAction::AbortRunning
            ));
            // A paused source is resumed; a running one is left running.
            assert_eq!(
                act == SourceAction::AbortAndResume,
                p.contains(&Paused),
                "{p:?}"
            );
            assert_eq!(m.phase(), SourcePhase::Aborted);
        }
    }

    #[test]
    fn digest_mismatch_aborts_and_resumes() {
        use SourceEvent::*;
        let (mut m, _) = drive(&[Accepted, Paused, FinalSent]);
        assert_eq!(
            m.on(Ready {
                digests_match: false
            }),
            Ok(SourceAction::AbortAndResume)
        );
    }

    #[test]
    fn after_commit_the_source_never_resumes() {
        use SourceEvent::*;
        let (mut m, _) = drive(&[
            Accepted,
            Paused,
            FinalSent,
            Ready {
                digests_match: true,
            },
        ]);
        assert!(!m.may_resume_source());
        assert_eq!(m.on(Failed), Ok(SourceAction::ReplayCommit));
        assert_eq!(m.on(Failed), Ok(SourceAction::ReplayCommit));
        assert_eq!(m.phase(), SourcePhase::Committed);
        assert_eq!(m.on(Running), Ok(SourceAction::StopSourceVm));
    }

    #[test]
    fn out_of_order_events_are_refused_without_changing_phase() {
        let mut m = SourceCommit::new();
        assert!(m.on(SourceEvent::Running).is_err());
        assert!(m
            .on(SourceEvent::Ready {
                digests_match: true
            })
            .is_err());
        assert_eq!(m.phase(), SourcePhase::Negotiating);
    }

    #[test]
    fn destination_holds_a_loaded_vm_when_the_link_breaks() {
        let mut d = DestCommit::new();
        assert_eq!(d.on(DestEvent::Loaded), DestAction::SendReady);
        assert_eq!(d.on(DestEvent::LinkLost), DestAction::Hold);
        assert_eq!(d.on(DestEvent::Commit), DestAction::StartVm);
        assert_eq!(d.on(DestEvent::Abort), DestAction::Continue);
        assert_eq!(d.phase(), DestPhase::Running);
    }

    #[test]
    fn destination_discards_before_loaded_on_any_failure() {
        for ev in [DestEvent::Abort, DestEvent::LinkLost, DestEvent::Commit] {
            let mut d = DestCommit::new();
            assert_eq!(d.on(ev), DestAction::Discard);
            assert_eq!(d.phase(), DestPhase::Discarded);
        }
        let mut d = DestCommit::new();
        d.on(DestEvent::Loaded);
        assert_eq!(d.on(DestEvent::Abort), DestAction::Discard);
    }
}
