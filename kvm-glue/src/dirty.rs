//! Dirty-page tracking per memory slot, switched on only for a migration.
//!
//! [`DirtyTracker`] owns the dirty-logging life cycle of a VM's RAM slots:
//!
//! 1. [`DirtyTracker::new`] picks the mechanism (before any vCPU exists, because the dirty
//!    ring must be enabled then): by default `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` with
//!    `KVM_GET_DIRTY_LOG` + `KVM_CLEAR_DIRTY_LOG` ([`DirtyMode::ManualProtect`]); the
//!    classic `KVM_GET_DIRTY_LOG`-clears-too bitmap where that capability is missing
//!    ([`DirtyMode::Classic`]); or, on request, the per-vCPU dirty ring ([`DirtyMode::Ring`]).
//! 2. [`DirtyTracker::start`] re-sets every slot with `KVM_MEM_LOG_DIRTY_PAGES`: from then
//!    on the guest's writes are logged (and, for the slot pages, write-protected).
//! 3. [`DirtyTracker::get_and_clear`] returns one bitmap per slot and **re-protects the
//!    returned pages before it returns** (docs/design.md §2, "Dirty-log order": get-and-clear,
//!    then send; never clear after sending). A page the guest writes after the clear is in
//!    the next result.
//! 4. [`DirtyTracker::stop`] re-sets the slots without the flag.
//!
//! Writes the VMM itself makes to guest memory are invisible to KVM (docs/platform.md: host writes
//! are not logged). The VMM records them in the tracker's [`OwnWrites`] bitmap (atomic
//! words, any thread, **after** the write), and every result ORs them in.
//!
//! # Bitmap layout
//!
//! One `Vec<u64>` per slot, bit `i` = page `i` of the slot (4 KiB pages), LSB first within
//! each word, `ceil(pages / 64)` words: KVM's layout, and the one the sidecar protocol uses.
//!
//! # Clearing in bounded pieces
//!
//! In manual-protect mode the clear is issued only over the words that have bits set, in
//! 64-page aligned pieces (the kernel's rule) of at most [`MAX_CLEAR_WORDS`] words per
//! ioctl. docs/platform.md measured ~0.5-0.7 ms to clear 65,536 pages in one call, so a piece of
//! 16,384 pages holds the kernel's `mmu_lock` for ~0.15-0.2 ms at most: vCPUs that fault in
//! the meantime never wait long. Runs of set words separated by up to
//! [`CLEAR_MERGE_GAP_WORDS`] zero words share one ioctl (zero words cost the kernel one load
//! each, an ioctl costs ~2-4 us).
//!
//! # The dirty ring
//!
//! docs/platform.md: the ring loses entries when KVM's instruction emulator writes guest memory
//! (a kernel WARN in `kvm_dirty_ring_push` under PVM), so it is an option for CPL3 guests
//! only. A vCPU that fills its ring exits with `KVM_EXIT_DIRTY_RING_FULL` (reason 31,
//! `VcpuExit::Unsupported(31)` in kvm-ioctls); its thread must call
//! [`DirtyTracker::handle_ring_full`] before re-entering `KVM_RUN`. Harvested entries are
//! kept in the tracker until the next `get_and_clear`.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_enable_cap, kvm_userspace_memory_region, KVM_CAP_DIRTY_LOG_RING,
    KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::{VcpuFd, VmFd};

use crate::error::{Error, Result};
use crate::ioctls::{self, DirtyRingMap};

/// Guest page size the bitmaps count in.
pub const PAGE_SIZE: u64 = 4096;

/// Largest clear per `KVM_CLEAR_DIRTY_LOG` call, in bitmap words (256 words = 16,384 pages
/// = 64 MiB): ~0.15-0.2 ms of kernel time at docs/platform.md's measured clear cost.
pub const MAX_CLEAR_WORDS: usize = 256;

