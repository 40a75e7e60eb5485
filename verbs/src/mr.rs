//! Protection domains, memory registration of memory we do not own, and the
//! descriptors of remote memory exchanged with the peer.

use std::fmt;
use std::io;
use std::marker::PhantomData;
use std::ptr::NonNull;
use std::sync::Arc;

use crate::device::{Context, ContextInner};
use crate::error::{verbs_error, Error, Result};
use crate::sys;

pub(crate) struct PdInner {
    pd: NonNull<sys::ibv_pd>,
    pub(crate) ctx: Arc<ContextInner>,
}

// SAFETY: an `ibv_pd` may be used from any thread (libibverbs is thread-safe
// for PD use: registration, QP creation); the pointer is owned and freed once.
unsafe impl Send for PdInner {}
// SAFETY: as above; `&PdInner` only allows thread-safe verbs.
unsafe impl Sync for PdInner {}

impl PdInner {
    pub(crate) fn as_ptr(&self) -> *mut sys::ibv_pd {
        self.pd.as_ptr()
    }
}

impl Drop for PdInner {
    fn drop(&mut self) {
        // SAFETY: allocated by `ibv_alloc_pd`; every MR and QP in this PD
        // holds an `Arc<PdInner>`, so none is left when it is deallocated.
        let rc = unsafe { sys::ibv_dealloc_pd(self.pd.as_ptr()) };
        if rc != 0 {
            tracing::warn!(rc, "ibv_dealloc_pd failed");
        }
    }
}

/// A protection domain: memory regions and queue pairs of one PD may be used
/// together, and only together.
///
/// Cheap to clone (reference counted). Resources created from it keep it
/// (and the device) alive, so drop order never matters for safety.
#[derive(Clone)]
pub struct ProtectionDomain {
    pub(crate) inner: Arc<PdInner>,
}

impl fmt::Debug for ProtectionDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProtectionDomain")
            .field("device", &self.inner.ctx.name())
            .finish_non_exhaustive()
    }
}

mod sealed {
    pub trait Sealed {}
}

/// The access a [`MemoryRegion`] grants. Implemented only by [`LocalWrite`]
/// and [`RemoteRead`]: remote write and remote atomics cannot be expressed,
/// so no Ferry host can ever expose memory to writes by its peer.
pub trait Access: sealed::Sealed + Send + Sync + 'static {
    /// The `ibv_access_flags` bits.
    #[doc(hidden)]
    const FLAGS: u32;
    /// Name for messages.
    const NAME: &'static str;
}

/// Destination-side access: the local NIC may write this memory with the data
/// of RDMA READs this host issues. No remote access at all.
#[derive(Debug)]
pub enum LocalWrite {}

/// Source-side access: the peer may RDMA READ this memory (and nothing else;
/// REMOTE_READ needs no LOCAL_WRITE, unlike REMOTE_WRITE and atomics).
#[derive(Debug)]
pub enum RemoteRead {}

impl sealed::Sealed for LocalWrite {}
impl sealed::Sealed for RemoteRead {}

impl Access for LocalWrite {
    const FLAGS: u32 = sys::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0;
    const NAME: &'static str = "LOCAL_WRITE";
}

impl Access for RemoteRead {
    const FLAGS: u32 = sys::ibv_access_flags::IBV_ACCESS_REMOTE_READ.0;
    const NAME: &'static str = "REMOTE_READ";
}

/// The smallest unit registrations are split at (pieces stay page aligned
/// relative to the start, so no page is pinned by two pieces needlessly).
const PIECE_ALIGN: u64 = 4096;

impl ProtectionDomain {
    pub(crate) fn new(ctx: &Context) -> Result<ProtectionDomain> {
        // SAFETY: the context is open for as long as `ctx` lives; the PD is
        // owned by `PdInner` (which keeps the context alive).
        let pd = unsafe { sys::ibv_alloc_pd(ctx.inner.as_ptr()) };
        let Some(pd) = NonNull::new(pd) else {
            let err = io::Error::last_os_error();
            return Err(verbs_error("ibv_alloc_pd", err, |source| Error::AllocPd {
                source,
            }));
        };
        Ok(ProtectionDomain {
            inner: Arc::new(PdInner {
                pd,
                ctx: Arc::clone(&ctx.inner),
            }),
        })
    }

