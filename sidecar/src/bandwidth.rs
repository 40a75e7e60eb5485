//! Bandwidth caps: each outgoing migration is a [`Flow`] with its own cap (`ferry migrate
//! --max-bandwidth`, changed live by `ferry set-bandwidth`), and the host's cap
//! (`max_bandwidth_mibps`) is shared by the running flows max-min fairly: a flow capped
//! below its equal share leaves the rest to the others.
//!
//! Pacing is a virtual clock per flow (GCRA): each send books `bytes / rate` seconds after
//! the flow's previous booking, and the sender sleeps until its booking is due, with at
//! most [`BURST`] of credit. TCP channels book the bytes they just sent; the RDMA path
//! books each piece of the pull list before the destination may pull it. A rate change
//! applies to the next booking.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// Credit a flow that was idle may spend at once.
pub const BURST: Duration = Duration::from_millis(20);

/// One migration's share of the link.
#[derive(Debug)]
pub struct Flow {
    /// Its own cap, bytes per second (0: none).
    own: AtomicU64,
    /// The rate in force (own cap and fair share of the host's), bytes per second (0: none).
    rate: AtomicU64,
    /// When the next byte may go.
    next: Mutex<Option<Instant>>,
}

impl Flow {
    /// A flow with its own cap (bytes per second, 0: none), not yet sharing the host's.
    pub fn new(own: u64) -> Arc<Self> {
        Arc::new(Self {
            own: AtomicU64::new(own),
            rate: AtomicU64::new(own),
            next: Mutex::new(None),
        })
    }

    /// Its own cap, bytes per second (0: none).
    pub fn own(&self) -> u64 {
        self.own.load(Ordering::Relaxed)
    }

    /// The rate in force, bytes per second (`None`: unlimited).
    pub fn rate(&self) -> Option<u64> {
        Some(self.rate.load(Ordering::Relaxed)).filter(|&r| r > 0)
    }

    /// Books `bytes` and sleeps until they are due at the rate in force.
    pub fn take(&self, bytes: u64) {
        if let Some(wait) = self.book(bytes, Instant::now()) {
            std::thread::sleep(wait);
        }
    }

    /// Books `bytes` at `now`; returns how long to wait before they are due.
    fn book(&self, bytes: u64, now: Instant) -> Option<Duration> {
        let rate = self.rate()?;
        let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
        let earliest = now.checked_sub(BURST).unwrap_or(now);
        let start = next.map_or(earliest, |n| n.max(earliest));
        let due = start + Duration::from_secs_f64(bytes as f64 / rate as f64);
        *next = Some(due);
        due.checked_duration_since(now).filter(|d| !d.is_zero())
    }
}

/// The host's cap and the flows sharing it.
#[derive(Debug, Default)]
pub struct Bandwidth {
    /// The host's cap, bytes per second (0: none).
    host: AtomicU64,
    flows: Mutex<Vec<Weak<Flow>>>,
}

impl Bandwidth {
    /// A host cap of `host` bytes per second (0: none).
    pub fn new(host: u64) -> Self {
        Self {
            host: AtomicU64::new(host),
            flows: Mutex::new(Vec::new()),
        }
    }

    /// The host's cap, bytes per second (`None`: none).
    pub fn host_cap(&self) -> Option<u64> {
        Some(self.host.load(Ordering::Relaxed)).filter(|&r| r > 0)
    }

    /// A flow starts sending: it shares the host's cap from now on.
    pub fn attach(&self, flow: &Arc<Flow>) {
        self.lock().push(Arc::downgrade(flow));
        self.recompute();
    }

    /// A flow stopped sending: it keeps only its own cap.
    pub fn detach(&self, flow: &Arc<Flow>) {
        self.lock()
            .retain(|w| w.upgrade().is_some_and(|f| !Arc::ptr_eq(&f, flow)));
        flow.rate.store(flow.own(), Ordering::Relaxed);
        self.recompute();
    }

