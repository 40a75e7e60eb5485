//! Memory digests for end-to-end verification.
//!
//! A region's digest is a list of XXH3-128 hashes, one per [`DIGEST_CHUNK_PAGES`] chunk,
//! so a mismatch names the page ranges that differ instead of just "different". A chunk's
//! hash is taken over the XXH3-64 hashes of its pages (two levels), so the destination
//! can keep its digest up to date as pages land ([`PageHashes`]: the TCP receiver already
//! hashes every page to check its batch) and have it ready the moment the last page
//! arrives, while the source computes the same value from its memory.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use crate::plan::PageRange;
use crate::PAGE_SIZE;

/// Pages per digest chunk: 512 pages = 2 MiB, so a 1 GiB region has 512 hashes (8 KiB
/// on the wire) and a mismatch is located to 2 MiB.
pub const DIGEST_CHUNK_PAGES: u64 = 512;

/// Hash of one page (XXH3-64), as carried in a TCP batch and kept per landed page.
pub fn page_hash(page: &[u8]) -> u64 {
    twox_hash::XxHash3_64::oneshot(page)
}

/// Hash of an all-zero page (what a fresh destination page holds).
pub fn zero_page_hash() -> u64 {
    static H: OnceLock<u64> = OnceLock::new();
    *H.get_or_init(|| page_hash(&[0u8; PAGE_SIZE as usize]))
}

/// Hash of one digest chunk, from the hashes of its pages.
pub fn chunk_hash(page_hashes: &[u64]) -> u128 {
    let mut h = twox_hash::XxHash3_128::new();
    for p in page_hashes {
        h.write(&p.to_le_bytes());
    }
    h.finish_128()
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
        use std::hash::Hasher;
        let mut h = twox_hash::XxHash3_64::new();
        for r in &self.regions {
            for c in r {
                h.write(&c.to_le_bytes());
            }
        }
        h.finish()
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
    region_digest_around(bytes, None)
}

/// [`region_digest`], with the pages of `zero` (known zero, e.g. holes of a memfd) taken
/// as [`zero_page_hash`] without being read.
pub fn region_digest_around(bytes: &[u8], zero: Option<&crate::bitmap::DirtyBitmap>) -> Vec<u128> {
    let per_chunk = (DIGEST_CHUNK_PAGES * PAGE_SIZE) as usize;
    bytes
        .chunks(per_chunk)
        .enumerate()
        .map(|(c, chunk)| {
            let first = c as u64 * DIGEST_CHUNK_PAGES;
            let pages: Vec<u64> = chunk
                .chunks(PAGE_SIZE as usize)
                .enumerate()
                .map(|(i, p)| match zero {
                    Some(z) if z.get(first + i as u64) => zero_page_hash(),
                    _ => page_hash(p),
                })
                .collect();
            chunk_hash(&pages)
        })
        .collect()
}

/// Per-page hashes of a destination's memory, updated as pages land (from any thread).
/// Every page starts as [`zero_page_hash`]: fresh destination memory is zero.
#[derive(Debug)]
pub struct PageHashes {
    regions: Vec<Vec<AtomicU64>>,
}

impl PageHashes {
    /// Hashes for regions of `npages[r]` pages, all zero pages.
    pub fn new(npages: &[u64]) -> Self {
        let z = zero_page_hash();
        Self {
            regions: npages
                .iter()
                .map(|&n| (0..n).map(|_| AtomicU64::new(z)).collect())
                .collect(),
        }
    }

    /// Records the hash of the bytes that landed in `page` of `region` (ignored when
    /// out of range: callers check bounds before writing memory).
    pub fn set(&self, region: u32, page: u64, hash: u64) {
        if let Some(slot) = self
            .regions
            .get(region as usize)
            .and_then(|r| r.get(page as usize))
        {
            slot.store(hash, Ordering::Relaxed);
        }
    }

    /// The digest of what landed, computed from the page hashes.
    pub fn digest(&self) -> MemoryDigest {
        MemoryDigest {
            regions: self
                .regions
                .iter()
                .map(|r| {
                    r.chunks(DIGEST_CHUNK_PAGES as usize)
                        .map(|c| {
                            let v: Vec<u64> = c.iter().map(|a| a.load(Ordering::Relaxed)).collect();
                            chunk_hash(&v)
                        })
                        .collect()
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_known_zero_hash_as_zero_without_being_read() {
        // Two chunks and a bit; pages 5 and 600 hold data, the rest zero.
        let n = DIGEST_CHUNK_PAGES * 2 + 3;
        let mut mem = vec![0u8; (n * PAGE_SIZE) as usize];
        for p in [5u64, 600] {
            mem[(p * PAGE_SIZE) as usize] = 0xab;
        }
        let full = region_digest(&mem);
        // Every zero page declared zero: the same digest.
        let mut zero = crate::bitmap::DirtyBitmap::full(n);
        zero.clear_range(5, 1);
        zero.clear_range(600, 1);
        assert_eq!(region_digest_around(&mem, Some(&zero)), full);
        // A data page declared zero is not read: its chunk differs, the others do not.
        zero.set(600);
        let d = region_digest_around(&mem, Some(&zero));
        assert_eq!((d[0], d[2]), (full[0], full[2]));
        assert_ne!(d[1], full[1]);
    }

    #[test]
    fn page_hash_is_standard_xxh3() {
        // The wire carries XXH3-64; any implementation must agree with the reference
        // (known answers computed with the reference implementation, xxhash-rust 0.8).
        let page: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
        assert_eq!(page_hash(&page), 0xd742_8746_842b_e37e);
        assert_eq!(page_hash(&[0u8; 4096]), 0x93d7_6fe1_48c6_89ba);
        assert_eq!(page_hash(b""), 0x2d06_8005_38d3_94c2);
        assert_eq!(
            twox_hash::XxHash3_128::oneshot(&page),
            0x1546_8674_2310_5cd5_d742_8746_842b_e37e
        );
    }

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
    fn incremental_page_hashes_give_the_same_digest_as_memory() {
        let npages = DIGEST_CHUNK_PAGES + 7;
        let mut mem = vec![0u8; (npages * PAGE_SIZE) as usize];
        let hashes = PageHashes::new(&[npages]);
        assert_eq!(hashes.digest().regions[0], region_digest(&mem));
        for p in [0, 3, DIGEST_CHUNK_PAGES + 6] {
            let page = &mut mem[(p * PAGE_SIZE) as usize..((p + 1) * PAGE_SIZE) as usize];
            page.fill(p as u8 + 1);
            hashes.set(0, p, page_hash(page));
        }
        assert_eq!(hashes.digest().regions[0], region_digest(&mem));
        hashes.set(0, 3, zero_page_hash());
        assert_ne!(hashes.digest().regions[0], region_digest(&mem));
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