/// Zero words tolerated inside one clear range before it is split in two.
pub const CLEAR_MERGE_GAP_WORDS: usize = 8;

/// `KVM_DIRTY_GFN_F_DIRTY` (include/uapi/linux/kvm.h): the kernel published this entry.
const DIRTY_GFN_F_DIRTY: u32 = 1;
/// `KVM_DIRTY_GFN_F_RESET`: userspace harvested this entry, the kernel may reset it.
const DIRTY_GFN_F_RESET: u32 = 2;

/// Number of `u64` words a bitmap of `pages` pages needs.
pub fn bitmap_words(pages: u64) -> usize {
    usize::try_from(pages.div_ceil(64)).unwrap_or(usize::MAX)
}

/// One guest RAM slot as the VMM registered it with `KVM_SET_USER_MEMORY_REGION`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemorySlot {
    /// KVM slot id.
    pub slot: u32,
    /// Guest-physical base address (4 KiB aligned).
    pub guest_phys_addr: u64,
    /// Size in bytes (multiple of 4 KiB).
    pub memory_size: u64,
    /// Host virtual address of the slot's mapping.
    pub userspace_addr: u64,
    /// The flags the VMM uses when not migrating (normally 0).
    pub flags: u32,
}

impl MemorySlot {
    /// Pages in the slot.
    pub fn pages(&self) -> u64 {
        self.memory_size / PAGE_SIZE
    }

    fn region(&self, flags: u32) -> kvm_userspace_memory_region {
        kvm_userspace_memory_region {
            slot: self.slot,
            flags,
            guest_phys_addr: self.guest_phys_addr,
            memory_size: self.memory_size,
            userspace_addr: self.userspace_addr,
        }
    }
}

/// Which mechanism to ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DirtyModeRequest {
    /// Manual protect where the host has it, else the classic bitmap. The default.
    #[default]
    Auto,
    /// The classic bitmap (`KVM_GET_DIRTY_LOG` also clears), even if manual protect exists.
    Classic,
    /// The dirty ring with this many bytes per vCPU (a power of two, multiple of the page
    /// size; each entry is 16 bytes). Errors if the host lacks the capability.
    Ring {
        /// Ring size in bytes per vCPU.
        bytes: u32,
    },
}

/// The mechanism a tracker uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirtyMode {
    /// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`: GET reads, CLEAR re-protects in pieces.
    ManualProtect,
    /// `KVM_GET_DIRTY_LOG` reads and re-protects the whole slot in one call.
    Classic,
    /// Per-vCPU dirty rings + `KVM_RESET_DIRTY_RINGS`.
    Ring {
        /// Ring size in bytes per vCPU.
        bytes: u32,
        /// Whether the acquire/release flavour (`KVM_CAP_DIRTY_LOG_RING_ACQ_REL`) is on.
        acq_rel: bool,
    },
}

/// Dirty-logging capabilities of a VM's host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirtyCaps {
    /// Bits supported by `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` (0 = absent; 1 = protect,
    /// 2 = initially-set).
    pub manual_protect2: u32,
    /// Largest ring in bytes from `KVM_CAP_DIRTY_LOG_RING_ACQ_REL` (0 = absent).
    pub ring_acq_rel_max: u32,
    /// Largest ring in bytes from `KVM_CAP_DIRTY_LOG_RING` (0 = absent).
    pub ring_max: u32,
}

impl DirtyCaps {
    /// Reads the capabilities from `vm`.
    pub fn probe(vm: &VmFd) -> Self {
        let get = |cap: u32| u32::try_from(vm.check_extension_raw(u64::from(cap))).unwrap_or(0);
        Self {
            manual_protect2: get(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2),
            ring_acq_rel_max: get(KVM_CAP_DIRTY_LOG_RING_ACQ_REL),
            ring_max: get(KVM_CAP_DIRTY_LOG_RING),
        }
    }
}

