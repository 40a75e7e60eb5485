//! Data-connection frames (TCP transport): a fixed 32-byte little-endian header, then
//! for [`DataKind::Pages`] one XXH3-64 hash per page and the pages themselves.
//!
//! ```text
//! 0      4      6      8       12       16          24          32
//! | magic | kind | rsvd | round | region | first page | page count |
//! ```

use crate::ProtoError;

/// "FDAT" little-endian.
pub const DATA_MAGIC: u32 = 0x5441_4446;
/// Bytes of a data header.
pub const DATA_HEADER_LEN: usize = 32;
/// Most pages in one batch: 256 pages = 1 MiB of payload, the engine's chunk size, so a
/// batch is one planned piece and its hash table (2 KiB) is 0.2 % of the bytes.
pub const MAX_BATCH_PAGES: u64 = 256;

/// What a data frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataKind {
    /// `count` page hashes, then `count` pages.
    Pages = 1,
    /// `count` all-zero pages, sent as a marker only.
    Zero = 2,
    /// The channel's share of `round` is complete; `count` = pages it carried.
    RoundEnd = 3,
}

/// A parsed data header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataHeader {
    /// Frame kind.
    pub kind: DataKind,
    /// Round the frame belongs to.
    pub round: u32,
    /// Region index.
    pub region: u32,
    /// First page (region-relative).
    pub first: u64,
    /// Page count.
    pub count: u64,
}

impl DataHeader {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; DATA_HEADER_LEN] {
        let mut b = [0u8; DATA_HEADER_LEN];
        b[0..4].copy_from_slice(&DATA_MAGIC.to_le_bytes());
        b[4..6].copy_from_slice(&(self.kind as u16).to_le_bytes());
        b[8..12].copy_from_slice(&self.round.to_le_bytes());
        b[12..16].copy_from_slice(&self.region.to_le_bytes());
        b[16..24].copy_from_slice(&self.first.to_le_bytes());
        b[24..32].copy_from_slice(&self.count.to_le_bytes());
        b
    }

    /// Parses and sanity-checks a header (bounds against the VM layout are the
    /// receiver's job).
    ///
    /// # Errors
    ///
    /// [`ProtoError::BadMagic`], [`ProtoError::BadValue`] for an unknown kind or reserved
    /// bits, [`ProtoError::TooLong`] for a batch over [`MAX_BATCH_PAGES`].
    pub fn decode(b: &[u8; DATA_HEADER_LEN]) -> Result<Self, ProtoError> {
        let u32at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(a)
        };
        if u32at(0) != DATA_MAGIC {
            return Err(ProtoError::BadMagic {
                magic: u16::from_le_bytes([b[0], b[1]]),
            });
        }
        let kind = match u16::from_le_bytes([b[4], b[5]]) {
            1 => DataKind::Pages,
            2 => DataKind::Zero,
            3 => DataKind::RoundEnd,
            v => {
                return Err(ProtoError::BadValue {
                    what: "data frame kind",
                    value: u64::from(v),
                })
            }
        };
        if b[6] != 0 || b[7] != 0 {
            return Err(ProtoError::BadValue {
                what: "data frame reserved bytes",
                value: u64::from(u16::from_le_bytes([b[6], b[7]])),
            });
        }
        let h = Self {
            kind,
            round: u32at(8),
            region: u32at(12),
            first: u64at(16),
            count: u64at(24),
        };
        if kind == DataKind::Pages && (h.count == 0 || h.count > MAX_BATCH_PAGES) {
            return Err(ProtoError::TooLong {
                what: "page batch",
                len: h.count,
                cap: MAX_BATCH_PAGES,
            });
        }
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_rejects_garbage() {
        let h = DataHeader {
            kind: DataKind::Pages,
            round: 3,
            region: 1,
            first: 1 << 40,
            count: 256,
        };
        assert_eq!(DataHeader::decode(&h.encode()).ok(), Some(h));
        let mut big = h;
        big.count = 257;
        assert!(DataHeader::decode(&big.encode()).is_err());
        let mut b = h.encode();
        b[4] = 9;
        assert!(DataHeader::decode(&b).is_err());
        let mut b = h.encode();
        b[0] ^= 1;
        assert!(matches!(
            DataHeader::decode(&b),
            Err(ProtoError::BadMagic { .. })
        ));
        let mut b = h.encode();
        b[7] = 1;
        assert!(DataHeader::decode(&b).is_err());
    }
}
