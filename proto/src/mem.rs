//! Guest RAM as Ferry handles it: memfd-backed `MAP_SHARED` mappings.
//!
//! The source sidecar maps the VMM's memfds (the guest and the VMM keep writing them);
//! the destination sidecar creates fresh memfds, populates them ahead of the first
//! round, fills them, and hands them to the destination VMM. Memory another process may
//! write is never turned into a Rust slice: reads go through [`GuestRegion::copy_out`]
//! (a copy into a buffer we own) or straight to the kernel as raw `iovec`s.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::time::{Duration, Instant};

use crate::ProtoError;

/// Page size of guest RAM.
pub const PAGE: usize = 4096;

/// One mapped guest RAM region.
#[derive(Debug)]
pub struct GuestRegion {
    /// Declared before the mapping fields and dropped first: the range is unregistered
    /// before it is unmapped.
    guard: Option<crate::guard::Guarded>,
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory owned by this value until drop; every
// access goes through raw pointers whose users document their own synchronisation.
unsafe impl Send for GuestRegion {}
// SAFETY: as above; `&GuestRegion` only hands out raw pointers and copies.
unsafe impl Sync for GuestRegion {}

fn os(op: &'static str) -> ProtoError {
    ProtoError::Io {
        op,
        source: std::io::Error::last_os_error(),
    }
}

impl GuestRegion {
    /// Creates an anonymous memfd of `size` bytes and maps it.
    ///
    /// # Errors
    ///
    /// [`ProtoError::Io`] from `memfd_create`, `ftruncate` or `mmap` (e.g. ENOMEM).
    pub fn create(name: &str, size: u64) -> Result<(Self, OwnedFd), ProtoError> {
        Self::create_backed(name, size, PAGE as u64)
    }

    /// As [`GuestRegion::create`], backed by pages of `page_size` bytes: [`PAGE`], or a
    /// huge page size (hugetlbfs: 2 MiB or 1 GiB on x86-64), whose pages are reserved when
    /// the memfd is mapped.
    ///
    /// # Errors
    ///
    /// [`ProtoError::BadValue`] for a page size that is not a power of two of at least
    /// [`PAGE`] or a size that is not whole pages of it; [`ProtoError::Io`] as
    /// [`GuestRegion::create`], and `ENOMEM` from `mmap` when too few huge pages are free
    /// (`/proc/sys/vm/nr_hugepages`).
    pub fn create_backed(
        name: &str,
        size: u64,
        page_size: u64,
    ) -> Result<(Self, OwnedFd), ProtoError> {
        if !page_size.is_power_of_two() || page_size < PAGE as u64 {
            return Err(ProtoError::BadValue {
                what: "backing page size",
                value: page_size,
            });
        }
        if !size.is_multiple_of(page_size) {
            return Err(ProtoError::BadValue {
                what: "region size (not whole pages of its backing page size)",
                value: size,
            });
        }
        let flags = if page_size == PAGE as u64 {
            libc::MFD_CLOEXEC
        } else {
            // The huge page size goes as its log2 in bits 26 and up (MFD_HUGE_SHIFT).
            libc::MFD_CLOEXEC | libc::MFD_HUGETLB | (page_size.trailing_zeros() << 26)
        };
        let cname = std::ffi::CString::new(name).unwrap_or_else(|_| c"ferry-ram".to_owned());
        // SAFETY: `cname` is a valid NUL-terminated string for the duration of the call.
        let fd = unsafe { libc::memfd_create(cname.as_ptr(), flags) };
        if fd < 0 {
            return Err(os(if page_size == PAGE as u64 {
                "memfd_create"
            } else {
                "memfd_create(MFD_HUGETLB) (is that huge page size supported here?)"
            }));
        }
        // SAFETY: memfd_create just returned this fd to us and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: `fd` is an open memfd; ftruncate only sets its size.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) } != 0 {
            return Err(os("ftruncate memfd"));
        }
        let region = match Self::map(fd.as_fd_borrowed(), 0, size) {
            Err(ProtoError::Io { source, .. })
                if page_size != PAGE as u64 && source.raw_os_error() == Some(libc::ENOMEM) =>
            {
                return Err(ProtoError::Io {
                    op: "mapping huge-page memory: too few free huge pages of that size (/proc/sys/vm/nr_hugepages)",
                    source,
                })
            }
            r => r?,
        };
        Ok((region, fd))
    }

