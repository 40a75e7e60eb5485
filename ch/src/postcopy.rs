//! Post-copy of a CH VM through Ferry (`ferry migrate --postcopy`): the VM moves at once
//! and its memory follows after it runs at the destination.
//!
//! Source: the source CH sends in local mode (`local=on`, a Unix socket, shared-memory
//! VMs): `Start`, one `MemoryFd` per RAM slot, `Config`, then it pauses the VM and sends
//! `State` and `Complete`. The source sidecar keeps the memfds ([`accept_local`], mapped
//! by [`Ram::adopt`]), carries `Config`, `State` and `Complete` to the destination half
//! like any CH migration ([`crate::proxy`], the commit decision recorded before
//! `Complete`), and answers page requests from its data connections out of those memfds
//! ([`serve_pulls`]) until the destination has every page. The source CH exits once
//! answered Ok; the memfds live on in the sidecar until the pull ends.
//!
//! Destination ([`receive`]): empty memfds from `Config`'s layout go to a destination CH
//! restoring in post-copy mode (`MemoryFd` before `Config`, then its page-fault
//! connection), which registers them with userfaultfd and asks, on that connection, for
//! every page the VM (or the restore itself) touches before Ferry has it. Ferry pulls such
//! a page from the source into the memfd over a data connection of its own and answers Ok
//! (CH then maps it in place); once the VM runs, the other data connections pull
//! everything else in bulk. Every page is pulled once: a per-page state (missing,
//! pulling, landed) makes the fault path and the bulk path claim pages, and a page is
//! answered only once it landed, so a page the VM already wrote is never overwritten.
//!
//! Until the pull ends the VM depends on both hosts: losing the source sidecar, or the
//! link, loses the VM (CH ends its process when a page fault cannot be answered).
//!
//! A pull request on a data connection: `{u64 gpa, u64 length}` little-endian, answered by
//! exactly `length` bytes; `gpa = u64::MAX` (length 0) ends the connection: the
//! destination has every page; `gpa = u64::MAX - 1` asks for the data map (the source's
//! memfds' holes never cross the network: the destination zero-fills them).

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::link::{next_from_source, read_request, respond, FromSource, ToDest};
use crate::ram::{layout_of, Ram};
use crate::relay::{Failed, Hold};
use crate::wire::{Command, GpaRange, Request, Role, CH_PROTOCOL_VERSION, HEADER_LEN};

/// The unit of the pull: CH's fault granule on 4 KiB-page guests (a huge-page guest
/// faults whole huge pages, which are whole runs of these).
pub const PAGE: u64 = 4096;

/// Largest range one pull request may ask for.
pub const MAX_PULL: u64 = 64 << 20;

/// The `gpa` of the request that ends a pull connection.
const PULL_END: u64 = u64::MAX;

/// The `gpa` of the request for the source's data map: answered by a u64 count and that
/// many `{u64 gpa, u64 length}` ranges of guest RAM that hold data (the rest are holes of
/// the source's memfds, which read as zero: the destination fills them itself).
const DATA_MAP: u64 = u64::MAX - 1;

/// Most ranges a data map may hold.
const MAX_DATA_RANGES: u64 = 1 << 24;

/// The `gpa` of the request that opens RDMA READ for the pull: answered by the source's
/// RDMA offer (u32 length and bytes; length 0: none), then the destination's answer the
/// same way (length 0: declined), then one byte (1: the source's queue pairs are
/// connected). The `PULL_END` of that connection carries the bytes pulled over RDMA.
const RDMA_OFFER: u64 = u64::MAX - 2;

/// Largest RDMA offer or answer accepted.
const MAX_RDMA_BLOB: u32 = 1 << 20;

/// How long an RDMA READ may go without completing before the pull gives RDMA up and
/// goes on over TCP.
const RDMA_STALL: Duration = Duration::from_secs(5);

/// Pages one bulk request asks for at most (2 MiB).
const BULK_PAGES: usize = 512;

/// Most RAM slots a source CH may hand over.
const MAX_SLOTS: usize = 4096;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What the source CH handed over in local mode before it paused its VM.
pub struct LocalSource {
    /// Each RAM slot's memfd.
    pub fds: Vec<(u32, OwnedFd)>,
    /// `Config`'s JSON (its layout says where each slot lies).
    pub config: Vec<u8>,
    /// The `Config` request as it came, header and payload, not yet answered: to be
    /// carried on to the destination (see [`Replayed`]).
    pub config_request: Vec<u8>,
}

/// Receives the 4 payload bytes of a `MemoryFd` and the memfd riding on them.
fn recv_memory_fd(s: &UnixStream) -> anyhow::Result<(u32, OwnedFd)> {
    let mut buf = [0u8; 4];
    let (n, fd) =
        crate::link::recv_with_fd(s, &mut buf).context("receiving a memfd from the source CH")?;
    if n == 0 {
        bail!("the source CH closed its connection in a MemoryFd");
    }
    (&*s)
        .read_exact(&mut buf[n..])
        .context("reading a MemoryFd's slot")?;
    let fd = fd.context("a MemoryFd without a descriptor")?;
    Ok((u32::from_le_bytes(buf), fd))
}

