//! A CH VM's guest RAM as Ferry holds it on the destination side: one memfd per RAM slot
//! of the VM's `Config` (`memory_manager_data.guest_ram_mappings`), sized and mapped by
//! Ferry, written by Ferry as pages arrive, and handed to the destination CH (`MemoryFd`
//! before `Config`), which then runs the VM straight from them: it never copies memory.

use std::os::fd::{AsFd, OwnedFd};

use anyhow::{bail, Context};
use ferry_proto::mem::GuestRegion;

use crate::wire::GpaRange;

/// Largest guest Ferry maps for a CH VM (the sum of its RAM slots).
pub const MAX_GUEST: u64 = 16 << 40;

/// One RAM slot of the VM's layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RamMapping {
    /// KVM memory slot (the `MemoryFd` slot).
    pub slot: u32,
    /// Guest-physical start.
    pub gpa: u64,
    /// Bytes.
    pub size: u64,
    /// Offset of the slot's memory in its backing file.
    pub file_offset: u64,
}

/// The RAM slots a `Config` names.
///
/// # Errors
///
/// Not JSON, no `guest_ram_mappings`, fields missing or out of range, slots overlapping
/// in guest-physical space, unaligned sizes, or more RAM than [`MAX_GUEST`].
pub fn layout_of(config: &[u8]) -> anyhow::Result<Vec<RamMapping>> {
    let v: serde_json::Value =
        serde_json::from_slice(config).context("the CH Config is not JSON")?;
    let list = v["memory_manager_data"]["guest_ram_mappings"]
        .as_array()
        .context("the CH Config has no memory_manager_data.guest_ram_mappings")?;
    let field = |m: &serde_json::Value, k: &str| {
        m[k].as_u64()
            .with_context(|| format!("a guest RAM mapping without {k}"))
    };
    let mut out = Vec::with_capacity(list.len());
    for m in list {
        let r = RamMapping {
            slot: u32::try_from(field(m, "slot")?).context("a slot above u32")?,
            gpa: field(m, "gpa")?,
            size: field(m, "size")?,
            file_offset: field(m, "file_offset")?,
        };
        let page = ferry_proto::mem::PAGE as u64;
        if r.size == 0
            || !r.size.is_multiple_of(page)
            || !r.gpa.is_multiple_of(page)
            || !r.file_offset.is_multiple_of(page)
        {
            bail!(
                "guest RAM slot {} is not whole, aligned pages: {r:?}",
                r.slot
            );
        }
        r.gpa
            .checked_add(r.size)
            .and(r.file_offset.checked_add(r.size))
            .with_context(|| format!("guest RAM slot {} wraps around", r.slot))?;
        out.push(r);
    }
    if out.is_empty() {
        bail!("the CH Config names no guest RAM");
    }
    out.sort_by_key(|r| r.gpa);
    for w in out.windows(2) {
        if w[0].gpa + w[0].size > w[1].gpa {
            bail!("guest RAM slots {} and {} overlap", w[0].slot, w[1].slot);
        }
        if w[0].slot == w[1].slot {
            bail!("guest RAM slot {} appears twice", w[0].slot);
        }
    }
    let total = out.iter().try_fold(0u64, |a, r| a.checked_add(r.size));
    match total {
        Some(t) if t <= MAX_GUEST => Ok(out),
        _ => bail!(
            "the CH Config names more than {} GiB of RAM",
            MAX_GUEST >> 30
        ),
    }
}

/// The destination's copy of a CH VM's RAM.
pub struct Ram {
    slots: Vec<(RamMapping, OwnedFd)>,
    /// Each slot's mapping (the whole file, from offset 0), in the order of `slots`.
    regions: Vec<GuestRegion>,
}

// SAFETY: the mappings stay valid for the life of `Ram`; writes go through `range_mut`
// (exclusive) or through `range_ptr` under the writers' promise of disjoint ranges.
unsafe impl Sync for Ram {}
// SAFETY: as above; the memfds and mappings are not tied to a thread.
unsafe impl Send for Ram {}