    /// Asks for transparent huge pages behind this mapping (`MADV_HUGEPAGE`). Where the
    /// host allows them for shared memory on request
    /// (`/sys/kernel/mm/transparent_hugepage/shmem_enabled` = `advise`), filling the
    /// memory then allocates and zeroes it 2 MiB at a time, about ten times cheaper than
    /// page by page on the measured hosts (`docs/operations.md`); where it does not
    /// (`never`, the kernel's default) this changes nothing. Pages are still tracked and
    /// sent at 4 KiB. A refusal (a kernel without THP) is ignored: the memory is then
    /// filled 4 KiB at a time, as without the advice. For memory this process is about to
    /// fill (the destination's copy); a hugetlbfs mapping is huge-paged already.
    pub fn advise_huge(&self) {
        // SAFETY: the range is exactly this live mapping; MADV_HUGEPAGE changes no data,
        // only how later faults allocate.
        let _ = unsafe { libc::madvise(self.ptr.as_ptr().cast(), self.len, libc::MADV_HUGEPAGE) };
    }

    /// The size of the pages behind `fd`: the huge page size of a hugetlbfs memfd,
    /// [`PAGE`] for ordinary shared memory.
    ///
    /// # Errors
    ///
    /// [`ProtoError::Io`] from `fstat`.
    pub fn backing_page_size(fd: BorrowedFd<'_>) -> Result<u64, ProtoError> {
        // SAFETY: fstat writes a `stat` for an open descriptor into memory we own.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
            return Err(os("fstat guest memfd"));
        }
        Ok((st.st_blksize as u64).max(PAGE as u64))
    }

    /// Maps `size` bytes at `offset` of `fd`, shared and writable.
    ///
    /// # Errors
    ///
    /// [`ProtoError::Io`] from `mmap`; [`ProtoError::BadValue`] for a size or offset
    /// that is not page-aligned or a size of 0.
    pub fn map(fd: BorrowedFd<'_>, offset: u64, size: u64) -> Result<Self, ProtoError> {
        if size == 0 || !size.is_multiple_of(PAGE as u64) || !offset.is_multiple_of(PAGE as u64) {
            return Err(ProtoError::BadValue {
                what: "region size or offset (must be whole pages)",
                value: size,
            });
        }
        let len = usize::try_from(size).map_err(|_| ProtoError::BadValue {
            what: "region size",
            value: size,
        })?;
        // SAFETY: a fresh shared mapping of an open fd at a page-aligned offset; the
        // kernel chooses the address, so no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(os("mmap guest RAM"));
        }
        Ok(Self {
            guard: None,
            ptr: NonNull::new(p.cast()).expect("mmap never returns NULL on success"),
            len,
        })
    }

    /// Maps another process's memfd (a VMM's guest RAM): checks with `fstat` that it
    /// covers the region, maps it, and guards the mapping so that a memfd truncated
    /// later reads as zeros instead of killing this process ([`GuestRegion::faulted`]
    /// then says so).
    ///
    /// # Errors
    ///
    /// [`ProtoError::BadValue`] for a memfd shorter than the region (or not a regular
    /// file), and [`GuestRegion::map`]'s errors.
    pub fn map_guarded(fd: BorrowedFd<'_>, offset: u64, size: u64) -> Result<Self, ProtoError> {
        crate::guard::check_covers(fd, offset, size).map_err(|e| ProtoError::Io {
            op: "check the memfd's size",
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, crate::common::chain(&e)),
        })?;
        let mut r = Self::map(fd, offset, size)?;
        r.guard = Some(
            crate::guard::Guarded::register(r.ptr.as_ptr(), r.len).map_err(|e| ProtoError::Io {
                op: "guard the mapping",
                source: std::io::Error::other(e.to_string()),
            })?,
        );
        Ok(r)
    }

    /// Whether the memfd shrank under a guarded mapping since it was mapped: what was read
    /// from it since is void (it read as zeros).
    pub fn faulted(&self) -> bool {
        self.guard
            .as_ref()
            .is_some_and(crate::guard::Guarded::faulted)
    }

    /// Bytes mapped.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the region is empty (never, for a mapped region).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Pages mapped.
    pub fn npages(&self) -> u64 {
        (self.len / PAGE) as u64
    }

    /// Start of the mapping. Writes through it race with the guest unless the VM is
    /// paused; callers document why theirs are sound.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Pointer to `count` pages from `first`, or `None` when they are not all mapped.
    pub fn pages_ptr(&self, first: u64, count: u64) -> Option<*mut u8> {
        let end = first.checked_add(count)?;
        if end > self.npages() {
            return None;
        }
        // SAFETY: `first * PAGE` is within the mapping (checked above).
        Some(unsafe { self.ptr.as_ptr().add(first as usize * PAGE) })
    }

    /// Copies one page into `buf` (a copy we own, safe to hash while the guest writes).
    ///
    /// # Panics
    ///
    /// Panics if `page` is out of range (callers check pages against the layout first).
    pub fn copy_out(&self, page: u64, buf: &mut [u8; PAGE]) {
        let src = self.pages_ptr(page, 1).expect("page within the region");
        // SAFETY: `src` is valid for PAGE bytes of the live mapping; `buf` is a distinct
        // buffer of PAGE bytes. Concurrent writers can only make the copy torn, which the
        // dirty log accounts for (docs/design.md §2); no reference to the shared bytes is formed.
        unsafe { std::ptr::copy_nonoverlapping(src, buf.as_mut_ptr(), PAGE) };
    }

    /// The whole region as a slice.
    ///
    /// # Safety
    ///
    /// - No other thread or process may write the region while the slice lives (the VM
    ///   is paused and the VMM's writers are quiesced, or this process owns the memfd
    ///   exclusively, as the destination does before handing it over).
    pub unsafe fn as_slice(&self) -> &[u8] {
        // SAFETY: the mapping is valid for `len` bytes for `self`'s lifetime; the caller
        // guarantees no concurrent writes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// Faults every page in, writable, with `threads` threads, so a receiver never
    /// page-faults its way through a copy. Returns the time it took.
    ///
    /// # Errors
    ///
    /// [`ProtoError::Io`] from `madvise` (ENOMEM when memory runs out).
    pub fn populate(&self, threads: usize) -> Result<Duration, ProtoError> {
        self.madvise_all(threads, libc::MADV_POPULATE_WRITE)
    }

    /// Faults `count` pages from `first` in, writable, in one call (a receiver about to
    /// land them; see [`GuestRegion::populate`]). Pages already there are left as they
    /// are.
    ///
    /// # Errors
    ///
    /// [`ProtoError::Io`] from `madvise` (ENOMEM when memory runs out); pages outside the
    /// region are an `EINVAL` error.
    pub fn populate_pages(&self, first: u64, count: u64) -> Result<(), ProtoError> {
        let Some(ptr) = self.pages_ptr(first, count) else {
            return Err(ProtoError::Io {
                op: "populating pages outside the region",
                source: std::io::Error::from_raw_os_error(libc::EINVAL),
            });
        };
        // SAFETY: the pages lie inside the mapping (pages_ptr checked them), which lives as
        // long as `self`; populating changes no data.
        let rc =
            unsafe { libc::madvise(ptr.cast(), count as usize * PAGE, libc::MADV_POPULATE_WRITE) };
        if rc == 0 {
            Ok(())
        } else {
            Err(os("madvise(MADV_POPULATE_WRITE)"))
        }
    }

    /// Maps the pages of a region someone else filled (the source VM's RAM) into this
    /// process's page tables, so sending them later takes no page fault per page; only
    /// where `fd` (the memfd this region maps from `offset`) holds data: a read fault on
    /// a hole of a memfd allocates a page, so prefaulting a sparse VM's whole RAM would
    /// fill its holes with zeroed memory.
    ///
    /// # Errors
    ///
    /// [`ProtoError::Io`] from `lseek` or `madvise`.
    pub fn prefault_data(&self, fd: BorrowedFd<'_>, offset: u64) -> Result<Duration, ProtoError> {
        let t0 = Instant::now();
        for span in data_spans(fd, offset, offset + self.len as u64)? {
            // SAFETY: `span` lies inside [offset, offset + len) (data_spans clamps it), so
            // it is inside the mapping, which `self` keeps mapped; populating changes no
            // data.
            let rc = unsafe {
                libc::madvise(
                    self.ptr.as_ptr().add((span.start - offset) as usize).cast(),
                    (span.end - span.start) as usize,
                    libc::MADV_POPULATE_READ,
                )
            };
            if rc != 0 {
                return Err(os("madvise(MADV_POPULATE_READ)"));
            }
        }
        Ok(t0.elapsed())
    }

    fn madvise_all(&self, threads: usize, advice: i32) -> Result<Duration, ProtoError> {
        let t0 = Instant::now();
        let threads = threads.max(1);
        let per = (self.len / PAGE).div_ceil(threads) * PAGE;
        let base = self.ptr.as_ptr() as usize;
        let len = self.len;
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|i| {
                    s.spawn(move || {
                        let start = i * per;
                        if start >= len {
                            return Ok(());
                        }
                        let n = per.min(len - start);
                        // SAFETY: [base+start, base+start+n) lies inside the mapping,
                        // which outlives the scope; populating changes no data.
                        let rc = unsafe {
                            libc::madvise((base + start) as *mut libc::c_void, n, advice)
                        };
                        if rc == 0 {
                            Ok(())
                        } else {
                            Err(os("madvise(MADV_POPULATE_*)"))
                        }
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err(os("populate thread"))))
                .collect::<Result<Vec<()>, _>>()
        })?;
        Ok(t0.elapsed())
    }
}

