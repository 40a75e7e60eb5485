//! The summary of one migration: what `ferry migrate` prints and `--json` emits.

use serde::{Deserialize, Serialize};

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
    /// Commit to the destination VM running.
    pub restore_ms: f64,
}

/// The result of `ferry migrate`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Summary {
    /// "committed" or "aborted".
    pub result: String,
    /// The VM moved.
    pub vm_id: String,
    /// Destination address.
    pub destination: String,
    /// "tcp" or "rdma".
    pub transport: String,
    /// Why this transport.
    pub transport_reason: String,
    /// Data channels.
    pub channels: u16,
    /// Rounds run, final included.
    pub rounds: u32,
    /// Guest RAM size.
    pub ram_bytes: u64,
    /// Payload bytes moved over all rounds.
    pub bytes_transferred: u64,
    /// Zero pages skipped (sent as markers) over all rounds.
    pub zero_pages_skipped: u64,
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
    /// Whether the destination's memory digest equals the source's.
    pub digest_match: bool,
    /// "strict": digests compared before the destination resumed (inside the
    /// downtime); "after-resume": compared once it ran, with the source VM kept until then.
    pub verify_mode: String,
    /// Time the after-resume comparison took (outside the downtime).
    pub verify_after_resume_ms: f64,
    /// Why pre-copy stopped.
    pub stop_reason: String,
    /// What the destination VMM checked and reported.
    pub guest_detail: String,
    /// Whether the destination VMM confirmed that the guest continued from the state it
    /// was paused in: its start line begins with [`GUEST_CONTINUED_MARKER`]. The sidecar
    /// cannot see inside the guest; a VMM that checks nothing leaves this false.
    pub guest_continued: bool,
    /// Why the migration aborted (empty when committed).
    pub error: String,
    /// Per round.
    pub per_round: Vec<RoundSummary>,
}

impl Summary {
    /// Human-readable lines.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let mut line = |k: &str, v: String| s.push_str(&format!("{k:>20}: {v}\n"));
        line("result", self.result.clone());
        line("vm", format!("{} -> {}", self.vm_id, self.destination));
        line(
            "transport",
            format!(
                "{} x{} ({})",
                self.transport, self.channels, self.transport_reason
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
        line("zero_pages_skipped", self.zero_pages_skipped.to_string());
        line("total_ms", format!("{:.1}", self.total_ms));
        line("downtime_ms", format!("{:.1}", self.downtime_ms));
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
        line("digest_match", self.digest_match.to_string());
        line("verify_mode", self.verify_mode.clone());
        if self.verify_mode == "after-resume" {
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
                    "{} dirty pages, {} MiB, {} zero, {} torn, {:.1} ms",
                    r.dirty_pages,
                    r.bytes >> 20,
                    r.zero_pages,
                    r.torn_pages,
                    r.ms
                ),
            );
        }
        s
    }
}
