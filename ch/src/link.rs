//! The two ends Ferry speaks CH's migration protocol on: as the destination of a source
//! CH ([`FromSource`]: Ferry receives `Config`, `Memory`, `State` and `Complete`), and as
//! the source towards a destination CH ([`ToDest`]: Ferry sends `Start`, one `MemoryFd`
//! per RAM slot, `Config`, `State` and `Complete`, and the destination CH runs the VM
//! from Ferry's memfds).
//!
//! Reads are exact and unbuffered: a `MemoryFd`'s descriptor rides on its 4 payload bytes,
//! and a buffered reader would swallow them.

use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use anyhow::{bail, Context};
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

use crate::ram::Ram;
use crate::wire::{
    decode_ranges, Command, Request, Response, Status, CH_PROTOCOL_VERSION, HEADER_LEN,
};
use ferry_engine::digest::page_hash;

/// Connects to a Unix socket another process is setting up: its path may appear a moment
/// before it listens (bind, then listen), so a refused connection is tried again until
/// `within` has passed.
///
/// # Errors
///
/// Still refused (or missing) after `within`, or any other connect error.
pub fn connect_listening(
    path: &std::path::Path,
    within: std::time::Duration,
) -> std::io::Result<UnixStream> {
    let end = std::time::Instant::now() + within;
    loop {
        match UnixStream::connect(path) {
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
                ) && std::time::Instant::now() < end =>
            {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            r => return r,
        }
    }
}

/// Reads one request header.
///
/// # Errors
///
/// The connection failed or closed, or the header is not CH's.
pub fn read_request(s: &mut impl Read) -> anyhow::Result<Request> {
    let mut h = [0u8; HEADER_LEN];
    s.read_exact(&mut h).context("reading a CH request")?;
    Ok(Request::decode(&h)?)
}

/// Answers a request.
///
/// # Errors
///
/// The connection failed.
pub fn respond(s: &mut impl Write, ok: bool) -> anyhow::Result<()> {
    let r = if ok { Response::OK } else { Response::ERROR };
    s.write_all(&r.encode()).context("answering CH")?;
    Ok(())
}

/// Waits for the answer to a request; `Ok` only for an Ok without payload.
///
/// # Errors
///
/// The connection failed, CH answered Error, or the answer is not CH's.
pub fn expect_ok(s: &mut impl Read, what: Command) -> anyhow::Result<()> {
    let mut h = [0u8; HEADER_LEN];
    s.read_exact(&mut h)
        .with_context(|| format!("waiting for CH's answer to {}", what.name()))?;
    let r = Response::decode(&h)?;
    match (r.status, r.length) {
        (Status::Ok, 0) => Ok(()),
        (Status::Ok, n) => bail!("CH answered {} with {n} unexpected bytes", what.name()),
        (Status::Error, _) => bail!("CH answered Error to {}", what.name()),
    }
}

/// Reads a payload of `len` bytes (a `Config` or `State`; the header's cap was checked).
fn read_payload(s: &mut impl Read, len: u64) -> anyhow::Result<Vec<u8>> {
    let mut v = vec![0u8; usize::try_from(len).context("payload too large")?];
    s.read_exact(&mut v).context("reading a CH payload")?;
    Ok(v)
}

/// What a `Memory` request (or a memory connection) carried.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Landed {
    /// A memory connection CH used (it sent its role).
    pub used: bool,
    /// Ranges in its table.
    pub ranges: u64,
    /// Bytes written into the RAM.
    pub bytes: u64,
}

/// The unit of the per-page checks between Ferry's two halves: each 4 KiB of a range
/// (its last piece may be shorter) has an XXH3-64.
pub const CHECK_UNIT: usize = 4096;

