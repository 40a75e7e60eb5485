//! Dirty bitmaps: one bit per guest page, LSB-first within each `u64` word.
//!
//! This is KVM's own layout (`KVM_GET_DIRTY_LOG`) and the layout of the VMM socket, so a
//! bitmap goes from the kernel to the planner without conversion.

use crate::EngineError;

/// A set of pages of one guest RAM region, one bit per page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyBitmap {
    words: Vec<u64>,
    npages: u64,
}

/// Number of `u64` words that hold `npages` bits.
pub fn words_for(npages: u64) -> usize {
    npages.div_ceil(64) as usize
}

impl DirtyBitmap {
    /// An empty bitmap for a region of `npages` pages.
    pub fn new(npages: u64) -> Self {
        Self {
            words: vec![0; words_for(npages)],
            npages,
        }
    }

    /// A bitmap with every page set.
    pub fn full(npages: u64) -> Self {
        let mut b = Self {
            words: vec![u64::MAX; words_for(npages)],
            npages,
        };
        b.mask_tail();
        b
    }

    /// Wraps words read from KVM or a peer.
    ///
    /// # Errors
    ///
    /// [`EngineError::BitmapLength`] when `words` does not hold exactly `npages` bits.
    /// Bits past `npages` in the last word are cleared, not trusted.
    pub fn from_words(words: Vec<u64>, npages: u64) -> Result<Self, EngineError> {
        if words.len() != words_for(npages) {
            return Err(EngineError::BitmapLength {
                words: words.len(),
                npages,
            });
        }
        let mut b = Self { words, npages };
        b.mask_tail();
        Ok(b)
    }

    fn mask_tail(&mut self) {
        let rem = self.npages % 64;
        if rem != 0 {
            if let Some(last) = self.words.last_mut() {
                *last &= (1u64 << rem) - 1;
            }
        }
    }

    /// Pages in the region this bitmap covers.
    pub fn npages(&self) -> u64 {
        self.npages
    }

    /// The raw words, LSB-first.
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Marks `page` dirty. Pages past the end are ignored.
    pub fn set(&mut self, page: u64) {
        if page < self.npages {
            self.words[(page / 64) as usize] |= 1 << (page % 64);
        }
    }

    /// Marks `count` pages from `first` dirty (clamped to the region).
    pub fn set_range(&mut self, first: u64, count: u64) {
        let end = first.saturating_add(count).min(self.npages);
        let mut p = first;
        while p < end {
            if p.is_multiple_of(64) && end - p >= 64 {
                self.words[(p / 64) as usize] = u64::MAX;
                p += 64;
            } else {
                self.set(p);
                p += 1;
            }
        }
    }

    /// Marks `count` pages from `first` clean (clamped to the region).
    pub fn clear_range(&mut self, first: u64, count: u64) {
        let end = first.saturating_add(count).min(self.npages);
        let mut p = first;
        while p < end {
            if p.is_multiple_of(64) && end - p >= 64 {
                self.words[(p / 64) as usize] = 0;
                p += 64;
            } else {
                self.words[(p / 64) as usize] &= !(1 << (p % 64));
                p += 1;
            }
        }
    }

    /// Whether `page` is dirty.
    pub fn get(&self, page: u64) -> bool {
        page < self.npages && self.words[(page / 64) as usize] & (1 << (page % 64)) != 0
    }

    /// Number of dirty pages.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Whether no page is dirty.
    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    /// Adds every page of `other` (same region size) to this set.
    ///
    /// # Errors
    ///
    /// [`EngineError::BitmapLength`] when the two bitmaps cover different region sizes.
    pub fn union_with(&mut self, other: &DirtyBitmap) -> Result<(), EngineError> {
        if other.npages != self.npages {
            return Err(EngineError::BitmapLength {
                words: other.words.len(),
                npages: self.npages,
            });
        }
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= *b;
        }
        Ok(())
    }

    /// Removes every page of `other` (same region size) from this set.
    pub fn subtract(&mut self, other: &DirtyBitmap) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a &= !*b;
        }
    }

    /// Maximal runs of consecutive dirty pages, in address order, as `(first, count)`.
    pub fn runs(&self) -> Runs<'_> {
        Runs {
            bitmap: self,
            next: 0,
        }
    }
}

