//! The destination side of one migration: what may happen to a received VM.
//!
//! ```text
//!  Receiving --state--> Loading --Loaded--> Loaded (Ready sent; vCPUs not running)
//!  Loaded --Commit--> record "committed" --> Starting --Started--> record "running" --> Running
//!  Loaded --link lost, or anything but Commit/Abort--> Held (kept, paused, until the
//!    source's decision is replayed)
//!  Starting --start failed--> record "start-failed" --> StartFailed (the loaded VM is kept)
//!  Receiving/Loading/Loaded/Held --Abort--> Discarded
//! ```
//!
//! The rules: the VM runs only on the source's `Commit` (or its replay) for this session,
//! and only after "committed" is on disk, so a restarted sidecar knows the decision; a
//! failed start is reported as a failure, never as running; a loaded VM whose source went
//! silent is held, never discarded or started on a guess; an abort is refused once the VM
//! runs (or may have run) here.

use std::collections::VecDeque;

use super::{Failure, FailureKind};

/// What a destination has durably recorded about one incoming session
/// (`<state-dir>/<vm>.incoming`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DestRecord {
    /// The source's `Commit` arrived: the VM is to run here.
    Committed,
    /// The VM runs here; the VMM's start line.
    Running(String),
    /// The VMM could not start the VM; why, and whether it may have run before failing.
    StartFailed {
        /// The VMM's reason.
        reason: String,
        /// Whether the VM may have run (the VMM's link broke during Start).
        may_have_run: bool,
    },
    /// The VM was thrown away; the source keeps it.
    Discarded,
}

impl DestRecord {
    /// The word in the record.
    pub fn name(&self) -> &'static str {
        match self {
            DestRecord::Committed => "committed",
            DestRecord::Running(_) => "running",
            DestRecord::StartFailed { .. } => "start-failed",
            DestRecord::Discarded => "discarded",
        }
    }
}

/// What the driver must do next. Each is answered by one [`DestEvent`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DestCommand {
    /// Hand the received memory and this state blob to the waiting VMM (it loads, does not
    /// run). Answer: [`DestEvent::Loaded`] or [`DestEvent::LoadFailed`].
    Load(Vec<u8>),
    /// Send `Ready` with the digest of what landed. Answer: [`DestEvent::Told`].
    SendReady,
    /// Write this record durably. Answer: [`DestEvent::Recorded`] or
    /// [`DestEvent::RecordFailed`].
    Record(DestRecord),
    /// Run the loaded VM. Answer: [`DestEvent::Started`] or [`DestEvent::StartFailed`]
    /// (or a [`FailureKind::VmmLost`] failure when the VMM's link broke during Start).
    Start,
    /// Tell the source the VM runs here. Answer: [`DestEvent::Told`].
    SendRunning(String),
    /// Tell the source the VM could not start. Answer: [`DestEvent::Told`].
    SendStartFailed(String),
    /// Tell the source this host discarded its copy. Answer: [`DestEvent::Told`].
    SendDiscarded,
    /// Tell the source no (with a reason); the connection ends. Answer: [`DestEvent::Told`].
    Refuse(String),
    /// Have the VMM throw the loaded VM away. Answer: [`DestEvent::Discarded`].
    Discard,
    /// Keep the VMM and its loaded VM for a replayed decision. No answer.
    Hold,
}

/// What happened: the answer to the last command, or a message from the source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DestEvent {
    /// Every page is here and the source sent the state blob.
    StateArrived(Vec<u8>),
    /// The VMM loaded the VM (not running).
    Loaded,
    /// The VMM refused the VM.
    LoadFailed(String),
    /// The source decided: run it (`Commit`, or a replayed decision).
    Commit,
    /// The source gave up (`Abort`, or a replayed roll-back).
    Abort(String),
    /// The control link to the source broke.
    LinkLost,
    /// A record is on disk.
    Recorded,
    /// A record could not be written.
    RecordFailed(String),
    /// The VM runs; the VMM's line.
    Started(String),
    /// The VMM could not start the VM (it does not run).
    StartFailed(String),
    /// The VMM threw the VM away.
    Discarded,
    /// The source was told (or could not be).
    Told,
    /// The I/O behind the last command failed.
    Failed(Failure),
}

