//! The outgoing queue: every `ferry migrate` (and each VM of `ferry drain`) is a [`Job`]
//! that waits here until this host has a free outgoing slot (`max_outgoing`) and it is
//! first in line; a destination that answers `Busy` sends it back to wait (its place
//! kept) and it is offered again after [`BUSY_RETRY`]. The effective limit between two
//! hosts is therefore the smaller of the source's `max_outgoing` and the destination's
//! `max_incoming`.
//!
//! Order: priority (high, normal, low), then arrival. A job moves up one priority for
//! every [`AGING`](crate::job::AGING) it waits, so a low-priority migration waits at most two of those
//! before it is first among everything that arrived after it: nothing starves.
//!
//! The queue also keeps the last [`RECENT`] finished migrations for `ferry status`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use ferry_proto::cli::Priority;

pub use crate::job::Job;
use crate::job::JobState;

/// How long a job whose destination was busy waits before it is offered again.
pub const BUSY_RETRY: Duration = Duration::from_secs(1);
/// Finished migrations kept for status.
pub const RECENT: usize = 64;

/// A slot among a capped number (connections, incoming migrations); released on drop.
pub struct Slot(Arc<AtomicUsize>);

impl Slot {
    /// Takes one of `max` slots counted by `count`, if one is free.
    pub fn take(count: &Arc<AtomicUsize>, max: usize) -> Option<Slot> {
        let n = count.fetch_add(1, Ordering::AcqRel);
        if n >= max {
            count.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Slot(Arc::clone(count)))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A finished migration, for status.
#[derive(Clone, Debug)]
pub struct Finished {
    /// The VM.
    pub vm_id: String,
    /// "outgoing" or "incoming".
    pub direction: &'static str,
    /// The peer (destination or source).
    pub peer: String,
    /// committed, aborted, cancelled, ...
    pub state: String,
    /// Its priority (outgoing).
    pub priority: Option<Priority>,
    /// Rounds run.
    pub rounds: u32,
    /// Payload bytes moved.
    pub bytes: u64,
    /// Downtime in ms (committed ones).
    pub downtime_ms: Option<f64>,
    /// Whole migration, ms.
    pub total_ms: f64,
    /// When it ended.
    pub ended_at: SystemTime,
    /// Why it failed.
    pub error: String,
}

#[derive(Default)]
struct Inner {
    max: usize,
    running: usize,
    next_seq: u64,
    jobs: Vec<Arc<Job>>,
    recent: VecDeque<Finished>,
    closed: Option<String>,
}

/// The queue. See the module documentation.
#[derive(Default)]
pub struct Scheduler {
    inner: Mutex<Inner>,
    changed: Condvar,
}

/// A running job's outgoing slot; released (and the next job woken) on drop.
pub struct Turn<'a> {
    q: &'a Scheduler,
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let mut g = self.q.lock();
        g.running = g.running.saturating_sub(1);
        drop(g);
        self.q.changed.notify_all();
    }
}

