//! `ferry_engine::bitmap::DirtyBitmap::from_words`: input = npages (first 8 bytes, LE,
//! reduced to at most 1 << 20) then the bitmap's u64 words (LE). Accepted exactly when the
//! word count fits npages; then the tail bits are masked and `runs()` covers exactly the
//! set pages with maximal, ordered, in-range runs.
#![no_main]

use ferry_engine::bitmap::{words_for, DirtyBitmap};
use ferry_fuzz::{take_u64, u64_words}; // also links the -malloc_limit_mb hook (src/lib.rs)
use libfuzzer_sys::fuzz_target;

const MAX_PAGES: u64 = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let (n, rest) = take_u64(data);
    let npages = n % (MAX_PAGES + 1);
    let words = u64_words(rest);
    let fits = words.len() == words_for(npages);
    let input = words.clone();
    let b = match DirtyBitmap::from_words(words, npages) {
        Ok(b) => b,
        Err(_) => {
            assert!(!fits, "refused {} words for {npages} pages", input.len());
            return;
        }
    };
    assert!(fits, "accepted {} words for {npages} pages", input.len());
    assert_eq!(b.npages(), npages);
    assert_eq!(b.words().len(), input.len());
    // Same bits below npages, none at or past it.
    for (i, (&w, &orig)) in b.words().iter().zip(&input).enumerate() {
        let base = i as u64 * 64;
        let keep = if npages >= base + 64 {
            u64::MAX
        } else {
            (1u64 << (npages - base)) - 1
        };
        assert_eq!(w, orig & keep, "word {i}");
    }
    assert!(!b.get(npages) && !b.get(npages + 63) && !b.get(u64::MAX));
    let count = b.count();
    assert!(count <= npages);
    assert_eq!(count == 0, b.is_empty());

    let mut covered = 0u64;
    let mut prev_end: Option<u64> = None;
    for (first, len) in b.runs() {
        assert!(len > 0, "empty run at {first}");
        let end = first.checked_add(len).expect("run end overflows");
        assert!(end <= npages, "run ({first}, {len}) past {npages} pages");
        if let Some(pe) = prev_end {
            assert!(
                first > pe,
                "runs not ordered, or adjacent (not maximal) at {first}"
            );
        }
        assert!(
            first == 0 || !b.get(first - 1),
            "run at {first} not maximal"
        );
        assert!(!b.get(end), "run ending at {end} not maximal");
        assert!(
            (first..end).all(|p| b.get(p)),
            "clean page in run ({first}, {len})"
        );
        covered += len;
        prev_end = Some(end);
    }
    assert_eq!(covered, count, "runs do not cover exactly the dirty pages");
});
