//! Completion queues and RC queue pairs: typestate setup
//! ([`PreparedQp`] -> [`ConnectedQp`]), batched RDMA READs that keep a queue
//! pair full without exceeding its outstanding-READ limit, and request-level
//! completions.
//!
//! # How requests map to work requests
//!
//! A [`ReadRequest`] is one range the caller wants (e.g. one coalesced run of
//! dirty pages). It is split into READ work requests so that none is longer
//! than the port's maximum message size (or [`ConnectedQp::set_max_read_len`])
//! and none crosses a piece of the local or remote registration. Every work
//! request is signaled and carries an internal sequence number as its
//! `wr_id`; `poll` folds them back into one [`ReadCompletion`] per request,
//! carrying the caller's `wr_id`. A request succeeds only if all of its READs
//! did. Each queue pair owns its completion queue, so a completion always
//! belongs to the queue pair it is polled from.

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::ptr::{self, NonNull};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::device::{Context, ContextInner};
use crate::error::{returned_errno, verbs_error, Error, Result, WcError};
use crate::mr::{covered, span_at, KeyedSpan, LocalWrite, MemoryRegion, PdInner, RemoteMemory};
use crate::sys;
use crate::ProtectionDomain;

/// A completion queue. Each queue pair owns one (see [`ProtectionDomain::create_qp`]).
pub struct CompletionQueue {
    cq: NonNull<sys::ibv_cq>,
    capacity: u32,
    ctx: Arc<ContextInner>,
}

// SAFETY: the CQ handle is owned by this value and destroyed once; libibverbs
// allows a CQ to be used from any thread (one at a time, which `&mut`/owned
// access of the owning queue pair guarantees).
unsafe impl Send for CompletionQueue {}

impl fmt::Debug for CompletionQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CompletionQueue")
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

impl CompletionQueue {
    pub(crate) fn new(ctx: &Context, capacity: u32) -> Result<CompletionQueue> {
        let cqe = libc::c_int::try_from(capacity.max(1)).map_err(|_| Error::Invalid {
            what: "completion queue capacity",
            reason: format!("{capacity} does not fit a C int"),
        })?;
        // SAFETY: open context; no completion channel, no user context; the
        // CQ is owned by the returned value.
        let cq = unsafe {
            sys::ibv_create_cq(ctx.inner.as_ptr(), cqe, ptr::null_mut(), ptr::null_mut(), 0)
        };
        let Some(cq) = NonNull::new(cq) else {
            let err = io::Error::last_os_error();
            return Err(verbs_error("ibv_create_cq", err, |source| {
                Error::CreateCq { capacity, source }
            }));
        };
        // SAFETY: valid CQ just created; the provider may round `cqe` up.
        let actual = unsafe { (*cq.as_ptr()).cqe };
        Ok(CompletionQueue {
            cq,
            capacity: u32::try_from(actual).unwrap_or(capacity).max(1),
            ctx: Arc::clone(&ctx.inner),
        })
    }

    /// Completions the queue can hold (as granted by the provider).
    #[must_use]
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// The raw `ibv_cq`. Valid while `self` (or the queue pair owning it)
    /// lives. Polling it directly steals completions from [`ConnectedQp::poll`].
    #[must_use]
    pub fn as_raw(&self) -> *mut sys::ibv_cq {
        self.cq.as_ptr()
    }
}

impl Drop for CompletionQueue {
    fn drop(&mut self) {
        // SAFETY: created by `ibv_create_cq`, destroyed once; the queue pair
        // using it is destroyed first (field order in `QpParts`).
        let rc = unsafe { sys::ibv_destroy_cq(self.cq.as_ptr()) };
        if rc != 0 {
            tracing::warn!(rc, "ibv_destroy_cq failed");
        }
    }
}

/// How to reach a queue pair: exchanged over Ferry's TCP control connection
/// (rdma_cm does not work on rxe over `lo`), with a fixed little-endian
/// layout of [`QpEndpoint::ENCODED_LEN`] bytes:
/// `qpn u32 | psn u32 | lid u16 | max_rd_atomic u8 | 0u8 | gid [u8; 16]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct QpEndpoint {
    /// Queue pair number (24 bits).
    pub qpn: u32,
    /// Initial packet sequence number (24 bits).
    pub psn: u32,
    /// GID (network byte order) of the port the queue pair uses.
    pub gid: [u8; 16],
    /// LID (0 on RoCE).
    pub lid: u16,
    /// READs this queue pair can serve concurrently as responder (its
    /// `max_dest_rd_atomic`); the peer issues at most this many.
    pub max_rd_atomic: u8,
}

impl QpEndpoint {
    /// Length of the encoding.
    pub const ENCODED_LEN: usize = 28;

    /// Fixed little-endian encoding.
    #[must_use]
    pub fn to_bytes(&self) -> [u8; Self::ENCODED_LEN] {
        let mut b = [0u8; Self::ENCODED_LEN];
        b[0..4].copy_from_slice(&self.qpn.to_le_bytes());
        b[4..8].copy_from_slice(&self.psn.to_le_bytes());
        b[8..10].copy_from_slice(&self.lid.to_le_bytes());
        b[10] = self.max_rd_atomic;
        b[12..28].copy_from_slice(&self.gid);
        b
    }

