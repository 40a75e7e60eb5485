//! Surviving a guest-RAM memfd that is smaller than its mapping.
//!
//! The source sidecar maps the VMM's memfds `MAP_SHARED` and reads them with ordinary
//! loads (copying pages out to hash them, hashing whole regions). A load from a page
//! that lies past the memfd's end raises `SIGBUS`, whose default action kills the whole
//! sidecar and with it every migration on the host. That happens when the VMM registers
//! a region larger than its memfd, or truncates the memfd (`ftruncate`) later. This
//! module gives two defences:
//!
//! - [`check_covers`]: a cheap up-front `fstat` check that the memfd covers a region,
//!   to refuse a bad registration with a clear error before anything is mapped.
//! - [`Guarded`]: a SIGBUS-safe read path for a truncation that happens later. While a
//!   mapping range is registered, a `SIGBUS` in it is absorbed by a process-wide
//!   handler ([`install`]): the handler maps a fresh anonymous zero page over the
//!   faulting page (`mmap(MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS)`), counts the fault
//!   and returns, so the faulting load runs again and reads zeros. The reader checks
//!   [`Guarded::faulted`] after its reads and, if set, treats everything it read from
//!   the range as suspect and aborts the migration.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let (base, len): (*mut u8, usize) = (std::ptr::null_mut(), 0);
//! use ferry_proto::guard::Guarded;
//!
//! // `base`/`len`: a MAP_SHARED mapping of the VMM's memfd, unmapped only after `g` drops.
//! let g = Guarded::register(base, len)?;
//! let mut page = [0u8; 4096];
//! // SAFETY (of the example): `base` is valid for `len >= 4096` bytes.
//! unsafe { std::ptr::copy_nonoverlapping(base, page.as_mut_ptr(), page.len()) };
//! if g.faulted() {
//!     // The memfd shrank under us: abort the migration, drop `g`, unmap.
//! }
//! # Ok(())
//! # }
//! ```
//!
//! # Why absorbing the fault is sound
//!
//! - Only a kernel-generated `SIGBUS` with `si_code == BUS_ADRERR` (access to a page
//!   with no backing, i.e. past the end of the file) whose `si_addr` lies in a
//!   registered range is absorbed. Memory errors (`BUS_MCEERR_*`), alignment faults,
//!   `BUS_OBJERR`, a `SIGBUS` sent with `kill`/`tgkill`, and any fault outside every
//!   registered range go to the previous handler, or, if there was none, the handler is
//!   reset to `SIG_DFL` and the signal raised again: the process dies of `SIGBUS` as it
//!   would have without this module.
//! - The fault is synchronous: the signal is delivered to the thread that executed the
//!   load, and returning from the handler re-executes that load (string copies such as
//!   `rep movsb` resume where they stopped). The zero page is mapped before the handler
//!   returns, so the retried load succeeds. Several threads faulting on the same page
//!   each map a zero page over it; every one of them reads zeros.
//! - Replacing the page with `MAP_FIXED` over a shared file mapping is intended: the
//!   sidecar never writes source memory, and after a fault the migration is aborted and
//!   the mapping dropped. Nothing is lost: the page it replaces has no backing anyway.
//!   The replacement splits the mapping (adjacent replaced pages merge into one
//!   anonymous VMA); the anonymous pages go away with the rest when the range is
//!   unmapped. The fault is counted before the zero page is mapped, so a thread that
//!   reads a zero page another thread's fault put there also finds the fault recorded.
//! - The handler is async-signal-safe: it allocates nothing, takes no lock and formats
//!   nothing. It reads a fixed static table of atomics (lock-free on every 64-bit
//!   target), issues the `mmap` system call directly (`syscall(SYS_mmap)`, a plain
//!   kernel entry; libc's `mmap` is not on POSIX's async-signal-safe list, and musl's
//!   waits on an internal lock for `MAP_FIXED`), and for a foreign fault calls the
//!   previous handler or `sigaction` + `raise` (both async-signal-safe). It saves and
//!   restores `errno`, and cannot panic (no indexing, no unwrapping).
//! - The pages read as zeros are memory the reader copies out of (never a Rust
//!   reference to the shared bytes), so a page turning into zeros mid-copy is the same
//!   kind of event as the guest writing it mid-copy: the copy may be torn (part data,
//!   part zeros); [`Guarded::faulted`] says so.
//!
//! # The table and its ordering
//!
//! Ranges live in a static table of [`MAX_GUARDED`] slots, each a small seqlock of
//! atomics (`seq`, `base`, `len`, a fault counter). [`Guarded::register`] claims a free
//! slot with `compare_exchange` and publishes it; dropping the [`Guarded`] retires it.
//! The owner of a slot is its only writer:
//!
//! - publish: `seq` becomes odd, a `Release` fence, the fault counter is zeroed, `base`
//!   is stored, then `len` (after `base`), then `seq` becomes even with `Release`;
//! - retire: `seq` becomes odd, a `Release` fence, `len` is cleared (before `base`),
//!   then `base`, then `seq` becomes even with `Release`, then the slot is freed.
//!
//! The handler reads `seq` (`Acquire`), `base` and `len`, an `Acquire` fence, and `seq`
//! again; it uses the pair only if both reads of `seq` are equal and even and `len` is
//! not 0, so it never pairs the `base` of one registration with the `len` of another
//! (which the order of the stores alone would not rule out when a slot is retired and
//! reclaimed between two of its reads). An odd `seq` means the slot is being published
//! or retired: the range is not (or no longer) registered, and the handler skips it
//! rather than wait, since the writer may be the very thread it interrupted. A slot
//! that keeps changing is retried a bounded number of times, then skipped. A
//! high-water mark bounds the scan to the slots ever used. None of this is on the read
//! path: loads from a guarded range run at full speed and the table is looked at only
//! when a `SIGBUS` arrives.
//!
//! # What it does not cover
//!
//! - **Writes.** A store to a truncated page is absorbed like a load, but it lands in
//!   the private zero page and is lost. The sidecar never writes source memory.
//! - **Copies done by the kernel.** `writev`/`sendmsg` from the mapping, `pwrite`,
//!   `MADV_POPULATE_READ` (`GuestRegion::prefault_data`) and other system calls that
//!   read the mapping take no `SIGBUS`: they fail with `EFAULT` (or return a short
//!   count), which callers see as an I/O error.
//! - **Pinned pages.** Pages pinned before the truncation (an RDMA memory registration,
//!   `MSG_ZEROCOPY`) stay readable by the device with their old contents: no fault, no
//!   flag. Check the memfd size again ([`check_covers`]) where that matters.
//! - **A truncation that no read hit.** [`Guarded::faulted`] reports absorbed faults,
//!   not the file's size.
//! - **hugetlbfs memfds (`MFD_HUGETLB`).** A 4 KiB `MAP_FIXED` inside a huge-page
//!   mapping fails; the handler then treats the fault as foreign and the process dies
//!   as before. Likewise if the `mmap` fails for lack of memory or of map count
//!   (`vm.max_map_count`).
//! - **Other `SIGBUS` users.** [`install`] chains to the handler in place when it runs
//!   (in a Rust program, std's stack-overflow handler, which resets `SIGBUS` to the
//!   default and lets the fault kill the process). It calls the previous handler with
//!   the same arguments, but does not emulate its `sa_mask`, `SA_NODEFER` or
//!   `SA_RESETHAND`. A handler installed *after* this one that does not chain disables
//!   the guard; so does a `kill`-sent `SIGBUS` handed to std's handler, which resets
//!   `SIGBUS` to `SIG_DFL`.
//! - **Cost per fault.** Each absorbed fault is a signal delivery, a table scan and an
//!   `mmap`: microseconds. A reader should stop at the first fault (check
//!   [`Guarded::faulted`] per page or per batch) rather than fault through gigabytes.
//!
//! # Signal stacks
//!
//! The handler is installed with `SA_ONSTACK`, so it runs on the thread's alternate
//! signal stack when there is one (std gives the main thread and the threads it spawns
//! one) and on the thread's own stack otherwise; its frame is small either way.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{
    compiler_fence, fence, AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering,
};
use std::sync::{Mutex, PoisonError};

