//! RDMA READ as a Ferry transport: the source exports its guest RAM
//! ([`RdmaExport`]), the destination pulls pages from it ([`RdmaPuller`]).
//!
//! # Handshake
//!
//! The two sides exchange two opaque blobs over Ferry's authenticated TCP
//! control connection (rdma_cm does not work on SoftRoCE over `lo`, and the
//! peer must be authenticated before any QP exists for it):
//!
//! ```text
//! source sidecar                               destination sidecar
//! RdmaExport::new(mem, n)
//!   MRs REMOTE_READ, n QPs (INIT)
//!   offer() ----------- offer bytes ------->   RdmaPuller::new(mem, offer)
//!                                                checks layout, MRs LOCAL_WRITE,
//!                                                n QPs connected (RTS)
//!   connect(answer) <-- answer bytes --------
//!   QPs RTR/RTS: they only answer READs
//!   first RoundStart -- (control msg) ------>  pull(ranges) each round
//!   ...                                        ...
//! drop: MRs deregistered, rkeys die            drop (or a failure): QPs destroyed,
//!                                                MRs deregistered
//! ```
//!
//! Pull only after the source's `connect` is done (it sends the first round only
//! then): READs sent to a QP
//! that is not yet in RTR are dropped and retried by the transport, which
//! costs at least one ACK timeout (67 ms) per retry.
//!
//! # Wire format (version [`WIRE_VERSION`], little-endian)
//!
//! Offer, source to destination:
//!
//! ```text
//! "FRRO" | version u16 | reserved u16 = 0 | page size u32 = 4096
//! | channels u32 (1..=MAX_CHANNELS) | regions u32 (1..=MAX_REGIONS)
//! | channels x QpEndpoint (28 bytes each)
//! | regions x ( length u64 | pieces u32 | pieces x RemoteRegion (20 bytes each) )
//! ```
//!
//! A region's pieces are its registrations in address order: contiguous,
//! whole pages, together exactly `length` bytes. Answer, destination to
//! source:
//!
//! ```text
//! "FRRA" | version u16 | reserved u16 = 0 | channels u32 | channels x QpEndpoint
//! ```
//!
//! Every count is capped and checked against the bytes actually present
//! before anything is allocated from it; trailing bytes are an error.
//!
//! # Failures
//!
//! rxe never reports an error to the reader when the peer's QP dies, so
//! [`RdmaPuller::pull`] applies its own stall timeout and forces silent QPs
//! into the error state. On any failure it stops posting, drains what
//! completes, destroys its QPs (after that the NIC writes nothing more into
//! local memory, so re-sending the unfinished pages over TCP cannot be
//! overwritten by a late READ) and returns every page range not confirmed by
//! a successful completion.

use std::fmt;
use std::time::{Duration, Instant};

use ferry_engine::plan::PageRange;
use ferry_engine::transport::{RoundStats, TransportError};
use ferry_engine::PAGE_SIZE;
use ferry_proto::codec::Writer;
use ferry_proto::mem::GuestRegion;

use crate::device::{Context, Gid, LinkLayer, PortState};
use crate::error::{Error, Result};
use crate::mr::RemoteRegion;
use crate::mr::{Access, LocalWrite, MemoryRegion, ProtectionDomain, RemoteMemory, RemoteRead};
use crate::qp::{CompletionBuffer, ConnectedQp, PreparedQp, QpEndpoint, ReadRequest};

/// Version of the offer/answer encoding this build speaks (and the only one
/// it accepts: there is no older one yet).
pub const WIRE_VERSION: u16 = 1;

/// Most queue pairs one export/puller pair may use. Four to eight RC QPs
/// saturate a 100 Gb/s RoCE NIC with 1 MiB READs; 64 leaves room for wider
/// hardware while capping what a peer can make us create.
pub const MAX_CHANNELS: usize = 64;

/// Most guest RAM regions an offer may describe. A VM has a handful of RAM
/// slots (below/above the PCI hole, hotplugged DIMMs); KVM's 32764-slot
/// limit is not approached by RAM, and 4096 caps what a peer can make us
/// allocate.
pub const MAX_REGIONS: usize = 4096;

const OFFER_MAGIC: [u8; 4] = *b"FRRO";
const ANSWER_MAGIC: [u8; 4] = *b"FRRA";
/// Magic + version + reserved.
#[cfg(test)]
const HEADER_LEN: usize = 8;

/// Largest piece of a range one READ request covers: 1 MiB, the engine's
/// chunk ([`ferry_engine::plan::DEFAULT_CHUNK_PAGES`]). Big enough that the
/// per-request cost (a work request, a completion, a poll) is negligible,
/// small enough that N QPs share a round evenly and that a failure strands
/// little in-flight work.
const PULL_PIECE_BYTES: u64 = 1 << 20;

/// Requests posted on one QP in one `ibv_post_send` while others wait: a
/// cap so that one pass of the posting loop spreads work over all QPs.
const MAX_POST_BATCH: usize = 16;

/// Completion queue depth of a pulling QP. Its send queue is as deep, and
/// its outstanding READs are the smaller of this and the negotiated
/// `max_rd_atomic` (128 on rxe, 16 on most ConnectX parts).
const PULLER_CQ_DEPTH: u32 = 256;

/// The exporting QPs never post; their queues only need to exist.
const EXPORT_CQ_DEPTH: u32 = 16;

/// The port Ferry uses (rxe and most NICs have one).
const PORT: u8 = 1;

/// Completions polled per `ibv_poll_cq`.
const POLL_BATCH: usize = 256;

/// The device, PD and GID one side uses.
struct Device {
    ctx: Context,
    pd: ProtectionDomain,
    gid_index: u8,
    gid: Gid,
}

impl Device {
    /// The first device with an active port 1 and a GID to address it:
    /// the RoCE v2 IPv4 GID on Ethernet, GID 0 on InfiniBand.
    fn open_first_usable() -> Result<Device> {
        let list = crate::devices()?;
        let mut why = Vec::new();
        for d in &list {
            match Device::open(&d.name) {
                Ok(dev) => return Ok(dev),
                Err(e) => why.push(format!("{}: {e}", d.name)),
            }
        }
        Err(Error::NoUsableDevice {
            reason: why.join("; "),
        })
    }

