//! A simulated link and guest, for the engine's unit tests and benchmarks only.
//!
//! The simulation runs a whole pre-copy migration with the real [`PrecopyController`],
//! planner and [`SourceCommit`] over a link of a given bandwidth and latency, with a
//! guest that writes pages at a given rate. Every page carries a version; a page copied
//! while the guest writes it gets the version of the moment it was copied. At the end,
//! the destination's versions must equal the source's: that checks the dirty-log order
//! rule (get-and-clear first, then send), which [`LogOrder::ClearAfterSend`] breaks on
//! purpose to show what it protects against.

use std::time::Duration;

use crate::bitmap::DirtyBitmap;
use crate::commit::{SourceAction, SourceCommit, SourceEvent};
use crate::plan::{plan, ranges_of};
use crate::precopy::{ConvergencePolicy, PrecopyController, RoundRecord, Step};
use crate::PAGE_SIZE;

/// When the dirty log is cleared relative to sending a round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogOrder {
    /// Get-and-clear, then send (correct).
    ClearBeforeSend,
    /// Send, then clear (loses writes made during the send).
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
    /// One-way latency added to each round's confirmation.
    pub latency: Duration,
    /// Channels the plan spreads over.
    pub channels: usize,
    /// Convergence policy.
    pub policy: ConvergencePolicy,
    /// Dirty-log order.
    pub order: LogOrder,
    /// Break the link when this round starts (simulates a dead peer).
    pub fail_in_round: Option<u32>,
}

/// How a simulated migration ended.
#[derive(Clone, Debug, PartialEq)]
pub struct SimOutcome {
    /// The source's last phase action: commit, or abort with resume.
    pub final_action: SourceAction,
    /// Rounds run, pre-copy and final.
    pub rounds: Vec<RoundRecord>,
    /// Simulated downtime (final round + latency).
    pub downtime: Duration,
    /// Pages whose version differs between source and destination at the end.
    pub stale_pages: u64,
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
    /// Runs the guest for `dt`; the callback sees each written page and the fraction of
    /// `dt` at which it was written.
    fn run(&mut self, dt: Duration, mut on_write: impl FnMut(u64, f64)) {
        self.carry += self.rate * dt.as_secs_f64();
        let n = self.carry as u64;
        self.carry -= n as f64;
        for i in 0..n {
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 7;
            self.rng ^= self.rng << 17;
            let p = self.rng % self.working_set.max(1);
            self.versions[p as usize] += 1;
            self.log.set(p);
            on_write(p, (i as f64 + 0.5) / n as f64);
        }
    }
}

/// Runs one simulated migration.
pub fn run(cfg: &SimConfig) -> SimOutcome {
    let mut guest = Guest {
        versions: vec![1; cfg.pages as usize],
        log: DirtyBitmap::new(cfg.pages),
        rng: 0x2545_f491_4f6c_dd1d,
        working_set: cfg.working_set.min(cfg.pages),
        carry: 0.0,
        rate: cfg.writes_per_sec as f64,
    };
    let mut dest = vec![0u64; cfg.pages as usize];
    let mut ctl = PrecopyController::new(cfg.policy);
    let mut fsm = SourceCommit::new();
    let mut now = Duration::ZERO;
    let mut to_send = DirtyBitmap::full(cfg.pages);
    let mut paused = false;
    let mut downtime = Duration::ZERO;
    fsm.on(SourceEvent::Accepted).expect("negotiating accepts");
    loop {
        let round = ctl.rounds().len() as u32 + 1;
        if cfg.fail_in_round == Some(round) {
            let action = fsm.on(SourceEvent::Failed).expect("failure always allowed");
            return finish(action, &ctl, downtime, &guest.versions, &dest);
        }
        let work = plan(
            &ranges_of(std::slice::from_ref(&to_send)),
            cfg.channels,
            256,
        );
        let bytes = work.bytes();
        let elapsed = Duration::from_secs_f64(bytes as f64 / cfg.bandwidth as f64) + cfg.latency;
        // Position of each page in the send order, as a fraction of the round.
        let mut send_at = vec![f64::NAN; cfg.pages as usize];
        // Channels run in parallel: a page's moment is its offset within its channel.
        for ch in &work.channels {
            let mut done = 0f64;
            let ch_pages: u64 = ch.iter().map(|r| r.count).sum();
            for r in ch {
                for p in r.first..r.end() {
                    send_at[p as usize] = done / ch_pages.max(1) as f64;
                    done += 1.0;
                }
            }
        }
        // Copy each page as of its moment; writes before that moment are included.
        let snapshot = guest.versions.clone();
        let mut copied = snapshot.clone();
        if !paused {
            let mut late_writes: Vec<(u64, f64)> = Vec::new();
            guest.run(elapsed, |p, t| late_writes.push((p, t)));
            // Versions at each page's send moment: start snapshot plus earlier writes.
            let mut v = snapshot;
            let mut writes = late_writes;
            writes.sort_by(|a, b| a.1.total_cmp(&b.1));
            let mut order: Vec<u64> = to_send.runs().flat_map(|(f, c)| f..f + c).collect();
            order.sort_by(|&a, &b| send_at[a as usize].total_cmp(&send_at[b as usize]));
            let mut wi = 0;
            for p in order {
                let t = send_at[p as usize];
                while wi < writes.len() && writes[wi].1 <= t {
                    v[writes[wi].0 as usize] += 1;
                    wi += 1;
                }
                copied[p as usize] = v[p as usize];
            }
        }
        for (p, _) in to_send
            .runs()
            .flat_map(|(f, c)| (f..f + c).map(|p| (p, ())))
        {
            dest[p as usize] = copied[p as usize];
        }
        now += elapsed;
        ctl.round_finished(RoundRecord {
            round,
            pages: work.pages(),
            bytes,
            zero_pages: 0,
            elapsed,
        });
        if paused {
            downtime += elapsed;
            fsm.on(SourceEvent::FinalSent).expect("after pause");
            let stale = guest
                .versions
                .iter()
                .zip(&dest)
                .filter(|(a, b)| a != b)
                .count();
            let action = fsm
                .on(SourceEvent::Ready {
                    digests_match: stale == 0,
                })
                .expect("awaiting ready");
            return finish(action, &ctl, downtime, &guest.versions, &dest);
        }
        // The next dirty set: with the correct order the log was cleared at the round's
        // start, so it holds every write made during the round. With the wrong order the
        // log is cleared now, after sending: writes made during the send are lost.
        to_send = match cfg.order {
            LogOrder::ClearBeforeSend => {
                std::mem::replace(&mut guest.log, DirtyBitmap::new(cfg.pages))
            }
            LogOrder::ClearAfterSend => {
                guest.log = DirtyBitmap::new(cfg.pages);
                let mut late = DirtyBitmap::new(cfg.pages);
                guest.run(cfg.latency, |p, _| late.set(p));
                guest.log = DirtyBitmap::new(cfg.pages);
                late
            }
        };
        let dirty_bytes = to_send.count() * PAGE_SIZE;
        match ctl.next_step(now, dirty_bytes) {
            Step::Precopy { .. } => {}
            Step::StopAndCopy(_) => {
                paused = true;
                fsm.on(SourceEvent::Paused).expect("precopy pauses");
                if cfg.order == LogOrder::ClearBeforeSend {
                    to_send
                        .union_with(&std::mem::replace(
                            &mut guest.log,
                            DirtyBitmap::new(cfg.pages),
                        ))
                        .expect("same size");
                }
            }
            Step::Abort(_) => {
                let action = fsm.on(SourceEvent::Failed).expect("abort allowed");
                return finish(action, &ctl, downtime, &guest.versions, &dest);
            }
        }
    }
}

