//! One migration, as two sans-I/O state machines: [`SourceSession`] and [`DestSession`].
//!
//! Everything a migration decides lives here, once: the per-window dirty-log order,
//! torn-page re-sends, convergence, cold-first ordering, handing unfinished ranges from one
//! transport to the next, verification, the commit point and its durable record, replay
//! of a decision the link lost, and what a destination may do with a loaded VM. Every
//! driver runs these sessions: the sidecar (`sidecar/src/source.rs`, `dest.rs`), the
//! simulator ([`crate::sim`]) and the test VMM's in-process migration; they differ only in
//! how they carry out commands.
//!
//! The shape is quinn-proto's: a session does no I/O, starts no thread and reads no clock.
//! The driver passes the time since the migration started with every event
//! (`handle(now, event)`) and takes commands out (`poll()`). Each command is answered by
//! exactly one event: the one it asks for, or [`Failure`] when the I/O behind it failed.
//! A session in a terminal state emits nothing more and reports its [`SourceOutcome`] /
//! [`DestPhase`].
//!
//! The rules are stated in `docs/design.md`; the state diagrams are there too.

mod dest;
mod source;

pub use dest::{DestCommand, DestEvent, DestPhase, DestRecord, DestSession};
pub use source::{
    CancelRefused, Downtime, Estimate, RoundReport, SourceCommand, SourceConfig, SourceEvent,
    SourceOutcome, SourcePhase, SourceReport, SourceSession, DEFAULT_WINDOW_PAGES, LOG_SHARE,
    MAX_LOG_BATCH,
};

use std::fmt;

/// A migration's identity: 16 random bytes chosen by the source, carried by the offer, the
/// data connections, the VMMs' fences and every durable record.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct SessionId(pub [u8; 16]);

impl SessionId {
    /// Parses the 32 lowercase or uppercase hex digits [`fmt::Display`] writes.
    pub fn from_hex(s: &str) -> Option<SessionId> {
        if s.len() != 32 || !s.is_ascii() {
            return None;
        }
        let mut out = [0u8; 16];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(SessionId(out))
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionId({self})")
    }
}

/// A data transport the sessions can plan for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TransportKind {
    /// Multi-stream TCP (`ferry-tcp-fallback`).
    Tcp,
    /// RDMA READ pulled by the destination (`ferry-verbs`).
    Rdma,
}

impl TransportKind {
    /// The name the summary's `transport` prints.
    pub fn name(self) -> &'static str {
        match self {
            TransportKind::Tcp => "tcp",
            TransportKind::Rdma => "rdma",
        }
    }

    /// The name in prose.
    pub fn label(self) -> &'static str {
        match self {
            TransportKind::Tcp => "TCP",
            TransportKind::Rdma => "RDMA",
        }
    }
}

/// When the memory digests are compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum VerifyMode {
    /// Before the destination resumes: the comparison is part of the downtime.
    Strict,
    /// After the destination resumes, the source VM kept (paused) until then: no downtime
    /// cost; a mismatch is reported loudly and the source VM is kept for the operator.
    #[default]
    AfterResume,
}

impl VerifyMode {
    /// The name the summary prints.
    pub fn name(self) -> &'static str {
        match self {
            VerifyMode::Strict => "strict",
            VerifyMode::AfterResume => "after-resume",
        }
    }
}

/// The durable record of a source's decision about one migration (`<state-dir>/<vm>.decision`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecisionState {
    /// A migration to the recorded destination started and nothing is decided yet. Written
    /// before the destination can hold a copy; a restarted sidecar that finds it knows the
    /// session died undecided (the VM is this host's) and tells the destination to discard.
    Undecided,
    /// Decided: the destination runs the VM. Written (and synced) before `Commit` leaves;
    /// from then on the source VM never resumes on its own.
    Committed,
    /// The destination confirmed the VM runs there.
    Confirmed,
    /// Rolled back by the operator (`ferry recover --abort`) after the destination
    /// confirmed it discarded its copy, or decided against before `Commit`.
    Aborted,
}

impl DecisionState {
    /// The word in the record.
    pub fn name(self) -> &'static str {
        match self {
            DecisionState::Undecided => "undecided",
            DecisionState::Committed => "committed",
            DecisionState::Confirmed => "confirmed",
            DecisionState::Aborted => "aborted",
        }
    }

    /// Parses [`DecisionState::name`].
    pub fn from_name(s: &str) -> Option<Self> {
        Some(match s {
            "undecided" => DecisionState::Undecided,
            "committed" => DecisionState::Committed,
            "confirmed" => DecisionState::Confirmed,
            "aborted" => DecisionState::Aborted,
            _ => return None,
        })
    }
}

/// Which side of the I/O failed, so the session can tell a lost VMM from a lost peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// The peer sidecar or the link: gone, timed out, or closed.
    PeerLost,
    /// The peer answered with a refusal or something outside the protocol.
    PeerRefused,
    /// The local VMM's link: gone or timed out (the VMM may have died).
    VmmLost,
    /// The local VMM answered with an error.
    VmmRefused,
    /// The data transport failed beyond recovery.
    Transport,
    /// This host: out of memory, a local file, a bug.
    Local,
    /// The operator cancelled the migration.
    Cancelled,
}

/// An I/O failure the driver reports instead of the event a command asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// What failed.
    pub kind: FailureKind,
    /// Why, for the operator.
    pub reason: String,
}

impl Failure {
    /// A failure of `kind`.
    pub fn new(kind: FailureKind, reason: impl Into<String>) -> Self {
        Self {
            kind,
            reason: reason.into(),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}

#[cfg(test)]
mod tests;
