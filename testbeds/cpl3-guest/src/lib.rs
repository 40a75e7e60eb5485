//! A minimal 64-bit user-mode (CPL3) guest environment, for tests and test VMMs.
//!
//! On the project's hosts `/dev/kvm` is PVM: only 64-bit guest code at CPL3 runs natively;
//! anything at CPL0 goes through KVM's instruction emulator at ~1e6 instructions/s
//! (docs/platform.md). This module sets a vCPU up exactly as docs/platform.md records a CPL3 guest that ran:
//! CPUID from `KVM_GET_SUPPORTED_CPUID` first, `cr0=0x80050033`, `cr3`=PML4,
//! `cr4=0x620`, `efer=0x501`, an identity map of 2 MiB pages with the U bit at every level,
//! CS `0x33` (DPL 3, type 0xb, L=1), SS/DS/ES `0x2b` (DPL 3), `rflags=0x202`. A CPL3 guest
//! stops with `out` (`KVM_EXIT_IO`); `hlt` triple-faults there.
//!
//! Guest RAM is [`GuestRam`]: one `memfd` per region mapped `MAP_SHARED`, so the memfds
//! can be handed to a sidecar and the destination can map the ones it receives.
//!
//! # Layout of the low pages
//!
//! | GPA | content |
//! |-----|---------|
//! | [`GDT_GPA`] | GDT (null, kernel code/data, user data `0x28`, user code `0x30`) |
//! | [`PML4_GPA`] | PML4 |
//! | [`PDPT_GPA`] | PDPT |
//! | [`PD_GPA`].. | one PD per GiB of RAM, at most [`MAX_RAM_GIB`] |
//!
//! Guest code and data go at or above [`FREE_GPA`].

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;

use kvm_bindings::{kvm_segment, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

use ferry_kvm_glue::dirty::MemorySlot;

/// Guest-physical address of the GDT.
pub const GDT_GPA: u64 = 0x1000;
/// Guest-physical address of the PML4.
pub const PML4_GPA: u64 = 0x2000;
/// Guest-physical address of the PDPT.
pub const PDPT_GPA: u64 = 0x3000;
/// Guest-physical address of the first page directory.
pub const PD_GPA: u64 = 0x4000;
/// Most RAM the identity map covers (one PD page per GiB below [`FREE_GPA`]).
pub const MAX_RAM_GIB: u64 = 64;
/// First guest-physical address free for guest code and data (1 MiB).
pub const FREE_GPA: u64 = 0x10_0000;
/// User code selector (GDT index 6, RPL 3): must match the host's `__USER_CS` under PVM.
pub const USER_CS: u16 = 0x33;
/// User data selector (GDT index 5, RPL 3): must match the host's `__USER_DS` under PVM.
pub const USER_DS: u16 = 0x2b;

const GDT: [u64; 7] = [
    0,
    0x00af_9b00_0000_ffff, // 0x08: kernel code, 64-bit
    0x00cf_9300_0000_ffff, // 0x10: kernel data
    0,
    0,
    0x00cf_f300_0000_ffff, // 0x28: user data, DPL 3
    0x00af_fb00_0000_ffff, // 0x30: user code, 64-bit, DPL 3
];

/// One guest RAM region: a memfd mapped shared into this process.
#[derive(Debug)]
pub struct GuestRegion {
    /// Guest-physical base.
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
    /// Offset of the region in `memfd`.
    pub offset: u64,
    /// The memfd holding the region's pages.
    pub memfd: OwnedFd,
    host: NonNull<u8>,
}

/// Guest RAM made of memfd-backed regions. Accessed only through raw-pointer copies and
/// volatile loads, never through references (the guest writes it concurrently).
#[derive(Debug)]
pub struct GuestRam {
    regions: Vec<GuestRegion>,
}

// SAFETY: the mappings are owned by this value and unmapped only on drop; every access
// goes through raw pointers with volatile or byte-copy semantics, which tolerate the
// concurrent writers (guest vCPUs, other threads) that shared guest memory always has.
unsafe impl Send for GuestRam {}
// SAFETY: as above: no `&`/`&mut` to guest bytes is ever created, so sharing is sound.
unsafe impl Sync for GuestRam {}

fn map_shared(fd: &OwnedFd, size: u64, offset: u64) -> io::Result<NonNull<u8>> {
    let len = usize::try_from(size).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let off =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: a fresh mapping at an address the kernel picks, so it aliases no Rust object;
    // the fd is live for the call; the result is checked.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_NORESERVE,
            fd.as_raw_fd(),
            off,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::from(io::ErrorKind::Other))
}

