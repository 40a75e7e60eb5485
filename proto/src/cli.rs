//! The CLI protocol: between the `ferry` command and the local daemon, on the sidecar's
//! Unix socket. One request per connection; `Migrate` is followed by `Progress` messages
//! and one `Summary`.

use ferry_engine::session::VerifyMode;

use crate::codec::{Reader, Writer};
use crate::common::{get_vm_id, Message, CLI_MAGIC, MAX_BLOB, MAX_STR};
use crate::ProtoError;

/// What pre-copy does at its round limit or timeout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnLimit {
    /// Give up; the source VM keeps running.
    Abort = 1,
    /// Pause anyway and copy the rest.
    Force = 2,
}

/// Which data transport a migration uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransportChoice {
    /// RDMA when both sides have a usable device, the source allows it for this
    /// destination (`--rdma-peer`) and the QPs connect; else TCP.
    Auto = 1,
    /// Multi-stream TCP.
    Tcp = 2,
    /// RDMA READ pull; fail if unavailable.
    Rdma = 3,
}

/// Where a migration waits in its source's queue relative to others.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Priority {
    /// Ahead of normal and low.
    High = 1,
    /// The default.
    Normal = 2,
    /// After high and normal.
    Low = 3,
}

impl Priority {
    /// The name `--priority` takes and status shows.
    pub fn name(self) -> &'static str {
        match self {
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
        }
    }
}

/// Options of one migration, as the CLI passes them to the source sidecar.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MigrateRequest {
    /// The registered VM to move.
    pub vm_id: String,
    /// Destination sidecar's peer address, `host:port`.
    pub to: String,
    /// Data channels (TCP streams or RDMA queue pairs).
    pub channels: u16,
    /// Downtime budget in milliseconds.
    pub downtime_ms: u32,
    /// Most pre-copy rounds.
    pub max_rounds: u32,
    /// Pre-copy timeout in milliseconds.
    pub timeout_ms: u64,
    /// What happens at the round limit or timeout.
    pub on_limit: OnLimit,
    /// Transport selection.
    pub transport: TransportChoice,
    /// Observation window before round 1, in ms: pages written during it go last.
    pub observe_ms: u32,
    /// When digests are compared.
    pub verify: VerifyMode,
    /// Its place in the queue.
    pub priority: Priority,
    /// Its own bandwidth cap in MiB/s (0: none; the host's cap applies anyway).
    pub max_bandwidth_mibps: u32,
    /// Post-copy (Cloud Hypervisor VMs): the VM moves at once and its memory is pulled
    /// after it runs at the destination, which depends on both hosts until the pull ends.
    pub postcopy: bool,
}

/// What `ferry recover` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecoverMode {
    /// Deliver the recorded commit decision (or retry a failed start at the destination).
    Deliver = 1,
    /// Roll the decision back: the destination must confirm it discarded its copy, then the
    /// source VM resumes.
    Abort = 2,
    /// Roll back without the destination's confirmation (the operator checked it).
    ForceAbort = 3,
}

/// Where a migration is, for progress display.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Handshake and destination preparation.
    Preparing = 1,
    /// A pre-copy round.
    Precopy = 2,
    /// The VM is paused; final copy.
    StopAndCopy = 3,
    /// Digests compared, waiting for the destination.
    Verifying = 4,
    /// Done.
    Done = 5,
    /// Waiting in the queue for a free slot here and at the destination.
    Queued = 6,
    /// Post-copy: the VM runs at the destination, which pulls its memory.
    Postcopy = 7,
}

/// Progress numbers meaning "not known yet".
pub const UNKNOWN: u64 = u64::MAX;