/// The VMM's own writes to guest memory, one atomic bit per page per slot.
///
/// Mark **after** the write is complete: `get_and_clear` takes (and zeroes) the bits, so a
/// mark that precedes its write could be taken, the page sent, and the write then land
/// unrecorded.
#[derive(Debug)]
pub struct OwnWrites {
    slots: Vec<(u64, u64, Vec<AtomicU64>)>,
}

impl OwnWrites {
    fn new(slots: &[MemorySlot]) -> Self {
        Self {
            slots: slots
                .iter()
                .map(|s| {
                    let words = (0..bitmap_words(s.pages()))
                        .map(|_| AtomicU64::new(0))
                        .collect();
                    (s.guest_phys_addr, s.memory_size, words)
                })
                .collect(),
        }
    }

    /// Records that the VMM wrote `len` bytes at guest-physical `gpa`.
    ///
    /// # Errors
    ///
    /// [`Error::OwnWriteOutsideSlots`] if any byte of the range is outside every slot (the
    /// pages inside slots are still recorded).
    pub fn mark(&self, gpa: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let end = gpa.saturating_add(len);
        let mut covered = 0u64;
        for (base, size, words) in &self.slots {
            let lo = gpa.max(*base);
            let hi = end.min(base.saturating_add(*size));
            if lo >= hi {
                continue;
            }
            covered += hi - lo;
            let first = (lo - base) / PAGE_SIZE;
            let last = (hi - 1 - base) / PAGE_SIZE;
            for page in first..=last {
                if let Some(w) = words.get((page / 64) as usize) {
                    w.fetch_or(1u64 << (page % 64), Ordering::Release);
                }
            }
        }
        if covered == len {
            Ok(())
        } else {
            Err(Error::OwnWriteOutsideSlots { gpa, len })
        }
    }

    /// Takes every recorded bit of slot number `index` (position in the tracker's slot
    /// list) and ORs it into `out`. Returns the number of bits taken.
    fn take_into(&self, index: usize, out: &mut [u64]) -> u64 {
        let mut n = 0;
        if let Some((_, _, words)) = self.slots.get(index) {
            for (w, o) in words.iter().zip(out.iter_mut()) {
                // Cheap read first: most words are zero, and a swap would dirty the line.
                if w.load(Ordering::Relaxed) != 0 {
                    let bits = w.swap(0, Ordering::AcqRel);
                    n += u64::from(bits.count_ones());
                    *o |= bits;
                }
            }
        }
        n
    }

    fn reset(&self) {
        for (_, _, words) in &self.slots {
            for w in words {
                w.store(0, Ordering::Relaxed);
            }
        }
    }
}

/// One slot's part of a dirty-log result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotBitmap {
    /// KVM slot id.
    pub slot: u32,
    /// Guest-physical base of the slot.
    pub guest_phys_addr: u64,
    /// Pages in the slot.
    pub pages: u64,
    /// `ceil(pages / 64)` words, bit `i` = page `i`, LSB first.
    pub bitmap: Vec<u64>,
}

impl SlotBitmap {
    /// Number of dirty pages.
    pub fn count(&self) -> u64 {
        self.bitmap.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Whether page `page` of the slot is dirty.
    pub fn is_dirty(&self, page: u64) -> bool {
        self.bitmap
            .get((page / 64) as usize)
            .is_some_and(|w| w & (1 << (page % 64)) != 0)
    }
}

/// Costs of one `get_and_clear`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DirtyStats {
    /// Pages reported (KVM's log OR own writes).
    pub dirty_pages: u64,
    /// Of which recorded in the own-writes bitmap.
    pub own_write_pages: u64,
    /// Time in `KVM_GET_DIRTY_LOG` (or ring harvesting), all slots.
    pub get: Duration,
    /// Time in `KVM_CLEAR_DIRTY_LOG` (or `KVM_RESET_DIRTY_RINGS`), all slots.
    pub clear: Duration,
    /// Number of clear ioctls issued.
    pub clear_calls: u32,
    /// Longest single clear ioctl.
    pub max_clear: Duration,
}