/// Source side: takes a local-mode source CH's `Start` (answered) and `MemoryFd`s
/// (answered), and reads its `Config` (not answered).
///
/// # Errors
///
/// Another version, another command, a `MemoryFd` without its memfd, too many slots.
pub fn accept_local(s: &mut UnixStream) -> anyhow::Result<LocalSource> {
    let start = read_request(s)?;
    if start.command != Command::Start {
        respond(s, false)?;
        bail!("the source CH began with {}", start.command.name());
    }
    let ok = start.version == CH_PROTOCOL_VERSION;
    respond(s, ok)?;
    if !ok {
        bail!(
            "the source CH speaks migration protocol version {}; Ferry speaks {CH_PROTOCOL_VERSION}",
            start.version
        );
    }
    let mut fds = Vec::new();
    loop {
        let req = read_request(s)?;
        match req.command {
            Command::MemoryFd if req.length == 4 && fds.len() < MAX_SLOTS => {
                fds.push(recv_memory_fd(s)?);
                respond(s, true)?;
            }
            Command::Config => {
                if fds.is_empty() {
                    respond(s, false)?;
                    bail!("the source CH sent no memfd: post-copy needs local mode");
                }
                let mut config =
                    vec![0u8; usize::try_from(req.length).context("Config too large")?];
                s.read_exact(&mut config)
                    .context("reading the source CH's Config")?;
                let mut config_request = req.encode().to_vec();
                config_request.extend_from_slice(&config);
                return Ok(LocalSource {
                    fds,
                    config,
                    config_request,
                });
            }
            other => {
                respond(s, false)?;
                bail!(
                    "the source CH sent {} before its Config in local mode",
                    other.name()
                );
            }
        }
    }
}

/// The source CH's main connection with its `Config` request put back in front, for the
/// source half ([`crate::proxy::proxy`]) to carry; it notes when the source CH was
/// answered first (its `Config`: the VM pauses right after, so the downtime starts there).
pub struct Replayed {
    head: Vec<u8>,
    at: usize,
    s: UnixStream,
    first_answer: Arc<OnceLock<Instant>>,
}

impl Replayed {
    /// `head` first, then `s`.
    pub fn new(head: Vec<u8>, s: UnixStream) -> Self {
        Self {
            head,
            at: 0,
            s,
            first_answer: Arc::default(),
        }
    }

    /// When the source CH was first answered (set once it was).
    pub fn first_answer(&self) -> Arc<OnceLock<Instant>> {
        Arc::clone(&self.first_answer)
    }
}

impl From<Replayed> for OwnedFd {
    fn from(r: Replayed) -> Self {
        r.s.into()
    }
}

impl Read for Replayed {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.at < self.head.len() {
            let n = buf.len().min(self.head.len() - self.at);
            buf[..n].copy_from_slice(&self.head[self.at..self.at + n]);
            self.at += n;
            return Ok(n);
        }
        self.s.read(buf)
    }
}

impl Write for Replayed {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.first_answer.get_or_init(Instant::now);
        self.s.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.s.flush()
    }
}

/// How a pull connection ended at the source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PullEnd {
    /// The destination said it has every page.
    Done,
    /// The destination closed it without saying so.
    Closed,
}

fn encode_pull(gpa: u64, length: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..8].copy_from_slice(&gpa.to_le_bytes());
    h[8..].copy_from_slice(&length.to_le_bytes());
    h
}

/// How a pull connection served at the source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Served {
    /// How it ended.
    pub end: PullEnd,
    /// Bytes sent on it.
    pub tcp_bytes: u64,
    /// Bytes the destination pulled with RDMA READ through the export this connection
    /// opened (as the destination counted them at the end).
    pub rdma_bytes: u64,
    /// Whether it opened RDMA READ for the destination.
    pub rdma: bool,
}

fn read_blob(conn: &mut impl Read, what: &str) -> anyhow::Result<Vec<u8>> {
    let mut n = [0u8; 4];
    conn.read_exact(&mut n)
        .with_context(|| format!("reading the RDMA {what}"))?;
    let n = u32::from_le_bytes(n);
    if n > MAX_RDMA_BLOB {
        bail!("an RDMA {what} of {n} bytes");
    }
    let mut b = vec![0u8; n as usize];
    conn.read_exact(&mut b)
        .with_context(|| format!("reading the RDMA {what}"))?;
    Ok(b)
}

fn write_blob(conn: &mut impl Write, b: &[u8]) -> anyhow::Result<()> {
    let n = u32::try_from(b.len()).context("RDMA blob too large")?;
    let mut out = n.to_le_bytes().to_vec();
    out.extend_from_slice(b);
    conn.write_all(&out).context("sending an RDMA blob")
}

