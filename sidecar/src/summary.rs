//! The summary of one migration: what `ferry migrate` prints and `--json` emits, built
//! from the source session's report.

use std::time::Duration;

use ferry_engine::session::{SourceOutcome, SourceSession, TransportKind, VerifyMode};
use ferry_engine::transport::PhaseCpu;
use ferry_proto::cli::MigrateRequest;
use serde::{Deserialize, Serialize};

use crate::offer::Negotiated;

/// How a destination VMM's start line (`IncomingVm::start`) begins when the VMM checked
/// that the guest continued from the source's paused state.
pub const GUEST_CONTINUED_MARKER: &str = "guest_continued=true";

/// One round's numbers.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RoundSummary {
    /// Round number (the last one ran with the VM paused).
    pub round: u32,
    /// Whether the VM was paused.
    pub final_round: bool,
    /// Pages in the round's dirty set.
    pub dirty_pages: u64,
    /// Payload bytes moved.
    pub bytes: u64,
    /// Zero pages sent as markers.
    pub zero_pages: u64,
    /// Pages re-sent because the guest wrote them mid-send.
    pub torn_pages: u64,
    /// Wall time of the round.
    pub ms: f64,
    /// Dirty-log reads between the round's windows.
    #[serde(default)]
    pub log_reads: u32,
    /// Time spent waiting for those reads (asking the VMM to answering).
    #[serde(default)]
    pub log_read_ms: f64,
    /// Windows sent per log read when the round ended (more when reads are slow against
    /// sending).
    #[serde(default)]
    pub log_batch: u32,
}

/// Where the downtime went (source view: from the pause request to `Running`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DowntimeBreakdown {
    /// Pausing the VM's vCPUs and writers.
    pub pause_ms: f64,
    /// Final dirty set: read, copy, confirm.
    pub final_copy_ms: f64,
    /// State blob saved and sent.
    pub state_ms: f64,
    /// Destination load + both digests compared (strict verification).
    pub verify_ms: f64,
    /// Fence, decision recorded, Commit to the destination VM running.
    pub restore_ms: f64,
}

/// CPU seconds per GiB of payload moved, by phase, on each side: the TCP data threads'
/// CPU time (hashing estimated from a sample of the pages); zero for what RDMA moved,
/// where no thread of Ferry's moves data.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct CpuPerGib {
    /// Source: sending, all of it.
    pub source_data: f64,
    /// Source: of which hashing pages.
    pub source_hash: f64,
    /// Destination: receiving, all of it.
    pub dest_data: f64,
    /// Destination: of which hashing pages.
    pub dest_hash: f64,
    /// Destination: of which filling fresh memory.
    pub dest_populate: f64,
}