/// The parts of bytes `[start, end)` of file `fd` (a memfd; `start` page-aligned) that hold
/// data, in whole pages: everything but its holes (pages never written read as zero;
/// `lseek` `SEEK_DATA`/`SEEK_HOLE`). A page written since may be data too.
///
/// # Errors
///
/// [`ProtoError::Io`] from `lseek` failing for another reason than the end of the data;
/// [`ProtoError::BadValue`] for offsets beyond `off_t`.
pub fn data_spans(
    fd: BorrowedFd<'_>,
    start: u64,
    end: u64,
) -> Result<Vec<std::ops::Range<u64>>, ProtoError> {
    const P: u64 = PAGE as u64;
    let off = |v: u64| {
        libc::off_t::try_from(v).map_err(|_| ProtoError::BadValue {
            what: "file offset",
            value: v,
        })
    };
    let mut out = Vec::new();
    let mut at = start;
    while at < end {
        // SAFETY: lseek on an open descriptor only moves its file offset.
        let data = unsafe { libc::lseek(fd.as_raw_fd(), off(at)?, libc::SEEK_DATA) };
        if data < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
                break;
            }
            return Err(os("lseek(SEEK_DATA) on guest RAM"));
        }
        let data = (data as u64 / P * P).max(at);
        if data >= end {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd.as_raw_fd(), off(data)?, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(os("lseek(SEEK_HOLE) on guest RAM"));
        }
        // Whole pages, at least one (progress whatever the filesystem answers), never
        // beyond `end`.
        let hole = (hole as u64)
            .div_ceil(P)
            .saturating_mul(P)
            .max(data + P)
            .min(end);
        out.push(data..hole);
        at = hole;
    }
    Ok(out)
}