/// Source side: answers the destination's pull requests on one data connection out of
/// `ram` (the source CH's memfds) until it ends. `pace` is called with each answer's bytes
/// before they go. With `rdma_channels`, a destination that asks (`RDMA_OFFER`) gets the
/// memfds exported for RDMA READ (registered REMOTE_READ only, that many queue pairs),
/// kept until this connection ends; RDMA READs bypass `pace` (the source's CPU never
/// sees them). Without, or when no device works, it is told no.
///
/// # Errors
///
/// A range that is not whole pages inside the VM's RAM, or larger than [`MAX_PULL`]; a
/// memfd that shrank; a broken connection.
pub fn serve_pulls(
    conn: &mut (impl Read + Write),
    ram: &Ram,
    pace: &crate::proxy::Pace<'_>,
    rdma_channels: Option<usize>,
) -> anyhow::Result<Served> {
    let mut served = Served {
        end: PullEnd::Closed,
        tcp_bytes: 0,
        rdma_bytes: 0,
        rdma: false,
    };
    // Deregistered (the rkeys die) when this connection ends.
    let mut _export: Option<ferry_verbs::RdmaExport> = None;
    loop {
        let mut h = [0u8; 16];
        match conn.read(&mut h[..1]) {
            Ok(0) => return Ok(served),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(served),
            Err(e) => return Err(e).context("reading a pull request"),
        }
        conn.read_exact(&mut h[1..])
            .context("reading a pull request")?;
        let gpa = u64::from_le_bytes(h[..8].try_into().expect("8 bytes"));
        let length = u64::from_le_bytes(h[8..].try_into().expect("8 bytes"));
        if gpa == PULL_END {
            served.end = PullEnd::Done;
            if served.rdma {
                served.rdma_bytes = length;
            }
            return Ok(served);
        }
        if gpa == DATA_MAP {
            let map = ram.data_ranges()?;
            let mut out = Vec::with_capacity(8 + 16 * map.len());
            out.extend_from_slice(&(map.len() as u64).to_le_bytes());
            for r in &map {
                out.extend_from_slice(&encode_pull(r.gpa, r.length));
            }
            conn.write_all(&out).context("sending the data map")?;
            continue;
        }
        if gpa == RDMA_OFFER {
            let export = match rdma_channels.filter(|_| _export.is_none()) {
                Some(n) => ferry_verbs::RdmaExport::new(ram.regions(), n).ok(),
                None => None,
            };
            let Some(mut export) = export else {
                write_blob(conn, &[])?;
                continue;
            };
            write_blob(conn, &export.offer())?;
            let answer = read_blob(conn, "answer")?;
            if answer.is_empty() {
                // The destination could not use it.
                continue;
            }
            let ok = export.connect(&answer).is_ok();
            conn.write_all(&[u8::from(ok)]).context("confirming RDMA")?;
            if ok {
                served.rdma = true;
                _export = Some(export);
            }
            continue;
        }
        if length == 0
            || length > MAX_PULL
            || !gpa.is_multiple_of(PAGE)
            || !length.is_multiple_of(PAGE)
        {
            bail!("the destination asked for {length:#x} bytes at {gpa:#x}: not whole pages up to 64 MiB");
        }
        let Some((ptr, len)) = ram.range_ptr(GpaRange { gpa, length }) else {
            bail!("the destination asked for {gpa:#x}+{length:#x}, outside the VM's RAM");
        };
        pace(length)?;
        // SAFETY: inside the mapping (`range_ptr`); only read, and the source VM is paused
        // (local mode pauses it before its State, and the destination asks for nothing
        // before it restores that State).
        let bytes = unsafe { std::slice::from_raw_parts(ptr, len) };
        conn.write_all(bytes).context("sending pulled pages")?;
        if ram.faulted() {
            bail!("the source CH's memory shrank under Ferry: what was sent is void");
        }
        served.tcp_bytes += length;
    }
}

/// Destination side: asks the source (over `conn`) for RDMA READ of its RAM. Returns the
/// puller, or `None` with the reason when the source offers none or this host cannot use
/// it (the pull then goes over TCP).
///
/// # Errors
///
/// The connection failed, or the source's offer is not Ferry's.
fn open_rdma(
    conn: &mut (impl Read + Write),
    ram: &Ram,
) -> anyhow::Result<Result<ferry_verbs::RdmaPuller, String>> {
    conn.write_all(&encode_pull(RDMA_OFFER, 0))
        .context("asking the source for RDMA")?;
    let offer = read_blob(conn, "offer")?;
    if offer.is_empty() {
        return Ok(Err(
            "the source offers no RDMA (no device there, or --transport tcp)".into(),
        ));
    }
    match ferry_verbs::RdmaPuller::new(ram.regions(), &offer) {
        Ok((puller, answer)) => {
            write_blob(conn, &answer)?;
            let mut ok = [0u8; 1];
            conn.read_exact(&mut ok)
                .context("reading the RDMA confirmation")?;
            Ok(if ok[0] == 1 {
                Ok(puller)
            } else {
                Err("the source could not connect its queue pairs".into())
            })
        }
        Err(e) => {
            write_blob(conn, &[])?;
            Ok(Err(format!("no RDMA here: {e}")))
        }
    }
}

const MISSING: u8 = 0;
const PULLING: u8 = 1;
const LANDED: u8 = 2;
/// Missing, and a hole at the source: filled with zeros here, not pulled.
const HOLE: u8 = 3;
const FILLING: u8 = 4;

/// The destination's view of every page: missing, being pulled, or landed.
struct Pages {
    /// Per slot: first gpa, pages, index of its first page.
    slots: Vec<(u64, usize, usize)>,
    state: Vec<AtomicU8>,
    /// Pages not landed yet.
    missing: AtomicUsize,
    /// The next page the bulk pull looks at.
    next_bulk: AtomicUsize,
    /// A pull failed: waiters give up.
    broken: AtomicBool,
    wait: Mutex<()>,
    landed: Condvar,
}

impl Pages {
    fn new(ram: &Ram) -> anyhow::Result<Self> {
        let mut slots = Vec::new();
        let mut total = 0usize;
        for m in ram.layout() {
            let n = usize::try_from(m.size / PAGE).context("RAM too large")?;
            slots.push((m.gpa, n, total));
            total += n;
        }
        Ok(Self {
            slots,
            state: (0..total).map(|_| AtomicU8::new(MISSING)).collect(),
            missing: AtomicUsize::new(total),
            next_bulk: AtomicUsize::new(0),
            broken: AtomicBool::new(false),
            wait: Mutex::new(()),
            landed: Condvar::new(),
        })
    }

    fn total(&self) -> usize {
        self.state.len()
    }

    fn index(&self, gpa: u64) -> Option<usize> {
        self.slots.iter().find_map(|&(start, n, first)| {
            let off = gpa.checked_sub(start)?;
            let page = usize::try_from(off / PAGE).ok()?;
            (page < n).then_some(first + page)
        })
    }