/// A message of the CLI protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CliMsg {
    /// CLI, first message: the protocol version it speaks.
    Hello {
        /// Protocol version.
        version: u16,
    },
    /// Daemon: accepted.
    Welcome {
        /// Protocol version the daemon speaks.
        version: u16,
    },
    /// Daemon: refused; it closes the connection after this.
    Refused {
        /// Why.
        reason: String,
    },
    /// A request failed.
    Error {
        /// What failed.
        message: String,
    },
    /// CLI: migrate a VM.
    Migrate(MigrateRequest),
    /// Daemon: progress of the migration.
    Progress {
        /// Phase.
        phase: Phase,
        /// Current round.
        round: u32,
        /// Bytes of this round done.
        round_done: u64,
        /// Bytes this round moves.
        round_total: u64,
        /// Bytes moved so far in the whole migration.
        total_done: u64,
        /// Bytes per second over the last second ([`UNKNOWN`] before anything moved).
        rate: u64,
        /// How fast the guest dirties memory, bytes per second ([`UNKNOWN`] before round 2).
        dirty_rate: u64,
        /// The final copy's expected length now, in ms ([`UNKNOWN`] before round 2).
        expected_downtime_ms: u64,
    },
    /// Daemon: the migration's summary as a JSON object.
    Summary {
        /// JSON text.
        json: String,
    },
    /// CLI: what the daemon holds.
    Status,
    /// Daemon: status as a JSON object.
    StatusReport {
        /// JSON text.
        json: String,
    },
    /// CLI: settle a VM's recorded but unconfirmed commit decision.
    Recover {
        /// The VM.
        vm_id: String,
        /// Deliver it, or roll it back.
        mode: RecoverMode,
    },
    /// Daemon: the recovery's result, for the operator.
    Recovered {
        /// What happened.
        detail: String,
    },
    /// CLI: cancel a queued or running migration (refused after its commit decision).
    Cancel {
        /// The VM.
        vm_id: String,
    },
    /// CLI: change a queued or running migration's bandwidth cap.
    SetBandwidth {
        /// The VM.
        vm_id: String,
        /// MiB/s; 0 removes the migration's own cap (the host's still applies).
        mibps: u32,
    },
    /// CLI: attach a Cloud Hypervisor VM (`ferry ch register`) or a CH waiting for one
    /// (`ferry ch await`) by its API socket.
    ChAttach {
        /// The VM's id here.
        vm_id: String,
        /// CH's `--api-socket`.
        api_socket: String,
        /// Waits for an incoming VM.
        incoming: bool,
    },
    /// Daemon: a request (cancel, set-bandwidth) was carried out.
    Done {
        /// What happened.
        detail: String,
    },
}

fn get_enum<T>(r: &mut Reader<'_>, what: &'static str, map: &[T]) -> Result<T, ProtoError>
where
    T: Copy,
{
    let v = r.u8()?;
    v.checked_sub(1)
        .and_then(|i| map.get(usize::from(i)).copied())
        .ok_or(ProtoError::BadValue {
            what,
            value: u64::from(v),
        })
}

impl Message for CliMsg {
    const PROTOCOL: &'static str = "CLI";
    const MAGIC: u16 = CLI_MAGIC;

    fn tag(&self) -> u16 {
        match self {
            CliMsg::Hello { .. } => 1,
            CliMsg::Welcome { .. } => 2,
            CliMsg::Refused { .. } => 3,
            CliMsg::Error { .. } => 4,
            CliMsg::Migrate(_) => 5,
            CliMsg::Progress { .. } => 6,
            CliMsg::Summary { .. } => 7,
            CliMsg::Status => 8,
            CliMsg::StatusReport { .. } => 9,
            CliMsg::Recover { .. } => 10,
            CliMsg::Recovered { .. } => 11,
            CliMsg::Cancel { .. } => 12,
            CliMsg::SetBandwidth { .. } => 13,
            CliMsg::Done { .. } => 14,
            CliMsg::ChAttach { .. } => 15,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            CliMsg::Hello { .. } => "Hello",
            CliMsg::Welcome { .. } => "Welcome",
            CliMsg::Refused { .. } => "Refused",
            CliMsg::Error { .. } => "Error",
            CliMsg::Migrate(_) => "Migrate",
            CliMsg::Progress { .. } => "Progress",
            CliMsg::Summary { .. } => "Summary",
            CliMsg::Status => "Status",
            CliMsg::StatusReport { .. } => "StatusReport",
            CliMsg::Recover { .. } => "Recover",
            CliMsg::Recovered { .. } => "Recovered",
            CliMsg::Cancel { .. } => "Cancel",
            CliMsg::SetBandwidth { .. } => "SetBandwidth",
            CliMsg::Done { .. } => "Done",
            CliMsg::ChAttach { .. } => "ChAttach",
        }
    }

