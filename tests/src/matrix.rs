//! The fault matrix: every fault the end-to-end tests inject (`tests/fault_matrix.rs`),
//! where, and how each one must end. The README's table is generated from this list
//! (`cargo run -p ferry-tests --bin fault-matrix`), and a test checks it is current.

/// A process of a two-host migration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proc {
    /// The source host's `ferry serve`.
    SourceSidecar,
    /// The destination host's `ferry serve`.
    DestSidecar,
    /// The source VMM (holds the running VM).
    SourceVmm,
    /// The destination VMM (waits for the VM).
    DestVmm,
}

impl Proc {
    /// For the table.
    pub fn name(self) -> &'static str {
        match self {
            Proc::SourceSidecar => "source sidecar",
            Proc::DestSidecar => "destination sidecar",
            Proc::SourceVmm => "source VMM",
            Proc::DestVmm => "destination VMM",
        }
    }
}

/// Where in a migration a fault strikes (each is a hold point of the sidecars' test build,
/// `sidecar/src/faults.rs`, so the fault lands exactly there).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Round 1, after its first window (the VM runs).
    Round1,
    /// A later pre-copy round (round 2, after its first window).
    Round2,
    /// The VM just paused (before the final round).
    Paused,
    /// The destination VMM loaded the VM; `Ready` not sent, nothing decided.
    Loaded,
    /// The commit decision is recorded; `Commit` not sent.
    Decided,
    /// The destination recorded `Commit`; its VMM not told to start.
    CommitReceived,
    /// The destination runs the VM; the source has not stopped its copy.
    Running,
}

impl Phase {
    /// Every phase, in migration order.
    pub const ALL: [Phase; 7] = [
        Phase::Round1,
        Phase::Round2,
        Phase::Paused,
        Phase::Loaded,
        Phase::Decided,
        Phase::CommitReceived,
        Phase::Running,
    ];

    /// For the table.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Round1 => "round 1",
            Phase::Round2 => "later round",
            Phase::Paused => "paused",
            Phase::Loaded => "loaded at the destination, undecided",
            Phase::Decided => "after the decision, before Commit",
            Phase::CommitReceived => "after Commit, before Running",
            Phase::Running => "after Running",
        }
    }

    /// The sidecar hold point (`FERRY_TEST_HOLD`) and which sidecar holds (0 source,
    /// 1 destination).
    pub fn hold(self) -> (&'static str, usize) {
        match self {
            Phase::Round1 => ("round1", 0),
            Phase::Round2 => ("round2", 0),
            Phase::Paused => ("paused", 0),
            Phase::Loaded => ("loaded", 1),
            Phase::Decided => ("decided", 0),
            Phase::CommitReceived => ("commit-received", 1),
            Phase::Running => ("running", 0),
        }
    }
}

/// The fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// `kill -9` of a process.
    Kill(Proc),
    /// The link between the hosts cut (both ends lose carrier; nothing reaches either),
    /// restored after a few seconds.
    Cut,
    /// The source's state directory read-only when the decision is written.
    DecisionReadOnly,
    /// The source's state directory full when the decision is written.
    DecisionFull,
    /// The destination VMM fails `Start` once.
    StartFails,
    /// Bytes of a data connection flipped in flight (a proxy between the hosts), TLS.
    CorruptTls,
    /// Bytes of a data connection flipped in flight, `--insecure-psk` (per-page checks).
    CorruptPsk,
    /// The VMM registers a region larger than its memfd.
    ShortMemfd,
    /// The VMM truncates a memfd during the migration.
    ShrinkingMemfd,
}

impl Fault {
    /// For the table.
    pub fn name(self) -> String {
        match self {
            Fault::Kill(p) => format!("kill -9 {}", p.name()),
            Fault::Cut => "link cut".into(),
            Fault::DecisionReadOnly => "decision write fails (read-only state dir)".into(),
            Fault::DecisionFull => "decision write fails (full state dir)".into(),
            Fault::StartFails => "destination VMM fails Start".into(),
            Fault::CorruptTls => "data corrupted in flight (TLS)".into(),
            Fault::CorruptPsk => "data corrupted in flight (--insecure-psk)".into(),
            Fault::ShortMemfd => "memfd shorter than its region".into(),
            Fault::ShrinkingMemfd => "memfd truncated mid-migration".into(),
        }
    }
}

/// What the operator (the test) does after the fault, before the outcome is checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Then {
    /// Nothing.
    Nothing,
    /// Start the killed sidecar again (same state directory).
    RestartSidecar,
    /// `ferry recover <vm>` on the source host.
    Recover,
    /// `ferry recover <vm> --abort` on the source host.
    RecoverAbort,
}