/// Reads a `Memory` request's table and bytes (after its header) straight into `ram`.
/// `checked`: the source is Ferry's source half, which follows the bytes with a hash per
/// 4 KiB of every range (see [`CHECK_UNIT`]); what landed is compared with them.
///
/// # Errors
///
/// The connection failed, a range lies outside the VM's RAM (its bytes are not read: the
/// connection is then out of step and must be dropped), or a page landed differently from
/// what the source half read from the source CH.
///
/// # Safety
///
/// Nothing else may touch the table's ranges meanwhile: the destination CH is not
/// running the VM, and other writers (CH's other memory connections) hold disjoint ranges.
pub unsafe fn land_memory(
    s: &mut impl Read,
    req: &Request,
    ram: &Ram,
    checked: bool,
) -> anyhow::Result<Landed> {
    let table = read_payload(s, req.length)?;
    let ranges = decode_ranges(&table)?;
    let mut got = Landed::default();
    let mut hashes = Vec::new();
    for r in ranges {
        let Some((ptr, len)) = ram.range_ptr(r) else {
            bail!(
                "CH sent memory at {:#x}+{:#x}, outside the VM's RAM",
                r.gpa,
                r.length
            );
        };
        // SAFETY: inside the mapping (`range_ptr`); no one else touches these bytes now
        // (the caller's promise: CH's chunks of one round are disjoint and a round ends
        // only when every chunk was acknowledged).
        let dst = unsafe { std::slice::from_raw_parts_mut(ptr, len) };
        s.read_exact(dst).context("reading guest memory from CH")?;
        if checked {
            hashes.extend(dst.chunks(CHECK_UNIT).map(|c| (r.gpa, page_hash(c))));
        }
        got.ranges += 1;
        got.bytes += r.length;
    }
    if checked {
        let mut trailer = vec![0u8; hashes.len() * 8];
        s.read_exact(&mut trailer)
            .context("reading the source half's page checks")?;
        for (i, ((gpa, landed), sent)) in hashes.iter().zip(trailer.chunks_exact(8)).enumerate() {
            if landed.to_le_bytes() != sent {
                bail!(
                    "page check failed: piece {i} of the memory at {gpa:#x} landed differently from what the source sent"
                );
            }
        }
    }
    Ok(got)
}

/// Ferry as the destination of a source CH: what it sends, step by step.
#[derive(Debug)]
pub enum FromSource {
    /// `Start` (version checked, answered).
    Started,
    /// `Config`: the VM's configuration and layout (not yet answered).
    Config(Vec<u8>),
    /// `Memory`: a table and its bytes are waiting to be read (not yet answered).
    Memory(Request),
    /// `State`: the paused VM's state (not yet answered).
    State(Vec<u8>),
    /// `Complete` (`paused`: `CompletePaused`), not yet answered: the source CH waits
    /// for this answer with its VM paused, and resumes it on Error.
    Complete {
        /// The VM was paused when the migration began and stays paused.
        paused: bool,
    },
    /// `Abandon` (answered).
    Abandoned,
}

/// Answers a source CH's `Start`: Ok for CH's protocol version, else Error.
///
/// # Errors
///
/// Another version (answered Error), or the connection failed.
pub fn answer_start(s: &mut impl Write, start: &Request) -> anyhow::Result<()> {
    let ok = start.version == CH_PROTOCOL_VERSION;
    respond(s, ok)?;
    if !ok {
        bail!(
            "the source CH speaks migration protocol version {}; Ferry speaks {CH_PROTOCOL_VERSION}",
            start.version
        );
    }
    Ok(())
}

/// Reads the next step of a source CH.
///
/// # Errors
///
/// The connection failed, the version is not CH's, or a command a source never sends.
pub fn next_from_source(s: &mut (impl Read + Write)) -> anyhow::Result<FromSource> {
    let req = read_request(s)?;
    Ok(match req.command {
        Command::Start => {
            answer_start(s, &req)?;
            FromSource::Started
        }
        Command::Config => FromSource::Config(read_payload(s, req.length)?),
        Command::State => FromSource::State(read_payload(s, req.length)?),
        Command::Memory => FromSource::Memory(req),
        Command::Complete => FromSource::Complete { paused: false },
        Command::CompletePaused => FromSource::Complete { paused: true },
        Command::Abandon => {
            respond(s, true)?;
            FromSource::Abandoned
        }
        Command::MemoryFd | Command::PageFault => {
            respond(s, false)?;
            bail!("a source CH sent {} in pre-copy", req.command.name())
        }
    })
}