fn finish(
    final_action: SourceAction,
    ctl: &PrecopyController,
    downtime: Duration,
    src: &[u64],
    dst: &[u64],
) -> SimOutcome {
    SimOutcome {
        final_action,
        rounds: ctl.rounds().to_vec(),
        downtime,
        stale_pages: src.iter().zip(dst).filter(|(a, b)| a != b).count() as u64,
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
            fail_in_round: None,
        }
    }

    #[test]
    fn converges_and_commits_with_every_page_current() {
        let out = run(&base());
        assert_eq!(out.final_action, SourceAction::RecordAndSendCommit);
        assert_eq!(out.stale_pages, 0);
        assert!(out.rounds.len() >= 2, "{:?}", out.rounds);
        assert!(out.downtime <= Duration::from_millis(50) + Duration::from_millis(10));
    }

    #[test]
    fn clearing_after_sending_loses_writes_and_is_caught() {
        let out = run(&SimConfig {
            order: LogOrder::ClearAfterSend,
            ..base()
        });
        assert!(out.stale_pages > 0, "the wrong order must lose writes");
        assert_eq!(out.final_action, SourceAction::AbortAndResume);
    }

    #[test]
    fn a_guest_faster_than_the_link_hits_the_round_limit() {
        let mut cfg = base();
        cfg.bandwidth = 50_000_000;
        cfg.writes_per_sec = 200_000;
        cfg.working_set = 65_536;
        cfg.policy.max_rounds = 5;
        let out = run(&cfg);
        assert_eq!(out.final_action, SourceAction::AbortRunning);
        assert_eq!(out.rounds.len(), 5);
        cfg.policy.on_limit = LimitAction::ForceStopAndCopy;
        let forced = run(&cfg);
        assert_eq!(forced.final_action, SourceAction::RecordAndSendCommit);
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
        assert_eq!(out.final_action, SourceAction::AbortRunning);
        assert_eq!(out.rounds.len(), 1);
    }

    #[test]
    fn a_dead_link_in_the_final_round_resumes_the_paused_source() {
        // With the default 50 ms budget round 1 converges, so round 2 is the final one.
        let out = run(&SimConfig {
            fail_in_round: Some(2),
            ..base()
        });
        assert_eq!(out.final_action, SourceAction::AbortAndResume);
    }

    #[test]
    fn an_idle_guest_needs_one_round_plus_an_empty_final() {
        let out = run(&SimConfig {
            writes_per_sec: 0,
            ..base()
        });
        assert_eq!(out.rounds.len(), 2);
        assert_eq!(out.rounds[1].pages, 0);
        assert_eq!(out.stale_pages, 0);
    }
}
