//! The VMM protocol: between a VMM and its local sidecar, on the sidecar's Unix socket.
//! File descriptors (guest RAM memfds) ride along with `RegisterVm` and `Load`.
//!
//! The byte layout of every message, the order of a migration and what each side must do
//! on a lost link are in `docs/vmm-protocol.md`.

use ferry_engine::session::SessionId;

use crate::codec::{Reader, Writer};
use crate::common::{
    get_regions, get_vm_id, put_regions, Message, RegionInfo, MAX_BLOB, MAX_FRAME, MAX_REGIONS,
    MAX_STR, VMM_MAGIC,
};
use crate::ProtoError;

/// A commit fence: the sidecar told the VMM that a commit decision may be recorded for
/// `session` (a migration to `to`). A fenced VMM that loses its sidecar stays paused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fence {
    /// The migration.
    pub session: SessionId,
    /// Its destination, as the operator named it.
    pub to: String,
}

/// A message of the VMM protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmmMsg {
    /// VMM, first message: the protocol version it speaks.
    Hello {
        /// Protocol version.
        version: u16,
    },
    /// Sidecar: accepted.
    Welcome {
        /// Protocol version the sidecar speaks.
        version: u16,
    },
    /// Sidecar: refused; it closes the link after this.
    Refused {
        /// Why.
        reason: String,
    },
    /// VMM: register a VM; one memfd per region rides along.
    RegisterVm {
        /// The VM's id.
        vm_id: String,
        /// RAM regions, in memfd order.
        regions: Vec<RegionInfo>,
        /// The VMM's CPU compatibility blob (opaque to the sidecar).
        cpu_profile: Vec<u8>,
        /// Set when the VM is paused under a commit fence (its previous sidecar link was
        /// lost after `Fence`): the sidecar tells it what became of that migration.
        fence: Option<Fence>,
    },
    /// VMM: wait here for an incoming migration of this VM.
    AwaitIncoming {
        /// The VM's id.
        vm_id: String,
        /// Set when this VMM holds the loaded (not running) VM of this session after
        /// losing its previous sidecar link.
        held: Option<SessionId>,
    },
    /// A request succeeded.
    Ok,
    /// A request failed; the link stays up.
    Error {
        /// What failed.
        message: String,
    },
    /// Sidecar: switch dirty logging on.
    StartDirtyLog,
    /// Sidecar: get-and-clear the dirty log.
    TakeDirty {
        /// Whether the VM is paused (the last bitmap of the migration).
        final_round: bool,
    },
    /// VMM: one bitmap per region, LSB-first 64-bit words.
    Dirty {
        /// `bitmaps[r]` covers region r.
        bitmaps: Vec<Vec<u64>>,
    },
    /// Sidecar: stop the vCPUs and the VMM's own writers.
    Pause,
    /// VMM: paused.
    Paused {
        /// How long pausing took, in microseconds.
        pause_us: u64,
    },
    /// Sidecar: send the vCPU and device state.
    SaveState,
    /// VMM: the opaque state blob.
    State {
        /// State bytes.
        blob: Vec<u8>,
    },
    /// Sidecar: a commit decision may be recorded from now on; answer `Ok` and, if this
    /// link breaks, stay paused until a sidecar says what happened.
    Fence(Fence),
    /// Sidecar: the migration failed (or was rolled back): switch logging off, drop any
    /// fence, run (again).
    Resume,
    /// Sidecar: the destination runs the VM: stop for good.
    Stop,
    /// Sidecar to a waiting VMM, before anything is accepted: can this host run a VM with
    /// this CPU profile? `Ok` or `Error`.
    CheckCompat {
        /// The source VMM's CPU compatibility blob.
        cpu_profile: Vec<u8>,
    },
    /// Sidecar to a waiting VMM: the migrated memory (memfds ride along) and state; load,
    /// do not run.
    Load {
        /// The VM's id.
        vm_id: String,
        /// The migration (a VMM that loses its link while holding the loaded VM names it
        /// when it reattaches).
        session: SessionId,
        /// RAM regions, in memfd order.
        regions: Vec<RegionInfo>,
        /// The state blob from the source.
        blob: Vec<u8>,
    },
    /// VMM: loaded; vCPUs not running.
    Loaded,
    /// Sidecar: run the loaded VM.
    Start,
    /// VMM: the VM runs; `detail` is shown to the operator.
    Running {
        /// What the VMM checked.
        detail: String,
    },
    /// Sidecar: throw the loaded VM away.
    Discard,
}

