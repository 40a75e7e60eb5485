//! Carrying out a [`DestSession`]'s commands: the VMM that holds (or will hold) the VM,
//! the source's connection when there is one, and this host's durable records; and
//! putting what is left of a session where it belongs afterwards (held, back to waiting,
//! or nothing).

use std::os::fd::AsRawFd;

use ferry_engine::session::{
    DestCommand, DestEvent, DestPhase, DestRecord, DestSession, Failure, FailureKind, SessionId,
};
use ferry_proto::common::{Message, RegionInfo};
use ferry_proto::frame::write_msg;
use ferry_proto::peer::PeerMsg;
use ferry_proto::records::{self, Incoming};
use ferry_proto::vmm::VmmMsg;

use crate::context::Daemon;
use crate::intake::{Intake, Landing};
use crate::peer::PeerStream;
use crate::registry::{HeldVm, WaitingVmm};
use crate::vmm::{request, VmmError};

/// Carries out a destination session's commands: the VMM (when one holds the VM), the
/// source's connection (when there is one), the records.
pub(crate) struct Executor<'a> {
    pub(crate) d: &'a Daemon,
    pub(crate) vm_id: String,
    pub(crate) session: SessionId,
    pub(crate) vmm: Option<WaitingVmm>,
    pub(crate) ctl: Option<&'a mut PeerStream>,
    pub(crate) landing: Option<&'a mut Landing>,
    pub(crate) regions: Vec<RegionInfo>,
    pub(crate) intake: Option<&'a mut Intake>,
}

