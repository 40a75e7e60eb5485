//! Ferry's deterministic migration core.
//!
//! This crate decides what a live migration sends and when, and what may happen to the VM
//! on either host. Dirty bitmaps become coalesced page ranges ([`plan`]), ranges are spread
//! over channels ([`plan::plan`]), pre-copy rounds go on until the dirty set fits the
//! downtime budget ([`precopy::PrecopyController`]), and the two sessions
//! ([`session::SourceSession`], [`session::DestSession`]) run one migration each: windows,
//! log reads, transport fallback, verification ([`digest`]), the commit point and replay.
//!
//! It does no I/O and reads no clock: time, dirty bitmaps and transfer results come in as
//! events, commands go out. So the whole protocol runs over a simulated link ([`sim`]) of
//! any bandwidth and latency, fast and repeatably, with the same sessions the sidecar runs.
//!
//! # Quick start
//!
//! ```
//! use std::time::Duration;
//! use ferry_engine::session::{
//!     DecisionState, SourceCommand, SourceConfig, SourceEvent, SourceSession, TransportKind,
//! };
//!
//! // A 1 MiB VM (256 pages) in one region, migrated over one TCP channel.
//! let mut s = SourceSession::new(SourceConfig::new(vec![256]));
//! // First the migration is recorded as started, undecided (durably: a restarted sidecar
//! // must know the destination may hold a copy).
//! assert_eq!(s.poll(), Some(SourceCommand::Record(DecisionState::Undecided)));
//! s.handle(Duration::ZERO, SourceEvent::Recorded);
//! assert_eq!(s.poll(), Some(SourceCommand::Negotiate));
//! s.handle(Duration::ZERO, SourceEvent::Negotiated(vec![(TransportKind::Tcp, 1)]));
//! assert_eq!(s.poll(), Some(SourceCommand::StartDirtyLog));
//! s.handle(Duration::ZERO, SourceEvent::DirtyLogStarted(Vec::new()));
//! // Round 1 sends every page, in one window.
//! let Some(SourceCommand::SendWindow(w)) = s.poll() else { panic!("a window") };
//! assert_eq!((w.round, w.plan.pages()), (1, 256));
//! ```
//!
//! # Threads
//!
//! Every type here is plain data (`Send + Sync`); the caller owns the threads.
//!
//! # Resource cleanup
//!
//! Nothing here holds a resource beyond memory.

pub mod bitmap;
pub mod digest;
pub mod plan;
pub mod precopy;
pub mod session;
pub mod sim;
pub mod transport;

/// Guest page size Ferry tracks and moves (x86-64 base pages, KVM's dirty-log unit).
pub const PAGE_SIZE: u64 = 4096;

/// Errors of the engine: inputs that do not fit the VM they claim to describe.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EngineError {
    /// A bitmap's word count does not match its region's page count.
    #[error("Dirty bitmap of {words} words does not cover a region of {npages} pages")]
    BitmapLength {
        /// Words given.
        words: usize,
        /// Pages in the region.
        npages: u64,
    },
}
