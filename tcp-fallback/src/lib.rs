//! Ferry's multi-stream TCP transport.
//!
//! The source pushes each round's pages over N data connections, one planned share per
//! connection; the destination's reader threads place them straight into its guest RAM.
//! Pages go from the source's guest mapping to the socket (`writev` with `iovec`s into
//! the mapping) and from the socket into the destination's mapping (`read` into it): no
//! user-space copy of the payload on either side. Runs of small frames (scattered dirty
//! pages, as in the final round) are gathered into one `writev` of up to 340 frames or
//! 1 MiB, so they leave in a few TCP segments rather than one each. Each batch carries one XXH3-64 hash
//! per page, computed by the source over a private copy of the page and checked by the
//! destination over the bytes that landed. A mismatch in a pre-copy round means the
//! guest wrote the page while it was sent (the write is in the next round's dirty log,
//! docs/design.md §2), so the page is re-sent; in the final round, with the VM paused, it is
//! corruption and the migration aborts.
//!
//! # Quick start
//!
//! ```no_run
//! # fn demo(streams: Vec<std::net::TcpStream>, mem: std::sync::Arc<Vec<ferry_proto::mem::GuestRegion>>,
//! #         plan: ferry_engine::plan::RangePlan) -> Result<(), ferry_engine::transport::TransportError> {
//! let mut tx = ferry_tcp_fallback::TcpSender::new(streams, mem);
//! let stats = tx.send_plan(1, &plan, &|_bytes| {})?;
//! # Ok(()) }
//! ```
//!
//! The sidecar wraps the sender in its `Transport` (the round's control messages around
//! [`TcpSender::send_plan`]); the destination's reader threads report each round to
//! [`TcpReceiver::wait_round`].
//!
//! # Threads
//!
//! [`TcpSender::send_plan`] runs one scoped thread per connection and returns when all
//! are done. [`TcpReceiver::start`] spawns one reader thread per connection for the
//! whole migration; they report through a channel that [`TcpReceiver::wait_round`]
//! drains.
//!
//! # Resource cleanup
//!
//! Dropping a [`TcpReceiver`] shuts its sockets down, which ends the reader threads.

mod sys;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use ferry_engine::digest::{is_zero, page_hash, zero_page_hash, PageHashes};
use ferry_engine::plan::{PageRange, RangePlan};
use ferry_engine::transport::{RoundStats, TransportError};
use ferry_proto::data::{DataHeader, DataKind, DATA_HEADER_LEN, MAX_BATCH_PAGES};
use ferry_proto::mem::{GuestRegion, PAGE};
use ferry_proto::peer::MAX_TORN;

use sys::{iovec, read_exact_raw, writev_all};

/// An encrypted stream (TLS) a data connection runs over.
pub trait SecureStream: Read + Write + Send {}
impl<T: Read + Write + Send> SecureStream for T {}

/// One data connection: plain TCP (pages go between the socket and guest memory with no
/// copy in user space) or an encrypted stream (pages are copied once, into the buffer the
/// encryption reads).
pub enum Channel {
    /// Plain TCP (`--insecure-psk`).
    Plain(TcpStream),
    /// An encrypted stream, and its socket (to shut it down).
    Secure {
        /// The stream.
        stream: Box<dyn SecureStream>,
        /// Its socket.
        tcp: TcpStream,
    },
}

impl Channel {
    fn tcp(&self) -> &TcpStream {
        match self {
            Channel::Plain(s) => s,
            Channel::Secure { tcp, .. } => tcp,
        }
    }

    /// Reads exactly `len` bytes into `dst`.
    ///
    /// # Safety
    ///
    /// - `dst` must be valid for writes of `len` bytes, and nothing else may access those
    ///   bytes during the call.
    unsafe fn read_exact_ptr(&mut self, dst: *mut u8, len: usize) -> std::io::Result<()> {
        match self {
            // SAFETY: forwarded caller obligation.
            Channel::Plain(s) => unsafe { read_exact_raw(s.as_raw_fd(), dst, len) },
            Channel::Secure { stream, .. } => {
                // SAFETY: `dst` is valid for `len` bytes of writes and accessed by nobody
                // else during the call (caller's obligation), so a unique slice over it is
                // sound for the call's duration.
                let buf = unsafe { std::slice::from_raw_parts_mut(dst, len) };
                stream.read_exact(buf).map_err(|e| {
                    if e.kind() == std::io::ErrorKind::UnexpectedEof {
                        std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            "peer closed the data connection mid-frame",
                        )
                    } else {
                        e
                    }
                })
            }
        }
    }
}