    /// Decode and validate [`to_bytes`](Self::to_bytes) output.
    ///
    /// # Errors
    /// [`Error::BadEncoding`] unless `b` is exactly [`Self::ENCODED_LEN`]
    /// bytes; [`Error::Invalid`] if the QPN or PSN exceed 24 bits, the
    /// reserved byte is not zero, or `max_rd_atomic` is zero.
    pub fn from_bytes(b: &[u8]) -> Result<QpEndpoint> {
        let b: &[u8; Self::ENCODED_LEN] = b.try_into().map_err(|_| Error::BadEncoding {
            what: "QpEndpoint",
            expected: Self::ENCODED_LEN,
            got: b.len(),
        })?;
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let mut gid = [0u8; 16];
        gid.copy_from_slice(&b[12..28]);
        let ep = QpEndpoint {
            qpn: u32_at(0),
            psn: u32_at(4),
            lid: u16::from_le_bytes([b[8], b[9]]),
            max_rd_atomic: b[10],
            gid,
        };
        let invalid = |reason: String| Error::Invalid {
            what: "QpEndpoint",
            reason,
        };
        if ep.qpn > 0xff_ffff || ep.psn > 0xff_ffff {
            return Err(invalid(format!(
                "QPN {:#x} / PSN {:#x} exceed 24 bits",
                ep.qpn, ep.psn
            )));
        }
        if b[11] != 0 {
            return Err(invalid(format!("reserved byte is {:#x}", b[11])));
        }
        if ep.max_rd_atomic == 0 {
            return Err(invalid("max_rd_atomic is 0".into()));
        }
        Ok(ep)
    }
}

/// The QP handle plus what it depends on. Field order is drop order: the QP
/// is destroyed before its CQ.
struct QpParts {
    qp: NonNull<sys::ibv_qp>,
    qpn: u32,
    cq: CompletionQueue,
    pd: Arc<PdInner>,
    port: u8,
    sq_depth: u32,
}

impl Drop for QpParts {
    fn drop(&mut self) {
        // SAFETY: created by `ibv_create_qp`, destroyed exactly once, before
        // `self.cq` (a field, dropped after this body runs).
        let rc = unsafe { sys::ibv_destroy_qp(self.qp.as_ptr()) };
        if rc != 0 {
            tracing::warn!(rc, qpn = self.qpn, "ibv_destroy_qp failed");
        }
    }
}

impl QpParts {
    fn modify(&self, attr: &mut sys::ibv_qp_attr, mask: u32, to: &'static str) -> Result<()> {
        let mask = libc::c_int::try_from(mask).expect("ibv_qp_attr_mask bits fit a C int");
        // SAFETY: live QP owned by `self`; `attr` is a valid, initialized
        // attribute struct whose fields named by `mask` were set by the caller.
        let rc = unsafe { sys::ibv_modify_qp(self.qp.as_ptr(), attr, mask) };
        if rc != 0 {
            return Err(verbs_error("ibv_modify_qp", returned_errno(rc), |source| {
                Error::ModifyQp {
                    qpn: self.qpn,
                    to,
                    source,
                }
            }));
        }
        Ok(())
    }

    fn context(&self) -> Context {
        Context {
            inner: Arc::clone(&self.pd.ctx),
        }
    }
}

fn zeroed_qp_attr() -> sys::ibv_qp_attr {
    // SAFETY: `ibv_qp_attr` is a plain C struct of integers and nested
    // integer structs/unions: all-zero bytes are a valid value.
    unsafe { std::mem::zeroed() }
}

/// A queue pair in the INIT state: created, bound to a port, not connected.
/// It cannot post anything; [`connect`](PreparedQp::connect) it.
pub struct PreparedQp {
    parts: QpParts,
    psn: u32,
}

// SAFETY: the QP handle is exclusively owned; libibverbs allows using a QP
// from any thread, and this type only allows one user at a time.
unsafe impl Send for PreparedQp {}

impl fmt::Debug for PreparedQp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PreparedQp")
            .field("qpn", &self.parts.qpn)
            .field("port", &self.parts.port)
            .finish_non_exhaustive()
    }
}

