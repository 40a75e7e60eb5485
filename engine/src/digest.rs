//! Memory digests for end-to-end verification.
//!
//! A region's digest is a list of XXH3-128 hashes, one per [`DIGEST_CHUNK_PAGES`] chunk,
//! so a mismatch names the page ranges that differ instead of just "different".
//! Per-page hashes (XXH3-64) check each TCP batch.

use crate::plan::PageRange;
use crate::PAGE_SIZE;

/// Pages per digest chunk: 512 pages = 2 MiB, so a 1 GiB region has 512 hashes (8 KiB
/// on the wire) and a mismatch is located to 2 MiB.
pub const DIGEST_CHUNK_PAGES: u64 = 512;

/// Hash of one page, as carried in a TCP batch.
pub fn page_hash(page: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(page)
}

/// Hash of one digest chunk.
pub fn chunk_hash(bytes: &[u8]) -> u128 {
    xxhash_rust::xxh3::xxh3_128(bytes)
}

/// Whether every byte is zero (the page needs no transfer to a fresh destination).
pub fn is_zero(bytes: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: u64 has no invalid bit patterns and align_to only reinterprets the
        // aligned middle of an initialised byte slice.
        unsafe { bytes.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// Number of digest chunks of a region of `npages` pages.
pub fn chunks_for(npages: u64) -> u64 {
    npages.div_ceil(DIGEST_CHUNK_PAGES)
}

/// The digest of a VM's memory: per region, per chunk.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemoryDigest {
    /// `regions[r][c]` is the hash of chunk `c` of region `r`.
    pub regions: Vec<Vec<u128>>,
}

impl MemoryDigest {
    /// One hash standing for the whole digest (for summaries and logs).
    pub fn summary(&self) -> u64 {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        for r in &self.regions {
            for c in r {
                h.update(&c.to_le_bytes());
            }
        }
        h.digest()
    }

    /// The page ranges whose chunks differ between `self` and `other` (a region missing
    /// on one side counts as wholly different). `npages[r]` is region r's size.
    pub fn mismatches(&self, other: &MemoryDigest, npages: &[u64]) -> Vec<PageRange> {
        let mut out = Vec::new();
        for (r, &n) in npages.iter().enumerate() {
            let a = self.regions.get(r);
            let b = other.regions.get(r);
            for c in 0..chunks_for(n) {
                let ha = a.and_then(|v| v.get(c as usize));
                let hb = b.and_then(|v| v.get(c as usize));
                if ha.is_none() || ha != hb {
                    let first = c * DIGEST_CHUNK_PAGES;
                    let count = DIGEST_CHUNK_PAGES.min(n - first);
                    match out.last_mut() {
                        Some(PageRange {
                            region,
                            first: f,
                            count: k,
                        }) if *region == r as u32 && *f + *k == first => *k += count,
                        _ => out.push(PageRange {
                            region: r as u32,
                            first,
                            count,
                        }),
                    }
                }
            }
        }
        out
    }
}

/// Digest of one region held in `bytes` (whole pages; the caller guarantees nothing
/// writes them meanwhile).
pub fn region_digest(bytes: &[u8]) -> Vec<u128> {
    bytes
        .chunks((DIGEST_CHUNK_PAGES * PAGE_SIZE) as usize)
        .map(chunk_hash)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        let mut v = vec![0u8; 4096 + 3];
        assert!(is_zero(&v[1..]));
        v[4000] = 1;
        assert!(!is_zero(&v));
        v[4000] = 0;
        v[4096 + 2] = 9;
        assert!(!is_zero(&v[1..]));
    }

    #[test]
    fn mismatches_name_the_differing_chunks() {
        let npages = DIGEST_CHUNK_PAGES * 3 + 10;
        let mut mem = vec![7u8; (npages * PAGE_SIZE) as usize];
        let a = MemoryDigest {
            regions: vec![region_digest(&mem)],
        };
        assert_eq!(a.regions[0].len(), 4);
        mem[(DIGEST_CHUNK_PAGES * PAGE_SIZE) as usize + 5] ^= 1;
        mem[(npages * PAGE_SIZE) as usize - 1] ^= 1;
        let b = MemoryDigest {
            regions: vec![region_digest(&mem)],
        };
        assert_ne!(a.summary(), b.summary());
        assert_eq!(
            a.mismatches(&b, &[npages]),
            vec![
                PageRange {
                    region: 0,
                    first: DIGEST_CHUNK_PAGES,
                    count: DIGEST_CHUNK_PAGES
                },
                PageRange {
                    region: 0,
                    first: DIGEST_CHUNK_PAGES * 3,
                    count: 10
                }
            ]
        );
        assert!(a.mismatches(&a, &[npages]).is_empty());
        assert_eq!(
            a.mismatches(&MemoryDigest::default(), &[npages])[0].count,
            npages
        );
    }
}
