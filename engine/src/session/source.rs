//! The source side of one migration.
//!
//! ```text
//!  Recording "undecided" -> Negotiating -> Precopy (rounds of windows) -> StopAndCopy (paused, final round, state)
//!    -> Verifying (Ready; strict: digests compared) -> Fencing (the VMM promises not to
//!    resume on its own) -> Recording (decision written and synced) == COMMIT POINT ==
//!    Committing (Commit sent) -> Confirming (Running; confirmed recorded; after-resume:
//!    digests compared) -> Stopping -> Done
//!  any failure before the commit point -> Aborting (resume the VM, tell the peer; if it
//!    may hold a loaded copy and did not confirm discarding it, hand it to the background
//!    release; record "aborted") -> Done
//!  a failure after it -> Replaying (the decision, on fresh connections, for the replay
//!    window) -> Confirming, or Done(CommittedUnconfirmed) with the VM paused
//! ```
//!
//! Dirty-log order (`docs/design.md`): a page is sent only after the log read that covers
//! its latest logged write has cleared it. Rounds go out in windows of
//! [`SourceConfig::window_pages`]; before each window after the first the log is read and
//! cleared, and the window's pages leave the carried dirty set because they are about to be
//! sent with whatever they hold. A write after that read is in the next read. The final
//! round runs with the VM paused, in one window.

use std::collections::VecDeque;
use std::time::Duration;

use super::{DecisionState, Failure, FailureKind, TransportKind, VerifyMode};
use crate::bitmap::DirtyBitmap;
use crate::digest::MemoryDigest;
use crate::plan::{cold_first, plan, ranges_of, windows, PageRange, DEFAULT_CHUNK_PAGES};
use crate::precopy::{ConvergencePolicy, PrecopyController, RoundRecord, Step, StopReason};
use crate::transport::{RoundStats, Window, WindowOutcome};
use crate::PAGE_SIZE;

/// Pages per window of a pre-copy round: 64 MiB. One read of a 1 GiB log costs under
/// 1 ms against ~64 ms of sending per window at 1 GB/s: ~2 % for far fewer re-sends
/// (`ferry-bench coldfirst`).
pub const DEFAULT_WINDOW_PAGES: u64 = 16_384;

/// Largest number of windows sent after one dirty-log read. A read that costs more than
/// 1/[`LOG_SHARE`] of the sending it precedes (a large guest's log read and clear, a slow
/// VMM) doubles the windows that share the next read, up to this many: the log stays read
/// before every page is sent, only less often.
pub const MAX_LOG_BATCH: u32 = 16;

/// A window batch's sending time over its log read's, below which reads are batched.
pub const LOG_SHARE: u32 = 50;

/// What a source session is configured with.
#[derive(Clone, Debug)]
pub struct SourceConfig {
    /// Pages of each registered RAM region, in layout order.
    pub regions: Vec<u64>,
    /// When pre-copy may stop.
    pub policy: ConvergencePolicy,
    /// When the digests are compared.
    pub verify: VerifyMode,
    /// Watch writes this long before round 1 and send those pages last (zero: off).
    pub observe: Duration,
    /// Pages per window of a pre-copy round.
    pub window_pages: u64,
    /// Largest piece of a range one channel takes at a time.
    pub chunk_pages: u64,
    /// How long a decision the link lost is replayed before the operator is asked.
    pub replay_window: Duration,
    /// Pause between two replay attempts.
    pub replay_interval: Duration,
}

impl SourceConfig {
    /// Defaults for a VM with these regions.
    pub fn new(regions: Vec<u64>) -> Self {
        Self {
            regions,
            policy: ConvergencePolicy::default(),
            verify: VerifyMode::default(),
            observe: Duration::ZERO,
            window_pages: DEFAULT_WINDOW_PAGES,
            chunk_pages: DEFAULT_CHUNK_PAGES,
            replay_window: Duration::from_secs(120),
            replay_interval: Duration::from_secs(1),
        }
    }
}

/// What the driver must do next. Each is answered by one [`SourceEvent`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceCommand {
    /// Connect to the destination, authenticate, offer the VM, open the data channels and
    /// find out which transports work. Answer: [`SourceEvent::Negotiated`].
    Negotiate,
    /// Ask the VMM to switch dirty logging on. Answer: [`SourceEvent::DirtyLogStarted`].
    StartDirtyLog,
    /// Wait `delay`, then get-and-clear the dirty log. Answer: [`SourceEvent::Dirty`].
    TakeDirty {
        /// Whether the VM is paused (the last read of the migration).
        final_round: bool,
        /// How long to wait first (the cold-first observation window).
        delay: Duration,
    },
    /// Move this window on its transport. Answer: [`SourceEvent::WindowSent`].
    SendWindow(Window),
    /// Pause the VM (vCPUs and the VMM's own writers). Answer: [`SourceEvent::Paused`].
    Pause,
    /// Save the vCPU and device state. Answer: [`SourceEvent::StateSaved`].
    SaveState,
    /// Send the state blob to the destination. Answer: [`SourceEvent::StateSent`].
    SendState(Vec<u8>),
    /// Hash the (paused) source memory. Answer: [`SourceEvent::SourceHashed`].
    HashSource,
    /// Wait for the destination to load the VM and send its digest. Answer:
    /// [`SourceEvent::PeerReady`].
    AwaitReady,
    /// Tell the VMM a commit decision may be recorded from now on: it must not resume on
    /// its own if it loses its sidecar. Answer: [`SourceEvent::Fenced`].
    Fence,
    /// Write this decision durably (file and directory synced). Answer:
    /// [`SourceEvent::Recorded`] or [`SourceEvent::RecordFailed`].
    Record(DecisionState),
    /// Send `Commit` and wait for the destination's answer. Answer:
    /// [`SourceEvent::PeerRunning`] or [`SourceEvent::PeerStartFailed`].
    SendCommit,
    /// Deliver the recorded decision on a fresh authenticated connection. Answer as
    /// [`SourceCommand::SendCommit`].
    ReplayCommit,
    /// Ask the destination to discard its copy (the operator rolls a decision back).
    /// Answer: [`SourceEvent::PeerDiscarded`].
    AskDiscard,
    /// Wait this long. Answer: [`SourceEvent::Slept`].
    Sleep(Duration),
    /// Tell the destination the migration is off, on the control link. With `confirm`
    /// (the destination may hold a loaded copy), wait for it to confirm it discarded it.
    /// Answer: [`SourceEvent::PeerTold`] (sent; with `confirm`, confirmed), or a failure.
    AbortPeer {
        /// Why, for the destination's log.
        reason: String,
        /// Whether to wait for `Discarded`.
        confirm: bool,
    },
    /// The destination may hold a loaded copy and could not be told on the control link:
    /// arrange, durably, for it to be told to discard it (`Decision{commit: false}` on
    /// fresh connections, in the background, until it answers). Answer:
    /// [`SourceEvent::PeerTold`] once arranged, or a failure when it could not be.
    ReleasePeer,
    /// The migration failed: the VMM switches logging off and runs (again). Answer:
    /// [`SourceEvent::Resumed`].
    Resume,
    /// The destination runs the VM: stop it here for good. Answer: [`SourceEvent::Stopped`].
    Stop,
}