/// Serves one of CH's extra pre-copy connections (`connections=N`): the role, then
/// `Memory` requests, each landed in `ram` and acknowledged, until CH closes it. Returns
/// the bytes landed.
///
/// # Errors
///
/// Another role, another command, a range outside RAM, a broken connection.
///
/// # Safety
///
/// As [`land_memory`].
pub unsafe fn serve_memory_connection(
    s: &mut (impl Read + Write),
    ram: &Ram,
    checked: bool,
) -> anyhow::Result<Landed> {
    let mut role = [0u8; 2];
    s.read_exact(&mut role)
        .context("reading the connection's role")?;
    if crate::wire::Role::decode(role).ok() != Some(crate::wire::Role::PrecopyMemory) {
        bail!("a connection with role {role:?} during pre-copy");
    }
    let mut total = Landed {
        used: true,
        ..Landed::default()
    };
    loop {
        let mut h = [0u8; HEADER_LEN];
        // Closed between requests: CH is done with this connection. (Over TLS a peer that
        // closes without close_notify reads as UnexpectedEof; between requests that is the
        // same end: everything before it was acknowledged end to end.)
        match s.read(&mut h[..1]) {
            Ok(0) => return Ok(total),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(total),
            Err(e) => return Err(e).context("reading a CH request"),
        }
        s.read_exact(&mut h[1..]).context("reading a CH request")?;
        let req = Request::decode(&h)?;
        if req.command != Command::Memory {
            respond(s, false)?;
            bail!("{} on a memory connection", req.command.name());
        }
        // SAFETY: the caller's promise, passed on.
        let got = match unsafe { land_memory(s, &req, ram, checked) } {
            Ok(g) => g,
            Err(e) => {
                // CH gives the whole migration up on an Error, and resumes its VM.
                let _ = respond(s, false);
                return Err(e);
            }
        };
        total.ranges += got.ranges;
        total.bytes += got.bytes;
        respond(s, true)?;
    }
}

/// Receives up to `buf.len()` bytes in one `recvmsg` and the first descriptor that came
/// with them (any others are closed). Returns the bytes read and the descriptor.
///
/// # Errors
///
/// `recvmsg` failed.
pub fn recv_with_fd(s: &UnixStream, buf: &mut [u8]) -> anyhow::Result<(usize, Option<OwnedFd>)> {
    let mut iov = [IoSliceMut::new(buf)];
    let mut space = nix::cmsg_space!([RawFd; 4]);
    let msg = recvmsg::<()>(
        s.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .context("receiving a descriptor")?;
    let mut fd = None;
    for c in msg.cmsgs().context("control messages")? {
        if let ControlMessageOwned::ScmRights(list) = c {
            for raw in list {
                // SAFETY: the kernel just installed this descriptor in our table for us.
                let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                if fd.is_none() {
                    fd = Some(owned);
                }
            }
        }
    }
    Ok((msg.bytes, fd))
}

/// Ferry as the source towards a destination CH (`vm.receive-migration` on a Unix socket).
pub struct ToDest {
    s: UnixStream,
}

impl ToDest {
    /// Opens the migration: `Start`, then one `MemoryFd` per RAM slot, then `Config`, so
    /// the destination CH builds the VM on Ferry's memfds.
    ///
    /// # Errors
    ///
    /// The destination CH refused a step or the connection failed.
    pub fn open(s: UnixStream, ram: &Ram, config: &[u8]) -> anyhow::Result<Self> {
        let mut t = Self { s };
        t.send(Command::Start, &[])?;
        for (slot, fd) in ram.fds() {
            t.memory_fd(slot, fd)?;
        }
        t.send(Command::Config, config)?;
        Ok(t)
    }

    /// Sends a request with its payload and waits for Ok.
    ///
    /// # Errors
    ///
    /// The destination CH answered Error, or the connection failed.
    pub fn send(&mut self, command: Command, payload: &[u8]) -> anyhow::Result<()> {
        let mut req = Request::new(command, payload.len() as u64);
        req.version = CH_PROTOCOL_VERSION;
        self.s.write_all(&req.encode())?;
        self.s.write_all(payload)?;
        expect_ok(&mut self.s, command)
    }

    /// `MemoryFd`: the header alone, then the slot's 4 bytes with the memfd attached.
    fn memory_fd(&mut self, slot: u32, fd: BorrowedFd<'_>) -> anyhow::Result<()> {
        self.s
            .write_all(&Request::new(Command::MemoryFd, 4).encode())?;
        let bytes = slot.to_le_bytes();
        let iov = [IoSlice::new(&bytes)];
        let fds = [fd.as_raw_fd()];
        let cmsg = [ControlMessage::ScmRights(&fds)];
        let n = sendmsg::<()>(
            self.s.as_raw_fd(),
            &iov,
            &cmsg,
            MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .context("sending a memfd to the destination CH")?;
        if n != bytes.len() {
            bail!("sent {n} of the 4 bytes of MemoryFd");
        }
        expect_ok(&mut self.s, Command::MemoryFd)
    }

    /// Gives up: `Abandon` (the destination CH drops what it built).
    pub fn abandon(mut self) {
        let _ = self.send(Command::Abandon, &[]);
    }
}