impl Message for VmmMsg {
    const PROTOCOL: &'static str = "VMM";
    const MAGIC: u16 = VMM_MAGIC;

    fn tag(&self) -> u16 {
        match self {
            VmmMsg::Hello { .. } => 1,
            VmmMsg::Welcome { .. } => 2,
            VmmMsg::Refused { .. } => 3,
            VmmMsg::RegisterVm { .. } => 4,
            VmmMsg::AwaitIncoming { .. } => 5,
            VmmMsg::Ok => 6,
            VmmMsg::Error { .. } => 7,
            VmmMsg::StartDirtyLog => 8,
            VmmMsg::TakeDirty { .. } => 9,
            VmmMsg::Dirty { .. } => 10,
            VmmMsg::Pause => 11,
            VmmMsg::Paused { .. } => 12,
            VmmMsg::SaveState => 13,
            VmmMsg::State { .. } => 14,
            VmmMsg::Fence(_) => 15,
            VmmMsg::Resume => 16,
            VmmMsg::Stop => 17,
            VmmMsg::CheckCompat { .. } => 18,
            VmmMsg::Load { .. } => 19,
            VmmMsg::Loaded => 20,
            VmmMsg::Start => 21,
            VmmMsg::Running { .. } => 22,
            VmmMsg::Discard => 23,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            VmmMsg::Hello { .. } => "Hello",
            VmmMsg::Welcome { .. } => "Welcome",
            VmmMsg::Refused { .. } => "Refused",
            VmmMsg::RegisterVm { .. } => "RegisterVm",
            VmmMsg::AwaitIncoming { .. } => "AwaitIncoming",
            VmmMsg::Ok => "Ok",
            VmmMsg::Error { .. } => "Error",
            VmmMsg::StartDirtyLog => "StartDirtyLog",
            VmmMsg::TakeDirty { .. } => "TakeDirty",
            VmmMsg::Dirty { .. } => "Dirty",
            VmmMsg::Pause => "Pause",
            VmmMsg::Paused { .. } => "Paused",
            VmmMsg::SaveState => "SaveState",
            VmmMsg::State { .. } => "State",
            VmmMsg::Fence(_) => "Fence",
            VmmMsg::Resume => "Resume",
            VmmMsg::Stop => "Stop",
            VmmMsg::CheckCompat { .. } => "CheckCompat",
            VmmMsg::Load { .. } => "Load",
            VmmMsg::Loaded => "Loaded",
            VmmMsg::Start => "Start",
            VmmMsg::Running { .. } => "Running",
            VmmMsg::Discard => "Discard",
        }
    }