    /// Register `len` bytes at `addr` (memory this crate does not own, e.g.
    /// a `MAP_SHARED` mapping of a guest-RAM memfd) with access `A`.
    ///
    /// Regions larger than the device's `max_mr_size` are registered in
    /// several pieces, transparently: the region has one lkey/rkey per piece,
    /// and reads are split at piece boundaries.
    ///
    /// # Safety
    /// The caller guarantees, for as long as the returned region lives
    /// (the obligations of the `ibverbs` crate's `register_from_raw`):
    /// - `addr..addr+len` is valid, mapped memory of this process for all
    ///   `len` bytes;
    /// - it is not unmapped (`munmap`, `mremap`, or `MAP_FIXED` over it)
    ///   while registered: drop the region first;
    /// - no access races with the device in a way the caller cannot
    ///   tolerate: with [`LocalWrite`] the NIC writes it while READs are in
    ///   flight, so nobody may form `&`/`&mut` references over it then (use
    ///   volatile or raw-pointer copies); with [`RemoteRead`] the peer reads
    ///   it at any time, so concurrent writers (a running guest) produce torn
    ///   pages that the caller must re-send (Ferry's dirty-log rule does).
    ///
    /// # Errors
    /// [`Error::Invalid`] for a null `addr` or zero `len`;
    /// [`Error::RegisterMemory`] (or [`Error::Unsupported`]) if a piece
    /// cannot be registered (nothing stays registered then).
    ///
    /// # Panics
    /// Never.
    pub unsafe fn register<A: Access>(&self, addr: *mut u8, len: usize) -> Result<MemoryRegion<A>> {
        let max = self.inner.ctx.limits().max_mr_size;
        // SAFETY: forwarded verbatim from this function's own contract.
        unsafe { self.register_in_pieces(addr, len, max) }
    }

    /// Like [`register`](Self::register), with pieces of at most
    /// `max_piece` bytes (rounded down to 4 KiB, at least 4 KiB) even when
    /// the device allows larger ones. Used to test piecewise registration
    /// on devices (like rxe) whose `max_mr_size` is huge.
    ///
    /// # Safety
    /// As [`register`](Self::register).
    ///
    /// # Errors
    /// As [`register`](Self::register).
    ///
    /// # Panics
    /// Never.
    pub unsafe fn register_in_pieces<A: Access>(
        &self,
        addr: *mut u8,
        len: usize,
        max_piece: u64,
    ) -> Result<MemoryRegion<A>> {
        if addr.is_null() || len == 0 {
            return Err(Error::Invalid {
                what: "memory registration",
                reason: format!("null address or zero length ({addr:p}, {len})"),
            });
        }
        let piece_limit = max_piece
            .min(self.inner.ctx.limits().max_mr_size)
            .max(PIECE_ALIGN)
            / PIECE_ALIGN
            * PIECE_ALIGN;
        let start = addr as u64;
        let total = len as u64;
        start.checked_add(total).ok_or_else(|| Error::Invalid {
            what: "memory registration",
            reason: "address range wraps around".into(),
        })?;
        let mut region = MemoryRegion {
            pieces: Vec::new(),
            addr: start,
            len: total,
            pd: Arc::clone(&self.inner),
            _access: PhantomData,
        };
        let mut off = 0u64;
        while off < total {
            let plen = piece_limit.min(total - off);
            let paddr = start + off;
            let plen_usize = usize::try_from(plen).expect("piece length <= len, which is a usize");
            // SAFETY: `paddr..paddr+plen` lies inside the caller's range,
            // which the caller guarantees valid and mapped while the region
            // lives; the MR is owned by `region` and deregistered on drop.
            let mr = unsafe {
                sys::ibv_reg_mr(
                    self.inner.as_ptr(),
                    paddr as *mut libc::c_void,
                    plen_usize,
                    A::FLAGS as libc::c_int,
                )
            };
            let Some(mr) = NonNull::new(mr) else {
                let err = io::Error::last_os_error();
                // `region` drops here and deregisters the pieces made so far.
                return Err(verbs_error("ibv_reg_mr", err, |source| {
                    Error::RegisterMemory {
                        addr: paddr,
                        len: plen,
                        access: A::NAME,
                        source,
                    }
                }));
            };
            // SAFETY: `mr` was just returned by `ibv_reg_mr` and is valid.
            let (lkey, rkey) = unsafe { ((*mr.as_ptr()).lkey, (*mr.as_ptr()).rkey) };
            region.pieces.push(MrPiece {
                mr,
                span: KeyedSpan {
                    addr: paddr,
                    len: plen,
                    key: lkey,
                },
                rkey,
            });
            off += plen;
        }
        tracing::debug!(
            addr = format_args!("{start:#x}"),
            len = total,
            pieces = region.pieces.len(),
            access = A::NAME,
            "registered memory"
        );
        Ok(region)
    }

