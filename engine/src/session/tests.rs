//! The sessions driven deterministically through every path: a scripted driver answers
//! each command, and faults are injected at every command in turn.

use std::time::Duration;

use super::*;
use crate::bitmap::DirtyBitmap;
use crate::digest::MemoryDigest;
use crate::plan::PageRange;
use crate::precopy::{ConvergencePolicy, LimitAction, StopReason};
use crate::transport::{RoundStats, WindowOutcome};

const PAGES: u64 = 1000;

fn cfg(verify: VerifyMode) -> SourceConfig {
    let mut c = SourceConfig::new(vec![PAGES, 24]);
    c.verify = verify;
    c.window_pages = 300;
    c.chunk_pages = 64;
    c.policy = ConvergencePolicy {
        downtime_budget: Duration::from_millis(10),
        max_rounds: 5,
        timeout: Duration::from_secs(60),
        on_limit: LimitAction::ForceStopAndCopy,
    };
    c.replay_window = Duration::from_secs(10);
    c.replay_interval = Duration::from_secs(1);
    c
}

fn digest(tag: u128) -> MemoryDigest {
    MemoryDigest {
        regions: vec![vec![tag; 2], vec![tag]],
    }
}

/// A driver that answers every command the way a healthy migration would; `dirty` pages
/// per log read, and hooks to change single answers.
struct Driver {
    now: Duration,
    dirty_per_read: u64,
    log: Vec<SourceCommand>,
    /// Transports the negotiation reports.
    transports: Vec<(TransportKind, usize)>,
    /// Destination digest (differs from the source's when set to another tag).
    theirs: u128,
    ours: u128,
    /// Answers replays with this (None: healthy).
    replay_answer: Option<SourceEvent>,
    /// What a pre-copy log read costs on top of the 5 ms every answer takes.
    log_cost: Duration,
    /// Pages reported zero when the log starts.
    known_zero: Vec<DirtyBitmap>,
}

impl Driver {
    fn new() -> Self {
        Self {
            now: Duration::ZERO,
            dirty_per_read: 10,
            log: Vec::new(),
            transports: vec![(TransportKind::Tcp, 4)],
            theirs: 7,
            ours: 7,
            replay_answer: None,
            log_cost: Duration::ZERO,
            known_zero: Vec::new(),
        }
    }

    fn answer(&mut self, c: &SourceCommand) -> SourceEvent {
        use SourceCommand as C;
        use SourceEvent as E;
        self.now += Duration::from_millis(5);
        match c {
            C::Negotiate => E::Negotiated(self.transports.clone()),
            C::StartDirtyLog => E::DirtyLogStarted(self.known_zero.clone()),
            C::TakeDirty { final_round, delay } => {
                self.now += *delay;
                if !final_round {
                    self.now += self.log_cost;
                }
                let mut a = DirtyBitmap::new(PAGES);
                a.set_range(100, if *final_round { 3 } else { self.dirty_per_read });
                E::Dirty(vec![a, DirtyBitmap::new(24)])
            }
            C::SendWindow(w) => {
                self.now += Duration::from_millis(w.plan.pages());
                E::WindowSent(WindowOutcome::Done(RoundStats {
                    pages: w.plan.pages(),
                    bytes: w.plan.bytes(),
                    zero_pages: 0,
                    torn: Vec::new(),
                    ..RoundStats::default()
                }))
            }
            C::Pause => E::Paused(Duration::from_micros(40)),
            C::SaveState => E::StateSaved(vec![1, 2, 3]),
            C::SendState(_) => E::StateSent,
            C::HashSource => E::SourceHashed(digest(self.ours)),
            C::AwaitReady => E::PeerReady(digest(self.theirs)),
            C::Fence => E::Fenced,
            C::Record(_) => E::Recorded,
            C::SendCommit => E::PeerRunning("runs".into()),
            C::ReplayCommit => self
                .replay_answer
                .clone()
                .unwrap_or_else(|| E::PeerRunning("runs (replayed)".into())),
            C::AskDiscard => E::PeerDiscarded,
            C::Sleep(d) => {
                self.now += *d;
                E::Slept
            }
            C::AbortPeer { .. } | C::ReleasePeer => E::PeerTold,
            C::Resume => E::Resumed,
            C::Stop => E::Stopped,
        }
    }

    /// Runs `s` to the end; `inject(i, cmd)` may replace the answer to the i-th command.
    fn run(
        &mut self,
        s: &mut SourceSession,
        mut inject: impl FnMut(usize, &SourceCommand) -> Option<SourceEvent>,
    ) -> SourceOutcome {
        let mut i = 0;
        while let Some(c) = s.poll() {
            assert!(
                i < 10_000,
                "the session does not end: {:?}",
                self.log.last()
            );
            let ev = inject(i, &c).unwrap_or_else(|| self.answer(&c));
            self.log.push(c);
            s.handle(self.now, ev);
            i += 1;
        }
        s.outcome().cloned().expect("no command left means done")
    }

    fn count(&self, f: impl Fn(&SourceCommand) -> bool) -> usize {
        self.log.iter().filter(|c| f(c)).count()
    }

    fn position(&self, f: impl Fn(&SourceCommand) -> bool) -> Option<usize> {
        self.log.iter().position(f)
    }
}

fn is_resume(c: &SourceCommand) -> bool {
    *c == SourceCommand::Resume
}

fn is_commit_record(c: &SourceCommand) -> bool {
    *c == SourceCommand::Record(DecisionState::Committed)
}

#[test]
fn a_healthy_migration_runs_every_step_in_order() {
    for verify in [VerifyMode::Strict, VerifyMode::AfterResume] {
        let mut d = Driver::new();
        let mut s = SourceSession::new(cfg(verify));
        assert_eq!(d.run(&mut s, |_, _| None), SourceOutcome::Committed);
        let order = [
            d.position(|c| *c == SourceCommand::Negotiate),
            d.position(|c| *c == SourceCommand::StartDirtyLog),
            d.position(|c| matches!(c, SourceCommand::SendWindow(_))),
            d.position(|c| *c == SourceCommand::Pause),
            d.position(|c| *c == SourceCommand::SaveState),
            d.position(|c| matches!(c, SourceCommand::SendState(_))),
            d.position(|c| *c == SourceCommand::AwaitReady),
            d.position(|c| *c == SourceCommand::Fence),
            d.position(is_commit_record),
            d.position(|c| *c == SourceCommand::SendCommit),
            d.position(|c| *c == SourceCommand::Record(DecisionState::Confirmed)),
            d.position(|c| *c == SourceCommand::Stop),
        ];
        assert!(order.iter().all(Option::is_some), "{:?}", d.log);
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{order:?}");
        assert_eq!(d.count(is_resume), 0);
        // Strict hashes before Ready, after-resume after Running.
        let hash = d
            .position(|c| *c == SourceCommand::HashSource)
            .expect("hashed");
        let ready = order[6].expect("ready");
        assert_eq!(hash < ready, verify == VerifyMode::Strict, "{verify:?}");
        let r = s.report();
        assert_eq!(r.digest_match, Some(true));
        assert_eq!(r.peer_detail.as_deref(), Some("runs"));
        let dt = r.downtime.expect("downtime");
        assert!(dt.pause_asked < dt.paused && dt.paused < dt.final_done);
        assert!(dt.state_sent <= dt.verified && Some(dt.verified) < dt.running);
        assert!(r.rounds.last().is_some_and(|x| x.final_round));
        assert!(r.rounds.iter().rev().skip(1).all(|x| !x.final_round));
    }
}

