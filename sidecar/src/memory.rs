//! The source's guest memory as the sidecar reads it: its digest (strict verification)
//! and whether its VMM shrank a memfd under the mapping (then what was read is void).

use ferry_engine::digest::MemoryDigest;
use ferry_engine::session::{Failure, FailureKind};
use ferry_proto::mem::GuestRegion;

/// Digest of the source's memory. Call only while the VM is paused.
pub fn digest_of(mem: &[GuestRegion]) -> MemoryDigest {
    MemoryDigest {
        regions: std::thread::scope(|s| {
            let hs: Vec<_> = mem
                .iter()
                .map(|r| {
                    s.spawn(move || {
                        // SAFETY: the VM is paused and its VMM's writers are quiesced
                        // (Paused was answered), and the sidecar does not write source
                        // memory: nothing changes the bytes while they are hashed. A page
                        // cut off by a shrinking memfd reads as zeros (the guard) and is
                        // caught by `memory_shrank`.
                        ferry_engine::digest::region_digest(unsafe { r.as_slice() })
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
