//! Control messages of all three links (VMM socket, CLI socket, peer control).
//!
//! One tag space for every link keeps one codec; each receiver accepts only the
//! messages its state expects and answers anything else with [`Msg::Refused`].
//! Tags start at 1; 0 is invalid.

use ferry_engine::digest::MemoryDigest;

use crate::codec::{Reader, Writer};
use crate::ProtoError;

/// Longest VM id, reason or other short string on the wire.
pub const MAX_STR: usize = 4096;
/// Most RAM regions a VM may register: KVM allows 32764 memslots, but a VMM with more
/// than 1024 RAM regions is not one Ferry has been tried with, and the cap bounds work.
pub const MAX_REGIONS: usize = 1024;
/// Largest state blob: Firecracker caps snapshot reads at 10 MB; a VMM with device state
/// plus per-page records (the workload VMM keeps 8 bytes per page: 2 MiB per GiB) needs
/// more, and 64 MiB covers 32 GiB of workload-VMM guest.
pub const MAX_BLOB: usize = 64 << 20;
/// Largest single frame: the largest blob plus room for its header fields.
pub const MAX_FRAME: usize = MAX_BLOB + 64 * 1024;
/// Most page ranges one `PullRanges` message may carry: 65,536 ranges x 20 bytes =
/// 1.25 MiB, so a round's list streams in pieces the destination pulls as they come.
pub const MAX_PULL_RANGES: usize = 65_536;
/// Most page ranges an `RdmaFailed` may hand back (a round's whole list at worst).
pub const MAX_UNFINISHED: usize = 4 << 20;
/// Pages one round may report as torn: more than this means the link corrupts data,
/// not that the guest raced a send, and the migration aborts.
pub const MAX_TORN: usize = 65_536;

/// Who is on the other end of the sidecar's Unix socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A VMM registering a VM or waiting for one.
    Vmm = 1,
    /// The `ferry` command line.
    Cli = 2,
}

/// A guest RAM region as the VMM registers it; its memfd travels beside the message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionInfo {
    /// Guest-physical base address.
    pub gpa: u64,
    /// Size in bytes, a multiple of the page size.
    pub size: u64,
    /// Offset of the region in its memfd.
    pub offset: u64,
}

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
    /// RDMA when both sides have a usable device and the QPs connect, else TCP.
    Auto = 1,
    /// Multi-stream TCP.
    Tcp = 2,
    /// RDMA READ pull; fail if unavailable.
    Rdma = 3,
}

/// When the memory digests are compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VerifyMode {
    /// Before the destination resumes: the comparison is part of the downtime.
    Strict = 1,
    /// After the destination resumes, while the source VM is still kept (paused): no
    /// downtime cost; a mismatch is reported loudly and the source VM is kept.
    AfterResume = 2,
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
}