#[test]
fn round_one_goes_out_in_windows_with_a_log_read_before_each_but_the_first() {
    let mut d = Driver::new();
    let mut s = SourceSession::new(cfg(VerifyMode::Strict));
    d.run(&mut s, |_, _| None);
    // Round 1: 1024 pages in windows of 300 -> 4 windows, 3 reads between them.
    let first_four: Vec<_> = d
        .log
        .iter()
        .skip_while(|c| !matches!(c, SourceCommand::SendWindow(_)))
        .take(7)
        .map(|c| match c {
            SourceCommand::SendWindow(w) => format!("W{}:{}", w.round, w.plan.pages()),
            SourceCommand::TakeDirty { .. } => "R".to_string(),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(
        first_four,
        ["W1:300", "R", "W1:300", "R", "W1:300", "R", "W1:124"]
    );
    // Every window gets its own wire round.
    let wires: Vec<u32> = d
        .log
        .iter()
        .filter_map(|c| match c {
            SourceCommand::SendWindow(w) => Some(w.wire_round),
            _ => None,
        })
        .collect();
    assert!(wires.windows(2).all(|w| w[1] == w[0] + 1), "{wires:?}");
}

/// The round-1 sequence of windows (`W<round>:<pages>`) and log reads (`R`).
fn round_one(d: &Driver) -> Vec<String> {
    d.log
        .iter()
        .skip_while(|c| !matches!(c, SourceCommand::SendWindow(_)))
        .take_while(|c| !matches!(c, SourceCommand::SendWindow(w) if w.round > 1))
        .filter_map(|c| match c {
            SourceCommand::SendWindow(w) => Some(format!("W{}:{}", w.round, w.plan.pages())),
            SourceCommand::TakeDirty { .. } => Some("R".to_string()),
            _ => None,
        })
        .collect()
}

#[test]
fn slow_log_reads_are_shared_by_more_windows_and_every_page_still_goes_out() {
    // Small windows (50 pages: 55 ms of sending) and reads that take 5 ms: under 1/50 of
    // the sending? No (5 * 50 > 55), so the windows per read double after each read
    // until a batch's sending is 50 times the read (400 pages: 405 ms > 250 ms).
    let mut c = cfg(VerifyMode::Strict);
    c.window_pages = 50;
    let mut d = Driver::new();
    let mut s = SourceSession::new(c.clone());
    d.run(&mut s, |_, _| None);
    let seq = round_one(&d);
    assert_eq!(
        &seq[..9],
        ["W1:50", "R", "W1:100", "R", "W1:200", "R", "W1:400", "R", "W1:274"],
        "{seq:?}"
    );
    let report = s.report();
    assert_eq!(report.rounds[0].log_reads, 4);
    assert_eq!(report.rounds[0].log_batch, 8);
    assert_eq!(report.rounds[0].stats.pages, PAGES + 24);
    assert!(report.rounds[0].log_wait >= Duration::from_millis(20));

    // Large windows (300 pages: 305 ms) and 5 ms reads: one window per read, as before.
    let mut d = Driver::new();
    let mut s = SourceSession::new(cfg(VerifyMode::Strict));
    d.run(&mut s, |_, _| None);
    assert_eq!(s.report().rounds[0].log_batch, 1);
    // The same windows behind 20 ms reads (25 ms in all, 1250 > 305): batched.
    let mut d = Driver::new();
    d.log_cost = Duration::from_millis(20);
    let mut s = SourceSession::new(cfg(VerifyMode::Strict));
    d.run(&mut s, |_, _| None);
    // (the last read is the one after the round)
    assert_eq!(round_one(&d), ["W1:300", "R", "W1:600", "R", "W1:124", "R"]);
}

#[test]
fn round_one_leaves_out_pages_known_zero_unless_written_since_the_log_started() {
    let zero = |first, count| {
        let mut z = DirtyBitmap::new(PAGES);
        z.set_range(first, count);
        vec![z, DirtyBitmap::full(24)]
    };
    // Pages 200..600 and all of region 1 are holes: round 1 sends the other 600.
    let mut d = Driver::new();
    d.known_zero = zero(200, 400);
    let mut s = SourceSession::new(cfg(VerifyMode::Strict));
    assert_eq!(d.run(&mut s, |_, _| None), SourceOutcome::Committed);
    let r = s.report();
    assert_eq!(r.zero_skipped, 424);
    assert_eq!(r.rounds[0].stats.pages, 600);
    let sent_round_one = |d: &Driver, page: u64| {
        d.log.iter().any(|c| matches!(c, SourceCommand::SendWindow(w) if w.round == 1
            && w.plan.ranges().any(|x| x.region == 0 && x.first <= page && page < x.first + x.count)))
    };
    assert!(!sent_round_one(&d, 300) && sent_round_one(&d, 100) && sent_round_one(&d, 700));

    // Observing first: pages 100..110, holes when the log started, are written meanwhile
    // (the observing read consumed their bits): round 1 sends them anyway.
    let mut c = cfg(VerifyMode::Strict);
    c.observe = Duration::from_millis(100);
    let mut d = Driver::new();
    d.known_zero = zero(100, 300);
    let mut s = SourceSession::new(c);
    assert_eq!(d.run(&mut s, |_, _| None), SourceOutcome::Committed);
    assert_eq!(s.report().rounds[0].stats.pages, 1024 - 300 - 24 + 10);
    // Those 10 went out: they are not counted as skipped.
    assert_eq!(s.report().zero_skipped, 300 + 24 - 10);
    assert!(sent_round_one(&d, 105) && !sent_round_one(&d, 200));

    // A zero map that does not match the layout is the VMM's error: nothing is sent.
    let mut d = Driver::new();
    d.known_zero = vec![DirtyBitmap::new(PAGES)];
    let mut s = SourceSession::new(cfg(VerifyMode::Strict));
    let out = d.run(&mut s, |_, _| None);
    assert_eq!(out, SourceOutcome::Aborted);
    assert_eq!(d.count(|c| matches!(c, SourceCommand::SendWindow(_))), 0);
}

#[test]
fn pages_dirtied_before_their_window_are_not_sent_again() {
    // Each read reports pages 100..110 dirty: they are in round 1's first window, so
    // they are sent again; pages of later windows dirtied before those windows are not.
    let mut d = Driver::new();
    let mut s = SourceSession::new(cfg(VerifyMode::Strict));
    let mut reads = 0;
    d.run(&mut s, |_, c| {
        if let SourceCommand::TakeDirty {
            final_round: false, ..
        } = c
        {
            reads += 1;
            // Before window 2 of round 1: pages 100..110 (window 1) and 700..710 (window 3).
            let mut a = DirtyBitmap::new(PAGES);
            if reads == 1 {
                a.set_range(100, 10);
                a.set_range(700, 10);
            }
            return Some(SourceEvent::Dirty(vec![a, DirtyBitmap::new(24)]));
        }
        None
    });
    let round2_pages = s.report().rounds[1].stats.pages;
    assert_eq!(
        round2_pages,
        10,
        "only window 1's re-dirtied pages: {:?}",
        s.report().rounds
    );
}

#[test]
fn torn_pages_are_sent_again_and_a_torn_page_in_the_final_round_aborts() {
    let mut d = Driver::new();
    let mut s = SourceSession::new(cfg(VerifyMode::Strict));
    let torn = PageRange {
        region: 0,
        first: 500,
        count: 1,
    };
    let mut first = true;
    d.run(&mut s, |_, c| match c {
        SourceCommand::SendWindow(w)
            if first && w.plan.ranges().any(|r| r.first <= 500 && r.end() > 500) =>
        {
            first = false;
            Some(SourceEvent::WindowSent(WindowOutcome::Done(RoundStats {
                pages: w.plan.pages(),
                bytes: w.plan.bytes(),
                zero_pages: 0,
                torn: vec![torn],
                ..RoundStats::default()
            })))
        }
        _ => None,
    });
    assert_eq!(s.outcome(), Some(&SourceOutcome::Committed));
    let r2 = d
        .log
        .iter()
        .filter_map(|c| match c {
            SourceCommand::SendWindow(w) if w.round == 2 => {
                Some(w.plan.ranges().copied().collect::<Vec<_>>())
            }
            _ => None,
        })
        .flatten()
        .any(|r| r.region == 0 && r.first <= 500 && r.end() > 500);
    assert!(r2, "the torn page goes out again in round 2");

    // In the final round the VM is paused: a torn page is corruption.
    let mut d = Driver::new();
    let mut s = SourceSession::new(cfg(VerifyMode::Strict));
    let out = d.run(&mut s, |_, c| match c {
        SourceCommand::SendWindow(w) if w.final_round => {
            Some(SourceEvent::WindowSent(WindowOutcome::Done(RoundStats {
                pages: w.plan.pages(),
                bytes: w.plan.bytes(),
                zero_pages: 0,
                torn: vec![PageRange {
                    region: 0,
                    first: 100,
                    count: 1,
                }],
                ..RoundStats::default()
            })))
        }
        _ => None,
    });
    assert_eq!(out, SourceOutcome::Aborted);
    assert_eq!(d.count(is_resume), 1);
    assert!(s
        .report()
        .error
        .as_deref()
        .is_some_and(|e| e.contains("final round")));
}

#[test]
fn convergence_by_budget_round_limit_and_timeout_with_abort_or_force() {
    // Budget: little dirtied, fast link: stop after round 1.
    let mut d = Driver::new();
    d.dirty_per_read = 1;
    let mut s = SourceSession::new(cfg(VerifyMode::Strict));
    assert_eq!(d.run(&mut s, |_, _| None), SourceOutcome::Committed);
    assert!(matches!(
        s.report().stop_reason,
        Some(StopReason::Converged { .. })
    ));
    assert_eq!(s.report().rounds.len(), 2);

    // A guest that dirties more than the budget allows: round limit, force or abort.
    for (on_limit, want) in [
        (LimitAction::ForceStopAndCopy, SourceOutcome::Committed),
        (LimitAction::Abort, SourceOutcome::Aborted),
    ] {
        let mut c = cfg(VerifyMode::Strict);
        c.policy.on_limit = on_limit;
        c.policy.downtime_budget = Duration::from_micros(1);
        let mut d = Driver::new();
        d.dirty_per_read = 400;
        let mut s = SourceSession::new(c);
        assert_eq!(d.run(&mut s, |_, _| None), want);
        assert!(matches!(
            s.report().stop_reason,
            Some(StopReason::RoundLimit { rounds: 5, .. })
        ));
        // Aborting at the limit never paused the VM; it only switches logging off.
        assert_eq!(
            d.count(|c| *c == SourceCommand::Pause),
            usize::from(want == SourceOutcome::Committed)
        );
        assert_eq!(
            d.count(is_resume),
            usize::from(want == SourceOutcome::Aborted)
        );
    }

    // Timeout before the round limit.
    let mut c = cfg(VerifyMode::Strict);
    c.policy.on_limit = LimitAction::Abort;
    c.policy.downtime_budget = Duration::from_micros(1);
    c.policy.timeout = Duration::from_millis(1);
    let mut d = Driver::new();
    d.dirty_per_read = 400;
    let mut s = SourceSession::new(c);
    assert_eq!(d.run(&mut s, |_, _| None), SourceOutcome::Aborted);
    assert!(matches!(
        s.report().stop_reason,
        Some(StopReason::Timeout { .. })
    ));
}

#[test]
fn cold_first_observes_then_sends_recently_written_pages_last() {
    let mut c = cfg(VerifyMode::Strict);
    c.observe = Duration::from_millis(100);
    let mut d = Driver::new();
    let mut s = SourceSession::new(c);
    d.run(&mut s, |_, cmd| match cmd {
        SourceCommand::TakeDirty { delay, .. } if *delay > Duration::ZERO => {
            let mut hot = DirtyBitmap::new(PAGES);
            hot.set_range(0, 50);
            Some(SourceEvent::Dirty(vec![hot, DirtyBitmap::new(24)]))
        }
        _ => None,
    });
    let round1: Vec<PageRange> = d
        .log
        .iter()
        .filter_map(|c| match c {
            SourceCommand::SendWindow(w) if w.round == 1 => {
                Some(w.plan.ranges().copied().collect::<Vec<_>>())
            }
            _ => None,
        })
        .flatten()
        .collect();
    let last_window_has_hot = round1
        .iter()
        .rev()
        .take(4)
        .any(|r| r.region == 0 && r.first < 50);
    let first_has_hot = round1.iter().take(4).any(|r| r.region == 0 && r.first < 50);
    assert!(last_window_has_hot && !first_has_hot, "{round1:?}");
}

#[test]
fn an_rdma_failure_hands_the_unfinished_ranges_to_tcp_mid_round() {
    let mut d = Driver::new();
    d.transports = vec![(TransportKind::Rdma, 4), (TransportKind::Tcp, 4)];
    let mut s = SourceSession::new(cfg(VerifyMode::Strict));
    let mut failed = false;
    let out = d.run(&mut s, |_, c| match c {
        SourceCommand::SendWindow(w)
            if w.transport == TransportKind::Rdma && w.round == 1 && !failed =>
        {
            failed = true;
            let all: Vec<PageRange> = w.plan.ranges().copied().collect();
            let half = w.plan.pages() / 2;
            // Confirm the first ranges, hand the rest back.
            let mut done = 0;
            let mut unfinished = Vec::new();
            for r in all {
                if done >= half {
                    unfinished.push(r);
                } else {
                    done += r.count;
                }
            }
            Some(SourceEvent::WindowSent(WindowOutcome::Unfinished {
                confirmed: RoundStats {
                    pages: done,
                    bytes: done * 4096,
                    ..RoundStats::default()
                },
                unfinished,
                reason: "QP 0 in error state".into(),
            }))
        }
        _ => None,
    });
    assert_eq!(out, SourceOutcome::Committed);
    let windows: Vec<(u32, TransportKind)> = d
        .log
        .iter()
        .filter_map(|c| match c {
            SourceCommand::SendWindow(w) => Some((w.wire_round, w.transport)),
            _ => None,
        })
        .collect();
    // The same wire round goes on over TCP, and TCP carries everything after.
    assert_eq!(windows[0], (1, TransportKind::Rdma));
    assert_eq!(windows[1], (1, TransportKind::Tcp));
    assert!(windows[2..].iter().all(|w| w.1 == TransportKind::Tcp));
    assert_eq!(
        s.report().transports,
        vec![TransportKind::Rdma, TransportKind::Tcp]
    );
    assert!(s
        .report()
        .fallback
        .as_deref()
        .is_some_and(|f| f.contains("QP 0")));
    assert_eq!(s.report().rounds[0].stats.pages, 1024);

    // Unfinished on the last transport: abort.
    let mut d = Driver::new();
    let mut s = SourceSession::new(cfg(VerifyMode::Strict));
    let out = d.run(&mut s, |_, c| match c {
        SourceCommand::SendWindow(w) => Some(SourceEvent::WindowSent(WindowOutcome::Unfinished {
            confirmed: RoundStats::default(),
            unfinished: w.plan.ranges().copied().collect(),
            reason: "gone".into(),
        })),
        _ => None,
    });
    assert_eq!(out, SourceOutcome::Aborted);
    assert_eq!(d.count(is_resume), 1);
}

#[test]
fn a_transport_that_miscounts_or_names_foreign_pages_aborts() {
    let mut d = Driver::new();
    let mut s = SourceSession::new(cfg(VerifyMode::Strict));
    let out = d.run(&mut s, |_, c| match c {
        SourceCommand::SendWindow(w) => {
            Some(SourceEvent::WindowSent(WindowOutcome::Done(RoundStats {
                pages: w.plan.pages() - 1,
                ..RoundStats::default()
            })))
        }
        _ => None,
    });
    assert_eq!(out, SourceOutcome::Aborted);
    let mut d = Driver::new();
    d.transports = vec![(TransportKind::Rdma, 2), (TransportKind::Tcp, 2)];
    let mut s = SourceSession::new(cfg(VerifyMode::Strict));
    let out = d.run(&mut s, |_, c| match c {
        SourceCommand::SendWindow(w) if w.transport == TransportKind::Rdma => {
            Some(SourceEvent::WindowSent(WindowOutcome::Unfinished {
                confirmed: RoundStats {
                    pages: w.plan.pages() - 5,
                    ..RoundStats::default()
                },
                unfinished: vec![PageRange {
                    region: 1,
                    first: 20,
                    count: 5,
                }],
                reason: "x".into(),
            }))
        }
        _ => None,
    });
    assert_eq!(out, SourceOutcome::Aborted, "pages outside the window");

    // Counts chosen to overflow (a hostile destination): refused, never a panic or a wrap
    // that adds up.
    for (confirmed, first, count) in [(u64::MAX, 0, 2), (1, u64::MAX - 1, 5), (0, 0, u64::MAX)] {
        let mut d = Driver::new();
        d.transports = vec![(TransportKind::Rdma, 2), (TransportKind::Tcp, 2)];
        let mut s = SourceSession::new(cfg(VerifyMode::Strict));
        let out = d.run(&mut s, |_, c| match c {
            SourceCommand::SendWindow(w) if w.transport == TransportKind::Rdma => {
                Some(SourceEvent::WindowSent(WindowOutcome::Unfinished {
                    confirmed: RoundStats {
                        pages: confirmed,
                        ..RoundStats::default()
                    },
                    unfinished: vec![PageRange {
                        region: 0,
                        first,
                        count,
                    }],
                    reason: "x".into(),
                }))
            }
            _ => None,
        });
        assert_eq!(out, SourceOutcome::Aborted, "{confirmed} {first} {count}");
    }
}

#[test]
fn a_bitmap_that_does_not_match_the_layout_aborts() {
    let mut d = Driver::new();
    let mut s = SourceSession::new(cfg(VerifyMode::Strict));
    let out = d.run(&mut s, |_, c| match c {
        SourceCommand::TakeDirty { .. } => Some(SourceEvent::Dirty(vec![DirtyBitmap::new(PAGES)])),
        _ => None,
    });
    assert_eq!(out, SourceOutcome::Aborted);
}

#[test]
fn digest_mismatch_in_strict_mode_aborts_and_resumes_before_any_decision() {
    let mut d = Driver::new();
    d.theirs = 8;
    let mut s = SourceSession::new(cfg(VerifyMode::Strict));
    assert_eq!(d.run(&mut s, |_, _| None), SourceOutcome::Aborted);
    assert_eq!(d.count(is_commit_record), 0);
    assert_eq!(d.count(|c| *c == SourceCommand::Fence), 0);
    assert_eq!(d.count(is_resume), 1);
    assert_eq!(s.report().digest_match, Some(false));
    assert!(s
        .report()
        .error
        .as_deref()
        .is_some_and(|e| e.contains("digest mismatch")));
    // The destination loaded a copy and waits on the control link: it is told, after the
    // VM runs here again, and asked to confirm it discarded it; then "aborted" is recorded.
    let tail: Vec<_> = d.log.iter().rev().take(3).rev().cloned().collect();
    assert!(
        matches!(
            tail.as_slice(),
            [
                SourceCommand::Resume,
                SourceCommand::AbortPeer { confirm: true, .. },
                SourceCommand::Record(DecisionState::Aborted)
            ]
        ),
        "{tail:?}"
    );
}

#[test]
fn every_migration_records_undecided_before_anything_reaches_the_destination() {
    let mut d = Driver::new();
    let mut s = SourceSession::new(cfg(VerifyMode::Strict));
    d.run(&mut s, |_, _| None);
    assert_eq!(d.log[0], SourceCommand::Record(DecisionState::Undecided));
    assert_eq!(d.log[1], SourceCommand::Negotiate);

    // A state directory that cannot take it: nothing starts, nothing needs resuming.
    let mut d = Driver::new();
    let mut s = SourceSession::new(cfg(VerifyMode::Strict));
    let out = d.run(&mut s, |i, _| {
        (i == 0).then(|| SourceEvent::RecordFailed("No space left on device".into()))
    });
    assert_eq!(out, SourceOutcome::Aborted);
    assert_eq!(d.log.len(), 1, "{:?}", d.log);
    assert!(s
        .report()
        .error
        .as_deref()
        .is_some_and(|e| e.contains("before it started")));
}

#[test]
fn a_copy_the_destination_may_hold_is_released_when_the_link_cannot_tell_it() {
    // The link dies while the destination loads (or sends Ready): the VM resumes here, and
    // the destination's copy goes to the background release before "aborted" is recorded.
    let mut d = Driver::new();
    let mut s = SourceSession::new(cfg(VerifyMode::AfterResume));
    let out = d.run(&mut s, |_, c| {
        (*c == SourceCommand::AwaitReady)
            .then(|| SourceEvent::Failed(Failure::new(FailureKind::PeerLost, "reset")))
    });
    assert_eq!(out, SourceOutcome::Aborted);
    let tail: Vec<_> = d.log.iter().rev().take(3).rev().cloned().collect();
    assert_eq!(
        tail,
        vec![
            SourceCommand::Resume,
            SourceCommand::ReleasePeer,
            SourceCommand::Record(DecisionState::Aborted)
        ]
    );

    // Told on the link but not confirmed: released too.
    let mut d = Driver::new();
    d.theirs = 8;
    let mut s = SourceSession::new(cfg(VerifyMode::Strict));
    d.run(&mut s, |_, c| {
        matches!(c, SourceCommand::AbortPeer { .. })
            .then(|| SourceEvent::Failed(Failure::new(FailureKind::PeerLost, "timed out")))
    });
    assert_eq!(d.count(|c| *c == SourceCommand::ReleasePeer), 1);

    // The release cannot be arranged (state directory full): "undecided" stays on disk for
    // a restarted sidecar, and the operator is warned.
    let mut d = Driver::new();
    let mut s = SourceSession::new(cfg(VerifyMode::AfterResume));
    let out = d.run(&mut s, |_, c| match c {
        SourceCommand::AwaitReady => Some(SourceEvent::Failed(Failure::new(
            FailureKind::PeerLost,
            "reset",
        ))),
        SourceCommand::ReleasePeer => Some(SourceEvent::Failed(Failure::new(
            FailureKind::Local,
            "No space left on device",
        ))),
        _ => None,
    });
    assert_eq!(out, SourceOutcome::Aborted);
    assert_eq!(
        d.count(|c| *c == SourceCommand::Record(DecisionState::Aborted)),
        0
    );
    assert!(s.report().warnings.iter().any(|w| w.contains("undecided")));

    // Before the state blob left, the destination holds nothing: no release.
    let mut d = Driver::new();
    let mut s = SourceSession::new(cfg(VerifyMode::Strict));
    d.run(&mut s, |_, c| {
        (*c == SourceCommand::SaveState)
            .then(|| SourceEvent::Failed(Failure::new(FailureKind::PeerLost, "reset")))
    });
    assert_eq!(d.count(|c| *c == SourceCommand::ReleasePeer), 0);
}

#[test]
fn digest_mismatch_after_resume_keeps_the_source_paused_and_never_stops_it() {
    let mut d = Driver::new();
    d.theirs = 8;
    let mut s = SourceSession::new(cfg(VerifyMode::AfterResume));
    let out = d.run(&mut s, |_, _| None);
    assert!(
        matches!(out, SourceOutcome::DigestMismatch(ref r) if !r.is_empty()),
        "{out:?}"
    );
    assert_eq!(d.count(is_resume), 0);
    assert_eq!(d.count(|c| *c == SourceCommand::Stop), 0);
    assert_eq!(s.report().digest_match, Some(false));
    assert!(s.report().verified_after_resume.is_some());
}

#[test]
fn a_decision_that_cannot_be_recorded_aborts_before_commit() {
    let mut d = Driver::new();
    let mut s = SourceSession::new(cfg(VerifyMode::Strict));
    let out = d.run(&mut s, |_, c| {
        is_commit_record(c).then(|| SourceEvent::RecordFailed("No space left on device".into()))
    });
    assert_eq!(out, SourceOutcome::Aborted);
    assert_eq!(d.count(|c| *c == SourceCommand::SendCommit), 0);
    // The fenced VMM is unfenced and resumed.
    assert_eq!(d.count(is_resume), 1);
    assert!(s
        .report()
        .error
        .as_deref()
        .is_some_and(|e| e.contains("No space left")));
}

#[test]
fn a_link_lost_after_the_decision_is_replayed_never_resumed() {
    // Replay succeeds on the third attempt.
    let mut d = Driver::new();
    let mut s = SourceSession::new(cfg(VerifyMode::Strict));
    let mut replays = 0;
    let out = d.run(&mut s, |_, c| match c {
        SourceCommand::SendCommit => Some(SourceEvent::Failed(Failure::new(
            FailureKind::PeerLost,
            "reset",
        ))),
        SourceCommand::ReplayCommit => {
            replays += 1;
            (replays < 3).then(|| {
                SourceEvent::Failed(Failure::new(FailureKind::PeerLost, "Connection refused"))
            })
        }
        _ => None,
    });
    assert_eq!(out, SourceOutcome::Committed);
    assert_eq!(replays, 3, "retries through refused connections");
    assert_eq!(d.count(is_resume), 0);
    assert_eq!(d.count(|c| *c == SourceCommand::Stop), 1);
    assert!(s.report().replayed);

    // The replay window passes: committed-unconfirmed, VM paused, never resumed.
    let mut d = Driver::new();
    let mut s = SourceSession::new(cfg(VerifyMode::Strict));
    let out = d.run(&mut s, |_, c| match c {
        SourceCommand::SendCommit | SourceCommand::ReplayCommit => Some(SourceEvent::Failed(
            Failure::new(FailureKind::PeerLost, "Connection refused"),
        )),
        _ => None,
    });
    assert_eq!(out, SourceOutcome::CommittedUnconfirmed);
    assert_eq!(d.count(is_resume), 0);
    assert_eq!(d.count(|c| *c == SourceCommand::Stop), 0);
    // About one attempt per second over the 10 s window.
    let attempts = d.count(|c| *c == SourceCommand::ReplayCommit);
    assert!((8..=11).contains(&attempts), "{attempts}");
}

#[test]
fn a_destination_that_cannot_start_leaves_the_source_paused() {
    let mut d = Driver::new();
    let mut s = SourceSession::new(cfg(VerifyMode::Strict));
    let out = d.run(&mut s, |_, c| {
        (*c == SourceCommand::SendCommit)
            .then(|| SourceEvent::PeerStartFailed("--refuse-start".into()))
    });
    assert_eq!(out, SourceOutcome::StartFailed("--refuse-start".into()));
    assert_eq!(d.count(is_resume), 0);
    assert_eq!(d.count(|c| *c == SourceCommand::Stop), 0);
}

#[test]
fn a_vmm_lost_before_the_fence_aborts_and_after_it_the_migration_commits() {
    // Lost while paused, before the fence: it resumes itself (or died): abort, no Resume.
    let mut d = Driver::new();
    let mut s = SourceSession::new(cfg(VerifyMode::Strict));
    let out = d.run(&mut s, |_, c| {
        (*c == SourceCommand::SaveState)
            .then(|| SourceEvent::Failed(Failure::new(FailureKind::VmmLost, "VMM gone")))
    });
    assert_eq!(out, SourceOutcome::Aborted);
    assert_eq!(d.count(is_resume), 0);
    assert_eq!(d.count(|c| matches!(c, SourceCommand::AbortPeer { .. })), 1);

    // Lost after the fence: the decision is taken without it; Stop is skipped.
    let mut d = Driver::new();
    let mut s = SourceSession::new(cfg(VerifyMode::Strict));
    let mut lost = false;
    let out = d.run(&mut s, |_, c| match c {
        SourceCommand::Stop => Some(SourceEvent::Failed(Failure::new(
            FailureKind::VmmLost,
            "VMM gone",
        ))),
        SourceCommand::Record(DecisionState::Committed) => {
            lost = true;
            None
        }
        _ => None,
    });
    assert!(lost);
    assert_eq!(out, SourceOutcome::Committed);
    assert!(!s.report().warnings.is_empty());
}

#[test]
fn recovery_delivers_a_recorded_decision_or_rolls_it_back_with_the_destination() {
    let mut d = Driver::new();
    let mut s = SourceSession::deliver_recorded(cfg(VerifyMode::Strict));
    assert_eq!(d.run(&mut s, |_, _| None), SourceOutcome::Committed);
    assert_eq!(d.log[0], SourceCommand::ReplayCommit);
    assert_eq!(d.count(|c| *c == SourceCommand::Stop), 1);

    let mut d = Driver::new();
    let mut s = SourceSession::roll_back(cfg(VerifyMode::Strict), false);
    assert_eq!(d.run(&mut s, |_, _| None), SourceOutcome::Aborted);
    assert_eq!(
        d.log,
        vec![
            SourceCommand::AskDiscard,
            SourceCommand::Record(DecisionState::Aborted),
            SourceCommand::Resume
        ]
    );

    // The destination refuses (the VM may have run there): nothing is rolled back.
    let mut d = Driver::new();
    let mut s = SourceSession::roll_back(cfg(VerifyMode::Strict), false);
    let out = d.run(&mut s, |_, c| {
        (*c == SourceCommand::AskDiscard)
            .then(|| SourceEvent::Failed(Failure::new(FailureKind::PeerRefused, "may have run")))
    });
    assert_eq!(out, SourceOutcome::CommittedUnconfirmed);
    assert_eq!(d.count(is_resume), 0);

    // --force skips the destination.
    let mut d = Driver::new();
    let mut s = SourceSession::roll_back(cfg(VerifyMode::Strict), true);
    assert_eq!(d.run(&mut s, |_, _| None), SourceOutcome::Aborted);
    assert_eq!(d.log[0], SourceCommand::Record(DecisionState::Aborted));
}

/// Every command of a healthy migration, in turn, fails with every kind of failure; the
/// invariants hold in every run.
#[test]
fn every_failure_at_every_step_keeps_exactly_one_vm() {
    let kinds = [
        FailureKind::PeerLost,
        FailureKind::PeerRefused,
        FailureKind::VmmLost,
        FailureKind::VmmRefused,
        FailureKind::Transport,
        FailureKind::Local,
    ];
    for verify in [VerifyMode::Strict, VerifyMode::AfterResume] {
        let steps = {
            let mut d = Driver::new();
            let mut s = SourceSession::new(cfg(verify));
            d.run(&mut s, |_, _| None);
            d.log.len()
        };
        for at in 0..steps {
            for kind in kinds {
                for replay_works in [true, false] {
                    let mut d = Driver::new();
                    if !replay_works {
                        d.replay_answer = Some(SourceEvent::Failed(Failure::new(
                            FailureKind::PeerLost,
                            "refused",
                        )));
                    }
                    let mut s = SourceSession::new(cfg(verify));
                    let mut failed_cmd = None;
                    let out = d.run(&mut s, |i, c| {
                        (i == at).then(|| {
                            failed_cmd = Some(c.clone());
                            SourceEvent::Failed(Failure::new(kind, "injected"))
                        })
                    });
                    let ctx = format!("{verify:?} step {at} ({failed_cmd:?}) {kind:?} replay_works={replay_works}: {out:?}\n{:?}", d.log);
                    let recorded = d.position(is_commit_record);
                    let record_ok = recorded.is_some_and(|p| p != at);
                    let resume = d.position(is_resume);
                    // Nothing resumes the source after a recorded decision.
                    if record_ok {
                        assert_eq!(resume, None, "{ctx}");
                    }
                    // Commit never leaves before the decision is on disk, nor before the fence.
                    if let Some(c) = d.position(|c| {
                        matches!(c, SourceCommand::SendCommit | SourceCommand::ReplayCommit)
                    }) {
                        assert!(record_ok && recorded < Some(c), "{ctx}");
                        let fence = d.position(|c| *c == SourceCommand::Fence);
                        assert!(fence < recorded && fence != Some(at), "{ctx}");
                    }
                    // "undecided" is on disk before anything else happens.
                    assert_eq!(
                        d.log[0],
                        SourceCommand::Record(DecisionState::Undecided),
                        "{ctx}"
                    );
                    match &out {
                        SourceOutcome::Aborted => {
                            assert!(!record_ok, "{ctx}");
                            // The VM runs here again: resumed, or its VMM is gone (it resumed
                            // itself if alive and unfenced; a fenced one learns there is no
                            // decision when it reconnects), or nothing was started.
                            let started =
                                d.position(|c| *c == SourceCommand::StartDirtyLog).is_some();
                            assert!(
                                resume.is_some() || kind == FailureKind::VmmLost || !started,
                                "{ctx}"
                            );
                            // A copy the destination may hold is never forgotten: it confirmed
                            // the discard on the link, or the release has it, or "undecided"
                            // stays on disk for a restarted sidecar.
                            let ok_at = |f: &dyn Fn(&SourceCommand) -> bool| {
                                d.log.iter().enumerate().any(|(i, c)| f(c) && i != at)
                            };
                            if ok_at(&|c| matches!(c, SourceCommand::SendState(_))) {
                                let confirmed = ok_at(&|c| {
                                    matches!(c, SourceCommand::AbortPeer { confirm: true, .. })
                                });
                                let released = ok_at(&|c| *c == SourceCommand::ReleasePeer);
                                let aborted_recorded = d
                                    .count(|c| *c == SourceCommand::Record(DecisionState::Aborted))
                                    > 0;
                                assert!(confirmed || released || !aborted_recorded, "{ctx}");
                            }
                        }
                        SourceOutcome::Committed => {
                            assert!(record_ok, "{ctx}");
                            assert!(
                                d.position(|c| *c == SourceCommand::Stop).is_some()
                                    || kind == FailureKind::VmmLost,
                                "{ctx}"
                            );
                        }
                        SourceOutcome::CommittedUnconfirmed => {
                            assert!(record_ok && !replay_works, "{ctx}");
                        }
                        SourceOutcome::DigestMismatch(_) | SourceOutcome::StartFailed(_) => {
                            panic!("{ctx}")
                        }
                    }
                    // Never a Resume and a Stop in the same run.
                    assert!(
                        !(resume.is_some() && d.position(|c| *c == SourceCommand::Stop).is_some()),
                        "{ctx}"
                    );
                }
            }
        }
    }
}

#[test]
fn cancel_at_every_step_aborts_before_the_decision_and_is_refused_after_it() {
    for verify in [VerifyMode::Strict, VerifyMode::AfterResume] {
        let steps = {
            let mut d = Driver::new();
            let mut s = SourceSession::new(cfg(verify));
            d.run(&mut s, |_, _| None);
            d.log.len()
        };
        let mut accepted = 0;
        let mut refused = 0;
        for at in 0..steps {
            let mut d = Driver::new();
            let mut s = SourceSession::new(cfg(verify));
            let mut answer = None;
            let mut i = 0;
            while let Some(c) = s.poll() {
                let ev = d.answer(&c);
                d.log.push(c);
                s.handle(d.now, ev);
                if i == at {
                    answer = Some(s.cancel(d.now));
                }
                i += 1;
            }
            let out = s.outcome().cloned().expect("ended");
            let ctx = format!(
                "{verify:?} cancel after step {at}: {answer:?} {out:?}\n{:?}",
                d.log
            );
            let recorded = d.position(is_commit_record);
            match answer.expect("cancel was called") {
                Ok(()) => {
                    accepted += 1;
                    assert_eq!(out, SourceOutcome::Aborted, "{ctx}");
                    assert!(s.report().cancelled, "{ctx}");
                    assert_eq!(recorded, None, "{ctx}");
                    assert!(d.position(|c| *c == SourceCommand::Stop).is_none(), "{ctx}");
                    // The VM runs here again once anything was started.
                    if d.position(|c| *c == SourceCommand::StartDirtyLog).is_some() {
                        assert!(d.position(is_resume).is_some(), "{ctx}");
                    }
                    // A destination that may hold a copy is told to discard it.
                    if d.position(|c| matches!(c, SourceCommand::SendState(_)))
                        .is_some()
                    {
                        assert!(
                            d.position(|c| matches!(
                                c,
                                SourceCommand::AbortPeer { confirm: true, .. }
                            ))
                            .is_some(),
                            "{ctx}"
                        );
                    }
                }
                Err(why) => {
                    refused += 1;
                    // Refused only once the decision is taken (or the session ended).
                    assert!(
                        recorded.is_some_and(|p| p <= at + 1)
                            || s.outcome().is_some() && i == at + 1,
                        "{ctx}: {why}"
                    );
                    assert!(!s.report().cancelled, "{ctx}");
                }
            }
        }
        assert!(
            accepted > 10 && refused > 0,
            "{accepted} accepted, {refused} refused"
        );
    }
}

// ---- destination ----

fn drive_dest(
    s: &mut DestSession,
    answers: &mut dyn FnMut(&DestCommand) -> Option<DestEvent>,
) -> Vec<DestCommand> {
    let mut log = Vec::new();
    while let Some(c) = s.poll() {
        log.push(c.clone());
        if let Some(e) = answers(&c) {
            s.handle(e);
        }
    }
    log
}

fn healthy(c: &DestCommand) -> Option<DestEvent> {
    Some(match c {
        DestCommand::Load(_) => DestEvent::Loaded,
        DestCommand::Record(_) => DestEvent::Recorded,
        DestCommand::Start => DestEvent::Started("ok".into()),
        DestCommand::Discard => DestEvent::Discarded,
        DestCommand::Hold => return None,
        DestCommand::SendReady
        | DestCommand::SendRunning(_)
        | DestCommand::SendStartFailed(_)
        | DestCommand::SendDiscarded
        | DestCommand::Refuse(_) => DestEvent::Told,
    })
}

fn loaded() -> DestSession {
    let mut s = DestSession::new();
    s.handle(DestEvent::StateArrived(vec![1]));
    let log = drive_dest(&mut s, &mut healthy);
    assert_eq!(
        log,
        vec![DestCommand::Load(vec![1]), DestCommand::SendReady]
    );
    assert_eq!(s.phase(), &DestPhase::Loaded);
    s
}

#[test]
fn the_destination_runs_only_on_commit_and_records_it_first() {
    let mut s = loaded();
    s.handle(DestEvent::Commit);
    let log = drive_dest(&mut s, &mut healthy);
    assert_eq!(
        log,
        vec![
            DestCommand::Record(DestRecord::Committed),
            DestCommand::Start,
            DestCommand::Record(DestRecord::Running("ok".into())),
            DestCommand::SendRunning("ok".into()),
        ]
    );
    assert_eq!(s.phase(), &DestPhase::Running("ok".into()));
    // A replayed Commit is answered; an abort is refused once it runs.
    s.handle(DestEvent::Commit);
    assert_eq!(
        drive_dest(&mut s, &mut healthy),
        vec![DestCommand::SendRunning("ok".into())]
    );
    s.handle(DestEvent::Abort("late".into()));
    assert!(matches!(
        drive_dest(&mut s, &mut healthy)[..],
        [DestCommand::Refuse(_)]
    ));
    assert_eq!(s.phase(), &DestPhase::Running("ok".into()));
}

#[test]
fn a_commit_that_cannot_be_recorded_does_not_start_the_vm() {
    let mut s = loaded();
    s.handle(DestEvent::Commit);
    let log = drive_dest(&mut s, &mut |c| match c {
        DestCommand::Record(DestRecord::Committed) => {
            Some(DestEvent::RecordFailed("read-only".into()))
        }
        c => healthy(c),
    });
    assert!(!log.contains(&DestCommand::Start), "{log:?}");
    assert!(matches!(log.last(), Some(DestCommand::SendStartFailed(r)) if r.contains("read-only")));
    assert!(matches!(
        s.phase(),
        DestPhase::StartFailed {
            may_have_run: false,
            ..
        }
    ));
}

#[test]
fn a_failed_start_is_reported_as_a_failure_and_the_vm_kept() {
    let mut s = loaded();
    s.handle(DestEvent::Commit);
    let log = drive_dest(&mut s, &mut |c| match c {
        DestCommand::Start => Some(DestEvent::StartFailed("--refuse-start".into())),
        c => healthy(c),
    });
    assert!(
        !log.iter().any(|c| matches!(c, DestCommand::SendRunning(_))),
        "{log:?}"
    );
    assert!(matches!(log.last(), Some(DestCommand::SendStartFailed(_))));
    assert!(s.has_vm());
    // The operator retries (a replayed commit): it starts now.
    s.handle(DestEvent::Commit);
    let log = drive_dest(&mut s, &mut healthy);
    assert_eq!(log[0], DestCommand::Start);
    assert_eq!(s.phase(), &DestPhase::Running("ok".into()));

    // Or rolls back: the destination discards and says so.
    let mut s = loaded();
    s.handle(DestEvent::Commit);
    drive_dest(&mut s, &mut |c| match c {
        DestCommand::Start => Some(DestEvent::StartFailed("no".into())),
        c => healthy(c),
    });
    s.handle(DestEvent::Abort("operator".into()));
    let log = drive_dest(&mut s, &mut healthy);
    assert_eq!(
        log,
        vec![
            DestCommand::Discard,
            DestCommand::Record(DestRecord::Discarded),
            DestCommand::SendDiscarded
        ]
    );
}

#[test]
fn a_vmm_lost_during_start_may_have_run_and_refuses_a_roll_back() {
    let mut s = loaded();
    s.handle(DestEvent::Commit);
    drive_dest(&mut s, &mut |c| match c {
        DestCommand::Start => Some(DestEvent::Failed(Failure::new(FailureKind::VmmLost, "EOF"))),
        c => healthy(c),
    });
    assert!(matches!(
        s.phase(),
        DestPhase::StartFailed {
            may_have_run: true,
            ..
        }
    ));
    s.handle(DestEvent::Abort("operator".into()));
    let log = drive_dest(&mut s, &mut healthy);
    assert!(
        matches!(&log[..], [DestCommand::Refuse(r)] if r.contains("--force")),
        "{log:?}"
    );
}

#[test]
fn a_loaded_vm_whose_link_breaks_is_held_then_settled_by_the_replayed_decision() {
    for commit in [true, false] {
        let mut s = loaded();
        s.handle(DestEvent::LinkLost);
        assert_eq!(drive_dest(&mut s, &mut healthy), vec![DestCommand::Hold]);
        assert_eq!(s.phase(), &DestPhase::Held);
        if commit {
            s.handle(DestEvent::Commit);
            let log = drive_dest(&mut s, &mut healthy);
            assert_eq!(log[0], DestCommand::Record(DestRecord::Committed));
            assert_eq!(s.phase(), &DestPhase::Running("ok".into()));
        } else {
            s.handle(DestEvent::Abort("rolled back".into()));
            let log = drive_dest(&mut s, &mut healthy);
            assert_eq!(log.last(), Some(&DestCommand::SendDiscarded));
            assert_eq!(s.phase(), &DestPhase::Discarded);
        }
    }
}

#[test]
fn anything_before_ready_discards_and_a_refused_load_is_reported() {
    for ev in [
        DestEvent::Abort("x".into()),
        DestEvent::LinkLost,
        DestEvent::Commit,
    ] {
        let mut s = DestSession::new();
        s.handle(ev);
        assert_eq!(drive_dest(&mut s, &mut healthy), vec![DestCommand::Discard]);
        assert_eq!(s.phase(), &DestPhase::Discarded);
    }
    let mut s = DestSession::new();
    s.handle(DestEvent::StateArrived(vec![]));
    let log = drive_dest(&mut s, &mut |c| match c {
        DestCommand::Load(_) => Some(DestEvent::LoadFailed("--refuse-load".into())),
        c => healthy(c),
    });
    assert!(
        matches!(&log[..], [DestCommand::Load(_), DestCommand::Discard, DestCommand::Refuse(r)] if r.contains("--refuse-load")),
        "{log:?}"
    );
    // An abort after Ready discards and records it.
    let mut s = loaded();
    s.handle(DestEvent::Abort("x".into()));
    assert_eq!(
        drive_dest(&mut s, &mut healthy),
        vec![
            DestCommand::Discard,
            DestCommand::Record(DestRecord::Discarded),
            DestCommand::SendDiscarded
        ]
    );
}

#[test]
fn a_restarted_destination_resumes_from_its_record() {
    // Held VM, no record: held.
    let s = DestSession::restored(None, true);
    assert_eq!(s.phase(), &DestPhase::Held);
    // Commit recorded, VM reattached: start it.
    let mut s = DestSession::restored(Some(DestRecord::Committed), true);
    let log = drive_dest(&mut s, &mut healthy);
    assert_eq!(log[0], DestCommand::Start);
    assert_eq!(s.phase(), &DestPhase::Running("ok".into()));
    // Discarded, and a VMM reattaches with the VM: it is discarded.
    let mut s = DestSession::restored(Some(DestRecord::Discarded), true);
    assert_eq!(drive_dest(&mut s, &mut healthy), vec![DestCommand::Discard]);
    // Running: a replay gets the recorded line.
    let mut s = DestSession::restored(Some(DestRecord::Running("line".into())), false);
    s.handle(DestEvent::Commit);
    assert_eq!(
        drive_dest(&mut s, &mut healthy),
        vec![DestCommand::SendRunning("line".into())]
    );
    // Commit recorded, no VMM yet: a replay is asked to come again; the VMM's return starts it.
    let mut s = DestSession::restored(Some(DestRecord::Committed), false);
    assert_eq!(s.phase(), &DestPhase::AwaitingVmm);
    s.handle(DestEvent::Commit);
    assert!(matches!(
        drive_dest(&mut s, &mut healthy)[..],
        [DestCommand::Refuse(_)]
    ));
    s.vm_reattached();
    assert_eq!(drive_dest(&mut s, &mut healthy)[0], DestCommand::Start);
    assert_eq!(s.phase(), &DestPhase::Running("ok".into()));
    // Nothing known: a commit is refused (the source keeps trying), an abort acknowledged.
    let mut s = DestSession::restored(None, false);
    s.handle(DestEvent::Commit);
    assert!(matches!(
        drive_dest(&mut s, &mut healthy)[..],
        [DestCommand::Refuse(_)]
    ));
    s.handle(DestEvent::Abort("x".into()));
    assert_eq!(
        drive_dest(&mut s, &mut healthy),
        vec![DestCommand::SendDiscarded]
    );
}

#[test]
fn session_ids_print_and_parse_as_hex() {
    let id = SessionId([0xab; 16]);
    let s = id.to_string();
    assert_eq!(s.len(), 32);
    assert_eq!(SessionId::from_hex(&s), Some(id));
    assert_eq!(SessionId::from_hex("zz"), None);
    assert_eq!(SessionId::from_hex(&"é".repeat(16)), None);
}

#[test]
fn a_loaded_vm_is_discarded_only_on_the_sources_abort() {
    // A corrupted or out-of-step message, a protocol error, a lost link: held.
    for ev in [
        DestEvent::StateArrived(vec![2]),
        DestEvent::Failed(Failure::new(FailureKind::PeerRefused, "bad frame")),
        DestEvent::LinkLost,
    ] {
        let mut s = loaded();
        s.handle(ev.clone());
        assert_eq!(
            drive_dest(&mut s, &mut healthy),
            vec![DestCommand::Hold],
            "{ev:?}"
        );
        assert_eq!(s.phase(), &DestPhase::Held, "{ev:?}");
        // The source's decision settles it either way later.
        s.handle(DestEvent::Abort("released".into()));
        let log = drive_dest(&mut s, &mut healthy);
        assert_eq!(log[0], DestCommand::Discard, "{ev:?}");
        assert_eq!(s.phase(), &DestPhase::Discarded);
    }
}
