//! The destination's view of every page of a post-copy (missing, being pulled, landed, or a
//! hole to fill), and the ways pages come in: a pull over TCP or RDMA READ, or zeros.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};

use super::pull::{encode_pull, lock, DATA_MAP, MAX_DATA_RANGES, MAX_PULL, PAGE};
use crate::ram::Ram;
use crate::wire::GpaRange;

/// How long an RDMA READ may go without completing before the pull gives RDMA up and
/// goes on over TCP.
const RDMA_STALL: Duration = Duration::from_secs(5);

const MISSING: u8 = 0;
const PULLING: u8 = 1;
const LANDED: u8 = 2;
/// Missing, and a hole at the source: filled with zeros here, not pulled.
const HOLE: u8 = 3;
const FILLING: u8 = 4;

/// The destination's view of every page: missing, being pulled, or landed.
pub(super) struct Pages {
    /// Per slot: first gpa, pages, index of its first page.
    pub(super) slots: Vec<(u64, usize, usize)>,
    pub(super) state: Vec<AtomicU8>,
    /// Pages not landed yet.
    pub(super) missing: AtomicUsize,
    /// The next page the bulk pull looks at.
    pub(super) next_bulk: AtomicUsize,
    /// A pull failed: waiters give up.
    pub(super) broken: AtomicBool,
    pub(super) wait: Mutex<()>,
    pub(super) landed: Condvar,
}

impl Pages {
    pub(super) fn new(ram: &Ram) -> anyhow::Result<Self> {
        let mut slots = Vec::new();
        let mut total = 0usize;
        for m in ram.layout() {
            let n = usize::try_from(m.size / PAGE).context("RAM too large")?;
            slots.push((m.gpa, n, total));
            total += n;
        }
        Ok(Self {
            slots,
            state: (0..total).map(|_| AtomicU8::new(MISSING)).collect(),
            missing: AtomicUsize::new(total),
            next_bulk: AtomicUsize::new(0),
            broken: AtomicBool::new(false),
            wait: Mutex::new(()),
            landed: Condvar::new(),
        })
    }

    pub(super) fn total(&self) -> usize {
        self.state.len()
    }

    pub(super) fn index(&self, gpa: u64) -> Option<usize> {
        self.slots.iter().find_map(|&(start, n, first)| {
            let off = gpa.checked_sub(start)?;
            let page = usize::try_from(off / PAGE).ok()?;
            (page < n).then_some(first + page)
        })
    }

    pub(super) fn gpa(&self, i: usize) -> u64 {
        let &(start, _, first) = self
            .slots
            .iter()
            .rev()
            .find(|&&(_, _, first)| first <= i)
            .expect("page 0 is in the first slot");
        start + (i - first) as u64 * PAGE
    }

    /// Whether every page of `r` landed.
    pub(super) fn all_landed(&self, r: std::ops::RangeInclusive<usize>) -> bool {
        r.into_iter()
            .all(|i| self.state[i].load(Ordering::Acquire) == LANDED)
    }

    /// Claims page `i` for this caller: `Some(hole)` if it was missing.
    pub(super) fn claim(&self, i: usize) -> Option<bool> {
        let s = &self.state[i];
        if s.compare_exchange(MISSING, PULLING, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            return Some(false);
        }
        s.compare_exchange(HOLE, FILLING, Ordering::AcqRel, Ordering::Acquire)
            .ok()
            .map(|_| true)
    }