/// What happened: the answer to the last command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceEvent {
    /// The destination accepted; the transports that work, preferred first, with their
    /// channel counts.
    Negotiated(Vec<(TransportKind, usize)>),
    /// Dirty logging is on; with it, per region, the pages known to read as zero at that
    /// moment without being read (the holes of the source's memfds; empty: none known).
    /// Round 1 skips them: the destination's fresh memory holds zeros there, and a write
    /// after this moment is in the log.
    DirtyLogStarted(Vec<DirtyBitmap>),
    /// One bitmap per region, just read and cleared.
    Dirty(Vec<DirtyBitmap>),
    /// A window ended.
    WindowSent(WindowOutcome),
    /// The VM is paused; pausing took this long in the VMM.
    Paused(Duration),
    /// The state blob.
    StateSaved(Vec<u8>),
    /// The state blob is at the destination.
    StateSent,
    /// The source memory's digest.
    SourceHashed(MemoryDigest),
    /// The destination loaded the VM (not running) and sent its digest.
    PeerReady(MemoryDigest),
    /// The VMM acknowledged the fence.
    Fenced,
    /// The decision is on disk.
    Recorded,
    /// The decision could not be written durably.
    RecordFailed(String),
    /// The destination runs the VM; its VMM's line.
    PeerRunning(String),
    /// The destination could not start the VM; it keeps the loaded copy.
    PeerStartFailed(String),
    /// The destination discarded its copy.
    PeerDiscarded,
    /// The destination was told (see [`SourceCommand::AbortPeer`] and
    /// [`SourceCommand::ReleasePeer`]).
    PeerTold,
    /// A sleep ended.
    Slept,
    /// The VMM runs the VM again.
    Resumed,
    /// The VMM stopped the VM for good.
    Stopped,
    /// The I/O behind the last command failed.
    Failed(Failure),
}

/// How a source session ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceOutcome {
    /// The destination runs the VM; the source stopped it (or asked to).
    Committed,
    /// Committed, but the digests compared after the destination resumed differ: the
    /// source VM is kept paused for the operator.
    DigestMismatch(Vec<PageRange>),
    /// The decision is recorded but the destination never confirmed it: the source VM
    /// stays paused until `ferry recover` delivers it.
    CommittedUnconfirmed,
    /// The decision is recorded but the destination could not start the VM: both copies
    /// are kept (source paused, destination loaded) for the operator.
    StartFailed(String),
    /// Given up before the commit point (or rolled back by the operator): the VM runs on
    /// the source, unless its VMM is gone.
    Aborted,
}

impl SourceOutcome {
    /// The word the summary's `result` carries.
    pub fn name(&self) -> &'static str {
        match self {
            SourceOutcome::Committed => "committed",
            SourceOutcome::DigestMismatch(_) => "digest-mismatch",
            SourceOutcome::CommittedUnconfirmed => "committed-unconfirmed",
            SourceOutcome::StartFailed(_) => "start-failed",
            SourceOutcome::Aborted => "aborted",
        }
    }
}

/// Where a source session stands, for status displays.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourcePhase {
    /// Handshake with the destination.
    Negotiating,
    /// Pre-copy rounds; the VM runs.
    Precopy,
    /// The VM is paused; final round and state.
    StopAndCopy,
    /// Waiting for the destination's digest (and comparing, in strict mode).
    Verifying,
    /// Fencing the VMM and recording the decision.
    Deciding,
    /// Committed: `Commit` sent or being replayed; the source never resumes.
    Committed,
    /// Giving up: telling the peer, resuming the VM.
    Aborting,
    /// Finished.
    Done,
}

impl SourcePhase {
    /// The word `ferry status` shows.
    pub fn name(self) -> &'static str {
        match self {
            SourcePhase::Negotiating => "preparing",
            SourcePhase::Precopy => "precopy",
            SourcePhase::StopAndCopy => "stop-and-copy",
            SourcePhase::Verifying => "verifying",
            SourcePhase::Deciding => "deciding",
            SourcePhase::Committed => "committed",
            SourcePhase::Aborting => "aborting",
            SourcePhase::Done => "done",
        }
    }
}

/// One finished round, as the summary shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoundReport {
    /// Round number (the last one ran with the VM paused).
    pub round: u32,
    /// Whether the VM was paused.
    pub final_round: bool,
    /// What the round moved.
    pub stats: RoundStats,
    /// Its wall time.
    pub elapsed: Duration,
    /// Dirty-log reads between its windows, and the time spent waiting for them.
    pub log_reads: u32,
    /// Time from asking for those reads to having them.
    pub log_wait: Duration,
    /// Windows per log read when the round ended (see [`MAX_LOG_BATCH`]).
    pub log_batch: u32,
}

/// Moments of the downtime window, in session time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Downtime {
    /// When `Pause` was asked for.
    pub pause_asked: Duration,
    /// How long the VMM took to pause.
    pub pause_took: Duration,
    /// When the VM was paused.
    pub paused: Duration,
    /// When the final round was confirmed.
    pub final_done: Duration,
    /// When the state was at the destination.
    pub state_sent: Duration,
    /// When the destination's Ready was accepted (digests compared in strict mode).
    pub verified: Duration,
    /// When the destination confirmed it runs the VM.
    pub running: Option<Duration>,
}

/// Everything a source session measured and decided, for the summary.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SourceReport {
    /// Rounds run, the final one last.
    pub rounds: Vec<RoundReport>,
    /// Transports used, in order ("tcp", "rdma", then "tcp" after a fallback).
    pub transports: Vec<TransportKind>,
    /// Channels per transport, as negotiated.
    pub channels: usize,
    /// Why a transport was left mid-migration.
    pub fallback: Option<String>,
    /// Why pre-copy stopped.
    pub stop_reason: Option<StopReason>,
    /// Whether the digests matched (None: not compared).
    pub digest_match: Option<bool>,
    /// Where the downtime went (once the VM paused).
    pub downtime: Option<Downtime>,
    /// How long the after-resume comparison took.
    pub verified_after_resume: Option<Duration>,
    /// The destination VMM's start line.
    pub peer_detail: Option<String>,
    /// Whether the decision reached the destination by replay.
    pub replayed: bool,
    /// Why the migration failed (or what went wrong after the commit point).
    pub error: Option<String>,
    /// Things that went wrong without changing the outcome.
    pub warnings: Vec<String>,
    /// Whether the operator cancelled the migration (it then ends aborted).
    pub cancelled: bool,
    /// Pages round 1 skipped because they were known to be zero (memfd holes).
    pub zero_skipped: u64,
}

