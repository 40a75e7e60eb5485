//! A simulated link and guest, for the engine's unit tests and benchmarks only.
//!
//! The simulator is one more driver of the real [`SourceSession`]: it carries out the
//! session's commands against a guest that writes pages at a given rate and a link of a
//! given bandwidth and latency, so the windows, the log reads, convergence, verification
//! and the commit sequence are the ones the sidecar runs. Every page carries a version; a
//! page copied while the guest writes it gets the version of the moment it was copied. At
//! the end the destination's versions must equal the source's: that checks the dirty-log
//! order rule (get-and-clear first, then send), which [`LogOrder::ClearAfterSend`] breaks
//! on purpose to show what it protects against.

use std::time::Duration;

use crate::bitmap::DirtyBitmap;
use crate::digest::{chunk_hash, MemoryDigest, DIGEST_CHUNK_PAGES};
use crate::precopy::ConvergencePolicy;
use crate::session::{
    Failure, FailureKind, RoundReport, SourceCommand, SourceConfig, SourceEvent, SourceOutcome,
    SourceSession, TransportKind, VerifyMode,
};
use crate::transport::{RoundStats, WindowOutcome};

/// When the dirty log is cleared relative to sending.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogOrder {
    /// Get-and-clear, then send (correct).
    ClearBeforeSend,
    /// Read, send, then clear (loses writes made during the send).
    ClearAfterSend,
}

/// A simulated migration setup.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Guest pages.
    pub pages: u64,
    /// Guest writes per second, spread over `working_set` pages.
    pub writes_per_sec: u64,
    /// Pages the guest writes to (the first ones of RAM).
    pub working_set: u64,
    /// Link bandwidth in bytes per second.
    pub bandwidth: u64,
    /// One-way latency added to each window's confirmation.
    pub latency: Duration,
    /// Channels the plan spreads over.
    pub channels: usize,
    /// Convergence policy.
    pub policy: ConvergencePolicy,
    /// Dirty-log order.
    pub order: LogOrder,
    /// Pages per window of a pre-copy round.
    pub window_pages: u64,
    /// Break the link when this round starts (simulates a dead peer).
    pub fail_in_round: Option<u32>,
}

/// How a simulated migration ended.
#[derive(Clone, Debug, PartialEq)]
pub struct SimOutcome {
    /// The session's outcome.
    pub outcome: SourceOutcome,
    /// Whether the source VM runs at the end (never paused, or resumed).
    pub source_runs: bool,
    /// Rounds run, pre-copy and final.
    pub rounds: Vec<RoundReport>,
    /// Simulated downtime (pause to the destination running).
    pub downtime: Duration,
    /// Pages whose version differs between source and destination at the end.
    pub stale_pages: u64,
    /// Reads of the dirty log.
    pub log_reads: u32,
}

/// Deterministic guest writes: a xorshift stream over the working set.
struct Guest {
    versions: Vec<u64>,
    log: DirtyBitmap,
    rng: u64,
    working_set: u64,
    carry: f64,
    rate: f64,
}

impl Guest {
    /// Runs the guest for `dt`; returns each written page and the fraction of `dt` at
    /// which it was written.
    fn run(&mut self, dt: Duration) -> Vec<(u64, f64)> {
        self.carry += self.rate * dt.as_secs_f64();
        let n = self.carry as u64;
        self.carry -= n as f64;
        (0..n)
            .map(|i| {
                self.rng ^= self.rng << 13;
                self.rng ^= self.rng >> 7;
                self.rng ^= self.rng << 17;
                let p = self.rng % self.working_set.max(1);
                self.versions[p as usize] += 1;
                self.log.set(p);
                (p, (i as f64 + 0.5) / n.max(1) as f64)
            })
            .collect()
    }
}

/// The digest of a list of page versions (stands in for page contents).
fn digest_of(versions: &[u64]) -> MemoryDigest {
    MemoryDigest {
        regions: vec![versions
            .chunks(DIGEST_CHUNK_PAGES as usize)
            .map(chunk_hash)
            .collect()],
    }
}

struct Sim<'a> {
    cfg: &'a SimConfig,
    guest: Guest,
    dest: Vec<u64>,
    now: Duration,
    paused: bool,
    pause_asked: Option<Duration>,
    downtime: Duration,
    log_reads: u32,
}