/// The result of one `get_and_clear`: one bitmap per slot, in the tracker's slot order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyLog {
    /// One entry per slot.
    pub slots: Vec<SlotBitmap>,
    /// What it cost.
    pub stats: DirtyStats,
}

impl DirtyLog {
    /// Total dirty pages over all slots.
    pub fn dirty_pages(&self) -> u64 {
        self.slots.iter().map(SlotBitmap::count).sum()
    }
}

#[derive(Debug)]
struct RingState {
    map: DirtyRingMap,
    fetch: u32,
}

#[derive(Debug)]
struct Inner {
    logging: bool,
    /// Reused GET buffers, one per slot.
    scratch: Vec<Vec<u64>>,
    /// Ring mode: entries harvested (on ring-full exits) since the last `get_and_clear`.
    pending: Vec<Vec<u64>>,
    rings: Vec<RingState>,
}

/// Dirty tracking for a set of memory slots. See the module docs for the life cycle.
///
/// Share it with `Arc`: every method takes `&self` (an internal mutex serialises the
/// KVM-side work; [`OwnWrites`] is lock-free).
#[derive(Debug)]
pub struct DirtyTracker {
    slots: Vec<MemorySlot>,
    mode: DirtyMode,
    own: Arc<OwnWrites>,
    inner: Mutex<Inner>,
    ring_full_exits: AtomicU32,
}

impl DirtyTracker {
    /// Creates a tracker for `slots` and enables the capability the mode needs.
    ///
    /// Call it before creating vCPUs when asking for the ring (KVM only enables the ring on
    /// a VM without vCPUs); manual protect can be enabled at any time before `start`.
    ///
    /// # Safety
    ///
    /// Each entry of `slots` must describe a region already registered with `vm` with
    /// exactly these `slot`, `guest_phys_addr`, `memory_size` and `userspace_addr`, and its
    /// host mapping must stay valid for as long as `vm` may use it (the tracker re-registers
    /// the same region with other flags, which is as sound as the VMM's own registration).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidSlot`] for an empty, unaligned or duplicated slot;
    /// [`Error::CapabilityMissing`] when the ring is asked for and absent;
    /// [`Error::EnableCap`] when the kernel refuses the capability.
    ///
    /// # Panics
    ///
    /// Never.
    pub unsafe fn new(
        vm: &VmFd,
        slots: Vec<MemorySlot>,
        request: DirtyModeRequest,
    ) -> Result<Self> {
        for (i, s) in slots.iter().enumerate() {
            let reason = if s.memory_size == 0 {
                Some("empty")
            } else if s.memory_size % PAGE_SIZE != 0 || s.guest_phys_addr % PAGE_SIZE != 0 {
                Some("not 4 KiB aligned")
            } else if slots[..i].iter().any(|o| o.slot == s.slot) {
                Some("listed twice")
            } else {
                None
            };
            if let Some(reason) = reason {
                return Err(Error::InvalidSlot {
                    slot: s.slot,
                    reason,
                });
            }
        }
        let caps = DirtyCaps::probe(vm);
        let mode = match request {
            DirtyModeRequest::Classic => DirtyMode::Classic,
            DirtyModeRequest::Auto
                if caps.manual_protect2 & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE != 0 =>
            {
                // Protect only: not KVM_DIRTY_LOG_INITIALLY_SET, so the first result holds
                // exactly the pages written after `start` (round 1 reads all of RAM anyway).
                enable_cap(
                    vm,
                    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                    "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2",
                    u64::from(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE),
                )?;
                DirtyMode::ManualProtect
            }
            DirtyModeRequest::Auto => DirtyMode::Classic,
            DirtyModeRequest::Ring { bytes } => {
                let (cap, name, max, acq_rel) = if caps.ring_acq_rel_max > 0 {
                    (
                        KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
                        "KVM_CAP_DIRTY_LOG_RING_ACQ_REL",
                        caps.ring_acq_rel_max,
                        true,
                    )
                } else if caps.ring_max > 0 {
                    (
                        KVM_CAP_DIRTY_LOG_RING,
                        "KVM_CAP_DIRTY_LOG_RING",
                        caps.ring_max,
                        false,
                    )
                } else {
                    return Err(Error::CapabilityMissing {
                        cap: "KVM_CAP_DIRTY_LOG_RING",
                    });
                };
                if bytes == 0 || bytes > max || !bytes.is_power_of_two() {
                    return Err(Error::EnableCap {
                        cap: name,
                        arg: u64::from(bytes),
                        source: kvm_ioctls::Error::new(libc::EINVAL),
                    });
                }
                enable_cap(vm, cap, name, u64::from(bytes))?;
                DirtyMode::Ring { bytes, acq_rel }
            }
        };
        let scratch = slots
            .iter()
            .map(|s| vec![0u64; bitmap_words(s.pages())])
            .collect();
        let pending = slots
            .iter()
            .map(|s| vec![0u64; bitmap_words(s.pages())])
            .collect();
        Ok(Self {
            own: Arc::new(OwnWrites::new(&slots)),
            slots,
            mode,
            inner: Mutex::new(Inner {
                logging: false,
                scratch,
                pending,
                rings: Vec::new(),
            }),
            ring_full_exits: AtomicU32::new(0),
        })
    }