/// What pre-copy looks like now, for progress displays and status.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Estimate {
    /// The rate convergence is judged at (measured, never above the cap), bytes per second.
    pub bandwidth: Option<f64>,
    /// Bytes found dirty by the last read after a round.
    pub dirty_bytes: u64,
    /// How fast the guest dirtied memory during the last round, bytes per second.
    pub dirty_rate: Option<f64>,
    /// How long the final copy of what is dirty now would take at `bandwidth`.
    pub expected_downtime: Option<Duration>,
}

/// Why a cancel was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CancelRefused(pub String);

impl std::fmt::Display for CancelRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl SourceReport {
    /// Payload bytes over all rounds.
    pub fn bytes(&self) -> u64 {
        self.rounds.iter().map(|r| r.stats.bytes).sum()
    }
}

/// A round in progress: its remaining windows and what they carried over.
#[derive(Debug)]
struct RoundRun {
    round: u32,
    final_round: bool,
    started: Duration,
    planned_pages: u64,
    windows: VecDeque<Vec<PageRange>>,
    /// Pages of the window in flight not yet confirmed on any transport.
    in_flight: Vec<PageRange>,
    /// Pages dirtied since the round's first log read and not sent after (plus torn pages).
    carry: Vec<DirtyBitmap>,
    stats: RoundStats,
    /// Whether the log was read since the last window went out (the round's first window
    /// follows the caller's read).
    log_read: bool,
    /// When the pending log read was asked for, and when the last batch went out.
    log_asked: Duration,
    batch_started: Duration,
    /// How long the last batch took on the wire.
    last_batch: Duration,
    log_reads: u32,
    log_wait: Duration,
}

/// What the session waits for.
#[derive(Debug)]
enum Stage {
    /// "undecided" being written, before anything reaches the destination.
    RecordingStart,
    Negotiating,
    StartingLog,
    Observing,
    /// A log read before the next window of `RoundRun`.
    WindowDirty(RoundRun),
    /// A window on the wire.
    Window(RoundRun),
    /// The log read after a pre-copy round: decides what follows.
    AfterRound(Vec<DirtyBitmap>),
    Pausing(Vec<DirtyBitmap>),
    FinalDirty(Vec<DirtyBitmap>),
    SavingState,
    SendingState,
    HashingStrict,
    AwaitingReady,
    Fencing,
    RecordingCommit,
    Committing,
    Replaying {
        deadline: Duration,
    },
    ReplaySleep {
        deadline: Duration,
    },
    RecordingConfirmed,
    HashingAfterResume {
        started: Duration,
    },
    Stopping,
    /// The operator's roll-back: destination first, then the record, then the VM.
    AskingDiscard,
    RecordingAbort,
    AbortingPeer,
    /// Handing the destination's copy to the background release.
    Releasing,
    /// "aborted" being written over "undecided".
    RecordingAborted,
    Resuming,
    Done(SourceOutcome),
}

/// The source side of one migration. See the module documentation.
#[derive(Debug)]
pub struct SourceSession {
    cfg: SourceConfig,
    stage: Stage,
    queue: VecDeque<SourceCommand>,
    ctl: PrecopyController,
    /// Transports that work, preferred first; the first is in use.
    transports: VecDeque<(TransportKind, usize)>,
    wire_round: u32,
    theirs: Option<MemoryDigest>,
    ours: Option<MemoryDigest>,
    /// Whether the peer takes part (false once it is known gone).
    peer_reachable: bool,
    /// Whether the VMM can be asked anything.
    vmm_reachable: bool,
    /// Whether the VM was asked to pause (resume needed on abort).
    pause_asked: bool,
    /// Whether the destination may hold a loaded copy nobody has confirmed discarded
    /// (from the moment the state blob is sent).
    peer_may_hold: bool,
    /// Whether "undecided" is on disk (an abort then records "aborted").
    start_recorded: bool,
    /// Whether `AbortPeer` was issued.
    peer_told: bool,
    /// Why the migration is being aborted (for the destination).
    abort_reason: String,
    /// The last dirty read after a round: bytes, and how long that round took.
    last_dirty: Option<(u64, Duration)>,
    /// Windows sent per dirty-log read (1 to [`MAX_LOG_BATCH`]; grows when reads are slow
    /// against sending, kept from round to round).
    log_batch: u32,
    /// Pages known to be zero when the log started: round 1 leaves them out.
    known_zero: Vec<DirtyBitmap>,
    report: SourceReport,
}

fn empty_like(regions: &[u64]) -> Vec<DirtyBitmap> {
    regions.iter().map(|&n| DirtyBitmap::new(n)).collect()
}

fn pages_of(ranges: &[PageRange]) -> u64 {
    ranges.iter().map(|r| r.count).sum()
}

/// Whether every range of `inner` lies inside one range of `outer` (`outer` does not
/// overlap itself: it is a window's plan).
fn all_within(outer: &[PageRange], inner: &[PageRange]) -> bool {
    let mut sorted = outer.to_vec();
    sorted.sort_unstable_by_key(|r| (r.region, r.first));
    inner.iter().all(|u| {
        let Some(end) = u.first.checked_add(u.count) else {
            return false;
        };
        // The last range starting at or before `u`.
        let i = sorted.partition_point(|r| (r.region, r.first) <= (u.region, u.first));
        i > 0 && {
            let r = &sorted[i - 1];
            r.region == u.region && end <= r.end()
        }
    })
}

/// Says which page ranges differ, for the operator.
pub fn describe_mismatch(bad: &[PageRange]) -> String {
    let list: Vec<String> = bad
        .iter()
        .take(8)
        .map(|r| format!("region {} pages {}..{}", r.region, r.first, r.end()))
        .collect();
    format!(
        "memory digest mismatch in {} ranges: {}",
        bad.len(),
        list.join(", ")
    )
}

impl SourceSession {
    /// A session that starts by negotiating with the destination.
    pub fn new(cfg: SourceConfig) -> Self {
        let mut s = Self::idle(cfg);
        s.stage = Stage::RecordingStart;
        s.queue
            .push_back(SourceCommand::Record(DecisionState::Undecided));
        s
    }

    /// A session for a decision recorded earlier and never confirmed (a restarted daemon,
    /// or `ferry recover`): replays it for `cfg.replay_window`, then stops the VM.
    pub fn deliver_recorded(cfg: SourceConfig) -> Self {
        let mut s = Self::idle(cfg);
        s.peer_reachable = false;
        s.pause_asked = true;
        s.stage = Stage::Replaying {
            deadline: s.cfg.replay_window,
        };
        s.queue.push_back(SourceCommand::ReplayCommit);
        s
    }