impl GuestRam {
    /// Creates one zero-filled memfd per `(gpa, size)` and maps it.
    ///
    /// # Errors
    ///
    /// `memfd_create`, `ftruncate` or `mmap` failing; sizes not multiples of 4 KiB.
    pub fn new_memfd(layout: &[(u64, u64)]) -> io::Result<Self> {
        let mut regions = Vec::with_capacity(layout.len());
        for (i, &(gpa, size)) in layout.iter().enumerate() {
            if size == 0 || size % 4096 != 0 || gpa % 4096 != 0 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "region not 4 KiB aligned",
                ));
            }
            let name = std::ffi::CString::new(format!("ferry-guest-ram-{i}"))
                .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
            // SAFETY: `name` is a valid NUL-terminated string; the returned fd is checked and
            // then owned by exactly one OwnedFd.
            let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: `fd` is a fresh, valid descriptor that nothing else owns.
            let memfd = unsafe { OwnedFd::from_raw_fd(fd) };
            let len = libc::off_t::try_from(size)
                .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
            // SAFETY: ftruncate on a valid fd we own; no memory is passed.
            if unsafe { libc::ftruncate(memfd.as_raw_fd(), len) } != 0 {
                return Err(io::Error::last_os_error());
            }
            let host = map_shared(&memfd, size, 0)?;
            regions.push(GuestRegion {
                gpa,
                size,
                offset: 0,
                memfd,
                host,
            });
        }
        Ok(Self { regions })
    }

    /// Maps memfds received from elsewhere: `(gpa, size, offset in memfd, memfd)`.
    ///
    /// # Errors
    ///
    /// `mmap` failing.
    pub fn from_memfds(regions: Vec<(u64, u64, u64, OwnedFd)>) -> io::Result<Self> {
        let mut out = Vec::with_capacity(regions.len());
        for (gpa, size, offset, memfd) in regions {
            let host = map_shared(&memfd, size, offset)?;
            out.push(GuestRegion {
                gpa,
                size,
                offset,
                memfd,
                host,
            });
        }
        Ok(Self { regions: out })
    }

    /// The regions.
    pub fn regions(&self) -> &[GuestRegion] {
        &self.regions
    }

    /// Total bytes.
    pub fn size(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }

    /// The KVM slots for the regions, numbered from `first_slot`.
    pub fn slots(&self, first_slot: u32) -> Vec<MemorySlot> {
        self.regions
            .iter()
            .zip(first_slot..)
            .map(|(r, slot)| MemorySlot {
                slot,
                guest_phys_addr: r.gpa,
                memory_size: r.size,
                userspace_addr: r.host.as_ptr() as u64,
                flags: 0,
            })
            .collect()
    }

    /// Registers every region with `vm` (slots from `first_slot`, flags 0).
    ///
    /// # Safety
    ///
    /// `self` must outlive every use of the slots by `vm` (drop the VM, or delete the
    /// slots, before dropping the RAM).
    ///
    /// # Errors
    ///
    /// The kernel's error from `KVM_SET_USER_MEMORY_REGION`.
    ///
    /// # Panics
    ///
    /// Never.
    pub unsafe fn register(&self, vm: &VmFd, first_slot: u32) -> Result<(), kvm_ioctls::Error> {
        for s in self.slots(first_slot) {
            let region = kvm_userspace_memory_region {
                slot: s.slot,
                flags: s.flags,
                guest_phys_addr: s.guest_phys_addr,
                memory_size: s.memory_size,
                userspace_addr: s.userspace_addr,
            };
            // SAFETY: the mapping is valid for `memory_size` bytes and, by the caller's
            // contract, outlives the VM's use of it.
            unsafe { vm.set_user_memory_region(region) }?;
        }
        Ok(())
    }

    /// Host pointer for `len` bytes at `gpa`, if they lie inside one region.
    pub fn host_ptr(&self, gpa: u64, len: u64) -> Option<*mut u8> {
        let end = gpa.checked_add(len)?;
        let r = self
            .regions
            .iter()
            .find(|r| gpa >= r.gpa && end <= r.gpa + r.size)?;
        // SAFETY: `gpa - r.gpa + len <= r.size`, so the offset stays inside the mapping.
        Some(unsafe { r.host.as_ptr().add((gpa - r.gpa) as usize) })
    }

    /// Copies `data` into guest memory at `gpa` (inside one region).
    ///
    /// Not recorded as dirty: mark it in the tracker's `OwnWrites` after this returns.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Option<()> {
        let p = self.host_ptr(gpa, data.len() as u64)?;
        // SAFETY: `host_ptr` checked that `data.len()` bytes at `p` are inside a live
        // mapping; a byte copy tolerates concurrent guest access.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
        Some(())
    }

    /// Copies guest memory at `gpa` (inside one region) into `buf`.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Option<()> {
        let p = self.host_ptr(gpa, buf.len() as u64)?;
        // SAFETY: as in `write`, reading instead.
        unsafe { std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), buf.len()) };
        Some(())
    }

    /// Volatile 8-byte load at `gpa` (8-aligned, inside one region).
    pub fn read_u64(&self, gpa: u64) -> Option<u64> {
        if !gpa.is_multiple_of(8) {
            return None;
        }
        let p = self.host_ptr(gpa, 8)?;
        // SAFETY: in bounds (checked), 8-aligned (the mapping is page-aligned), and a
        // volatile load of an integer accepts any bytes the guest wrote.
        Some(unsafe { std::ptr::read_volatile(p.cast::<u64>()) })
    }

    /// Volatile 8-byte store at `gpa` (8-aligned, inside one region).
    pub fn write_u64(&self, gpa: u64, v: u64) -> Option<()> {
        if !gpa.is_multiple_of(8) {
            return None;
        }
        let p = self.host_ptr(gpa, 8)?;
        // SAFETY: in bounds and aligned as in `read_u64`.
        unsafe { std::ptr::write_volatile(p.cast::<u64>(), v) };
        Some(())
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        for r in &self.regions {
            // SAFETY: exactly the mapping created for this region, unmapped once; no
            // reference into it exists (all access is through short-lived raw pointers).
            unsafe {
                libc::munmap(r.host.as_ptr().cast(), r.size as usize);
            }
        }
    }
}

