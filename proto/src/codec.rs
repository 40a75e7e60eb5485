//! The workspace's one byte codec: little-endian fields, every length and count checked
//! (against a cap and against the bytes actually present) before anything is allocated.
//!
//! Every format Ferry reads from a peer, a VMM or a file is written with [`Writer`] and read
//! with [`Reader`]: the three message protocols, the RDMA offer and answer, the vCPU state
//! and CPU-profile blobs, the test VMMs' device state and the durable records.

use ferry_engine::plan::PageRange;
use ferry_engine::session::SessionId;

use crate::ProtoError;

/// Longest VM id, reason or other short string on the wire.
pub const MAX_STR: usize = 4096;

/// Appends fixed-layout little-endian fields to a buffer.
#[derive(Default)]
pub struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    /// An empty writer.
    pub fn new() -> Self {
        Self::default()
    }
    /// The bytes written.
    pub fn finish(self) -> Vec<u8> {
        self.buf
    }
    /// One byte.
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }
    /// Two bytes, LE.
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Four bytes, LE.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Eight bytes, LE.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Sixteen bytes, LE.
    pub fn u128(&mut self, v: u128) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Raw bytes of a fixed size known to both sides.
    pub fn fixed(&mut self, b: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(b);
        self
    }
    /// A u32 length, then the bytes.
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.u32(b.len() as u32);
        self.buf.extend_from_slice(b);
        self
    }
    /// A UTF-8 string as [`Writer::bytes`].
    pub fn str(&mut self, s: &str) -> &mut Self {
        self.bytes(s.as_bytes())
    }
    /// Words for people (a reason, a message, a detail): cut to [`MAX_STR`] bytes, on a
    /// character boundary, which is what every decoder of such a field accepts. An error
    /// chain longer than that must not cost the link that carries it.
    ///
    pub fn text(&mut self, s: &str) -> &mut Self {
        let mut end = s.len().min(MAX_STR);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        self.str(&s[..end])
    }
    /// A boolean as one byte, 0 or 1.
    pub fn bool(&mut self, v: bool) -> &mut Self {
        self.u8(u8::from(v))
    }
    /// A session id (16 bytes).
    pub fn session(&mut self, id: &SessionId) -> &mut Self {
        self.fixed(&id.0)
    }
    /// A u32 count, then each range as `region u32 | first u64 | count u64`.
    pub fn ranges(&mut self, ranges: &[PageRange]) -> &mut Self {
        self.u32(ranges.len() as u32);
        for r in ranges {
            self.u32(r.region).u64(r.first).u64(r.count);
        }
        self
    }
    /// A presence byte (0 or 1), then the value when present.
    pub fn opt<T>(&mut self, v: Option<&T>, put: impl FnOnce(&mut Self, &T)) -> &mut Self {
        match v {
            None => self.u8(0),
            Some(v) => {
                self.u8(1);
                put(self, v);
                self
            }
        }
    }
}

