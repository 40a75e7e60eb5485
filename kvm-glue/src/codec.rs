//! The state and CPU-profile encodings' view of the workspace codec (`ferry_proto::codec`):
//! KVM structs as bytes, and field names in errors. Every read checks the remaining length and every count is capped by the
//! caller before anything is allocated from it; nothing here panics on hostile input.

use crate::error::{Error, Result};

/// Plain-old-data KVM structs that may be copied to and from bytes.
///
/// # Safety
///
/// Implementors must be `repr(C)` kernel ABI structs with no implicit padding (every byte
/// is a field byte, so reading the value as bytes reads initialised memory) and for which
/// every bit pattern is a valid value (integers, arrays and unions of integers only).
pub(crate) unsafe trait Pod: Copy + Default {}

/// Views a POD value as its bytes.
pub(crate) fn pod_bytes<T: Pod>(v: &T) -> &[u8] {
    // SAFETY: `T: Pod` has no padding, so all `size_of::<T>()` bytes behind `v` are
    // initialised; the slice borrows `v` and is read-only.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>()) }
}

/// Builds a POD value from exactly `size_of::<T>()` bytes.
pub(crate) fn pod_from<T: Pod>(what: &'static str, b: &[u8]) -> Result<T> {
    let expected = std::mem::size_of::<T>();
    if b.len() != expected {
        return Err(Error::RecordSize {
            what,
            len: b.len(),
            expected,
        });
    }
    // SAFETY: `b` holds exactly size_of::<T>() readable bytes; `read_unaligned` has no
    // alignment requirement; `T: Pod` makes every bit pattern a valid T.
    Ok(unsafe { std::ptr::read_unaligned(b.as_ptr().cast::<T>()) })
}

/// Appends little-endian fields: the workspace codec (`ferry_proto::codec::Writer`) with
/// the shapes the state and CPU-profile blobs use.
#[derive(Default)]
pub(crate) struct Writer {
    inner: ferry_proto::codec::Writer,
}

impl Writer {
    pub fn u8(&mut self, v: u8) {
        self.inner.u8(v);
    }
    pub fn u32(&mut self, v: u32) {
        self.inner.u32(v);
    }
    pub fn u64(&mut self, v: u64) {
        self.inner.u64(v);
    }
    pub fn raw(&mut self, b: &[u8]) {
        self.inner.fixed(b);
    }
    /// A `u32` length, then the bytes. Lengths are bounded by the caps the reader applies,
    /// all far below `u32::MAX`.
    pub fn bytes(&mut self, b: &[u8]) {
        self.inner.bytes(b);
    }
    pub fn pod<T: Pod>(&mut self, v: &T) {
        self.bytes(pod_bytes(v));
    }
    /// A `u32` count (the caller has already checked it against the decoder's cap).
    pub fn count(&mut self, n: usize) {
        self.u32(u32::try_from(n).unwrap_or(u32::MAX));
    }
    pub fn finish(self) -> Vec<u8> {
        self.inner.finish()
    }
}

/// Reads what [`Writer`] wrote, with the workspace codec (`ferry_proto::codec::Reader`),
/// naming the field in every error; fails (never panics) on truncation.
pub(crate) struct Reader<'a> {
    inner: ferry_proto::codec::Reader<'a>,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self {
            inner: ferry_proto::codec::Reader::new(buf, "blob"),
        }
    }

    pub fn remaining(&self) -> usize {
        self.inner.remaining()
    }

    pub fn take(&mut self, what: &'static str, n: usize) -> Result<&'a [u8]> {
        let have = self.remaining();
        self.inner.raw(n).map_err(|_| Error::Truncated {
            what,
            need: n,
            have,
        })
    }

    pub fn u8(&mut self, what: &'static str) -> Result<u8> {
        Ok(self.take(what, 1)?[0])
    }
    pub fn u32(&mut self, what: &'static str) -> Result<u32> {
        let b = self.take(what, 4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    pub fn u64(&mut self, what: &'static str) -> Result<u64> {
        let b = self.take(what, 8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    /// A presence flag: 0 or 1.
    pub fn flag(&mut self, what: &'static str) -> Result<bool> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            value => Err(Error::BadFlag { what, value }),
        }
    }

    /// A `u32` count, refused above `max`.
    pub fn count(&mut self, what: &'static str, max: usize) -> Result<usize> {
        let n = self.u32(what)?;
        let n = usize::try_from(n).unwrap_or(usize::MAX);
        if n > max {
            return Err(Error::LengthCap {
                what,
                len: n as u64,
                max: max as u64,
            });
        }
        Ok(n)
    }

    /// Length-prefixed bytes, refused above `max`.
    pub fn bytes(&mut self, what: &'static str, max: usize) -> Result<&'a [u8]> {
        let n = self.count(what, max)?;
        self.take(what, n)
    }

    pub fn pod<T: Pod>(&mut self, what: &'static str) -> Result<T> {
        let b = self.bytes(what, std::mem::size_of::<T>().max(1) * 2)?;
        pod_from(what, b)
    }

    /// Fails unless every byte was consumed.
    pub fn finish(&self) -> Result<()> {
        if self.inner.end().is_ok() {
            Ok(())
        } else {
            Err(Error::TrailingBytes {
                bytes: self.remaining(),
            })
        }
    }
}