use libc::{c_int, c_void, siginfo_t};

/// Most ranges that can be registered at once.
pub const MAX_GUARDED: usize = 4096;

/// How many times the handler rereads a slot that changed under it before skipping it.
const SLOT_READ_TRIES: usize = 4;

/// Errors from the memfd size check, the handler installation and range registration.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    /// `fstat` on the memory fd failed.
    #[error("Could not fstat the memory fd")]
    Fstat {
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The memory fd is not a regular file (a memfd is one), so its size means nothing.
    #[error("Memory fd is not a regular file (st_mode {mode:#o})")]
    NotRegularFile {
        /// `st_mode` as `fstat` returned it.
        mode: u32,
    },
    /// The region extends past the end of the memory fd: reading it would raise SIGBUS.
    #[error(
        "Region of {size} bytes at offset {offset} extends past the end of its memory fd \
         (st_size {st_size})"
    )]
    NotCovered {
        /// Start of the region in the file.
        offset: u64,
        /// Length of the region.
        size: u64,
        /// Size of the file.
        st_size: u64,
    },
    /// `sigaction` failed while installing the SIGBUS handler.
    #[error("Could not install the SIGBUS handler")]
    Install {
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The range to register is empty, not page-aligned or wraps around the address space.
    #[error(
        "Guarded range {base:#x}+{len:#x} is empty, not aligned to {page}-byte pages or \
         wraps around"
    )]
    BadRange {
        /// Start address.
        base: usize,
        /// Length in bytes.
        len: usize,
        /// The page size both must be multiples of.
        page: usize,
    },
    /// Every slot of the guarded-range table is in use.
    #[error("All {max} guarded-range slots are in use")]
    TableFull {
        /// [`MAX_GUARDED`].
        max: usize,
    },
}