    /// The mechanism in use.
    pub fn mode(&self) -> DirtyMode {
        self.mode
    }

    /// The tracked slots, in result order.
    pub fn slots(&self) -> &[MemorySlot] {
        &self.slots
    }

    /// The VMM's own-writes bitmap; clone the `Arc` into every thread that writes guest RAM.
    pub fn own_writes(&self) -> Arc<OwnWrites> {
        Arc::clone(&self.own)
    }

    /// Whether logging is on.
    pub fn is_logging(&self) -> bool {
        self.lock().logging
    }

    /// How many `KVM_EXIT_DIRTY_RING_FULL` exits were handled.
    pub fn ring_full_exits(&self) -> u32 {
        self.ring_full_exits.load(Ordering::Relaxed)
    }

    /// Ring mode: maps `vcpu`'s dirty ring. Call once per vCPU, right after creating it.
    /// A no-op in the bitmap modes.
    ///
    /// # Errors
    ///
    /// [`Error::MapDirtyRing`].
    pub fn attach_vcpu(&self, vcpu: &VcpuFd) -> Result<()> {
        if let DirtyMode::Ring { bytes, .. } = self.mode {
            let map = DirtyRingMap::map(vcpu, bytes as usize).map_err(Error::MapDirtyRing)?;
            self.lock().rings.push(RingState { map, fetch: 0 });
        }
        Ok(())
    }

    /// Switches dirty logging on for every slot (and forgets earlier own writes).
    ///
    /// # Errors
    ///
    /// [`Error::SetMemoryRegion`]; slots switched on before the failure are switched off
    /// again.
    pub fn start(&self, vm: &VmFd) -> Result<()> {
        let mut inner = self.lock();
        if inner.logging {
            return Ok(());
        }
        for (i, s) in self.slots.iter().enumerate() {
            if let Err(e) = self.set_flags(vm, s, s.flags | KVM_MEM_LOG_DIRTY_PAGES) {
                for done in &self.slots[..i] {
                    let _ = self.set_flags(vm, done, done.flags);
                }
                return Err(e);
            }
        }
        self.own.reset();
        for p in &mut inner.pending {
            p.fill(0);
        }
        inner.logging = true;
        Ok(())
    }