    /// The operator rolls back a recorded, unconfirmed decision (`ferry recover --abort`):
    /// the destination must confirm it discarded its copy (unless `force`), then the
    /// record says aborted and the VM resumes here.
    pub fn roll_back(cfg: SourceConfig, force: bool) -> Self {
        let mut s = Self::idle(cfg);
        s.pause_asked = true;
        // The destination is asked (and answers) before anything here changes.
        s.peer_told = true;
        if force {
            s.report
                .warnings
                .push("rolled back without the destination's confirmation (--force)".into());
            s.stage = Stage::RecordingAbort;
            s.queue
                .push_back(SourceCommand::Record(DecisionState::Aborted));
        } else {
            s.stage = Stage::AskingDiscard;
            s.queue.push_back(SourceCommand::AskDiscard);
        }
        s
    }

    fn idle(cfg: SourceConfig) -> Self {
        Self {
            ctl: PrecopyController::new(cfg.policy),
            cfg,
            stage: Stage::Negotiating,
            queue: VecDeque::new(),
            transports: VecDeque::new(),
            wire_round: 0,
            log_batch: 1,
            known_zero: Vec::new(),
            theirs: None,
            ours: None,
            peer_reachable: true,
            vmm_reachable: true,
            pause_asked: false,
            peer_may_hold: false,
            start_recorded: false,
            peer_told: false,
            abort_reason: String::new(),
            last_dirty: None,
            report: SourceReport::default(),
        }
    }

    /// The next command, if any (each is handed out once).
    pub fn poll(&mut self) -> Option<SourceCommand> {
        self.queue.pop_front()
    }

    /// The outcome, once the session is done.
    pub fn outcome(&self) -> Option<&SourceOutcome> {
        match &self.stage {
            Stage::Done(o) => Some(o),
            _ => None,
        }
    }

    /// What was measured and decided so far.
    pub fn report(&self) -> &SourceReport {
        &self.report
    }

    /// The rounds the convergence controller has seen.
    pub fn precopy(&self) -> &PrecopyController {
        &self.ctl
    }

    /// The round in progress (for progress displays): number, pages planned.
    pub fn current_round(&self) -> Option<(u32, bool, u64)> {
        match &self.stage {
            Stage::WindowDirty(r) | Stage::Window(r) => {
                Some((r.round, r.final_round, r.planned_pages))
            }
            _ => None,
        }
    }

    /// Whether the decision to commit is taken (or being recorded): cancelling is refused
    /// and nothing may resume the source VM on the session's behalf.
    pub fn past_commit_point(&self) -> bool {
        matches!(
            self.stage,
            Stage::RecordingCommit
                | Stage::Committing
                | Stage::Replaying { .. }
                | Stage::ReplaySleep { .. }
                | Stage::RecordingConfirmed
                | Stage::HashingAfterResume { .. }
                | Stage::Stopping
                | Stage::AskingDiscard
                | Stage::Done(SourceOutcome::Committed)
                | Stage::Done(SourceOutcome::DigestMismatch(_))
                | Stage::Done(SourceOutcome::CommittedUnconfirmed)
                | Stage::Done(SourceOutcome::StartFailed(_))
        )
    }

    /// Sets the bandwidth cap in force now, in bytes per second (`None`: none); the next
    /// convergence decision is judged at the capped rate.
    pub fn set_rate_cap(&mut self, cap: Option<u64>) {
        self.ctl.set_rate_cap(cap);
    }

    /// Where pre-copy stands: the rate, the dirty set and what a switch-over would cost.
    pub fn estimate(&self) -> Estimate {
        let bandwidth = self.ctl.bandwidth();
        let (dirty_bytes, round_took) = self.last_dirty.unwrap_or_default();
        let dirty_rate = (self.last_dirty.is_some() && !round_took.is_zero())
            .then(|| dirty_bytes as f64 / round_took.as_secs_f64());
        Estimate {
            bandwidth,
            dirty_bytes,
            dirty_rate,
            expected_downtime: bandwidth
                .filter(|b| *b > 0.0 && self.last_dirty.is_some())
                .map(|b| Duration::from_secs_f64(dirty_bytes as f64 / b)),
        }
    }

    /// The operator cancels the migration (`now`: time since it started). Before the
    /// commit point it is aborted exactly as if the step in progress had failed: the VM
    /// runs here again and the destination is told to discard its copy. The command the
    /// driver was about to run is dropped, so call this only between [`Self::handle`]
    /// and the next [`Self::poll`].
    ///
    /// # Errors
    ///
    /// The commit decision is taken (or being recorded), or the session already ended.
    pub fn cancel(&mut self, now: Duration) -> Result<(), CancelRefused> {
        if self.past_commit_point() {
            return Err(CancelRefused(
                "the commit decision is taken: the VM is the destination's now (`ferry recover` settles a decision the link lost)".into(),
            ));
        }
        match self.phase() {
            SourcePhase::Done => {
                return Err(CancelRefused("the migration already ended".into()));
            }
            // Already rolling back: the outcome will be the same.
            SourcePhase::Aborting => {
                self.report.cancelled = true;
                return Ok(());
            }
            _ => {}
        }
        self.report.cancelled = true;
        self.queue.clear();
        let stage = std::mem::replace(&mut self.stage, Stage::Done(SourceOutcome::Aborted));
        self.stage = self.on_failure(
            now,
            stage,
            Failure::new(FailureKind::Cancelled, "cancelled by the operator"),
        );
        Ok(())
    }

    /// Where the session stands.
    pub fn phase(&self) -> SourcePhase {
        match &self.stage {
            Stage::RecordingStart | Stage::Negotiating => SourcePhase::Negotiating,
            Stage::StartingLog | Stage::Observing | Stage::AfterRound(_) | Stage::Pausing(_) => {
                SourcePhase::Precopy
            }
            Stage::WindowDirty(r) | Stage::Window(r) if !r.final_round => SourcePhase::Precopy,
            Stage::WindowDirty(_)
            | Stage::Window(_)
            | Stage::FinalDirty(_)
            | Stage::SavingState
            | Stage::SendingState => SourcePhase::StopAndCopy,
            Stage::HashingStrict | Stage::AwaitingReady => SourcePhase::Verifying,
            Stage::Fencing | Stage::RecordingCommit => SourcePhase::Deciding,
            Stage::Committing
            | Stage::Replaying { .. }
            | Stage::ReplaySleep { .. }
            | Stage::RecordingConfirmed
            | Stage::HashingAfterResume { .. }
            | Stage::Stopping
            | Stage::AskingDiscard => SourcePhase::Committed,
            Stage::RecordingAbort
            | Stage::AbortingPeer
            | Stage::Releasing
            | Stage::RecordingAborted
            | Stage::Resuming => SourcePhase::Aborting,
            Stage::Done(_) => SourcePhase::Done,
        }
    }

