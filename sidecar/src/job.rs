//! One requested outgoing migration ([`Job`]) as the queue, its driver, `ferry cancel`
//! and status share it: its state, the operator's cancel and the driver's answer, its
//! bandwidth flow, and its live numbers.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use ferry_proto::cli::Priority;

use crate::bandwidth::Flow;

/// How long a waiting job takes to move up one priority.
pub const AGING: Duration = Duration::from_secs(60);

/// What a job's numbers are now, for status and progress.
#[derive(Clone, Debug, Default)]
pub struct Live {
    /// The session's phase ("queued" while waiting).
    pub phase: &'static str,
    /// Round in progress.
    pub round: u32,
    /// Payload bytes moved.
    pub bytes: u64,
    /// Bytes per second over the last second.
    pub rate: Option<f64>,
    /// How fast the guest dirties memory, bytes per second.
    pub dirty_rate: Option<f64>,
    /// The final copy's expected length at the rate in force.
    pub expected_downtime: Option<Duration>,
    /// Why it waits, when it waits for something other than its turn.
    pub note: String,
    /// Transport in use.
    pub transport: &'static str,
    /// Where the rate was last measured from: when, and the bytes then.
    mark: Option<(Instant, u64)>,
}

impl Live {
    /// Payload bytes moved so far, seen at `now`: the rate is measured over a second or
    /// more, across windows and rounds.
    pub fn observe(&mut self, bytes: u64, now: Instant) {
        self.bytes = bytes;
        match self.mark {
            None => self.mark = Some((now, bytes)),
            Some((t, b)) if now.saturating_duration_since(t) >= Duration::from_secs(1) => {
                let dt = now.saturating_duration_since(t).as_secs_f64();
                self.rate = Some(bytes.saturating_sub(b) as f64 / dt);
                self.mark = Some((now, bytes));
            }
            Some(_) => {}
        }
    }
}

/// The operator's cancel, as the job's driver sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
enum Cancel {
    #[default]
    None,
    /// Asked; the driver answers at its next step.
    Requested,
    /// Answered: `Ok` with what happened, or why it was refused.
    Answered(Result<String, String>),
}

/// One requested outgoing migration, from the request to its end.
#[derive(Debug)]
pub struct Job {
    /// The VM.
    pub vm_id: String,
    /// The destination.
    pub to: String,
    /// Its priority as asked.
    pub priority: Priority,
    /// Its bandwidth (own cap; shares the host's while it runs).
    pub flow: Arc<Flow>,
    pub(crate) seq: u64,
    pub(crate) enqueued: Instant,
    pub(crate) state: Mutex<JobState>,
    cancel: Mutex<Cancel>,
    answered: Condvar,
    /// Live numbers.
    pub live: Mutex<Live>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum JobState {
    Waiting { retry_at: Option<Instant> },
    Running,
}

impl Job {
    /// A waiting job, `seq`-th to arrive.
    pub fn new(vm_id: &str, to: &str, priority: Priority, own_cap: u64, seq: u64) -> Self {
        Self {
            vm_id: vm_id.to_owned(),
            to: to.to_owned(),
            priority,
            flow: Flow::new(own_cap),
            seq,
            enqueued: Instant::now(),
            state: Mutex::new(JobState::Waiting { retry_at: None }),
            cancel: Mutex::new(Cancel::None),
            answered: Condvar::new(),
            live: Mutex::new(Live {
                phase: "queued",
                ..Live::default()
            }),
        }
    }

    pub(crate) fn state(&self) -> JobState {
        *self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn set_state(&self, s: JobState) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = s;
    }

    /// Updates the live numbers.
    pub fn update(&self, f: impl FnOnce(&mut Live)) {
        f(&mut self.live.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// A copy of the live numbers.
    pub fn live(&self) -> Live {
        self.live.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Its priority now: one better per [`AGING`] waited.
    pub(crate) fn rank(&self, now: Instant) -> (u8, u64) {
        let aged =
            (now.saturating_duration_since(self.enqueued).as_secs() / AGING.as_secs()).min(2) as u8;
        ((self.priority as u8).saturating_sub(aged).max(1), self.seq)
    }

    /// Whether the operator asked to cancel and nobody answered yet; the driver calls
    /// this between steps and answers with [`Job::answer_cancel`].
    pub fn cancel_requested(&self) -> bool {
        *self.cancel.lock().unwrap_or_else(|p| p.into_inner()) == Cancel::Requested
    }

    /// The driver's answer to a cancel.
    pub fn answer_cancel(&self, r: Result<String, String>) {
        let mut c = self.cancel.lock().unwrap_or_else(|p| p.into_inner());
        if *c == Cancel::Requested {
            *c = Cancel::Answered(r);
            self.answered.notify_all();
        }
    }

    /// Asks to cancel a running job and waits up to `limit` for its driver's answer.
    ///
    /// # Errors
    ///
    /// Refused (the decision is taken), or no answer in time.
    pub fn cancel_running(&self, limit: Duration) -> Result<String, String> {
        let mut c = self.cancel.lock().unwrap_or_else(|p| p.into_inner());
        if *c == Cancel::None {
            *c = Cancel::Requested;
        }
        let end = Instant::now() + limit;
        loop {
            if let Cancel::Answered(r) = &*c {
                return r.clone();
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "the migration did not answer within {} s; it is asked to stop at its next step",
                    limit.as_secs()
                ));
            }
            c = self
                .answered
                .wait_timeout(c, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}