impl ProtectionDomain {
    /// Create an RC queue pair on `port` (1-based) that uses `cq` for its
    /// completions (the queue pair owns it), and move it to INIT.
    ///
    /// The queue pair accepts incoming RDMA READs (`REMOTE_READ`) and
    /// nothing else: remote writes and atomics are never enabled. Its send
    /// queue is as deep as `cq` (capped by the device's `max_qp_wr`).
    ///
    /// # Errors
    /// [`Error::Invalid`] if `cq` is from another device;
    /// [`Error::CreateQp`] / [`Error::ModifyQp`] from verbs.
    pub fn create_qp(&self, cq: CompletionQueue, port: u8) -> Result<PreparedQp> {
        if !Arc::ptr_eq(&cq.ctx, &self.inner.ctx) {
            return Err(Error::Invalid {
                what: "completion queue",
                reason: "it belongs to another device context".into(),
            });
        }
        let limits = self.inner.ctx.limits();
        let sq_depth = cq.capacity.min(limits.max_qp_wr.max(1));
        // SAFETY: plain C struct; all-zero (null pointers, zero caps) is a
        // valid starting value that we fill in below.
        let mut init: sys::ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        init.send_cq = cq.cq.as_ptr();
        init.recv_cq = cq.cq.as_ptr();
        init.cap.max_send_wr = sq_depth;
        init.cap.max_recv_wr = 1;
        init.cap.max_send_sge = 1;
        init.cap.max_recv_sge = 1;
        init.qp_type = sys::ibv_qp_type::IBV_QPT_RC;
        init.sq_sig_all = 0;
        // SAFETY: live PD and CQ of the same context; `init` is fully
        // initialized; the QP is owned by `QpParts` (destroyed before the CQ).
        let qp = unsafe { sys::ibv_create_qp(self.inner.as_ptr(), &mut init) };
        let Some(qp) = NonNull::new(qp) else {
            let err = io::Error::last_os_error();
            return Err(verbs_error("ibv_create_qp", err, |source| {
                Error::CreateQp { source }
            }));
        };
        // SAFETY: valid QP just created.
        let qpn = unsafe { (*qp.as_ptr()).qp_num };
        let parts = QpParts {
            qp,
            qpn,
            cq,
            pd: Arc::clone(&self.inner),
            port,
            sq_depth: init.cap.max_send_wr.max(1),
        };
        let mut attr = zeroed_qp_attr();
        attr.qp_state = sys::ibv_qp_state::IBV_QPS_INIT;
        attr.pkey_index = 0;
        attr.port_num = port;
        attr.qp_access_flags = sys::ibv_access_flags::IBV_ACCESS_REMOTE_READ.0;
        use sys::ibv_qp_attr_mask as m;
        parts.modify(
            &mut attr,
            (m::IBV_QP_STATE | m::IBV_QP_PKEY_INDEX | m::IBV_QP_PORT | m::IBV_QP_ACCESS_FLAGS).0,
            "INIT",
        )?;
        Ok(PreparedQp {
            psn: initial_psn(qpn),
            parts,
        })
    }
}

/// A 24-bit initial PSN. It only has to differ between incarnations of a
/// connection (stale packets); it is not a security measure (queue pairs
/// are only created for an authenticated peer).
fn initial_psn(qpn: u32) -> u32 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos() ^ (d.as_secs() as u32))
        .unwrap_or(0);
    (nanos ^ qpn.wrapping_mul(2_654_435_761)) & 0xff_ffff
}

impl PreparedQp {
    /// Queue pair number.
    #[must_use]
    pub fn qpn(&self) -> u32 {
        self.parts.qpn
    }

    /// The endpoint to send to the peer, using GID `gid_index` of this
    /// queue pair's port (see [`Context::roce_v2_ipv4_gid`]).
    ///
    /// # Errors
    /// [`Error::QueryGid`] / [`Error::QueryPort`].
    pub fn endpoint(&self, gid_index: u8) -> Result<QpEndpoint> {
        let ctx = self.parts.context();
        let gid = ctx.gid(self.parts.port, u32::from(gid_index))?;
        let port = ctx.port(self.parts.port)?;
        Ok(QpEndpoint {
            qpn: self.parts.qpn,
            psn: self.psn,
            gid: gid.0,
            lid: port.lid,
            max_rd_atomic: responder_depth(&ctx),
        })
    }

    /// Connect to `remote`: INIT -> RTR -> RTS. `gid_index` selects the
    /// local GID (must be the one [`endpoint`](Self::endpoint) advertised).
    ///
    /// `max_dest_rd_atomic` (READs we serve) is the device's
    /// `max_qp_rd_atom`; `max_rd_atomic` (READs we issue) is the smaller of
    /// the device's `max_qp_init_rd_atom` and what the peer advertised.
    ///
    /// # Errors
    /// [`Error::ModifyQp`] (the queue pair is destroyed then),
    /// [`Error::QueryPort`].
    pub fn connect(self, gid_index: u8, remote: &QpEndpoint) -> Result<ConnectedQp> {
        let ctx = self.parts.context();
        let port = ctx.port(self.parts.port)?;
        let limits = ctx.limits();
        use sys::ibv_qp_attr_mask as m;

        let mut rtr = zeroed_qp_attr();
        rtr.qp_state = sys::ibv_qp_state::IBV_QPS_RTR;
        rtr.path_mtu = port.active_mtu.to_raw();
        rtr.dest_qp_num = remote.qpn;
        rtr.rq_psn = remote.psn;
        rtr.max_dest_rd_atomic = responder_depth(&ctx);
        rtr.min_rnr_timer = 12;
        rtr.ah_attr.is_global = 1;
        rtr.ah_attr.grh.dgid.raw = remote.gid;
        rtr.ah_attr.grh.sgid_index = gid_index;
        rtr.ah_attr.grh.hop_limit = 64;
        rtr.ah_attr.dlid = remote.lid;
        rtr.ah_attr.sl = 0;
        rtr.ah_attr.port_num = self.parts.port;
        self.parts.modify(
            &mut rtr,
            (m::IBV_QP_STATE
                | m::IBV_QP_AV
                | m::IBV_QP_PATH_MTU
                | m::IBV_QP_DEST_QPN
                | m::IBV_QP_RQ_PSN
                | m::IBV_QP_MAX_DEST_RD_ATOMIC
                | m::IBV_QP_MIN_RNR_TIMER)
                .0,
            "RTR",
        )?;

        let max_rd_atomic = u8::try_from(limits.max_qp_init_rd_atom.clamp(1, 255))
            .expect("clamped to 1..=255")
            .min(remote.max_rd_atomic.max(1));
        let mut rts = zeroed_qp_attr();
        rts.qp_state = sys::ibv_qp_state::IBV_QPS_RTS;
        rts.sq_psn = self.psn;
        // 4.096 us * 2^14 = 67 ms local ACK timeout, 7 retries: generous
        // enough for a TCG guest, still fails within a second on a dead link.
        rts.timeout = 14;
        rts.retry_cnt = 7;
        rts.rnr_retry = 7;
        rts.max_rd_atomic = max_rd_atomic;
        self.parts.modify(
            &mut rts,
            (m::IBV_QP_STATE
                | m::IBV_QP_TIMEOUT
                | m::IBV_QP_RETRY_CNT
                | m::IBV_QP_RNR_RETRY
                | m::IBV_QP_SQ_PSN
                | m::IBV_QP_MAX_QP_RD_ATOMIC)
                .0,
            "RTS",
        )?;

        let limit = usize::from(max_rd_atomic)
            .min(usize::try_from(self.parts.sq_depth).unwrap_or(usize::MAX))
            .max(1);
        let max_read = u64::from(port.max_msg_size.max(1));
        tracing::debug!(
            qpn = self.parts.qpn,
            remote_qpn = remote.qpn,
            limit,
            max_read,
            "queue pair connected"
        );
        Ok(ConnectedQp {
            parts: self.parts,
            negotiated_limit: limit,
            limit,
            port_max_read: max_read,
            max_read,
            outstanding: 0,
            next_seq: 0,
            inflight: VecDeque::new(),
            failed: false,
        })
    }

