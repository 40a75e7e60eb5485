//! The seam between the engine and the data transports (TCP streams, RDMA queue pairs).
//!
//! Both transports take the same work, a [`RangePlan`] for a round, and report the same
//! [`RoundStats`]. A failure that means "cannot continue on this transport" carries the
//! ranges not confirmed, so the caller can re-plan them on another transport.

use crate::plan::{PageRange, RangePlan};

/// What one channel or one whole round moved.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoundStats {
    /// Pages accounted for (payload and zero markers).
    pub pages: u64,
    /// Payload bytes moved.
    pub bytes: u64,
    /// Pages found all-zero and sent as a marker.
    pub zero_pages: u64,
    /// Pages whose checksum did not match at the receiver: (region, page).
    pub torn: Vec<(u32, u64)>,
}

impl RoundStats {
    /// Adds another channel's numbers.
    pub fn merge(&mut self, other: RoundStats) {
        self.pages += other.pages;
        self.bytes += other.bytes;
        self.zero_pages += other.zero_pages;
        self.torn.extend(other.torn);
    }
}

/// Why a transport stopped.
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
pub trait PageSender: Send {
    /// Transport name for summaries ("tcp", "rdma").
    fn name(&self) -> &'static str;
    /// Channels in use.
    fn channels(&self) -> usize;
    /// Moves every range of `plan` (one share per channel) for `round`. `progress` is
    /// called from the channel threads with payload bytes as they go.
    ///
    /// # Errors
    ///
    /// [`TransportError`]; the round did not complete.
    fn send_round(
        &mut self,
        round: u32,
        plan: &RangePlan,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<RoundStats, TransportError>;
}
