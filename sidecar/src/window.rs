//! One window of pages on its transport, for the source's [`Driver`]: progress to the
//! CLI and the job's live numbers while it moves, the bandwidth cap applied (TCP channels
//! book what they sent; the RDMA path books each piece of the pull list), and what moved
//! counted once it is confirmed.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_engine::session::{Failure, FailureKind, SourceEvent, TransportKind};
use ferry_engine::transport::{Transport, TransportError, Window};
use ferry_proto::cli::{CliMsg, Phase, UNKNOWN};

use crate::memory::memory_shrank;
use crate::source::Driver;
use crate::transport::{RdmaPath, TcpPath};

impl Driver<'_> {
    /// Moves one window on its transport, reporting progress (and pacing TCP under the
    /// migration's cap) while it goes.
    pub(crate) fn send_window(
        &mut self,
        w: &Window,
        round: Option<(u32, bool, u64)>,
    ) -> Result<SourceEvent, Failure> {
        let (shown, final_round, planned) =
            round.unwrap_or((w.round, w.final_round, w.plan.pages()));
        if self.round_bytes.0 != shown {
            self.round_bytes = (shown, 0);
        }
        let base = self.round_bytes.1;
        let done = AtomicU64::new(0);
        let finished = AtomicBool::new(false);
        let total_before = self.total.load(Ordering::Relaxed);
        let phase = if final_round {
            Phase::StopAndCopy
        } else {
            Phase::Precopy
        };
        let report = self.report;
        let job = self.job.clone();
        let flow = job.as_ref().map(|j| Arc::clone(&j.flow));
        let Some(net) = self.net.as_mut() else {
            return Err(Failure::new(
                FailureKind::PeerLost,
                "no connection to the destination",
            ));
        };
        let result = std::thread::scope(|s| {
            let reporter = s.spawn(|| {
                while !finished.load(Ordering::Acquire) {
                    let d = done.load(Ordering::Relaxed);
                    let live = job.as_ref().map(|j| {
                        j.update(|l| l.observe(total_before + d, Instant::now()));
                        j.live()
                    });
                    if let Some(report) = report {
                        let or_unknown = |v: Option<f64>| v.map_or(UNKNOWN, |v| v as u64);
                        report(CliMsg::Progress {
                            phase,
                            round: shown,
                            round_done: base + d,
                            round_total: planned * ferry_engine::PAGE_SIZE,
                            total_done: total_before + d,
                            rate: or_unknown(live.as_ref().and_then(|l| l.rate)),
                            dirty_rate: or_unknown(live.as_ref().and_then(|l| l.dirty_rate)),
                            expected_downtime_ms: live
                                .as_ref()
                                .and_then(|l| l.expected_downtime)
                                .map_or(UNKNOWN, |t| t.as_millis() as u64),
                        });
                    }
                    // Parked, not asleep: the window's end unparks it at once, so the final
                    // round (inside the downtime) does not wait out the interval.
                    std::thread::park_timeout(Duration::from_millis(100));
                }
            });
            // TCP channels book what they just sent against the cap, and wait out the rest.
            let progress = |b: u64| {
                done.fetch_add(b, Ordering::Relaxed);
                if let Some(f) = &flow {
                    f.take(b);
                }
            };
            let r = match w.transport {
                TransportKind::Tcp => TcpPath {
                    sender: &mut net.sender,
                    ctl: &mut net.ctl.stream,
                }
                .send_window(w, &progress),
                TransportKind::Rdma => RdmaPath {
                    channels: w.plan.channels.len(),
                    ctl: &mut net.ctl.stream,
                    pace: flow.as_deref(),
                }
                .send_window(w, &|b| {
                    done.fetch_add(b, Ordering::Relaxed);
                }),
            };
            finished.store(true, Ordering::Release);
            reporter.thread().unpark();
            r
        });
        if let Some(f) = self.mem().and_then(|m| memory_shrank(m)) {
            return Err(f);
        }
        match result {
            Ok(outcome) => {
                if let ferry_engine::transport::WindowOutcome::Unfinished { .. } = outcome {
                    // Deregister guest RAM from the NIC now; TCP carries the rest.
                    if let Some(n) = self.net.as_mut() {
                        n.rdma = None;
                    }
                }
                let moved = match &outcome {
                    ferry_engine::transport::WindowOutcome::Done(s) => s.bytes,
                    ferry_engine::transport::WindowOutcome::Unfinished { confirmed, .. } => {
                        confirmed.bytes
                    }
                };
                self.total.fetch_add(moved, Ordering::Relaxed);
                self.round_bytes.1 += moved;
                self.d
                    .metrics
                    .add_bytes(w.transport == TransportKind::Rdma, moved);
                if let Some(j) = &self.job {
                    let total = self.total.load(Ordering::Relaxed);
                    j.update(|l| {
                        l.observe(total, Instant::now());
                        l.round = shown;
                        l.transport = w.transport.label();
                    });
                }
                self.d.registry.update_outgoing(&self.vm_id, |o| {
                    o.round = shown;
                    o.bytes += moved;
                });
                Ok(SourceEvent::WindowSent(outcome))
            }
            Err(e) => Err(Failure::new(
                match e {
                    TransportError::PeerGone(_) => FailureKind::PeerLost,
                    TransportError::Protocol(_) => FailureKind::PeerRefused,
                    TransportError::Unsupported(_) | TransportError::Failed { .. } => {
                        FailureKind::Transport
                    }
                },
                e.to_string(),
            )),
        }
    }
}