/// The result of `ferry migrate`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Summary {
    /// "committed", "aborted", "cancelled", "committed-unconfirmed", "digest-mismatch",
    /// "start-failed".
    pub result: String,
    /// Its priority in the queue.
    #[serde(default)]
    pub priority: String,
    /// Time it waited in the queue (this host's slots, or a busy destination).
    #[serde(default)]
    pub queued_ms: f64,
    /// Its own bandwidth cap at the end, MiB/s (0: none).
    #[serde(default)]
    pub max_bandwidth_mibps: u64,
    /// The VM moved.
    pub vm_id: String,
    /// Destination address.
    pub destination: String,
    /// The migration's id (names it in both daemons' logs and records).
    #[serde(default)]
    pub session: String,
    /// "tcp", "rdma", or "rdma+tcp" (RDMA failed and TCP carried the rest).
    pub transport: String,
    /// Why this transport.
    pub transport_reason: String,
    /// Whether every byte on the wire was encrypted (TLS); false in `--insecure-psk` mode
    /// and whenever RDMA carried pages.
    #[serde(default)]
    pub encrypted: bool,
    /// Data channels.
    pub channels: u16,
    /// Rounds run, final included.
    pub rounds: u32,
    /// Guest RAM size.
    pub ram_bytes: u64,
    /// Payload bytes moved over all rounds.
    pub bytes_transferred: u64,
    /// Zero pages skipped over all rounds: sent as markers, or left out of round 1 as
    /// holes of the source's memfds (`hole_pages_skipped`).
    pub zero_pages_skipped: u64,
    /// Of those, pages round 1 left out because they were holes of the source's memfds
    /// (known zero without a read; the destination's fresh memory holds zeros there).
    #[serde(default)]
    pub hole_pages_skipped: u64,
    /// Wall time, start to end.
    pub total_ms: f64,
    /// Time the guest did not run.
    pub downtime_ms: f64,
    /// Its breakdown.
    pub downtime_breakdown: DowntimeBreakdown,
    /// Payload throughput over the data-moving time.
    pub throughput_gbps: f64,
    /// Destination memory preparation (create + populate).
    pub prepare_ms: f64,
    /// Where the source's data threads ran, and why (`docs/operations.md`, placement).
    #[serde(default)]
    pub placement: String,
    /// CPU per GiB moved, by phase and side.
    #[serde(default)]
    pub cpu_s_per_gib: CpuPerGib,
    /// Whether the destination's memory digest equals the source's.
    pub digest_match: bool,
    /// "strict" or "after-resume".
    pub verify_mode: String,
    /// Time the after-resume comparison took (outside the downtime).
    pub verify_after_resume_ms: f64,
    /// Why pre-copy stopped.
    pub stop_reason: String,
    /// What the destination VMM checked and reported.
    pub guest_detail: String,
    /// Whether the destination VMM confirmed that the guest continued from the state it
    /// was paused in: its start line begins with [`GUEST_CONTINUED_MARKER`].
    pub guest_continued: bool,
    /// Post-copy (`--postcopy`): the VM ran at the destination before its memory was
    /// there; [`Summary::postcopy_pull_ms`] says how long it depended on both hosts.
    #[serde(default)]
    pub postcopy: bool,
    /// Post-copy: from the destination running the VM to its last page pulled.
    #[serde(default)]
    pub postcopy_pull_ms: f64,
    /// Why the migration failed, and what the operator must do (empty when committed).
    pub error: String,
    /// Per round.
    pub per_round: Vec<RoundSummary>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl Summary {
    /// An aborted summary of `req`, filled in as the migration goes.
    pub fn new(req: &MigrateRequest, encrypted: bool) -> Self {
        Self {
            result: SourceOutcome::Aborted.name().into(),
            vm_id: req.vm_id.clone(),
            destination: req.to.clone(),
            channels: req.channels,
            verify_mode: req.verify.name().into(),
            encrypted,
            priority: req.priority.name().into(),
            max_bandwidth_mibps: u64::from(req.max_bandwidth_mibps),
            ..Self::default()
        }
    }

    /// Fills in what the session measured and decided.
    pub fn fill(
        &mut self,
        s: &SourceSession,
        outcome: &SourceOutcome,
        net: Option<&Negotiated>,
        elapsed: Duration,
    ) {
        let r = s.report();
        self.result = if r.cancelled && *outcome == SourceOutcome::Aborted {
            "cancelled".into()
        } else {
            outcome.name().into()
        };
        if let Some(n) = net {
            self.transport_reason = n.reason.clone();
            self.prepare_ms = n.prepare_us as f64 / 1e3;
            self.placement = n.placement.clone();
        }
        self.transport = if r.transports.is_empty() {
            "tcp".into()
        } else {
            r.transports
                .iter()
                .map(|t| t.name())
                .collect::<Vec<_>>()
                .join("+")
        };
        if r.transports.contains(&TransportKind::Rdma) {
            self.encrypted = false;
        }
        if let Some(f) = &r.fallback {
            self.transport_reason = format!("{}; {f}", self.transport_reason);
        }
        self.per_round = r
            .rounds
            .iter()
            .map(|x| RoundSummary {
                round: x.round,
                final_round: x.final_round,
                dirty_pages: x.stats.pages,
                bytes: x.stats.bytes,
                zero_pages: x.stats.zero_pages,
                torn_pages: x.stats.torn.len() as u64,
                ms: ms(x.elapsed),
                log_reads: x.log_reads,
                log_read_ms: ms(x.log_wait),
                log_batch: x.log_batch,
            })
            .collect();
        self.rounds = self.per_round.len() as u32;
        self.bytes_transferred = r.bytes();
        self.hole_pages_skipped = r.zero_skipped;
        self.zero_pages_skipped =
            r.zero_skipped + self.per_round.iter().map(|x| x.zero_pages).sum::<u64>();
        let (mut mine, mut peer) = (PhaseCpu::default(), PhaseCpu::default());
        for x in &r.rounds {
            mine.add(x.stats.cpu);
            peer.add(x.stats.peer_cpu);
        }
        if self.bytes_transferred > 0 {
            let per =
                |ns: u64| ns as f64 / 1e9 / (self.bytes_transferred as f64 / f64::from(1u32 << 30));
            self.cpu_s_per_gib = CpuPerGib {
                source_data: per(mine.data_ns),
                source_hash: per(mine.hash_ns),
                dest_data: per(peer.data_ns),
                dest_hash: per(peer.hash_ns),
                dest_populate: per(peer.populate_ns),
            };
        }
        let data_ms: f64 = self.per_round.iter().map(|x| x.ms).sum();
        if data_ms > 0.0 {
            self.throughput_gbps = self.bytes_transferred as f64 * 8.0 / (data_ms / 1e3) / 1e9;
        }
        self.stop_reason = r.stop_reason.map(|x| x.to_string()).unwrap_or_default();
        self.digest_match = r.digest_match.unwrap_or(false);
        self.verify_after_resume_ms = r.verified_after_resume.map_or(0.0, ms);
        if let Some(d) = r.downtime {
            let b = &mut self.downtime_breakdown;
            b.pause_ms = ms(d.pause_took);
            b.final_copy_ms = ms(d.final_done.saturating_sub(d.paused));
            b.state_ms = ms(d.state_sent.saturating_sub(d.final_done));
            if let Some(running) = d.running {
                b.verify_ms = ms(d.verified.saturating_sub(d.state_sent));
                b.restore_ms = ms(running.saturating_sub(d.verified));
                self.downtime_ms = ms(running.saturating_sub(d.pause_asked));
            } else if !matches!(outcome, SourceOutcome::Aborted) {
                // Still paused (unconfirmed, failed start, mismatch): paused so far.
                self.downtime_ms = ms(elapsed.saturating_sub(d.pause_asked));
            }
        }
        if let Some(detail) = &r.peer_detail {
            self.guest_continued = detail.starts_with(GUEST_CONTINUED_MARKER);
            self.guest_detail = detail.clone();
        }
        let mut error = r.error.clone().unwrap_or_default();
        match outcome {
            SourceOutcome::Committed if r.replayed => {
                error = "the link failed after the commit decision; the recorded Commit was replayed and confirmed".into();
            }
            SourceOutcome::CommittedUnconfirmed if r.error.is_some() => error.push_str(&format!(
                "; run `ferry recover {}` when the destination is reachable",
                self.vm_id
            )),
            SourceOutcome::StartFailed(_) => error.push_str(&format!(
                "; fix the destination and run `ferry recover {vm}` to start it there, or `ferry recover {vm} --abort` to discard it there and resume it here",
                vm = self.vm_id
            )),
            _ => {}
        }
        for w in &r.warnings {
            if r.replayed && w.starts_with("the link failed after the commit decision") {
                continue; // said above
            }
            if !error.is_empty() {
                error.push_str("; ");
            }
            error.push_str(w);
        }
        if *outcome == SourceOutcome::Committed && !r.replayed && r.warnings.is_empty() {
            error.clear();
        }
        self.error = error;
        self.total_ms = ms(elapsed);
        if self.verify_mode.is_empty() {
            self.verify_mode = VerifyMode::default().name().into();
        }
    }

    /// Human-readable lines.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let mut line = |k: &str, v: String| s.push_str(&format!("{k:>20}: {v}\n"));
        line("result", self.result.clone());
        line("vm", format!("{} -> {}", self.vm_id, self.destination));
        line(
            "transport",
            format!(
                "{} x{} ({}){}",
                self.transport,
                self.channels,
                self.transport_reason,
                if self.encrypted {
                    ", encrypted"
                } else {
                    ", NOT encrypted"
                }
            ),
        );
        line("ram", format!("{} MiB", self.ram_bytes >> 20));
        line("rounds", self.rounds.to_string());
        line(
            "bytes_transferred",
            format!(
                "{} ({} MiB)",
                self.bytes_transferred,
                self.bytes_transferred >> 20
            ),
        );
        line(
            "zero_pages_skipped",
            format!(
                "{} ({} holes left out of round 1)",
                self.zero_pages_skipped, self.hole_pages_skipped
            ),
        );
        line("total_ms", format!("{:.1}", self.total_ms));
        line("downtime_ms", format!("{:.1}", self.downtime_ms));
        if self.postcopy {
            line(
                "post-copy pull",
                format!(
                    "{:.1} ms (until it ended the VM depended on both hosts)",
                    self.postcopy_pull_ms
                ),
            );
        }
        let b = &self.downtime_breakdown;
        line(
            "  downtime parts",
            format!(
                "pause {:.1} + final copy {:.1} + state {:.1} + verify {:.1} + restore {:.1} ms",
                b.pause_ms, b.final_copy_ms, b.state_ms, b.verify_ms, b.restore_ms
            ),
        );
        line("throughput_gbps", format!("{:.2}", self.throughput_gbps));
        line("prepare_ms", format!("{:.1}", self.prepare_ms));
        let c = &self.cpu_s_per_gib;
        if c.source_data > 0.0 || c.dest_data > 0.0 {
            line(
                "cpu s/GiB",
                format!(
                    "source {:.2} (hash {:.2}), destination {:.2} (hash {:.2}, fill {:.2})",
                    c.source_data, c.source_hash, c.dest_data, c.dest_hash, c.dest_populate
                ),
            );
        }
        if !self.placement.is_empty() {
            line("placement", self.placement.clone());
        }
        line("digest_match", self.digest_match.to_string());
        line("verify_mode", self.verify_mode.clone());
        if self.verify_mode == VerifyMode::AfterResume.name() {
            line(
                "verified after resume",
                format!(
                    "{:.1} ms (source VM kept until then)",
                    self.verify_after_resume_ms
                ),
            );
        }
        line("stop_reason", self.stop_reason.clone());
        line("guest_continued", self.guest_continued.to_string());
        if !self.guest_detail.is_empty() {
            line("guest", self.guest_detail.clone());
        }
        if !self.error.is_empty() {
            line("error", self.error.clone());
        }
        for r in &self.per_round {
            line(
                &format!(
                    "round {}{}",
                    r.round,
                    if r.final_round { " (final)" } else { "" }
                ),
                format!(
                    "{} dirty pages, {} MiB, {} zero, {} torn, {:.1} ms, {} log reads in {:.1} ms (windows per read {})",
                    r.dirty_pages,
                    r.bytes >> 20,
                    r.zero_pages,
                    r.torn_pages,
                    r.ms,
                    r.log_reads,
                    r.log_read_ms,
                    r.log_batch
                ),
            );
        }
        s
    }
}