impl Then {
    /// For the table.
    pub fn name(self) -> &'static str {
        match self {
            Then::Nothing => "",
            Then::RestartSidecar => "start the sidecar again",
            Then::Recover => "`ferry recover vm1`",
            Then::RecoverAbort => "`ferry recover vm1 --abort`",
        }
    }
}

/// How it must end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ends {
    /// The VM runs on the source (never ran at the destination).
    Source,
    /// The VM runs on the destination with the latest memory (its VMM verified every
    /// page); the source's copy is stopped.
    Dest,
    /// The VM died with its own VMM process (as it would without a migration); nothing
    /// runs it anywhere, and the other host never ran a partial copy.
    DiedWithVmm,
}

impl Ends {
    /// For the table.
    pub fn name(self) -> &'static str {
        match self {
            Ends::Source => "runs on the source",
            Ends::Dest => "runs on the destination",
            Ends::DiedWithVmm => "died with its VMM (nothing else runs it)",
        }
    }
}

/// One cell of the matrix.
#[derive(Clone, Copy, Debug)]
pub struct Cell {
    /// The fault.
    pub fault: Fault,
    /// When (None: the fault is not tied to a phase).
    pub phase: Option<Phase>,
    /// What happens in between: the state the fault leaves before the operator acts.
    pub meanwhile: &'static str,
    /// What the operator does.
    pub then: Then,
    /// The end.
    pub ends: Ends,
}

const fn kill(p: Proc, phase: Phase, meanwhile: &'static str, then: Then, ends: Ends) -> Cell {
    Cell {
        fault: Fault::Kill(p),
        phase: Some(phase),
        meanwhile,
        then,
        ends,
    }
}

use Ends::{Dest, DiedWithVmm, Source};
use Phase::{CommitReceived, Decided, Loaded, Paused, Round1, Round2, Running};
use Proc::{DestSidecar, DestVmm, SourceSidecar, SourceVmm};
use Then::{Nothing, RecoverAbort, RestartSidecar};

const UNFENCED: &str = "the source VMM, not fenced, resumes on its own; the destination discards";
const FENCED: &str = "the source VMM, fenced, stays paused; the destination holds the loaded VM";
const ABORTS: &str = "the source aborts and resumes the VM; the destination discards";
const RELEASE_RESTARTED: &str = "the source VMM, not fenced, resumes on its own; the destination holds the loaded VM until the restarted source sidecar releases it";
const RELEASE_DEST_RESTARTED: &str = "the source aborts and resumes; the destination VMM keeps the loaded VM until its restarted sidecar is told to release it";
const START_UNREACHED: &str = "Start reaches no VMM: start-failed, the source stays paused";
const REPLAY: &str = "the source replays its recorded decision (retrying for the replay window)";