    fn open(name: &str) -> Result<Device> {
        let ctx = Context::open(name)?;
        let port = ctx.port(PORT)?;
        if port.state != PortState::Active {
            return Err(Error::Invalid {
                what: "RDMA port",
                reason: format!("port {PORT} is {:?}, not active", port.state),
            });
        }
        let (index, gid) = match ctx.roce_v2_ipv4_gid(PORT) {
            Ok(g) => (g.index, g.gid),
            Err(e) if port.link_layer != LinkLayer::InfiniBand => return Err(e),
            Err(_) => (0, ctx.gid(PORT, 0)?),
        };
        let gid_index = u8::try_from(index).map_err(|_| Error::Invalid {
            what: "GID index",
            reason: format!("{index} does not fit the 8-bit sgid_index"),
        })?;
        let pd = ctx.alloc_pd()?;
        Ok(Device {
            ctx,
            pd,
            gid_index,
            gid,
        })
    }

    fn describe(&self) -> String {
        format!("{} gid {}", self.ctx.name(), self.gid)
    }

    fn create_qps(&self, n: usize, cq_depth: u32) -> Result<Vec<PreparedQp>> {
        (0..n)
            .map(|_| self.pd.create_qp(self.ctx.create_cq(cq_depth)?, PORT))
            .collect()
    }
}

/// Register one guest RAM region with access `A`, in pieces of at most
/// `max_piece` bytes (and at most the device's `max_mr_size`).
fn register_guest<A: Access>(
    pd: &ProtectionDomain,
    region: &GuestRegion,
    max_piece: u64,
) -> Result<MemoryRegion<A>> {
    // SAFETY: `region` is a live MAP_SHARED mapping of `len()` bytes (the
    // `register` obligations hold at registration). The registration is
    // not ODP: `ibv_reg_mr` pins the pages, so even if the caller unmaps the
    // region before dropping the export/puller (their API cannot tie the
    // lifetimes), the NIC only touches pages the kernel holds for the MR,
    // never other memory of this process. No `&`/`&mut` is formed over
    // guest RAM here; a `RemoteRead` region races with the running guest by
    // design (torn pages are re-sent by the dirty-log rule) and a
    // `LocalWrite` region is written only inside `RdmaPuller::pull`, whose
    // contract forbids references over the pulled pages meanwhile.
    unsafe { pd.register_in_pieces::<A>(region.as_ptr(), region.len(), max_piece) }
}

// ---------------------------------------------------------------------------
// Wire format
// ---------------------------------------------------------------------------

/// A decoded, validated offer.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Offer {
    endpoints: Vec<QpEndpoint>,
    regions: Vec<OfferedRegion>,
}

/// One guest RAM region as the source registered it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct OfferedRegion {
    len: u64,
    /// Contiguous, in address order, whole pages, summing to `len`.
    pieces: Vec<RemoteRegion>,
}

impl OfferedRegion {
    fn base(&self) -> u64 {
        self.pieces.first().map_or(0, |p| p.addr)
    }
}

/// A bounds-checked little-endian reader over a peer's bytes: the workspace codec
/// (`ferry_proto::codec::Reader`) with this module's errors.
struct Reader<'a> {
    inner: ferry_proto::codec::Reader<'a>,
    len: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn new(b: &'a [u8], what: &'static str) -> Self {
        Reader {
            inner: ferry_proto::codec::Reader::new(b, what),
            len: b.len(),
            what,
        }
    }

    fn remaining(&self) -> usize {
        self.inner.remaining()
    }

    /// Bytes consumed so far.
    fn at(&self) -> usize {
        self.len - self.remaining()
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let at = self.at();
        self.inner.raw(n).map_err(|_| Error::BadEncoding {
            what: self.what,
            expected: at.saturating_add(n),
            got: self.len,
        })
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn invalid(&self, reason: String) -> Error {
        Error::Invalid {
            what: self.what,
            reason,
        }
    }

    /// Magic, version, reserved.
    fn header(&mut self, magic: [u8; 4]) -> Result<()> {
        let got: [u8; 4] = self.array()?;
        if got != magic {
            return Err(self.invalid(format!(
                "magic {got:02x?}, expected {magic:02x?} ({:?})",
                String::from_utf8_lossy(&magic)
            )));
        }
        let version = self.u16()?;
        if version != WIRE_VERSION {
            return Err(self.invalid(format!(
                "version {version}; this build speaks version {WIRE_VERSION} only"
            )));
        }
        let reserved = self.u16()?;
        if reserved != 0 {
            return Err(self.invalid(format!("reserved field is {reserved:#x}")));
        }
        Ok(())
    }

    /// A count in `1..=max`, which must also fit in the bytes left at
    /// `min_each` bytes per item (so nothing is allocated from a lie).
    fn count(&mut self, name: &str, max: usize, min_each: usize) -> Result<usize> {
        let n = self.u32()?;
        let n = usize::try_from(n).unwrap_or(usize::MAX);
        if n == 0 || n > max {
            return Err(self.invalid(format!("{n} {name} (1..={max} allowed)")));
        }
        if n.saturating_mul(min_each) > self.remaining() {
            return Err(Error::BadEncoding {
                what: self.what,
                expected: self.at().saturating_add(n.saturating_mul(min_each)),
                got: self.len,
            });
        }
        Ok(n)
    }

    fn endpoints(&mut self, n: usize) -> Result<Vec<QpEndpoint>> {
        (0..n)
            .map(|_| QpEndpoint::from_bytes(self.take(QpEndpoint::ENCODED_LEN)?))
            .collect()
    }

    fn finish(&self) -> Result<()> {
        if self.remaining() != 0 {
            return Err(self.invalid(format!("{} trailing bytes", self.remaining())));
        }
        Ok(())
    }
}

fn put_header(w: &mut Writer, magic: [u8; 4]) {
    w.fixed(&magic).u16(WIRE_VERSION).u16(0);
}

fn len_u32(n: usize) -> u32 {
    u32::try_from(n).expect("counts are capped far below u32::MAX")
}