    /// The raw `ibv_pd`. Valid while `self` lives; do not deallocate it.
    #[must_use]
    pub fn as_raw(&self) -> *mut sys::ibv_pd {
        self.inner.as_ptr()
    }
}

/// A contiguous span of registered memory and the key that covers it
/// (an lkey locally, an rkey for the peer's memory).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct KeyedSpan {
    pub(crate) addr: u64,
    pub(crate) len: u64,
    pub(crate) key: u32,
}

impl KeyedSpan {
    fn end(&self) -> u64 {
        self.addr + self.len
    }
}

/// Find the span containing `addr` in spans sorted by address.
pub(crate) fn span_at(spans: &[KeyedSpan], addr: u64) -> Option<&KeyedSpan> {
    let i = spans.partition_point(|s| s.addr <= addr);
    let s = spans.get(i.checked_sub(1)?)?;
    (addr < s.end()).then_some(s)
}

struct MrPiece {
    mr: NonNull<sys::ibv_mr>,
    /// Address range and lkey.
    span: KeyedSpan,
    rkey: u32,
}

/// Registered memory, in one or more pieces; deregistered on drop (its rkeys
/// die then: the peer's READs with them fail with a remote access error).
///
/// `A` is [`LocalWrite`] (READ destination) or [`RemoteRead`] (READ source).
/// Dropping a destination region while READs into it are in flight is not
/// undefined behaviour (the NIC checks keys); those READs fail with
/// [`WcError::LocalProtectionError`](crate::WcError::LocalProtectionError).
pub struct MemoryRegion<A: Access> {
    pieces: Vec<MrPiece>,
    addr: u64,
    len: u64,
    pd: Arc<PdInner>,
    _access: PhantomData<A>,
}

// SAFETY: the MR handles are owned by this value, only read (keys) through
// `&self`, and deregistered once in Drop; libibverbs allows that from any
// thread. The registered memory itself is never accessed through this type.
unsafe impl<A: Access> Send for MemoryRegion<A> {}
// SAFETY: `&MemoryRegion` only exposes immutable key/address data.
unsafe impl<A: Access> Sync for MemoryRegion<A> {}

impl<A: Access> fmt::Debug for MemoryRegion<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryRegion")
            .field("access", &A::NAME)
            .field("addr", &format_args!("{:#x}", self.addr))
            .field("len", &self.len)
            .field("pieces", &self.pieces.len())
            .finish()
    }
}

impl<A: Access> MemoryRegion<A> {
    /// Start address of the region (as registered: the process's virtual
    /// address, which is also the address the peer uses for READs).
    #[must_use]
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// Length in bytes.
    #[must_use]
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Never true: empty regions cannot be registered.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of registrations the region was split into.
    #[must_use]
    pub fn piece_count(&self) -> usize {
        self.pieces.len()
    }

    /// Whether `pd` is the protection domain this region belongs to.
    pub(crate) fn belongs_to(&self, pd: &Arc<PdInner>) -> bool {
        Arc::ptr_eq(&self.pd, pd)
    }

    pub(crate) fn local_spans(&self) -> impl Iterator<Item = KeyedSpan> + '_ {
        self.pieces.iter().map(|p| p.span)
    }

    /// The raw `ibv_mr` of each piece, in address order. Valid while `self`
    /// lives; do not deregister them.
    #[must_use]
    pub fn as_raw(&self) -> Vec<*mut sys::ibv_mr> {
        self.pieces.iter().map(|p| p.mr.as_ptr()).collect()
    }
}