/// The matrix.
pub const MATRIX: &[Cell] = &[
    kill(SourceSidecar, Round1, UNFENCED, Nothing, Source),
    kill(SourceSidecar, Round2, UNFENCED, Nothing, Source),
    kill(SourceSidecar, Paused, UNFENCED, Nothing, Source),
    kill(SourceSidecar, Loaded, RELEASE_RESTARTED, RestartSidecar, Source),
    kill(SourceSidecar, Decided, FENCED, RestartSidecar, Dest),
    kill(
        SourceSidecar,
        CommitReceived,
        "the destination starts the VM; the source VMM, fenced, stays paused",
        RestartSidecar,
        Dest,
    ),
    kill(
        SourceSidecar,
        Running,
        "the VM runs at the destination; the source VMM, fenced, stays paused",
        RestartSidecar,
        Dest,
    ),
    kill(DestSidecar, Round1, ABORTS, Nothing, Source),
    kill(DestSidecar, Round2, ABORTS, Nothing, Source),
    kill(DestSidecar, Paused, ABORTS, Nothing, Source),
    kill(DestSidecar, Loaded, RELEASE_DEST_RESTARTED, RestartSidecar, Source),
    kill(
        DestSidecar,
        Decided,
        "the destination VMM keeps the loaded VM; the source replays",
        RestartSidecar,
        Dest,
    ),
    kill(
        DestSidecar,
        CommitReceived,
        "the destination VMM keeps the loaded VM; Commit is on the destination's record",
        RestartSidecar,
        Dest,
    ),
    kill(
        DestSidecar,
        Running,
        "the VM runs at the destination",
        Nothing,
        Dest,
    ),
    kill(
        SourceVmm,
        Round1,
        "the migration aborts; the destination discards",
        Nothing,
        DiedWithVmm,
    ),
    kill(
        SourceVmm,
        Round2,
        "the migration aborts; the destination discards",
        Nothing,
        DiedWithVmm,
    ),
    kill(
        SourceVmm,
        Paused,
        "the migration aborts; the destination discards",
        Nothing,
        DiedWithVmm,
    ),
    kill(
        SourceVmm,
        Loaded,
        "Fence reaches no VMM: the migration aborts; the destination discards",
        Nothing,
        DiedWithVmm,
    ),
    kill(
        SourceVmm,
        Decided,
        "the decision stands: the destination has every page and the state",
        Nothing,
        Dest,
    ),
    kill(
        SourceVmm,
        CommitReceived,
        "the decision stands",
        Nothing,
        Dest,
    ),
    kill(
        SourceVmm,
        Running,
        "the VM runs at the destination",
        Nothing,
        Dest,
    ),
    kill(
        DestVmm,
        Round1,
        "Load fails: the source aborts and resumes",
        Nothing,
        Source,
    ),
    kill(
        DestVmm,
        Round2,
        "Load fails: the source aborts and resumes",
        Nothing,
        Source,
    ),
    kill(
        DestVmm,
        Paused,
        "Load fails: the source aborts and resumes",
        Nothing,
        Source,
    ),
    kill(DestVmm, Loaded, START_UNREACHED, RecoverAbort, Source),
    kill(
        DestVmm,
        Decided,
        START_UNREACHED,
        RecoverAbort,
        Source,
    ),
    kill(
        DestVmm,
        CommitReceived,
        START_UNREACHED,
        RecoverAbort,
        Source,
    ),
    kill(
        DestVmm,
        Running,
        "the VM had moved; its new VMM died",
        Nothing,
        DiedWithVmm,
    ),
    Cell {
        fault: Fault::Cut,
        phase: Some(Round1),
        meanwhile: "noticed in seconds; the source aborts and resumes",
        then: Nothing,
        ends: Source,
    },
    Cell {
        fault: Fault::Cut,
        phase: Some(Round2),
        meanwhile: "noticed in seconds; the source aborts and resumes",
        then: Nothing,
        ends: Source,
    },
    Cell {
        fault: Fault::Cut,
        phase: Some(Paused),
        meanwhile: "noticed in seconds; the source aborts and resumes",
        then: Nothing,
        ends: Source,
    },
    Cell {
        fault: Fault::Cut,
        phase: Some(Loaded),
        meanwhile: "the source aborts and resumes; the destination holds the loaded VM until the source's release gets through",
        then: Nothing,
        ends: Source,
    },
    Cell {
        fault: Fault::Cut,
        phase: Some(Decided),
        meanwhile: REPLAY,
        then: Nothing,
        ends: Dest,
    },
    Cell {
        fault: Fault::Cut,
        phase: Some(CommitReceived),
        meanwhile: "the destination starts the VM; the source replays until it hears",
        then: Nothing,
        ends: Dest,
    },
    Cell {
        fault: Fault::Cut,
        phase: Some(Running),
        meanwhile: "the source confirms and stops its copy without the link",
        then: Nothing,
        ends: Dest,
    },
    Cell {
        fault: Fault::DecisionReadOnly,
        phase: None,
        meanwhile: "no durable decision, no Commit: abort, resume",
        then: Nothing,
        ends: Source,
    },
    Cell {
        fault: Fault::DecisionFull,
        phase: None,
        meanwhile: "no durable decision, no Commit: abort, resume",
        then: Nothing,
        ends: Source,
    },
    Cell {
        fault: Fault::StartFails,
        phase: None,
        meanwhile: "start-failed: the source stays paused, the destination keeps the loaded VM",
        then: Then::Recover,
        ends: Dest,
    },
    Cell {
        fault: Fault::StartFails,
        phase: None,
        meanwhile: "start-failed: the source stays paused, the destination keeps the loaded VM",
        then: RecoverAbort,
        ends: Source,
    },
    Cell {
        fault: Fault::CorruptTls,
        phase: None,
        meanwhile: "TLS refuses the record: the connection fails, the source aborts",
        then: Nothing,
        ends: Source,
    },
    Cell {
        fault: Fault::CorruptPsk,
        phase: None,
        meanwhile: "the page fails its checksum and is sent again next round",
        then: Nothing,
        ends: Dest,
    },
    Cell {
        fault: Fault::ShortMemfd,
        phase: None,
        meanwhile: "the registration is refused (fstat); the sidecar serves on",
        then: Nothing,
        ends: Source,
    },
    Cell {
        fault: Fault::ShrinkingMemfd,
        phase: None,
        meanwhile: "the copy reads zeros instead of dying of SIGBUS; the migration aborts",
        then: Nothing,
        ends: Source,
    },
];

/// The matrix as a Markdown table (the README's copy).
pub fn markdown() -> String {
    let mut s =
        String::from("| fault | when | meanwhile | operator | the VM |\n|---|---|---|---|---|\n");
    for c in MATRIX {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            c.fault.name(),
            c.phase.map_or("", Phase::name),
            c.meanwhile,
            c.then.name(),
            c.ends.name()
        ));
    }
    s
}
