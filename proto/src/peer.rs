//! The peer protocol: between two sidecars, on control and data connections (inside TLS,
//! or after [`crate::auth`]'s handshake in `--insecure-psk` mode).
//!
//! ```text
//! source sidecar                                   destination sidecar
//!   [TLS 1.3, mutual certificates]  or  [PskHello/PskChallenge/PskProof/PskWelcome]
//!   Hello{version}                 ---->               (TLS mode)
//!                                  <----   Welcome{version}
//!   Offer{vm, layout, channels, transports, cpu, session} ---->
//!                                  <----   Accept{prepare_us} | Busy{running, limit} | Refused{reason}
//!   N data connections: DataHello{session, channel} -> DataChallenge{nonce}
//!                       -> DataProof{HMAC(session key, "ferry-data" | session | channel | nonce)}
//!                       -> DataOk
//!   [RdmaOffer -> RdmaAnswer | RdmaUnavailable]
//!   per window: RoundStart{round} -> (TCP: data frames | RDMA: PullRanges...)
//!                                  <----   RoundDone{round, pages, torn} | RdmaFailed
//!   StateBlob{blob}                ---->               (the VMM loads, does not run)
//!                                  <----   Ready{digest}
//!   (decision recorded: COMMIT POINT)
//!   Commit                         ---->               (recorded, then Start)
//!                                  <----   Running{detail} | StartFailed{reason}
//!   any failure before the commit point: Abort{reason} ----> (Discard)
//!                                  <----   Discarded (once the VM was loaded)
//!   on a fresh connection later (a replayed decision, or a release of an aborted
//!   migration's copy): Decision{session, commit} ---->
//!                                  <----   Running | StartFailed | Discarded | Refused
//! ```
//!
//! Byte by byte, with every check and refusal: `docs/peer-protocol.md`.

use ferry_engine::digest::MemoryDigest;
use ferry_engine::plan::PageRange;
use ferry_engine::session::SessionId;

use crate::codec::{Reader, Writer};
use crate::common::{
    get_regions, get_vm_id, put_regions, Message, RegionInfo, MAX_BLOB, MAX_FRAME, MAX_REGIONS,
    MAX_STR, PEER_MAGIC,
};
use crate::ProtoError;

/// Most page ranges one `PullRanges` message may carry: 65,536 ranges x 20 bytes =
/// 1.25 MiB, so a round's list streams in pieces the destination pulls as they come.
pub const MAX_PULL_RANGES: usize = 65_536;
/// Most page ranges an `RdmaFailed` may hand back (a round's whole list at worst): as
/// many 20-byte ranges as fit one frame with room for its other fields (3,355,443; a
/// round more fragmented than that fails over to TCP by aborting instead).
pub const MAX_UNFINISHED: usize = MAX_BLOB / 20;
/// Pages one round may report as torn: more than this means the link corrupts data,
/// not that the guest raced a send, and the migration aborts.
pub const MAX_TORN: usize = 65_536;

/// Bit of [`PeerMsg::Offer`]'s `transports` for TCP.
pub const OFFER_TCP: u8 = 1 << 1;
/// Bit of [`PeerMsg::Offer`]'s `transports` for RDMA.
pub const OFFER_RDMA: u8 = 1 << 2;