    /// Switches dirty logging off for every slot.
    ///
    /// # Errors
    ///
    /// [`Error::SetMemoryRegion`] (the first failure; the other slots are still tried).
    pub fn stop(&self, vm: &VmFd) -> Result<()> {
        let mut inner = self.lock();
        if !inner.logging {
            return Ok(());
        }
        let mut first_err = None;
        for s in &self.slots {
            if let Err(e) = self.set_flags(vm, s, s.flags) {
                first_err.get_or_insert(e);
            }
        }
        inner.logging = false;
        first_err.map_or(Ok(()), Err)
    }

    /// Returns every page dirtied since `start` or the previous call (KVM's log OR the own
    /// writes) and re-protects them before returning.
    ///
    /// # Errors
    ///
    /// [`Error::NotLogging`], [`Error::GetDirtyLog`], [`Error::ClearDirtyLog`],
    /// [`Error::ResetDirtyRings`]. After an error the caller must treat all of RAM as dirty
    /// (part of the log may have been consumed).
    pub fn get_and_clear(&self, vm: &VmFd) -> Result<DirtyLog> {
        let mut inner = self.lock();
        if !inner.logging {
            return Err(Error::NotLogging);
        }
        let mut stats = DirtyStats::default();
        let mut out: Vec<SlotBitmap> = Vec::with_capacity(self.slots.len());
        match self.mode {
            DirtyMode::ManualProtect | DirtyMode::Classic => {
                for (i, s) in self.slots.iter().enumerate() {
                    let buf = &mut inner.scratch[i];
                    buf.fill(0);
                    let t = Instant::now();
                    // SAFETY: `DirtyTracker::new`'s caller guarantees every slot is registered
                    // with KVM with exactly these values, so `memory_size / 4096` is the
                    // slot's page count as the kernel knows it.
                    unsafe { ioctls::get_dirty_log_into(vm, s.slot, s.memory_size / 4096, buf) }
                        .map_err(|source| Error::GetDirtyLog {
                            slot: s.slot,
                            source,
                        })?;
                    stats.get += t.elapsed();
                    if self.mode == DirtyMode::ManualProtect {
                        clear_in_pieces(vm, s, buf, &mut stats)?;
                    }
                    out.push(SlotBitmap {
                        slot: s.slot,
                        guest_phys_addr: s.guest_phys_addr,
                        pages: s.pages(),
                        bitmap: buf.clone(),
                    });
                }
            }
            DirtyMode::Ring { .. } => {
                let t = Instant::now();
                self.harvest_locked(&mut inner)?;
                stats.get += t.elapsed();
                let t = Instant::now();
                ioctls::reset_dirty_rings(vm).map_err(Error::ResetDirtyRings)?;
                stats.clear += t.elapsed();
                stats.clear_calls += 1;
                stats.max_clear = stats.clear;
                for (i, s) in self.slots.iter().enumerate() {
                    let words = std::mem::replace(
                        &mut inner.pending[i],
                        vec![0u64; bitmap_words(s.pages())],
                    );
                    out.push(SlotBitmap {
                        slot: s.slot,
                        guest_phys_addr: s.guest_phys_addr,
                        pages: s.pages(),
                        bitmap: words,
                    });
                }
            }
        }
        drop(inner);
        for (i, sb) in out.iter_mut().enumerate() {
            stats.own_write_pages += self.own.take_into(i, &mut sb.bitmap);
            // Bits past the end of the slot are never set by KVM; keep own writes honest too.
            mask_tail(&mut sb.bitmap, sb.pages);
            stats.dirty_pages += sb.count();
        }
        Ok(DirtyLog { slots: out, stats })
    }