    /// Feeds the answer to the last command, at `now` (time since the migration started).
    pub fn handle(&mut self, now: Duration, event: SourceEvent) {
        let stage = std::mem::replace(&mut self.stage, Stage::Done(SourceOutcome::Aborted));
        self.stage = match (stage, event) {
            (Stage::Done(o), _) => Stage::Done(o),
            (stage, SourceEvent::Failed(f)) => self.on_failure(now, stage, f),
            (stage, event) => self.step(now, stage, event),
        };
    }

    fn push(&mut self, c: SourceCommand) {
        self.queue.push_back(c);
    }

    /// A protocol slip inside the driver: the event does not answer the command.
    fn unexpected(&mut self, now: Duration, stage: Stage, event: &SourceEvent) -> Stage {
        let what = format!(
            "internal: event {event:?} does not answer the pending command in stage {stage:?}"
        );
        self.on_failure(now, stage, Failure::new(FailureKind::Local, what))
    }

    fn step(&mut self, now: Duration, stage: Stage, event: SourceEvent) -> Stage {
        use SourceEvent as E;
        match (stage, event) {
            (Stage::RecordingStart, E::Recorded) => {
                self.start_recorded = true;
                self.push(SourceCommand::Negotiate);
                Stage::Negotiating
            }
            (Stage::RecordingStart, E::RecordFailed(why)) => {
                self.report.error = Some(format!(
                    "the migration could not be recorded before it started ({why}); nothing was moved"
                ));
                Stage::Done(SourceOutcome::Aborted)
            }
            (Stage::Negotiating, E::Negotiated(list)) => {
                if list.is_empty() || list.iter().any(|&(_, n)| n == 0) {
                    return self.on_failure(
                        now,
                        Stage::Negotiating,
                        Failure::new(FailureKind::Local, "no usable data transport"),
                    );
                }
                self.report.channels = list[0].1;
                self.report.transports.push(list[0].0);
                self.transports = list.into();
                self.push(SourceCommand::StartDirtyLog);
                Stage::StartingLog
            }
            (Stage::StartingLog, E::DirtyLogStarted(zero)) => {
                let zero = if zero.is_empty() {
                    empty_like(&self.cfg.regions)
                } else {
                    match self.checked(zero) {
                        Ok(z) => z,
                        Err(f) => return self.on_failure(now, Stage::StartingLog, f),
                    }
                };
                self.known_zero = zero;
                if self.cfg.observe > Duration::ZERO {
                    self.push(SourceCommand::TakeDirty {
                        final_round: false,
                        delay: self.cfg.observe,
                    });
                    Stage::Observing
                } else {
                    let first = self.round_one_pages(&[]);
                    self.begin_round(now, 1, false, ranges_of(&first))
                }
            }
            (Stage::Observing, E::Dirty(hot)) => match self.checked(hot) {
                Ok(hot) => {
                    // Round 1 sends every page written since the log started: the bits
                    // consumed here are not lost.
                    let first = self.round_one_pages(&hot);
                    self.begin_round(now, 1, false, cold_first(&first, &hot))
                }
                Err(f) => self.on_failure(now, Stage::Observing, f),
            },
            (Stage::WindowDirty(mut run), E::Dirty(taken)) => match self.checked(taken) {
                Ok(taken) => {
                    let wait = now.saturating_sub(run.log_asked);
                    run.log_reads += 1;
                    run.log_wait += wait;
                    if wait.saturating_mul(LOG_SHARE) > run.last_batch
                        && self.log_batch < MAX_LOG_BATCH
                    {
                        self.log_batch *= 2;
                    }
                    for (c, t) in run.carry.iter_mut().zip(&taken) {
                        c.union_with(t)
                            .expect("bitmap sizes checked against the layout");
                    }
                    self.send_next_window(now, run)
                }
                Err(f) => self.on_failure(now, Stage::WindowDirty(run), f),
            },
            (Stage::Window(run), E::WindowSent(outcome)) => self.window_sent(now, run, outcome),
            (Stage::AfterRound(carry), E::Dirty(taken)) => match self.checked(taken) {
                Ok(mut dirty) => {
                    for (d, c) in dirty.iter_mut().zip(&carry) {
                        d.union_with(c)
                            .expect("bitmap sizes checked against the layout");
                    }
                    self.decide_next(now, dirty)
                }
                Err(f) => self.on_failure(now, Stage::AfterRound(carry), f),
            },
            (Stage::Pausing(carry), E::Paused(took)) => {
                self.report.downtime = Some(Downtime {
                    pause_took: took,
                    paused: now,
                    ..self.report.downtime.unwrap_or_default()
                });
                self.push(SourceCommand::TakeDirty {
                    final_round: true,
                    delay: Duration::ZERO,
                });
                Stage::FinalDirty(carry)
            }
            (Stage::FinalDirty(carry), E::Dirty(taken)) => match self.checked(taken) {
                Ok(mut dirty) => {
                    for (d, c) in dirty.iter_mut().zip(&carry) {
                        d.union_with(c)
                            .expect("bitmap sizes checked against the layout");
                    }
                    let round = self.ctl.rounds().len() as u32 + 1;
                    self.begin_round(now, round, true, ranges_of(&dirty))
                }
                Err(f) => self.on_failure(now, Stage::FinalDirty(carry), f),
            },
            (Stage::SavingState, E::StateSaved(blob)) => {
                // From here the destination may load the VM and hold it.
                self.peer_may_hold = true;
                self.push(SourceCommand::SendState(blob));
                Stage::SendingState
            }
            (Stage::SendingState, E::StateSent) => {
                if let Some(d) = self.report.downtime.as_mut() {
                    d.state_sent = now;
                }
                if self.cfg.verify == VerifyMode::Strict {
                    // Our digest is computed while the destination loads the VM.
                    self.push(SourceCommand::HashSource);
                    Stage::HashingStrict
                } else {
                    self.push(SourceCommand::AwaitReady);
                    Stage::AwaitingReady
                }
            }
            (Stage::HashingStrict, E::SourceHashed(d)) => {
                self.ours = Some(d);
                self.push(SourceCommand::AwaitReady);
                Stage::AwaitingReady
            }
            (Stage::AwaitingReady, E::PeerReady(theirs)) => {
                if theirs.regions.len() != self.cfg.regions.len() {
                    return self.on_failure(
                        now,
                        Stage::AwaitingReady,
                        Failure::new(
                            // Out of step, but there and waiting: told on the link.
                            FailureKind::Transport,
                            format!(
                                "the destination's digest covers {} regions; the VM has {}",
                                theirs.regions.len(),
                                self.cfg.regions.len()
                            ),
                        ),
                    );
                }
                if let Some(ours) = self.ours.take() {
                    let bad = ours.mismatches(&theirs, &self.cfg.regions);
                    self.report.digest_match = Some(bad.is_empty());
                    if !bad.is_empty() {
                        return self.on_failure(
                            now,
                            Stage::AwaitingReady,
                            // The destination is there and waits for the decision: it is
                            // told to discard on the control link.
                            Failure::new(FailureKind::Transport, describe_mismatch(&bad)),
                        );
                    }
                }
                self.theirs = Some(theirs);
                if let Some(d) = self.report.downtime.as_mut() {
                    d.verified = now;
                }
                self.push(SourceCommand::Fence);
                Stage::Fencing
            }
            (Stage::Fencing, E::Fenced) => {
                self.push(SourceCommand::Record(DecisionState::Committed));
                Stage::RecordingCommit
            }
            (Stage::RecordingCommit, E::Recorded) => {
                self.push(SourceCommand::SendCommit);
                Stage::Committing
            }
            (Stage::RecordingCommit, E::RecordFailed(why)) => {
                // No durable decision, no Commit: abort (the fenced VMM is unfenced by Resume).
                self.abort(
                    format!("the commit decision could not be recorded durably ({why}); aborted before Commit"),
                    true,
                )
            }
            (Stage::Committing | Stage::Replaying { .. }, E::PeerRunning(detail)) => {
                self.peer_running(now, detail);
                self.push(SourceCommand::Record(DecisionState::Confirmed));
                Stage::RecordingConfirmed
            }
            (Stage::Committing | Stage::Replaying { .. }, E::PeerStartFailed(reason)) => {
                self.report.error = Some(format!(
                    "the destination could not start the VM after the commit decision: {reason}. \
                     The source VM stays paused and the destination keeps the loaded copy"
                ));
                Stage::Done(SourceOutcome::StartFailed(reason))
            }
            (Stage::ReplaySleep { deadline }, E::Slept) => {
                self.push(SourceCommand::ReplayCommit);
                Stage::Replaying { deadline }
            }
            (Stage::RecordingConfirmed, E::Recorded | E::RecordFailed(_)) => {
                // (A failed confirmation record only makes a later `ferry recover` replay a
                // decision the destination already carried out, which it answers.)
                if self.cfg.verify == VerifyMode::AfterResume && self.theirs.is_some() {
                    self.push(SourceCommand::HashSource);
                    Stage::HashingAfterResume { started: now }
                } else {
                    self.stop_vm()
                }
            }
            (Stage::HashingAfterResume { started }, E::SourceHashed(ours)) => {
                self.report.verified_after_resume = Some(now.saturating_sub(started));
                let theirs = self.theirs.take().unwrap_or_default();
                let bad = ours.mismatches(&theirs, &self.cfg.regions);
                self.report.digest_match = Some(bad.is_empty());
                if bad.is_empty() {
                    self.stop_vm()
                } else {
                    // A failed migration in every figure; nothing is lost: the source VM is
                    // kept paused for the operator.
                    self.report.error = Some(format!(
                        "{}; found after the destination resumed: the source VM is kept paused for inspection",
                        describe_mismatch(&bad)
                    ));
                    Stage::Done(SourceOutcome::DigestMismatch(bad))
                }
            }
            (Stage::Stopping, E::Stopped) => Stage::Done(SourceOutcome::Committed),
            (Stage::AskingDiscard, E::PeerDiscarded) => {
                self.push(SourceCommand::Record(DecisionState::Aborted));
                Stage::RecordingAbort
            }
            (Stage::RecordingAbort, E::Recorded) => {
                self.push(SourceCommand::Resume);
                Stage::Resuming
            }
            (Stage::RecordingAbort, E::RecordFailed(why)) => {
                // The record still says committed: the VM must not resume.
                self.report.error = Some(format!(
                    "the roll-back could not be recorded ({why}); the source VM stays paused"
                ));
                Stage::Done(SourceOutcome::CommittedUnconfirmed)
            }
            (Stage::AbortingPeer | Stage::Releasing, E::PeerTold) => {
                // Confirmed discarded, or in the background release's hands.
                self.peer_may_hold = false;
                self.finish_abort()
            }
            (Stage::RecordingAborted, E::Recorded) => Stage::Done(SourceOutcome::Aborted),
            (Stage::RecordingAborted, E::RecordFailed(why)) => {
                self.report.warnings.push(format!(
                    "\"aborted\" could not be recorded ({why}); a restarted sidecar finds \"undecided\" and tells the destination again"
                ));
                Stage::Done(SourceOutcome::Aborted)
            }
            (Stage::Resuming, E::Resumed) => self.tell_peer(),
            (stage, event) => self.unexpected(now, stage, &event),
        }
    }