/// A message of the peer protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerMsg {
    /// Connecting side, first message inside TLS: its protocol version.
    Hello {
        /// Protocol version.
        version: u16,
    },
    /// Listening side: accepted.
    Welcome {
        /// Protocol version.
        version: u16,
    },
    /// A refusal; the sender closes the connection after it.
    Refused {
        /// Why.
        reason: String,
    },
    /// `--insecure-psk`: the connecting side's greeting with its challenge.
    PskHello {
        /// Protocol version.
        version: u16,
        /// Challenge for the listener.
        nonce: [u8; 32],
    },
    /// `--insecure-psk`: the listener's challenge (no proof yet: a peer that does not
    /// know the key learns nothing it could test guesses against).
    PskChallenge {
        /// Protocol version.
        version: u16,
        /// Challenge for the connecting side.
        nonce: [u8; 32],
    },
    /// `--insecure-psk`: the connecting side's proof.
    PskProof {
        /// HMAC proving the connecting side knows the key.
        proof: [u8; 32],
    },
    /// `--insecure-psk`: accepted, with the listener's proof.
    PskWelcome {
        /// HMAC proving the listener knows the key.
        proof: [u8; 32],
    },
    /// Source to destination: a migration proposal.
    Offer {
        /// The VM's id.
        vm_id: String,
        /// Guest page size.
        page_size: u32,
        /// Region layout (gpa, size); offsets are the destination's own.
        regions: Vec<RegionInfo>,
        /// Data channels wanted.
        channels: u16,
        /// Transports the source can use ([`OFFER_TCP`], [`OFFER_RDMA`]).
        transports: u8,
        /// The source VMM's CPU compatibility blob.
        cpu_profile: Vec<u8>,
        /// The migration's id.
        session: SessionId,
        /// Size of the pages behind the source VM's RAM: 4096, or the huge page size of
        /// hugetlbfs memfds (the destination backs its copy with the same).
        backing_page_size: u64,
    },
    /// Destination: ready for data.
    Accept {
        /// How long preparing (populating) the destination memory took.
        prepare_us: u64,
    },
    /// First frame of a data connection.
    DataHello {
        /// The migration it belongs to.
        session: SessionId,
        /// Channel index.
        channel: u16,
    },
    /// Destination: a fresh challenge for this data connection.
    DataChallenge {
        /// Nonce.
        nonce: [u8; 32],
    },
    /// Source: `HMAC(session key, "ferry-data" | session | channel | nonce)`.
    DataProof {
        /// The proof.
        proof: [u8; 32],
    },
    /// Destination: the data connection is bound to the session.
    DataOk,
    /// Source: a window (wire round) begins.
    RoundStart {
        /// Wire round number.
        round: u32,
        /// Whether the source VM is paused.
        final_round: bool,
    },
    /// Destination: every channel delivered the round.
    RoundDone {
        /// Wire round number.
        round: u32,
        /// Pages received (payload and zero markers).
        pages: u64,
        /// Payload bytes received.
        bytes: u64,
        /// Pages whose checksum did not match.
        torn: Vec<PageRange>,
        /// CPU time the destination's data threads spent on the round, in µs: all of it,
        /// hashing pages, filling fresh memory (zero over RDMA).
        cpu_us: [u64; 3],
    },
    /// Source: the VM state blob.
    StateBlob {
        /// State bytes.
        blob: Vec<u8>,
    },
    /// Destination: loaded (vCPUs not running), and its memory digest.
    Ready {
        /// Digest of the received memory.
        digest: MemoryDigest,
    },
    /// Source: the decision is recorded: run the VM.
    Commit,
    /// Source: give up and discard.
    Abort {
        /// Why.
        reason: String,
    },
    /// Destination: the VM runs.
    Running {
        /// What the destination VMM checked.
        detail: String,
    },
    /// Destination: the VM could not start; the loaded copy is kept.
    StartFailed {
        /// Why.
        reason: String,
    },
    /// Destination: its copy of the session's VM is thrown away (answer to a roll-back).
    Discarded,
    /// Source, on a fresh connection: the decision for a session whose `Commit` (or roll-
    /// back) may not have arrived.
    Decision {
        /// The migration.
        session: SessionId,
        /// True: run the VM. False: discard it (the source resumes its own).
        commit: bool,
    },
    /// Source: its RDMA export (QP endpoints and read-only rkeys), opaque to the sidecar.
    RdmaOffer {
        /// Encoded by `ferry_verbs::RdmaExport::offer`.
        blob: Vec<u8>,
    },
    /// Destination: its QP endpoints; RDMA READ is the data path from now on.
    RdmaAnswer {
        /// Encoded by `ferry_verbs::RdmaPuller::new`.
        blob: Vec<u8>,
    },
    /// Either side: RDMA cannot be used; the migration goes over TCP.
    RdmaUnavailable {
        /// Why, for the summary.
        reason: String,
    },
    /// Source: ranges the destination pulls with RDMA READ for `round`.
    PullRanges {
        /// Wire round number.
        round: u32,
        /// The ranges.
        ranges: Vec<PageRange>,
        /// Whether this is the round's last piece of the list.
        last: bool,
    },
    /// Destination: RDMA failed in `round`; these ranges were not confirmed and must be
    /// re-sent over TCP, which carries the rest of the migration.
    RdmaFailed {
        /// Wire round number.
        round: u32,
        /// What failed.
        reason: String,
        /// Pages confirmed by RDMA in this round before the failure.
        confirmed_pages: u64,
        /// Ranges not confirmed.
        unfinished: Vec<PageRange>,
    },
    /// Source, first request of a control connection for a Cloud Hypervisor VM: from here
    /// on the control connection carries the source CH's migration protocol byte for
    /// byte, and each data connection one of its memory connections
    /// (`docs/cloud-hypervisor.md`). Answered `Accept`, `Busy` or `Refused`.
    ChOffer {
        /// The VM (registered with `ferry ch await` at the destination).
        vm_id: String,
        /// The migration.
        session: SessionId,
        /// Data connections the source opens after `Accept`.
        channels: u16,
        /// Post-copy: the source CH hands its memory to the source sidecar (local mode)
        /// and the destination pulls it after the VM runs there; the data connections
        /// carry page requests and their bytes instead of CH's memory connections.
        postcopy: bool,
    },
    /// Source, first request of a control connection, `ferry recover` of a CH VM whose
    /// decision is recorded: what became of `vm_id` at the destination in `session`?
    /// Answered `ChState`.
    ChQuery {
        /// The VM.
        vm_id: String,
        /// The migration.
        session: SessionId,
    },
    /// Destination: the answer to `ChQuery`, from the destination CH itself.
    ChState {
        /// [`CH_UNKNOWN`] (no record of that session), [`CH_RUNNING`], [`CH_PAUSED`]
        /// (restored, not running), [`CH_ABSENT`] (the destination CH has no VM, or is
        /// gone).
        state: u8,
        /// What the destination saw, for the operator.
        detail: String,
    },
    /// Destination, instead of `Accept`: it runs as many incoming migrations as it allows
    /// (`max_incoming`); the source keeps the migration queued and offers it again later.
    Busy {
        /// Incoming migrations running there now.
        running: u32,
        /// Its limit.
        limit: u32,
    },
}