/// Checks with `fstat` that `fd` (a regular file or memfd) covers `[offset, offset + size)`.
///
/// # Errors
///
/// [`GuardError::NotCovered`] (naming `st_size`) when the region extends past the end of
/// the file or `offset + size` overflows; [`GuardError::NotRegularFile`] for anything
/// but a regular file; [`GuardError::Fstat`] when `fstat` fails.
pub fn check_covers(fd: BorrowedFd<'_>, offset: u64, size: u64) -> Result<(), GuardError> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `fd` is an open descriptor for the duration of the borrow; `st` is
    // writable storage for one `struct stat`, which is all fstat writes.
    let rc = unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(GuardError::Fstat {
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: fstat returned 0, so it filled in the whole struct.
    let st = unsafe { st.assume_init() };
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(GuardError::NotRegularFile { mode: st.st_mode });
    }
    let st_size = u64::try_from(st.st_size).unwrap_or(0);
    match offset.checked_add(size) {
        Some(end) if end <= st_size => Ok(()),
        _ => Err(GuardError::NotCovered {
            offset,
            size,
            st_size,
        }),
    }
}

/// One registered range: a seqlock over `base`/`len` plus a fault counter.
struct Slot {
    /// Claimed by a live [`Guarded`] (or being claimed or retired). Not read by the handler.
    claimed: AtomicBool,
    /// Seqlock sequence: odd while the owner rewrites `base`/`len`.
    seq: AtomicUsize,
    /// Start of the range.
    base: AtomicUsize,
    /// Length of the range; 0 when the slot holds no range.
    len: AtomicUsize,
    /// Pages the handler replaced in this range since it was published.
    faults: AtomicU64,
}

impl Slot {
    const fn new() -> Self {
        Self {
            claimed: AtomicBool::new(false),
            seq: AtomicUsize::new(0),
            base: AtomicUsize::new(0),
            len: AtomicUsize::new(0),
            faults: AtomicU64::new(0),
        }
    }

    /// Writes `base`/`len` (`len` last) under the seqlock. Only the claimant calls this.
    fn publish(&self, base: usize, len: usize) {
        let s = self.seq.load(Ordering::Relaxed);
        self.seq.store(s.wrapping_add(1), Ordering::Relaxed);
        fence(Ordering::Release);
        self.faults.store(0, Ordering::Relaxed);
        self.base.store(base, Ordering::Relaxed);
        self.len.store(len, Ordering::Relaxed);
        self.seq.store(s.wrapping_add(2), Ordering::Release);
    }

    /// Clears `len` then `base` under the seqlock and frees the slot. Only the claimant
    /// calls this.
    fn retire(&self) {
        let s = self.seq.load(Ordering::Relaxed);
        self.seq.store(s.wrapping_add(1), Ordering::Relaxed);
        fence(Ordering::Release);
        self.len.store(0, Ordering::Relaxed);
        self.base.store(0, Ordering::Relaxed);
        self.seq.store(s.wrapping_add(2), Ordering::Release);
        self.claimed.store(false, Ordering::Release);
    }

    /// A consistent `(base, len)` if the slot holds a range. Async-signal-safe, bounded.
    fn read(&self) -> Option<(usize, usize)> {
        for _ in 0..SLOT_READ_TRIES {
            let s1 = self.seq.load(Ordering::Acquire);
            if s1 & 1 == 1 {
                // Being published or retired (maybe by the thread this handler interrupted):
                // not a registered range; never wait for it.
                return None;
            }
            let base = self.base.load(Ordering::Relaxed);
            let len = self.len.load(Ordering::Relaxed);
            fence(Ordering::Acquire);
            if self.seq.load(Ordering::Relaxed) == s1 {
                return (len != 0).then_some((base, len));
            }
        }
        None
    }
}

/// The range table. Read by the SIGBUS handler; written only through claimed slots.
static SLOTS: [Slot; MAX_GUARDED] = [const { Slot::new() }; MAX_GUARDED];
/// One past the highest slot ever claimed: the handler scans no further.
static HIGH: AtomicUsize = AtomicUsize::new(0);
/// The system page size, set by [`install`] (4096 until then).
static PAGE_SIZE: AtomicUsize = AtomicUsize::new(4096);
/// `sa_sigaction` of the SIGBUS disposition [`install`] replaced (`SIG_DFL` = 0).
static PREV_HANDLER: AtomicUsize = AtomicUsize::new(libc::SIG_DFL);
/// `sa_flags` of the SIGBUS disposition [`install`] replaced.
static PREV_FLAGS: AtomicI32 = AtomicI32::new(0);
/// Set once the handler is in place.
static INSTALLED: AtomicBool = AtomicBool::new(false);
/// Serialises the first installation.
static INSTALL_LOCK: Mutex<()> = Mutex::new(());

/// Signature of an `SA_SIGINFO` handler.
type SigactionFn = extern "C" fn(c_int, *mut siginfo_t, *mut c_void);
/// Signature of a plain (`sa_handler`) handler.
type SighandlerFn = extern "C" fn(c_int);

/// Installs the process-wide SIGBUS handler that absorbs faults in [`Guarded`] ranges.
///
/// Idempotent and thread-safe: the first call installs (`sigaction` with
/// `SA_SIGINFO | SA_ONSTACK`), later calls return at once. Faults outside every guarded
/// range go to the disposition that was in place before (a handler is called; for
/// `SIG_DFL`/`SIG_IGN` the default is restored and the signal raised again).
/// [`Guarded::register`] calls this itself.
///
/// # Errors
///
/// [`GuardError::Install`] when `sigaction` fails (then nothing is installed and a later
/// call tries again).
pub fn install() -> Result<(), GuardError> {
    if INSTALLED.load(Ordering::Acquire) {
        return Ok(());
    }
    let _lock = INSTALL_LOCK.lock().unwrap_or_else(PoisonError::into_inner);
    if INSTALLED.load(Ordering::Acquire) {
        return Ok(());
    }
    // SAFETY: sysconf only reads a configuration value.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if let Ok(page) = usize::try_from(page) {
        if page.is_power_of_two() {
            PAGE_SIZE.store(page, Ordering::Relaxed);
        }
    }
    let install_err = || GuardError::Install {
        source: io::Error::last_os_error(),
    };
    let ours: SigactionFn = on_sigbus;
    let ours = ours as libc::sighandler_t;

    // Record the current disposition before ours can run, so the handler always has
    // something to chain to.
    // SAFETY: all-zero is a valid `struct sigaction` (SIG_DFL, no flags, empty mask).
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: a query only (no new action); `old` is writable storage for the result.
    if unsafe { libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut old) } != 0 {
        return Err(install_err());
    }
    if old.sa_sigaction == ours {
        INSTALLED.store(true, Ordering::Release);
        return Ok(());
    }
    PREV_FLAGS.store(old.sa_flags, Ordering::Relaxed);
    PREV_HANDLER.store(old.sa_sigaction, Ordering::Release);

    // SAFETY: as above, all-zero is a valid `struct sigaction`.
    let mut new: libc::sigaction = unsafe { std::mem::zeroed() };
    new.sa_sigaction = ours;
    new.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
    // SAFETY: `new.sa_mask` is a valid sigset_t to initialise.
    unsafe { libc::sigemptyset(&mut new.sa_mask) };
    // SAFETY: as above, all-zero is a valid `struct sigaction`.
    let mut prev: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: `on_sigbus` has the SA_SIGINFO signature and is async-signal-safe (see the
    // module doc); `new` and `prev` are valid for the call.
    if unsafe { libc::sigaction(libc::SIGBUS, &new, &mut prev) } != 0 {
        return Err(install_err());
    }
    if prev.sa_sigaction != old.sa_sigaction && prev.sa_sigaction != ours {
        // Someone changed the disposition between our two calls: chain to theirs.
        PREV_FLAGS.store(prev.sa_flags, Ordering::Relaxed);
        PREV_HANDLER.store(prev.sa_sigaction, Ordering::Release);
    }
    INSTALLED.store(true, Ordering::Release);
    Ok(())
}