    fn gpa(&self, i: usize) -> u64 {
        let &(start, _, first) = self
            .slots
            .iter()
            .rev()
            .find(|&&(_, _, first)| first <= i)
            .expect("page 0 is in the first slot");
        start + (i - first) as u64 * PAGE
    }

    /// Claims page `i` for this caller: `Some(hole)` if it was missing.
    fn claim(&self, i: usize) -> Option<bool> {
        let s = &self.state[i];
        if s.compare_exchange(MISSING, PULLING, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            return Some(false);
        }
        s.compare_exchange(HOLE, FILLING, Ordering::AcqRel, Ordering::Acquire)
            .ok()
            .map(|_| true)
    }

    /// Asks the source (over `conn`, before anything is pulled) which parts of RAM hold
    /// data; every other page becomes a hole, filled here. Returns the holes' bytes.
    fn learn_holes(&self, conn: &mut (impl Read + Write)) -> anyhow::Result<u64> {
        conn.write_all(&encode_pull(DATA_MAP, 0))
            .context("asking the source for its data map")?;
        let mut n = [0u8; 8];
        conn.read_exact(&mut n).context("reading the data map")?;
        let n = u64::from_le_bytes(n);
        if n > MAX_DATA_RANGES {
            bail!("the source's data map has {n} ranges");
        }
        let mut data = vec![false; self.total()];
        for _ in 0..n {
            let mut r = [0u8; 16];
            conn.read_exact(&mut r).context("reading the data map")?;
            let gpa = u64::from_le_bytes(r[..8].try_into().expect("8 bytes"));
            let length = u64::from_le_bytes(r[8..].try_into().expect("8 bytes"));
            let first = self
                .index(gpa)
                .filter(|_| gpa.is_multiple_of(PAGE) && length.is_multiple_of(PAGE))
                .context("the source's data map names pages outside the VM's RAM")?;
            let pages = usize::try_from(length / PAGE).context("range too large")?;
            for i in first..first.saturating_add(pages) {
                if i >= data.len() || self.gpa(i) != gpa + (i - first) as u64 * PAGE {
                    bail!("the source's data map runs past a RAM slot");
                }
                data[i] = true;
            }
        }
        let mut holes = 0;
        for (i, d) in data.iter().enumerate() {
            if !d
                && self.state[i]
                    .compare_exchange(MISSING, HOLE, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            {
                holes += 1;
            }
        }
        Ok(holes * PAGE)
    }

    fn land(&self, pages: &[usize]) {
        for &i in pages {
            self.state[i].store(LANDED, Ordering::Release);
        }
        self.missing.fetch_sub(pages.len(), Ordering::AcqRel);
        let _g = lock(&self.wait);
        self.landed.notify_all();
    }

    fn break_off(&self) {
        self.broken.store(true, Ordering::Release);
        let _g = lock(&self.wait);
        self.landed.notify_all();
    }

    /// Waits until `done` holds, or the pull broke off.
    fn wait_until(&self, done: impl Fn() -> bool) -> anyhow::Result<()> {
        let mut g = lock(&self.wait);
        loop {
            if done() {
                return Ok(());
            }
            if self.broken.load(Ordering::Acquire) {
                bail!("the pull from the source broke off");
            }
            g = self
                .landed
                .wait_timeout(g, Duration::from_millis(100))
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }

    /// Brings the claimed pages `pages` (ascending, each with whether it is a hole) in:
    /// a pull request over `conn` per run of data pages contiguous in guest-physical
    /// space, zeros written here for holes; marks them landed. Returns (bytes pulled,
    /// bytes zero-filled).
    fn pull<D: Read + Write>(
        &self,
        via: &Via<'_, D>,
        ram: &Ram,
        pages: &[(usize, bool)],
    ) -> anyhow::Result<Moved> {
        let mut moved = Moved::default();
        let mut at = 0;
        while at < pages.len() {
            let (i0, hole) = pages[at];
            let first = self.gpa(i0);
            let mut n = 1;
            while at + n < pages.len()
                && pages[at + n] == (i0 + n, hole)
                && self.gpa(i0 + n) == first + n as u64 * PAGE
            {
                n += 1;
            }
            let length = n as u64 * PAGE;
            let (ptr, len) = ram
                .range_ptr(GpaRange { gpa: first, length })
                .context("a page outside the VM's RAM")?;
            // SAFETY: inside the mapping; these pages are claimed (PULLING or FILLING): no
            // other puller writes them, and the destination CH maps a page only once Ferry
            // answered its fault, which it does only once the page landed.
            let dst = unsafe { std::slice::from_raw_parts_mut(ptr, len) };
            if hole {
                // Fresh memfd pages read as zero, but CH can map only pages that exist.
                dst.fill(0);
                moved.filled += length;
            } else if via.rdma_pull(ram, first, length)? {
                moved.rdma += length;
            } else {
                let mut c = lock(via.conn);
                c.write_all(&encode_pull(first, length))
                    .context("asking the source for pages")?;
                c.read_exact(dst).context("pulling pages from the source")?;
                moved.pulled += length;
            }
            let run: Vec<usize> = (i0..i0 + n).collect();
            self.land(&run);
            at += n;
        }
        Ok(moved)
    }
}

/// Bytes brought in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Moved {
    /// Pulled from the source over TCP.
    pulled: u64,
    /// Pulled from the source with RDMA READ.
    rdma: u64,
    /// Zero-filled here (holes at the source).
    filled: u64,
}

impl std::ops::AddAssign for Moved {
    fn add_assign(&mut self, o: Self) {
        self.pulled += o.pulled;
        self.rdma += o.rdma;
        self.filled += o.filled;
    }
}

/// How pages come from the source: over `conn` (TCP), or with RDMA READ while `rdma`
/// holds a working puller (shared by every puller; a failure drops it, and the pages it
/// did not confirm come over TCP).
struct Via<'a, D> {
    conn: &'a Mutex<D>,
    rdma: &'a Mutex<Option<ferry_verbs::RdmaPuller>>,
    /// Why RDMA was given up, if it was.
    rdma_lost: &'a Mutex<Option<String>>,
    /// Bytes RDMA moved (all pullers).
    rdma_moved: &'a AtomicU64,
}