/// Writes the GDT and an identity map (2 MiB pages, user-accessible) covering `ram`.
///
/// # Errors
///
/// `InvalidInput` if RAM exceeds [`MAX_RAM_GIB`] or the low pages are not in RAM.
pub fn write_tables(ram: &GuestRam) -> io::Result<()> {
    let bad = |m: &'static str| io::Error::new(io::ErrorKind::InvalidInput, m);
    let top = ram
        .regions
        .iter()
        .map(|r| r.gpa + r.size)
        .max()
        .unwrap_or(0);
    let gibs = top.div_ceil(1 << 30);
    if gibs > MAX_RAM_GIB {
        return Err(bad("RAM above 64 GiB"));
    }
    for (i, d) in GDT.iter().enumerate() {
        ram.write_u64(GDT_GPA + 8 * i as u64, *d)
            .ok_or_else(|| bad("GDT not in RAM"))?;
    }
    // P | RW | US at every level (docs/platform.md: the U bit at every level), PS for 2 MiB pages,
    // and Accessed (+ Dirty on leaves) preset so the MMU never writes the tables: they stay
    // out of the dirty log. The price: with D=1, KVM's shadow MMU maps a page writable even
    // on a read fault, so a page *first* touched after dirty logging starts is reported
    // dirty once although only read (conservative: never a missed write).
    const UPPER: u64 = 0x27;
    const LEAF_2M: u64 = 0xe7;
    ram.write_u64(PML4_GPA, PDPT_GPA | UPPER)
        .ok_or_else(|| bad("PML4 not in RAM"))?;
    for g in 0..gibs {
        let pd = PD_GPA + g * 0x1000;
        ram.write_u64(PDPT_GPA + g * 8, pd | UPPER)
            .ok_or_else(|| bad("PDPT not in RAM"))?;
        for e in 0..512u64 {
            let addr = (g << 30) | (e << 21);
            ram.write_u64(pd + e * 8, addr | LEAF_2M)
                .ok_or_else(|| bad("PD not in RAM"))?;
        }
    }
    Ok(())
}

/// Gives a fresh vCPU the host's supported CPUID (must come first under PVM).
///
/// # Errors
///
/// The kernel's error.
pub fn set_supported_cpuid(kvm: &Kvm, vcpu: &VcpuFd) -> Result<(), kvm_ioctls::Error> {
    let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?;
    vcpu.set_cpuid2(&cpuid)
}

/// Puts `vcpu` in 64-bit user mode at `rip`, tables from [`write_tables`]. Other
/// general-purpose registers are set from `gprs` afterwards by the caller if needed.
///
/// # Errors
///
/// The kernel's error.
pub fn setup_long_mode_cpl3(vcpu: &VcpuFd, rip: u64) -> Result<(), kvm_ioctls::Error> {
    let mut sregs = vcpu.get_sregs()?;
    let code = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: USER_CS,
        type_: 0xb,
        present: 1,
        dpl: 3,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        ..Default::default()
    };
    let data = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: USER_DS,
        type_: 0x3,
        present: 1,
        dpl: 3,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        ..Default::default()
    };
    sregs.cs = code;
    sregs.ss = data;
    sregs.ds = data;
    sregs.es = data;
    sregs.gdt.base = GDT_GPA;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.cr0 = 0x8005_0033;
    sregs.cr3 = PML4_GPA;
    sregs.cr4 = 0x620;
    sregs.efer = 0x501;
    vcpu.set_sregs(&sregs)?;
    let mut regs = vcpu.get_regs()?;
    regs.rip = rip;
    regs.rflags = 0x202;
    vcpu.set_regs(&regs)
}
