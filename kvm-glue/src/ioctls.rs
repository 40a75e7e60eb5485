//! The raw KVM calls that `kvm-ioctls` 0.25 does not wrap, in one place.
//!
//! Everything here is a thin, safe function over one `ioctl(2)` or `mmap(2)`; each `unsafe`
//! block says why the kernel cannot touch memory it must not. The rest of the crate uses
//! these functions and never calls `ioctl` itself (STYLE.md: FFI in one place per crate).
//!
//! | call | why it is here |
//! |------|----------------|
//! | `KVM_GET_DIRTY_LOG` into a caller's buffer | `VmFd::get_dirty_log` allocates a new `Vec` per call |
//! | `KVM_CLEAR_DIRTY_LOG` | not wrapped at all (needed with `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`) |
//! | `KVM_RESET_DIRTY_RINGS` | not wrapped (dirty ring) |
//! | `mmap` of a vCPU's dirty ring | not wrapped (dirty ring) |

use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;

use kvm_bindings::{kvm_clear_dirty_log, kvm_dirty_gfn, kvm_dirty_log};
use kvm_ioctls::{VcpuFd, VmFd};
use nr::{KVM_CLEAR_DIRTY_LOG, KVM_GET_DIRTY_LOG, KVM_RESET_DIRTY_RINGS};
use vmm_sys_util::ioctl::{ioctl, ioctl_with_ref};

mod nr {
    //! Request numbers, from include/uapi/linux/kvm.h.
    #![allow(missing_docs)]
    use kvm_bindings::{kvm_clear_dirty_log, kvm_dirty_log, KVMIO};
    use vmm_sys_util::{ioctl_io_nr, ioctl_iow_nr, ioctl_iowr_nr};

    ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);
    ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);
    ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, KVMIO, 0xc7);
}

/// Bits per bitmap word: KVM's dirty bitmaps are arrays of `u64`, bit `i` = page `i`.
pub const BITS_PER_WORD: u64 = 64;