impl<D> Via<'_, D> {
    /// Pulls `first`..+`length` with RDMA READ if a puller works; `false`: use TCP.
    fn rdma_pull(&self, ram: &Ram, first: u64, length: u64) -> anyhow::Result<bool> {
        let mut g = lock(self.rdma);
        let Some(p) = g.as_mut() else {
            return Ok(false);
        };
        let (region, page) = ram
            .region_page(GpaRange { gpa: first, length })
            .context("a page outside the VM's RAM")?;
        let range = ferry_engine::plan::PageRange {
            region,
            first: page,
            count: length / PAGE,
        };
        match p.pull(&[range], &|_| {}, RDMA_STALL) {
            Ok(_) => {
                self.rdma_moved.fetch_add(length, Ordering::AcqRel);
                Ok(true)
            }
            Err(e) => {
                // The puller destroyed its queue pairs: nothing more lands from it, so
                // these pages may come over TCP now.
                *g = None;
                *lock(self.rdma_lost) = Some(e.to_string());
                Ok(false)
            }
        }
    }
}

/// Serves the destination CH's page faults: each faulting page is pulled now over `conn`
/// unless it landed already or is being pulled (then it is waited for); the answer is Ok
/// without payload (the page is in CH's memfd; CH maps it). Returns the faults and what
/// they brought in when CH closes the connection: it has mapped every page.
fn serve_faults<D: Read + Write>(
    ch: &mut UnixStream,
    pages: &Pages,
    ram: &Ram,
    via: &Via<'_, D>,
) -> anyhow::Result<(u64, Moved)> {
    let (mut faults, mut bytes) = (0u64, Moved::default());
    loop {
        let mut h = [0u8; HEADER_LEN];
        match ch.read(&mut h[..1]) {
            Ok(0) => return Ok((faults, bytes)),
            Ok(_) => {}
            Err(e) => return Err(e).context("reading a page fault"),
        }
        ch.read_exact(&mut h[1..]).context("reading a page fault")?;
        let req = Request::decode(&h)?;
        if req.command != Command::PageFault || req.length != 16 {
            bail!(
                "the destination CH sent {} on its page-fault connection",
                req.command.name()
            );
        }
        let mut r = [0u8; 16];
        ch.read_exact(&mut r).context("reading a page fault")?;
        let gpa = u64::from_le_bytes(r[..8].try_into().expect("8 bytes"));
        let length = u64::from_le_bytes(r[8..].try_into().expect("8 bytes"));
        let (Some(first), Some(last)) = (
            pages.index(gpa),
            gpa.checked_add(length.saturating_sub(1))
                .and_then(|e| pages.index(e)),
        ) else {
            bail!("the destination CH faulted at {gpa:#x}+{length:#x}, outside the VM's RAM");
        };
        if length == 0 || !gpa.is_multiple_of(PAGE) || last - first + 1 != (length / PAGE) as usize
        {
            bail!("the destination CH faulted at {gpa:#x}+{length:#x}: not whole pages");
        }
        let claimed: Vec<(usize, bool)> = (first..=last)
            .filter_map(|i| pages.claim(i).map(|hole| (i, hole)))
            .collect();
        if !claimed.is_empty() {
            let pulled = pages.pull(via, ram, &claimed);
            match pulled {
                Ok(b) => bytes += b,
                Err(e) => {
                    pages.break_off();
                    return Err(e);
                }
            }
        }
        pages.wait_until(|| {
            (first..=last).all(|i| pages.state[i].load(Ordering::Acquire) == LANDED)
        })?;
        faults += 1;
        respond(ch, true)?;
    }
}

/// Pulls every page nobody claimed yet, in runs of up to [`BULK_PAGES`], over `conn`.
fn bulk<D: Read + Write>(via: &Via<'_, D>, pages: &Pages, ram: &Ram) -> anyhow::Result<Moved> {
    let mut bytes = Moved::default();
    loop {
        let start = pages.next_bulk.fetch_add(BULK_PAGES, Ordering::AcqRel);
        if start >= pages.total() {
            return Ok(bytes);
        }
        let end = (start + BULK_PAGES).min(pages.total());
        let claimed: Vec<(usize, bool)> = (start..end)
            .filter_map(|i| pages.claim(i).map(|hole| (i, hole)))
            .collect();
        if claimed.is_empty() {
            continue;
        }
        match pages.pull(via, ram, &claimed) {
            Ok(b) => bytes += b,
            Err(e) => {
                pages.break_off();
                return Err(e);
            }
        }
    }
}

/// What a post-copy migration did at the destination.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Guest RAM of the VM.
    pub ram_bytes: u64,
    /// Page faults the destination CH asked Ferry to serve.
    pub faults: u64,
    /// Bytes pulled for faults.
    pub fault_bytes: u64,
    /// Bytes pulled in bulk.
    pub bulk_bytes: u64,
    /// Bytes zero-filled here instead of pulled: holes of the source's memfds.
    pub zero_bytes: u64,
    /// Bytes pulled with RDMA READ (faults and bulk).
    pub rdma_bytes: u64,
    /// How the pull went: RDMA READ, or why over TCP.
    pub transport: String,
    /// From the destination CH running the VM to the last page landed.
    pub pull: Duration,
    /// Whether the destination CH runs the VM (false: it stays paused, as asked).
    pub running: bool,
}