impl Scheduler {
    /// A queue running at most `max_outgoing` migrations at once.
    pub fn new(max_outgoing: usize) -> Self {
        Self {
            inner: Mutex::new(Inner {
                max: max_outgoing.max(1),
                ..Inner::default()
            }),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a migration of `vm_id`.
    ///
    /// # Errors
    ///
    /// One of that VM is already queued or running, or the daemon is shutting down.
    pub fn submit(
        &self,
        vm_id: &str,
        to: &str,
        priority: Priority,
        own_cap: u64,
    ) -> Result<Arc<Job>, String> {
        let mut g = self.lock();
        if let Some(why) = &g.closed {
            return Err(why.clone());
        }
        if let Some(j) = g.jobs.iter().find(|j| j.vm_id == vm_id) {
            return Err(format!(
                "a migration of {vm_id} to {} is already {}",
                j.to,
                if j.state() == JobState::Running {
                    "running"
                } else {
                    "queued"
                }
            ));
        }
        g.next_seq += 1;
        let job = Arc::new(Job::new(vm_id, to, priority, own_cap, g.next_seq));
        g.jobs.push(Arc::clone(&job));
        drop(g);
        self.changed.notify_all();
        Ok(job)
    }

    /// 1-based place of a waiting job among those waiting (0 once it runs).
    #[cfg(test)]
    pub fn position(&self, job: &Job) -> usize {
        let g = self.lock();
        Self::position_in(&g, job, Instant::now())
    }

    fn position_in(g: &Inner, job: &Job, now: Instant) -> usize {
        if job.state() == JobState::Running {
            return 0;
        }
        let mine = job.rank(now);
        1 + g
            .jobs
            .iter()
            .filter(|j| matches!(j.state(), JobState::Waiting { .. }) && j.rank(now) < mine)
            .count()
    }

    /// Waits until `job` may run: a free slot, and no waiting job that may be offered now
    /// ahead of it. `tick(position)` is called about once a second meanwhile.
    ///
    /// # Errors
    ///
    /// Cancelled while waiting, or the daemon is shutting down.
    pub fn wait_turn(
        &self,
        job: &Arc<Job>,
        mut tick: impl FnMut(usize),
    ) -> Result<Turn<'_>, String> {
        let mut g = self.lock();
        let mut last_tick: Option<Instant> = None;
        loop {
            if job.cancel_requested() {
                job.answer_cancel(Ok(format!("{} was cancelled while queued", job.vm_id)));
                return Err("cancelled while queued".into());
            }
            if let Some(why) = &g.closed {
                return Err(why.clone());
            }
            let now = Instant::now();
            let ready = |j: &Job| match j.state() {
                JobState::Waiting { retry_at } => retry_at.is_none_or(|t| t <= now),
                JobState::Running => false,
            };
            let first = g
                .jobs
                .iter()
                .filter(|j| ready(j) && !j.cancel_requested())
                .min_by_key(|j| j.rank(now))
                .cloned();
            if g.running < g.max && first.is_some_and(|f| Arc::ptr_eq(&f, job)) {
                g.running += 1;
                job.set_state(JobState::Running);
                job.update(|l| {
                    l.phase = "preparing";
                    l.note.clear();
                });
                return Ok(Turn { q: self });
            }
            if last_tick.is_none_or(|t| now - t >= Duration::from_secs(1)) {
                last_tick = Some(now);
                let p = Self::position_in(&g, job, now);
                drop(g);
                tick(p);
                g = self.lock();
                continue;
            }
            g = self
                .changed
                .wait_timeout(g, Duration::from_millis(200))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// The destination was busy: `job` waits again, its place kept, and is offered again
    /// after [`BUSY_RETRY`].
    pub fn defer(&self, job: &Job, note: String) {
        job.set_state(JobState::Waiting {
            retry_at: Some(Instant::now() + BUSY_RETRY),
        });
        job.update(|l| {
            l.phase = "queued";
            l.note = note;
        });
        self.changed.notify_all();
    }

    /// Cancels `vm_id`'s job: a waiting one at once, a running one at its driver's next
    /// step (refused after the commit decision); waits up to `limit` for the answer.
    /// `None` when no migration of `vm_id` is queued or running here.
    pub fn cancel(&self, vm_id: &str, limit: Duration) -> Option<Result<String, String>> {
        let job = self.job(vm_id)?;
        Some(job.cancel_running(limit))
    }

    /// The job of `vm_id`, if one is queued or running.
    pub fn job(&self, vm_id: &str) -> Option<Arc<Job>> {
        self.lock().jobs.iter().find(|j| j.vm_id == vm_id).cloned()
    }

    /// A job ended (run, cancelled or refused): it leaves the queue; `finished` goes to
    /// the recent list. A cancel nobody answered learns it came too late.
    pub fn finish(&self, job: &Arc<Job>, finished: Option<Finished>) {
        job.answer_cancel(Err(format!(
            "the migration of {} ended before the cancel took effect",
            job.vm_id
        )));
        let mut g = self.lock();
        g.jobs.retain(|j| !Arc::ptr_eq(j, job));
        if let Some(f) = finished {
            Self::remember(&mut g, f);
        }
        drop(g);
        self.changed.notify_all();
    }

    /// Records a finished migration that never queued here (an incoming one).
    pub fn record(&self, f: Finished) {
        Self::remember(&mut self.lock(), f);
    }

    fn remember(g: &mut Inner, f: Finished) {
        if g.recent.len() == RECENT {
            g.recent.pop_front();
        }
        g.recent.push_back(f);
    }

    /// Stops taking jobs (the daemon is shutting down): waiting ones end with `why`.
    /// Returns the running ones.
    pub fn close(&self, why: &str) -> Vec<Arc<Job>> {
        let mut g = self.lock();
        g.closed = Some(why.to_owned());
        let running = g
            .jobs
            .iter()
            .filter(|j| j.state() == JobState::Running)
            .cloned()
            .collect();
        drop(g);
        self.changed.notify_all();
        running
    }

    /// Running and waiting jobs (with their queue positions), and the recent ones.
    pub fn snapshot(&self) -> (Vec<(Arc<Job>, usize)>, Vec<Finished>) {
        let g = self.lock();
        let now = Instant::now();
        let mut jobs: Vec<_> = g
            .jobs
            .iter()
            .map(|j| (Arc::clone(j), Self::position_in(&g, j, now)))
            .collect();
        jobs.sort_by_key(|(j, p)| (*p, j.seq));
        (jobs, g.recent.iter().cloned().collect())
    }

    /// Migrations running and waiting.
    pub fn counts(&self) -> (usize, usize) {
        let g = self.lock();
        (g.running, g.jobs.len().saturating_sub(g.running))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{Live, AGING};

    fn run_when_first(q: &Scheduler, j: &Arc<Job>) -> bool {
        // Non-blocking probe: the job is first and a slot is free.
        let g = q.lock();
        let now = Instant::now();
        let first = g
            .jobs
            .iter()
            .filter(|x| matches!(x.state(), JobState::Waiting { retry_at: None }))
            .min_by_key(|x| x.rank(now))
            .cloned();
        g.running < g.max && first.is_some_and(|f| Arc::ptr_eq(&f, j))
    }

    #[test]
    fn jobs_run_by_priority_then_arrival_within_the_limit() {
        let q = Scheduler::new(1);
        let low = q.submit("a", "h:1", Priority::Low, 0).expect("test setup");
        let n1 = q
            .submit("b", "h:1", Priority::Normal, 0)
            .expect("test setup");
        let high = q.submit("c", "h:1", Priority::High, 0).expect("test setup");
        let n2 = q
            .submit("d", "h:1", Priority::Normal, 0)
            .expect("test setup");
        assert!(
            q.submit("b", "h:2", Priority::High, 0).is_err(),
            "one job per VM"
        );
        assert_eq!([&low, &n1, &high, &n2].map(|j| q.position(j)), [4, 2, 1, 3]);
        let t = q.wait_turn(&high, |_| {}).expect("test setup");
        assert_eq!(q.counts(), (1, 3));
        // The slot is taken: nobody else is first with a free slot.
        assert!(!run_when_first(&q, &n1));
        drop(t);
        q.finish(&high, None);
        assert!(run_when_first(&q, &n1));
        // A busy destination sends the job back; the next one goes first meanwhile.
        let t = q.wait_turn(&n1, |_| {}).expect("test setup");
        drop(t);
        q.defer(&n1, "busy".into());
        assert!(run_when_first(&q, &n2));
        assert_eq!(q.position(&n1), 1, "its place is kept");
    }

    #[test]
    fn the_rate_is_measured_over_a_second_or_more() {
        let mut l = Live::default();
        let t = Instant::now();
        l.observe(0, t);
        l.observe(50, t + Duration::from_millis(500));
        assert_eq!((l.bytes, l.rate), (50, None));
        l.observe(100, t + Duration::from_secs(1));
        assert_eq!(l.rate, Some(100.0));
        l.observe(400, t + Duration::from_secs(3));
        assert_eq!(l.rate, Some(150.0));
    }

    #[test]
    fn a_low_priority_job_ages_ahead_of_newer_ones() {
        let q = Scheduler::new(1);
        let low = q.submit("a", "h:1", Priority::Low, 0).expect("test setup");
        let now = Instant::now();
        assert_eq!(low.rank(now).0, 3);
        assert_eq!(low.rank(now + AGING).0, 2);
        assert_eq!(low.rank(now + AGING * 2).0, 1);
        assert_eq!(low.rank(now + AGING * 10).0, 1);
        let high = q.submit("b", "h:1", Priority::High, 0).expect("test setup");
        // After two agings the old low job is first: same class, earlier arrival.
        assert!(low.rank(now + AGING * 2 + Duration::from_secs(1)) < high.rank(now + AGING * 2));
    }

    #[test]
    fn a_waiting_job_is_cancelled_and_a_closed_queue_takes_nothing() {
        let q = Arc::new(Scheduler::new(1));
        let first = q
            .submit("a", "h:1", Priority::Normal, 0)
            .expect("test setup");
        let _t = q.wait_turn(&first, |_| {}).expect("test setup");
        let second = q
            .submit("b", "h:1", Priority::Normal, 0)
            .expect("test setup");
        let waiter = {
            let (q, second) = (Arc::clone(&q), Arc::clone(&second));
            std::thread::spawn(move || q.wait_turn(&second, |_| {}).map(|_| ()))
        };
        std::thread::sleep(Duration::from_millis(50));
        match q.cancel("b", Duration::from_secs(5)) {
            Some(Ok(line)) => assert!(line.contains("cancelled while queued"), "{line}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            waiter.join().expect("test setup"),
            Err("cancelled while queued".into())
        );
        // A running job's driver answers; here nobody does, so the wait ends unanswered.
        let r = q.cancel("a", Duration::from_millis(100)).expect("a job");
        assert!(r.is_err() && first.cancel_requested(), "{r:?}");
        first.answer_cancel(Ok("stopped".into()));
        assert!(!first.cancel_requested());
        assert!(q.cancel("zz", Duration::ZERO).is_none());
        assert_eq!(q.close("shutting down").len(), 1);
        assert!(q.submit("c", "h:1", Priority::Normal, 0).is_err());
    }
}