/// The SIGBUS handler. Async-signal-safe: atomics, `mmap`, `sigaction`, `raise` only.
extern "C" fn on_sigbus(sig: c_int, info: *mut siginfo_t, ctx: *mut c_void) {
    // SAFETY: __errno_location returns this thread's errno slot, valid for the thread's
    // lifetime; reading and writing it is what every libc call here may do anyway.
    let errno = unsafe { libc::__errno_location() };
    // SAFETY: as above.
    let saved = unsafe { *errno };
    let absorbed = absorb(info);
    // SAFETY: as above; the interrupted code must see the errno it had.
    unsafe { *errno = saved };
    if !absorbed {
        chain(sig, info, ctx);
    }
}

/// Replaces the faulting page with a zero page if the fault is a `BUS_ADRERR` inside a
/// registered range, counting it in every range that contains it. Returns whether it did.
fn absorb(info: *const siginfo_t) -> bool {
    if info.is_null() {
        return false;
    }
    // SAFETY: with SA_SIGINFO the kernel passes a valid siginfo_t; `si_addr` is the
    // union member the kernel fills for SIGBUS (and merely some bits for other codes,
    // which are rejected before `addr` is used).
    let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
    if code != libc::BUS_ADRERR {
        return false;
    }
    let page = PAGE_SIZE.load(Ordering::Relaxed);
    let page_addr = addr & !page.wrapping_sub(1);
    let used = HIGH.load(Ordering::Acquire);
    let mut ours = false;
    for slot in SLOTS.iter().take(used) {
        let Some((base, len)) = slot.read() else {
            continue;
        };
        if addr.wrapping_sub(base) < len {
            // Counted before the zero page exists: a thread that reads the zero page
            // another thread's fault put there finds the fault already recorded. (If the
            // mmap fails the process dies, so a count without a page does not matter.)
            slot.faults.fetch_add(1, Ordering::Release);
            ours = true;
        }
    }
    ours && map_zero_page(page_addr, page)
}