/// The destination half of a post-copy migration: `source` carries the source CH's
/// requests (`Start`, `Config`, `State`, `Complete`) from the source half, `data` are
/// Ferry's data connections to the source sidecar's page servers (the first serves page
/// faults; the others, or the first when alone, pull in bulk), `open_dest` connects to the
/// destination CH's `receive-migration` socket (it must be in post-copy mode). `running`
/// is told when the destination CH runs the VM (the pull goes on after); `hold` see
/// [`Hold`]. Returns when
/// every page landed and the destination CH has mapped them all.
///
/// # Errors
///
/// Before `Complete` reached the destination CH: the source was answered Error (its CH
/// resumes the VM) and the destination CH abandoned. After: [`Failed::unsettled`] holds
/// the source when its answer was lost; a pull that broke off loses the VM (the
/// destination CH ends when a fault cannot be served).
pub fn receive<S: Read + Write, D: Read + Write + Send>(
    mut source: S,
    data: Vec<D>,
    vm_id: &str,
    open_dest: impl Fn() -> anyhow::Result<UnixStream>,
    running: impl FnOnce(),
    hold: Hold<'_>,
) -> Result<Report, Failed<S>> {
    let mut report = Report::default();
    let mut dest: Option<ToDest> = None;
    let mut complete_sent = false;
    let mut answered = false;
    let result = (|| -> anyhow::Result<()> {
        match next_from_source(&mut source)? {
            FromSource::Started => {}
            other => bail!("the source began with {other:?}"),
        }
        let config = match next_from_source(&mut source)? {
            FromSource::Config(c) => c,
            other => bail!("the source sent {other:?} before its Config"),
        };
        let layout = layout_of(&config)?;
        let ram = Ram::create(vm_id, &layout)?;
        report.ram_bytes = ram.size();
        let d = dest.insert(
            ToDest::open(open_dest()?, &ram, &config)
                .context("the destination CH refused the VM's configuration")?,
        );
        let mut fault =
            open_dest().context("opening the destination CH's page-fault connection")?;
        fault
            .write_all(&Role::PageFaults.encode())
            .context("opening the destination CH's page-fault connection")?;
        let fault_end = fault.try_clone()?;
        respond(&mut source, true)?;
        let pages = Pages::new(&ram)?;
        let conns: Vec<Mutex<D>> = data.into_iter().map(Mutex::new).collect();
        if conns.is_empty() {
            bail!("post-copy needs at least one data connection");
        }
        let rdma = Mutex::new(None);
        let rdma_lost = Mutex::new(None);
        let rdma_moved = AtomicU64::new(0);
        let via = |i: usize| Via {
            conn: &conns[i],
            rdma: &rdma,
            rdma_lost: &rdma_lost,
            rdma_moved: &rdma_moved,
        };
        std::thread::scope(|sc| -> anyhow::Result<()> {
            let fault_via = via(0);
            let (pages_r, ram_r) = (&pages, &ram);
            let faults = sc.spawn(move || serve_faults(&mut fault, pages_r, ram_r, &fault_via));
            let run = (|| -> anyhow::Result<Duration> {
                match next_from_source(&mut source)? {
                    FromSource::State(st) => {
                        // The source VM is paused now: which of its pages hold data is
                        // settled (the others are zero-filled here, not pulled).
                        report.zero_bytes = pages.learn_holes(&mut *lock(&conns[0]))?;
                        // The destination CH restores it with page faults served meanwhile.
                        d.send(Command::State, &st)
                            .context("the destination CH could not restore the VM")?;
                    }
                    other => bail!("the source sent {other:?} instead of its State"),
                }
                hold("ch-dest-restored");
                respond(&mut source, true)?;
                let paused = match next_from_source(&mut source)? {
                    FromSource::Complete { paused } => paused,
                    other => bail!("the source sent {other:?} instead of Complete"),
                };
                complete_sent = true;
                d.send(
                    if paused {
                        Command::CompletePaused
                    } else {
                        Command::Complete
                    },
                    &[],
                )
                .context("the destination CH did not confirm it started the VM")?;
                report.running = !paused;
                let t = Instant::now();
                hold("ch-dest-running");
                // The destination runs it: the source may stop (its memory stays with
                // its sidecar until the pull ends). A lost answer does not stop the pull.
                answered = respond(&mut source, true).is_ok();
                running();
                // RDMA READ, if both ends can, opened on the last connection (faults go
                // on over the first meanwhile): registering all of RAM takes a while, so
                // it happens now, with the VM running, not in the downtime.
                let last = conns.len() - 1;
                report.transport = match open_rdma(&mut *lock(&conns[last]), &ram)? {
                    Ok(p) => {
                        let d = format!("RDMA READ ({})", p.describe());
                        *lock(&rdma) = Some(p);
                        d
                    }
                    Err(why) => format!("TCP: {why}"),
                };
                let bulk_conns = if conns.len() > 1 {
                    1..conns.len()
                } else {
                    0..1
                };
                let (pages, ram, via) = (&pages, &ram, &via);
                let workers: Vec<_> = bulk_conns
                    .map(|i| sc.spawn(move || bulk(&via(i), pages, ram)))
                    .collect();
                for w in workers {
                    let m = w.join().expect("bulk pull thread")?;
                    report.bulk_bytes += m.pulled + m.rdma;
                    report.rdma_bytes += m.rdma;
                }
                pages.wait_until(|| pages.missing.load(Ordering::Acquire) == 0)?;
                let pull = t.elapsed();
                // The RDMA puller goes first (its queue pairs, then its registrations):
                // the source may deregister once told the pull ended.
                drop(lock(&rdma).take());
                if let Some(why) = lock(&rdma_lost).take() {
                    report.transport =
                        format!("{}, then TCP: RDMA failed: {why}", report.transport);
                }
                // Each connection's end (the source may let its memory go); the one that
                // opened RDMA carries what RDMA moved.
                let moved = rdma_moved.load(Ordering::Acquire);
                for (i, c) in conns.iter().enumerate() {
                    lock(c)
                        .write_all(&encode_pull(PULL_END, if i == last { moved } else { 0 }))
                        .context("telling the source the pull ended")?;
                }
                Ok(pull)
            })();
            if run.is_err() {
                pages.break_off();
                // Nothing more is served: CH's page-fault connection ends here.
                let _ = fault_end.shutdown(std::net::Shutdown::Both);
            }
            let served = faults.join().expect("page-fault thread");
            report.pull = run?;
            let (n, b) = served?;
            report.faults = n;
            report.fault_bytes = b.pulled + b.rdma;
            report.rdma_bytes += b.rdma;
            Ok(())
        })
    })();
    match result {
        Ok(()) if answered => Ok(report),
        Ok(()) => Err(Failed {
            error: anyhow::anyhow!("the VM runs here and every page landed, but the source's answer to Complete was lost"),
            unsettled: Some(source),
        }),
        Err(error) if complete_sent => Err(Failed {
            error,
            unsettled: (!answered).then_some(source),
        }),
        Err(error) => Err(crate::relay::give_up(source, dest, error)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ram::RamMapping;

    fn ram() -> Ram {
        Ram::create(
            "pc",
            &[
                RamMapping {
                    slot: 0,
                    gpa: 0,
                    size: 64 * PAGE,
                    file_offset: 0,
                },
                RamMapping {
                    slot: 1,
                    gpa: 1 << 32,
                    size: 16 * PAGE,
                    file_offset: 0,
                },
            ],
        )
        .expect("memfds")
    }

    #[test]
    fn pages_are_indexed_across_slots_and_claimed_once() {
        let r = ram();
        let p = Pages::new(&r).expect("pages");
        assert_eq!(p.total(), 80);
        assert_eq!(p.index(0), Some(0));
        assert_eq!(p.index(63 * PAGE), Some(63));
        assert_eq!(p.index(64 * PAGE), None, "the hole between the slots");
        assert_eq!(p.index(1 << 32), Some(64));
        assert_eq!(p.index((1 << 32) + 16 * PAGE), None);
        for i in [0, 63, 64, 79] {
            assert_eq!(p.index(p.gpa(i)), Some(i));
        }
        assert_eq!(p.claim(5), Some(false));
        assert_eq!(p.claim(5), None, "a page is claimed once");
        p.land(&[5]);
        assert_eq!(p.claim(5), None, "a landed page is never pulled again");
        assert_eq!(p.missing.load(Ordering::Acquire), 79);
    }

    /// The source's RAM of these tests: page `i` filled with `i + 1`, except pages 62 and
    /// 66, never written (holes of the memfd).
    fn source_ram() -> Ram {
        let src = ram();
        for i in (0..80u64).filter(|i| ![62, 66].contains(i)) {
            let (p, _) = src
                .range_ptr(GpaRange {
                    gpa: gpa_of(i),
                    length: PAGE,
                })
                .expect("in RAM");
            // SAFETY: this test is the only user.
            unsafe { std::ptr::write_bytes(p, i as u8 + 1, PAGE as usize) };
        }
        src
    }

    /// Checks that pages `pages` of `dst` hold what [`source_ram`] wrote.
    fn assert_landed(dst: &Ram, pages: std::ops::Range<u64>) {
        for i in pages {
            let (p, _) = dst
                .range_ptr(GpaRange {
                    gpa: gpa_of(i),
                    length: PAGE,
                })
                .expect("in RAM");
            // SAFETY: this test is the only user.
            let page = unsafe { std::slice::from_raw_parts(p, PAGE as usize) };
            let want = if [62, 66].contains(&i) {
                0
            } else {
                i as u8 + 1
            };
            assert!(page.iter().all(|&x| x == want), "page {i}");
        }
    }

    fn gpa_of(i: u64) -> u64 {
        if i < 64 {
            i * PAGE
        } else {
            (1 << 32) + (i - 64) * PAGE
        }
    }

    /// A pull over a socket pair: the destination learns the source's holes (pages 62
    /// and 66 never written there) and fills them itself; the data pages come over in runs
    /// split at the slot boundary and at the holes, each lands once with the source's
    /// bytes, and the end request ends the server cleanly.
    #[test]
    fn pulled_runs_land_the_sources_bytes_and_holes_are_filled_here() {
        let src = source_ram();
        let (a, mut b) = UnixStream::pair().expect("pair");
        let server = std::thread::spawn(move || {
            let got = serve_pulls(&mut b, &src, &|_| Ok(()), None);
            (got.map_err(|e| e.to_string()), src)
        });
        let a = Mutex::new(a);
        let dst = ram();
        let pages = Pages::new(&dst).expect("pages");
        assert_eq!(pages.learn_holes(&mut *lock(&a)).expect("map"), 2 * PAGE);
        // A source without RDMA says so; the pull goes over TCP.
        let why = open_rdma(&mut *lock(&a), &dst)
            .expect("asked")
            .expect_err("no RDMA");
        assert!(why.contains("offers no RDMA"), "{why}");
        let (rdma, lost, moved) = (Mutex::new(None), Mutex::new(None), AtomicU64::new(0));
        let via = Via {
            conn: &a,
            rdma: &rdma,
            rdma_lost: &lost,
            rdma_moved: &moved,
        };
        let claimed: Vec<(usize, bool)> = (60..70)
            .filter_map(|i| pages.claim(i).map(|h| (i, h)))
            .collect();
        assert_eq!(claimed.iter().filter(|c| c.1).count(), 2);
        let moved = pages.pull(&via, &dst, &claimed).expect("pulled");
        assert_eq!(
            moved,
            Moved {
                pulled: 8 * PAGE,
                rdma: 0,
                filled: 2 * PAGE
            }
        );
        lock(&a).write_all(&encode_pull(PULL_END, 0)).expect("end");
        let (got, _) = server.join().expect("server");
        assert_eq!(
            got,
            Ok(Served {
                end: PullEnd::Done,
                tcp_bytes: 8 * PAGE,
                rdma_bytes: 0,
                rdma: false
            })
        );
        assert_landed(&dst, 60..70);
        assert_eq!(pages.missing.load(Ordering::Acquire), 70);
    }

    /// Post-copy's pull over RDMA READ against a real device (the SoftRoCE guest of
    /// `scripts/rdma-tests.sh`): the source exports its memfds (REMOTE_READ) on the
    /// destination's asking, the first half of RAM comes with RDMA READ; then both queue
    /// pairs fail, the puller is dropped, and the second half comes over TCP. Every page
    /// lands once with the source's bytes, holes zero-filled, and the source is told what
    /// RDMA moved.
    #[test]
    #[ignore = "needs an RDMA device: scripts/rdma-tests.sh runs it in the SoftRoCE guest"]
    fn pages_come_with_rdma_read_and_over_tcp_once_rdma_fails() {
        if let Err(e) = ferry_verbs::Context::open_first() {
            panic!("this test needs an RDMA device: {e}");
        }
        let src = source_ram();
        let (a, mut b) = UnixStream::pair().expect("pair");
        let server = std::thread::spawn(move || {
            let got = serve_pulls(&mut b, &src, &|_| Ok(()), Some(2));
            (got.map_err(|e| e.to_string()), src)
        });
        let a = Mutex::new(a);
        let dst = ram();
        let pages = Pages::new(&dst).expect("pages");
        pages.learn_holes(&mut *lock(&a)).expect("map");
        let puller = open_rdma(&mut *lock(&a), &dst)
            .expect("asked")
            .unwrap_or_else(|why| panic!("no RDMA: {why}"));
        let (rdma, lost, moved) = (
            Mutex::new(Some(puller)),
            Mutex::new(None),
            AtomicU64::new(0),
        );
        let via = Via {
            conn: &a,
            rdma: &rdma,
            rdma_lost: &lost,
            rdma_moved: &moved,
        };
        let claim = |r: std::ops::Range<usize>| -> Vec<(usize, bool)> {
            r.filter_map(|i| pages.claim(i).map(|h| (i, h))).collect()
        };
        let first = pages.pull(&via, &dst, &claim(0..40)).expect("pulled");
        assert_eq!(first.rdma, 40 * PAGE, "{first:?}");
        assert_eq!(first.pulled, 0);
        for qp in 0..2 {
            lock(&rdma)
                .as_mut()
                .expect("puller")
                .inject_qp_failure(qp, 0);
        }
        let second = pages.pull(&via, &dst, &claim(40..80)).expect("pulled");
        assert!(lock(&rdma).is_none(), "a failed puller is dropped");
        assert!(lock(&lost).is_some());
        assert_eq!(second.filled, 2 * PAGE);
        assert_eq!(second.rdma + second.pulled, 38 * PAGE, "{second:?}");
        assert!(second.pulled > 0, "{second:?}");
        let by_rdma = moved.load(Ordering::Acquire);
        lock(&a)
            .write_all(&encode_pull(PULL_END, by_rdma))
            .expect("end");
        let (got, _) = server.join().expect("server");
        let got = got.expect("served");
        assert!(got.rdma && got.end == PullEnd::Done, "{got:?}");
        assert_eq!(got.rdma_bytes, by_rdma);
        assert_eq!(got.tcp_bytes, second.pulled);
        assert_landed(&dst, 0..80);
        assert_eq!(pages.missing.load(Ordering::Acquire), 0);
    }

    #[test]
    fn hostile_pull_requests_are_refused() {
        let src = ram();
        for (gpa, len) in [
            (0, 0),
            (1, PAGE),
            (0, PAGE + 1),
            (64 * PAGE, PAGE),
            (60 * PAGE, 8 * PAGE),
            (0, MAX_PULL + PAGE),
        ] {
            let (mut a, mut b) = UnixStream::pair().expect("pair");
            a.write_all(&encode_pull(gpa, len)).expect("request");
            let got = serve_pulls(&mut b, &src, &|_| Ok(()), None);
            assert!(got.is_err(), "{gpa:#x}+{len:#x}");
        }
        // Closed without the end request: said so, not an error of the server.
        let (a, mut b) = UnixStream::pair().expect("pair");
        drop(a);
        assert_eq!(
            serve_pulls(&mut b, &src, &|_| Ok(()), None)
                .expect("ends")
                .end,
            PullEnd::Closed
        );
    }
}