    fn encode(&self, w: &mut Writer) {
        match self {
            VmmMsg::Hello { version } | VmmMsg::Welcome { version } => {
                w.u16(*version);
            }
            VmmMsg::Refused { reason: s }
            | VmmMsg::Error { message: s }
            | VmmMsg::Running { detail: s } => {
                w.text(s);
            }
            VmmMsg::RegisterVm {
                vm_id,
                regions,
                cpu_profile,
                fence,
            } => {
                w.str(vm_id);
                put_regions(w, regions);
                w.bytes(cpu_profile);
                w.opt(fence.as_ref(), |w, f| {
                    w.session(&f.session).str(&f.to);
                });
            }
            VmmMsg::AwaitIncoming { vm_id, held } => {
                w.str(vm_id);
                w.opt(held.as_ref(), |w, s| {
                    w.session(s);
                });
            }
            VmmMsg::TakeDirty { final_round } => {
                w.bool(*final_round);
            }
            VmmMsg::Dirty { bitmaps } => {
                w.u32(bitmaps.len() as u32);
                for b in bitmaps {
                    w.u32(b.len() as u32);
                    for word in b {
                        w.u64(*word);
                    }
                }
            }
            VmmMsg::Paused { pause_us } => {
                w.u64(*pause_us);
            }
            VmmMsg::State { blob } | VmmMsg::CheckCompat { cpu_profile: blob } => {
                w.bytes(blob);
            }
            VmmMsg::Fence(f) => {
                w.session(&f.session).str(&f.to);
            }
            VmmMsg::Load {
                vm_id,
                session,
                regions,
                blob,
            } => {
                w.str(vm_id).session(session);
                put_regions(w, regions);
                w.bytes(blob);
            }
            VmmMsg::Ok
            | VmmMsg::StartDirtyLog
            | VmmMsg::Pause
            | VmmMsg::SaveState
            | VmmMsg::Resume
            | VmmMsg::Stop
            | VmmMsg::Loaded
            | VmmMsg::Start
            | VmmMsg::Discard => {}
        }
    }

    fn decode(tag: u16, r: &mut Reader<'_>) -> Result<Self, ProtoError> {
        let fence = |r: &mut Reader<'_>| -> Result<Fence, ProtoError> {
            Ok(Fence {
                session: r.session()?,
                to: r.str(MAX_STR)?,
            })
        };
        Ok(match tag {
            1 => VmmMsg::Hello { version: r.u16()? },
            2 => VmmMsg::Welcome { version: r.u16()? },
            3 => VmmMsg::Refused {
                reason: r.str(MAX_STR)?,
            },
            4 => VmmMsg::RegisterVm {
                vm_id: get_vm_id(r)?,
                regions: get_regions(r)?,
                cpu_profile: r.bytes(MAX_BLOB)?.to_vec(),
                fence: r.opt("fence flag", fence)?,
            },
            5 => VmmMsg::AwaitIncoming {
                vm_id: get_vm_id(r)?,
                held: r.opt("held flag", Reader::session)?,
            },
            6 => VmmMsg::Ok,
            7 => VmmMsg::Error {
                message: r.str(MAX_STR)?,
            },
            8 => VmmMsg::StartDirtyLog,
            9 => VmmMsg::TakeDirty {
                final_round: r.bool("final_round")?,
            },
            10 => {
                let n = r.count(MAX_REGIONS, 4)?;
                let mut bitmaps = Vec::with_capacity(n);
                for _ in 0..n {
                    let words = r.count(MAX_FRAME / 8, 8)?;
                    bitmaps.push((0..words).map(|_| r.u64()).collect::<Result<_, _>>()?);
                }
                VmmMsg::Dirty { bitmaps }
            }
            11 => VmmMsg::Pause,
            12 => VmmMsg::Paused { pause_us: r.u64()? },
            13 => VmmMsg::SaveState,
            14 => VmmMsg::State {
                blob: r.bytes(MAX_BLOB)?.to_vec(),
            },
            15 => VmmMsg::Fence(fence(r)?),
            16 => VmmMsg::Resume,
            17 => VmmMsg::Stop,
            18 => VmmMsg::CheckCompat {
                cpu_profile: r.bytes(MAX_BLOB)?.to_vec(),
            },
            19 => VmmMsg::Load {
                vm_id: get_vm_id(r)?,
                session: r.session()?,
                regions: get_regions(r)?,
                blob: r.bytes(MAX_BLOB)?.to_vec(),
            },
            20 => VmmMsg::Loaded,
            21 => VmmMsg::Start,
            22 => VmmMsg::Running {
                detail: r.str(MAX_STR)?,
            },
            23 => VmmMsg::Discard,
            tag => {
                return Err(ProtoError::UnknownTag {
                    protocol: Self::PROTOCOL,
                    tag,
                })
            }
        })
    }
}