/// Where a destination session stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DestPhase {
    /// Receiving memory.
    Receiving,
    /// The VMM loads the VM.
    Loading,
    /// Loaded, `Ready` sent: waiting for the decision.
    Loaded,
    /// Loaded, and the source's link is gone: waiting for a replayed decision.
    Held,
    /// `Commit` arrived; recording it and starting the VM.
    Starting,
    /// The VM runs here.
    Running(String),
    /// The VM could not start; kept loaded (if the VMM still has it) for the operator.
    StartFailed {
        /// Why.
        reason: String,
        /// Whether the VM may have run before failing.
        may_have_run: bool,
    },
    /// Thrown away (or never here); the source keeps the VM.
    Discarded,
    /// `Commit` is on this host's record, but no VMM holds the loaded VM yet (a restarted
    /// sidecar, before the VMM reattached): a replayed `Commit` is asked to come again.
    AwaitingVmm,
}

impl DestPhase {
    /// The word `ferry status` shows.
    pub fn name(&self) -> &'static str {
        match self {
            DestPhase::Receiving => "receiving",
            DestPhase::Loading => "loading",
            DestPhase::Loaded => "loaded",
            DestPhase::Held => "held",
            DestPhase::Starting => "starting",
            DestPhase::Running(_) => "running",
            DestPhase::StartFailed { .. } => "start-failed",
            DestPhase::Discarded => "discarded",
            DestPhase::AwaitingVmm => "awaiting-vmm",
        }
    }

    /// Whether nothing more will happen without a new decision from the source.
    pub fn is_settled(&self) -> bool {
        matches!(
            self,
            DestPhase::Held
                | DestPhase::Running(_)
                | DestPhase::StartFailed { .. }
                | DestPhase::Discarded
        )
    }
}

/// Steps within a phase: which answer is pending.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Pending {
    None,
    Load,
    Ready,
    RecordCommitted,
    Start,
    RecordRunning(String),
    RecordStartFailed(String, bool),
    TellRunning,
    TellStartFailed,
    TellDiscarded,
    Refusing,
    Discard {
        then_record: bool,
        then_tell: Option<DestCommand>,
    },
    RecordDiscarded {
        then_tell: bool,
    },
}

/// The destination side of one migration. See the module documentation.
#[derive(Debug)]
pub struct DestSession {
    phase: DestPhase,
    pending: Pending,
    queue: VecDeque<DestCommand>,
    /// Whether a VMM holds the loaded VM (false after its loss or a discard).
    has_vm: bool,
    warnings: Vec<String>,
}

impl Default for DestSession {
    fn default() -> Self {
        Self::new()
    }
}

impl DestSession {
    /// A session that receives a new migration.
    pub fn new() -> Self {
        Self {
            phase: DestPhase::Receiving,
            pending: Pending::None,
            queue: VecDeque::new(),
            has_vm: false,
            warnings: Vec::new(),
        }
    }

    /// A session rebuilt from this host's record of it (a restarted sidecar), with
    /// `holds_vm` when a VMM reattached holding the loaded VM of this session.
    pub fn restored(record: Option<DestRecord>, holds_vm: bool) -> Self {
        let mut s = Self::new();
        s.has_vm = holds_vm;
        match record {
            None if holds_vm => s.phase = DestPhase::Held,
            None => s.phase = DestPhase::Discarded,
            // The decision was commit: carry it out.
            Some(DestRecord::Committed) if holds_vm => s.start(),
            Some(DestRecord::Committed) => s.phase = DestPhase::AwaitingVmm,
            // A VMM still holding the loaded VM never got (or lost) the Start the record
            // was written for: the decision was commit, carry it out.
            Some(DestRecord::Running(_)) if holds_vm => s.start(),
            Some(DestRecord::Running(d)) => s.phase = DestPhase::Running(d),
            Some(DestRecord::StartFailed {
                reason,
                may_have_run,
            }) => {
                s.phase = DestPhase::StartFailed {
                    reason,
                    may_have_run,
                }
            }
            Some(DestRecord::Discarded) => {
                s.phase = DestPhase::Discarded;
                if holds_vm {
                    s.pending = Pending::Discard {
                        then_record: false,
                        then_tell: None,
                    };
                    s.queue.push_back(DestCommand::Discard);
                }
            }
        }
        s
    }