impl Ram {
    /// Fresh, zero-filled memfds for `layout` (a CH source sends zero pages, but a hole of
    /// shared memory it skips must read as zero).
    ///
    /// # Errors
    ///
    /// Out of memory, `memfd_create`/`mmap` failures.
    pub fn create(vm_id: &str, layout: &[RamMapping]) -> anyhow::Result<Self> {
        let mut slots = Vec::with_capacity(layout.len());
        let mut regions = Vec::with_capacity(layout.len());
        for m in layout {
            // The file holds the slot at its offset, as the source's did.
            let (region, fd) = GuestRegion::create(
                &format!("ferry-ch-{vm_id}-{}", m.slot),
                m.file_offset + m.size,
            )
            .with_context(|| format!("creating RAM slot {} ({} MiB)", m.slot, m.size >> 20))?;
            slots.push((m.clone(), fd));
            regions.push(region);
        }
        Ok(Self { slots, regions })
    }

    /// The source's RAM in post-copy: the memfds the source CH handed over in local mode
    /// (one per slot of `layout`), mapped with a guard: a memfd truncated under Ferry
    /// reads as zeros and [`Ram::faulted`] says so, instead of killing the sidecar.
    ///
    /// # Errors
    ///
    /// A slot without its memfd, a memfd shorter than its slot, `mmap` failures.
    pub fn adopt(layout: &[RamMapping], mut fds: Vec<(u32, OwnedFd)>) -> anyhow::Result<Self> {
        let mut slots = Vec::with_capacity(layout.len());
        let mut regions = Vec::with_capacity(layout.len());
        for m in layout {
            let at = fds
                .iter()
                .position(|(s, _)| *s == m.slot)
                .with_context(|| format!("the source CH sent no memfd for RAM slot {}", m.slot))?;
            let (_, fd) = fds.swap_remove(at);
            let region = GuestRegion::map_guarded(fd.as_fd(), 0, m.file_offset + m.size)
                .with_context(|| format!("mapping RAM slot {} of the source CH", m.slot))?;
            slots.push((m.clone(), fd));
            regions.push(region);
        }
        Ok(Self { slots, regions })
    }

    /// Whether a guarded memfd ([`Ram::adopt`]) shrank: what was read from it since is void.
    pub fn faulted(&self) -> bool {
        self.regions.iter().any(GuestRegion::faulted)
    }

    /// The parts of guest RAM that hold data: everything but the holes of the memfds
    /// (pages never written read as zero; `lseek` `SEEK_DATA`/`SEEK_HOLE`), by guest-physical
    /// address. A page written since may be data too: call it with the VM paused.
    ///
    /// # Errors
    ///
    /// `lseek` failing for another reason than the end of the data.
    pub fn data_ranges(&self) -> anyhow::Result<Vec<GpaRange>> {
        let mut out = Vec::new();
        for (m, fd) in &self.slots {
            let start = m.file_offset;
            let spans = ferry_proto::mem::data_spans(fd.as_fd(), start, start + m.size)
                .context("finding the data of guest RAM")?;
            out.extend(spans.into_iter().map(|s| GpaRange {
                gpa: m.gpa + (s.start - start),
                length: s.end - s.start,
            }));
        }
        Ok(out)
    }

    /// The slots, by guest-physical address.
    pub fn layout(&self) -> impl Iterator<Item = &RamMapping> {
        self.slots.iter().map(|(m, _)| m)
    }

    /// Each slot and its memfd, for `MemoryFd`.
    pub fn fds(&self) -> impl Iterator<Item = (u32, std::os::fd::BorrowedFd<'_>)> {
        self.slots.iter().map(|(m, fd)| (m.slot, fd.as_fd()))
    }

    /// The bytes of `r` in this RAM, as one mutable slice, if it lies inside one slot.
    ///
    /// # Safety
    ///
    /// Nothing else may read or write these bytes while the slice lives: the destination
    /// CH has not been told to run the VM (it maps the memfds at `Config` but touches
    /// guest memory only once the VM runs).
    pub unsafe fn range_mut(&mut self, r: GpaRange) -> Option<&mut [u8]> {
        let (ptr, len) = self.range_ptr(r)?;
        // SAFETY: `range_ptr` keeps the range inside the mapping; `&mut self` and the
        // caller's promise make the access exclusive.
        Some(unsafe { std::slice::from_raw_parts_mut(ptr, len) })
    }

    /// Where the bytes of `r` are, if `r` lies inside one slot: for writers on several
    /// threads, each with its own disjoint ranges.
    pub fn range_ptr(&self, r: GpaRange) -> Option<(*mut u8, usize)> {
        let i = self.slot_of(r)?;
        let (m, region) = (&self.slots[i].0, &self.regions[i]);
        let at = usize::try_from(m.file_offset + (r.gpa - m.gpa)).ok()?;
        let len = usize::try_from(r.length).ok()?;
        // SAFETY: [at, at + len) lies inside the mapping: the slot is inside the file.
        Some((unsafe { region.as_ptr().add(at) }, len))
    }