    fn encode(&self, w: &mut Writer) {
        match self {
            CliMsg::Hello { version } | CliMsg::Welcome { version } => {
                w.u16(*version);
            }
            CliMsg::Refused { reason: s }
            | CliMsg::Error { message: s }
            | CliMsg::Recovered { detail: s }
            | CliMsg::Done { detail: s } => {
                w.text(s);
            }
            CliMsg::Cancel { vm_id } => {
                w.str(vm_id);
            }
            CliMsg::SetBandwidth { vm_id, mibps } => {
                w.str(vm_id).u32(*mibps);
            }
            CliMsg::ChAttach {
                vm_id,
                api_socket,
                incoming,
            } => {
                w.str(vm_id).str(api_socket).bool(*incoming);
            }
            CliMsg::Summary { json } | CliMsg::StatusReport { json } => {
                w.bytes(json.as_bytes());
            }
            CliMsg::Migrate(m) => {
                w.str(&m.vm_id)
                    .str(&m.to)
                    .u16(m.channels)
                    .u32(m.downtime_ms)
                    .u32(m.max_rounds)
                    .u64(m.timeout_ms)
                    .u8(m.on_limit as u8)
                    .u8(m.transport as u8)
                    .u32(m.observe_ms)
                    .u8(match m.verify {
                        VerifyMode::Strict => 1,
                        VerifyMode::AfterResume => 2,
                    })
                    .u8(m.priority as u8)
                    .u32(m.max_bandwidth_mibps)
                    .bool(m.postcopy);
            }
            CliMsg::Progress {
                phase,
                round,
                round_done,
                round_total,
                total_done,
                rate,
                dirty_rate,
                expected_downtime_ms,
            } => {
                w.u8(*phase as u8)
                    .u32(*round)
                    .u64(*round_done)
                    .u64(*round_total)
                    .u64(*total_done)
                    .u64(*rate)
                    .u64(*dirty_rate)
                    .u64(*expected_downtime_ms);
            }
            CliMsg::Recover { vm_id, mode } => {
                w.str(vm_id).u8(*mode as u8);
            }
            CliMsg::Status => {}
        }
    }