/// Binds the calling thread to `cpus` (empty: leaves it as it is), with a warning when the
/// kernel refuses: where a thread runs never fails a migration.
pub fn bind_current_thread(cpus: &[usize]) {
    if cpus.is_empty() {
        return;
    }
    // SAFETY: cpu_set_t is plain bits; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus {
        // SAFETY: CPU_SET ignores CPUs beyond the set's size; `set` is ours.
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    // SAFETY: binds the calling thread (pid 0) to a set we own, of the size we pass.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        tracing::warn!(
            ?cpus,
            "binding a data thread: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// The source side: pushes planned ranges over N connections.
pub struct TcpSender {
    channels: Vec<Channel>,
    mem: Arc<Vec<GuestRegion>>,
    cpus: Vec<usize>,
}

impl TcpSender {
    /// A sender over authenticated plain data connections, reading from `mem` (the
    /// source VM's regions, in layout order).
    pub fn new(streams: Vec<TcpStream>, mem: Arc<Vec<GuestRegion>>) -> Self {
        Self::with_channels(streams.into_iter().map(Channel::Plain).collect(), mem)
    }

    /// A sender over authenticated data connections of either kind.
    pub fn with_channels(channels: Vec<Channel>, mem: Arc<Vec<GuestRegion>>) -> Self {
        Self {
            channels,
            mem,
            cpus: Vec::new(),
        }
    }

    /// Runs the sending threads (`ferry-tx-<channel>`) on `cpus` (empty: anywhere).
    pub fn bind_to(&mut self, cpus: Vec<usize>) {
        self.cpus = cpus;
    }
}

/// Most frames gathered into one `writev`: three iovecs each (header, hashes, pages)
/// keeps a flush within one `UIO_MAXIOV` (1024) call.
const MAX_GATHERED_FRAMES: usize = 340;

/// Payload gathered before a flush: one full batch ([`MAX_BATCH_PAGES`] = 1 MiB) goes out
/// on its own as before; only runs of small frames (scattered dirty pages, typical of the
/// final round) share a `writev` and so a few TCP segments instead of one each.
const MAX_GATHERED_BYTES: usize = 1 << 20;

/// Pages a receiver lands with one read before hashing them: 64 KiB stays in L2.
const RECV_SLICE_PAGES: usize = 16;

/// Frames of one channel waiting for one `writev`: their headers and hashes are owned
/// here, their pages stay in the guest mapping.
#[derive(Default)]
struct Gathered {
    headers: Vec<[u8; DATA_HEADER_LEN]>,
    /// The frames' page hashes, little-endian, one frame's after the other's.
    hashes: Vec<u8>,
    /// Per frame: its number of hashes in `hashes`, its pages and their length.
    frames: Vec<(usize, *const u8, usize)>,
    /// The frames' pages, copied (encrypted channels only: plain ones send from the
    /// guest mapping).
    payload: Vec<u8>,
    bytes: usize,
}

impl Gathered {
    fn full(&self) -> bool {
        self.frames.len() >= MAX_GATHERED_FRAMES || self.bytes >= MAX_GATHERED_BYTES
    }

    /// Writes every gathered frame, in order: with one `writev` on a plain connection
    /// (more if the socket takes them in pieces), through the stream on an encrypted one.
    fn flush(&mut self, ch: &mut Channel) -> std::io::Result<()> {
        if self.frames.is_empty() {
            return Ok(());
        }
        let fd = match ch {
            Channel::Plain(s) => s.as_raw_fd(),
            Channel::Secure { stream, .. } => {
                let (mut h, mut at) = (0, 0);
                for (hdr, &(nhash, _, len)) in self.headers.iter().zip(&self.frames) {
                    stream.write_all(hdr)?;
                    if len > 0 {
                        stream.write_all(&self.hashes[h * 8..(h + nhash) * 8])?;
                        stream.write_all(&self.payload[at..at + len])?;
                    }
                    h += nhash;
                    at += len;
                }
                stream.flush()?;
                self.clear();
                return Ok(());
            }
        };
        let mut iov = Vec::with_capacity(self.frames.len() * 3);
        let mut h = 0;
        for (hdr, &(nhash, pages, len)) in self.headers.iter().zip(&self.frames) {
            iov.push(iovec(hdr.as_ptr(), DATA_HEADER_LEN));
            if len > 0 {
                iov.push(iovec(self.hashes[h * 8..].as_ptr(), nhash * 8));
                iov.push(iovec(pages, len));
            }
            h += nhash;
        }
        // SAFETY: the headers and hashes live in `self` until the call returns; each
        // page pointer covers `len` bytes of a region that stays mapped while the
        // sender's `mem` is borrowed (checked by `pages_ptr` when gathered).
        unsafe { writev_all(fd, &mut iov)? };
        self.clear();
        Ok(())
    }

    fn clear(&mut self) {
        self.headers.clear();
        self.hashes.clear();
        self.frames.clear();
        self.payload.clear();
        self.bytes = 0;
    }
}

/// CPU time the calling thread has used, in nanoseconds.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    (ts.tv_sec as u64).saturating_mul(1_000_000_000) + ts.tv_nsec as u64
}