    /// The raw `ibv_qp`. Valid while `self` lives; do not destroy it.
    #[must_use]
    pub fn as_raw(&self) -> *mut sys::ibv_qp {
        self.parts.qp.as_ptr()
    }
}

/// READs this device serves concurrently per queue pair, as a `u8`.
fn responder_depth(ctx: &Context) -> u8 {
    u8::try_from(ctx.limits().max_qp_rd_atom.clamp(1, 255)).expect("clamped to 1..=255")
}

/// One range to pull: `len` bytes from the peer's `remote_addr` into our
/// `local_addr`. `wr_id` is the caller's name for it, returned in its
/// [`ReadCompletion`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadRequest {
    /// Caller's identifier.
    pub wr_id: u64,
    /// Destination address in this process (inside a [`MemoryRegion<LocalWrite>`]).
    pub local_addr: u64,
    /// Source address in the peer's address space (inside its [`RemoteMemory`]).
    pub remote_addr: u64,
    /// Bytes to read (> 0).
    pub len: u64,
}

/// One READ work request of a planned request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Chunk {
    pub(crate) local_addr: u64,
    pub(crate) lkey: u32,
    pub(crate) remote_addr: u64,
    pub(crate) rkey: u32,
    pub(crate) len: u32,
}

/// Split `req` into READs of at most `max_read` bytes that each stay inside
/// one local and one remote span. Appends to `out`; on error `out` is
/// unchanged.
pub(crate) fn plan_reads(
    local: &[KeyedSpan],
    remote: &[KeyedSpan],
    req: &ReadRequest,
    max_read: u64,
    out: &mut Vec<Chunk>,
) -> Result<()> {
    if req.len == 0 {
        return Err(Error::EmptyRead { wr_id: req.wr_id });
    }
    if !covered(local, req.local_addr, req.len) {
        return Err(Error::LocalRangeNotRegistered {
            wr_id: req.wr_id,
            addr: req.local_addr,
            len: req.len,
        });
    }
    if !covered(remote, req.remote_addr, req.len) {
        return Err(Error::RemoteRangeNotAdvertised {
            wr_id: req.wr_id,
            addr: req.remote_addr,
            len: req.len,
        });
    }
    let max_read = max_read.clamp(1, u64::from(u32::MAX));
    let mut off = 0u64;
    while off < req.len {
        let l_at = req.local_addr + off;
        let r_at = req.remote_addr + off;
        // Both lookups succeed: coverage was checked above.
        let (Some(ls), Some(rs)) = (span_at(local, l_at), span_at(remote, r_at)) else {
            unreachable!("coverage checked above");
        };
        let n = (req.len - off)
            .min(max_read)
            .min(ls.addr + ls.len - l_at)
            .min(rs.addr + rs.len - r_at);
        out.push(Chunk {
            local_addr: l_at,
            lkey: ls.key,
            remote_addr: r_at,
            rkey: rs.key,
            len: u32::try_from(n).expect("n <= max_read <= u32::MAX"),
        });
        off += n;
    }
    Ok(())
}

/// A request whose READs are posted and not all completed.
#[derive(Debug)]
struct InFlight {
    wr_id: u64,
    len: u64,
    first_seq: u64,
    reads: u32,
    done: u32,
    error: Option<(WcError, u32)>,
}

/// An RC queue pair in RTS that pulls memory with RDMA READs.
///
/// Posting and polling take `&mut self`: one thread drives a queue pair;
/// spread N queue pairs over threads (it is `Send`) or drive them all from
/// one loop. At most [`capacity`](Self::capacity) READ work requests are
/// outstanding at any time (the negotiated `max_rd_atomic`).
pub struct ConnectedQp {
    parts: QpParts,
    negotiated_limit: usize,
    limit: usize,
    port_max_read: u64,
    max_read: u64,
    outstanding: usize,
    next_seq: u64,
    inflight: VecDeque<InFlight>,
    failed: bool,
}