    /// The next command, if any.
    pub fn poll(&mut self) -> Option<DestCommand> {
        self.queue.pop_front()
    }

    /// Where the session stands.
    pub fn phase(&self) -> &DestPhase {
        &self.phase
    }

    /// Whether a command's answer is still awaited.
    pub fn busy(&self) -> bool {
        self.pending != Pending::None || !self.queue.is_empty()
    }

    /// Whether the session still has a loaded VM in a VMM.
    pub fn has_vm(&self) -> bool {
        self.has_vm
    }

    /// Things that went wrong without changing the phase.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// A VMM reattached holding this session's loaded VM.
    pub fn vm_reattached(&mut self) {
        self.has_vm = true;
        if self.phase == DestPhase::AwaitingVmm && self.pending == Pending::None {
            self.start();
            return;
        }
        if self.phase == DestPhase::Discarded && self.pending == Pending::None {
            self.pending = Pending::Discard {
                then_record: false,
                then_tell: None,
            };
            self.queue.push_back(DestCommand::Discard);
        }
    }

    fn cmd(&mut self, pending: Pending, c: DestCommand) {
        self.pending = pending;
        self.queue.push_back(c);
    }

    fn start(&mut self) {
        self.phase = DestPhase::Starting;
        self.cmd(Pending::Start, DestCommand::Start);
    }

    fn discard_then(&mut self, record: bool, tell: Option<DestCommand>) {
        self.phase = DestPhase::Discarded;
        if self.has_vm {
            self.cmd(
                Pending::Discard {
                    then_record: record,
                    then_tell: tell,
                },
                DestCommand::Discard,
            );
        } else if record {
            self.cmd(
                Pending::RecordDiscarded {
                    then_tell: tell.is_some(),
                },
                DestCommand::Record(DestRecord::Discarded),
            );
        } else if let Some(t) = tell {
            self.cmd(Pending::TellDiscarded, t);
        }
    }