impl Offer {
    fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        put_header(&mut w, OFFER_MAGIC);
        w.u32(len_u32(PAGE_SIZE as usize))
            .u32(len_u32(self.endpoints.len()))
            .u32(len_u32(self.regions.len()));
        for ep in &self.endpoints {
            w.fixed(&ep.to_bytes());
        }
        for r in &self.regions {
            w.u64(r.len).u32(len_u32(r.pieces.len()));
            for p in &r.pieces {
                w.fixed(&p.to_bytes());
            }
        }
        w.finish()
    }

    /// Decode and validate a peer's offer; also returns the remote memory
    /// it describes (validated: no overlaps, no wrap-around).
    fn decode(b: &[u8]) -> Result<(Offer, RemoteMemory)> {
        let mut r = Reader::new(b, "RDMA offer");
        r.header(OFFER_MAGIC)?;
        let page = r.u32()?;
        if u64::from(page) != PAGE_SIZE {
            return Err(r.invalid(format!("page size {page}, expected {PAGE_SIZE}")));
        }
        let channels = r.u32()?;
        let channels = usize::try_from(channels).unwrap_or(usize::MAX);
        if channels == 0 || channels > MAX_CHANNELS {
            return Err(r.invalid(format!("{channels} channels (1..={MAX_CHANNELS} allowed)")));
        }
        let nregions = r.u32()?;
        let nregions = usize::try_from(nregions).unwrap_or(usize::MAX);
        if nregions == 0 || nregions > MAX_REGIONS {
            return Err(r.invalid(format!("{nregions} regions (1..={MAX_REGIONS} allowed)")));
        }
        let min_len =
            channels * QpEndpoint::ENCODED_LEN + nregions * (12 + RemoteRegion::ENCODED_LEN);
        if r.remaining() < min_len {
            return Err(Error::BadEncoding {
                what: "RDMA offer",
                expected: r.at() + min_len,
                got: b.len(),
            });
        }
        let endpoints = r.endpoints(channels)?;
        let mut regions = Vec::with_capacity(nregions);
        for i in 0..nregions {
            let len = r.u64()?;
            let npieces = r.count(
                "pieces",
                RemoteMemory::MAX_REGIONS,
                RemoteRegion::ENCODED_LEN,
            )?;
            let pieces = (0..npieces)
                .map(|_| RemoteRegion::from_bytes(r.take(RemoteRegion::ENCODED_LEN)?))
                .collect::<Result<Vec<_>>>()?;
            check_region(i, len, &pieces).map_err(|reason| r.invalid(reason))?;
            regions.push(OfferedRegion { len, pieces });
        }
        r.finish()?;
        let remote = RemoteMemory::new(
            regions
                .iter()
                .flat_map(|r| r.pieces.iter().copied())
                .collect(),
        )?;
        Ok((Offer { endpoints, regions }, remote))
    }
}

/// A region's pieces must be whole pages, contiguous, and add up to `len`.
fn check_region(i: usize, len: u64, pieces: &[RemoteRegion]) -> std::result::Result<(), String> {
    if len == 0 || !len.is_multiple_of(PAGE_SIZE) {
        return Err(format!(
            "region {i}: length {len:#x} is not a positive number of pages"
        ));
    }
    let mut at = pieces.first().map_or(0, |p| p.addr);
    let mut total = 0u64;
    for p in pieces {
        if p.addr != at {
            return Err(format!(
                "region {i}: piece at {:#x} is not contiguous (expected {at:#x})",
                p.addr
            ));
        }
        if p.len == 0 || p.len % PAGE_SIZE != 0 {
            return Err(format!(
                "region {i}: piece length {:#x} is not whole pages",
                p.len
            ));
        }
        at = at
            .checked_add(p.len)
            .ok_or_else(|| format!("region {i}: piece at {:#x} wraps around", p.addr))?;
        total = total.saturating_add(p.len);
    }
    if total != len {
        return Err(format!(
            "region {i}: pieces cover {total:#x} bytes, the region has {len:#x}"
        ));
    }
    Ok(())
}

fn encode_answer(endpoints: &[QpEndpoint]) -> Vec<u8> {
    let mut w = Writer::new();
    put_header(&mut w, ANSWER_MAGIC);
    w.u32(len_u32(endpoints.len()));
    for ep in endpoints {
        w.fixed(&ep.to_bytes());
    }
    w.finish()
}

/// Checks a peer's RDMA offer without touching any device (what
/// [`RdmaPuller::new`] checks first): returns the queue pairs and the
/// remote memory it describes. For diagnostics and fuzzing.
///
/// # Errors
/// [`Error::BadEncoding`] or [`Error::Invalid`], as [`RdmaPuller::new`].
pub fn parse_offer(b: &[u8]) -> Result<(Vec<QpEndpoint>, RemoteMemory)> {
    let (offer, remote) = Offer::decode(b)?;
    Ok((offer.endpoints, remote))
}

/// Checks a peer's RDMA answer without touching any device (what
/// [`RdmaExport::connect`] checks first): returns its queue pairs.
///
/// # Errors
/// [`Error::BadEncoding`] or [`Error::Invalid`].
pub fn parse_answer(b: &[u8]) -> Result<Vec<QpEndpoint>> {
    decode_answer(b)
}

fn decode_answer(b: &[u8]) -> Result<Vec<QpEndpoint>> {
    let mut r = Reader::new(b, "RDMA answer");
    r.header(ANSWER_MAGIC)?;
    let n = r.count("channels", MAX_CHANNELS, QpEndpoint::ENCODED_LEN)?;
    let eps = r.endpoints(n)?;
    r.finish()?;
    Ok(eps)
}

// ---------------------------------------------------------------------------
// Source side
// ---------------------------------------------------------------------------

enum ExportQps {
    Prepared(Vec<PreparedQp>),
    /// Held only to keep the QPs alive (and answering READs) until drop.
    Connected(Vec<ConnectedQp>),
    /// A `connect` failed part-way; the QPs are gone.
    Broken,
}

impl fmt::Debug for ExportQps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExportQps::Prepared(q) => {
                write!(
                    f,
                    "prepared {:?}",
                    q.iter().map(PreparedQp::qpn).collect::<Vec<_>>()
                )
            }
            ExportQps::Connected(q) => {
                write!(
                    f,
                    "connected {:?}",
                    q.iter().map(ConnectedQp::qpn).collect::<Vec<_>>()
                )
            }
            ExportQps::Broken => f.write_str("broken"),
        }
    }
}

/// Source side: guest RAM registered REMOTE_READ only, N RC QPs that only
/// answer READs (they never post anything).
///
/// Dropping it destroys the QPs and deregisters the memory: the rkeys in
/// the offer die, and the peer's later READs fail with a remote access
/// error.
pub struct RdmaExport {
    // Field order is drop order: QPs first, then the registrations.
    qps: ExportQps,
    mrs: Vec<MemoryRegion<RemoteRead>>,
    offer: Vec<u8>,
    channels: usize,
    dev: Device,
}

impl fmt::Debug for RdmaExport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RdmaExport")
            .field("device", &self.dev.describe())
            .field("channels", &self.channels)
            .field("regions", &self.mrs.len())
            .field("qps", &self.qps)
            .finish_non_exhaustive()
    }
}

