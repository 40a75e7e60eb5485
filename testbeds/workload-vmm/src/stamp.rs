//! The content rule that lets anyone prove a page holds its latest version.
//!
//! A page written for the `gen`-th time (gen >= 1) holds: bytes 0..8 the global page
//! number + 1, bytes 8..12 `gen`, bytes 12..16 [`PAGE_MAGIC`], then 510 words of an
//! xorshift64* stream seeded from (page, gen). A page never written (gen 0) is all
//! zeros. The generation table travels in the state blob, so the destination checks
//! every page against the generation the source last wrote.

use ferry_proto::mem::PAGE;

/// Marks a stamped page.
pub const PAGE_MAGIC: u32 = 0x4652_5259;

fn seed(page: u64, gen: u32) -> u64 {
    (page.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ u64::from(gen).rotate_left(32)) | 1
}

fn next(x: &mut u64) -> u64 {
    *x ^= *x >> 12;
    *x ^= *x << 25;
    *x ^= *x >> 27;
    x.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

/// Writes the content of (`page`, `gen`) to `dst`.
///
/// # Safety
///
/// - `dst` must be valid for writes of [`PAGE`] bytes and 8-byte aligned.
/// - No other thread may write those bytes meanwhile (writers own disjoint pages).
pub unsafe fn write_page(dst: *mut u8, page: u64, gen: u32) {
    let words = dst.cast::<u64>();
    let mut x = seed(page, gen);
    // SAFETY: the caller guarantees PAGE writable, aligned bytes; 512 words = PAGE.
    unsafe {
        words.write_volatile(page + 1);
        words
            .add(1)
            .write_volatile(u64::from(gen) | (u64::from(PAGE_MAGIC) << 32));
        for i in 2..PAGE / 8 {
            words.add(i).write_volatile(next(&mut x));
        }
    }
}

/// Whether `buf` is exactly the content of (`page`, `gen`) (all zeros for gen 0).
pub fn check_page(buf: &[u8; PAGE], page: u64, gen: u32) -> bool {
    let word = |i: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&buf[i * 8..i * 8 + 8]);
        u64::from_le_bytes(a)
    };
    if gen == 0 {
        return buf.iter().all(|&b| b == 0);
    }
    if word(0) != page + 1 || word(1) != (u64::from(gen) | (u64::from(PAGE_MAGIC) << 32)) {
        return false;
    }
    let mut x = seed(page, gen);
    (2..PAGE / 8).all(|i| word(i) == next(&mut x))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[repr(align(8))]
    struct Page([u8; PAGE]);

    #[test]
    fn written_pages_check_and_others_do_not() {
        let mut p = Page([0; PAGE]);
        assert!(check_page(&p.0, 5, 0));
        assert!(!check_page(&p.0, 5, 1));
        // SAFETY: `p` is an aligned PAGE-byte buffer owned by this test.
        unsafe { write_page(p.0.as_mut_ptr(), 5, 3) };
        assert!(check_page(&p.0, 5, 3));
        assert!(!check_page(&p.0, 5, 2), "an older generation must not pass");
        assert!(
            !check_page(&p.0, 6, 3),
            "another page's content must not pass"
        );
        p.0[4000] ^= 1;
        assert!(!check_page(&p.0, 5, 3), "a flipped bit must not pass");
    }
}
