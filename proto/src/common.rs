//! What the three protocols share: the [`Message`] trait the framing works with, the RAM
//! layout type, VM ids, and the caps every decoder applies.

use crate::codec::{Reader, Writer};
use crate::ProtoError;

pub use crate::codec::MAX_STR;
/// Most RAM regions a VM may register: one memfd per region rides with one message, and
/// Linux passes at most 253 descriptors per `sendmsg` (`SCM_MAX_FD`).
pub const MAX_REGIONS: usize = 253;
/// Largest state blob: Firecracker caps snapshot reads at 10 MB; a VMM with device state
/// plus per-page records (the workload VMM keeps 8 bytes per page: 2 MiB per GiB) needs
/// more, and 64 MiB covers 32 GiB of workload-VMM guest.
pub const MAX_BLOB: usize = 64 << 20;
/// Largest single frame: the largest blob plus room for its header fields.
pub const MAX_FRAME: usize = MAX_BLOB + 64 * 1024;
/// Longest VM id: ids name files in the state directory.
pub const MAX_VM_ID: usize = 64;

/// A message of one of Ferry's protocols.
pub trait Message: Sized {
    /// The protocol's name, for errors ("VMM", "CLI", "peer").
    const PROTOCOL: &'static str;
    /// The frame magic that marks this protocol (two ASCII bytes, little-endian).
    const MAGIC: u16;
    /// The message's tag (from 1; 0 is invalid).
    fn tag(&self) -> u16;
    /// The message's name, for logs and errors.
    fn name(&self) -> &'static str;
    /// Writes the payload.
    fn encode(&self, w: &mut Writer);
    /// Reads a payload with its tag; every length is checked before use.
    ///
    /// # Errors
    ///
    /// [`ProtoError::UnknownTag`] and the [`Reader`]'s errors.
    fn decode(tag: u16, r: &mut Reader<'_>) -> Result<Self, ProtoError>;
}

/// Frame magic of the VMM protocol ("FV").
pub const VMM_MAGIC: u16 = u16::from_le_bytes(*b"FV");
/// Frame magic of the CLI protocol ("FC").
pub const CLI_MAGIC: u16 = u16::from_le_bytes(*b"FC");
/// Frame magic of the peer protocol ("FP").
pub const PEER_MAGIC: u16 = u16::from_le_bytes(*b"FP");

/// The protocol a frame magic names, if any.
pub fn protocol_of(magic: u16) -> Option<&'static str> {
    match magic {
        VMM_MAGIC => Some("VMM"),
        CLI_MAGIC => Some("CLI"),
        PEER_MAGIC => Some("peer"),
        _ => None,
    }
}

/// A guest RAM region as the VMM registers it; its memfd travels beside the message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionInfo {
    /// Guest-physical base address.
    pub gpa: u64,
    /// Size in bytes, a multiple of the page size.
    pub size: u64,
    /// Offset of the region in its memfd.
    pub offset: u64,
}

/// Writes a region list.
pub fn put_regions(w: &mut Writer, regions: &[RegionInfo]) {
    w.u32(regions.len() as u32);
    for r in regions {
        w.u64(r.gpa).u64(r.size).u64(r.offset);
    }
}

/// Reads a region list of at most [`MAX_REGIONS`].
///
/// # Errors
///
/// The [`Reader`]'s errors.
pub fn get_regions(r: &mut Reader<'_>) -> Result<Vec<RegionInfo>, ProtoError> {
    let n = r.count(MAX_REGIONS, 24)?;
    (0..n)
        .map(|_| {
            Ok(RegionInfo {
                gpa: r.u64()?,
                size: r.u64()?,
                offset: r.u64()?,
            })
        })
        .collect()
}

/// Checks a VM id: 1 to [`MAX_VM_ID`] of `A-Z a-z 0-9 . _ -`, not starting with a dot
/// (ids name files in the state directory: `../x` must not escape it).
///
/// # Errors
///
/// [`ProtoError::BadVmId`].
pub fn check_vm_id(id: &str) -> Result<(), ProtoError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_VM_ID
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ProtoError::BadVmId {
            id: id.chars().take(80).collect(),
        })
    }
}

