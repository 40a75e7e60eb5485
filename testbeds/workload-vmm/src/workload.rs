//! The workload VM: guest RAM in memfds, writer threads standing in for vCPUs, the
//! VMM's own-writes dirty bitmap, and the state blob.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_proto::codec::{Reader, Writer};
use ferry_proto::common::RegionInfo;
use ferry_proto::mem::{GuestRegion, PAGE};

use crate::stamp::{check_page, write_page};

/// Generation value that marks a page being written (never a real generation).
const WRITING: u32 = u32::MAX;
/// State blob magic and version.
const BLOB_MAGIC: u32 = 0x4d56_5746;
const BLOB_VERSION: u16 = 1;

/// Where writers write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Pattern {
    /// Page after page through the working set.
    Sequential,
    /// Uniformly random pages of the working set.
    Random,
    /// Random pages of a small hot set (`--hot-mib`).
    Hot,
}

/// Writer settings.
#[derive(Clone, Copy, Debug)]
pub struct WriterConfig {
    /// Writer threads.
    pub writers: usize,
    /// Total write rate in pages per second (0: no writes).
    pub pages_per_sec: u64,
    /// Pattern.
    pub pattern: Pattern,
    /// Pages of the hot set for [`Pattern::Hot`].
    pub hot_pages: u64,
}

/// One writer's position, saved in the state blob so it carries on where it stopped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriterState {
    /// Pages written so far (the counter that must keep increasing).
    pub count: u64,
    /// Random state.
    pub rng: u64,
    /// Next page for the sequential pattern.
    pub cursor: u64,
}

/// Shared between the writer threads and the VMM's control thread.
struct Shared {
    regions: Vec<GuestRegion>,
    /// First global page of each region.
    bases: Vec<u64>,
    gens: Vec<AtomicU32>,
    /// Own-writes dirty bitmap, one vector per region.
    dirty: Vec<Vec<AtomicU64>>,
    writer_state: Vec<Mutex<WriterState>>,
    pause: AtomicBool,
    stop: AtomicBool,
    parked: AtomicUsize,
    gate: Mutex<()>,
    wake: Condvar,
    cfg: WriterConfig,
    /// Global pages `[hole.0, hole.1)` writers leave alone (memory cut off on purpose).
    hole: (AtomicU64, AtomicU64),
}

/// A running (or paused) workload VM.
pub struct Workload {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    /// Region layout and memfds, as registered.
    pub layout: Vec<RegionInfo>,
    /// The memfds backing the regions.
    pub memfds: Vec<OwnedFd>,
}

/// Result of checking every page against the generation table.
#[derive(Debug, Default, Clone, Copy)]
pub struct Verification {
    /// Pages checked.
    pub pages: u64,
    /// Pages never written (all zero as required).
    pub zero: u64,
    /// Pages that do not hold their latest version.
    pub bad: u64,
    /// First bad global page.
    pub first_bad: Option<u64>,
}

impl Shared {
    fn total_pages(&self) -> u64 {
        self.gens.len() as u64
    }

    fn locate(&self, page: u64) -> (usize, u64) {
        let r = self.bases.partition_point(|&b| b <= page) - 1;
        (r, page - self.bases[r])
    }

    /// Writes the next generation of `page` and marks it dirty afterwards: a page is
    /// marked only once its content is complete, so a get-and-clear between the write
    /// and the mark leaves the mark for the next round (never a lost update).
    fn write(&self, page: u64) {
        let (r, p) = self.locate(page);
        let slot = &self.gens[page as usize];
        let gen = slot.load(Ordering::Relaxed).wrapping_add(1).max(1);
        slot.store(WRITING, Ordering::Relaxed);
        std::sync::atomic::fence(Ordering::Release);
        let dst = self.regions[r]
            .pages_ptr(p, 1)
            .expect("page within its region");
        // SAFETY: `dst` is an aligned page of our mapping; writer w owns the pages
        // congruent to w, so no other writer touches it.
        unsafe { write_page(dst, page, gen) };
        slot.store(gen, Ordering::Release);
        self.dirty[r][(p / 64) as usize].fetch_or(1 << (p % 64), Ordering::Release);
    }