/// One page in this many is timed when hashing (timing each would cost a fifth of a
/// hash); the sum is scaled up.
const HASH_SAMPLE: u64 = 16;

/// Hashes pages and estimates the time it takes from a sample.
#[derive(Default)]
struct HashClock {
    pages: u64,
    ns: u64,
}

impl HashClock {
    fn hash(&mut self, page: &[u8]) -> u64 {
        self.pages += 1;
        if self.pages.is_multiple_of(HASH_SAMPLE) {
            let t = Instant::now();
            let h = page_hash(page);
            self.ns += t.elapsed().as_nanos() as u64 * HASH_SAMPLE;
            h
        } else {
            page_hash(page)
        }
    }
}

/// Sends one channel's share of a round.
fn send_share(
    ch: &mut Channel,
    mem: &[GuestRegion],
    round: u32,
    ranges: &[PageRange],
    progress: &(dyn Fn(u64) + Sync),
) -> std::io::Result<RoundStats> {
    let secure = matches!(ch, Channel::Secure { .. });
    let cpu0 = thread_cpu_ns();
    let mut clock = HashClock::default();
    let mut stats = RoundStats::default();
    let mut bounce = Box::new([0u8; PAGE]);
    let mut hashes: Vec<u64> = Vec::with_capacity(MAX_BATCH_PAGES as usize);
    let mut out = Gathered::default();
    let mut unreported = 0u64;
    for r in ranges {
        let region = mem
            .get(r.region as usize)
            .ok_or_else(|| std::io::Error::other("plan names a region that is not mapped"))?;
        let mut p = r.first;
        while p < r.end() {
            // Classify the run starting at p: zero pages, or up to a batch of data pages.
            region.copy_out(p, &mut bounce);
            let zero = is_zero(&bounce[..]);
            let start = p;
            hashes.clear();
            if !zero {
                hashes.push(clock.hash(&bounce[..]));
                if secure {
                    out.payload.extend_from_slice(&bounce[..]);
                }
            }
            p += 1;
            while p < r.end() && (zero || (hashes.len() as u64) < MAX_BATCH_PAGES) {
                region.copy_out(p, &mut bounce);
                if is_zero(&bounce[..]) != zero {
                    break;
                }
                if !zero {
                    hashes.push(clock.hash(&bounce[..]));
                    if secure {
                        out.payload.extend_from_slice(&bounce[..]);
                    }
                }
                p += 1;
            }
            let count = p - start;
            let kind = if zero {
                DataKind::Zero
            } else {
                DataKind::Pages
            };
            let hdr = DataHeader {
                kind,
                round,
                region: r.region,
                first: start,
                count,
            }
            .encode();
            out.headers.push(hdr);
            if zero {
                out.frames.push((0, std::ptr::null(), 0));
            } else {
                let src = region
                    .pages_ptr(start, count)
                    .expect("range checked against the region");
                out.hashes
                    .extend(hashes.iter().flat_map(|h| h.to_le_bytes()));
                out.frames.push((hashes.len(), src, count as usize * PAGE));
                out.bytes += count as usize * PAGE;
            }
            stats.pages += count;
            if zero {
                stats.zero_pages += count;
            } else {
                let b = count * PAGE as u64;
                stats.bytes += b;
                unreported += b;
            }
            if out.full() {
                out.flush(ch)?;
                progress(std::mem::take(&mut unreported));
            }
        }
    }
    out.flush(ch)?;
    if unreported > 0 {
        progress(unreported);
    }
    let end = DataHeader {
        kind: DataKind::RoundEnd,
        round,
        region: 0,
        first: 0,
        count: stats.pages,
    }
    .encode();
    stats.cpu.hash_ns = clock.ns;
    match ch {
        Channel::Plain(s) => {
            let mut iov = [iovec(end.as_ptr(), DATA_HEADER_LEN)];
            // SAFETY: `end` lives on this frame for the call.
            unsafe { writev_all(s.as_raw_fd(), &mut iov)? };
        }
        Channel::Secure { stream, .. } => {
            stream.write_all(&end)?;
            stream.flush()?;
        }
    }
    stats.cpu.data_ns = thread_cpu_ns().saturating_sub(cpu0);
    Ok(stats)
}