/// `ChState`: the destination has no record of that session.
pub const CH_UNKNOWN: u8 = 0;
/// `ChState`: the destination CH runs the VM.
pub const CH_RUNNING: u8 = 1;
/// `ChState`: the destination CH holds the VM restored but not running.
pub const CH_PAUSED: u8 = 2;
/// `ChState`: the destination CH has no VM (it abandoned it, or is gone).
pub const CH_ABSENT: u8 = 3;

impl Message for PeerMsg {
    const PROTOCOL: &'static str = "peer";
    const MAGIC: u16 = PEER_MAGIC;

    fn tag(&self) -> u16 {
        match self {
            PeerMsg::Hello { .. } => 1,
            PeerMsg::Welcome { .. } => 2,
            PeerMsg::Refused { .. } => 3,
            PeerMsg::PskHello { .. } => 4,
            PeerMsg::PskChallenge { .. } => 5,
            PeerMsg::PskProof { .. } => 6,
            PeerMsg::PskWelcome { .. } => 7,
            PeerMsg::Offer { .. } => 8,
            PeerMsg::Accept { .. } => 9,
            PeerMsg::DataHello { .. } => 10,
            PeerMsg::DataChallenge { .. } => 11,
            PeerMsg::DataProof { .. } => 12,
            PeerMsg::DataOk => 13,
            PeerMsg::RoundStart { .. } => 14,
            PeerMsg::RoundDone { .. } => 15,
            PeerMsg::StateBlob { .. } => 16,
            PeerMsg::Ready { .. } => 17,
            PeerMsg::Commit => 18,
            PeerMsg::Abort { .. } => 19,
            PeerMsg::Running { .. } => 20,
            PeerMsg::StartFailed { .. } => 21,
            PeerMsg::Discarded => 22,
            PeerMsg::Decision { .. } => 23,
            PeerMsg::RdmaOffer { .. } => 24,
            PeerMsg::RdmaAnswer { .. } => 25,
            PeerMsg::RdmaUnavailable { .. } => 26,
            PeerMsg::PullRanges { .. } => 27,
            PeerMsg::RdmaFailed { .. } => 28,
            PeerMsg::Busy { .. } => 29,
            PeerMsg::ChOffer { .. } => 30,
            PeerMsg::ChQuery { .. } => 31,
            PeerMsg::ChState { .. } => 32,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            PeerMsg::Hello { .. } => "Hello",
            PeerMsg::Welcome { .. } => "Welcome",
            PeerMsg::Refused { .. } => "Refused",
            PeerMsg::PskHello { .. } => "PskHello",
            PeerMsg::PskChallenge { .. } => "PskChallenge",
            PeerMsg::PskProof { .. } => "PskProof",
            PeerMsg::PskWelcome { .. } => "PskWelcome",
            PeerMsg::Offer { .. } => "Offer",
            PeerMsg::Accept { .. } => "Accept",
            PeerMsg::DataHello { .. } => "DataHello",
            PeerMsg::DataChallenge { .. } => "DataChallenge",
            PeerMsg::DataProof { .. } => "DataProof",
            PeerMsg::DataOk => "DataOk",
            PeerMsg::RoundStart { .. } => "RoundStart",
            PeerMsg::RoundDone { .. } => "RoundDone",
            PeerMsg::StateBlob { .. } => "StateBlob",
            PeerMsg::Ready { .. } => "Ready",
            PeerMsg::Commit => "Commit",
            PeerMsg::Abort { .. } => "Abort",
            PeerMsg::Running { .. } => "Running",
            PeerMsg::StartFailed { .. } => "StartFailed",
            PeerMsg::Discarded => "Discarded",
            PeerMsg::Decision { .. } => "Decision",
            PeerMsg::RdmaOffer { .. } => "RdmaOffer",
            PeerMsg::RdmaAnswer { .. } => "RdmaAnswer",
            PeerMsg::RdmaUnavailable { .. } => "RdmaUnavailable",
            PeerMsg::PullRanges { .. } => "PullRanges",
            PeerMsg::RdmaFailed { .. } => "RdmaFailed",
            PeerMsg::Busy { .. } => "Busy",
            PeerMsg::ChOffer { .. } => "ChOffer",
            PeerMsg::ChQuery { .. } => "ChQuery",
            PeerMsg::ChState { .. } => "ChState",
        }
    }

