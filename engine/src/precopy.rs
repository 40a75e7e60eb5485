//! Pre-copy rounds and the convergence decision.
//!
//! The controller never reads a clock: the caller passes `now` (time since the migration
//! started) and the numbers of each finished round, and gets a [`Step`] back. Every
//! decision carries the numbers it was made on, so the caller can log them.

use std::time::Duration;

/// What to do when the round limit or the timeout is reached before convergence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimitAction {
    /// Give up: the source VM keeps running where it is.
    Abort,
    /// Pause anyway and copy what is left, accepting a longer downtime.
    ForceStopAndCopy,
}

/// How long pre-copy may go on and when it may stop.
///
/// Switch-over happens when the bytes still dirty fit `downtime_budget` at the bandwidth
/// measured in the last round (QEMU's rule: threshold = bandwidth x budget).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvergencePolicy {
    /// Longest pause the guest may see for the final copy.
    pub downtime_budget: Duration,
    /// Most pre-copy rounds, the first full round included.
    pub max_rounds: u32,
    /// Longest time pre-copy may take from the start of the migration.
    pub timeout: Duration,
    /// What happens at the round limit or the timeout.
    pub on_limit: LimitAction,
}

impl Default for ConvergencePolicy {
    /// 300 ms budget (QEMU's default), 30 rounds, 10 minutes, then force.
    fn default() -> Self {
        Self {
            downtime_budget: Duration::from_millis(300),
            max_rounds: 30,
            timeout: Duration::from_secs(600),
            on_limit: LimitAction::ForceStopAndCopy,
        }
    }
}

/// Numbers of one finished round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RoundRecord {
    /// 1-based round number.
    pub round: u32,
    /// Pages the round named (dirty set size, zero pages included).
    pub pages: u64,
    /// Payload bytes that crossed the link.
    pub bytes: u64,
    /// Pages found all-zero and sent as a range marker.
    pub zero_pages: u64,
    /// Time from the round's start to the destination confirming it.
    pub elapsed: Duration,
}

impl RoundRecord {
    /// Bytes per second of this round; `None` when it moved too little to measure.
    pub fn bandwidth(&self) -> Option<f64> {
        let s = self.elapsed.as_secs_f64();
        (self.bytes > 0 && s > 0.0).then(|| self.bytes as f64 / s)
    }
}

/// Why pre-copy ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The dirty bytes fit the budget at the measured bandwidth.
    Converged {
        /// Bytes still dirty.
        dirty_bytes: u64,
        /// Bytes the budget allows at the measured bandwidth.
        threshold_bytes: u64,
    },
    /// The round limit was reached.
    RoundLimit {
        /// Rounds done.
        rounds: u32,
        /// Bytes still dirty.
        dirty_bytes: u64,
    },
    /// The pre-copy timeout was reached.
    Timeout {
        /// Time spent.
        elapsed: Duration,
        /// Bytes still dirty.
        dirty_bytes: u64,
    },
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StopReason::Converged {
                dirty_bytes,
                threshold_bytes,
            } => write!(
                f,
                "converged: {dirty_bytes} dirty bytes <= threshold {threshold_bytes}"
            ),
            StopReason::RoundLimit {
                rounds,
                dirty_bytes,
            } => write!(
                f,
                "round limit {rounds} reached with {dirty_bytes} dirty bytes"
            ),
            StopReason::Timeout {
                elapsed,
                dirty_bytes,
            } => write!(
                f,
                "timeout after {} ms with {dirty_bytes} dirty bytes",
                elapsed.as_millis()
            ),
        }
    }
}

/// The controller's answer after each round.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Step {
    /// Run another pre-copy round over the dirty set just read.
    Precopy {
        /// Number of the round to run.
        round: u32,
        /// Bytes the budget allows now; shown in logs.
        threshold_bytes: u64,
    },
    /// Pause the VM and copy the rest.
    StopAndCopy(StopReason),
    /// Give up; the source VM keeps running.
    Abort(StopReason),
}

/// Decides, round by round, whether pre-copy goes on.
#[derive(Clone, Debug)]
pub struct PrecopyController {
    policy: ConvergencePolicy,
    rounds: Vec<RoundRecord>,
    /// The bandwidth cap in force (bytes per second), if any.
    rate_cap: Option<u64>,
}

impl PrecopyController {
    /// A controller for one migration.
    pub fn new(policy: ConvergencePolicy) -> Self {
        Self {
            policy,
            rounds: Vec::new(),
            rate_cap: None,
        }
    }

    /// Sets the bandwidth cap in force (bytes per second; `None`: no cap). The final round
    /// is copied under the same cap, so convergence is judged at the capped rate.
    pub fn set_rate_cap(&mut self, cap: Option<u64>) {
        self.rate_cap = cap.filter(|&c| c > 0);
    }

    /// The policy in force.
    pub fn policy(&self) -> &ConvergencePolicy {
        &self.policy
    }

    /// Rounds finished so far.
    pub fn rounds(&self) -> &[RoundRecord] {
        &self.rounds
    }

    /// Records a finished round.
    pub fn round_finished(&mut self, record: RoundRecord) {
        self.rounds.push(record);
    }

    /// Bandwidth of the last round that moved enough to measure, in bytes per second, and
    /// never above the cap in force (a round measured before the cap was lowered, or one
    /// that ran faster than the cap, does not count for more).
    pub fn bandwidth(&self) -> Option<f64> {
        let measured = self.rounds.iter().rev().find_map(RoundRecord::bandwidth);
        match (measured, self.rate_cap) {
            (Some(m), Some(c)) => Some(m.min(c as f64)),
            (m, _) => m,
        }
    }