impl MemoryRegion<RemoteRead> {
    /// What the peer needs to READ this region: one [`RemoteRegion`] per
    /// piece. Send them over the (authenticated) control connection.
    #[must_use]
    pub fn remote_regions(&self) -> Vec<RemoteRegion> {
        self.pieces
            .iter()
            .map(|p| RemoteRegion {
                addr: p.span.addr,
                len: p.span.len,
                rkey: p.rkey,
            })
            .collect()
    }
}

impl<A: Access> Drop for MemoryRegion<A> {
    fn drop(&mut self) {
        for p in &self.pieces {
            // SAFETY: each MR was returned by `ibv_reg_mr`, is owned by this
            // region and deregistered exactly once, here.
            let rc = unsafe { sys::ibv_dereg_mr(p.mr.as_ptr()) };
            if rc != 0 {
                // The kernel keeps the memory pinned; nothing unsafe follows.
                tracing::warn!(rc, addr = p.span.addr, "ibv_dereg_mr failed; MR leaked");
            }
        }
    }
}

/// A piece of the peer's memory we may READ: address in the peer's address
/// space, length, rkey. Exchanged over Ferry's TCP control connection with a
/// fixed little-endian layout (`addr u64 | len u64 | rkey u32`, 20 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RemoteRegion {
    /// Start address, in the peer's address space.
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// Remote key.
    pub rkey: u32,
}

impl RemoteRegion {
    /// Length of the encoding.
    pub const ENCODED_LEN: usize = 20;

    /// Fixed little-endian encoding.
    #[must_use]
    pub fn to_bytes(&self) -> [u8; Self::ENCODED_LEN] {
        let mut b = [0u8; Self::ENCODED_LEN];
        b[0..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..16].copy_from_slice(&self.len.to_le_bytes());
        b[16..20].copy_from_slice(&self.rkey.to_le_bytes());
        b
    }

    /// Decode [`to_bytes`](Self::to_bytes) output.
    ///
    /// # Errors
    /// [`Error::BadEncoding`] unless `b` is exactly [`Self::ENCODED_LEN`]
    /// bytes. Values are checked by [`RemoteMemory::new`].
    pub fn from_bytes(b: &[u8]) -> Result<RemoteRegion> {
        let b: &[u8; Self::ENCODED_LEN] = b.try_into().map_err(|_| Error::BadEncoding {
            what: "RemoteRegion",
            expected: Self::ENCODED_LEN,
            got: b.len(),
        })?;
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[0..8]);
        let mut l = [0u8; 8];
        l.copy_from_slice(&b[8..16]);
        let mut k = [0u8; 4];
        k.copy_from_slice(&b[16..20]);
        Ok(RemoteRegion {
            addr: u64::from_le_bytes(a),
            len: u64::from_le_bytes(l),
            rkey: u32::from_le_bytes(k),
        })
    }
}

/// The peer's readable memory: validated, sorted, non-overlapping
/// [`RemoteRegion`]s. READs are only ever posted inside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteMemory {
    spans: Vec<KeyedSpan>,
}

impl RemoteMemory {
    /// Most regions a peer may advertise (a cap on what the peer can make us
    /// allocate: 1 Mi regions of >= 4 KiB covers 4 TiB even at page size; a
    /// real source sends one per RAM slot piece).
    pub const MAX_REGIONS: usize = 1 << 20;