    fn encode(&self, w: &mut Writer) {
        match self {
            PeerMsg::Hello { version } | PeerMsg::Welcome { version } => {
                w.u16(*version);
            }
            PeerMsg::Refused { reason: s }
            | PeerMsg::Abort { reason: s }
            | PeerMsg::Running { detail: s }
            | PeerMsg::StartFailed { reason: s }
            | PeerMsg::RdmaUnavailable { reason: s } => {
                w.text(s);
            }
            PeerMsg::PskHello { version, nonce } | PeerMsg::PskChallenge { version, nonce } => {
                w.u16(*version).fixed(nonce);
            }
            PeerMsg::PskProof { proof }
            | PeerMsg::PskWelcome { proof }
            | PeerMsg::DataProof { proof } => {
                w.fixed(proof);
            }
            PeerMsg::DataChallenge { nonce } => {
                w.fixed(nonce);
            }
            PeerMsg::Offer {
                vm_id,
                page_size,
                regions,
                channels,
                transports,
                cpu_profile,
                session,
                backing_page_size,
            } => {
                w.str(vm_id).u32(*page_size);
                put_regions(w, regions);
                w.u16(*channels)
                    .u8(*transports)
                    .bytes(cpu_profile)
                    .session(session)
                    .u64(*backing_page_size);
            }
            PeerMsg::Accept { prepare_us } => {
                w.u64(*prepare_us);
            }
            PeerMsg::DataHello { session, channel } => {
                w.session(session).u16(*channel);
            }
            PeerMsg::RoundStart { round, final_round } => {
                w.u32(*round).bool(*final_round);
            }
            PeerMsg::RoundDone {
                round,
                pages,
                bytes,
                torn,
                cpu_us,
            } => {
                w.u32(*round).u64(*pages).u64(*bytes).ranges(torn);
                for c in cpu_us {
                    w.u64(*c);
                }
            }
            PeerMsg::StateBlob { blob }
            | PeerMsg::RdmaOffer { blob }
            | PeerMsg::RdmaAnswer { blob } => {
                w.bytes(blob);
            }
            PeerMsg::Ready { digest } => {
                w.u32(digest.regions.len() as u32);
                for r in &digest.regions {
                    w.u32(r.len() as u32);
                    for c in r {
                        w.u128(*c);
                    }
                }
            }
            PeerMsg::Decision { session, commit } => {
                w.session(session).bool(*commit);
            }
            PeerMsg::PullRanges {
                round,
                ranges,
                last,
            } => {
                w.u32(*round).bool(*last).ranges(ranges);
            }
            PeerMsg::RdmaFailed {
                round,
                reason,
                confirmed_pages,
                unfinished,
            } => {
                w.u32(*round)
                    .text(reason)
                    .u64(*confirmed_pages)
                    .ranges(unfinished);
            }
            PeerMsg::Busy { running, limit } => {
                w.u32(*running).u32(*limit);
            }
            PeerMsg::ChOffer {
                vm_id,
                session,
                channels,
                postcopy,
            } => {
                w.str(vm_id).session(session).u16(*channels).bool(*postcopy);
            }
            PeerMsg::ChQuery { vm_id, session } => {
                w.str(vm_id).session(session);
            }
            PeerMsg::ChState { state, detail } => {
                w.u8(*state).str(detail);
            }
            PeerMsg::DataOk | PeerMsg::Commit | PeerMsg::Discarded => {}
        }
    }

