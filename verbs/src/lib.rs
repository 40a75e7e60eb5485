//! `ferry-verbs`: the RDMA data path of Ferry, a safe layer over `rdma-sys`.
//!
//! During a live migration the *destination* pulls guest memory from the
//! *source* with RDMA READs over reliable-connected (RC) queue pairs. This
//! crate is everything Ferry needs for that and nothing more:
//!
//! - device discovery ([`devices`], [`Context`], [`DeviceReport`]), with the
//!   typed "no RDMA here" answer ([`Error::is_no_rdma`]) the engine uses to
//!   choose TCP;
//! - registration of memory Ferry does not own (guest RAM memfd mappings) as
//!   [`MemoryRegion<RemoteRead>`] on the source or
//!   [`MemoryRegion<LocalWrite>`] on the destination. Remote *write* cannot
//!   be expressed: no Ferry host ever lets its peer write its memory;
//! - RC queue pairs as typestate ([`PreparedQp`] -> [`ConnectedQp`]), with
//!   endpoints ([`QpEndpoint`]) and memory descriptors ([`RemoteRegion`])
//!   encoded for Ferry's own TCP control connection (rdma_cm does not work
//!   on SoftRoCE over `lo`);
//! - batched READs ([`ConnectedQp::post_reads`], [`ReadBatch`]) split to the
//!   port's message size and kept within the queue pair's outstanding-READ
//!   limit, and per-request completions ([`ConnectedQp::poll`]) with every
//!   `ibv_wc_status` as a [`WcError`] variant;
//! - the transport Ferry's sidecars use ([`transport`]): [`RdmaExport`] on
//!   the source, [`RdmaPuller`] on the destination, an opaque versioned
//!   offer/answer exchange, multi-QP pulls of engine page ranges with a
//!   stall timeout, and the unconfirmed ranges handed back on failure.
//!
//! All FFI lives in [`sys`]; each wrapper has an `as_raw()` escape hatch.
//!
//! # Quick start (destination side)
//!
//! ```no_run
//! use ferry_verbs::{
//!     CompletionBuffer, Context, LocalWrite, QpEndpoint, ReadRequest, RemoteMemory,
//!     RemoteRegion,
//! };
//! # fn exchange(_: QpEndpoint) -> (QpEndpoint, Vec<RemoteRegion>) { unimplemented!() }
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let ctx = match Context::open_first() {
//!     Ok(ctx) => ctx,
//!     Err(e) if e.is_no_rdma() => return Ok(()), // use the TCP transport instead
//!     Err(e) => return Err(e.into()),
//! };
//! let gid = ctx.roce_v2_ipv4_gid(1)?;
//! let pd = ctx.alloc_pd()?;
//!
//! // Destination guest RAM: a MAP_SHARED mapping of a memfd, owned elsewhere.
//! let len = 1 << 20;
//! // SAFETY: an anonymous mapping we keep until after `local` is dropped.
//! let ram = unsafe {
//!     libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE,
//!                libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1, 0)
//! } as *mut u8;
//! // SAFETY: `ram` is mapped for `len` bytes, stays mapped while `local` lives,
//! // and nothing forms references over it while READs are in flight.
//! let local = unsafe { pd.register::<LocalWrite>(ram, len)? };
//!
//! let prepared = pd.create_qp(ctx.create_cq(256)?, 1)?;
//! let index = u8::try_from(gid.index)?;
//! let (peer, regions) = exchange(prepared.endpoint(index)?); // over Ferry's TCP control link
//! let mut qp = prepared.connect(index, &peer)?;
//! let remote = RemoteMemory::new(regions)?;
//!
//! let reqs = [ReadRequest { wr_id: 1, local_addr: local.addr(), remote_addr: 0x7f00_0000_0000, len: 4096 }];
//! let mut posted = qp.post_reads(&local, &remote, &reqs)?;
//! let mut buf = CompletionBuffer::new(64);
//! while qp.outstanding() > 0 || posted < reqs.len() {
//!     for c in qp.poll(&mut buf)? {
//!         println!("range {} done: {:?}", c.wr_id, c.status);
//!     }
//!     posted += qp.post_reads(&local, &remote, &reqs[posted..])?;
//! }
//! # Ok(()) }
//! ```
//!
//! # Driving many queue pairs
//!
//! A destination-side puller takes a round's ranges (remote address, local
//! address, length), deals them to N [`ConnectedQp`]s, and in a loop calls
//! [`ConnectedQp::post_reads`] on each with its remaining ranges (it accepts
//! as many as fit; [`ConnectedQp::outstanding`] and
//! [`ConnectedQp::capacity`] show the room) and [`ConnectedQp::poll`] to
//! learn which ranges completed. When a queue pair fails (a completion with
//! an error, [`Error::QpFailed`] from a post), keep polling it until
//! `outstanding()` is 0: every accepted range is then reported, failed ones
//! with their [`WcError`]; [`ConnectedQp::into_unfinished`] returns any
//! that were never reported. Those ranges go back to the engine to be sent
//! over TCP.
//!
//! # Threads
//!
//! [`Context`], [`ProtectionDomain`] and [`MemoryRegion`] are `Send + Sync`
//! (libibverbs is thread-safe for them) and cheap to share. Queue pairs and
//! completion queues are `Send` but not `Sync`: posting and polling take
//! `&mut self`, so each queue pair is driven by one thread at a time. Use
//! one thread per queue pair, or one thread polling all of them; each queue
//! pair owns its completion queue, so they never steal each other's
//! completions.
//!
//! # Resource cleanup
//!
//! Everything is released on drop, in a safe order regardless of the order
//! values are dropped in: each resource holds a reference count on its
//! parent (MR and QP -> PD -> device context), so a parent is freed only
//! after its last child. Dropping a [`MemoryRegion`] deregisters it at once,
//! so the rkeys it handed out die: the peer's later READs fail with
//! [`WcError::RemoteAccessError`]. Ferry drops its regions when a migration
//! ends, on success or failure. Dropping a [`ConnectedQp`] destroys the
//! queue pair (outstanding READs are abandoned; the NIC stops writing).
//!
//! # Borrow rules that matter
//!
//! The [`Completions`] of one poll borrow the caller's buffer; polling again
//! would overwrite them, so it does not compile while they are alive:
//!
//! ```compile_fail,E0499
//! # fn f(qp: &mut ferry_verbs::ConnectedQp) -> ferry_verbs::Result<()> {
//! let mut buf = ferry_verbs::CompletionBuffer::new(16);
//! let first = qp.poll(&mut buf)?;
//! let second = qp.poll(&mut buf)?; // `buf` is still borrowed by `first`
//! for c in first { println!("{c:?}"); }
//! # drop(second); Ok(()) }
//! ```
//!
//! The same code compiles once the first completions are consumed:
//!
//! ```no_run
//! # fn f(qp: &mut ferry_verbs::ConnectedQp) -> ferry_verbs::Result<()> {
//! let mut buf = ferry_verbs::CompletionBuffer::new(16);
//! let first = qp.poll(&mut buf)?;
//! for c in first { println!("{c:?}"); }
//! let second = qp.poll(&mut buf)?;
//! # drop(second); Ok(()) }
//! ```
//!
//! A queue pair handed back with [`ConnectedQp::into_unfinished`] is gone
//! (its ranges were given to another transport); it cannot post again:
//!
//! ```compile_fail,E0382
//! # fn f(mut qp: ferry_verbs::ConnectedQp, local: &ferry_verbs::MemoryRegion<ferry_verbs::LocalWrite>,
//! #      remote: &ferry_verbs::RemoteMemory) -> ferry_verbs::Result<()> {
//! let unfinished = qp.into_unfinished();
//! qp.post_reads(local, remote, &[])?; // use of moved value
//! # drop(unfinished); Ok(()) }
//! ```

mod device;
mod error;
mod mr;
mod qp;
pub mod sys;
pub mod transport;

pub use device::{
    device_reports, devices, Context, DeviceInfo, DeviceLimits, DeviceReport, Gid, GidEntry,
    GidType, LinkLayer, Mtu, PortAttr, PortReport, PortState, SYSFS_INFINIBAND,
};
pub use error::{Error, Result, WcError};
pub use mr::{
    Access, LocalWrite, MemoryRegion, ProtectionDomain, RemoteMemory, RemoteRead, RemoteRegion,
};
pub use qp::{
    CompletionBuffer, CompletionQueue, Completions, ConnectedQp, PreparedQp, QpEndpoint, ReadBatch,
    ReadCompletion, ReadRequest,
};
pub use transport::{RdmaExport, RdmaPuller};