    /// Ring mode: call from the vCPU thread on `KVM_EXIT_DIRTY_RING_FULL` (exit reason 31)
    /// before entering `KVM_RUN` again. Harvests every ring into the pending bitmaps and
    /// resets them. A no-op in the bitmap modes.
    ///
    /// # Errors
    ///
    /// [`Error::RingUnknownSlot`], [`Error::ResetDirtyRings`].
    pub fn handle_ring_full(&self, vm: &VmFd) -> Result<()> {
        if !matches!(self.mode, DirtyMode::Ring { .. }) {
            return Ok(());
        }
        self.ring_full_exits.fetch_add(1, Ordering::Relaxed);
        let mut inner = self.lock();
        self.harvest_locked(&mut inner)?;
        ioctls::reset_dirty_rings(vm).map_err(Error::ResetDirtyRings)?;
        Ok(())
    }

    fn harvest_locked(&self, inner: &mut Inner) -> Result<()> {
        let Inner { rings, pending, .. } = inner;
        for ring in rings.iter_mut() {
            loop {
                let e = ring.map.entry_ptr(ring.fetch);
                // SAFETY: `e` points into the live ring mapping (`entry_ptr` keeps the index
                // in bounds; the map lives in `ring`). `flags` is a naturally aligned u32 that
                // the kernel writes concurrently, so it is only touched atomically; AtomicU32
                // has the same layout as u32.
                let flags = unsafe { &*std::ptr::addr_of!((*e).flags).cast::<AtomicU32>() };
                if flags.load(Ordering::Acquire) & DIRTY_GFN_F_DIRTY == 0 {
                    break;
                }
                // SAFETY: the acquire load above saw DIRTY, so the kernel finished writing
                // slot/offset (it publishes them before the flag) and will not touch this
                // entry until we set RESET and call KVM_RESET_DIRTY_RINGS.
                let (slot, offset) = unsafe { ((*e).slot, (*e).offset) };
                let as_slot = slot & 0xffff;
                let idx = self
                    .slots
                    .iter()
                    .position(|s| s.slot == as_slot)
                    .ok_or(Error::RingUnknownSlot { slot })?;
                if let Some(w) = pending[idx].get_mut((offset / 64) as usize) {
                    *w |= 1 << (offset % 64);
                }
                flags.store(DIRTY_GFN_F_RESET, Ordering::Release);
                ring.fetch = ring.fetch.wrapping_add(1);
            }
        }
        Ok(())
    }