impl TcpSender {
    /// Channels (connections) in use.
    pub fn channels(&self) -> usize {
        self.channels.len()
    }

    /// Moves every range of `plan` (one share per connection) as `round`; returns when
    /// every byte is written (the destination's confirmation comes on the control link).
    /// `progress` is called from the channel threads with payload bytes as they go.
    ///
    /// # Errors
    ///
    /// [`TransportError::Failed`] with every range of the plan unfinished when a
    /// connection fails.
    pub fn send_plan(
        &mut self,
        round: u32,
        plan: &RangePlan,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<RoundStats, TransportError> {
        let (mem, cpus) = (&self.mem, &self.cpus);
        let results: Vec<std::io::Result<RoundStats>> = std::thread::scope(|s| {
            let hs: Vec<_> = self
                .channels
                .iter_mut()
                .zip(&plan.channels)
                .enumerate()
                .map(|(i, (ch, share))| {
                    std::thread::Builder::new()
                        .name(format!("ferry-tx-{i}"))
                        .spawn_scoped(s, move || {
                            bind_current_thread(cpus);
                            send_share(ch, mem, round, share, progress)
                        })
                })
                .collect();
            hs.into_iter()
                .map(|h| {
                    h?.join()
                        .unwrap_or_else(|_| Err(std::io::Error::other("sender thread panicked")))
                })
                .collect()
        });
        let mut total = RoundStats::default();
        for r in results {
            match r {
                Ok(s) => total.merge(s),
                Err(e) => {
                    return Err(TransportError::Failed {
                        reason: format!("TCP data connection: {e}"),
                        unfinished: plan.ranges().copied().collect(),
                    })
                }
            }
        }
        Ok(total)
    }
}

/// What a reader thread reports.
enum ChannelEvent {
    RoundEnd {
        round: u32,
        stats: RoundStats,
    },
    Error {
        channel: usize,
        error: TransportError,
    },
}

/// Pages received so far, per region (a zero marker only needs to clear a page that
/// earlier received data).
struct Received {
    bits: Vec<Vec<AtomicU64>>,
}

impl Received {
    fn new(mem: &[GuestRegion]) -> Self {
        Self {
            bits: mem
                .iter()
                .map(|r| {
                    (0..r.npages().div_ceil(64))
                        .map(|_| AtomicU64::new(0))
                        .collect()
                })
                .collect(),
        }
    }
    fn mark(&self, region: usize, first: u64, count: u64) {
        for p in first..first + count {
            self.bits[region][(p / 64) as usize].fetch_or(1 << (p % 64), Ordering::Relaxed);
        }
    }
    fn get(&self, region: usize, p: u64) -> bool {
        self.bits[region][(p / 64) as usize].load(Ordering::Relaxed) & (1 << (p % 64)) != 0
    }
}

/// The destination side: reader threads placing pages into guest RAM.
pub struct TcpReceiver {
    streams: Vec<TcpStream>,
    events: Receiver<ChannelEvent>,
    threads: Vec<JoinHandle<()>>,
}

fn read_channel(
    channel: usize,
    mut stream: Channel,
    mem: Arc<Vec<GuestRegion>>,
    received: Arc<Received>,
    digest: Arc<PageHashes>,
    events: Sender<ChannelEvent>,
) {
    let mut round = 1u32;
    let mut stats = RoundStats::default();
    let (mut cpu0, mut clock) = (thread_cpu_ns(), HashClock::default());
    let mut hashes = vec![0u8; MAX_BATCH_PAGES as usize * 8];
    let fail = |error: TransportError| {
        let _ = events.send(ChannelEvent::Error { channel, error });
    };
    let gone =
        |e: std::io::Error| TransportError::PeerGone(format!("data connection {channel}: {e}"));
    loop {
        let mut h = [0u8; DATA_HEADER_LEN];
        // SAFETY: `h` is a local buffer of DATA_HEADER_LEN bytes.
        if let Err(e) = unsafe { stream.read_exact_ptr(h.as_mut_ptr(), DATA_HEADER_LEN) } {
            // A clean close between frames after the migration is the normal end.
            if e.kind() != std::io::ErrorKind::UnexpectedEof || stats.pages > 0 {
                fail(gone(e));
            }
            return;
        }
        let hdr = match DataHeader::decode(&h) {
            Ok(x) => x,
            Err(e) => {
                return fail(TransportError::Protocol(format!(
                    "data connection {channel}: {e}"
                )))
            }
        };
        // Rounds only move forward. A channel may skip rounds that went over another
        // transport (RDMA), but never switches rounds in the middle of one.
        let fresh = stats.pages == 0 && stats.bytes == 0;
        if hdr.round > round && fresh {
            round = hdr.round;
        }
        if hdr.round != round {
            return fail(TransportError::Protocol(format!(
                "data connection {channel}: frame of round {} while round {round} is open",
                hdr.round
            )));
        }
        if hdr.kind == DataKind::RoundEnd {
            if hdr.count != stats.pages {
                return fail(TransportError::Protocol(format!(
                    "data connection {channel}: round {round} announced {} pages, {} arrived",
                    hdr.count, stats.pages
                )));
            }
            stats.cpu.hash_ns = std::mem::take(&mut clock).ns;
            stats.cpu.data_ns = thread_cpu_ns().saturating_sub(cpu0);
            let done = std::mem::take(&mut stats);
            if events
                .send(ChannelEvent::RoundEnd { round, stats: done })
                .is_err()
            {
                return;
            }
            cpu0 = thread_cpu_ns();
            round += 1;
            continue;
        }
        let region_ix = hdr.region as usize;
        let Some(region) = mem.get(region_ix) else {
            return fail(TransportError::Protocol(format!(
                "data connection {channel}: region {} does not exist",
                hdr.region
            )));
        };
        let Some(dst) = region.pages_ptr(hdr.first, hdr.count) else {
            return fail(TransportError::Protocol(format!(
                "data connection {channel}: pages {}+{} are outside region {} ({} pages)",
                hdr.first,
                hdr.count,
                hdr.region,
                region.npages()
            )));
        };
        match hdr.kind {
            DataKind::Zero => {
                for p in hdr.first..hdr.first + hdr.count {
                    if received.get(region_ix, p) {
                        let d = region.pages_ptr(p, 1).expect("within the checked range");
                        // SAFETY: `d` is one page of our own mapping that only this
                        // channel writes in this round (plans give pages to one channel).
                        unsafe { std::ptr::write_bytes(d, 0, PAGE) };
                    }
                    digest.set(hdr.region, p, zero_page_hash());
                }
                stats.pages += hdr.count;
                stats.zero_pages += hdr.count;
            }
            DataKind::Pages => {
                let n = hdr.count as usize;
                let len = n * PAGE;
                // Pages landing for the first time are faulted in with one call for the
                // whole frame (the destination no longer fills its memory before the
                // first page): a page fault per page inside the copy costs several times
                // more. Pages already there are left alone.
                if !received.get(region_ix, hdr.first) {
                    // CPU time, not wall time: with more receivers than cores a thread
                    // waits for a CPU inside the call.
                    let t = thread_cpu_ns();
                    let filled = region.populate_pages(hdr.first, hdr.count);
                    stats.cpu.populate_ns += thread_cpu_ns().saturating_sub(t);
                    if let Err(e) = filled {
                        return fail(TransportError::Failed {
                            reason: format!("data connection {channel}: the destination cannot fill the VM's memory: {e}"),
                            unfinished: Vec::new(),
                        });
                    }
                }
                // SAFETY: `hashes` holds MAX_BATCH_PAGES * 8 bytes and n <= MAX_BATCH_PAGES
                // (checked by decode).
                if let Err(e) = unsafe { stream.read_exact_ptr(hashes.as_mut_ptr(), n * 8) } {
                    return fail(gone(e));
                }
                // Land the pages a slice at a time and hash each slice while it is still
                // in cache (a whole 1 MiB batch would be out of L2 again by then).
                let mut i = 0;
                while i < n {
                    let k = RECV_SLICE_PAGES.min(n - i);
                    // SAFETY: pages i..i+k of `dst` lie within the n pages checked above,
                    // which no one else accesses during this round.
                    let slice = unsafe { dst.add(i * PAGE) };
                    // SAFETY: as above; `slice` is valid for k pages.
                    if let Err(e) = unsafe { stream.read_exact_ptr(slice, k * PAGE) } {
                        return fail(gone(e));
                    }
                    // SAFETY: the destination owns this memory exclusively until it hands
                    // the memfds to its VMM, and this channel alone writes these pages now.
                    let landed = unsafe { std::slice::from_raw_parts(slice, k * PAGE) };
                    for j in 0..k {
                        let at = i + j;
                        let mut want = [0u8; 8];
                        want.copy_from_slice(&hashes[at * 8..at * 8 + 8]);
                        let got = clock.hash(&landed[j * PAGE..(j + 1) * PAGE]);
                        digest.set(hdr.region, hdr.first + at as u64, got);
                        if got != u64::from_le_bytes(want) {
                            if stats.torn.len() >= MAX_TORN {
                                return fail(TransportError::Protocol(format!(
                                    "data connection {channel}: more than {MAX_TORN} pages failed their checksum in round {round}"
                                )));
                            }
                            stats.torn.push(PageRange {
                                region: hdr.region,
                                first: hdr.first + at as u64,
                                count: 1,
                            });
                        }
                    }
                    i += k;
                }
                received.mark(region_ix, hdr.first, hdr.count);
                stats.pages += hdr.count;
                stats.bytes += len as u64;
            }
            DataKind::RoundEnd => unreachable!("handled above"),
        }
    }
}

impl TcpReceiver {
    /// Starts one reader thread per authenticated plain data connection, writing into
    /// `mem` (the destination's fresh regions, in layout order) and recording the hash of
    /// every page that lands in `hashes`.
    ///
    /// # Errors
    ///
    /// [`TransportError::PeerGone`] when a socket cannot be cloned for the reader.
    pub fn start(
        streams: Vec<TcpStream>,
        mem: Arc<Vec<GuestRegion>>,
        hashes: Arc<PageHashes>,
    ) -> Result<Self, TransportError> {
        Self::with_channels(
            streams.into_iter().map(Channel::Plain).collect(),
            mem,
            hashes,
        )
    }