    fn decode(tag: u16, r: &mut Reader<'_>) -> Result<Self, ProtoError> {
        let json = |r: &mut Reader<'_>| {
            String::from_utf8(r.bytes(MAX_BLOB)?.to_vec())
                .map_err(|_| ProtoError::BadUtf8 { what: "json" })
        };
        Ok(match tag {
            1 => CliMsg::Hello { version: r.u16()? },
            2 => CliMsg::Welcome { version: r.u16()? },
            3 => CliMsg::Refused {
                reason: r.str(MAX_STR)?,
            },
            4 => CliMsg::Error {
                message: r.str(MAX_STR)?,
            },
            5 => CliMsg::Migrate(MigrateRequest {
                vm_id: get_vm_id(r)?,
                to: r.str(MAX_STR)?,
                channels: r.u16()?,
                downtime_ms: r.u32()?,
                max_rounds: r.u32()?,
                timeout_ms: r.u64()?,
                on_limit: get_enum(r, "on_limit", &[OnLimit::Abort, OnLimit::Force])?,
                transport: get_enum(
                    r,
                    "transport",
                    &[
                        TransportChoice::Auto,
                        TransportChoice::Tcp,
                        TransportChoice::Rdma,
                    ],
                )?,
                observe_ms: r.u32()?,
                verify: get_enum(r, "verify", &[VerifyMode::Strict, VerifyMode::AfterResume])?,
                priority: get_enum(
                    r,
                    "priority",
                    &[Priority::High, Priority::Normal, Priority::Low],
                )?,
                max_bandwidth_mibps: r.u32()?,
                postcopy: r.bool("postcopy")?,
            }),
            6 => CliMsg::Progress {
                phase: get_enum(
                    r,
                    "phase",
                    &[
                        Phase::Preparing,
                        Phase::Precopy,
                        Phase::StopAndCopy,
                        Phase::Verifying,
                        Phase::Done,
                        Phase::Queued,
                        Phase::Postcopy,
                    ],
                )?,
                round: r.u32()?,
                round_done: r.u64()?,
                round_total: r.u64()?,
                total_done: r.u64()?,
                rate: r.u64()?,
                dirty_rate: r.u64()?,
                expected_downtime_ms: r.u64()?,
            },
            7 => CliMsg::Summary { json: json(r)? },
            8 => CliMsg::Status,
            9 => CliMsg::StatusReport { json: json(r)? },
            10 => CliMsg::Recover {
                vm_id: get_vm_id(r)?,
                mode: get_enum(
                    r,
                    "recover mode",
                    &[
                        RecoverMode::Deliver,
                        RecoverMode::Abort,
                        RecoverMode::ForceAbort,
                    ],
                )?,
            },
            11 => CliMsg::Recovered {
                detail: r.str(MAX_STR)?,
            },
            12 => CliMsg::Cancel {
                vm_id: get_vm_id(r)?,
            },
            13 => CliMsg::SetBandwidth {
                vm_id: get_vm_id(r)?,
                mibps: r.u32()?,
            },
            14 => CliMsg::Done {
                detail: r.str(MAX_STR)?,
            },
            15 => CliMsg::ChAttach {
                vm_id: get_vm_id(r)?,
                api_socket: r.str(MAX_STR)?,
                incoming: r.bool("incoming")?,
            },
            tag => {
                return Err(ProtoError::UnknownTag {
                    protocol: Self::PROTOCOL,
                    tag,
                })
            }
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::common::decode_payload;

    pub(crate) fn samples() -> Vec<CliMsg> {
        vec![
            CliMsg::Hello { version: 2 },
            CliMsg::Welcome { version: 2 },
            CliMsg::Refused { reason: "r".into() },
            CliMsg::Error {
                message: "e".into(),
            },
            CliMsg::Migrate(MigrateRequest {
                vm_id: "vm1".into(),
                to: "10.0.0.2:7000".into(),
                channels: 4,
                downtime_ms: 300,
                max_rounds: 30,
                timeout_ms: 60_000,
                on_limit: OnLimit::Force,
                transport: TransportChoice::Auto,
                observe_ms: 100,
                verify: VerifyMode::Strict,
                priority: Priority::Low,
                max_bandwidth_mibps: 100,
                postcopy: true,
            }),
            CliMsg::Progress {
                phase: Phase::Queued,
                round: 2,
                round_done: 5,
                round_total: 10,
                total_done: 100,
                rate: 7,
                dirty_rate: UNKNOWN,
                expected_downtime_ms: 12,
            },
            CliMsg::Summary { json: "{}".into() },
            CliMsg::Status,
            CliMsg::StatusReport { json: "{}".into() },
            CliMsg::Recover {
                vm_id: "vm1".into(),
                mode: RecoverMode::ForceAbort,
            },
            CliMsg::Recovered { detail: "d".into() },
            CliMsg::Cancel {
                vm_id: "vm1".into(),
            },
            CliMsg::SetBandwidth {
                vm_id: "vm1".into(),
                mibps: 50,
            },
            CliMsg::Done { detail: "d".into() },
            CliMsg::ChAttach {
                vm_id: "vm1".into(),
                api_socket: "/run/ch.sock".into(),
                incoming: true,
            },
        ]
    }

    #[test]
    fn every_message_round_trips_and_rejects_cut_or_extended_payloads() {
        crate::common::assert_round_trips(samples(), 15);
        // Enum bytes outside their range.
        let mut w = Writer::new();
        w.str("vm1").u8(0);
        assert!(matches!(
            decode_payload::<CliMsg>(10, &w.finish()),
            Err(ProtoError::BadValue {
                what: "recover mode",
                ..
            })
        ));
    }
}