    fn set_flags(&self, vm: &VmFd, s: &MemorySlot, flags: u32) -> Result<()> {
        // SAFETY: `new`'s contract: the region is already registered with these addresses
        // and its host mapping outlives the VM's use; only the flags change.
        unsafe { vm.set_user_memory_region(s.region(flags)) }.map_err(|source| {
            Error::SetMemoryRegion {
                slot: s.slot,
                flags,
                source,
            }
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves only bitmaps behind, which stay consistent
        // enough to read; recover instead of propagating the poison.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn enable_cap(vm: &VmFd, cap: u32, name: &'static str, arg: u64) -> Result<()> {
    let mut c = kvm_enable_cap {
        cap,
        ..Default::default()
    };
    c.args[0] = arg;
    vm.enable_cap(&c).map_err(|source| Error::EnableCap {
        cap: name,
        arg,
        source,
    })
}

/// Issues `KVM_CLEAR_DIRTY_LOG` over the set words of `bitmap` in bounded pieces.
fn clear_in_pieces(
    vm: &VmFd,
    s: &MemorySlot,
    bitmap: &[u64],
    stats: &mut DirtyStats,
) -> Result<()> {
    for (start, end) in clear_ranges(bitmap, MAX_CLEAR_WORDS, CLEAR_MERGE_GAP_WORDS) {
        let first_page = start as u64 * 64;
        let num_pages = ((end - start) as u64 * 64).min(s.pages() - first_page);
        let num_pages = u32::try_from(num_pages).unwrap_or(u32::MAX);
        let t = Instant::now();
        ioctls::clear_dirty_log(vm, s.slot, first_page, num_pages, &bitmap[start..end]).map_err(
            |source| Error::ClearDirtyLog {
                slot: s.slot,
                first_page,
                num_pages,
                source,
            },
        )?;
        let d = t.elapsed();
        stats.clear += d;
        stats.max_clear = stats.max_clear.max(d);
        stats.clear_calls += 1;
    }
    Ok(())
}

/// Word ranges `[start, end)` to clear: every set word is inside exactly one range, each
/// range starts and ends on a set word, holds at most `max_words` words, and ranges are
/// merged across at most `gap` zero words.
pub fn clear_ranges(bitmap: &[u64], max_words: usize, gap: usize) -> Vec<(usize, usize)> {
    let max_words = max_words.max(1);
    let mut out = Vec::new();
    let mut cur: Option<(usize, usize)> = None; // [start, last set word]
    for (i, &w) in bitmap.iter().enumerate() {
        if w == 0 {
            continue;
        }
        cur = match cur {
            Some((s, last)) if i - last <= gap + 1 && i - s < max_words => Some((s, i)),
            Some((s, last)) => {
                out.push((s, last + 1));
                Some((i, i))
            }
            None => Some((i, i)),
        };
    }
    if let Some((s, last)) = cur {
        out.push((s, last + 1));
    }
    out
}

fn mask_tail(bitmap: &mut [u64], pages: u64) {
    let full = (pages / 64) as usize;
    let rem = pages % 64;
    if rem != 0 {
        if let Some(w) = bitmap.get_mut(full) {
            *w &= (1u64 << rem) - 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clear_ranges_cover_every_set_word_within_bounds() {
        let mut bm = vec![0u64; 2000];
        for i in [0usize, 1, 5, 20, 21, 300, 301, 302, 1999] {
            bm[i] = 1 << (i % 64);
        }
        bm[600..1200].fill(u64::MAX);
        let ranges = clear_ranges(&bm, 256, 8);
        for (i, &w) in bm.iter().enumerate() {
            let n = ranges.iter().filter(|(s, e)| (*s..*e).contains(&i)).count();
            if w != 0 {
                assert_eq!(n, 1, "word {i}");
            }
        }
        for &(s, e) in &ranges {
            assert!(e - s <= 256);
            assert_ne!(bm[s], 0);
            assert_ne!(bm[e - 1], 0);
        }
        // 0,1,5 merge (gap <= 8); 20,21 separate from 5 (gap 14).
        assert_eq!(ranges[0], (0, 6));
        assert_eq!(ranges[1], (20, 22));
        assert_eq!(ranges[2], (300, 303));
    }

    #[test]
    fn clear_ranges_empty() {
        assert!(clear_ranges(&[0; 100], 256, 8).is_empty());
    }

    #[test]
    fn own_writes_mark_and_take() {
        let slots = [
            MemorySlot {
                slot: 0,
                guest_phys_addr: 0,
                memory_size: 1 << 20,
                userspace_addr: 0,
                flags: 0,
            },
            MemorySlot {
                slot: 1,
                guest_phys_addr: 1 << 20,
                memory_size: 1 << 20,
                userspace_addr: 0,
                flags: 0,
            },
        ];
        let own = OwnWrites::new(&slots);
        // Straddles the two slots: last page of slot 0, first two of slot 1.
        own.mark((1 << 20) - 8, 4096 + 16).expect("inside");
        assert!(own.mark(2 << 20, 1).is_err());
        let mut a = vec![0u64; 4];
        let mut b = vec![0u64; 4];
        assert_eq!(own.take_into(0, &mut a), 1);
        assert_eq!(own.take_into(1, &mut b), 2);
        assert_eq!(a[3], 1 << 63);
        assert_eq!(b[0], 0b11);
        assert_eq!(own.take_into(1, &mut b), 0);
    }

    #[test]
    fn mask_tail_drops_bits_past_the_slot() {
        let mut bm = vec![u64::MAX, u64::MAX];
        mask_tail(&mut bm, 70);
        assert_eq!(bm[1], 0b111111);
    }
}