    /// As [`TcpReceiver::start`], over data connections of either kind.
    ///
    /// # Errors
    ///
    /// [`TransportError::PeerGone`] when a socket cannot be cloned for the reader.
    pub fn with_channels(
        channels: Vec<Channel>,
        mem: Arc<Vec<GuestRegion>>,
        hashes: Arc<PageHashes>,
    ) -> Result<Self, TransportError> {
        Self::bound(channels, mem, hashes, Vec::new())
    }

    /// As [`TcpReceiver::with_channels`], its reading threads (`ferry-rx-<channel>`)
    /// running on `cpus` (empty: anywhere).
    ///
    /// # Errors
    ///
    /// As [`TcpReceiver::start`]; a thread that cannot be started.
    pub fn bound(
        channels: Vec<Channel>,
        mem: Arc<Vec<GuestRegion>>,
        hashes: Arc<PageHashes>,
        cpus: Vec<usize>,
    ) -> Result<Self, TransportError> {
        let cpus = Arc::new(cpus);
        let (tx, rx) = crossbeam_channel::unbounded();
        let received = Arc::new(Received::new(&mem));
        let mut threads = Vec::new();
        let mut kept = Vec::new();
        for (i, s) in channels.into_iter().enumerate() {
            let clone = s
                .tcp()
                .try_clone()
                .map_err(|e| TransportError::PeerGone(format!("clone data socket: {e}")))?;
            kept.push(clone);
            let (mem, received, tx) = (Arc::clone(&mem), Arc::clone(&received), tx.clone());
            let (hashes, cpus) = (Arc::clone(&hashes), Arc::clone(&cpus));
            let t = std::thread::Builder::new()
                .name(format!("ferry-rx-{i}"))
                .spawn(move || {
                    bind_current_thread(&cpus);
                    read_channel(i, s, mem, received, hashes, tx)
                })
                .map_err(|e| TransportError::PeerGone(format!("starting a reader: {e}")))?;
            threads.push(t);
        }
        Ok(Self {
            streams: kept,
            events: rx,
            threads,
        })
    }