impl Sim<'_> {
    /// Moves one window's pages; the guest keeps writing unless paused.
    fn send(&mut self, w: &crate::transport::Window) -> SourceEvent {
        if self.cfg.fail_in_round == Some(w.round) {
            return SourceEvent::Failed(Failure::new(
                FailureKind::PeerLost,
                "simulated link failure",
            ));
        }
        let bytes = w.plan.bytes();
        let elapsed =
            Duration::from_secs_f64(bytes as f64 / self.cfg.bandwidth as f64) + self.cfg.latency;
        // A page's moment is its offset within its channel (channels run in parallel).
        let mut order: Vec<(f64, u64)> = Vec::new();
        for ch in &w.plan.channels {
            let total: u64 = ch.iter().map(|r| r.count).sum();
            let mut done = 0f64;
            for r in ch {
                for p in r.first..r.end() {
                    order.push((done / total.max(1) as f64, p));
                    done += 1.0;
                }
            }
        }
        order.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut versions = self.guest.versions.clone();
        let writes = if self.paused {
            Vec::new()
        } else {
            self.guest.run(elapsed)
        };
        let mut wi = 0;
        for (t, p) in order {
            while wi < writes.len() && writes[wi].1 <= t {
                versions[writes[wi].0 as usize] += 1;
                wi += 1;
            }
            self.dest[p as usize] = versions[p as usize];
        }
        self.now += elapsed;
        if self.cfg.order == LogOrder::ClearAfterSend {
            // The wrong order: the log is cleared after the send, losing its writes.
            self.guest.log = DirtyBitmap::new(self.cfg.pages);
        }
        SourceEvent::WindowSent(WindowOutcome::Done(RoundStats {
            pages: w.plan.pages(),
            bytes,
            zero_pages: 0,
            torn: Vec::new(),
            ..RoundStats::default()
        }))
    }

    fn take_dirty(&mut self, delay: Duration) -> SourceEvent {
        if !self.paused && delay > Duration::ZERO {
            self.guest.run(delay);
            self.now += delay;
        }
        self.log_reads += 1;
        let log = match self.cfg.order {
            LogOrder::ClearBeforeSend => {
                std::mem::replace(&mut self.guest.log, DirtyBitmap::new(self.cfg.pages))
            }
            LogOrder::ClearAfterSend => self.guest.log.clone(),
        };
        SourceEvent::Dirty(vec![log])
    }

    fn execute(&mut self, cmd: SourceCommand) -> SourceEvent {
        use SourceCommand as C;
        use SourceEvent as E;
        match cmd {
            C::Negotiate => E::Negotiated(vec![(TransportKind::Tcp, self.cfg.channels)]),
            C::StartDirtyLog => {
                self.guest.log = DirtyBitmap::new(self.cfg.pages);
                E::DirtyLogStarted(Vec::new())
            }
            C::TakeDirty { delay, .. } => self.take_dirty(delay),
            C::SendWindow(w) => self.send(&w),
            C::Pause => {
                self.paused = true;
                self.pause_asked = Some(self.now);
                E::Paused(Duration::ZERO)
            }
            C::SaveState => E::StateSaved(Vec::new()),
            C::SendState(_) => {
                self.now += self.cfg.latency;
                E::StateSent
            }
            C::HashSource => E::SourceHashed(digest_of(&self.guest.versions)),
            C::AwaitReady => {
                self.now += self.cfg.latency;
                E::PeerReady(digest_of(&self.dest))
            }
            C::Fence => E::Fenced,
            C::Record(_) => E::Recorded,
            C::SendCommit | C::ReplayCommit => {
                self.now += self.cfg.latency * 2;
                if let Some(t) = self.pause_asked {
                    self.downtime = self.now - t;
                }
                E::PeerRunning("simulated destination runs".into())
            }
            C::AskDiscard => E::PeerDiscarded,
            C::Sleep(d) => {
                self.now += d;
                E::Slept
            }
            C::AbortPeer { .. } | C::ReleasePeer => E::PeerTold,
            C::Resume => {
                self.paused = false;
                E::Resumed
            }
            C::Stop => E::Stopped,
        }
    }
}