/// Maps a reply that is not what the protocol expects to an error (a `Refused` or
/// `Error` reply carries the other side's reason).
pub fn unexpected(expected: &'static str, got: VmmMsg) -> ProtoError {
    match got {
        VmmMsg::Refused { reason } | VmmMsg::Error { message: reason } => {
            ProtoError::Refused { reason }
        }
        other => ProtoError::Unexpected {
            expected,
            got: other.name(),
        },
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::common::decode_payload;

    pub(crate) fn samples() -> Vec<VmmMsg> {
        let regions = vec![RegionInfo {
            gpa: 0x1000_0000,
            size: 1 << 30,
            offset: 0,
        }];
        let fence = Fence {
            session: SessionId([3; 16]),
            to: "10.0.0.2:7780".into(),
        };
        vec![
            VmmMsg::Hello { version: 2 },
            VmmMsg::Welcome { version: 2 },
            VmmMsg::Refused {
                reason: "no".into(),
            },
            VmmMsg::RegisterVm {
                vm_id: "vm1".into(),
                regions: regions.clone(),
                cpu_profile: vec![1, 2, 3],
                fence: None,
            },
            VmmMsg::RegisterVm {
                vm_id: "vm1".into(),
                regions: regions.clone(),
                cpu_profile: vec![],
                fence: Some(fence.clone()),
            },
            VmmMsg::AwaitIncoming {
                vm_id: "vm1".into(),
                held: None,
            },
            VmmMsg::AwaitIncoming {
                vm_id: "vm1".into(),
                held: Some(SessionId([9; 16])),
            },
            VmmMsg::Ok,
            VmmMsg::Error {
                message: "bad".into(),
            },
            VmmMsg::StartDirtyLog,
            VmmMsg::TakeDirty { final_round: true },
            VmmMsg::Dirty {
                bitmaps: vec![vec![1, 2, u64::MAX], vec![]],
            },
            VmmMsg::Pause,
            VmmMsg::Paused { pause_us: 38 },
            VmmMsg::SaveState,
            VmmMsg::State { blob: vec![7; 100] },
            VmmMsg::Fence(fence),
            VmmMsg::Resume,
            VmmMsg::Stop,
            VmmMsg::CheckCompat {
                cpu_profile: vec![1, 2, 3],
            },
            VmmMsg::Load {
                vm_id: "vm1".into(),
                session: SessionId([4; 16]),
                regions,
                blob: vec![1],
            },
            VmmMsg::Loaded,
            VmmMsg::Start,
            VmmMsg::Running {
                detail: "ok".into(),
            },
            VmmMsg::Discard,
        ]
    }

    #[test]
    fn every_message_round_trips_and_rejects_cut_or_extended_payloads() {
        crate::common::assert_round_trips(samples(), 23);
        assert!(matches!(
            decode_payload::<VmmMsg>(0, &[]),
            Err(ProtoError::UnknownTag { tag: 0, .. })
        ));
    }

    #[test]
    fn hostile_counts_and_ids_are_refused_before_allocation() {
        // A Dirty message claiming 1024 bitmaps of 2^29 words each, with no data.
        let mut w = Writer::new();
        w.u32(1024).u32(1 << 29);
        assert!(decode_payload::<VmmMsg>(10, &w.finish()).is_err());
        // A registration whose VM id would escape the state directory.
        let mut w = Writer::new();
        w.str("../escaped").u32(0).bytes(&[]).u8(0);
        assert!(matches!(
            decode_payload::<VmmMsg>(4, &w.finish()),
            Err(ProtoError::BadVmId { .. })
        ));
    }
}