fn check_counts(mem: &[GuestRegion], channels: usize) -> Result<()> {
    if channels == 0 || channels > MAX_CHANNELS {
        return Err(Error::Invalid {
            what: "RDMA channel count",
            reason: format!("{channels} (1..={MAX_CHANNELS} allowed)"),
        });
    }
    if mem.is_empty() || mem.len() > MAX_REGIONS {
        return Err(Error::Invalid {
            what: "guest RAM layout",
            reason: format!("{} regions (1..={MAX_REGIONS} allowed)", mem.len()),
        });
    }
    Ok(())
}

impl RdmaExport {
    /// Opens the first usable RDMA device (`Err` with
    /// [`Error::is_no_rdma`] true when there is none), registers every
    /// region REMOTE_READ (in pieces if `max_mr_size` demands), creates
    /// `channels` QPs.
    ///
    /// # Errors
    /// No-RDMA errors ([`Error::Unsupported`], [`Error::NoDevice`],
    /// [`Error::NoUsableDevice`]); [`Error::Invalid`] for 0 or more than
    /// [`MAX_CHANNELS`] channels or an empty layout; registration and QP
    /// creation errors.
    pub fn new(mem: &[GuestRegion], channels: usize) -> Result<Self> {
        Self::new_with_piece_limit(mem, channels, u64::MAX)
    }

    /// [`new`](Self::new) with registrations of at most `max_piece` bytes,
    /// to exercise piecewise registration on devices (like rxe) that allow
    /// any size. For tests.
    ///
    /// # Errors
    /// As [`new`](Self::new).
    #[doc(hidden)]
    pub fn new_with_piece_limit(
        mem: &[GuestRegion],
        channels: usize,
        max_piece: u64,
    ) -> Result<Self> {
        check_counts(mem, channels)?;
        let dev = Device::open_first_usable()?;
        let mrs = mem
            .iter()
            .map(|r| register_guest::<RemoteRead>(&dev.pd, r, max_piece))
            .collect::<Result<Vec<_>>>()?;
        let qps = dev.create_qps(channels, EXPORT_CQ_DEPTH)?;
        let offer = Offer {
            endpoints: qps
                .iter()
                .map(|q| q.endpoint(dev.gid_index))
                .collect::<Result<_>>()?,
            regions: mrs
                .iter()
                .map(|m| OfferedRegion {
                    len: m.len(),
                    pieces: m.remote_regions(),
                })
                .collect(),
        }
        .encode();
        tracing::debug!(
            device = %dev.describe(),
            channels,
            regions = mrs.len(),
            offer_bytes = offer.len(),
            "RDMA export ready"
        );
        Ok(RdmaExport {
            qps: ExportQps::Prepared(qps),
            mrs,
            offer,
            channels,
            dev,
        })
    }

    /// Opaque bytes for the peer: QP endpoints and per-region
    /// [`RemoteRegion`] lists (rkeys). See the module docs for the layout.
    #[must_use]
    pub fn offer(&self) -> Vec<u8> {
        self.offer.clone()
    }

    /// Connects the QPs to the puller's endpoints (the answer returned by
    /// [`RdmaPuller::new`]).
    ///
    /// # Errors
    /// [`Error::BadEncoding`] / [`Error::Invalid`] for a malformed answer,
    /// one with another number of channels, or a second call;
    /// [`Error::ModifyQp`] if a QP cannot be connected (the export cannot be
    /// connected again then).
    pub fn connect(&mut self, answer: &[u8]) -> Result<()> {
        let eps = decode_answer(answer)?;
        if eps.len() != self.channels {
            return Err(Error::Invalid {
                what: "RDMA answer",
                reason: format!("{} channels, the offer had {}", eps.len(), self.channels),
            });
        }
        let prepared = match std::mem::replace(&mut self.qps, ExportQps::Broken) {
            ExportQps::Prepared(q) => q,
            other => {
                self.qps = other;
                return Err(Error::Invalid {
                    what: "RDMA export",
                    reason: "already connected (or a connect failed)".into(),
                });
            }
        };
        let connected = prepared
            .into_iter()
            .zip(&eps)
            .map(|(qp, ep)| qp.connect(self.dev.gid_index, ep))
            .collect::<Result<Vec<_>>>()?;
        self.qps = ExportQps::Connected(connected);
        Ok(())
    }

    /// Device name and GID used, for the summary (`rxe0 gid ::ffff:127.0.0.1`).
    #[must_use]
    pub fn describe(&self) -> String {
        self.dev.describe()
    }
}

// ---------------------------------------------------------------------------
// Destination side
// ---------------------------------------------------------------------------

/// Where one region lives on both sides.
#[derive(Debug, Clone)]
struct RegionMap {
    local_addr: u64,
    remote_addr: u64,
    npages: u64,
    /// Page offsets where a remote registration piece starts (excluding 0).
    remote_cuts: Vec<u64>,
    /// Pages per local registration piece.
    local_piece_pages: u64,
}

impl RegionMap {
    /// The first page boundary after `at` that a READ request must not
    /// cross (a piece boundary on either side), or `npages`.
    fn next_cut(&self, at: u64) -> u64 {
        let i = self.remote_cuts.partition_point(|&c| c <= at);
        let remote = self.remote_cuts.get(i).copied().unwrap_or(self.npages);
        let local = (at / self.local_piece_pages + 1).saturating_mul(self.local_piece_pages);
        remote.min(local).min(self.npages)
    }
}

/// The live half of a puller. Field order is drop order: the QPs are
/// destroyed (the NIC stops writing) before the memory is deregistered.
struct Link {
    qps: Vec<ConnectedQp>,
    local: Vec<MemoryRegion<LocalWrite>>,
    remote: RemoteMemory,
}

/// A pending [`RdmaPuller::inject_qp_failure`].
#[derive(Debug, Clone, Copy)]
struct Injection {
    qp: usize,
    at_confirmed: u64,
}

/// Destination side: its guest RAM registered LOCAL_WRITE only; pulls with
/// RDMA READ over N QPs.
///
/// Dropping it (or a failed [`pull`](Self::pull)) destroys the QPs and
/// deregisters the memory.
pub struct RdmaPuller {
    link: Option<Link>,
    /// Why the puller stopped, once it has.
    failed: Option<String>,
    regions: Vec<RegionMap>,
    channels: usize,
    piece_pages: u64,
    confirmed_total: u64,
    injections: Vec<Injection>,
    describe: String,
}

impl fmt::Debug for RdmaPuller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RdmaPuller")
            .field("device", &self.describe)
            .field("channels", &self.channels)
            .field("regions", &self.regions.len())
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

/// One READ request of a pull: a piece of one of the caller's ranges.
#[derive(Debug, Clone, Copy)]
struct Piece {
    range: PageRange,
    done: bool,
}