    fn decode(tag: u16, r: &mut Reader<'_>) -> Result<Self, ProtoError> {
        Ok(match tag {
            1 => PeerMsg::Hello { version: r.u16()? },
            2 => PeerMsg::Welcome { version: r.u16()? },
            3 => PeerMsg::Refused {
                reason: r.str(MAX_STR)?,
            },
            4 => PeerMsg::PskHello {
                version: r.u16()?,
                nonce: r.array()?,
            },
            5 => PeerMsg::PskChallenge {
                version: r.u16()?,
                nonce: r.array()?,
            },
            6 => PeerMsg::PskProof { proof: r.array()? },
            7 => PeerMsg::PskWelcome { proof: r.array()? },
            8 => PeerMsg::Offer {
                vm_id: get_vm_id(r)?,
                page_size: r.u32()?,
                regions: get_regions(r)?,
                channels: r.u16()?,
                transports: r.u8()?,
                cpu_profile: r.bytes(MAX_BLOB)?.to_vec(),
                session: r.session()?,
                backing_page_size: r.u64()?,
            },
            9 => PeerMsg::Accept {
                prepare_us: r.u64()?,
            },
            10 => PeerMsg::DataHello {
                session: r.session()?,
                channel: r.u16()?,
            },
            11 => PeerMsg::DataChallenge { nonce: r.array()? },
            12 => PeerMsg::DataProof { proof: r.array()? },
            13 => PeerMsg::DataOk,
            14 => PeerMsg::RoundStart {
                round: r.u32()?,
                final_round: r.bool("final_round")?,
            },
            15 => PeerMsg::RoundDone {
                round: r.u32()?,
                pages: r.u64()?,
                bytes: r.u64()?,
                torn: r.ranges(MAX_TORN)?,
                cpu_us: [r.u64()?, r.u64()?, r.u64()?],
            },
            16 => PeerMsg::StateBlob {
                blob: r.bytes(MAX_BLOB)?.to_vec(),
            },
            17 => {
                let n = r.count(MAX_REGIONS, 4)?;
                let mut regions = Vec::with_capacity(n);
                for _ in 0..n {
                    let c = r.count(MAX_FRAME / 16, 16)?;
                    regions.push((0..c).map(|_| r.u128()).collect::<Result<_, _>>()?);
                }
                PeerMsg::Ready {
                    digest: MemoryDigest { regions },
                }
            }
            18 => PeerMsg::Commit,
            19 => PeerMsg::Abort {
                reason: r.str(MAX_STR)?,
            },
            20 => PeerMsg::Running {
                detail: r.str(MAX_STR)?,
            },
            21 => PeerMsg::StartFailed {
                reason: r.str(MAX_STR)?,
            },
            22 => PeerMsg::Discarded,
            23 => PeerMsg::Decision {
                session: r.session()?,
                commit: r.bool("commit")?,
            },
            24 => PeerMsg::RdmaOffer {
                blob: r.bytes(MAX_BLOB)?.to_vec(),
            },
            25 => PeerMsg::RdmaAnswer {
                blob: r.bytes(MAX_BLOB)?.to_vec(),
            },
            26 => PeerMsg::RdmaUnavailable {
                reason: r.str(MAX_STR)?,
            },
            27 => {
                let round = r.u32()?;
                let last = r.bool("last")?;
                PeerMsg::PullRanges {
                    round,
                    last,
                    ranges: r.ranges(MAX_PULL_RANGES)?,
                }
            }
            28 => PeerMsg::RdmaFailed {
                round: r.u32()?,
                reason: r.str(MAX_STR)?,
                confirmed_pages: r.u64()?,
                unfinished: r.ranges(MAX_UNFINISHED)?,
            },
            29 => PeerMsg::Busy {
                running: r.u32()?,
                limit: r.u32()?,
            },
            30 => PeerMsg::ChOffer {
                vm_id: get_vm_id(r)?,
                session: r.session()?,
                channels: r.u16()?,
                postcopy: r.bool("postcopy")?,
            },
            31 => PeerMsg::ChQuery {
                vm_id: get_vm_id(r)?,
                session: r.session()?,
            },
            32 => PeerMsg::ChState {
                state: match r.u8()? {
                    s @ CH_UNKNOWN..=CH_ABSENT => s,
                    v => {
                        return Err(ProtoError::BadValue {
                            what: "CH VM state",
                            value: u64::from(v),
                        })
                    }
                },
                detail: r.str(MAX_STR)?,
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

/// Maps a reply that is not what the protocol expects to an error (a `Refused` reply
/// carries the peer's reason).
pub fn unexpected(expected: &'static str, got: PeerMsg) -> ProtoError {
    match got {
        PeerMsg::Refused { reason } => ProtoError::Refused { reason },
        other => ProtoError::Unexpected {
            expected,
            got: other.name(),
        },
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::common::{decode_payload, encode_payload};

    pub(crate) fn samples() -> Vec<PeerMsg> {
        let r = |region, first, count| PageRange {
            region,
            first,
            count,
        };
        vec![
            PeerMsg::Hello { version: 2 },
            PeerMsg::Welcome { version: 2 },
            PeerMsg::Refused { reason: "x".into() },
            PeerMsg::PskHello {
                version: 2,
                nonce: [3; 32],
            },
            PeerMsg::PskChallenge {
                version: 2,
                nonce: [4; 32],
            },
            PeerMsg::PskProof { proof: [6; 32] },
            PeerMsg::PskWelcome { proof: [5; 32] },
            PeerMsg::Offer {
                vm_id: "vm1".into(),
                page_size: 4096,
                regions: vec![RegionInfo {
                    gpa: 0,
                    size: 1 << 30,
                    offset: 0,
                }],
                channels: 4,
                transports: OFFER_TCP | OFFER_RDMA,
                cpu_profile: vec![9],
                session: SessionId([8; 16]),
                backing_page_size: 2 << 20,
            },
            PeerMsg::Accept { prepare_us: 1234 },
            PeerMsg::DataHello {
                session: SessionId([1; 16]),
                channel: 3,
            },
            PeerMsg::DataChallenge { nonce: [2; 32] },
            PeerMsg::DataProof { proof: [7; 32] },
            PeerMsg::DataOk,
            PeerMsg::RoundStart {
                round: 1,
                final_round: false,
            },
            PeerMsg::RoundDone {
                round: 1,
                pages: 10,
                bytes: 40960,
                torn: vec![r(0, 5, 1)],
                cpu_us: [900, 300, 100],
            },
            PeerMsg::StateBlob { blob: vec![1, 2] },
            PeerMsg::Ready {
                digest: MemoryDigest {
                    regions: vec![vec![1, 2], vec![3]],
                },
            },
            PeerMsg::Commit,
            PeerMsg::Abort { reason: "x".into() },
            PeerMsg::Running { detail: "y".into() },
            PeerMsg::StartFailed { reason: "z".into() },
            PeerMsg::Discarded,
            PeerMsg::Decision {
                session: SessionId([4; 16]),
                commit: true,
            },
            PeerMsg::RdmaOffer { blob: vec![1, 2] },
            PeerMsg::RdmaAnswer { blob: vec![3] },
            PeerMsg::RdmaUnavailable {
                reason: "no device".into(),
            },
            PeerMsg::PullRanges {
                round: 2,
                ranges: vec![r(0, 1, 2), r(1, 5, 9)],
                last: true,
            },
            PeerMsg::RdmaFailed {
                round: 2,
                reason: "qp".into(),
                confirmed_pages: 7,
                unfinished: vec![r(0, 3, 4)],
            },
            PeerMsg::Busy {
                running: 2,
                limit: 2,
            },
            PeerMsg::ChOffer {
                vm_id: "vm1".into(),
                session: SessionId([3; 16]),
                channels: 4,
                postcopy: true,
            },
            PeerMsg::ChQuery {
                vm_id: "vm1".into(),
                session: SessionId([4; 16]),
            },
            PeerMsg::ChState {
                state: CH_PAUSED,
                detail: "Paused".into(),
            },
        ]
    }

    #[test]
    fn every_message_round_trips_and_rejects_cut_or_extended_payloads() {
        crate::common::assert_round_trips(samples(), 32);
    }

    #[test]
    fn hostile_counts_and_ranges_are_refused() {
        // A RoundDone claiming 2^32-1 torn pages.
        let mut w = Writer::new();
        w.u32(1).u64(0).u64(0).u32(u32::MAX);
        assert!(matches!(
            decode_payload::<PeerMsg>(15, &w.finish()),
            Err(ProtoError::TooLong { .. })
        ));
        // A range that wraps around.
        let mut w = Writer::new();
        w.u32(1).u8(1).ranges(&[PageRange {
            region: 0,
            first: u64::MAX,
            count: 2,
        }]);
        assert!(decode_payload::<PeerMsg>(27, &w.finish()).is_err());
        // An empty range.
        let mut w = Writer::new();
        w.u32(1).u8(1).ranges(&[PageRange {
            region: 0,
            first: 3,
            count: 0,
        }]);
        assert!(decode_payload::<PeerMsg>(27, &w.finish()).is_err());
    }

    #[test]
    fn the_largest_rdma_failed_fits_one_frame_and_decodes() {
        let m = PeerMsg::RdmaFailed {
            round: 1,
            reason: "x".repeat(MAX_STR),
            confirmed_pages: 0,
            unfinished: (0..MAX_UNFINISHED as u64)
                .map(|i| PageRange {
                    region: 0,
                    first: 2 * i,
                    count: 1,
                })
                .collect(),
        };
        let payload = encode_payload(&m);
        assert!(
            payload.len() <= MAX_FRAME,
            "{} > {MAX_FRAME}",
            payload.len()
        );
        assert_eq!(decode_payload::<PeerMsg>(28, &payload).expect("decodes"), m);
    }
}