    /// Checks bitmaps from the VMM against the layout.
    fn checked(&self, maps: Vec<DirtyBitmap>) -> Result<Vec<DirtyBitmap>, Failure> {
        let ok = maps.len() == self.cfg.regions.len()
            && maps
                .iter()
                .zip(&self.cfg.regions)
                .all(|(m, &n)| m.npages() == n);
        if ok {
            Ok(maps)
        } else {
            Err(Failure::new(
                FailureKind::VmmRefused,
                format!(
                    "the VMM sent {} dirty bitmaps that do not match its {} registered regions",
                    maps.len(),
                    self.cfg.regions.len()
                ),
            ))
        }
    }

    /// Round 1's pages: all of them but those known to be zero when the log started,
    /// plus any of those written since (`hot`, a log read already consumed). The report's
    /// `zero_skipped` is the pages this leaves out.
    fn round_one_pages(&mut self, hot: &[DirtyBitmap]) -> Vec<DirtyBitmap> {
        let first: Vec<DirtyBitmap> = self
            .cfg
            .regions
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let mut b = DirtyBitmap::full(n);
                if let Some(z) = self.known_zero.get(i) {
                    b.subtract(z);
                }
                if let Some(h) = hot.get(i) {
                    b.union_with(h)
                        .expect("bitmap sizes checked against the layout");
                }
                b
            })
            .collect();
        let all: u64 = self.cfg.regions.iter().sum();
        self.report.zero_skipped = all - first.iter().map(DirtyBitmap::count).sum::<u64>();
        first
    }

    fn begin_round(
        &mut self,
        now: Duration,
        round: u32,
        final_round: bool,
        ranges: Vec<PageRange>,
    ) -> Stage {
        let planned_pages = pages_of(&ranges);
        let windows: VecDeque<_> = if final_round {
            VecDeque::from([ranges])
        } else {
            windows(&ranges, self.cfg.window_pages.max(1)).into()
        };
        let run = RoundRun {
            round,
            final_round,
            started: now,
            planned_pages,
            windows,
            in_flight: Vec::new(),
            carry: empty_like(&self.cfg.regions),
            stats: RoundStats::default(),
            log_read: true,
            log_asked: now,
            batch_started: now,
            last_batch: Duration::ZERO,
            log_reads: 0,
            log_wait: Duration::ZERO,
        };
        self.send_next_window(now, run)
    }

    /// Sends the next window of `run`, reading the log first unless it is the round's
    /// first window (which follows the caller's read); finishes the round when none is left.
    fn send_next_window(&mut self, now: Duration, mut run: RoundRun) -> Stage {
        let Some(w) = run.windows.front() else {
            return self.round_done(now, run);
        };
        if !run.log_read && !run.final_round && !w.is_empty() {
            // The window goes out once the bits are in.
            run.log_read = true;
            run.log_asked = now;
            self.push(SourceCommand::TakeDirty {
                final_round: false,
                delay: Duration::ZERO,
            });
            return Stage::WindowDirty(run);
        }
        // The next `log_batch` windows share the read just made.
        let mut w = run.windows.pop_front().expect("front checked above");
        if !run.final_round {
            for _ in 1..self.log_batch {
                match run.windows.pop_front() {
                    Some(more) => w.extend(more),
                    None => break,
                }
            }
        }
        run.log_read = false;
        run.batch_started = now;
        for r in &w {
            if let Some(c) = run.carry.get_mut(r.region as usize) {
                c.clear_range(r.first, r.count);
            }
        }
        run.in_flight = w;
        self.wire_round += 1;
        self.send_in_flight(run)
    }

    /// Plans `run.in_flight` on the transport in use.
    fn send_in_flight(&mut self, run: RoundRun) -> Stage {
        let (kind, channels) = self.transports[0];
        self.push(SourceCommand::SendWindow(Window {
            wire_round: self.wire_round,
            round: run.round,
            final_round: run.final_round,
            transport: kind,
            plan: plan(&run.in_flight, channels, self.cfg.chunk_pages.max(1)),
        }));
        Stage::Window(run)
    }

    fn window_sent(&mut self, now: Duration, mut run: RoundRun, outcome: WindowOutcome) -> Stage {
        let planned = pages_of(&run.in_flight);
        let (stats, unfinished, reason) = match outcome {
            WindowOutcome::Done(s) => (s, Vec::new(), None),
            WindowOutcome::Unfinished {
                confirmed,
                unfinished,
                reason,
            } => (confirmed, unfinished, Some(reason)),
        };
        // The transport's numbers must add up to what was planned, and what it hands
        // back must be part of the window.
        // (Peer-chosen numbers: checked arithmetic, and a sorted lookup, not a scan per range.)
        let left = unfinished
            .iter()
            .try_fold(0u64, |sum, r| sum.checked_add(r.count));
        let adds_up = left.and_then(|l| l.checked_add(stats.pages)) == Some(planned);
        let left = left.unwrap_or(u64::MAX);
        if !adds_up
            || !all_within(&run.in_flight, &unfinished)
            || stats.torn.len() as u64 > stats.pages
        {
            let f = Failure::new(
                FailureKind::PeerRefused,
                format!(
                    "the destination confirmed {} pages and handed back {left} of window {} ({planned} planned)",
                    stats.pages, self.wire_round
                ),
            );
            return self.on_failure(now, Stage::Window(run), f);
        }
        for t in &stats.torn {
            if let Some(c) = run.carry.get_mut(t.region as usize) {
                c.set_range(t.first, t.count);
            }
        }
        run.stats.merge(stats);
        match reason {
            None => {
                run.last_batch = now.saturating_sub(run.batch_started);
                self.send_next_window(now, run)
            }
            Some(reason) => {
                // This transport is gone; the next one carries the rest of the window and
                // of the migration.
                let from = self.transports.pop_front().map(|t| t.0);
                if self.transports.is_empty() {
                    let f = Failure::new(
                        FailureKind::Transport,
                        format!("{reason}; no other transport to carry the rest"),
                    );
                    return self.on_failure(now, Stage::Window(run), f);
                }
                let to = self.transports[0].0;
                self.report.transports.push(to);
                self.report.fallback = Some(format!(
                    "{} failed in round {} ({reason}): {} unfinished ranges re-sent over {}, {} from then on",
                    from.map_or("?", TransportKind::label),
                    run.round,
                    unfinished.len(),
                    to.label(),
                    to.label()
                ));
                run.in_flight = unfinished;
                self.send_in_flight(run)
            }
        }
    }

    fn round_done(&mut self, now: Duration, run: RoundRun) -> Stage {
        if run.stats.pages != run.planned_pages {
            let f = Failure::new(
                FailureKind::PeerRefused,
                format!(
                    "the destination confirmed {} pages of round {}; {} were planned",
                    run.stats.pages, run.round, run.planned_pages
                ),
            );
            return self.on_failure(now, Stage::Window(run), f);
        }
        let elapsed = now.saturating_sub(run.started);
        self.ctl.round_finished(RoundRecord {
            round: run.round,
            pages: run.stats.pages,
            bytes: run.stats.bytes,
            zero_pages: run.stats.zero_pages,
            elapsed,
        });
        let torn = run.stats.torn.clone();
        self.report.rounds.push(RoundReport {
            round: run.round,
            final_round: run.final_round,
            stats: run.stats,
            elapsed,
            log_reads: run.log_reads,
            log_wait: run.log_wait,
            log_batch: self.log_batch,
        });
        if run.final_round {
            if let Some(d) = self.report.downtime.as_mut() {
                d.final_done = now;
            }
            if let Some(first) = torn.first() {
                // With the VM paused nothing may change a page: this is corruption.
                let f = Failure::new(
                    FailureKind::Transport,
                    format!(
                        "{} pages failed their checksum in the final round with the VM paused (first: region {} page {})",
                        torn.len(),
                        first.region,
                        first.first
                    ),
                );
                return self.on_failure(now, Stage::SavingState, f);
            }
            self.push(SourceCommand::SaveState);
            return Stage::SavingState;
        }
        self.push(SourceCommand::TakeDirty {
            final_round: false,
            delay: Duration::ZERO,
        });
        Stage::AfterRound(run.carry)
    }

    /// After a pre-copy round: another round, stop and copy, or give up.
    fn decide_next(&mut self, now: Duration, dirty: Vec<DirtyBitmap>) -> Stage {
        let dirty_bytes: u64 = dirty.iter().map(DirtyBitmap::count).sum::<u64>() * PAGE_SIZE;
        let took = self
            .ctl
            .rounds()
            .last()
            .map_or(Duration::ZERO, |r| r.elapsed);
        self.last_dirty = Some((dirty_bytes, took));
        match self.ctl.next_step(now, dirty_bytes) {
            Step::Precopy { round, .. } => self.begin_round(now, round, false, ranges_of(&dirty)),
            Step::StopAndCopy(reason) => {
                self.report.stop_reason = Some(reason);
                self.pause_asked = true;
                self.report.downtime = Some(Downtime {
                    pause_asked: now,
                    ..Downtime::default()
                });
                self.push(SourceCommand::Pause);
                Stage::Pausing(dirty)
            }
            Step::Abort(reason) => {
                self.report.stop_reason = Some(reason);
                self.abort(format!("pre-copy gave up: {reason}"), true)
            }
        }
    }

    fn peer_running(&mut self, now: Duration, detail: String) {
        if let Some(d) = self.report.downtime.as_mut() {
            d.running = Some(now);
        }
        self.report.peer_detail = Some(detail);
    }

    fn stop_vm(&mut self) -> Stage {
        if self.vmm_reachable {
            self.push(SourceCommand::Stop);
            Stage::Stopping
        } else {
            self.report.warnings.push(
                "the source VMM was not reachable to stop the VM; it stays paused until it reconnects and is told"
                    .into(),
            );
            Stage::Done(SourceOutcome::Committed)
        }
    }

    /// Gives up before the commit point: the VM runs here again first (if asked), then
    /// the destination is told.
    fn abort(&mut self, reason: String, resume: bool) -> Stage {
        if self.report.error.is_none() {
            self.report.error = Some(reason.clone());
        }
        self.abort_reason = reason;
        if resume && self.vmm_reachable {
            self.push(SourceCommand::Resume);
            Stage::Resuming
        } else {
            self.tell_peer()
        }
    }

    /// After an abort: tell the destination on the control link; if it may hold a copy
    /// and did not confirm discarding it, hand it to the background release.
    fn tell_peer(&mut self) -> Stage {
        if self.peer_reachable && !self.peer_told {
            self.peer_told = true;
            self.push(SourceCommand::AbortPeer {
                reason: self.abort_reason.clone(),
                confirm: self.peer_may_hold,
            });
            Stage::AbortingPeer
        } else if self.peer_may_hold {
            self.push(SourceCommand::ReleasePeer);
            Stage::Releasing
        } else {
            self.finish_abort()
        }
    }

    /// The abort is complete: "aborted" replaces "undecided".
    fn finish_abort(&mut self) -> Stage {
        if self.start_recorded {
            self.push(SourceCommand::Record(DecisionState::Aborted));
            Stage::RecordingAborted
        } else {
            Stage::Done(SourceOutcome::Aborted)
        }
    }

    fn on_failure(&mut self, now: Duration, stage: Stage, f: Failure) -> Stage {
        match f.kind {
            FailureKind::PeerLost | FailureKind::PeerRefused => self.peer_reachable = false,
            FailureKind::VmmLost => self.vmm_reachable = false,
            _ => {}
        }
        match stage {
            Stage::RecordingStart => {
                self.report.error = Some(format!(
                    "the migration could not be recorded before it started ({f}); nothing was moved"
                ));
                Stage::Done(SourceOutcome::Aborted)
            }
            // Before the commit point: the VM runs here again.
            Stage::Negotiating
            | Stage::StartingLog
            | Stage::Observing
            | Stage::WindowDirty(_)
            | Stage::Window(_)
            | Stage::AfterRound(_)
            | Stage::Pausing(_)
            | Stage::FinalDirty(_)
            | Stage::SavingState
            | Stage::SendingState
            | Stage::HashingStrict
            | Stage::AwaitingReady
            | Stage::Fencing => {
                // A VMM that answered an error still runs this loop: resume it. One whose
                // link broke resumes itself unless it was fenced, and a fenced one learns
                // from the record (none: resume) when it reconnects.
                self.abort(f.reason, true)
            }
            Stage::RecordingCommit => self.abort(
                format!("the commit decision could not be recorded ({f})"),
                true,
            ),
            // After it: never resume. Deliver the decision instead.
            Stage::Committing => {
                self.report.replayed = true;
                self.report.warnings.push(format!(
                    "the link failed after the commit decision ({f}); replaying it"
                ));
                self.push(SourceCommand::ReplayCommit);
                Stage::Replaying {
                    deadline: now + self.cfg.replay_window,
                }
            }
            Stage::Replaying { deadline } | Stage::ReplaySleep { deadline } => {
                self.report.replayed = true;
                if now + self.cfg.replay_interval < deadline {
                    self.push(SourceCommand::Sleep(self.cfg.replay_interval));
                    Stage::ReplaySleep { deadline }
                } else {
                    self.report.error = Some(format!(
                        "the commit decision is recorded but the destination did not confirm it within the replay window (last error: {f}): \
                         the source VM stays paused (never resumed) and the destination holds the loaded VM"
                    ));
                    Stage::Done(SourceOutcome::CommittedUnconfirmed)
                }
            }
            Stage::RecordingConfirmed | Stage::HashingAfterResume { .. } => {
                self.report
                    .warnings
                    .push(format!("after the destination confirmed: {f}"));
                if self.theirs.is_some() && matches!(stage, Stage::HashingAfterResume { .. }) {
                    self.report.digest_match = None;
                }
                self.stop_vm()
            }
            Stage::Stopping => {
                self.report
                    .warnings
                    .push(format!("the source VMM did not stop cleanly: {f}"));
                Stage::Done(SourceOutcome::Committed)
            }
            Stage::AskingDiscard => {
                self.report.error = Some(format!(
                    "the destination did not confirm it discarded its copy ({f}); nothing was rolled back"
                ));
                Stage::Done(SourceOutcome::CommittedUnconfirmed)
            }
            Stage::RecordingAbort => {
                self.report.error = Some(format!(
                    "the roll-back could not be recorded ({f}); the source VM stays paused"
                ));
                Stage::Done(SourceOutcome::CommittedUnconfirmed)
            }
            Stage::AbortingPeer => {
                // Not confirmed: the control link is done with.
                self.peer_reachable = false;
                self.tell_peer()
            }
            Stage::Releasing => {
                self.report.warnings.push(format!(
                    "the destination may still hold a loaded copy and its release could not be arranged ({f}); \
                     the record stays \"undecided\", so a restarted sidecar or `ferry recover` tells it"
                ));
                Stage::Done(SourceOutcome::Aborted)
            }
            Stage::RecordingAborted => {
                self.report
                    .warnings
                    .push(format!("\"aborted\" could not be recorded: {f}"));
                Stage::Done(SourceOutcome::Aborted)
            }
            Stage::Resuming => {
                let e = self.report.error.take().unwrap_or_default();
                self.report.error = Some(format!("{e}; resuming the source VM failed: {f}"));
                self.tell_peer()
            }
            Stage::Done(o) => Stage::Done(o),
        }
    }
}