/// A control message.
#[derive(Clone, Debug, PartialEq)]
pub enum Msg {
    /// First message on the Unix socket.
    Hello {
        /// Protocol version the sender speaks.
        version: u16,
        /// Sender's role.
        role: Role,
    },
    /// The sidecar accepts the Unix-socket peer.
    Welcome {
        /// Protocol version the sidecar speaks.
        version: u16,
    },
    /// A refusal; the sender closes the connection after it.
    Refused {
        /// Why, for a human.
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
    },
    /// VMM: wait here for an incoming migration of this VM.
    AwaitIncoming {
        /// The VM's id.
        vm_id: String,
    },
    /// A request succeeded.
    Ok,
    /// Sidecar to VMM: switch dirty logging on.
    StartDirtyLog,
    /// Sidecar to VMM: get-and-clear the dirty log.
    TakeDirty {
        /// Whether the VM is paused (the last bitmap of the migration).
        final_round: bool,
    },
    /// VMM: one bitmap per region, LSB-first words.
    Dirty {
        /// `bitmaps[r]` covers region r.
        bitmaps: Vec<Vec<u64>>,
    },
    /// Sidecar to VMM: stop the vCPUs and the VMM's own writers.
    Pause,
    /// VMM: paused.
    Paused {
        /// How long pausing took.
        pause_us: u64,
    },
    /// Sidecar to VMM: send the vCPU and device state.
    SaveState,
    /// VMM: the opaque state blob.
    State {
        /// State bytes.
        blob: Vec<u8>,
    },
    /// Sidecar to VMM: the migration failed; run again and stop dirty logging.
    Resume,
    /// Sidecar to VMM: the destination runs the VM; stop for good.
    Stop,
    /// Sidecar to a waiting VMM: the migrated memory (memfds ride along) and state.
    Load {
        /// The VM's id.
        vm_id: String,
        /// RAM regions, in memfd order.
        regions: Vec<RegionInfo>,
        /// The state blob from the source.
        blob: Vec<u8>,
    },
    /// Sidecar to a waiting VMM, before anything is accepted: can this host run a VM
    /// with this CPU profile (the source VMM's registration blob)? `Ok` or `Error`.
    CheckCompat {
        /// The source VMM's CPU compatibility blob.
        cpu_profile: Vec<u8>,
    },
    /// VMM: loaded; vCPUs not running.
    Loaded,
    /// Sidecar to VMM: run the loaded VM.
    Start,
    /// VMM: the VM runs; `detail` is shown to the operator.
    Running {
        /// What the VMM checked, for the summary.
        detail: String,
    },
    /// Sidecar to VMM: throw the loaded VM away.
    Discard,
    /// A request failed; the connection stays usable.
    Error {
        /// What failed.
        message: String,
    },
    /// CLI: migrate a VM.
    Migrate(MigrateRequest),
    /// Sidecar to CLI: progress.
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
    },
    /// Sidecar to CLI: the migration's summary as a JSON object.
    Summary {
        /// JSON text.
        json: String,
    },
    /// CLI: what is registered and running.
    Status,
    /// CLI: deliver a VM's recorded but unconfirmed commit decision now.
    Recover {
        /// The VM whose decision to replay.
        vm_id: String,
    },
    /// Sidecar to CLI: status as a JSON object.
    StatusReport {
        /// JSON text.
        json: String,
    },
    /// Peer: the connecting sidecar's greeting with its challenge.
    PeerHello {
        /// Protocol version.
        version: u16,
        /// Challenge for the listener.
        nonce: [u8; 32],
    },
    /// Peer: the listener's answer, proof and counter-challenge.
    PeerChallenge {
        /// Protocol version.
        version: u16,
        /// Challenge for the connecting side.
        nonce: [u8; 32],
        /// HMAC proving the listener knows the key.
        proof: [u8; 32],
    },
    /// Peer: the connecting side's proof.
    PeerAuth {
        /// HMAC proving the connecting side knows the key.
        proof: [u8; 32],
    },
    /// Peer: authentication accepted.
    PeerAuthOk,
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
        /// Transports the source can use, bit (1 << TransportChoice).
        transports: u8,
        /// The source VMM's CPU compatibility blob.
        cpu_profile: Vec<u8>,
        /// Session id that data connections present.
        session: [u8; 16],
    },
    /// Destination: ready for data.
    Accept {
        /// How long preparing (populating) the destination memory took.
        prepare_us: u64,
    },
    /// Source: a round begins.
    RoundStart {
        /// Round number.
        round: u32,
        /// Whether the source VM is paused.
        final_round: bool,
    },
    /// Destination: every channel delivered the round.
    RoundDone {
        /// Round number.
        round: u32,
        /// Pages received (payload and zero markers).
        pages: u64,
        /// Payload bytes received.
        bytes: u64,
        /// Pages whose checksum did not match: (region, page).
        torn: Vec<(u32, u64)>,
    },
    /// Source: the VM state blob.
    StateBlob {
        /// State bytes.
        blob: Vec<u8>,
    },
    /// Destination: loaded (vCPUs not running) and its memory digest.
    Ready {
        /// Digest of the received memory.
        digest: MemoryDigest,
    },
    /// Source: the decision is taken, run the VM.
    Commit,
    /// Source: give up and discard.
    Abort {
        /// Why.
        reason: String,
    },
    /// Destination: the VM runs.
    PeerRunning {
        /// What the destination VMM checked.
        detail: String,
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
    /// Destination: RDMA cannot be used here; the migration goes over TCP.
    RdmaUnavailable {
        /// Why, for the summary.
        reason: String,
    },
    /// Source: ranges the destination pulls with RDMA READ for `round`.
    PullRanges {
        /// Round number.
        round: u32,
        /// (region, first page, page count).
        ranges: Vec<(u32, u64, u64)>,
        /// Whether this is the round's last piece of the list.
        last: bool,
    },
    /// Destination: RDMA failed in `round`; these ranges were not confirmed and must be
    /// re-sent over TCP, which carries the rest of the migration.
    RdmaFailed {
        /// Round number.
        round: u32,
        /// What failed.
        reason: String,
        /// Pages confirmed by RDMA in this round before the failure.
        confirmed_pages: u64,
        /// (region, first page, page count) not confirmed.
        unfinished: Vec<(u32, u64, u64)>,
    },
    /// Source, on a fresh authenticated connection: the decision for a session whose
    /// `Commit` or `Abort` may not have arrived (the link broke in the commit window).
    Decision {
        /// Session from the offer.
        session: [u8; 16],
        /// True: run the VM (the source committed). False: discard it.
        commit: bool,
    },
    /// First frame of a data connection.
    DataHello {
        /// Session from the offer.
        session: [u8; 16],
        /// Channel index.
        channel: u16,
        /// HMAC over session and channel with the shared key.
        proof: [u8; 32],
    },
}