/// `KVM_GET_DIRTY_LOG` for `slot` into `bitmap` (one bit per 4 KiB page, LSB first).
///
/// Without manual protection the kernel also clears (re-protects) the slot's log; with
/// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` enabled it only reads it. The kernel writes
/// `ceil(slot pages / 64)` words, where the slot's size is the one KVM knows: a `bitmap`
/// shorter than `slot_pages` needs is refused with `EINVAL` before any call.
///
/// # Safety
///
/// - `slot_pages` must be the page count of `slot` as registered with KVM
///   (`KVM_SET_USER_MEMORY_REGION`): the kernel writes as many words as *its* slot needs,
///   whatever `bitmap`'s length, so a wrong count lets it write past `bitmap`.
///
/// # Errors
///
/// `EINVAL` for a `bitmap` too short for `slot_pages`; the kernel's errno: `ENOENT` for a
/// slot without `KVM_MEM_LOG_DIRTY_PAGES`, `EINVAL` for a slot that does not exist.
pub unsafe fn get_dirty_log_into(
    vm: &VmFd,
    slot: u32,
    slot_pages: u64,
    bitmap: &mut [u64],
) -> io::Result<()> {
    if (bitmap.len() as u64) < slot_pages.div_ceil(BITS_PER_WORD) {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let log = kvm_dirty_log {
        slot,
        padding1: 0,
        __bindgen_anon_1: kvm_bindings::kvm_dirty_log__bindgen_ty_1 {
            dirty_bitmap: bitmap.as_mut_ptr().cast(),
        },
    };
    // SAFETY: `vm` is a VM fd (type-checked by `VmFd`). The kernel writes
    // ceil(slot_pages / 64) words to `dirty_bitmap` (the caller guarantees `slot_pages` is
    // the slot's size), and `bitmap` holds at least that many (checked above); it is
    // borrowed mutably for the duration of the call, so nobody else observes the write.
    let ret = unsafe { ioctl_with_ref(vm, KVM_GET_DIRTY_LOG(), &log) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `KVM_CLEAR_DIRTY_LOG`: re-protect the pages of `slot` whose bits are set in `bitmap`,
/// which describes pages `first_page .. first_page + 64 * bitmap.len()` (clamped to the end
/// of the slot by `num_pages`).
///
/// The kernel requires `first_page % 64 == 0` and `num_pages % 64 == 0` unless the range
/// ends at the end of the slot; it reads `ceil(num_pages / 64)` words.
///
/// # Errors
///
/// The kernel's errno (`EINVAL` for a misaligned range or a range outside the slot,
/// `ENOENT` for a slot without dirty logging). `EINVAL` is also returned here, without a
/// call, if `bitmap` is shorter than `num_pages` needs.
pub fn clear_dirty_log(
    vm: &VmFd,
    slot: u32,
    first_page: u64,
    num_pages: u32,
    bitmap: &[u64],
) -> io::Result<()> {
    if (u64::from(num_pages)).div_ceil(BITS_PER_WORD) > bitmap.len() as u64 {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let clear = kvm_clear_dirty_log {
        slot,
        num_pages,
        first_page,
        __bindgen_anon_1: kvm_bindings::kvm_clear_dirty_log__bindgen_ty_1 {
            // The kernel only reads through this pointer (copy_from_user), despite the type.
            dirty_bitmap: bitmap.as_ptr().cast_mut().cast(),
        },
    };
    // SAFETY: `vm` is a VM fd. The kernel reads ceil(num_pages / 64) words from
    // `dirty_bitmap`, and the check above guarantees `bitmap` holds at least that many; it
    // never writes through the pointer (kvm_clear_dirty_log only copies the bitmap in).
    let ret = unsafe { ioctl_with_ref(vm, KVM_CLEAR_DIRTY_LOG(), &clear) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `KVM_RESET_DIRTY_RINGS`: re-protect every page whose ring entry userspace has marked
/// harvested (`KVM_DIRTY_GFN_F_RESET`), on every vCPU's ring. Returns how many entries the
/// kernel reset.
///
/// # Errors
///
/// The kernel's errno.
pub fn reset_dirty_rings(vm: &VmFd) -> io::Result<u32> {
    // SAFETY: `vm` is a VM fd; KVM_RESET_DIRTY_RINGS takes no argument and touches only
    // kernel state and the rings the kernel itself mapped.
    let ret = unsafe { ioctl(vm, KVM_RESET_DIRTY_RINGS()) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u32::try_from(ret).unwrap_or(0))
}

/// One vCPU's dirty ring, mapped shared from the vCPU fd at
/// `KVM_DIRTY_LOG_PAGE_OFFSET * page_size`. Unmapped on drop.
#[derive(Debug)]
pub struct DirtyRingMap {
    base: NonNull<kvm_dirty_gfn>,
    entries: u32,
    len_bytes: usize,
}

// SAFETY: the mapping is plain shared memory owned by this value; it is only reached
// through `entry_ptr`, whose users do atomic accesses on the `flags` word (the protocol
// the kernel documents for the ring), so moving the owner to another thread is sound.
unsafe impl Send for DirtyRingMap {}

impl DirtyRingMap {
    /// Maps the dirty ring of `vcpu`, whose size the VM was given in bytes with
    /// `KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING[_ACQ_REL])`.
    ///
    /// # Errors
    ///
    /// `mmap`'s errno (e.g. `EINVAL` when the ring is not enabled on the VM).
    pub fn map(vcpu: &VcpuFd, ring_bytes: usize) -> io::Result<Self> {
        let entry = std::mem::size_of::<kvm_dirty_gfn>();
        if ring_bytes == 0 || !ring_bytes.is_multiple_of(entry) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let entries = u32::try_from(ring_bytes / entry)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: sysconf has no memory-safety preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        let page = usize::try_from(page).map_err(|_| io::Error::last_os_error())?;
        let offset = libc::off_t::try_from(kvm_bindings::KVM_DIRTY_LOG_PAGE_OFFSET as usize * page)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: a fresh shared mapping chosen by the kernel (addr NULL), so it cannot alias
        // any Rust object; the fd is a live vCPU fd borrowed for the call; the result is
        // checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                ring_bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(ptr.cast::<kvm_dirty_gfn>())
            .ok_or_else(|| io::Error::from(io::ErrorKind::Other))?;
        Ok(Self {
            base,
            entries,
            len_bytes: ring_bytes,
        })
    }

    /// Number of entries in the ring (a power of two).
    pub fn entries(&self) -> u32 {
        self.entries
    }

    /// Pointer to entry `index % entries`. The pointee is shared with the kernel: read its
    /// `flags` with an acquire load before reading `slot`/`offset`, and publish
    /// `KVM_DIRTY_GFN_F_RESET` with a release store.
    pub fn entry_ptr(&self, index: u32) -> *mut kvm_dirty_gfn {
        let i = (index % self.entries) as usize;
        // SAFETY: `i < entries` and the mapping holds `entries` entries, so the offset stays
        // inside the mapping.
        unsafe { self.base.as_ptr().add(i) }
    }
}

impl Drop for DirtyRingMap {
    fn drop(&mut self) {
        // SAFETY: `base`/`len_bytes` are exactly the mapping created in `map`, unmapped once
        // here; every pointer handed out by `entry_ptr` is documented as valid only while
        // `self` lives.
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.len_bytes);
        }
    }
}