impl RdmaPuller {
    /// Opens the first usable device, registers `mem` LOCAL_WRITE, creates
    /// as many QPs as the offer has, connects them to the offer's
    /// endpoints; returns the answer bytes for [`RdmaExport::connect`].
    ///
    /// The offer's layout must match `mem` (same region count and sizes);
    /// every length in it is validated before use.
    ///
    /// # Errors
    /// [`Error::BadEncoding`] / [`Error::Invalid`] for a malformed offer or
    /// a layout mismatch (checked before any device is opened); the no-RDMA
    /// errors and verbs errors as [`RdmaExport::new`].
    pub fn new(mem: &[GuestRegion], offer: &[u8]) -> Result<(Self, Vec<u8>)> {
        Self::new_with_piece_limit(mem, offer, u64::MAX)
    }

    /// [`new`](Self::new) with local registrations of at most `max_piece`
    /// bytes. For tests.
    ///
    /// # Errors
    /// As [`new`](Self::new).
    #[doc(hidden)]
    pub fn new_with_piece_limit(
        mem: &[GuestRegion],
        offer: &[u8],
        max_piece: u64,
    ) -> Result<(Self, Vec<u8>)> {
        let (offer, remote) = Offer::decode(offer)?;
        check_layout(&offer, mem)?;
        check_counts(mem, offer.endpoints.len())?;
        let dev = Device::open_first_usable()?;
        let local = mem
            .iter()
            .map(|r| register_guest::<LocalWrite>(&dev.pd, r, max_piece))
            .collect::<Result<Vec<_>>>()?;
        let prepared = dev.create_qps(offer.endpoints.len(), PULLER_CQ_DEPTH)?;
        let answer_eps = prepared
            .iter()
            .map(|q| q.endpoint(dev.gid_index))
            .collect::<Result<Vec<_>>>()?;
        let mut qps = prepared
            .into_iter()
            .zip(&offer.endpoints)
            .map(|(qp, ep)| qp.connect(dev.gid_index, ep))
            .collect::<Result<Vec<_>>>()?;
        let max_read = qps
            .iter()
            .map(ConnectedQp::max_read_len)
            .min()
            .unwrap_or(PAGE_SIZE);
        let piece_bytes = PULL_PIECE_BYTES.min(max_read);
        for qp in &mut qps {
            qp.set_max_read_len(piece_bytes);
        }
        let local_piece = max_piece.min(dev.ctx.limits().max_mr_size).max(PAGE_SIZE);
        let regions = offer
            .regions
            .iter()
            .zip(mem)
            .map(|(o, m)| {
                let base = o.base();
                RegionMap {
                    local_addr: m.as_ptr() as u64,
                    remote_addr: base,
                    npages: m.npages(),
                    remote_cuts: o
                        .pieces
                        .iter()
                        .skip(1)
                        .map(|p| (p.addr - base) / PAGE_SIZE)
                        .collect(),
                    local_piece_pages: local_piece / PAGE_SIZE,
                }
            })
            .collect();
        let channels = qps.len();
        let describe = dev.describe();
        tracing::debug!(device = %describe, channels, piece_bytes, "RDMA puller connected");
        Ok((
            RdmaPuller {
                link: Some(Link { qps, local, remote }),
                failed: None,
                regions,
                channels,
                piece_pages: (piece_bytes / PAGE_SIZE).max(1),
                confirmed_total: 0,
                injections: Vec::new(),
                describe,
            },
            encode_answer(&answer_eps),
        ))
    }

    /// Pulls every range into the same place of local memory.
    ///
    /// Ranges are cut into pieces of at most 1 MiB (less if the port's
    /// message size is smaller) that never cross a registration piece on
    /// either side, dealt over the QPs so that each keeps its
    /// outstanding-READ limit filled; `progress(bytes)` is called as
    /// completions arrive. Returns the pages and bytes pulled (`zero_pages`
    /// 0, `torn` empty: RDMA READ has no per-page check; torn source pages
    /// are the dirty log's business).
    ///
    /// While this runs the NIC writes the ranges' pages: nothing may hold
    /// references over them (Ferry only touches guest RAM through raw
    /// pointers).
    ///
    /// # Errors
    /// [`TransportError::Protocol`] for a range outside the layout (nothing
    /// is pulled). [`TransportError::Failed`] when a QP fails: an error
    /// completion, a QP in the error state, or no completion for
    /// `stall_timeout` on a QP with READs outstanding (it is forced into the
    /// error state). Then posting stops, what completes is drained, the QPs
    /// are destroyed, and `unfinished` lists (coalesced) every page not
    /// confirmed by a successful completion, to be re-sent over TCP. The
    /// puller is unusable afterwards: later pulls return `Failed` with all
    /// their ranges.
    pub fn pull(
        &mut self,
        ranges: &[PageRange],
        progress: &(dyn Fn(u64) + Sync),
        stall_timeout: Duration,
    ) -> Result<RoundStats, TransportError> {
        for r in ranges {
            let fits = self.regions.get(r.region as usize).is_some_and(|m| {
                r.count > 0 && r.first.checked_add(r.count).is_some_and(|e| e <= m.npages)
            });
            if !fits {
                return Err(TransportError::Protocol(format!(
                    "page range {r:?} is outside the registered layout"
                )));
            }
        }
        let pages: u64 = ranges.iter().map(|r| r.count).sum();
        let Some(link) = self.link.as_mut() else {
            return Err(TransportError::Failed {
                reason: format!(
                    "RDMA puller is unusable after an earlier failure ({})",
                    self.failed.as_deref().unwrap_or("unknown")
                ),
                unfinished: coalesce(ranges.to_vec()),
            });
        };
        let mut pieces = split(ranges, &self.regions, self.piece_pages);
        let reqs: Vec<ReadRequest> = pieces
            .iter()
            .zip(0u64..)
            .map(|(p, i)| {
                let m = &self.regions[p.range.region as usize];
                ReadRequest {
                    wr_id: i,
                    local_addr: m.local_addr + p.range.first * PAGE_SIZE,
                    remote_addr: m.remote_addr + p.range.first * PAGE_SIZE,
                    len: p.range.bytes(),
                }
            })
            .collect();
        let mut run = PullRun {
            link,
            pieces: &mut pieces,
            reqs: &reqs,
            progress,
            stall_timeout,
            confirmed_total: &mut self.confirmed_total,
            injections: &mut self.injections,
        };
        match run.drive() {
            None => Ok(RoundStats {
                pages,
                bytes: pages * PAGE_SIZE,
                zero_pages: 0,
                torn: Vec::new(),
                ..RoundStats::default()
            }),
            Some(reason) => {
                // Destroy the QPs first (no late READ may land after the
                // caller re-sends these pages over TCP), then the MRs.
                self.link = None;
                self.failed = Some(reason.clone());
                let unfinished =
                    coalesce(pieces.iter().filter(|p| !p.done).map(|p| p.range).collect());
                tracing::warn!(
                    %reason,
                    unfinished_ranges = unfinished.len(),
                    unfinished_pages = unfinished.iter().map(|r| r.count).sum::<u64>(),
                    "RDMA pull failed"
                );
                Err(TransportError::Failed { reason, unfinished })
            }
        }
    }