// SAFETY: the QP and CQ handles are exclusively owned; libibverbs allows
// them to be used from any thread, and `&mut self` on every verb call means
// one thread at a time.
unsafe impl Send for ConnectedQp {}

impl fmt::Debug for ConnectedQp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectedQp")
            .field("qpn", &self.parts.qpn)
            .field("outstanding", &self.outstanding)
            .field("capacity", &self.limit)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

/// The outcome of one [`ReadRequest`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadCompletion {
    /// The request's `wr_id`.
    pub wr_id: u64,
    /// The request's length.
    pub len: u64,
    /// `Ok` if every byte arrived; otherwise the most telling error of its
    /// READs (a real failure is preferred over [`WcError::WrFlushErr`]).
    pub status: Result<(), WcError>,
    /// Provider-specific error detail (0 on success).
    pub vendor_err: u32,
}

impl ReadCompletion {
    /// True if the whole range arrived.
    #[must_use]
    pub fn is_ok(&self) -> bool {
        self.status.is_ok()
    }
}

/// Caller-provided storage for [`ConnectedQp::poll`], reused across polls so
/// polling allocates nothing.
pub struct CompletionBuffer {
    raw: Vec<sys::ibv_wc>,
    done: Vec<ReadCompletion>,
}

impl fmt::Debug for CompletionBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CompletionBuffer")
            .field("capacity", &self.raw.len())
            .finish_non_exhaustive()
    }
}

impl CompletionBuffer {
    /// Room for `capacity` work completions per poll (at least 1).
    #[must_use]
    pub fn new(capacity: usize) -> CompletionBuffer {
        let capacity = capacity.clamp(1, i32::MAX as usize);
        CompletionBuffer {
            // SAFETY: `ibv_wc` holds only integers (and a union of
            // integers): all-zero bytes are a valid value.
            raw: (0..capacity)
                .map(|_| unsafe { std::mem::zeroed() })
                .collect(),
            done: Vec::with_capacity(capacity),
        }
    }
}

/// The request completions of one [`ConnectedQp::poll`]: a borrowing
/// iterator over the caller's [`CompletionBuffer`].
#[derive(Debug)]
pub struct Completions<'b> {
    iter: std::slice::Iter<'b, ReadCompletion>,
}

impl Iterator for Completions<'_> {
    type Item = ReadCompletion;

    fn next(&mut self) -> Option<ReadCompletion> {
        self.iter.next().copied()
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.iter.size_hint()
    }
}

impl ExactSizeIterator for Completions<'_> {}

impl Completions<'_> {
    /// The remaining completions as a slice.
    #[must_use]
    pub fn as_slice(&self) -> &[ReadCompletion] {
        self.iter.as_slice()
    }
}

impl ConnectedQp {
    /// Queue pair number.
    #[must_use]
    pub fn qpn(&self) -> u32 {
        self.parts.qpn
    }

    /// READ work requests posted and not yet completed.
    #[must_use]
    pub fn outstanding(&self) -> usize {
        self.outstanding
    }

    /// Most READ work requests that may be outstanding (the negotiated
    /// `max_rd_atomic`, or less after [`set_outstanding_limit`](Self::set_outstanding_limit)).
    #[must_use]
    pub fn capacity(&self) -> usize {
        self.limit
    }

    /// Requests accepted and not yet reported by [`poll`](Self::poll).
    #[must_use]
    pub fn pending_requests(&self) -> usize {
        self.inflight.iter().filter(|r| r.done < r.reads).count()
    }

    /// Largest single READ, in bytes.
    #[must_use]
    pub fn max_read_len(&self) -> u64 {
        self.max_read
    }

    /// Limit single READs to `bytes` (at least 1, at most the port's maximum
    /// message size). Smaller READs interleave better between queue pairs.
    pub fn set_max_read_len(&mut self, bytes: u64) {
        self.max_read = bytes.clamp(1, self.port_max_read);
    }

    /// Keep at most `n` READs outstanding (at least 1, at most the
    /// negotiated limit).
    pub fn set_outstanding_limit(&mut self, n: usize) {
        self.limit = n.clamp(1, self.negotiated_limit);
    }

    /// True once a completion failed or [`force_error`](Self::force_error)
    /// ran: nothing more can be posted.
    #[must_use]
    pub fn is_failed(&self) -> bool {
        self.failed
    }

