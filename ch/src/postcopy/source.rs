//! The source side of a post-copy: what the source CH hands over in local mode, its
//! `Config` put back in front for the source half, and the page server that answers the
//! destination's pulls out of the source CH's memfds.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use anyhow::{bail, Context};

use super::pull::{
    encode_pull, read_blob, write_blob, DATA_MAP, MAX_PULL, PAGE, PULL_END, RDMA_OFFER,
};
use crate::link::{answer_start, read_request, respond};
use crate::ram::Ram;
use crate::wire::{Command, GpaRange};

/// Most RAM slots a source CH may hand over.
const MAX_SLOTS: usize = 4096;

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
    answer_start(s, &start)?;
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