    /// Feeds an event.
    pub fn handle(&mut self, event: DestEvent) {
        use DestEvent as E;
        let pending = std::mem::replace(&mut self.pending, Pending::None);
        match (pending, event) {
            // Answers to commands.
            (Pending::Load, E::Loaded) => {
                self.has_vm = true;
                self.phase = DestPhase::Loaded;
                self.cmd(Pending::Ready, DestCommand::SendReady);
            }
            (Pending::Load, E::LoadFailed(reason) | E::Failed(Failure { reason, .. })) => {
                // The VMM may hold something half-loaded: have it drop it.
                self.has_vm = true;
                self.discard_then(
                    false,
                    Some(DestCommand::Refuse(format!(
                        "the destination VMM refused the VM: {reason}"
                    ))),
                );
            }
            (Pending::Ready, E::Told) => {}
            (Pending::Ready, E::Failed(_)) => self.hold(),
            (Pending::RecordCommitted, E::Recorded) => self.start(),
            (
                Pending::RecordCommitted,
                E::RecordFailed(why) | E::Failed(Failure { reason: why, .. }),
            ) => {
                // Without the record a restarted sidecar could not know the decision: do
                // not start; the source keeps its paused VM and the operator is told.
                let reason = format!(
                    "the destination could not record the commit ({why}); the VM was not started"
                );
                self.phase = DestPhase::StartFailed {
                    reason: reason.clone(),
                    may_have_run: false,
                };
                self.cmd(
                    Pending::TellStartFailed,
                    DestCommand::SendStartFailed(reason),
                );
            }
            (Pending::Start, E::Started(detail)) => {
                self.phase = DestPhase::Running(detail.clone());
                self.cmd(
                    Pending::RecordRunning(detail.clone()),
                    DestCommand::Record(DestRecord::Running(detail)),
                );
            }
            (Pending::Start, E::StartFailed(reason)) => self.start_failed(reason, false),
            (Pending::Start, E::Failed(f)) => {
                let lost = f.kind == FailureKind::VmmLost;
                let reason = if lost {
                    format!("the destination VMM's link broke during Start ({f}): the VM may have run there")
                } else {
                    f.reason
                };
                self.has_vm = !lost;
                self.start_failed(reason, lost);
            }
            (Pending::RecordRunning(detail), E::Recorded | E::RecordFailed(_) | E::Failed(_)) => {
                self.cmd(Pending::TellRunning, DestCommand::SendRunning(detail));
            }
            (
                Pending::RecordStartFailed(reason, _),
                E::Recorded | E::RecordFailed(_) | E::Failed(_),
            ) => {
                self.cmd(
                    Pending::TellStartFailed,
                    DestCommand::SendStartFailed(reason),
                );
            }
            (
                Pending::TellRunning
                | Pending::TellStartFailed
                | Pending::TellDiscarded
                | Pending::Refusing,
                E::Told | E::Failed(_),
            ) => {}
            (
                Pending::Discard {
                    then_record,
                    then_tell,
                },
                E::Discarded | E::Failed(_),
            ) => {
                self.has_vm = false;
                if then_record {
                    self.cmd(
                        Pending::RecordDiscarded {
                            then_tell: then_tell.is_some(),
                        },
                        DestCommand::Record(DestRecord::Discarded),
                    );
                } else if let Some(t) = then_tell {
                    let p = if matches!(t, DestCommand::Refuse(_)) {
                        Pending::Refusing
                    } else {
                        Pending::TellDiscarded
                    };
                    self.cmd(p, t);
                }
            }
            (
                Pending::RecordDiscarded { then_tell },
                E::Recorded | E::RecordFailed(_) | E::Failed(_),
            ) => {
                if then_tell {
                    self.cmd(Pending::TellDiscarded, DestCommand::SendDiscarded);
                }
            }
            // Messages from the source, with nothing pending.
            (Pending::None, event) => self.on_input(event),
            // Anything else while a command is pending: keep waiting for its answer.
            (p, event) => {
                self.warnings
                    .push(format!("ignored {event:?} while waiting for {p:?}"));
                self.pending = p;
            }
        }
    }

    fn hold(&mut self) {
        self.phase = DestPhase::Held;
        self.queue.push_back(DestCommand::Hold);
    }

    fn start_failed(&mut self, reason: String, may_have_run: bool) {
        self.phase = DestPhase::StartFailed {
            reason: reason.clone(),
            may_have_run,
        };
        self.cmd(
            Pending::RecordStartFailed(reason.clone(), may_have_run),
            DestCommand::Record(DestRecord::StartFailed {
                reason,
                may_have_run,
            }),
        );
    }