    /// Start a batch of READs from `remote` into `local`.
    ///
    /// # Errors
    /// [`Error::QpFailed`] if the queue pair is in the error state;
    /// [`Error::Invalid`] if `local` belongs to another protection domain.
    pub fn read_batch<'a>(
        &'a mut self,
        local: &'a MemoryRegion<LocalWrite>,
        remote: &'a RemoteMemory,
    ) -> Result<ReadBatch<'a>> {
        if self.failed {
            return Err(Error::QpFailed {
                qpn: self.parts.qpn,
            });
        }
        if !local.belongs_to(&self.parts.pd) {
            return Err(Error::Invalid {
                what: "local memory region",
                reason: "it belongs to another protection domain than the queue pair".into(),
            });
        }
        Ok(ReadBatch {
            local_spans: local.local_spans().collect(),
            remote,
            chunks: Vec::new(),
            requests: Vec::new(),
            qp: self,
        })
    }

    /// Post as many of `reqs` (in order) as fit without exceeding
    /// [`capacity`](Self::capacity) outstanding READs, in one
    /// `ibv_post_send`; returns how many were accepted. Call again with the
    /// rest after [`poll`](Self::poll) freed room.
    ///
    /// # Errors
    /// As [`read_batch`](Self::read_batch) and [`ReadBatch::push`] (an
    /// invalid request is refused before anything is posted) and
    /// [`ReadBatch::post`].
    pub fn post_reads(
        &mut self,
        local: &MemoryRegion<LocalWrite>,
        remote: &RemoteMemory,
        reqs: &[ReadRequest],
    ) -> Result<usize> {
        let mut batch = self.read_batch(local, remote)?;
        for r in reqs {
            if !batch.push(r)? {
                break;
            }
        }
        batch.post()
    }

    /// Poll completed READs into `buf`; returns one [`ReadCompletion`] per
    /// request whose READs have all completed (in completion order). Never
    /// blocks.
    ///
    /// A failed completion puts the queue pair in the error state: every
    /// other accepted request is then reported too, most with
    /// [`WcError::WrFlushErr`]; keep polling until
    /// [`outstanding`](Self::outstanding) is 0 to learn the fate of each.
    ///
    /// # Errors
    /// [`Error::PollCq`] if polling itself fails.
    pub fn poll<'b>(&mut self, buf: &'b mut CompletionBuffer) -> Result<Completions<'b>> {
        buf.done.clear();
        let want = i32::try_from(buf.raw.len()).unwrap_or(i32::MAX);
        // SAFETY: live CQ owned by this queue pair; `buf.raw` has room for
        // `want` completions.
        let n = unsafe { sys::ibv_poll_cq(self.parts.cq.as_raw(), want, buf.raw.as_mut_ptr()) };
        if n < 0 {
            return Err(Error::PollCq {
                qpn: self.parts.qpn,
                source: io::Error::other(format!("ibv_poll_cq returned {n}")),
            });
        }
        let n = usize::try_from(n).unwrap_or(0);
        for wc in &buf.raw[..n] {
            self.outstanding = self.outstanding.saturating_sub(1);
            let error = WcError::from_status(wc.status);
            if error.is_some() {
                self.failed = true;
            }
            let i = self.inflight.partition_point(|r| r.first_seq <= wc.wr_id);
            let Some(req) = i.checked_sub(1).and_then(|i| self.inflight.get_mut(i)) else {
                tracing::error!(
                    qpn = self.parts.qpn,
                    seq = wc.wr_id,
                    "completion for unknown READ"
                );
                continue;
            };
            if wc.wr_id >= req.first_seq + u64::from(req.reads) || req.done >= req.reads {
                tracing::error!(qpn = self.parts.qpn, seq = wc.wr_id, "stray completion");
                continue;
            }
            req.done += 1;
            if let Some(e) = error {
                if req
                    .error
                    .is_none_or(|(old, _)| old.is_flush() && !e.is_flush())
                {
                    req.error = Some((e, wc.vendor_err));
                }
            }
            if req.done == req.reads {
                buf.done.push(ReadCompletion {
                    wr_id: req.wr_id,
                    len: req.len,
                    status: req.error.map_or(Ok(()), |(e, _)| Err(e)),
                    vendor_err: req.error.map_or(0, |(_, v)| v),
                });
            }
        }
        while self.inflight.front().is_some_and(|r| r.done == r.reads) {
            self.inflight.pop_front();
        }
        Ok(Completions {
            iter: buf.done.iter(),
        })
    }

    /// Move the queue pair to the error state (`ibv_modify_qp` to
    /// `IBV_QPS_ERR`): outstanding READs are flushed and reported by
    /// [`poll`](Self::poll) as [`WcError::WrFlushErr`]; later posts fail with
    /// [`Error::QpFailed`]. A test hook for the engine's fallback path, and
    /// the way to abort a queue pair's work quickly.
    ///
    /// # Errors
    /// [`Error::ModifyQp`] (the queue pair is marked failed anyway).
    pub fn force_error(&mut self) -> Result<()> {
        self.failed = true;
        let mut attr = zeroed_qp_attr();
        attr.qp_state = sys::ibv_qp_state::IBV_QPS_ERR;
        self.parts
            .modify(&mut attr, sys::ibv_qp_attr_mask::IBV_QP_STATE.0, "ERR")
    }

    /// Destroy the queue pair and return the `wr_id`s of the accepted
    /// requests that were never reported by [`poll`](Self::poll), in posting
    /// order: the ranges to re-plan on another transport. After the queue
    /// pair is destroyed the NIC no longer writes local memory for it.
    #[must_use]
    pub fn into_unfinished(self) -> Vec<u64> {
        let ids = self
            .inflight
            .iter()
            .filter(|r| r.done < r.reads)
            .map(|r| r.wr_id)
            .collect();
        drop(self);
        ids
    }

    /// The raw `ibv_qp`. Valid while `self` lives. Posting on it directly
    /// breaks the outstanding-READ accounting.
    #[must_use]
    pub fn as_raw(&self) -> *mut sys::ibv_qp {
        self.parts.qp.as_ptr()
    }

    /// Its completion queue (for [`CompletionQueue::as_raw`]).
    #[must_use]
    pub fn completion_queue(&self) -> &CompletionQueue {
        &self.parts.cq
    }
}