    /// Waits until every connection has delivered its share of `round`.
    ///
    /// # Errors
    ///
    /// The first channel error; [`TransportError::PeerGone`] when nothing arrives for
    /// `idle_timeout`.
    pub fn wait_round(
        &self,
        round: u32,
        idle_timeout: Duration,
    ) -> Result<RoundStats, TransportError> {
        let mut total = RoundStats::default();
        let mut ended = 0;
        while ended < self.streams.len() {
            match self.events.recv_timeout(idle_timeout) {
                Ok(ChannelEvent::RoundEnd { round: r, stats }) if r == round => {
                    total.merge(stats);
                    ended += 1;
                }
                Ok(ChannelEvent::RoundEnd { round: r, .. }) => {
                    return Err(TransportError::Protocol(format!(
                        "a data connection ended round {r} while round {round} was expected"
                    )))
                }
                Ok(ChannelEvent::Error { channel, error }) => {
                    tracing::warn!(channel, "data connection failed: {error}");
                    return Err(error);
                }
                Err(RecvTimeoutError::Timeout) => {
                    return Err(TransportError::PeerGone(format!(
                        "no data for {} s in round {round}",
                        idle_timeout.as_secs()
                    )))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(TransportError::PeerGone(
                        "all data connections closed".into(),
                    ))
                }
            }
        }
        Ok(total)
    }
}

impl Drop for TcpReceiver {
    fn drop(&mut self) {
        for s in &self.streams {
            let _ = s.shutdown(Shutdown::Both);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_engine::plan::plan;
    use std::net::TcpListener;

    fn pairs(n: usize) -> (Vec<TcpStream>, Vec<TcpStream>) {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let mut a = Vec::new();
        let mut b = Vec::new();
        for _ in 0..n {
            a.push(TcpStream::connect(addr).expect("connect"));
            b.push(l.accept().expect("accept").0);
        }
        (a, b)
    }

    fn hashes_for(mem: &[GuestRegion]) -> Arc<PageHashes> {
        let n: Vec<u64> = mem.iter().map(GuestRegion::npages).collect();
        Arc::new(PageHashes::new(&n))
    }

    fn region(pages: u64) -> GuestRegion {
        GuestRegion::create("t", pages * PAGE as u64)
            .expect("create")
            .0
    }

    fn fill(r: &GuestRegion, seed: u8) {
        for p in 0..r.npages() {
            if p % 5 == 3 {
                continue; // leave some zero pages
            }
            let d = r.pages_ptr(p, 1).expect("page");
            // SAFETY: test-owned mapping, single writer.
            unsafe { std::ptr::write_bytes(d, seed.wrapping_add(p as u8) | 1, PAGE) };
        }
    }

    #[test]
    fn a_round_moves_every_page_and_zero_markers_clear_stale_pages() {
        let (a, b) = pairs(3);
        let src = Arc::new(vec![region(1000), region(300)]);
        let dst = Arc::new(vec![region(1000), region(300)]);
        fill(&src[0], 1);
        fill(&src[1], 2);
        let landed = hashes_for(&dst);
        let rx = TcpReceiver::start(b, Arc::clone(&dst), Arc::clone(&landed)).expect("start");
        let mut tx = TcpSender::new(a, Arc::clone(&src));
        let ranges = vec![
            PageRange {
                region: 0,
                first: 0,
                count: 1000,
            },
            PageRange {
                region: 1,
                first: 0,
                count: 300,
            },
        ];
        let p = plan(&ranges, 3, 64);
        let sent = tx.send_plan(1, &p, &|_| {}).expect("send");
        let got = rx.wait_round(1, Duration::from_secs(10)).expect("round");
        assert_eq!(sent.pages, 1300);
        assert_eq!(got.pages, 1300);
        assert_eq!(got.zero_pages, sent.zero_pages);
        assert_eq!(sent.zero_pages, 200 + 60);
        assert!(got.torn.is_empty());
        for (s, d) in src.iter().zip(dst.iter()) {
            // SAFETY: no thread writes either mapping now.
            assert!(unsafe { s.as_slice() == d.as_slice() });
        }
        // The digest kept as pages landed equals the source memory's digest.
        let want: Vec<Vec<u128>> = src
            .iter()
            // SAFETY: no thread writes the source mapping now.
            .map(|r| ferry_engine::digest::region_digest(unsafe { r.as_slice() }))
            .collect();
        assert_eq!(landed.digest().regions, want);
        // Round 2: a page becomes zero at the source; the marker must clear it.
        // SAFETY: test-owned mapping, single writer.
        unsafe { std::ptr::write_bytes(src[0].pages_ptr(7, 1).expect("page"), 0, PAGE) };
        let p2 = plan(
            &[PageRange {
                region: 0,
                first: 7,
                count: 1,
            }],
            3,
            64,
        );
        tx.send_plan(2, &p2, &|_| {}).expect("send");
        rx.wait_round(2, Duration::from_secs(10)).expect("round 2");
        // SAFETY: no thread writes either mapping now.
        assert!(unsafe { src[0].as_slice() == dst[0].as_slice() });
    }

    #[test]
    fn out_of_bounds_and_wrong_round_frames_are_protocol_errors() {
        use std::io::Write;
        for hdr in [
            DataHeader {
                kind: DataKind::Pages,
                round: 1,
                region: 0,
                first: 99,
                count: 2,
            },
            DataHeader {
                kind: DataKind::Zero,
                round: 1,
                region: 5,
                first: 0,
                count: 1,
            },
            DataHeader {
                kind: DataKind::Zero,
                round: 0,
                region: 0,
                first: 0,
                count: 1,
            },
            DataHeader {
                kind: DataKind::RoundEnd,
                round: 1,
                region: 0,
                first: 0,
                count: 7,
            },
        ] {
            let (mut a, b) = pairs(1);
            let dst = Arc::new(vec![region(100)]);
            let rx = TcpReceiver::start(b, Arc::clone(&dst), hashes_for(&dst)).expect("start");
            a[0].write_all(&hdr.encode()).expect("write");
            let err = rx
                .wait_round(1, Duration::from_secs(10))
                .expect_err("must fail");
            assert!(matches!(err, TransportError::Protocol(_)), "{hdr:?}: {err}");
        }
    }

    #[test]
    fn channels_skip_rounds_that_went_over_another_transport() {
        use std::io::Write;
        let (mut a, b) = pairs(1);
        let dst = Arc::new(vec![region(10)]);
        let rx = TcpReceiver::start(b, Arc::clone(&dst), hashes_for(&dst)).expect("start");
        // Rounds 1-4 went over RDMA; this channel's first frame is round 5.
        for kind in [DataKind::Zero, DataKind::RoundEnd] {
            let count = 1;
            let h = DataHeader {
                kind,
                round: 5,
                region: 0,
                first: 2,
                count,
            };
            a[0].write_all(&h.encode()).expect("write");
        }
        let got = rx.wait_round(5, Duration::from_secs(10)).expect("round 5");
        assert_eq!(got.pages, 1);
        // A frame of an older round is refused.
        let h = DataHeader {
            kind: DataKind::Zero,
            round: 4,
            region: 0,
            first: 0,
            count: 1,
        };
        a[0].write_all(&h.encode()).expect("write");
        assert!(matches!(
            rx.wait_round(6, Duration::from_secs(10)),
            Err(TransportError::Protocol(_))
        ));
    }

    #[test]
    fn a_corrupted_page_is_reported_as_torn() {
        use std::io::Write;
        let (mut a, b) = pairs(1);
        let dst = Arc::new(vec![region(10)]);
        let rx = TcpReceiver::start(b, Arc::clone(&dst), hashes_for(&dst)).expect("start");
        let hdr = DataHeader {
            kind: DataKind::Pages,
            round: 1,
            region: 0,
            first: 4,
            count: 1,
        };
        let page = vec![9u8; PAGE];
        let wrong_hash = page_hash(&page) ^ 1;
        a[0].write_all(&hdr.encode()).expect("write");
        a[0].write_all(&wrong_hash.to_le_bytes()).expect("write");
        a[0].write_all(&page).expect("write");
        let end = DataHeader {
            kind: DataKind::RoundEnd,
            round: 1,
            region: 0,
            first: 0,
            count: 1,
        };
        a[0].write_all(&end.encode()).expect("write");
        let got = rx.wait_round(1, Duration::from_secs(10)).expect("round");
        assert_eq!(
            got.torn,
            vec![PageRange {
                region: 0,
                first: 4,
                count: 1
            }]
        );
    }

    #[test]
    fn a_dead_sender_is_reported() {
        let (a, b) = pairs(2);
        let dst = Arc::new(vec![region(10)]);
        let rx = TcpReceiver::start(b, Arc::clone(&dst), hashes_for(&dst)).expect("start");
        use std::io::Write;
        let mut s0 = a.into_iter().next().expect("stream");
        let hdr = DataHeader {
            kind: DataKind::Pages,
            round: 1,
            region: 0,
            first: 0,
            count: 2,
        };
        s0.write_all(&hdr.encode()).expect("write");
        s0.write_all(&[0u8; 100]).expect("write");
        drop(s0);
        let err = rx
            .wait_round(1, Duration::from_secs(10))
            .expect_err("must fail");
        assert!(matches!(err, TransportError::PeerGone(_)), "{err}");
    }
}