    fn on_input(&mut self, event: DestEvent) {
        use DestEvent as E;
        let phase = self.phase.clone();
        match (phase, event) {
            (DestPhase::Receiving, E::StateArrived(blob)) => {
                self.phase = DestPhase::Loading;
                self.cmd(Pending::Load, DestCommand::Load(blob));
            }
            (DestPhase::Receiving, E::Abort(_) | E::LinkLost | E::Failed(_) | E::Commit) => {
                // Nothing was handed over yet; the VMM only learns the attempt is off.
                self.has_vm = true;
                self.discard_then(false, None);
            }
            (DestPhase::Loaded | DestPhase::Held, E::Commit) => {
                self.phase = DestPhase::Starting;
                self.cmd(Pending::RecordCommitted, DestCommand::Record(DestRecord::Committed));
            }
            (DestPhase::Loaded, E::LinkLost | E::Failed(_)) => self.hold(),
            (DestPhase::Loaded | DestPhase::Held, E::Abort(_)) => {
                self.discard_then(true, Some(DestCommand::SendDiscarded))
            }
            (DestPhase::StartFailed { may_have_run, reason }, E::Commit) => {
                if self.has_vm {
                    // The operator retries (`ferry recover`): start again.
                    self.start();
                } else {
                    let _ = may_have_run;
                    self.cmd(Pending::TellStartFailed, DestCommand::SendStartFailed(reason));
                }
            }
            (DestPhase::StartFailed { may_have_run: false, .. }, E::Abort(_)) => {
                self.discard_then(true, Some(DestCommand::SendDiscarded))
            }
            (DestPhase::StartFailed { may_have_run: true, reason }, E::Abort(_)) => self.cmd(
                Pending::Refusing,
                DestCommand::Refuse(format!(
                    "not discarded: {reason}; roll back only with --force, after checking the destination"
                )),
            ),
            (DestPhase::Running(detail), E::Commit) => {
                self.cmd(Pending::TellRunning, DestCommand::SendRunning(detail))
            }
            (DestPhase::Running(_), E::Abort(_)) => self.cmd(
                Pending::Refusing,
                DestCommand::Refuse("the VM of that session runs here; it cannot be discarded".into()),
            ),
            (DestPhase::Discarded, E::Abort(_)) => {
                self.cmd(Pending::TellDiscarded, DestCommand::SendDiscarded)
            }
            (DestPhase::AwaitingVmm, E::Commit) => self.cmd(
                Pending::Refusing,
                DestCommand::Refuse(
                    "the commit is recorded here but the VMM holding the VM has not reattached yet; try again".into(),
                ),
            ),
            (DestPhase::AwaitingVmm, E::Abort(_)) => {
                self.discard_then(true, Some(DestCommand::SendDiscarded))
            }
            (DestPhase::Discarded, E::Commit) => self.cmd(
                Pending::Refusing,
                DestCommand::Refuse("no VM of that session is held here (it was discarded or never loaded)".into()),
            ),
            // A lost link after the decision changes nothing here.
            (_, E::LinkLost | E::Failed(_)) => {}
            (DestPhase::Loaded, event) => {
                // The source may have decided either way: never discard on a guess.
                self.warnings.push(format!(
                    "{} is not expected while the VM is loaded: holding it for the source's decision",
                    event_name(&event)
                ));
                self.hold();
            }
            (phase, event) => {
                let reason = format!("{} is not expected while the VM is {}", event_name(&event), phase.name());
                if matches!(phase, DestPhase::Receiving | DestPhase::Loading) {
                    self.has_vm = self.has_vm || phase != DestPhase::Receiving;
                    self.discard_then(false, Some(DestCommand::Refuse(reason)));
                } else {
                    self.cmd(Pending::Refusing, DestCommand::Refuse(reason));
                }
            }
        }
    }
}

fn event_name(e: &DestEvent) -> &'static str {
    match e {
        DestEvent::StateArrived(_) => "the state blob",
        DestEvent::Loaded => "Loaded",
        DestEvent::LoadFailed(_) => "a load failure",
        DestEvent::Commit => "Commit",
        DestEvent::Abort(_) => "Abort",
        DestEvent::LinkLost => "a lost link",
        DestEvent::Recorded | DestEvent::RecordFailed(_) => "a record",
        DestEvent::Started(_) | DestEvent::StartFailed(_) => "a start result",
        DestEvent::Discarded => "Discarded",
        DestEvent::Told => "Told",
        DestEvent::Failed(_) => "a failure",
    }
}