/// A batch of READs being assembled for one `ibv_post_send` call (a linked
/// list of work requests). Nothing is posted until [`post`](Self::post);
/// dropping the batch discards it.
#[must_use = "a ReadBatch posts nothing until .post() is called"]
pub struct ReadBatch<'a> {
    qp: &'a mut ConnectedQp,
    local_spans: Vec<KeyedSpan>,
    remote: &'a RemoteMemory,
    chunks: Vec<Chunk>,
    /// (request, index of its first chunk, number of chunks)
    requests: Vec<(ReadRequest, usize, usize)>,
}

impl fmt::Debug for ReadBatch<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReadBatch")
            .field("qpn", &self.qp.parts.qpn)
            .field("requests", &self.requests.len())
            .field("reads", &self.chunks.len())
            .finish_non_exhaustive()
    }
}

impl ReadBatch<'_> {
    /// Add a request if its READs fit in the queue pair's free capacity.
    /// Returns `Ok(false)` (and adds nothing) when the queue pair would be
    /// over its outstanding-READ limit: post, poll, and try again.
    ///
    /// # Errors
    /// [`Error::EmptyRead`], [`Error::LocalRangeNotRegistered`],
    /// [`Error::RemoteRangeNotAdvertised`], or [`Error::ReadTooLarge`] if
    /// the request needs more READs than the queue pair may ever have
    /// outstanding (split it).
    pub fn push(&mut self, req: &ReadRequest) -> Result<bool> {
        let start = self.chunks.len();
        plan_reads(
            &self.local_spans,
            self.remote.spans(),
            req,
            self.qp.max_read,
            &mut self.chunks,
        )?;
        let reads = self.chunks.len() - start;
        if reads > self.qp.limit {
            self.chunks.truncate(start);
            return Err(Error::ReadTooLarge {
                wr_id: req.wr_id,
                reads,
                limit: self.qp.limit,
            });
        }
        if self.qp.outstanding + self.chunks.len() > self.qp.limit {
            self.chunks.truncate(start);
            return Ok(false);
        }
        self.requests.push((*req, start, reads));
        Ok(true)
    }

    /// Requests in the batch.
    #[must_use]
    pub fn len(&self) -> usize {
        self.requests.len()
    }

    /// True if nothing was pushed.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.requests.is_empty()
    }

    /// Post the batch as one linked list of signaled READ work requests.
    /// Returns the number of requests accepted (all of them).
    ///
    /// # Errors
    /// [`Error::PostSend`] if `ibv_post_send` fails: the queue pair is then
    /// moved to the error state; the first `accepted` requests are tracked
    /// (a partly posted one is reported as [`WcError::PostFailed`] or
    /// flushed) and reported by [`ConnectedQp::poll`]; the rest were not
    /// posted.
    pub fn post(self) -> Result<usize> {
        let ReadBatch {
            qp,
            chunks,
            requests,
            ..
        } = self;
        if requests.is_empty() {
            return Ok(0);
        }
        let mut sges: Vec<sys::ibv_sge> = chunks
            .iter()
            .map(|c| sys::ibv_sge {
                addr: c.local_addr,
                length: c.len,
                lkey: c.lkey,
            })
            .collect();
        let base_seq = qp.next_seq;
        let mut wrs: Vec<sys::ibv_send_wr> = chunks
            .iter()
            .zip(0u64..)
            .map(|(c, i)| {
                // SAFETY: `ibv_send_wr` is a C struct of integers, pointers
                // and unions of those: all-zero is a valid (empty) value.
                let mut wr: sys::ibv_send_wr = unsafe { std::mem::zeroed() };
                wr.wr_id = base_seq + i;
                wr.num_sge = 1;
                wr.opcode = sys::ibv_wr_opcode::IBV_WR_RDMA_READ;
                wr.send_flags = sys::ibv_send_flags::IBV_SEND_SIGNALED.0;
                wr.wr.rdma = sys::rdma_t {
                    remote_addr: c.remote_addr,
                    rkey: c.rkey,
                };
                wr
            })
            .collect();
        // Link the list only now: both vectors are fully built and are not
        // resized again, so these pointers stay valid through the post.
        let n = wrs.len();
        let wr_base = wrs.as_mut_ptr();
        for (i, (wr, sge)) in wrs.iter_mut().zip(sges.iter_mut()).enumerate() {
            wr.sg_list = sge;
            wr.next = if i + 1 < n {
                // SAFETY: `i + 1 < n`, inside the allocation of `wrs`.
                unsafe { wr_base.add(i + 1) }
            } else {
                ptr::null_mut()
            };
        }
        let mut bad: *mut sys::ibv_send_wr = ptr::null_mut();
        // SAFETY: live QP in RTS owned by `qp`; `wrs` is a valid linked list
        // of `n` READ work requests whose SGEs point into `sges`, both alive
        // until this call returns (the device copies them at post time). The
        // local buffers are inside a registered `LocalWrite` region of this
        // QP's PD (checked by `plan_reads`/`read_batch`).
        let rc = unsafe { sys::ibv_post_send(qp.parts.qp.as_ptr(), wr_base, &mut bad) };
        let posted = if rc == 0 {
            n
        } else if bad.is_null() {
            0
        } else {
            // SAFETY: libibverbs sets `bad` to the first WR it did not post,
            // an element of `wrs`.
            usize::try_from(unsafe { bad.offset_from(wr_base) }).unwrap_or(0)
        };
        let mut accepted = 0;
        for (req, first, reads) in &requests {
            if *first >= posted {
                break;
            }
            let reads_posted = (*reads).min(posted - first);
            qp.inflight.push_back(InFlight {
                wr_id: req.wr_id,
                len: req.len,
                first_seq: base_seq + *first as u64,
                reads: u32::try_from(reads_posted).expect("reads <= limit, which fits u32"),
                done: 0,
                error: (reads_posted < *reads).then_some((WcError::PostFailed, 0)),
            });
            accepted += 1;
        }
        qp.outstanding += posted;
        qp.next_seq = base_seq + n as u64;
        if rc != 0 {
            let source = returned_errno(rc);
            if let Err(e) = qp.force_error() {
                tracing::warn!(error = %e, "cannot move queue pair to ERR after a failed post");
            }
            return Err(Error::PostSend {
                qpn: qp.parts.qpn,
                accepted,
                source,
            });
        }
        Ok(accepted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(addr: u64, len: u64, key: u32) -> KeyedSpan {
        KeyedSpan { addr, len, key }
    }

    fn req(local_addr: u64, remote_addr: u64, len: u64) -> ReadRequest {
        ReadRequest {
            wr_id: 7,
            local_addr,
            remote_addr,
            len,
        }
    }

    #[test]
    fn reads_split_at_max_len_and_at_both_sides_piece_boundaries() {
        let local = [span(0x10_000, 0x3000, 1), span(0x13_000, 0x5000, 2)];
        let remote = [span(0x90_000, 0x1800, 11), span(0x91_800, 0x6800, 12)];
        let mut out = Vec::new();
        plan_reads(
            &local,
            &remote,
            &req(0x10_000, 0x90_000, 0x8000),
            0x2000,
            &mut out,
        )
        .expect("plannable");
        let got: Vec<(u64, u32, u64, u32, u32)> = out
            .iter()
            .map(|c| (c.local_addr, c.lkey, c.remote_addr, c.rkey, c.len))
            .collect();
        assert_eq!(
            got,
            vec![
                (0x10_000, 1, 0x90_000, 11, 0x1800), // remote piece ends
                (0x11_800, 1, 0x91_800, 12, 0x1800), // local piece ends
                (0x13_000, 2, 0x93_000, 12, 0x2000), // max len
                (0x15_000, 2, 0x95_000, 12, 0x2000),
                (0x17_000, 2, 0x97_000, 12, 0x1000),
            ]
        );
        assert_eq!(out.iter().map(|c| u64::from(c.len)).sum::<u64>(), 0x8000);
    }

    #[test]
    fn bad_requests_are_refused_before_posting() {
        let local = [span(0x1000, 0x1000, 1)];
        let remote = [span(0x9000, 0x1000, 2)];
        let mut out = Vec::new();
        assert!(matches!(
            plan_reads(&local, &remote, &req(0x1000, 0x9000, 0), 64, &mut out),
            Err(Error::EmptyRead { wr_id: 7 })
        ));
        assert!(matches!(
            plan_reads(&local, &remote, &req(0x1800, 0x9000, 0x1000), 64, &mut out),
            Err(Error::LocalRangeNotRegistered { .. })
        ));
        assert!(matches!(
            plan_reads(&local, &remote, &req(0x1000, 0x9001, 0x1000), 64, &mut out),
            Err(Error::RemoteRangeNotAdvertised { .. })
        ));
        assert!(matches!(
            plan_reads(&local, &remote, &req(u64::MAX - 1, 0x9000, 8), 64, &mut out),
            Err(Error::LocalRangeNotRegistered { .. })
        ));
        assert!(out.is_empty());
    }

    #[test]
    fn endpoint_round_trips_and_validates() {
        let ep = QpEndpoint {
            qpn: 0x11,
            psn: 0xab_cdef,
            gid: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 1],
            lid: 0x0102,
            max_rd_atomic: 128,
        };
        let b = ep.to_bytes();
        assert_eq!(b.len(), QpEndpoint::ENCODED_LEN);
        assert_eq!(&b[0..4], &[0x11, 0, 0, 0]);
        assert_eq!(&b[4..8], &[0xef, 0xcd, 0xab, 0]);
        assert_eq!(&b[8..10], &[0x02, 0x01]);
        assert_eq!(QpEndpoint::from_bytes(&b).expect("decodes"), ep);
        assert!(matches!(
            QpEndpoint::from_bytes(&b[..27]),
            Err(Error::BadEncoding {
                expected: 28,
                got: 27,
                ..
            })
        ));
        let mut bad = b;
        bad[3] = 1; // QPN > 24 bits
        assert!(matches!(
            QpEndpoint::from_bytes(&bad),
            Err(Error::Invalid { .. })
        ));
        let mut bad = b;
        bad[10] = 0; // max_rd_atomic 0
        assert!(QpEndpoint::from_bytes(&bad).is_err());
        let mut bad = b;
        bad[11] = 1; // reserved
        assert!(QpEndpoint::from_bytes(&bad).is_err());
    }

    #[test]
    fn psn_is_24_bits() {
        for q in [0, 1, 0xff_ffff, 12345] {
            assert!(initial_psn(q) <= 0xff_ffff);
        }
    }
}