impl Executor<'_> {
    fn tell(&mut self, m: &PeerMsg) -> DestEvent {
        if let Some(c) = self.ctl.as_deref_mut() {
            if let Err(e) = write_msg(c, m) {
                return DestEvent::Failed(Failure::new(FailureKind::PeerLost, e.to_string()));
            }
        }
        DestEvent::Told
    }

    fn vmm(&mut self, m: &VmmMsg, fds: &[i32]) -> Result<VmmMsg, VmmError> {
        let vmm = self.vmm.as_ref().ok_or(VmmError::NotDelivered {
            request: m.name(),
            source: ferry_proto::ProtoError::Closed,
        })?;
        let r = request(&vmm.link, m, fds);
        if matches!(
            r,
            Err(VmmError::Link { .. } | VmmError::NotDelivered { .. })
        ) {
            // Gone, or out of step (a late reply would answer the next request).
            self.vmm = None;
        }
        r
    }

    fn record(&mut self, record: DestRecord) -> DestEvent {
        let r = records::write_incoming(
            &self.d.cfg.state_dir,
            &self.vm_id,
            &Incoming {
                record,
                session: self.session,
            },
        );
        match r {
            Ok(()) => DestEvent::Recorded,
            Err(e) => DestEvent::RecordFailed(format!("{:#}", anyhow::Error::new(e))),
        }
    }

    /// Runs `s`'s commands until it waits for the source (or holds).
    pub(crate) fn drive(&mut self, s: &mut DestSession) -> bool {
        let mut held = false;
        while let Some(cmd) = s.poll() {
            self.d
                .registry
                .incoming_phase(self.session, s.phase().name());
            let ev = match cmd {
                DestCommand::Load(blob) => self.load(blob),
                DestCommand::SendReady => {
                    let digest = self
                        .landing
                        .as_ref()
                        .map(|l| l.landed.digest())
                        .unwrap_or_default();
                    self.tell(&PeerMsg::Ready { digest })
                }
                DestCommand::Record(r) => self.record(r),
                DestCommand::Start => self.start(),
                DestCommand::SendRunning(detail) => self.tell(&PeerMsg::Running { detail }),
                DestCommand::SendStartFailed(reason) => self.tell(&PeerMsg::StartFailed { reason }),
                DestCommand::SendDiscarded => self.tell(&PeerMsg::Discarded),
                DestCommand::Refuse(reason) => self.tell(&PeerMsg::Refused { reason }),
                DestCommand::Discard => {
                    match self.vmm(&VmmMsg::Discard, &[]) {
                        Ok(VmmMsg::Ok) => {}
                        Ok(other) => {
                            tracing::warn!(vm = %self.vm_id, "the VMM answered {} to Discard", other.name());
                            self.vmm = None;
                        }
                        Err(e) => {
                            tracing::warn!(vm = %self.vm_id, "the VMM did not take Discard: {e}")
                        }
                    }
                    DestEvent::Discarded
                }
                DestCommand::Hold => {
                    held = true;
                    continue;
                }
            };
            s.handle(ev);
        }
        held
    }

    fn load(&mut self, blob: Vec<u8>) -> DestEvent {
        // All memory is here: stop the readers, release the NIC's access (rkeys and
        // lkeys die), hand everything to the VMM.
        if let Some(i) = self.intake.as_deref_mut() {
            i.tcp = None;
            i.rdma = None;
        }
        let Some(landing) = self.landing.as_ref() else {
            return DestEvent::LoadFailed("no memory was received".into());
        };
        let raw: Vec<_> = landing.fds.iter().map(|f| f.as_raw_fd()).collect();
        let layout: Vec<RegionInfo> = self
            .regions
            .iter()
            .map(|r| RegionInfo { offset: 0, ..*r })
            .collect();
        let msg = VmmMsg::Load {
            vm_id: self.vm_id.clone(),
            session: self.session,
            regions: layout,
            blob,
        };
        match self.vmm(&msg, &raw) {
            Ok(VmmMsg::Loaded) => {
                #[cfg(feature = "fault-injection")]
                crate::faults::hold("loaded");
                DestEvent::Loaded
            }
            Ok(other) => {
                DestEvent::LoadFailed(format!("the VMM answered {} to Load", other.name()))
            }
            Err(e) => DestEvent::LoadFailed(e.to_string()),
        }
    }

    fn start(&mut self) -> DestEvent {
        #[cfg(feature = "fault-injection")]
        crate::faults::before_start(&self.vm_id);
        match self.vmm(&VmmMsg::Start, &[]) {
            Ok(VmmMsg::Running { detail }) => {
                tracing::info!(vm = %self.vm_id, %detail, "VM runs here");
                DestEvent::Started(detail)
            }
            Ok(other) => {
                DestEvent::StartFailed(format!("the VMM answered {} to Start", other.name()))
            }
            Err(e @ VmmError::Refused { .. }) => DestEvent::StartFailed(e.to_string()),
            // Start never reached a VMM: nothing ran.
            Err(e @ VmmError::NotDelivered { .. }) => {
                self.vmm = None;
                DestEvent::StartFailed(format!(
                    "no destination VMM holds the loaded VM any more ({e}); nothing ran there"
                ))
            }
            Err(e) => DestEvent::Failed(Failure::new(FailureKind::VmmLost, e.to_string())),
        }
    }
}

/// Puts what is left of a session where it belongs: held, back to waiting, or nothing.
pub(crate) fn settle_vmm(
    d: &Daemon,
    vm_id: &str,
    session: SessionId,
    s: DestSession,
    vmm: Option<WaitingVmm>,
    held: bool,
) {
    match s.phase() {
        DestPhase::Running(_) => {} // the VMM runs the VM and registers it as a source
        DestPhase::Discarded => {
            if let Some(v) = vmm {
                let _ = d.registry.add_waiting(vm_id, v);
            }
        }
        _ if held || s.phase().is_settled() => {
            if s.phase() == &DestPhase::Held {
                tracing::error!(vm = vm_id, %session, "link to the source lost after Ready: holding the loaded, paused VM until the source's decision is replayed");
            } else {
                tracing::warn!(vm = vm_id, %session, phase = s.phase().name(), "keeping the loaded VM for the source's decision or the operator");
            }
            d.registry.hold(
                session,
                HeldVm {
                    vm_id: vm_id.to_owned(),
                    vmm,
                    session: s,
                },
            );
        }
        _ => {
            if let Some(v) = vmm {
                let _ = d.registry.add_waiting(vm_id, v);
            }
        }
    }
}