    /// Asks the source (over `conn`, before anything is pulled) which parts of RAM hold
    /// data; every other page becomes a hole, filled here. Returns the holes' bytes.
    pub(super) fn learn_holes(&self, conn: &mut (impl Read + Write)) -> anyhow::Result<u64> {
        conn.write_all(&encode_pull(DATA_MAP, 0))
            .context("asking the source for its data map")?;
        let mut n = [0u8; 8];
        conn.read_exact(&mut n).context("reading the data map")?;
        let n = u64::from_le_bytes(n);
        if n > MAX_DATA_RANGES {
            bail!("the source's data map has {n} ranges");
        }
        let mut data = vec![false; self.total()];
        for _ in 0..n {
            let mut r = [0u8; 16];
            conn.read_exact(&mut r).context("reading the data map")?;
            let gpa = u64::from_le_bytes(r[..8].try_into().expect("8 bytes"));
            let length = u64::from_le_bytes(r[8..].try_into().expect("8 bytes"));
            let first = self
                .index(gpa)
                .filter(|_| gpa.is_multiple_of(PAGE) && length.is_multiple_of(PAGE))
                .context("the source's data map names pages outside the VM's RAM")?;
            let pages = usize::try_from(length / PAGE).context("range too large")?;
            for i in first..first.saturating_add(pages) {
                if i >= data.len() || self.gpa(i) != gpa + (i - first) as u64 * PAGE {
                    bail!("the source's data map runs past a RAM slot");
                }
                data[i] = true;
            }
        }
        let mut holes = 0;
        for (i, d) in data.iter().enumerate() {
            if !d
                && self.state[i]
                    .compare_exchange(MISSING, HOLE, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            {
                holes += 1;
            }
        }
        Ok(holes * PAGE)
    }

    pub(super) fn land(&self, pages: &[usize]) {
        for &i in pages {
            self.state[i].store(LANDED, Ordering::Release);
        }
        self.missing.fetch_sub(pages.len(), Ordering::AcqRel);
        let _g = lock(&self.wait);
        self.landed.notify_all();
    }

    pub(super) fn break_off(&self) {
        self.broken.store(true, Ordering::Release);
        let _g = lock(&self.wait);
        self.landed.notify_all();
    }

    /// Waits until `done` holds, or the pull broke off.
    pub(super) fn wait_until(&self, done: impl Fn() -> bool) -> anyhow::Result<()> {
        let mut g = lock(&self.wait);
        loop {
            if done() {
                return Ok(());
            }
            if self.broken.load(Ordering::Acquire) {
                bail!("the pull from the source broke off");
            }
            g = self
                .landed
                .wait_timeout(g, Duration::from_millis(100))
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }

    /// Brings the claimed pages `pages` (ascending, each with whether it is a hole) in:
    /// a pull request over `conn` per run of data pages contiguous in guest-physical
    /// space, zeros written here for holes; marks them landed. Returns (bytes pulled,
    /// bytes zero-filled).
    pub(super) fn pull<D: Read + Write>(
        &self,
        via: &Via<'_, D>,
        ram: &Ram,
        pages: &[(usize, bool)],
    ) -> anyhow::Result<Moved> {
        let mut moved = Moved::default();
        let mut at = 0;
        while at < pages.len() {
            let (i0, hole) = pages[at];
            let first = self.gpa(i0);
            let mut n = 1;
            // A run is one pull request: at most what the source answers (a fault on a
            // 1 GiB huge page is several requests).
            while at + n < pages.len()
                && (n as u64) < MAX_PULL / PAGE
                && pages[at + n] == (i0 + n, hole)
                && self.gpa(i0 + n) == first + n as u64 * PAGE
            {
                n += 1;
            }
            let length = n as u64 * PAGE;
            let (ptr, len) = ram
                .range_ptr(GpaRange { gpa: first, length })
                .context("a page outside the VM's RAM")?;
            // SAFETY: inside the mapping; these pages are claimed (PULLING or FILLING): no
            // other puller writes them, and the destination CH maps a page only once Ferry
            // answered its fault, which it does only once the page landed.
            let dst = unsafe { std::slice::from_raw_parts_mut(ptr, len) };
            if hole {
                // Fresh memfd pages read as zero, but CH can map only pages that exist.
                dst.fill(0);
                moved.filled += length;
            } else if via.rdma_pull(ram, first, length)? {
                moved.rdma += length;
            } else {
                let mut c = lock(via.conn);
                c.write_all(&encode_pull(first, length))
                    .context("asking the source for pages")?;
                c.read_exact(dst).context("pulling pages from the source")?;
                moved.pulled += length;
            }
            let run: Vec<usize> = (i0..i0 + n).collect();
            self.land(&run);
            at += n;
        }
        Ok(moved)
    }
}

/// Bytes brought in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Moved {
    /// Pulled from the source over TCP.
    pub(super) pulled: u64,
    /// Pulled from the source with RDMA READ.
    pub(super) rdma: u64,
    /// Zero-filled here (holes at the source).
    pub(super) filled: u64,
}

impl std::ops::AddAssign for Moved {
    fn add_assign(&mut self, o: Self) {
        self.pulled += o.pulled;
        self.rdma += o.rdma;
        self.filled += o.filled;
    }
}

/// How pages come from the source: over `conn` (TCP), or with RDMA READ while `rdma`
/// holds a working puller (shared by every puller; a failure drops it, and the pages it
/// did not confirm come over TCP).
pub(super) struct Via<'a, D> {
    pub(super) conn: &'a Mutex<D>,
    pub(super) rdma: &'a Mutex<Option<ferry_verbs::RdmaPuller>>,
    /// Why RDMA was given up, if it was.
    pub(super) rdma_lost: &'a Mutex<Option<String>>,
    /// Bytes RDMA moved (all pullers).
    pub(super) rdma_moved: &'a AtomicU64,
}

impl<D> Via<'_, D> {
    /// Pulls `first`..+`length` with RDMA READ if a puller works; `false`: use TCP.
    pub(super) fn rdma_pull(&self, ram: &Ram, first: u64, length: u64) -> anyhow::Result<bool> {
        let mut g = lock(self.rdma);
        let Some(p) = g.as_mut() else {
            return Ok(false);
        };
        let (region, page) = ram
            .region_page(GpaRange { gpa: first, length })
            .context("a page outside the VM's RAM")?;
        let range = ferry_engine::plan::PageRange {
            region,
            first: page,
            count: length / PAGE,
        };
        match p.pull(&[range], &|_| {}, RDMA_STALL) {
            Ok(_) => {
                self.rdma_moved.fetch_add(length, Ordering::AcqRel);
                Ok(true)
            }
            Err(e) => {
                // The puller destroyed its queue pairs: nothing more lands from it, so
                // these pages may come over TCP now.
                *g = None;
                *lock(self.rdma_lost) = Some(e.to_string());
                Ok(false)
            }
        }
    }
}
