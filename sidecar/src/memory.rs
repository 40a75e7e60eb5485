//! The source's guest memory as the sidecar reads it: its digest (strict verification)
//! and whether its VMM shrank a memfd under the mapping (then what was read is void).

use std::os::fd::{AsFd, OwnedFd};

use ferry_engine::bitmap::DirtyBitmap;
use ferry_engine::digest::MemoryDigest;
use ferry_engine::session::{Failure, FailureKind};
use ferry_engine::PAGE_SIZE;
use ferry_proto::common::RegionInfo;
use ferry_proto::mem::GuestRegion;

/// Digest of the source's memory, pages in `holes` (per region, may be empty) taken as
/// zero without being read. Call only while the VM is paused.
pub fn digest_of(mem: &[GuestRegion], holes: &[DirtyBitmap]) -> MemoryDigest {
    MemoryDigest {
        regions: std::thread::scope(|s| {
            let hs: Vec<_> = mem
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    let zero = holes.get(i);
                    s.spawn(move || {
                        // SAFETY: the VM is paused and its VMM's writers are quiesced
                        // (Paused was answered), and the sidecar does not write source
                        // memory: nothing changes the bytes while they are hashed. A page
                        // cut off by a shrinking memfd reads as zeros (the guard) and is
                        // caught by `memory_shrank`.
                        ferry_engine::digest::region_digest_around(unsafe { r.as_slice() }, zero)
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().unwrap_or_default())
                .collect()
        }),
    }
}

/// A failure if the VMM shrank a memfd under the mapping (what was read from it is void).
pub fn memory_shrank(mem: &[GuestRegion]) -> Option<Failure> {
    mem.iter().enumerate().find(|(_, r)| r.faulted()).map(|(i, _)| {
        Failure::new(
            FailureKind::VmmRefused,
            format!("the VMM shrank the memfd of region {i} under the sidecar: its guest memory cannot be migrated"),
        )
    })
}

/// Per region, the pages that are holes of its memfd now (they read as zero, and reading
/// them through the mapping would allocate them): round 1 skips them (`SEEK_DATA` /
/// `SEEK_HOLE`, no page is read). Swapped-out pages count as data.
///
/// # Errors
///
/// `fstat` or `lseek` fails, a memfd is shorter than its region (its VMM shrank it), or
/// there is not one memfd per region.
pub fn holes(regions: &[RegionInfo], memfds: &[OwnedFd]) -> anyhow::Result<Vec<DirtyBitmap>> {
    anyhow::ensure!(
        regions.len() == memfds.len(),
        "{} memfds for {} regions",
        memfds.len(),
        regions.len()
    );
    regions
        .iter()
        .zip(memfds)
        .enumerate()
        .map(|(i, (r, fd))| {
            // Past the end of a shrunk memfd there is no data either, but that is not a
            // hole: the region cannot be read at all (the send then says so).
            let len = nix::sys::stat::fstat(fd.as_fd())?.st_size;
            anyhow::ensure!(
                u64::try_from(len).is_ok_and(|l| l >= r.offset + r.size),
                "the memfd of region {i} is {len} bytes, short of its region's end"
            );
            let mut b = DirtyBitmap::full(r.size / PAGE_SIZE);
            for d in ferry_proto::mem::data_spans(fd.as_fd(), r.offset, r.offset + r.size)? {
                let first = (d.start - r.offset) / PAGE_SIZE;
                let end = (d.end - r.offset).div_ceil(PAGE_SIZE);
                b.clear_range(first, end - first);
            }
            Ok(b)
        })
        .collect()
}

/// The pages known to be zero once dirty logging is on: the holes of the memfds now,
/// plus those of `before` (holes found before the RDMA registration, which pins and so
/// allocates every page) that still read as zero. A write after the log started is in
/// the log; one before it is in what is read here, after it.
///
/// # Errors
///
/// As [`holes`].
pub fn known_zero(
    regions: &[RegionInfo],
    memfds: &[OwnedFd],
    mem: &[GuestRegion],
    before: &[DirtyBitmap],
) -> anyhow::Result<Vec<DirtyBitmap>> {
    let mut now = holes(regions, memfds)?;
    let mut page = Box::new([0u8; PAGE_SIZE as usize]);
    for ((n, b), m) in now.iter_mut().zip(before).zip(mem) {
        let mut filled = b.clone();
        filled.subtract(n);
        for (first, count) in filled.runs() {
            for p in first..first + count {
                m.copy_out(p, &mut page);
                if ferry_engine::digest::is_zero(&page[..]) {
                    n.set(p);
                }
            }
        }
    }
    Ok(now)
}
