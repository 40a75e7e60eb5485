//! The seam between the sessions and the data transports (TCP streams, RDMA queue pairs,
//! the simulator's link, the test VMM's in-process copy).
//!
//! Every transport takes the same work, a [`Window`] the source session planned, and
//! returns the same [`WindowOutcome`]: done, with what was moved, or the ranges it could
//! not confirm (which the session re-plans on the next transport). A transport that cannot
//! go on at all returns a [`TransportError`].

use crate::plan::{PageRange, RangePlan};
use crate::session::TransportKind;

/// One window of a round: the pages a transport moves between two reads of the dirty log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Window {
    /// Round number on the wire (one per window; the destination confirms each).
    pub wire_round: u32,
    /// The pre-copy round (or the final round) this window belongs to.
    pub round: u32,
    /// Whether the VM is paused (the final round).
    pub final_round: bool,
    /// Which transport the session planned this window for.
    pub transport: TransportKind,
    /// The pages, one share per channel.
    pub plan: RangePlan,
}

/// CPU time one side's data threads spent on a round, by phase, in nanoseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PhaseCpu {
    /// All of it: the data threads' CPU time over the round (sending or receiving,
    /// hashing, filling memory).
    pub data_ns: u64,
    /// Of which hashing pages (the per-page checksums).
    pub hash_ns: u64,
    /// Of which filling fresh memory before pages land in it (destination).
    pub populate_ns: u64,
}

impl PhaseCpu {
    /// Adds another channel's or round's.
    pub fn add(&mut self, o: PhaseCpu) {
        self.data_ns = self.data_ns.saturating_add(o.data_ns);
        self.hash_ns = self.hash_ns.saturating_add(o.hash_ns);
        self.populate_ns = self.populate_ns.saturating_add(o.populate_ns);
    }
}

/// What one channel, one window or one whole round moved.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoundStats {
    /// Pages accounted for (payload and zero markers).
    pub pages: u64,
    /// Payload bytes moved.
    pub bytes: u64,
    /// Pages found all-zero and sent as a marker.
    pub zero_pages: u64,
    /// Pages whose checksum did not match at the receiver (single-page ranges).
    pub torn: Vec<PageRange>,
    /// This side's CPU time (TCP; zero over RDMA, where no thread of ours moves data).
    pub cpu: PhaseCpu,
    /// The other side's, as it reported it.
    pub peer_cpu: PhaseCpu,
}

impl RoundStats {
    /// Adds another channel's numbers.
    pub fn merge(&mut self, other: RoundStats) {
        // Saturating: the numbers may come from a peer (checked against the plan after).
        self.pages = self.pages.saturating_add(other.pages);
        self.bytes = self.bytes.saturating_add(other.bytes);
        self.zero_pages = self.zero_pages.saturating_add(other.zero_pages);
        self.torn.extend(other.torn);
        self.cpu.add(other.cpu);
        self.peer_cpu.add(other.peer_cpu);
    }
}

/// How a window ended on a transport.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WindowOutcome {
    /// Every page of the window is confirmed at the destination.
    Done(RoundStats),
    /// The transport stopped part-way and cannot go on (an RDMA queue pair failed); the
    /// pages in `unfinished` were not confirmed, the rest were.
    Unfinished {
        /// What was confirmed.
        confirmed: RoundStats,
        /// Ranges not confirmed, to be re-sent on another transport.
        unfinished: Vec<PageRange>,
        /// What failed.
        reason: String,
    },
}

/// Why a transport stopped for good.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The transport cannot work here (no device, operation not supported): use another.
    #[error("Transport unavailable: {0}")]
    Unsupported(String),
    /// The peer or the link is gone.
    #[error("Peer unreachable: {0}")]
    PeerGone(String),
    /// The peer sent something outside the protocol (bounds, round, framing).
    #[error("Protocol violation: {0}")]
    Protocol(String),
    /// The transport failed mid-round; `unfinished` were not confirmed.
    #[error("Transport failed with {} ranges unfinished: {reason}", unfinished.len())]
    Failed {
        /// What went wrong.
        reason: String,
        /// Ranges not confirmed at the destination.
        unfinished: Vec<PageRange>,
    },
}

/// The source side of a data transport.
pub trait Transport {
    /// Which transport this is.
    fn kind(&self) -> TransportKind;
    /// Channels in use (TCP connections, queue pairs).
    fn channels(&self) -> usize;
    /// Moves every page of `window` and waits until the destination confirmed them.
    /// `progress` is called (from any thread) with payload bytes as they go.
    ///
    /// # Errors
    ///
    /// [`TransportError`] when nothing more can be moved on this transport and no page
    /// is known to be confirmed; [`WindowOutcome::Unfinished`] is not an error.
    fn send_window(
        &mut self,
        window: &Window,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<WindowOutcome, TransportError>;
}