    /// Fault injection for tests: force QP `index` into the error state
    /// after `after_bytes` more bytes have been confirmed (by all QPs of
    /// this puller together; 0 = now). An index out of range is ignored.
    ///
    /// Only with the `fault-injection` feature (test builds): not part of the
    /// crate's API.
    #[cfg(feature = "fault-injection")]
    pub fn inject_qp_failure(&mut self, index: usize, after_bytes: u64) {
        if index >= self.channels {
            tracing::warn!(
                index,
                channels = self.channels,
                "no such QP to fail; ignored"
            );
            return;
        }
        if after_bytes == 0 {
            if let Some(qp) = self.link.as_mut().and_then(|l| l.qps.get_mut(index)) {
                if let Err(e) = qp.force_error() {
                    tracing::warn!(error = %e, "injected failure: cannot move QP to ERR");
                }
            }
        }
        self.injections.push(Injection {
            qp: index,
            at_confirmed: self.confirmed_total.saturating_add(after_bytes),
        });
    }

    /// Device name and GID used (`rxe0 gid ::ffff:127.0.0.1`).
    #[must_use]
    pub fn describe(&self) -> String {
        self.describe.clone()
    }

    /// Number of QPs (the offer's channel count).
    #[must_use]
    pub fn channels(&self) -> usize {
        self.channels
    }
}

/// The offer must describe exactly the regions of `mem`, in order.
fn check_layout(offer: &Offer, mem: &[GuestRegion]) -> Result<()> {
    let invalid = |reason: String| Error::Invalid {
        what: "RDMA offer layout",
        reason,
    };
    if offer.regions.len() != mem.len() {
        return Err(invalid(format!(
            "{} regions offered, {} here",
            offer.regions.len(),
            mem.len()
        )));
    }
    for (i, (o, m)) in offer.regions.iter().zip(mem).enumerate() {
        if o.len != m.len() as u64 {
            return Err(invalid(format!(
                "region {i} is {:#x} bytes at the source, {:#x} here",
                o.len,
                m.len()
            )));
        }
    }
    Ok(())
}

/// Cut ranges into READ requests: at most `piece_pages` pages, never across
/// a registration piece on either side.
fn split(ranges: &[PageRange], regions: &[RegionMap], piece_pages: u64) -> Vec<Piece> {
    let mut out = Vec::new();
    for r in ranges {
        let m = &regions[r.region as usize];
        let end = r.end();
        let mut at = r.first;
        while at < end {
            let n = (end - at).min(piece_pages).min(m.next_cut(at) - at).max(1);
            out.push(Piece {
                range: PageRange {
                    region: r.region,
                    first: at,
                    count: n,
                },
                done: false,
            });
            at += n;
        }
    }
    out
}

/// Sort and merge adjacent or overlapping ranges of the same region.
fn coalesce(mut v: Vec<PageRange>) -> Vec<PageRange> {
    v.sort_by_key(|r| (r.region, r.first));
    let mut out: Vec<PageRange> = Vec::with_capacity(v.len());
    for r in v {
        match out.last_mut() {
            Some(last) if last.region == r.region && r.first <= last.end() => {
                last.count = last.end().max(r.end()) - last.first;
            }
            _ => out.push(r),
        }
    }
    out
}

/// One call of [`RdmaPuller::pull`] in progress.
struct PullRun<'a> {
    link: &'a mut Link,
    pieces: &'a mut [Piece],
    reqs: &'a [ReadRequest],
    progress: &'a (dyn Fn(u64) + Sync),
    stall_timeout: Duration,
    confirmed_total: &'a mut u64,
    injections: &'a mut Vec<Injection>,
}

