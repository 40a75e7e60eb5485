//! Fault injection for the end-to-end tests (built only with the `fault-injection`
//! feature; a production build has none of this).
//!
//! - `FERRY_TEST_HOLD=<point>`: stop for `FERRY_TEST_HOLD_MS` (default 30000) at a point
//!   of the migration, after logging `test hook: holding at <point>`, so a test can kill
//!   a process, cut the link or restart a sidecar exactly there. Source points: `round1`
//!   (after round 1's first window), `round2` (after round 2's first window), `paused`
//!   (the VM just paused), `decided` (the commit decision just recorded, `Commit` not
//!   sent), `running` (the destination confirmed it runs the VM; the source not stopped).
//!   Destination points: `accept-sent` (`Accept` written; the source is connecting its
//!   data connections), `loaded` (the VMM loaded the VM, `Ready` not sent) and
//!   `commit-received` (`Commit` recorded, the VMM not told to start).
//! - `FERRY_TEST_DROP_COMMIT=<ms>`: after recording the commit decision, cut the control
//!   link instead of sending `Commit`, then wait `<ms>` before the replay starts.
//! - `FERRY_TEST_FAIL_RDMA_AFTER_BYTES=<n>` (destination): fail RDMA queue pair 0 after
//!   `n` bytes pulled.
//! - `FERRY_TEST_CONTROL_TIMEOUT_MS=<ms>` (source): the wait for the destination's
//!   answers on the control connection, instead of minutes.

use std::time::Duration;

use ferry_engine::session::{DecisionState, SourceCommand, SourceEvent};
use ferry_verbs::RdmaPuller;

use std::net::TcpStream;

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// Stops at `point` if the test asked for it.
pub fn hold(point: &str) {
    if env("FERRY_TEST_HOLD").as_deref() != Some(point) {
        return;
    }
    let ms: u64 = env("FERRY_TEST_HOLD_MS")
        .and_then(|v| v.parse().ok())
        .unwrap_or(30_000);
    tracing::warn!("test hook: holding at {point} for {ms} ms");
    std::thread::sleep(Duration::from_millis(ms));
    tracing::warn!("test hook: released at {point}");
}

/// The hold point a command's answer reaches, if any.
pub fn point_of(cmd: &SourceCommand) -> Option<&'static str> {
    match cmd {
        SourceCommand::SendWindow(w) if !w.final_round && w.round == 1 && w.wire_round == 1 => {
            Some("round1")
        }
        SourceCommand::SendWindow(w) if !w.final_round && w.round == 2 => Some("round2"),
        SourceCommand::Pause => Some("paused"),
        SourceCommand::Record(DecisionState::Committed) => Some("decided"),
        SourceCommand::SendCommit => Some("running"),
        _ => None,
    }
}

/// After a command was carried out: hold, or break the link, as the test asked.
pub fn after(ctl: Option<&TcpStream>, point: Option<&'static str>, ev: &SourceEvent) {
    let Some(point) = point else { return };
    let ok = !matches!(ev, SourceEvent::Failed(_) | SourceEvent::RecordFailed(_));
    if !ok {
        return;
    }
    if point == "round2" && env("FERRY_TEST_HOLD").as_deref() == Some("round2") {
        // Only the first window of round 2.
        static ONCE: std::sync::Once = std::sync::Once::new();
        let mut first = false;
        ONCE.call_once(|| first = true);
        if !first {
            return;
        }
    }
    if point == "decided" {
        if let Some(ms) = env("FERRY_TEST_DROP_COMMIT").and_then(|v| v.parse::<u64>().ok()) {
            tracing::warn!("test fault injection: dropping the link instead of sending Commit");
            if let Some(c) = ctl {
                let _ = c.shutdown(std::net::Shutdown::Both);
            }
            std::thread::sleep(Duration::from_millis(ms));
        }
    }
    hold(point);
}

/// The source's control-connection timeout, shortened if the test asked.
pub fn control_timeout(default: Duration) -> Duration {
    env("FERRY_TEST_CONTROL_TIMEOUT_MS")
        .and_then(|v| v.parse().ok())
        .map_or(default, Duration::from_millis)
}

/// The destination's puller, with a queue pair set to fail if the test asked.
pub fn rdma_puller(mut p: RdmaPuller) -> RdmaPuller {
    if let Some(n) = env("FERRY_TEST_FAIL_RDMA_AFTER_BYTES").and_then(|v| v.parse().ok()) {
        tracing::warn!(after_bytes = n, "test fault injection: RDMA QP 0 will fail");
        p.inject_qp_failure(0, n);
    }
    p
}

/// The destination is about to start a committed VM.
pub fn before_start(vm_id: &str) {
    let _ = vm_id;
    hold("commit-received");
}