/// Reads fields written by [`Writer`], failing (never panicking) on short or bad input.
pub struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    /// A reader over the payload of message `what` (named in errors).
    pub fn new(buf: &'a [u8], what: &'static str) -> Self {
        Self { buf, what }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        if self.buf.len() < n {
            return Err(ProtoError::Truncated { what: self.what });
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }

    /// The next `n` bytes, raw.
    ///
    /// # Errors
    ///
    /// [`ProtoError::Truncated`] when fewer are left.
    pub fn raw(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        self.take(n)
    }

    /// Bytes left.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    /// Fails unless every byte was consumed.
    ///
    /// # Errors
    ///
    /// [`ProtoError::TrailingBytes`].
    pub fn end(&self) -> Result<(), ProtoError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(ProtoError::TrailingBytes {
                what: self.what,
                extra: self.buf.len(),
            })
        }
    }

    /// One byte.
    ///
    /// # Errors
    ///
    /// [`ProtoError::Truncated`].
    pub fn u8(&mut self) -> Result<u8, ProtoError> {
        Ok(self.take(1)?[0])
    }
    /// Two bytes, LE.
    ///
    /// # Errors
    ///
    /// [`ProtoError::Truncated`].
    pub fn u16(&mut self) -> Result<u16, ProtoError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    /// Four bytes, LE.
    ///
    /// # Errors
    ///
    /// [`ProtoError::Truncated`].
    pub fn u32(&mut self) -> Result<u32, ProtoError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    /// Eight bytes, LE.
    ///
    /// # Errors
    ///
    /// [`ProtoError::Truncated`].
    pub fn u64(&mut self) -> Result<u64, ProtoError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    /// Sixteen bytes, LE.
    ///
    /// # Errors
    ///
    /// [`ProtoError::Truncated`].
    pub fn u128(&mut self) -> Result<u128, ProtoError> {
        Ok(u128::from_le_bytes(self.array()?))
    }
    /// A fixed-size array.
    ///
    /// # Errors
    ///
    /// [`ProtoError::Truncated`].
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], ProtoError> {
        let s = self.take(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    /// Length-prefixed bytes of at most `cap` bytes.
    ///
    /// # Errors
    ///
    /// [`ProtoError::TooLong`] over the cap, [`ProtoError::Truncated`] when shorter.
    pub fn bytes(&mut self, cap: usize) -> Result<&'a [u8], ProtoError> {
        let n = self.u32()? as usize;
        if n > cap {
            return Err(ProtoError::TooLong {
                what: self.what,
                len: n as u64,
                cap: cap as u64,
            });
        }
        self.take(n)
    }
    /// A length-prefixed UTF-8 string of at most `cap` bytes.
    ///
    /// # Errors
    ///
    /// As [`Reader::bytes`], plus [`ProtoError::BadUtf8`].
    pub fn str(&mut self, cap: usize) -> Result<String, ProtoError> {
        let b = self.bytes(cap)?;
        String::from_utf8(b.to_vec()).map_err(|_| ProtoError::BadUtf8 { what: self.what })
    }
    /// A boolean byte (0 or 1; anything else is an error naming `what`).
    ///
    /// # Errors
    ///
    /// [`ProtoError::Truncated`], [`ProtoError::BadValue`].
    pub fn bool(&mut self, what: &'static str) -> Result<bool, ProtoError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(ProtoError::BadValue {
                what,
                value: u64::from(v),
            }),
        }
    }
    /// A session id.
    ///
    /// # Errors
    ///
    /// [`ProtoError::Truncated`].
    pub fn session(&mut self) -> Result<SessionId, ProtoError> {
        Ok(SessionId(self.array()?))
    }
    /// Page ranges written by [`Writer::ranges`], at most `cap` of them; each must have a
    /// non-zero count that does not overflow (bounds against a VM's layout are the
    /// receiver's job).
    ///
    /// # Errors
    ///
    /// [`ProtoError::TooLong`], [`ProtoError::Truncated`], [`ProtoError::BadValue`].
    pub fn ranges(&mut self, cap: usize) -> Result<Vec<PageRange>, ProtoError> {
        let n = self.count(cap, 20)?;
        (0..n)
            .map(|_| {
                let r = PageRange {
                    region: self.u32()?,
                    first: self.u64()?,
                    count: self.u64()?,
                };
                if r.count == 0 || r.first.checked_add(r.count).is_none() {
                    return Err(ProtoError::BadValue {
                        what: "page range",
                        value: r.count,
                    });
                }
                Ok(r)
            })
            .collect()
    }
    /// An optional value written by [`Writer::opt`].
    ///
    /// # Errors
    ///
    /// [`ProtoError::BadValue`] for a presence byte other than 0 or 1, and `get`'s errors.
    pub fn opt<T>(
        &mut self,
        what: &'static str,
        get: impl FnOnce(&mut Self) -> Result<T, ProtoError>,
    ) -> Result<Option<T>, ProtoError> {
        if self.bool(what)? {
            Ok(Some(get(self)?))
        } else {
            Ok(None)
        }
    }
    /// A u32 element count, checked against a cap and against the bytes left
    /// (`min_elem` bytes per element) before anything is allocated for it.
    ///
    /// # Errors
    ///
    /// [`ProtoError::TooLong`] or [`ProtoError::Truncated`].
    pub fn count(&mut self, cap: usize, min_elem: usize) -> Result<usize, ProtoError> {
        let n = self.u32()? as usize;
        if n > cap {
            return Err(ProtoError::TooLong {
                what: self.what,
                len: n as u64,
                cap: cap as u64,
            });
        }
        if n.saturating_mul(min_elem) > self.buf.len() {
            return Err(ProtoError::Truncated { what: self.what });
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use MAX_STR;

    #[test]
    fn long_text_is_cut_to_what_decoders_accept_on_a_character_boundary() {
        // 'é' is two bytes: MAX_STR falls inside one of them.
        let long = format!("x{}", "é".repeat(MAX_STR));
        let mut w = Writer::new();
        w.text(&long).text("short");
        let b = w.finish();
        let mut r = Reader::new(&b, "test");
        let cut = r.str(MAX_STR).expect("decodes under the cap");
        assert!(
            cut.len() <= MAX_STR && cut.len() >= MAX_STR - 1,
            "{}",
            cut.len()
        );
        assert!(long.starts_with(&cut));
        assert_eq!(r.str(MAX_STR).ok().as_deref(), Some("short"));
    }

    #[test]
    fn round_trip_and_truncation() {
        let mut w = Writer::new();
        w.u8(1)
            .u16(2)
            .u32(3)
            .u64(4)
            .u128(5)
            .str("héllo")
            .bytes(&[9; 3]);
        let b = w.finish();
        let mut r = Reader::new(&b, "test");
        assert_eq!(r.u8().ok(), Some(1));
        assert_eq!(r.u16().ok(), Some(2));
        assert_eq!(r.u32().ok(), Some(3));
        assert_eq!(r.u64().ok(), Some(4));
        assert_eq!(r.u128().ok(), Some(5));
        assert_eq!(r.str(64).ok().as_deref(), Some("héllo"));
        assert_eq!(r.bytes(3).ok(), Some(&[9u8; 3][..]));
        assert!(r.end().is_ok());
        for cut in 0..b.len() {
            let mut r = Reader::new(&b[..cut], "test");
            let res = (|| -> Result<(), ProtoError> {
                r.u8()?;
                r.u16()?;
                r.u32()?;
                r.u64()?;
                r.u128()?;
                r.str(64)?;
                r.bytes(3)?;
                Ok(())
            })();
            assert!(res.is_err(), "cut at {cut} must fail");
        }
    }

    #[test]
    fn counts_are_capped_before_allocation() {
        let mut w = Writer::new();
        w.u32(u32::MAX);
        let b = w.finish();
        assert!(matches!(
            Reader::new(&b, "t").count(1000, 8),
            Err(ProtoError::TooLong { .. })
        ));
        assert!(matches!(
            Reader::new(&b, "t").count(usize::MAX, 8),
            Err(ProtoError::Truncated { .. })
        ));
        assert!(matches!(
            Reader::new(&b, "t").str(10),
            Err(ProtoError::TooLong { .. })
        ));
    }
}