    fn writer(&self, w: usize) {
        let cfg = self.cfg;
        let n = self.total_pages();
        let span = match cfg.pattern {
            Pattern::Hot => cfg.hot_pages.clamp(1, n),
            _ => n,
        };
        let own = span.div_ceil(cfg.writers as u64).max(1);
        let rate = cfg.pages_per_sec as f64 / cfg.writers as f64;
        let mut st = *self.writer_state[w].lock().expect("writer state lock");
        if st.rng == 0 {
            st.rng = 0x9e37_79b9 ^ (w as u64 + 1).wrapping_mul(0x2545_f491_4f6c_dd1d);
        }
        let mut epoch = Instant::now();
        let mut since = 0u64;
        loop {
            if self.pause.load(Ordering::Acquire) || self.stop.load(Ordering::Acquire) {
                *self.writer_state[w].lock().expect("writer state lock") = st;
                let mut g = self.gate.lock().expect("gate lock");
                self.parked.fetch_add(1, Ordering::AcqRel);
                while self.pause.load(Ordering::Acquire) && !self.stop.load(Ordering::Acquire) {
                    g = self.wake.wait(g).expect("gate lock");
                }
                drop(g);
                self.parked.fetch_sub(1, Ordering::AcqRel);
                if self.stop.load(Ordering::Acquire) {
                    return;
                }
                epoch = Instant::now();
                since = 0;
            }
            if rate <= 0.0 {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            // Pace to the rate: never ahead of elapsed x rate.
            let allowed = (epoch.elapsed().as_secs_f64() * rate) as u64;
            if since >= allowed {
                std::thread::sleep(Duration::from_micros(500));
                continue;
            }
            let idx = match cfg.pattern {
                Pattern::Sequential => {
                    let i = st.cursor % own;
                    st.cursor = st.cursor.wrapping_add(1);
                    i
                }
                Pattern::Random | Pattern::Hot => {
                    st.rng ^= st.rng << 13;
                    st.rng ^= st.rng >> 7;
                    st.rng ^= st.rng << 17;
                    st.rng % own
                }
            };
            let page = idx * cfg.writers as u64 + w as u64;
            let in_hole = page >= self.hole.0.load(Ordering::Acquire)
                && page < self.hole.1.load(Ordering::Acquire);
            if page < span && !in_hole {
                self.write(page);
                st.count += 1;
                since += 1;
                if st.count.is_multiple_of(64) {
                    *self.writer_state[w].lock().expect("writer state lock") = st;
                }
            }
        }
    }
}

impl Workload {
    /// Cuts region 0's memfd to half its size (fault injection: the sidecar mapping it
    /// must survive); the writers stay out of the cut half from now on.
    ///
    /// # Errors
    ///
    /// `ftruncate` failing.
    pub fn cut_region0(&self) -> std::io::Result<()> {
        let pages = self.layout[0].size / PAGE as u64;
        let half = pages / 2;
        self.shared.hole.1.store(pages, Ordering::Release);
        self.shared.hole.0.store(half, Ordering::Release);
        // Writers that picked a page of the hole before seeing it finish their page first.
        std::thread::sleep(Duration::from_millis(50));
        let len = (self.layout[0].offset + half * PAGE as u64) as libc::off_t;
        // SAFETY: ftruncate on our own open memfd changes its size, no memory of ours:
        // the writers keep out of the cut half (above), and nothing else here reads it.
        let rc = unsafe { libc::ftruncate(self.memfds[0].as_raw_fd(), len) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Creates RAM (`region_sizes` bytes each, memfds backed by `page_size`-byte pages:
    /// 4 KiB, or huge pages), fills `fill_pct` % of the pages
    /// with generation 1 (the rest stays zero), and starts the writers.
    ///
    /// # Errors
    ///
    /// Memory that cannot be created.
    pub fn create(
        region_sizes: &[u64],
        page_size: u64,
        fill_pct: u8,
        cfg: WriterConfig,
    ) -> anyhow::Result<Self> {
        let mut regions = Vec::new();
        let mut memfds = Vec::new();
        let mut layout = Vec::new();
        let mut gpa = 0u64;
        for (i, &size) in region_sizes.iter().enumerate() {
            let (r, fd) =
                GuestRegion::create_backed(&format!("ferry-workload-{i}"), size, page_size)?;
            layout.push(RegionInfo {
                gpa,
                size,
                offset: 0,
            });
            gpa += size;
            regions.push(r);
            memfds.push(fd);
        }
        let w = Self::assemble(regions, layout, memfds, None, cfg)?;
        let n = w.shared.total_pages();
        let filled = n * u64::from(fill_pct.min(100)) / 100;
        std::thread::scope(|s| {
            for t in 0..2u64 {
                let sh = &w.shared;
                s.spawn(move || {
                    let mut p = t;
                    while p < filled {
                        sh.write(p);
                        p += 2;
                    }
                });
            }
        });
        // Initial content is not a write the migration must track (it precedes it).
        for d in &w.shared.dirty {
            for x in d {
                x.store(0, Ordering::Relaxed);
            }
        }
        Ok(w)
    }

    fn assemble(
        regions: Vec<GuestRegion>,
        layout: Vec<RegionInfo>,
        memfds: Vec<OwnedFd>,
        saved: Option<(Vec<WriterState>, Vec<u32>)>,
        cfg: WriterConfig,
    ) -> anyhow::Result<Self> {
        let mut bases = Vec::new();
        let mut total = 0u64;
        for r in &regions {
            bases.push(total);
            total += r.npages();
        }
        let (states, gens) = match saved {
            Some((s, g)) => (s, g),
            None => (
                vec![WriterState::default(); cfg.writers],
                vec![0u32; total as usize],
            ),
        };
        anyhow::ensure!(
            states.len() == cfg.writers,
            "the saved VM had {} writers, this VMM is configured for {}",
            states.len(),
            cfg.writers
        );
        let dirty = regions
            .iter()
            .map(|r| {
                (0..r.npages().div_ceil(64))
                    .map(|_| AtomicU64::new(0))
                    .collect()
            })
            .collect();
        let shared = Arc::new(Shared {
            regions,
            bases,
            gens: gens.into_iter().map(AtomicU32::new).collect(),
            dirty,
            writer_state: states.into_iter().map(Mutex::new).collect(),
            pause: AtomicBool::new(true),
            stop: AtomicBool::new(false),
            parked: AtomicUsize::new(0),
            gate: Mutex::new(()),
            wake: Condvar::new(),
            cfg,
            hole: (AtomicU64::new(0), AtomicU64::new(0)),
        });
        Ok(Self {
            shared,
            threads: Vec::new(),
            layout,
            memfds,
        })
    }

    /// Starts (or restarts) the writer threads.
    pub fn start(&mut self) {
        self.shared.pause.store(false, Ordering::Release);
        if self.threads.is_empty() {
            for w in 0..self.shared.cfg.writers {
                let sh = Arc::clone(&self.shared);
                self.threads.push(std::thread::spawn(move || sh.writer(w)));
            }
        } else {
            let _g = self.shared.gate.lock().expect("gate lock");
            self.shared.wake.notify_all();
        }
    }

    /// Stops the writers and waits until every one is parked; returns how long it took.
    pub fn pause(&self) -> Duration {
        let t0 = Instant::now();
        self.shared.pause.store(true, Ordering::Release);
        while self.shared.parked.load(Ordering::Acquire) < self.threads.len() {
            std::thread::yield_now();
        }
        t0.elapsed()
    }

    /// Stops the writers for good.
    pub fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        {
            let _g = self.shared.gate.lock().expect("gate lock");
            self.shared.wake.notify_all();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }

    /// Clears the own-writes log (dirty logging starts now).
    pub fn clear_dirty(&self) {
        for d in &self.shared.dirty {
            for x in d {
                x.store(0, Ordering::Release);
            }
        }
    }

    /// Gets and clears the own-writes log, one bitmap per region.
    pub fn take_dirty(&self) -> Vec<Vec<u64>> {
        self.shared
            .dirty
            .iter()
            .map(|d| d.iter().map(|x| x.swap(0, Ordering::AcqRel)).collect())
            .collect()
    }

    /// Writers' counters, as of their last save (exact while paused).
    pub fn counters(&self) -> Vec<u64> {
        (self.counter_probe())()
    }

    /// A function reading the counters from any thread (for status reports).
    pub fn counter_probe(&self) -> std::sync::Arc<dyn Fn() -> Vec<u64> + Send + Sync> {
        let sh = Arc::clone(&self.shared);
        Arc::new(move || {
            sh.writer_state
                .iter()
                .map(|s| s.lock().map(|s| s.count).unwrap_or(0))
                .collect()
        })
    }

    /// The state blob: writer positions and the generation table. Call while paused.
    pub fn save(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u32(BLOB_MAGIC)
            .u16(BLOB_VERSION)
            .u64(self.shared.total_pages())
            .u32(self.shared.cfg.writers as u32);
        for s in &self.shared.writer_state {
            let s = *s.lock().expect("writer state lock");
            w.u64(s.count).u64(s.rng).u64(s.cursor);
        }
        for g in &self.shared.gens {
            w.u32(g.load(Ordering::Acquire));
        }
        w.finish()
    }

    /// Rebuilds a paused VM from migrated memory and a state blob.
    ///
    /// # Errors
    ///
    /// A blob that does not parse, is of another version, or does not match the memory.
    pub fn restore(
        regions: Vec<(RegionInfo, OwnedFd)>,
        blob: &[u8],
        cfg: WriterConfig,
    ) -> anyhow::Result<Self> {
        let mut r = Reader::new(blob, "workload state blob");
        anyhow::ensure!(r.u32()? == BLOB_MAGIC, "not a workload VMM state blob");
        let v = r.u16()?;
        anyhow::ensure!(
            v == BLOB_VERSION,
            "state blob version {v}, this VMM reads {BLOB_VERSION}"
        );
        let npages = r.u64()?;
        let writers = r.u32()? as usize;
        anyhow::ensure!(writers <= 1024, "state blob claims {writers} writers");
        let mut states = Vec::with_capacity(writers);
        for _ in 0..writers {
            states.push(WriterState {
                count: r.u64()?,
                rng: r.u64()?,
                cursor: r.u64()?,
            });
        }
        let mut maps = Vec::new();
        let mut layout = Vec::new();
        let mut fds = Vec::new();
        for (info, fd) in regions {
            use ferry_proto::mem::AsFdBorrowed;
            maps.push(GuestRegion::map(
                fd.as_fd_borrowed(),
                info.offset,
                info.size,
            )?);
            layout.push(info);
            fds.push(fd);
        }
        let total: u64 = maps.iter().map(GuestRegion::npages).sum();
        anyhow::ensure!(
            total == npages,
            "state blob describes {npages} pages, the migrated memory has {total}"
        );
        anyhow::ensure!(
            r.remaining() as u64 == npages * 4,
            "state blob generation table is truncated"
        );
        let gens = (0..npages)
            .map(|_| r.u32())
            .collect::<Result<Vec<_>, _>>()?;
        r.end()?;
        Self::assemble(
            maps,
            layout,
            fds,
            Some((states, gens)),
            WriterConfig { writers, ..cfg },
        )
    }

    /// Checks every page against the generation table (call while paused).
    pub fn verify(&self) -> Verification {
        let sh = &self.shared;
        let n = sh.total_pages();
        let parts: Vec<Verification> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..2u64)
                .map(|t| {
                    s.spawn(move || {
                        let mut v = Verification::default();
                        let mut buf = [0u8; PAGE];
                        let mut p = t;
                        while p < n {
                            let (r, rp) = sh.locate(p);
                            sh.regions[r].copy_out(rp, &mut buf);
                            let gen = sh.gens[p as usize].load(Ordering::Acquire);
                            v.pages += 1;
                            if gen == 0 {
                                v.zero += 1;
                            }
                            if !check_page(&buf, p, gen) {
                                v.bad += 1;
                                v.first_bad = Some(v.first_bad.map_or(p, |b: u64| b.min(p)));
                            }
                            p += 2;
                        }
                        v
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().unwrap_or_default())
                .collect()
        });
        parts
            .into_iter()
            .fold(Verification::default(), |a, b| Verification {
                pages: a.pages + b.pages,
                zero: a.zero + b.zero,
                bad: a.bad + b.bad,
                first_bad: match (a.first_bad, b.first_bad) {
                    (Some(x), Some(y)) => Some(x.min(y)),
                    (x, y) => x.or(y),
                },
            })
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(rate: u64) -> WriterConfig {
        WriterConfig {
            writers: 2,
            pages_per_sec: rate,
            pattern: Pattern::Random,
            hot_pages: 16,
        }
    }

    #[test]
    fn save_restore_round_trip_verifies_and_continues() {
        let mut w = Workload::create(
            &[256 * PAGE as u64, 64 * PAGE as u64],
            PAGE as u64,
            50,
            cfg(20_000),
        )
        .expect("create");
        w.clear_dirty();
        w.start();
        std::thread::sleep(Duration::from_millis(100));
        w.pause();
        let before = w.counters();
        assert!(before.iter().sum::<u64>() > 0, "writers wrote nothing");
        let dirty = w.take_dirty();
        assert!(dirty.iter().flatten().any(|&x| x != 0));
        let v = w.verify();
        assert_eq!(v.bad, 0, "{v:?}");
        let blob = w.save();
        // Hand the same memfds to a restored VM, as the destination does.
        let regions: Vec<_> = w
            .layout
            .iter()
            .zip(w.memfds.drain(..))
            .map(|(i, f)| (*i, f))
            .collect();
        let mut r = Workload::restore(regions, &blob, cfg(20_000)).expect("restore");
        assert_eq!(r.verify().bad, 0);
        assert_eq!(r.counters(), before);
        r.start();
        std::thread::sleep(Duration::from_millis(100));
        r.pause();
        assert!(r.counters().iter().zip(&before).all(|(a, b)| a > b));
        assert_eq!(r.verify().bad, 0);
    }

    #[test]
    fn a_stale_page_is_caught() {
        let w = Workload::create(&[64 * PAGE as u64], PAGE as u64, 100, cfg(0)).expect("create");
        assert_eq!(w.verify().bad, 0);
        // Bump a generation without writing: the page now holds an old version.
        w.shared.gens[7].store(2, Ordering::Release);
        let v = w.verify();
        assert_eq!((v.bad, v.first_bad), (1, Some(7)));
    }

    #[test]
    fn corrupt_blobs_are_refused() {
        let w = Workload::create(&[64 * PAGE as u64], PAGE as u64, 10, cfg(0)).expect("create");
        let blob = w.save();
        for cut in [0, 5, 20, blob.len() - 1] {
            let (r, fd) = GuestRegion::create("t", 64 * PAGE as u64).expect("create");
            drop(r);
            let info = RegionInfo {
                gpa: 0,
                size: 64 * PAGE as u64,
                offset: 0,
            };
            assert!(Workload::restore(vec![(info, fd)], &blob[..cut], cfg(0)).is_err());
        }
    }
}