/// Checks a VM's layout: at least one region, each a whole number of pages at a
/// page-aligned guest-physical address and memfd offset, none overlapping another.
///
/// # Errors
///
/// What is wrong, for the VMM's operator.
pub fn check_layout(regions: &[RegionInfo]) -> Result<(), String> {
    const PAGE: u64 = 4096;
    if regions.is_empty() {
        return Err("no RAM regions".into());
    }
    let mut spans = Vec::with_capacity(regions.len());
    for (i, r) in regions.iter().enumerate() {
        if r.size == 0 || r.size % PAGE != 0 || r.gpa % PAGE != 0 || r.offset % PAGE != 0 {
            return Err(format!(
                "region {i} (gpa {:#x}, size {:#x}, offset {:#x}) is not whole, aligned pages",
                r.gpa, r.size, r.offset
            ));
        }
        let end = r
            .gpa
            .checked_add(r.size)
            .ok_or_else(|| format!("region {i} wraps around the address space"))?;
        spans.push((r.gpa, end, i));
    }
    spans.sort();
    for w in spans.windows(2) {
        if w[1].0 < w[0].1 {
            return Err(format!("regions {} and {} overlap", w[0].2, w[1].2));
        }
    }
    Ok(())
}

/// An error with its causes, for a message that crosses a socket.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Reads a VM id and checks it.
///
/// # Errors
///
/// The [`Reader`]'s errors and [`ProtoError::BadVmId`].
pub fn get_vm_id(r: &mut Reader<'_>) -> Result<String, ProtoError> {
    let id = r.str(MAX_STR)?;
    check_vm_id(&id)?;
    Ok(id)
}

/// Decodes a whole payload as message `M`: every byte must be used.
///
/// # Errors
///
/// `M::decode`'s errors and [`ProtoError::TrailingBytes`].
pub fn decode_payload<M: Message>(tag: u16, payload: &[u8]) -> Result<M, ProtoError> {
    let mut r = Reader::new(payload, M::PROTOCOL);
    let m = M::decode(tag, &mut r)?;
    r.end()?;
    Ok(m)
}

/// Encodes a message's payload.
pub fn encode_payload<M: Message>(m: &M) -> Vec<u8> {
    let mut w = Writer::new();
    m.encode(&mut w);
    w.finish()
}

/// Test helper: every sample decodes back to itself, and every shorter or longer payload
/// is refused; the samples cover `tags` distinct tags.
#[cfg(test)]
pub(crate) fn assert_round_trips<M: Message + PartialEq + std::fmt::Debug>(
    samples: Vec<M>,
    tags: usize,
) {
    let seen: std::collections::HashSet<u16> = samples.iter().map(Message::tag).collect();
    assert_eq!(seen.len(), tags, "one sample per tag");
    for m in samples {
        let b = encode_payload(&m);
        assert_eq!(
            decode_payload::<M>(m.tag(), &b).ok().as_ref(),
            Some(&m),
            "{}",
            m.name()
        );
        for cut in 0..b.len() {
            assert!(
                decode_payload::<M>(m.tag(), &b[..cut]).is_err(),
                "{} cut {cut}",
                m.name()
            );
        }
        let mut longer = b.clone();
        longer.push(0);
        assert!(
            decode_payload::<M>(m.tag(), &longer).is_err(),
            "{}",
            m.name()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_ids_cannot_name_paths_outside_the_state_directory() {
        for good in ["vm1", "a.b_c-D9", &"x".repeat(64)] {
            assert!(check_vm_id(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "../escaped",
            "a/b",
            ".hidden",
            "..",
            "vm 1",
            "vm\n",
            &"x".repeat(65),
            "é",
        ] {
            assert!(
                matches!(check_vm_id(bad), Err(ProtoError::BadVmId { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn layouts_must_be_aligned_and_disjoint() {
        let r = |gpa, size| RegionInfo {
            gpa,
            size,
            offset: 0,
        };
        assert!(check_layout(&[r(0, 1 << 20), r(1 << 32, 1 << 20)]).is_ok());
        assert!(check_layout(&[]).is_err());
        assert!(check_layout(&[r(0, 1000)]).is_err());
        assert!(check_layout(&[r(100, 4096)]).is_err());
        assert!(check_layout(&[r(0, 8192), r(4096, 4096)]).is_err());
        assert!(check_layout(&[r(u64::MAX - 4095, 8192)]).is_err());
    }

    #[test]
    fn magics_are_distinct_ascii() {
        assert_eq!(VMM_MAGIC.to_le_bytes(), *b"FV");
        assert_ne!(VMM_MAGIC, CLI_MAGIC);
        assert_ne!(CLI_MAGIC, PEER_MAGIC);
        assert_eq!(protocol_of(PEER_MAGIC), Some("peer"));
        assert_eq!(protocol_of(0x5246), None);
    }
}