/// Runs one simulated migration (strict verification: the digests are compared before
/// the simulated destination resumes).
pub fn run(cfg: &SimConfig) -> SimOutcome {
    let mut sim = Sim {
        cfg,
        guest: Guest {
            versions: vec![1; cfg.pages as usize],
            log: DirtyBitmap::new(cfg.pages),
            rng: 0x2545_f491_4f6c_dd1d,
            working_set: cfg.working_set.min(cfg.pages),
            carry: 0.0,
            rate: cfg.writes_per_sec as f64,
        },
        dest: vec![0; cfg.pages as usize],
        now: Duration::ZERO,
        paused: false,
        pause_asked: None,
        downtime: Duration::ZERO,
        log_reads: 0,
    };
    let mut scfg = SourceConfig::new(vec![cfg.pages]);
    scfg.policy = cfg.policy;
    scfg.verify = VerifyMode::Strict;
    scfg.window_pages = cfg.window_pages;
    let mut session = SourceSession::new(scfg);
    while let Some(cmd) = session.poll() {
        let event = sim.execute(cmd);
        session.handle(sim.now, event);
    }
    let outcome = session
        .outcome()
        .cloned()
        .expect("a session with no command left is done");
    let stale_pages = sim
        .guest
        .versions
        .iter()
        .zip(&sim.dest)
        .filter(|(a, b)| a != b)
        .count() as u64;
    SimOutcome {
        outcome,
        source_runs: !sim.paused && !matches!(session.outcome(), Some(SourceOutcome::Committed)),
        rounds: session.report().rounds.clone(),
        downtime: sim.downtime,
        stale_pages,
        log_reads: sim.log_reads,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::precopy::LimitAction;

    fn base() -> SimConfig {
        SimConfig {
            pages: 65_536,            // 256 MiB
            writes_per_sec: 20_000,   // ~80 MiB/s of page writes
            working_set: 16_384,      // 64 MiB hot set
            bandwidth: 1_000_000_000, // ~8 Gb/s
            latency: Duration::from_micros(200),
            channels: 4,
            policy: ConvergencePolicy {
                downtime_budget: Duration::from_millis(50),
                max_rounds: 20,
                timeout: Duration::from_secs(60),
                on_limit: LimitAction::Abort,
            },
            order: LogOrder::ClearBeforeSend,
            window_pages: 16_384,
            fail_in_round: None,
        }
    }

    #[test]
    fn converges_and_commits_with_every_page_current() {
        let out = run(&base());
        assert_eq!(out.outcome, SourceOutcome::Committed, "{out:?}");
        assert_eq!(out.stale_pages, 0);
        assert!(out.rounds.len() >= 2, "{:?}", out.rounds);
        assert!(out.downtime <= Duration::from_millis(50) + Duration::from_millis(10));
        // Round 1 has four windows: a log read before each of the last three, one after.
        assert!(out.log_reads >= 4, "{out:?}");
    }

    #[test]
    fn clearing_after_sending_loses_writes_and_is_caught() {
        let out = run(&SimConfig {
            order: LogOrder::ClearAfterSend,
            ..base()
        });
        assert!(out.stale_pages > 0, "the wrong order must lose writes");
        assert_eq!(out.outcome, SourceOutcome::Aborted);
        assert!(out.source_runs, "a failed check resumes the source");
    }

    #[test]
    fn a_guest_faster_than_the_link_hits_the_round_limit() {
        let mut cfg = base();
        cfg.bandwidth = 50_000_000;
        cfg.writes_per_sec = 200_000;
        cfg.working_set = 65_536;
        cfg.policy.max_rounds = 5;
        let out = run(&cfg);
        assert_eq!(out.outcome, SourceOutcome::Aborted);
        assert!(out.source_runs);
        assert_eq!(out.rounds.len(), 5);
        cfg.policy.on_limit = LimitAction::ForceStopAndCopy;
        let forced = run(&cfg);
        assert_eq!(forced.outcome, SourceOutcome::Committed);
        assert_eq!(forced.stale_pages, 0);
        assert!(forced.downtime > cfg.policy.downtime_budget);
    }

    #[test]
    fn a_dead_link_mid_precopy_leaves_the_source_running() {
        let mut cfg = base();
        // A 5 ms budget needs more than one pre-copy round, so round 2 runs the VM.
        cfg.policy.downtime_budget = Duration::from_millis(5);
        cfg.fail_in_round = Some(2);
        let out = run(&cfg);
        assert_eq!(out.outcome, SourceOutcome::Aborted);
        assert!(out.source_runs);
        assert_eq!(out.rounds.len(), 1);
    }

    #[test]
    fn a_dead_link_in_the_final_round_resumes_the_paused_source() {
        // With the default 50 ms budget round 1 converges, so round 2 is the final one.
        let out = run(&SimConfig {
            fail_in_round: Some(2),
            ..base()
        });
        assert_eq!(out.outcome, SourceOutcome::Aborted);
        assert!(out.source_runs, "the paused source must be resumed");
    }

    #[test]
    fn an_idle_guest_needs_one_round_plus_an_empty_final() {
        let out = run(&SimConfig {
            writes_per_sec: 0,
            ..base()
        });
        assert_eq!(out.rounds.len(), 2);
        assert_eq!(out.rounds[1].stats.pages, 0);
        assert_eq!(out.stale_pages, 0);
    }

    #[test]
    fn per_window_log_reads_send_fewer_pages_again() {
        // A guest writing all over RAM: pages written before their window went out are
        // sent once, in round 1, when the log is read before each window; with one read
        // per round they are sent again in round 2.
        let mut cfg = base();
        cfg.working_set = 65_536;
        cfg.writes_per_sec = 60_000;
        cfg.policy.max_rounds = 3;
        cfg.policy.on_limit = LimitAction::ForceStopAndCopy;
        cfg.policy.downtime_budget = Duration::from_millis(1);
        let windowed = run(&cfg);
        cfg.window_pages = u64::MAX;
        let whole = run(&cfg);
        assert_eq!(windowed.stale_pages, 0);
        assert_eq!(whole.stale_pages, 0);
        let r2 = |o: &SimOutcome| o.rounds[1].stats.pages;
        assert!(
            r2(&windowed) < r2(&whole),
            "round 2: {} pages with windows, {} with one read per round",
            r2(&windowed),
            r2(&whole)
        );
    }
}