fn put_regions(w: &mut Writer, regions: &[RegionInfo]) {
    w.u32(regions.len() as u32);
    for r in regions {
        w.u64(r.gpa).u64(r.size).u64(r.offset);
    }
}

fn get_regions(r: &mut Reader<'_>) -> Result<Vec<RegionInfo>, ProtoError> {
    let n = r.count(MAX_REGIONS, 24)?;
    (0..n)
        .map(|_| {
            Ok(RegionInfo {
                gpa: r.u64()?,
                size: r.u64()?,
                offset: r.u64()?,
            })
        })
        .collect()
}

fn put_ranges(w: &mut Writer, ranges: &[(u32, u64, u64)]) {
    w.u32(ranges.len() as u32);
    for (region, first, count) in ranges {
        w.u32(*region).u64(*first).u64(*count);
    }
}

fn get_ranges(r: &mut Reader<'_>, cap: usize) -> Result<Vec<(u32, u64, u64)>, ProtoError> {
    let n = r.count(cap, 20)?;
    (0..n).map(|_| Ok((r.u32()?, r.u64()?, r.u64()?))).collect()
}

fn bad(what: &'static str, value: u64) -> ProtoError {
    ProtoError::BadValue { what, value }
}

impl Msg {
    /// The message's tag on the wire.
    pub fn tag(&self) -> u16 {
        match self {
            Msg::Hello { .. } => 1,
            Msg::Welcome { .. } => 2,
            Msg::Refused { .. } => 3,
            Msg::RegisterVm { .. } => 4,
            Msg::AwaitIncoming { .. } => 5,
            Msg::Ok => 6,
            Msg::StartDirtyLog => 7,
            Msg::TakeDirty { .. } => 8,
            Msg::Dirty { .. } => 9,
            Msg::Pause => 10,
            Msg::Paused { .. } => 11,
            Msg::SaveState => 12,
            Msg::State { .. } => 13,
            Msg::Resume => 14,
            Msg::Stop => 15,
            Msg::Load { .. } => 16,
            Msg::Loaded => 17,
            Msg::Start => 18,
            Msg::Running { .. } => 19,
            Msg::Discard => 20,
            Msg::Error { .. } => 21,
            Msg::Migrate(_) => 22,
            Msg::Progress { .. } => 23,
            Msg::Summary { .. } => 24,
            Msg::Status => 25,
            Msg::StatusReport { .. } => 26,
            Msg::PeerHello { .. } => 30,
            Msg::PeerChallenge { .. } => 31,
            Msg::PeerAuth { .. } => 32,
            Msg::PeerAuthOk => 33,
            Msg::Offer { .. } => 34,
            Msg::Accept { .. } => 35,
            Msg::RoundStart { .. } => 36,
            Msg::RoundDone { .. } => 37,
            Msg::StateBlob { .. } => 38,
            Msg::Ready { .. } => 39,
            Msg::Commit => 40,
            Msg::Abort { .. } => 41,
            Msg::PeerRunning { .. } => 42,
            Msg::DataHello { .. } => 43,
            Msg::RdmaOffer { .. } => 44,
            Msg::RdmaAnswer { .. } => 45,
            Msg::RdmaUnavailable { .. } => 46,
            Msg::PullRanges { .. } => 47,
            Msg::RdmaFailed { .. } => 48,
            Msg::Decision { .. } => 49,
            Msg::CheckCompat { .. } => 50,
            Msg::Recover { .. } => 51,
        }
    }

