//! Ferry's deterministic migration core.
//!
//! This crate decides what a live migration sends and when: dirty bitmaps become
//! coalesced page ranges ([`plan`]), ranges are spread over channels ([`plan::plan`]),
//! pre-copy rounds go on until the dirty set fits the downtime budget
//! ([`precopy::PrecopyController`]), and the commit/abort state machines
//! ([`commit`]) guarantee that exactly one VM runs. [`digest`] verifies the result.
//!
//! It does no I/O and reads no clock: time, dirty bitmaps and transfer results come in as
//! arguments, decisions go out. So the whole protocol can be exercised over a simulated
//! link ([`sim`]) of any bandwidth and latency, fast and repeatably.
//!
//! # Quick start
//!
//! ```
//! use std::time::Duration;
//! use ferry_engine::bitmap::DirtyBitmap;
//! use ferry_engine::plan::{plan, ranges_of};
//! use ferry_engine::precopy::{ConvergencePolicy, PrecopyController, RoundRecord, Step};
//!
//! let mut dirty = DirtyBitmap::new(1024);
//! dirty.set_range(100, 300);
//! let work = plan(&ranges_of(&[dirty]), 4, 64);
//! assert_eq!(work.pages(), 300);
//!
//! let mut ctl = PrecopyController::new(ConvergencePolicy::default());
//! ctl.round_finished(RoundRecord { round: 1, pages: 300, bytes: 300 * 4096, zero_pages: 0,
//!                                  elapsed: Duration::from_millis(1) });
//! assert!(matches!(ctl.next_step(Duration::from_millis(2), 4096), Step::StopAndCopy(_)));
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
pub mod commit;
pub mod digest;
pub mod plan;
pub mod precopy;
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