impl Drop for GuestRegion {
    fn drop(&mut self) {
        // Unregister before unmapping (a fault in a freshly reused range is not ours).
        self.guard = None;
        // SAFETY: `ptr`/`len` describe a mapping this value created and nobody else
        // unmaps; after drop no pointer derived from it is used (users hold `&self`).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Borrowing helper: `OwnedFd` to `BorrowedFd` without importing `AsFd` everywhere.
pub trait AsFdBorrowed {
    /// Borrows the descriptor.
    fn as_fd_borrowed(&self) -> BorrowedFd<'_>;
}

impl AsFdBorrowed for OwnedFd {
    fn as_fd_borrowed(&self) -> BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_spans_are_the_written_pages_and_prefaulting_allocates_no_hole() {
        use std::os::unix::fs::MetadataExt;
        let (a, fd) = GuestRegion::create("t", 64 * PAGE as u64).expect("create");
        for p in [3u64, 10, 11] {
            let at = a.pages_ptr(p, 1).expect("in range");
            // SAFETY: one page of our own fresh mapping, written by this thread only.
            unsafe { at.write(1) };
        }
        let p = PAGE as u64;
        let spans = data_spans(fd.as_fd_borrowed(), 0, 64 * p).expect("spans");
        assert_eq!(spans, vec![3 * p..4 * p, 10 * p..12 * p]);
        assert_eq!(
            data_spans(fd.as_fd_borrowed(), 8 * p, 11 * p).expect("spans"),
            vec![10 * p..11 * p]
        );
        a.prefault_data(fd.as_fd_borrowed(), 0).expect("prefault");
        let file = std::fs::File::from(fd.try_clone().expect("dup"));
        assert_eq!(file.metadata().expect("stat").blocks() * 512, 3 * p);
    }

    #[test]
    fn create_map_populate_and_share() {
        let (a, fd) = GuestRegion::create("t", 64 * PAGE as u64).expect("create");
        assert_eq!(a.npages(), 64);
        a.populate(2).expect("populate");
        let b = GuestRegion::map(fd.as_fd_borrowed(), 0, 64 * PAGE as u64).expect("map");
        // SAFETY: this test is the only writer, and `a` is valid for 64 pages.
        unsafe { *a.as_ptr().add(5 * PAGE + 7) = 42 };
        let mut buf = [0u8; PAGE];
        b.copy_out(5, &mut buf);
        assert_eq!(buf[7], 42);
        assert!(b.pages_ptr(63, 1).is_some());
        assert!(b.pages_ptr(63, 2).is_none());
        assert!(b.pages_ptr(u64::MAX, 2).is_none());
        assert!(GuestRegion::map(fd.as_fd_borrowed(), 0, 100).is_err());
    }
}