/// Maps a private anonymous zero page at `page_addr` (`MAP_FIXED`). Async-signal-safe.
fn map_zero_page(page_addr: usize, page: usize) -> bool {
    #[cfg(target_pointer_width = "64")]
    {
        // Every argument goes as a c_long: the variadic `syscall` reads longs.
        // SAFETY: the page lies inside a range its owner registered as a mapping that
        // this process reads but never writes, and that stays mapped while registered;
        // the page has just lost its backing (BUS_ADRERR), so replacing it changes no
        // data anyone can still read, and no Rust reference points into it.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_mmap,
                page_addr as libc::c_long,
                page as libc::c_long,
                libc::c_long::from(libc::PROT_READ | libc::PROT_WRITE),
                libc::c_long::from(libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS),
                -1 as libc::c_long,
                0 as libc::c_long,
            )
        };
        rc as usize == page_addr
    }
    #[cfg(not(target_pointer_width = "64"))]
    {
        // SAFETY: as in the 64-bit branch.
        let p = unsafe {
            libc::mmap(
                page_addr as *mut c_void,
                page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        p as usize == page_addr
    }
}

/// Hands a fault we do not absorb to the previous disposition.
fn chain(sig: c_int, info: *mut siginfo_t, ctx: *mut c_void) {
    let handler = PREV_HANDLER.load(Ordering::Acquire);
    let flags = PREV_FLAGS.load(Ordering::Relaxed);
    if handler == libc::SIG_DFL || handler == libc::SIG_IGN {
        // SAFETY: a non-null `info` is the kernel's valid siginfo_t.
        let user_sent = !info.is_null() && unsafe { (*info).si_code } <= 0;
        if handler == libc::SIG_IGN && user_sent {
            // An ignored, kill-sent SIGBUS stays ignored. (A fault cannot be ignored: the
            // kernel forces the default on a SIGBUS it raises.)
            return;
        }
        // SAFETY: all-zero is a valid `struct sigaction` (SIG_DFL, no flags, empty mask).
        let mut dfl: libc::sigaction = unsafe { std::mem::zeroed() };
        dfl.sa_sigaction = libc::SIG_DFL;
        // SAFETY: sigaction and raise are async-signal-safe. SIGBUS is blocked while this
        // handler runs, so the raised signal stays pending until the handler returns and
        // then kills the process by the default action (as the re-executed load would).
        unsafe {
            libc::sigaction(libc::SIGBUS, &dfl, std::ptr::null_mut());
            libc::raise(libc::SIGBUS);
        }
        return;
    }
    if flags & libc::SA_SIGINFO != 0 {
        // SAFETY: `handler` was installed with SA_SIGINFO, so it has that signature; it
        // gets the arguments the kernel gave us.
        let f = unsafe { std::mem::transmute::<libc::sighandler_t, SigactionFn>(handler) };
        f(sig, info, ctx);
    } else {
        // SAFETY: `handler` was installed without SA_SIGINFO and is neither SIG_DFL nor
        // SIG_IGN, so it is a plain `void (*)(int)`.
        let f = unsafe { std::mem::transmute::<libc::sighandler_t, SighandlerFn>(handler) };
        f(sig);
    }
}

/// A registered range of a mapping in which a `SIGBUS` reads as zeros instead of killing
/// the process. Unregistered on drop.
///
/// The range should be (part of) a mapping this process only reads, such as a
/// `MAP_SHARED` mapping of a VMM's memfd. Drop the `Guarded` before unmapping the range
/// and only after the reads it guards have finished: a fault in a range that is no
/// longer registered kills the process as usual, and a registered range that was
/// unmapped and reused by another mapping would have that mapping's faults absorbed.
///
/// `Guarded` is `Send` and `Sync` (it holds a slot index and two integers; its methods
/// only read atomics), so one thread may register and others read the range and ask
/// [`Guarded::faulted`].
#[derive(Debug)]
#[must_use = "dropping a Guarded unregisters its range at once"]
pub struct Guarded {
    slot: usize,
    base: usize,
    len: usize,
}

/// `Guarded` must stay `Send + Sync` (it is shared by the threads reading a region).
const _: fn() = assert_send_sync::<Guarded>;
fn assert_send_sync<T: Send + Sync>() {}

impl Guarded {
    /// Registers `[base, base + len)`: from now until drop, a `SIGBUS` there is absorbed.
    ///
    /// `base` must be page-aligned and `len` a non-zero multiple of the page size (4096 on
    /// x86_64). Installs the handler ([`install`]) if that has not been done. At most
    /// [`MAX_GUARDED`] ranges can be registered at once. Costs a few atomic operations
    /// (plus one load per slot in use below the first free one).
    ///
    /// Registering is safe: it changes nothing until the kernel reports that a page of
    /// the range has lost its backing, an event that would otherwise kill the process,
    /// and then only replaces that page. Still, register only mappings this process
    /// reads as data (never code, nor a mapping someone relies on being written through
    /// to its file), and follow the drop order described on [`Guarded`].
    ///
    /// # Errors
    ///
    /// [`GuardError::BadRange`] for an empty, unaligned or wrapping range,
    /// [`GuardError::TableFull`] when [`MAX_GUARDED`] ranges are registered, and
    /// [`GuardError::Install`] from [`install`].
    pub fn register(base: *mut u8, len: usize) -> Result<Guarded, GuardError> {
        install()?;
        let page = PAGE_SIZE.load(Ordering::Relaxed);
        let addr = base as usize;
        if addr == 0
            || len == 0
            || !addr.is_multiple_of(page)
            || !len.is_multiple_of(page)
            || addr.checked_add(len).is_none()
        {
            return Err(GuardError::BadRange {
                base: addr,
                len,
                page,
            });
        }
        for (i, slot) in SLOTS.iter().enumerate() {
            if slot.claimed.load(Ordering::Relaxed)
                || slot
                    .claimed
                    .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                    .is_err()
            {
                continue;
            }
            // Raise the high-water mark before the range becomes visible, so a handler that
            // sees the range also scans far enough to find it.
            HIGH.fetch_max(i + 1, Ordering::AcqRel);
            slot.publish(addr, len);
            return Ok(Guarded {
                slot: i,
                base: addr,
                len,
            });
        }
        Err(GuardError::TableFull { max: MAX_GUARDED })
    }

    /// The registered addresses, `base..base + len`.
    #[must_use]
    pub fn range(&self) -> std::ops::Range<usize> {
        self.base..self.base + self.len
    }

    /// Whether a `SIGBUS` was absorbed in this range since registration: the memory
    /// behind it shrank and everything read from it is suspect.
    ///
    /// Covers the calling thread's earlier reads (a compiler fence keeps the check from
    /// moving before them), including reads of pages that another thread's fault already
    /// replaced, and other threads' reads once they are synchronised with the caller
    /// (joined, or via a channel or lock).
    #[must_use]
    pub fn faulted(&self) -> bool {
        self.faulted_pages() != 0
    }

    /// Number of page replacements the handler made in this range since registration.
    ///
    /// Equals the number of distinct pages faulted when one thread reads the range; when
    /// several threads fault on the same page at once, each may replace it, so the count
    /// can exceed the number of distinct pages.
    #[must_use]
    pub fn faulted_pages(&self) -> u64 {
        compiler_fence(Ordering::SeqCst);
        SLOTS[self.slot].faults.load(Ordering::Acquire)
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        SLOTS[self.slot].retire();
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsFd, FromRawFd, OwnedFd};
    use std::os::unix::process::ExitStatusExt;
    use std::process::{Command, Stdio};
    use std::ptr;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    use super::*;

    const PAGE: usize = 4096;
    /// Set in a re-executed test binary to the scenario `child_entry` should run.
    const CHILD_ENV: &str = "FERRY_GUARD_CHILD";

    /// A memfd of `pages` pages mapped shared and writable, page `i` filled with `fill(i)`.
    struct Mapped {
        fd: OwnedFd,
        ptr: *mut u8,
        len: usize,
    }

    // SAFETY: the mapping is plain shared memory owned by this value until drop; the
    // tests only touch it through raw pointers.
    unsafe impl Send for Mapped {}
    // SAFETY: as above; `&Mapped` hands out only the raw pointer.
    unsafe impl Sync for Mapped {}

    fn truncate(fd: &OwnedFd, pages: usize) {
        // SAFETY: ftruncate on an open memfd only sets its size.
        let rc = unsafe { libc::ftruncate(fd.as_raw_fd(), (pages * PAGE) as libc::off_t) };
        assert_eq!(rc, 0, "ftruncate: {}", io::Error::last_os_error());
    }

    fn fill(page: usize) -> u8 {
        (page as u8).wrapping_mul(7).wrapping_add(1) | 1
    }

    impl Mapped {
        fn new(pages: usize) -> Self {
            // SAFETY: a valid NUL-terminated name.
            let raw = unsafe { libc::memfd_create(c"guard-test".as_ptr(), libc::MFD_CLOEXEC) };
            assert!(raw >= 0, "memfd_create: {}", io::Error::last_os_error());
            // SAFETY: memfd_create just returned this fd and nothing else owns it.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            let len = pages * PAGE;
            truncate(&fd, pages);
            // SAFETY: a fresh shared mapping of an open memfd; the kernel picks the address.
            let p = unsafe {
                libc::mmap(
                    ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    fd.as_raw_fd(),
                    0,
                )
            };
            assert_ne!(p, libc::MAP_FAILED, "mmap: {}", io::Error::last_os_error());
            let m = Self {
                fd,
                ptr: p.cast(),
                len,
            };
            for i in 0..pages {
                // SAFETY: page `i` lies inside the mapping, which the memfd fully backs.
                unsafe { ptr::write_bytes(m.ptr.add(i * PAGE), fill(i), PAGE) };
            }
            m
        }

        fn truncate(&self, pages: usize) {
            truncate(&self.fd, pages);
        }

        /// Copies page `i` out with ordinary loads (faults if it lies past EOF).
        fn read_page(&self, i: usize, buf: &mut [u8; PAGE]) {
            assert!(i * PAGE < self.len);
            // SAFETY: page `i` lies inside the mapping; `buf` is a distinct buffer.
            unsafe { ptr::copy_nonoverlapping(self.ptr.add(i * PAGE), buf.as_mut_ptr(), PAGE) };
            // Keep the copy even where the test ignores `buf` (release builds drop it).
            std::hint::black_box(buf);
        }
    }

    impl Drop for Mapped {
        fn drop(&mut self) {
            // SAFETY: our own mapping; nothing uses it after drop.
            unsafe { libc::munmap(self.ptr.cast(), self.len) };
        }
    }

    fn guard(m: &Mapped) -> Guarded {
        Guarded::register(m.ptr, m.len).expect("register")
    }

    #[test]
    fn truncated_memfd_reads_zeros_and_is_flagged() {
        let m = Mapped::new(64);
        let g = guard(&m);
        assert_eq!(g.range(), m.ptr as usize..m.ptr as usize + m.len);
        assert!(!g.faulted());
        let mut buf = [0u8; PAGE];
        for i in 0..64 {
            m.read_page(i, &mut buf);
            assert!(
                buf.iter().all(|&b| b == fill(i)),
                "page {i} before truncation"
            );
        }
        assert!(!g.faulted(), "no fault while the memfd covers the mapping");

        m.truncate(8);
        for pass in 0..2 {
            for i in 0..64 {
                m.read_page(i, &mut buf);
                let want = if i < 8 { fill(i) } else { 0 };
                assert!(buf.iter().all(|&b| b == want), "pass {pass}: page {i}");
            }
            assert!(g.faulted());
            // The second pass reads the zero pages the first one mapped: no new faults.
            assert_eq!(g.faulted_pages(), 56, "pass {pass}");
        }
        drop(g);
        // The replaced pages stay readable (as zeros) after unregistering.
        m.read_page(63, &mut buf);
        assert!(buf.iter().all(|&b| b == 0));
    }

    #[test]
    fn check_covers_refuses_a_region_past_eof() {
        let m = Mapped::new(16);
        let fd = m.fd.as_fd();
        let size = (16 * PAGE) as u64;
        check_covers(fd, 0, size).expect("exact fit");
        check_covers(fd, PAGE as u64, size - PAGE as u64).expect("exact fit at an offset");
        check_covers(fd, 0, 0).expect("empty");
        let err = check_covers(fd, 0, size + PAGE as u64).expect_err("one page too many");
        assert!(
            matches!(err, GuardError::NotCovered { st_size, .. } if st_size == size),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.starts_with("Region") && msg.contains(&size.to_string()),
            "{msg}"
        );
        assert!(
            check_covers(fd, PAGE as u64, size).is_err(),
            "offset pushes it past EOF"
        );
        assert!(check_covers(fd, u64::MAX, 2).is_err(), "overflow");
        m.truncate(8);
        assert!(check_covers(fd, 0, size).is_err(), "after truncation");

        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe writes.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: pipe just returned these fds and nothing else owns them.
        let (r, _w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        assert!(matches!(
            check_covers(r.as_fd(), 0, 1),
            Err(GuardError::NotRegularFile { .. })
        ));
    }

    #[test]
    fn register_rejects_bad_ranges() {
        let p = PAGE as *mut u8;
        for (base, len) in [
            (ptr::null_mut(), PAGE),
            (p, 0),
            (p.wrapping_add(1), PAGE),
            (p, PAGE + 1),
            (usize::MAX as *mut u8, PAGE),
            ((usize::MAX - PAGE + 1) as *mut u8, 2 * PAGE),
        ] {
            let err = Guarded::register(base, len).expect_err("bad range");
            assert!(matches!(err, GuardError::BadRange { .. }), "{err:?}");
        }
    }

    /// Runs `child_entry` alone in a fresh copy of this test binary, with `scenario`.
    fn run_child(scenario: &str) -> std::process::Output {
        let path = module_path!();
        let test = format!(
            "{}::child_entry",
            path.split_once("::").map_or(path, |p| p.1)
        );
        Command::new(std::env::current_exe().expect("current_exe"))
            .args([test.as_str(), "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, scenario)
            .stdin(Stdio::null())
            .output()
            .expect("spawn child")
    }

    extern "C" fn exit_42(_: c_int) {
        // SAFETY: _exit is async-signal-safe and ends the process at once.
        unsafe { libc::_exit(42) };
    }

    /// The child side of the fork-free child tests; does nothing in a normal run.
    #[test]
    fn child_entry() {
        let Ok(scenario) = std::env::var(CHILD_ENV) else {
            return;
        };
        let no_core = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: sets this (child) process's core size limit from a valid struct.
        unsafe { libc::setrlimit(libc::RLIMIT_CORE, &no_core) };
        if scenario == "table" {
            let p = PAGE as *mut u8;
            let all: Vec<Guarded> = (0..MAX_GUARDED)
                .map(|i| Guarded::register(p.wrapping_add(i * PAGE), PAGE).expect("register"))
                .collect();
            let err = Guarded::register(p, PAGE).expect_err("table full");
            assert!(matches!(err, GuardError::TableFull { max: MAX_GUARDED }));
            assert!(err.to_string().starts_with("All"));
            drop(all);
            let _again = Guarded::register(p, PAGE).expect("a slot is free again");
            return;
        }
        if scenario == "chain" {
            // A handler that was there first gets the faults that are not ours.
            // SAFETY: all-zero is a valid sigaction; `exit_42` is async-signal-safe.
            let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
            act.sa_sigaction = exit_42 as SighandlerFn as libc::sighandler_t;
            // SAFETY: installs a valid plain handler.
            let rc = unsafe { libc::sigaction(libc::SIGBUS, &act, ptr::null_mut()) };
            assert_eq!(rc, 0);
        }
        // A guarded fault is absorbed...
        let guarded = Mapped::new(4);
        let g = guard(&guarded);
        guarded.truncate(0);
        let mut buf = [0u8; PAGE];
        guarded.read_page(2, &mut buf);
        assert!(g.faulted());
        // ...and one outside every guarded range is not.
        let other = Mapped::new(4);
        other.truncate(0);
        eprintln!("reading past EOF outside any guarded range");
        other.read_page(2, &mut buf);
        eprintln!("survived an unguarded fault");
        std::process::exit(3);
    }

    #[test]
    fn fault_outside_guarded_ranges_still_kills() {
        let out = run_child("foreign");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGBUS),
            "child: {:?}\n{stderr}",
            out.status
        );
        assert!(
            stderr.contains("reading past EOF"),
            "child never got there:\n{stderr}"
        );
    }

    #[test]
    fn fault_outside_guarded_ranges_goes_to_previous_handler() {
        let out = run_child("chain");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(42),
            "child: {:?}\n{stderr}",
            out.status
        );
    }

    #[test]
    fn table_holds_max_guarded_ranges() {
        let out = run_child("table");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "child: {:?}\n{stderr}", out.status);
    }

    #[test]
    fn concurrent_readers_survive_truncation() {
        const MEMFDS: usize = 4;
        const READERS_PER: usize = 2;
        const PAGES: usize = 64;
        let maps: Vec<Mapped> = (0..MEMFDS).map(|_| Mapped::new(PAGES)).collect();
        let guards: Vec<Guarded> = maps.iter().map(guard).collect();
        let keep = |k: usize| 8 * k; // memfd k shrinks to 8k pages (0 for the first)
        let rounds = AtomicUsize::new(0);
        let truncated = AtomicBool::new(false);
        let stop_churn = AtomicBool::new(false);

        // Reserved, never-faulting address space for slot churn next to the real ranges.
        // SAFETY: a fresh PROT_NONE anonymous reservation; the kernel picks the address.
        let spare = unsafe {
            libc::mmap(
                ptr::null_mut(),
                64 * PAGE,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(spare, libc::MAP_FAILED);
        let spare = spare as usize;

        std::thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| {
                    let mut n = 0usize;
                    while !stop_churn.load(Ordering::Relaxed) {
                        let off = (n % 63) * PAGE;
                        let g = Guarded::register((spare + off) as *mut u8, PAGE).expect("churn");
                        assert!(!g.faulted());
                        drop(g);
                        n += 1;
                    }
                });
            }
            let readers: Vec<_> = (0..MEMFDS * READERS_PER)
                .map(|r| {
                    let (m, g, rounds, truncated) =
                        (&maps[r % MEMFDS], &guards[r % MEMFDS], &rounds, &truncated);
                    let k = r % MEMFDS;
                    s.spawn(move || {
                        let mut buf = [0u8; PAGE];
                        loop {
                            let last = truncated.load(Ordering::Acquire);
                            for i in 0..PAGES {
                                m.read_page(i, &mut buf);
                                // Torn copies (data, then zeros) are possible mid-truncation.
                                assert!(buf.iter().all(|&b| b == fill(i) || b == 0));
                                if last {
                                    let want = if i < keep(k) { fill(i) } else { 0 };
                                    assert!(buf.iter().all(|&b| b == want), "{k}/{i}");
                                }
                            }
                            rounds.fetch_add(1, Ordering::Relaxed);
                            if last {
                                break;
                            }
                        }
                        assert_eq!(g.faulted(), keep(k) < PAGES);
                    })
                })
                .collect();
            while rounds.load(Ordering::Relaxed) < 3 * MEMFDS * READERS_PER {
                std::thread::yield_now();
            }
            for (k, m) in maps.iter().enumerate() {
                m.truncate(keep(k));
                std::thread::sleep(Duration::from_millis(1));
            }
            truncated.store(true, Ordering::Release);
            for r in readers {
                r.join().expect("reader survived");
            }
            stop_churn.store(true, Ordering::Relaxed);
        });
        for (k, g) in guards.iter().enumerate() {
            let lost = (PAGES - keep(k)) as u64;
            let n = g.faulted_pages();
            assert!(
                n >= lost && n <= lost * READERS_PER as u64,
                "memfd {k}: {n} faults"
            );
        }
        // SAFETY: our own reservation, no longer referenced.
        unsafe { libc::munmap(spare as *mut c_void, 64 * PAGE) };
    }

    /// Costs: `cargo test --release -- --ignored --nocapture measure_costs`.
    #[test]
    #[ignore = "measurement, not a check"]
    fn measure_costs() {
        const N: u32 = 1_000_000;
        install().expect("install");
        let t = Instant::now();
        for i in 0..N {
            let base = ((i as usize % 1024 + 1) * PAGE) as *mut u8;
            drop(std::hint::black_box(
                Guarded::register(base, PAGE).expect("register"),
            ));
        }
        println!(
            "register + drop: {:.1} ns",
            t.elapsed().as_nanos() as f64 / f64::from(N)
        );

        const PAGES: usize = 16384; // 64 MiB
        let m = Mapped::new(PAGES);
        let mut buf = [0u8; PAGE];
        let pass = |m: &Mapped, buf: &mut [u8; PAGE]| {
            let t = Instant::now();
            for i in 0..PAGES {
                m.read_page(i, buf);
            }
            t.elapsed()
        };
        pass(&m, &mut buf);
        let best = |m: &Mapped, buf: &mut [u8; PAGE]| (0..7).map(|_| pass(m, buf)).min();
        let plain = best(&m, &mut buf).expect("runs");
        let g = guard(&m);
        let guarded = best(&m, &mut buf).expect("runs");
        assert!(!g.faulted());
        drop(g);
        let plain2 = best(&m, &mut buf).expect("runs");
        let gbs = |d: Duration| (PAGES * PAGE) as f64 / d.as_secs_f64() / 1e9;
        println!(
            "64 MiB page copies, best of 7: unguarded {:.2} GB/s, guarded {:.2} GB/s, \
             unguarded again {:.2} GB/s",
            gbs(plain),
            gbs(guarded),
            gbs(plain2)
        );

        const FAULTS: usize = 4096;
        let m = Mapped::new(FAULTS);
        let g = guard(&m);
        m.truncate(0);
        let t = Instant::now();
        for i in 0..FAULTS {
            m.read_page(i, &mut buf);
        }
        let d = t.elapsed();
        assert_eq!(g.faulted_pages(), FAULTS as u64);
        println!(
            "absorbed fault: {:.2} us each",
            d.as_secs_f64() * 1e6 / FAULTS as f64
        );
    }
}