    /// Bytes that can be copied within the downtime budget at the last measured bandwidth.
    pub fn threshold_bytes(&self) -> u64 {
        let bw = self.bandwidth().unwrap_or(0.0);
        (bw * self.policy.downtime_budget.as_secs_f64()) as u64
    }

    /// Decides what follows, given the dirty set just read (`dirty_bytes`) at time `now`
    /// since the migration started.
    pub fn next_step(&self, now: Duration, dirty_bytes: u64) -> Step {
        let threshold_bytes = self.threshold_bytes();
        let done = self.rounds.len() as u32;
        if dirty_bytes == 0 || (done > 0 && dirty_bytes <= threshold_bytes) {
            return Step::StopAndCopy(StopReason::Converged {
                dirty_bytes,
                threshold_bytes,
            });
        }
        let limit = if done >= self.policy.max_rounds {
            Some(StopReason::RoundLimit {
                rounds: done,
                dirty_bytes,
            })
        } else if now >= self.policy.timeout {
            Some(StopReason::Timeout {
                elapsed: now,
                dirty_bytes,
            })
        } else {
            None
        };
        match (limit, self.policy.on_limit) {
            (Some(reason), LimitAction::Abort) => Step::Abort(reason),
            (Some(reason), LimitAction::ForceStopAndCopy) => Step::StopAndCopy(reason),
            (None, _) => Step::Precopy {
                round: done + 1,
                threshold_bytes,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(round: u32, bytes: u64, ms: u64) -> RoundRecord {
        RoundRecord {
            round,
            pages: bytes / 4096,
            bytes,
            zero_pages: 0,
            elapsed: Duration::from_millis(ms),
        }
    }

    #[test]
    fn converges_when_dirty_fits_budget_at_measured_bandwidth() {
        let mut c = PrecopyController::new(ConvergencePolicy {
            downtime_budget: Duration::from_millis(100),
            ..Default::default()
        });
        // 1 GB in 1 s: 1 GB/s, so the budget allows 100 MB.
        c.round_finished(rec(1, 1_000_000_000, 1000));
        assert_eq!(c.threshold_bytes(), 100_000_000);
        assert!(matches!(
            c.next_step(Duration::from_secs(1), 99_000_000),
            Step::StopAndCopy(StopReason::Converged { .. })
        ));
        assert_eq!(
            c.next_step(Duration::from_secs(1), 101_000_000),
            Step::Precopy {
                round: 2,
                threshold_bytes: 100_000_000
            }
        );
    }

    #[test]
    fn round_limit_aborts_or_forces_as_configured() {
        for (action, forced) in [
            (LimitAction::Abort, false),
            (LimitAction::ForceStopAndCopy, true),
        ] {
            let mut c = PrecopyController::new(ConvergencePolicy {
                downtime_budget: Duration::from_millis(1),
                max_rounds: 2,
                timeout: Duration::from_secs(100),
                on_limit: action,
            });
            c.round_finished(rec(1, 1 << 30, 1000));
            c.round_finished(rec(2, 1 << 30, 1000));
            let step = c.next_step(Duration::from_secs(2), 1 << 30);
            match step {
                Step::StopAndCopy(StopReason::RoundLimit { rounds: 2, .. }) => assert!(forced),
                Step::Abort(StopReason::RoundLimit { rounds: 2, .. }) => assert!(!forced),
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn timeout_applies_before_round_limit() {
        let mut c = PrecopyController::new(ConvergencePolicy {
            downtime_budget: Duration::from_millis(1),
            max_rounds: 100,
            timeout: Duration::from_secs(5),
            on_limit: LimitAction::Abort,
        });
        c.round_finished(rec(1, 1 << 30, 1000));
        assert!(matches!(
            c.next_step(Duration::from_secs(6), 1 << 30),
            Step::Abort(StopReason::Timeout { .. })
        ));
    }

    #[test]
    fn nothing_dirty_converges_immediately() {
        let c = PrecopyController::new(ConvergencePolicy::default());
        assert!(matches!(
            c.next_step(Duration::ZERO, 0),
            Step::StopAndCopy(StopReason::Converged { dirty_bytes: 0, .. })
        ));
    }

    #[test]
    fn a_bandwidth_cap_lowers_the_threshold_convergence_is_judged_by() {
        let policy = ConvergencePolicy::default(); // 300 ms budget
        let mut c = PrecopyController::new(policy);
        // 1 GiB in 1 s measured: 300 ms allow ~322 MB.
        c.round_finished(rec(1, 1 << 30, 1000));
        let dirty = 50 << 20;
        assert!(matches!(
            c.next_step(Duration::from_secs(1), dirty),
            Step::StopAndCopy(_)
        ));
        // Capped at 100 MiB/s, 300 ms allow 30 MiB: 50 MiB dirty needs another round.
        c.set_rate_cap(Some(100 << 20));
        assert_eq!(c.threshold_bytes(), (100u64 << 20) * 3 / 10);
        assert!(matches!(
            c.next_step(Duration::from_secs(1), dirty),
            Step::Precopy { round: 2, .. }
        ));
        // A cap above the measured rate changes nothing; lifting it restores the rate.
        c.set_rate_cap(Some(10 << 30));
        assert_eq!(c.bandwidth(), Some((1u64 << 30) as f64));
        c.set_rate_cap(None);
        assert_eq!(c.bandwidth(), Some((1u64 << 30) as f64));
    }

    #[test]
    fn bandwidth_ignores_rounds_too_small_to_measure() {
        let mut c = PrecopyController::new(ConvergencePolicy::default());
        c.round_finished(rec(1, 1 << 30, 1000));
        c.round_finished(rec(2, 0, 0));
        assert_eq!(c.bandwidth(), Some((1u64 << 30) as f64));
    }
}