    /// Validate the regions a peer advertised.
    ///
    /// # Errors
    /// [`Error::Invalid`] if there are none or more than
    /// [`Self::MAX_REGIONS`], or one is empty, wraps around the address
    /// space, or overlaps another.
    pub fn new(mut regions: Vec<RemoteRegion>) -> Result<RemoteMemory> {
        let invalid = |reason: String| Error::Invalid {
            what: "remote memory",
            reason,
        };
        if regions.is_empty() || regions.len() > Self::MAX_REGIONS {
            return Err(invalid(format!(
                "{} regions (1..={} allowed)",
                regions.len(),
                Self::MAX_REGIONS
            )));
        }
        regions.sort_by_key(|r| r.addr);
        let mut prev_end = 0u64;
        for (i, r) in regions.iter().enumerate() {
            let end = r
                .addr
                .checked_add(r.len)
                .ok_or_else(|| invalid(format!("region {:#x}+{:#x} wraps", r.addr, r.len)))?;
            if r.len == 0 {
                return Err(invalid(format!("empty region at {:#x}", r.addr)));
            }
            if i > 0 && r.addr < prev_end {
                return Err(invalid(format!("region at {:#x} overlaps", r.addr)));
            }
            prev_end = end;
        }
        Ok(RemoteMemory {
            spans: regions
                .iter()
                .map(|r| KeyedSpan {
                    addr: r.addr,
                    len: r.len,
                    key: r.rkey,
                })
                .collect(),
        })
    }

    /// Whether `addr..addr+len` is readable (possibly across several
    /// adjacent regions).
    #[must_use]
    pub fn covers(&self, addr: u64, len: u64) -> bool {
        covered(&self.spans, addr, len)
    }

    pub(crate) fn spans(&self) -> &[KeyedSpan] {
        &self.spans
    }
}

/// Whether sorted `spans` cover `addr..addr+len` without gaps.
pub(crate) fn covered(spans: &[KeyedSpan], addr: u64, len: u64) -> bool {
    let Some(end) = addr.checked_add(len) else {
        return false;
    };
    let mut at = addr;
    while at < end {
        match span_at(spans, at) {
            Some(s) => at = s.end(),
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_region_round_trips_little_endian() {
        let r = RemoteRegion {
            addr: 0x0102_0304_0506_0708,
            len: 0x1000,
            rkey: 0xaabb_ccdd,
        };
        let b = r.to_bytes();
        assert_eq!(&b[0..8], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(&b[16..20], &[0xdd, 0xcc, 0xbb, 0xaa]);
        assert_eq!(RemoteRegion::from_bytes(&b).expect("decodes"), r);
        for bad in [0usize, 19, 21] {
            let v = vec![0u8; bad];
            assert!(matches!(
                RemoteRegion::from_bytes(&v),
                Err(Error::BadEncoding { got, expected: 20, .. }) if got == bad
            ));
        }
    }

    fn rr(addr: u64, len: u64, rkey: u32) -> RemoteRegion {
        RemoteRegion { addr, len, rkey }
    }

    #[test]
    fn remote_memory_rejects_bad_peer_input() {
        assert!(RemoteMemory::new(vec![]).is_err());
        assert!(RemoteMemory::new(vec![rr(0x1000, 0, 1)]).is_err());
        assert!(RemoteMemory::new(vec![rr(u64::MAX - 1, 4, 1)]).is_err());
        assert!(RemoteMemory::new(vec![rr(0x1000, 0x2000, 1), rr(0x2000, 0x1000, 2)]).is_err());
        let m = RemoteMemory::new(vec![rr(0x3000, 0x1000, 2), rr(0x1000, 0x2000, 1)])
            .expect("adjacent regions are fine");
        assert!(m.covers(0x1000, 0x3000));
        assert!(m.covers(0x2fff, 2));
        assert!(!m.covers(0x1000, 0x3001));
        assert!(!m.covers(0xfff, 2));
        assert!(!m.covers(u64::MAX, 2));
    }

    #[test]
    fn span_lookup() {
        let spans = [
            KeyedSpan {
                addr: 10,
                len: 10,
                key: 1,
            },
            KeyedSpan {
                addr: 30,
                len: 10,
                key: 2,
            },
        ];
        assert_eq!(span_at(&spans, 9), None);
        assert_eq!(span_at(&spans, 10).map(|s| s.key), Some(1));
        assert_eq!(span_at(&spans, 19).map(|s| s.key), Some(1));
        assert_eq!(span_at(&spans, 20), None);
        assert_eq!(span_at(&spans, 35).map(|s| s.key), Some(2));
        assert_eq!(span_at(&spans, 40), None);
        assert!(!covered(&spans, 15, 20));
    }
}