    /// A short name for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Msg::Hello { .. } => "Hello",
            Msg::Welcome { .. } => "Welcome",
            Msg::Refused { .. } => "Refused",
            Msg::RegisterVm { .. } => "RegisterVm",
            Msg::AwaitIncoming { .. } => "AwaitIncoming",
            Msg::Ok => "Ok",
            Msg::StartDirtyLog => "StartDirtyLog",
            Msg::TakeDirty { .. } => "TakeDirty",
            Msg::Dirty { .. } => "Dirty",
            Msg::Pause => "Pause",
            Msg::Paused { .. } => "Paused",
            Msg::SaveState => "SaveState",
            Msg::State { .. } => "State",
            Msg::Resume => "Resume",
            Msg::Stop => "Stop",
            Msg::Load { .. } => "Load",
            Msg::Loaded => "Loaded",
            Msg::Start => "Start",
            Msg::Running { .. } => "Running",
            Msg::Discard => "Discard",
            Msg::Error { .. } => "Error",
            Msg::Migrate(_) => "Migrate",
            Msg::Progress { .. } => "Progress",
            Msg::Summary { .. } => "Summary",
            Msg::Status => "Status",
            Msg::StatusReport { .. } => "StatusReport",
            Msg::PeerHello { .. } => "PeerHello",
            Msg::PeerChallenge { .. } => "PeerChallenge",
            Msg::PeerAuth { .. } => "PeerAuth",
            Msg::PeerAuthOk => "PeerAuthOk",
            Msg::Offer { .. } => "Offer",
            Msg::Accept { .. } => "Accept",
            Msg::RoundStart { .. } => "RoundStart",
            Msg::RoundDone { .. } => "RoundDone",
            Msg::StateBlob { .. } => "StateBlob",
            Msg::Ready { .. } => "Ready",
            Msg::Commit => "Commit",
            Msg::Abort { .. } => "Abort",
            Msg::PeerRunning { .. } => "PeerRunning",
            Msg::DataHello { .. } => "DataHello",
            Msg::RdmaOffer { .. } => "RdmaOffer",
            Msg::RdmaAnswer { .. } => "RdmaAnswer",
            Msg::RdmaUnavailable { .. } => "RdmaUnavailable",
            Msg::PullRanges { .. } => "PullRanges",
            Msg::RdmaFailed { .. } => "RdmaFailed",
            Msg::Decision { .. } => "Decision",
            Msg::CheckCompat { .. } => "CheckCompat",
            Msg::Recover { .. } => "Recover",
        }
    }

    /// The payload bytes (without the frame header).
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        match self {
            Msg::Hello { version, role } => {
                w.u16(*version).u8(*role as u8);
            }
            Msg::Welcome { version } => {
                w.u16(*version);
            }
            Msg::Refused { reason } => {
                w.str(reason);
            }
            Msg::RegisterVm {
                vm_id,
                regions,
                cpu_profile,
            } => {
                w.str(vm_id);
                put_regions(&mut w, regions);
                w.bytes(cpu_profile);
            }
            Msg::AwaitIncoming { vm_id } => {
                w.str(vm_id);
            }
            Msg::Ok
            | Msg::StartDirtyLog
            | Msg::Pause
            | Msg::SaveState
            | Msg::Resume
            | Msg::Stop
            | Msg::Loaded
            | Msg::Start
            | Msg::Discard
            | Msg::Status
            | Msg::PeerAuthOk
            | Msg::Commit => {}
            Msg::TakeDirty { final_round } => {
                w.u8(u8::from(*final_round));
            }
            Msg::Dirty { bitmaps } => {
                w.u32(bitmaps.len() as u32);
                for b in bitmaps {
                    w.u32(b.len() as u32);
                    for x in b {
                        w.u64(*x);
                    }
                }
            }
            Msg::Paused { pause_us } => {
                w.u64(*pause_us);
            }
            Msg::State { blob } | Msg::StateBlob { blob } => {
                w.bytes(blob);
            }
            Msg::Load {
                vm_id,
                regions,
                blob,
            } => {
                w.str(vm_id);
                put_regions(&mut w, regions);
                w.bytes(blob);
            }
            Msg::Running { detail } | Msg::PeerRunning { detail } => {
                w.str(detail);
            }
            Msg::Error { message } => {
                w.str(message);
            }
            Msg::Migrate(m) => {
                w.str(&m.vm_id)
                    .str(&m.to)
                    .u16(m.channels)
                    .u32(m.downtime_ms)
                    .u32(m.max_rounds)
                    .u64(m.timeout_ms)
                    .u8(m.on_limit as u8)
                    .u8(m.transport as u8)
                    .u32(m.observe_ms)
                    .u8(m.verify as u8);
            }
            Msg::Progress {
                phase,
                round,
                round_done,
                round_total,
                total_done,
            } => {
                w.u8(*phase as u8)
                    .u32(*round)
                    .u64(*round_done)
                    .u64(*round_total)
                    .u64(*total_done);
            }
            Msg::Summary { json } | Msg::StatusReport { json } => {
                w.bytes(json.as_bytes());
            }
            Msg::PeerHello { version, nonce } => {
                w.u16(*version).fixed(nonce);
            }
            Msg::PeerChallenge {
                version,
                nonce,
                proof,
            } => {
                w.u16(*version).fixed(nonce).fixed(proof);
            }
            Msg::PeerAuth { proof } => {
                w.fixed(proof);
            }
            Msg::Offer {
                vm_id,
                page_size,
                regions,
                channels,
                transports,
                cpu_profile,
                session,
            } => {
                w.str(vm_id).u32(*page_size);
                put_regions(&mut w, regions);
                w.u16(*channels)
                    .u8(*transports)
                    .bytes(cpu_profile)
                    .fixed(session);
            }
            Msg::Accept { prepare_us } => {
                w.u64(*prepare_us);
            }
            Msg::RoundStart { round, final_round } => {
                w.u32(*round).u8(u8::from(*final_round));
            }
            Msg::RoundDone {
                round,
                pages,
                bytes,
                torn,
            } => {
                w.u32(*round).u64(*pages).u64(*bytes).u32(torn.len() as u32);
                for (r, p) in torn {
                    w.u32(*r).u64(*p);
                }
            }
            Msg::Ready { digest } => {
                w.u32(digest.regions.len() as u32);
                for r in &digest.regions {
                    w.u32(r.len() as u32);
                    for c in r {
                        w.u128(*c);
                    }
                }
            }
            Msg::Abort { reason } => {
                w.str(reason);
            }
            Msg::DataHello {
                session,
                channel,
                proof,
            } => {
                w.fixed(session).u16(*channel).fixed(proof);
            }
            Msg::CheckCompat { cpu_profile } => {
                w.bytes(cpu_profile);
            }
            Msg::Recover { vm_id } => {
                w.str(vm_id);
            }
            Msg::Decision { session, commit } => {
                w.fixed(session).u8(u8::from(*commit));
            }
            Msg::RdmaOffer { blob } | Msg::RdmaAnswer { blob } => {
                w.bytes(blob);
            }
            Msg::RdmaUnavailable { reason } => {
                w.str(reason);
            }
            Msg::PullRanges {
                round,
                ranges,
                last,
            } => {
                w.u32(*round).u8(u8::from(*last));
                put_ranges(&mut w, ranges);
            }
            Msg::RdmaFailed {
                round,
                reason,
                confirmed_pages,
                unfinished,
            } => {
                w.u32(*round).str(reason).u64(*confirmed_pages);
                put_ranges(&mut w, unfinished);
            }
        }
        w.finish()
    }

    /// Parses a payload with its tag. Every length is checked before use.
    ///
    /// # Errors
    ///
    /// [`ProtoError::UnknownTag`], [`ProtoError::Truncated`], [`ProtoError::TooLong`],
    /// [`ProtoError::BadValue`], [`ProtoError::TrailingBytes`] or [`ProtoError::BadUtf8`].
    pub fn decode(tag: u16, payload: &[u8]) -> Result<Msg, ProtoError> {
        let mut r = Reader::new(payload, "message");
        let bool8 = |r: &mut Reader<'_>, what| match r.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(bad(what, u64::from(v))),
        };
        let m = match tag {
            1 => Msg::Hello {
                version: r.u16()?,
                role: match r.u8()? {
                    1 => Role::Vmm,
                    2 => Role::Cli,
                    v => return Err(bad("role", u64::from(v))),
                },
            },
            2 => Msg::Welcome { version: r.u16()? },
            3 => Msg::Refused {
                reason: r.str(MAX_STR)?,
            },
            4 => Msg::RegisterVm {
                vm_id: r.str(MAX_STR)?,
                regions: get_regions(&mut r)?,
                cpu_profile: r.bytes(MAX_BLOB)?.to_vec(),
            },
            5 => Msg::AwaitIncoming {
                vm_id: r.str(MAX_STR)?,
            },
            6 => Msg::Ok,
            7 => Msg::StartDirtyLog,
            8 => Msg::TakeDirty {
                final_round: bool8(&mut r, "final_round")?,
            },
            9 => {
                let n = r.count(MAX_REGIONS, 4)?;
                let mut bitmaps = Vec::with_capacity(n);
                for _ in 0..n {
                    let words = r.count(MAX_FRAME / 8, 8)?;
                    bitmaps.push((0..words).map(|_| r.u64()).collect::<Result<_, _>>()?);
                }
                Msg::Dirty { bitmaps }
            }
            10 => Msg::Pause,
            11 => Msg::Paused { pause_us: r.u64()? },
            12 => Msg::SaveState,
            13 => Msg::State {
                blob: r.bytes(MAX_BLOB)?.to_vec(),
            },
            14 => Msg::Resume,
            15 => Msg::Stop,
            16 => Msg::Load {
                vm_id: r.str(MAX_STR)?,
                regions: get_regions(&mut r)?,
                blob: r.bytes(MAX_BLOB)?.to_vec(),
            },
            17 => Msg::Loaded,
            18 => Msg::Start,
            19 => Msg::Running {
                detail: r.str(MAX_STR)?,
            },
            20 => Msg::Discard,
            21 => Msg::Error {
                message: r.str(MAX_STR)?,
            },
            22 => Msg::Migrate(MigrateRequest {
                vm_id: r.str(MAX_STR)?,
                to: r.str(MAX_STR)?,
                channels: r.u16()?,
                downtime_ms: r.u32()?,
                max_rounds: r.u32()?,
                timeout_ms: r.u64()?,
                on_limit: match r.u8()? {
                    1 => OnLimit::Abort,
                    2 => OnLimit::Force,
                    v => return Err(bad("on_limit", u64::from(v))),
                },
                transport: match r.u8()? {
                    1 => TransportChoice::Auto,
                    2 => TransportChoice::Tcp,
                    3 => TransportChoice::Rdma,
                    v => return Err(bad("transport", u64::from(v))),
                },
                observe_ms: r.u32()?,
                verify: match r.u8()? {
                    1 => VerifyMode::Strict,
                    2 => VerifyMode::AfterResume,
                    v => return Err(bad("verify", u64::from(v))),
                },
            }),
            23 => Msg::Progress {
                phase: match r.u8()? {
                    1 => Phase::Preparing,
                    2 => Phase::Precopy,
                    3 => Phase::StopAndCopy,
                    4 => Phase::Verifying,
                    5 => Phase::Done,
                    v => return Err(bad("phase", u64::from(v))),
                },
                round: r.u32()?,
                round_done: r.u64()?,
                round_total: r.u64()?,
                total_done: r.u64()?,
            },
            24 | 26 => {
                let b = r.bytes(MAX_BLOB)?;
                let json = String::from_utf8(b.to_vec())
                    .map_err(|_| ProtoError::BadUtf8 { what: "json" })?;
                if tag == 24 {
                    Msg::Summary { json }
                } else {
                    Msg::StatusReport { json }
                }
            }
            25 => Msg::Status,
            30 => Msg::PeerHello {
                version: r.u16()?,
                nonce: r.array()?,
            },
            31 => Msg::PeerChallenge {
                version: r.u16()?,
                nonce: r.array()?,
                proof: r.array()?,
            },
            32 => Msg::PeerAuth { proof: r.array()? },
            33 => Msg::PeerAuthOk,
            34 => Msg::Offer {
                vm_id: r.str(MAX_STR)?,
                page_size: r.u32()?,
                regions: get_regions(&mut r)?,
                channels: r.u16()?,
                transports: r.u8()?,
                cpu_profile: r.bytes(MAX_BLOB)?.to_vec(),
                session: r.array()?,
            },
            35 => Msg::Accept {
                prepare_us: r.u64()?,
            },
            36 => Msg::RoundStart {
                round: r.u32()?,
                final_round: bool8(&mut r, "final_round")?,
            },
            37 => {
                let round = r.u32()?;
                let pages = r.u64()?;
                let bytes = r.u64()?;
                let n = r.count(MAX_TORN, 12)?;
                let torn = (0..n)
                    .map(|_| Ok((r.u32()?, r.u64()?)))
                    .collect::<Result<_, ProtoError>>()?;
                Msg::RoundDone {
                    round,
                    pages,
                    bytes,
                    torn,
                }
            }
            38 => Msg::StateBlob {
                blob: r.bytes(MAX_BLOB)?.to_vec(),
            },
            39 => {
                let n = r.count(MAX_REGIONS, 4)?;
                let mut regions = Vec::with_capacity(n);
                for _ in 0..n {
                    let c = r.count(MAX_FRAME / 16, 16)?;
                    regions.push((0..c).map(|_| r.u128()).collect::<Result<_, _>>()?);
                }
                Msg::Ready {
                    digest: MemoryDigest { regions },
                }
            }
            40 => Msg::Commit,
            41 => Msg::Abort {
                reason: r.str(MAX_STR)?,
            },
            42 => Msg::PeerRunning {
                detail: r.str(MAX_STR)?,
            },
            43 => Msg::DataHello {
                session: r.array()?,
                channel: r.u16()?,
                proof: r.array()?,
            },
            44 => Msg::RdmaOffer {
                blob: r.bytes(MAX_BLOB)?.to_vec(),
            },
            45 => Msg::RdmaAnswer {
                blob: r.bytes(MAX_BLOB)?.to_vec(),
            },
            46 => Msg::RdmaUnavailable {
                reason: r.str(MAX_STR)?,
            },
            47 => {
                let round = r.u32()?;
                let last = bool8(&mut r, "last")?;
                Msg::PullRanges {
                    round,
                    last,
                    ranges: get_ranges(&mut r, MAX_PULL_RANGES)?,
                }
            }
            48 => Msg::RdmaFailed {
                round: r.u32()?,
                reason: r.str(MAX_STR)?,
                confirmed_pages: r.u64()?,
                unfinished: get_ranges(&mut r, MAX_UNFINISHED)?,
            },
            51 => Msg::Recover {
                vm_id: r.str(MAX_STR)?,
            },
            50 => Msg::CheckCompat {
                cpu_profile: r.bytes(MAX_BLOB)?.to_vec(),
            },
            49 => Msg::Decision {
                session: r.array()?,
                commit: bool8(&mut r, "commit")?,
            },
            t => return Err(ProtoError::UnknownTag { tag: t }),
        };
        r.end()?;
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn samples() -> Vec<Msg> {
        let regions = vec![RegionInfo {
            gpa: 0x1000_0000,
            size: 1 << 30,
            offset: 0,
        }];
        vec![
            Msg::Hello {
                version: 1,
                role: Role::Cli,
            },
            Msg::Welcome { version: 1 },
            Msg::Refused {
                reason: "no".into(),
            },
            Msg::RegisterVm {
                vm_id: "vm1".into(),
                regions: regions.clone(),
                cpu_profile: vec![1, 2, 3],
            },
            Msg::AwaitIncoming {
                vm_id: "vm1".into(),
            },
            Msg::Ok,
            Msg::StartDirtyLog,
            Msg::TakeDirty { final_round: true },
            Msg::Dirty {
                bitmaps: vec![vec![1, 2, u64::MAX], vec![]],
            },
            Msg::Pause,
            Msg::Paused { pause_us: 38 },
            Msg::SaveState,
            Msg::State { blob: vec![7; 100] },
            Msg::Resume,
            Msg::Stop,
            Msg::Load {
                vm_id: "vm1".into(),
                regions: regions.clone(),
                blob: vec![1],
            },
            Msg::Loaded,
            Msg::Start,
            Msg::Running {
                detail: "ok".into(),
            },
            Msg::Discard,
            Msg::Error {
                message: "bad".into(),
            },
            Msg::Migrate(MigrateRequest {
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
            }),
            Msg::Progress {
                phase: Phase::Precopy,
                round: 2,
                round_done: 5,
                round_total: 10,
                total_done: 100,
            },
            Msg::Summary { json: "{}".into() },
            Msg::Status,
            Msg::StatusReport { json: "{}".into() },
            Msg::PeerHello {
                version: 1,
                nonce: [3; 32],
            },
            Msg::PeerChallenge {
                version: 1,
                nonce: [4; 32],
                proof: [5; 32],
            },
            Msg::PeerAuth { proof: [6; 32] },
            Msg::PeerAuthOk,
            Msg::Offer {
                vm_id: "vm1".into(),
                page_size: 4096,
                regions,
                channels: 4,
                transports: 0b110,
                cpu_profile: vec![9],
                session: [8; 16],
            },
            Msg::Accept { prepare_us: 1234 },
            Msg::RoundStart {
                round: 1,
                final_round: false,
            },
            Msg::RoundDone {
                round: 1,
                pages: 10,
                bytes: 40960,
                torn: vec![(0, 5)],
            },
            Msg::StateBlob { blob: vec![1, 2] },
            Msg::Ready {
                digest: MemoryDigest {
                    regions: vec![vec![1, 2], vec![3]],
                },
            },
            Msg::Commit,
            Msg::Abort { reason: "x".into() },
            Msg::PeerRunning { detail: "y".into() },
            Msg::DataHello {
                session: [1; 16],
                channel: 3,
                proof: [2; 32],
            },
            Msg::Decision {
                session: [4; 16],
                commit: true,
            },
            Msg::CheckCompat {
                cpu_profile: vec![1, 2, 3],
            },
            Msg::Recover {
                vm_id: "vm1".into(),
            },
            Msg::RdmaOffer { blob: vec![1, 2] },
            Msg::RdmaAnswer { blob: vec![3] },
            Msg::RdmaUnavailable {
                reason: "no device".into(),
            },
            Msg::PullRanges {
                round: 2,
                ranges: vec![(0, 1, 2), (1, 5, 9)],
                last: true,
            },
            Msg::RdmaFailed {
                round: 2,
                reason: "qp".into(),
                confirmed_pages: 7,
                unfinished: vec![(0, 3, 4)],
            },
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for m in samples() {
            let b = m.encode();
            assert_eq!(
                Msg::decode(m.tag(), &b).ok().as_ref(),
                Some(&m),
                "{}",
                m.name()
            );
        }
    }

    #[test]
    fn truncated_or_extended_payloads_are_errors_not_panics() {
        for m in samples() {
            let b = m.encode();
            for cut in 0..b.len() {
                assert!(
                    Msg::decode(m.tag(), &b[..cut]).is_err(),
                    "{} cut {cut}",
                    m.name()
                );
            }
            let mut longer = b.clone();
            longer.push(0);
            assert!(Msg::decode(m.tag(), &longer).is_err(), "{}", m.name());
        }
    }

    #[test]
    fn unknown_tags_and_bad_enums_are_refused() {
        assert!(matches!(
            Msg::decode(0, &[]),
            Err(ProtoError::UnknownTag { tag: 0 })
        ));
        assert!(matches!(
            Msg::decode(999, &[]),
            Err(ProtoError::UnknownTag { tag: 999 })
        ));
        assert!(matches!(
            Msg::decode(1, &[1, 0, 9]),
            Err(ProtoError::BadValue { what: "role", .. })
        ));
    }

    #[test]
    fn hostile_counts_do_not_allocate() {
        // A Dirty message claiming 1024 bitmaps of 2^29 words each, with no data.
        let mut w = Writer::new();
        w.u32(1024).u32(1 << 29);
        assert!(Msg::decode(9, &w.finish()).is_err());
        // A RoundDone claiming 2^32-1 torn pages.
        let mut w = Writer::new();
        w.u32(1).u64(0).u64(0).u32(u32::MAX);
        assert!(matches!(
            Msg::decode(37, &w.finish()),
            Err(ProtoError::TooLong { .. })
        ));
    }
}