impl PullRun<'_> {
    /// Post, poll, and watch for stalls until every piece is confirmed
    /// (`None`) or a failure has been drained (`Some(reason)`).
    fn drive(&mut self) -> Option<String> {
        let n = self.link.qps.len();
        let total = self.reqs.len();
        let mut next = 0usize;
        let mut confirmed = 0usize;
        let mut buf = CompletionBuffer::new(POLL_BATCH);
        let mut last_event = vec![Instant::now(); n];
        let mut failure: Option<String> = None;
        let mut failed_at: Option<Instant> = None;
        let mut start = 0usize;
        let mut idle = 0u32;
        loop {
            let mut busy = false;
            self.fire_injections(&mut failure);

            // Post: each QP with room takes a fair share of what is left.
            if failure.is_none() && next < total {
                let live = self
                    .link
                    .qps
                    .iter()
                    .filter(|q| !q.is_failed())
                    .count()
                    .max(1);
                for k in 0..n {
                    if next >= total {
                        break;
                    }
                    let q = (start + k) % n;
                    let qp = &mut self.link.qps[q];
                    if qp.is_failed() || qp.outstanding() >= qp.capacity() {
                        continue;
                    }
                    let share = ((total - next) / live).clamp(1, MAX_POST_BATCH);
                    let region = self.pieces[next].range.region;
                    let mut end = next + 1;
                    while end < total
                        && end - next < share
                        && self.pieces[end].range.region == region
                    {
                        end += 1;
                    }
                    let was_idle = qp.outstanding() == 0;
                    let local = &self.link.local[region as usize];
                    match qp.post_reads(local, &self.link.remote, &self.reqs[next..end]) {
                        Ok(k) => {
                            next += k;
                            if k > 0 {
                                busy = true;
                                if was_idle {
                                    last_event[q] = Instant::now();
                                }
                            }
                        }
                        Err(e) => {
                            if let Error::PostSend { accepted, .. } = e {
                                next += accepted;
                            }
                            failure.get_or_insert_with(|| format!("posting READs on QP {q}: {e}"));
                            break;
                        }
                    }
                }
                start = (start + 1) % n;
            }

            // Poll every QP.
            for (q, (qp, last)) in self.link.qps.iter_mut().zip(&mut last_event).enumerate() {
                if qp.outstanding() == 0 && qp.pending_requests() == 0 {
                    if qp.is_failed() {
                        failure.get_or_insert_with(|| format!("QP {q} is in the error state"));
                    }
                    continue;
                }
                let mut bytes = 0u64;
                match qp.poll(&mut buf) {
                    Ok(completions) => {
                        for c in completions {
                            busy = true;
                            *last = Instant::now();
                            match c.status {
                                Ok(()) => {
                                    let piece = usize::try_from(c.wr_id)
                                        .ok()
                                        .and_then(|i| self.pieces.get_mut(i));
                                    if let Some(p) = piece.filter(|p| !p.done) {
                                        p.done = true;
                                        confirmed += 1;
                                        bytes += c.len;
                                    }
                                }
                                Err(e) => {
                                    failure.get_or_insert_with(|| {
                                        format!(
                                            "READ failed on QP {q}: {e} (vendor error {:#x})",
                                            c.vendor_err
                                        )
                                    });
                                }
                            }
                        }
                    }
                    Err(e) => {
                        failure.get_or_insert_with(|| format!("{e}"));
                        if let Err(e) = qp.force_error() {
                            tracing::warn!(error = %e, "cannot move QP to ERR after a poll error");
                        }
                    }
                }
                if qp.is_failed() {
                    failure.get_or_insert_with(|| format!("QP {q} is in the error state"));
                }
                if bytes > 0 {
                    *self.confirmed_total += bytes;
                    (self.progress)(bytes);
                }
            }
            self.fire_injections(&mut failure);

            // A QP with READs outstanding and no completion for the stall
            // timeout is presumed dead (rxe never reports a dead peer).
            let now = Instant::now();
            for (q, qp) in self.link.qps.iter_mut().enumerate() {
                if qp.outstanding() > 0
                    && !qp.is_failed()
                    && now.duration_since(last_event[q]) >= self.stall_timeout
                {
                    failure.get_or_insert_with(|| {
                        format!(
                            "no completion on QP {q} for {:?} with {} READs outstanding",
                            self.stall_timeout,
                            qp.outstanding()
                        )
                    });
                    if let Err(e) = qp.force_error() {
                        tracing::warn!(error = %e, "cannot move a stalled QP to ERR");
                    }
                    last_event[q] = now;
                }
            }

            let outstanding: usize = self.link.qps.iter().map(ConnectedQp::outstanding).sum();
            match &failure {
                None if next == total && outstanding == 0 => {
                    debug_assert_eq!(confirmed, total);
                    return None;
                }
                None => {}
                Some(reason) => {
                    if outstanding == 0 {
                        return Some(reason.clone());
                    }
                    // Flushes of forced QPs come at once; healthy QPs get the
                    // stall timeout (above). Past that, give up: destroying
                    // the QPs stops the NIC anyway.
                    let t = *failed_at.get_or_insert(now);
                    if now.duration_since(t) > self.stall_timeout * 2 + Duration::from_secs(1) {
                        return Some(format!(
                            "{reason}; {outstanding} READs never completed after the failure"
                        ));
                    }
                }
            }

            if busy {
                idle = 0;
            } else {
                idle = idle.saturating_add(1);
                if idle > 1024 {
                    std::thread::sleep(Duration::from_micros(50));
                } else if idle > 16 {
                    std::thread::yield_now();
                } else {
                    std::hint::spin_loop();
                }
            }
        }
    }

    fn fire_injections(&mut self, failure: &mut Option<String>) {
        let confirmed = *self.confirmed_total;
        let qps = &mut self.link.qps;
        self.injections.retain(|inj| {
            if confirmed < inj.at_confirmed {
                return true;
            }
            if let Some(qp) = qps.get_mut(inj.qp) {
                if let Err(e) = qp.force_error() {
                    tracing::warn!(error = %e, "injected failure: cannot move QP to ERR");
                }
            }
            failure.get_or_insert_with(|| {
                format!("injected failure on QP {} after {confirmed} bytes", inj.qp)
            });
            false
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(qpn: u32) -> QpEndpoint {
        QpEndpoint {
            qpn,
            psn: 0x12_3456,
            gid: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 1],
            lid: 0,
            max_rd_atomic: 128,
        }
    }

    fn offer() -> Offer {
        Offer {
            endpoints: vec![ep(17), ep(18)],
            regions: vec![
                OfferedRegion {
                    len: 3 << 20,
                    pieces: vec![
                        RemoteRegion {
                            addr: 0x7f00_0000_0000,
                            len: 2 << 20,
                            rkey: 1,
                        },
                        RemoteRegion {
                            addr: 0x7f00_0020_0000,
                            len: 1 << 20,
                            rkey: 2,
                        },
                    ],
                },
                OfferedRegion {
                    len: 1 << 20,
                    pieces: vec![RemoteRegion {
                        addr: 0x7e00_0000_0000,
                        len: 1 << 20,
                        rkey: 3,
                    }],
                },
            ],
        }
    }

    /// Byte offset of the first region's length field.
    const REGIONS_AT: usize = HEADER_LEN + 12 + 2 * QpEndpoint::ENCODED_LEN;

    fn decode_err(b: &[u8]) -> Error {
        match Offer::decode(b) {
            Ok(o) => panic!("decoded {o:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn offer_and_answer_round_trip() {
        let o = offer();
        let b = o.encode();
        assert_eq!(&b[..4], b"FRRO");
        assert_eq!(&b[4..6], &[1, 0]);
        let (back, remote) = Offer::decode(&b).expect("decodes");
        assert_eq!(back, o);
        assert!(remote.covers(0x7f00_0000_0000, 3 << 20));
        assert!(!remote.covers(0x7f00_0000_0000, (3 << 20) + 1));

        let a = encode_answer(&[ep(5), ep(6), ep(7)]);
        assert_eq!(&a[..4], b"FRRA");
        assert_eq!(
            decode_answer(&a).expect("decodes"),
            vec![ep(5), ep(6), ep(7)]
        );
    }

    #[test]
    fn every_truncation_and_extension_of_an_offer_is_an_error() {
        let b = offer().encode();
        for n in 0..b.len() {
            assert!(Offer::decode(&b[..n]).is_err(), "truncated to {n}");
        }
        let mut long = b.clone();
        long.push(0);
        assert!(matches!(decode_err(&long), Error::Invalid { .. }));
        let a = encode_answer(&[ep(5)]);
        for n in 0..a.len() {
            assert!(decode_answer(&a[..n]).is_err(), "answer truncated to {n}");
        }
        let mut long = a.clone();
        long.extend_from_slice(&[0; 3]);
        assert!(decode_answer(&long).is_err());
    }

    #[test]
    fn wrong_magic_version_or_reserved_bits_are_refused() {
        let b = offer().encode();
        for (at, v) in [(0, b'X'), (4, 2), (5, 1), (6, 1), (9, 0)] {
            let mut bad = b.clone();
            bad[at] = v;
            let e = decode_err(&bad);
            assert!(matches!(e, Error::Invalid { .. }), "byte {at}: {e:?}");
        }
        let mut bad = b.clone();
        bad[4] = 2;
        assert!(decode_err(&bad).to_string().contains("version 2"));
        // An offer is not an answer and vice versa.
        assert!(decode_answer(&b).is_err());
        assert!(Offer::decode(&encode_answer(&[ep(1)])).is_err());
    }

    #[test]
    fn absurd_counts_are_refused_without_allocating_from_them() {
        let b = offer().encode();
        let set_u32 = |at: usize, v: u32| {
            let mut bad = b.clone();
            bad[at..at + 4].copy_from_slice(&v.to_le_bytes());
            bad
        };
        // channels, regions: 0, over the cap, u32::MAX
        for at in [HEADER_LEN + 4, HEADER_LEN + 8] {
            for v in [0, MAX_REGIONS as u32 + 1, u32::MAX] {
                assert!(
                    Offer::decode(&set_u32(at, v)).is_err(),
                    "field at {at} = {v}"
                );
            }
        }
        // More channels than bytes present (but under the cap).
        assert!(matches!(
            decode_err(&set_u32(HEADER_LEN + 4, 40)),
            Error::BadEncoding { .. }
        ));
        // Pieces of region 0: 0, huge, more than present.
        for v in [0, u32::MAX, 3] {
            assert!(
                Offer::decode(&set_u32(REGIONS_AT + 8, v)).is_err(),
                "pieces = {v}"
            );
        }
        // Answer channel count.
        let a = encode_answer(&[ep(5)]);
        for v in [0u32, 2, MAX_CHANNELS as u32 + 1, u32::MAX] {
            let mut bad = a.clone();
            bad[HEADER_LEN..HEADER_LEN + 4].copy_from_slice(&v.to_le_bytes());
            assert!(decode_answer(&bad).is_err(), "answer channels = {v}");
        }
        // A bad endpoint inside (max_rd_atomic 0).
        let mut bad = a.clone();
        bad[HEADER_LEN + 4 + 10] = 0;
        assert!(decode_answer(&bad).is_err());
    }

    #[test]
    fn region_pieces_must_tile_the_region() {
        let mut o = offer();
        o.regions[0].len += PAGE_SIZE; // pieces cover less than the region
        assert!(Offer::decode(&o.encode()).is_err());

        let mut o = offer();
        o.regions[0].pieces[1].addr += PAGE_SIZE; // gap between pieces
        assert!(Offer::decode(&o.encode()).is_err());

        let mut o = offer();
        o.regions[0].pieces[1].len = 0;
        assert!(Offer::decode(&o.encode()).is_err());

        let mut o = offer();
        o.regions[1].len = 100; // not whole pages
        o.regions[1].pieces[0].len = 100;
        assert!(Offer::decode(&o.encode()).is_err());

        let mut o = offer();
        o.regions[1].pieces[0].addr = u64::MAX - PAGE_SIZE; // wraps
        assert!(Offer::decode(&o.encode()).is_err());

        let mut o = offer();
        o.regions[1].pieces[0].addr = 0x7f00_0010_0000; // overlaps region 0
        assert!(Offer::decode(&o.encode()).is_err());
    }

    #[test]
    fn layout_must_match_local_memory() {
        let o = offer();
        let (a, _fa) = GuestRegion::create("t-a", 3 << 20).expect("memfd");
        let (b, _fb) = GuestRegion::create("t-b", 1 << 20).expect("memfd");
        let (c, _fc) = GuestRegion::create("t-c", 2 << 20).expect("memfd");
        assert!(check_layout(&o, &[a, b]).is_ok());
        let (a, _fa) = GuestRegion::create("t-a", 3 << 20).expect("memfd");
        assert!(check_layout(&o, &[a]).is_err(), "region count");
        let (a, _fa) = GuestRegion::create("t-a", 3 << 20).expect("memfd");
        assert!(check_layout(&o, &[a, c]).is_err(), "region size");
        // And RdmaPuller::new refuses before touching any device.
        let (a, _fa) = GuestRegion::create("t-a", 3 << 20).expect("memfd");
        let e = RdmaPuller::new(&[a], &o.encode()).expect_err("layout mismatch");
        assert!(matches!(e, Error::Invalid { .. }) && !e.is_no_rdma(), "{e}");
    }

    #[test]
    fn decoding_random_garbage_never_panics() {
        let good = offer().encode();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..20_000 {
            let mut b = good.clone();
            for _ in 0..(rnd() % 4 + 1) {
                let i = (rnd() as usize) % b.len();
                b[i] = rnd() as u8;
            }
            let cut = (rnd() as usize) % (b.len() + 1);
            let _ = Offer::decode(&b);
            let _ = Offer::decode(&b[..cut]);
            let _ = decode_answer(&b[..cut]);
        }
    }

    #[test]
    fn pieces_split_at_size_and_both_sides_registration_boundaries() {
        let m = RegionMap {
            local_addr: 0,
            remote_addr: 0,
            npages: 100,
            remote_cuts: vec![30, 70],
            local_piece_pages: 25,
        };
        let got: Vec<(u64, u64)> = split(
            &[PageRange {
                region: 0,
                first: 5,
                count: 90,
            }],
            &[m],
            16,
        )
        .iter()
        .map(|p| (p.range.first, p.range.count))
        .collect();
        assert_eq!(
            got,
            vec![
                (5, 16),
                (21, 4),
                (25, 5),
                (30, 16),
                (46, 4),
                (50, 16),
                (66, 4),
                (70, 5),
                (75, 16),
                (91, 4)
            ]
        );
    }

    #[test]
    fn coalesce_merges_adjacent_and_overlapping_ranges_per_region() {
        let r = |region, first, count| PageRange {
            region,
            first,
            count,
        };
        assert_eq!(
            coalesce(vec![
                r(1, 0, 2),
                r(0, 10, 5),
                r(0, 0, 4),
                r(0, 4, 2),
                r(0, 12, 10),
                r(1, 3, 1)
            ]),
            vec![r(0, 0, 6), r(0, 10, 12), r(1, 0, 2), r(1, 3, 1)]
        );
        assert!(coalesce(Vec::new()).is_empty());
    }

    #[allow(dead_code)]
    fn transports_are_send(e: RdmaExport, p: RdmaPuller) -> impl Send {
        (e, p)
    }
}