    /// The index of the slot `r` lies in, if it lies inside one.
    fn slot_of(&self, r: GpaRange) -> Option<usize> {
        let end = r.end()?;
        self.slots
            .iter()
            .position(|(m, _)| m.gpa <= r.gpa && end <= m.gpa + m.size)
    }

    /// The slots' mappings, in the order of [`Ram::layout`] (each maps its memfd from
    /// offset 0: a slot's pages start at its `file_offset`), for registering with RDMA.
    pub fn regions(&self) -> &[GuestRegion] {
        &self.regions
    }

    /// Where `r` lies: the index of its slot in [`Ram::regions`] and its first page in that
    /// mapping, if `r` lies inside one slot.
    pub fn region_page(&self, r: GpaRange) -> Option<(u32, u64)> {
        let i = self.slot_of(r)?;
        let m = &self.slots[i].0;
        let page = ferry_proto::mem::PAGE as u64;
        Some((
            u32::try_from(i).ok()?,
            (m.file_offset + (r.gpa - m.gpa)) / page,
        ))
    }

    /// Bytes of guest RAM.
    pub fn size(&self) -> u64 {
        self.slots.iter().map(|(m, _)| m.size).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(mappings: &str) -> Vec<u8> {
        format!(r#"{{"vm_config":{{}},"memory_manager_data":{{"guest_ram_mappings":{mappings}}}}}"#)
            .into_bytes()
    }

    #[test]
    fn layouts_are_read_and_checked() {
        let two = config(
            r#"[{"slot":1,"gpa":4294967296,"size":1048576,"zone_id":"mem0","virtio_mem":false,"file_offset":0},
                {"slot":0,"gpa":0,"size":2097152,"zone_id":"mem0","virtio_mem":false,"file_offset":0}]"#,
        );
        let l = layout_of(&two).expect("parses");
        assert_eq!(l.len(), 2);
        assert_eq!((l[0].slot, l[0].gpa, l[0].size), (0, 0, 2 << 20));
        assert_eq!(l[1].gpa, 1 << 32);
        for bad in [
            config("[]"),
            config(r#"[{"slot":0,"gpa":0,"size":1000,"file_offset":0}]"#),
            config(
                r#"[{"slot":0,"gpa":0,"size":8192,"file_offset":0},{"slot":1,"gpa":4096,"size":4096,"file_offset":0}]"#,
            ),
            config(r#"[{"slot":0,"gpa":0,"size":4096}]"#),
            config(r#"[{"slot":0,"gpa":18446744073709547520,"size":8192,"file_offset":0}]"#),
            b"not json".to_vec(),
            br#"{"vm_config":{}}"#.to_vec(),
        ] {
            assert!(
                layout_of(&bad).is_err(),
                "{}",
                String::from_utf8_lossy(&bad)
            );
        }
    }

    #[test]
    fn ranges_map_into_their_slot_and_nowhere_else() {
        let l = vec![
            RamMapping {
                slot: 0,
                gpa: 0,
                size: 8192,
                file_offset: 0,
            },
            RamMapping {
                slot: 3,
                gpa: 1 << 20,
                size: 4096,
                file_offset: 4096,
            },
        ];
        let mut ram = Ram::create("t", &l).expect("memfds");
        assert_eq!(ram.size(), 12288);
        let r = |gpa, length| GpaRange { gpa, length };
        // SAFETY: this test is the only user of `ram`.
        unsafe {
            ram.range_mut(r(4096, 4096)).expect("inside slot 0").fill(7);
            assert_eq!(ram.range_mut(r(0, 8192)).expect("slot 0")[4096], 7);
            assert!(ram.range_mut(r(4096, 8192)).is_none(), "runs past slot 0");
            assert_eq!(ram.range_mut(r(1 << 20, 4096)).expect("slot 3").len(), 4096);
            assert!(ram.range_mut(r(1 << 30, 4096)).is_none(), "outside RAM");
        }
        assert_eq!(ram.fds().map(|(s, _)| s).collect::<Vec<_>>(), vec![0, 3]);
    }
}