/// Iterator over runs of set bits; see [`DirtyBitmap::runs`].
pub struct Runs<'a> {
    bitmap: &'a DirtyBitmap,
    next: u64,
}

impl Runs<'_> {
    /// First set bit at or after `from`, skipping whole zero words.
    fn next_bit(&self, from: u64, set: bool) -> u64 {
        let n = self.bitmap.npages;
        let mut p = from;
        while p < n {
            let wi = (p / 64) as usize;
            let mut w = self.bitmap.words[wi];
            if !set {
                w = !w;
            }
            w &= u64::MAX << (p % 64);
            if w != 0 {
                return (wi as u64 * 64 + u64::from(w.trailing_zeros())).min(n);
            }
            p = (wi as u64 + 1) * 64;
        }
        n
    }
}

impl Iterator for Runs<'_> {
    type Item = (u64, u64);

    fn next(&mut self) -> Option<(u64, u64)> {
        let start = self.next_bit(self.next, true);
        if start >= self.bitmap.npages {
            self.next = start;
            return None;
        }
        let end = self.next_bit(start, false);
        self.next = end;
        Some((start, end - start))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_cover_exactly_the_set_bits() {
        let mut b = DirtyBitmap::new(200);
        for p in [0, 1, 2, 63, 64, 65, 127, 128, 199] {
            b.set(p);
        }
        let runs: Vec<_> = b.runs().collect();
        assert_eq!(runs, vec![(0, 3), (63, 3), (127, 2), (199, 1)]);
        assert_eq!(b.count(), 9);
    }

    #[test]
    fn full_bitmap_is_one_run_and_tail_is_masked() {
        let b = DirtyBitmap::full(130);
        assert_eq!(b.runs().collect::<Vec<_>>(), vec![(0, 130)]);
        assert_eq!(b.count(), 130);
        let w = DirtyBitmap::from_words(vec![u64::MAX, u64::MAX, u64::MAX], 130).expect("length");
        assert_eq!(w.count(), 130);
    }

    #[test]
    fn wrong_length_is_refused() {
        assert!(DirtyBitmap::from_words(vec![0; 3], 64).is_err());
        assert!(DirtyBitmap::from_words(vec![0; 1], 65).is_err());
    }

    #[test]
    fn set_range_and_union_subtract() {
        let mut a = DirtyBitmap::new(300);
        a.set_range(10, 150);
        assert_eq!(a.runs().collect::<Vec<_>>(), vec![(10, 150)]);
        let mut b = DirtyBitmap::new(300);
        b.set_range(100, 100);
        a.union_with(&b).expect("same size");
        assert_eq!(a.runs().collect::<Vec<_>>(), vec![(10, 190)]);
        a.subtract(&b);
        assert_eq!(a.runs().collect::<Vec<_>>(), vec![(10, 90)]);
        a.set_range(290, 100);
        assert_eq!(a.count(), 100);
        let mut f = DirtyBitmap::full(300);
        f.clear_range(3, 200);
        assert_eq!(f.runs().collect::<Vec<_>>(), vec![(0, 3), (203, 97)]);
        f.clear_range(250, 1000);
        assert_eq!(f.runs().collect::<Vec<_>>(), vec![(0, 3), (203, 47)]);
    }

    #[test]
    fn runs_match_a_naive_scan() {
        // A deterministic pseudo-random pattern checked against the obvious per-bit scan.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut b = DirtyBitmap::new(5000);
        for p in 0..5000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if x.is_multiple_of(3) {
                b.set(p);
            }
        }
        let mut naive = Vec::new();
        let mut p = 0;
        while p < 5000 {
            if b.get(p) {
                let s = p;
                while p < 5000 && b.get(p) {
                    p += 1;
                }
                naive.push((s, p - s));
            } else {
                p += 1;
            }
        }
        assert_eq!(b.runs().collect::<Vec<_>>(), naive);
    }
}