    /// Changes a flow's own cap (bytes per second, 0: none); takes effect at its next
    /// booking.
    pub fn set_own(&self, flow: &Flow, own: u64) {
        flow.own.store(own, Ordering::Relaxed);
        self.recompute();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Weak<Flow>>> {
        self.flows.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Max-min fair shares of the host cap: flows in order of their own caps each get the
    /// smaller of their cap and an equal part of what the flows before them left.
    fn recompute(&self) {
        let mut flows = self.lock();
        flows.retain(|w| w.strong_count() > 0);
        let live: Vec<Arc<Flow>> = flows.iter().filter_map(Weak::upgrade).collect();
        drop(flows);
        let rates = shares(
            self.host.load(Ordering::Relaxed),
            &live.iter().map(|f| f.own()).collect::<Vec<_>>(),
        );
        for (f, r) in live.iter().zip(rates) {
            f.rate.store(r, Ordering::Relaxed);
        }
    }
}

/// Max-min fair rates for flows with `own` caps (0: none) under a host cap (0: none).
fn shares(host: u64, own: &[u64]) -> Vec<u64> {
    if host == 0 {
        return own.to_vec();
    }
    let mut order: Vec<usize> = (0..own.len()).collect();
    // Uncapped flows last (they take whatever is left).
    order.sort_by_key(|&i| if own[i] == 0 { u64::MAX } else { own[i] });
    let mut out = vec![0; own.len()];
    let mut left = host;
    for (k, &i) in order.iter().enumerate() {
        let fair = left / (own.len() - k) as u64;
        let r = if own[i] == 0 { fair } else { own[i].min(fair) };
        // A zero rate would mean "unlimited": never below one byte per second.
        out[i] = r.max(1);
        left = left.saturating_sub(r);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_cap_is_shared_max_min_fairly() {
        assert_eq!(shares(0, &[0, 5]), vec![0, 5]);
        assert_eq!(shares(90, &[0, 0, 0]), vec![30, 30, 30]);
        // A flow capped below its share leaves the rest to the others.
        assert_eq!(shares(100, &[10, 0, 0]), vec![10, 45, 45]);
        assert_eq!(shares(100, &[60, 70]), vec![50, 50]);
        assert_eq!(shares(100, &[20, 200]), vec![20, 80]);
        assert_eq!(shares(100, &[]), Vec::<u64>::new());
    }

    #[test]
    fn a_flow_books_at_its_rate_with_a_bounded_burst() {
        let f = Flow::new(1000);
        let t = Instant::now();
        // The first booking spends the burst credit (20 ms = 20 bytes at 1000 B/s).
        assert_eq!(f.book(20, t), None);
        // The next 100 bytes are due 100 ms later.
        let w = f.book(100, t).expect("must wait");
        assert!(
            w >= Duration::from_millis(99) && w <= Duration::from_millis(101),
            "{w:?}"
        );
        // After a long idle time only the burst is credited, not the whole gap.
        let later = t + Duration::from_secs(10);
        assert_eq!(f.book(20, later), None);
        assert!(f.book(20, later).is_some());
        // Unlimited flows never wait.
        let u = Flow::new(0);
        assert_eq!(u.book(1 << 30, t), None);
    }

    #[test]
    fn rates_follow_attach_detach_and_live_changes() {
        let bw = Bandwidth::new(100);
        let (a, b) = (Flow::new(0), Flow::new(0));
        bw.attach(&a);
        assert_eq!(a.rate(), Some(100));
        bw.attach(&b);
        assert_eq!((a.rate(), b.rate()), (Some(50), Some(50)));
        bw.set_own(&b, 10);
        assert_eq!((a.rate(), b.rate()), (Some(90), Some(10)));
        bw.detach(&b);
        assert_eq!((a.rate(), b.rate()), (Some(100), Some(10)));
        let free = Bandwidth::new(0);
        let c = Flow::new(0);
        free.attach(&c);
        assert_eq!(c.rate(), None);
        free.set_own(&c, 7);
        assert_eq!(c.rate(), Some(7));
    }
}
