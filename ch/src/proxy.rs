//! The source half of a CH migration through Ferry: the source CH sends to Ferry (its main
//! connection, and with `connections=N` its memory connections), and Ferry carries every
//! request byte for byte to the destination half ([`crate::relay::relay`] on the other
//! host) over Ferry's own connections: the main connection over Ferry's control
//! connection, each memory connection over one of Ferry's data connections. Every answer
//! the source CH gets comes from the destination half, so a `Memory` is acknowledged only
//! once it landed there.
//!
//! Two points belong to Ferry rather than to the bytes: memory is paced (`pace` is called
//! with each range's bytes before they are carried), and before the source CH's
//! `Complete` is carried, `decide` records the commit decision. A failed decision answers
//! the source CH Error (it resumes its VM) and tells the destination half to abandon. Once
//! `Complete` was carried, a lost answer leaves the source CH waiting (paused) for whoever
//! settles the outcome ([`Failed::unsettled`]).

use std::io::{ErrorKind, Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{bail, Context};

use crate::link::{read_request, respond, CHECK_UNIT};
use crate::wire::{decode_ranges, Command, Request, Response, HEADER_LEN};
use ferry_engine::digest::page_hash;

/// Called with each piece of memory before it is carried; an error stops the migration
/// there (the operator cancelled it): the source CH's memory connection ends, and CH gives
/// the migration up with its VM still running.
pub type Pace<'a> = dyn Fn(u64) -> anyhow::Result<()> + Sync + 'a;

/// What the source half carried.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Carried {
    /// Memory connections the source CH opened.
    pub memory_connections: u64,
    /// Guest-memory bytes carried (all connections).
    pub memory_bytes: u64,
    /// `Memory` requests carried (all connections).
    pub memory_requests: u64,
}

/// Why the source half stopped.
#[derive(Debug)]
pub struct Failed<C> {
    /// What went wrong.
    pub error: anyhow::Error,
    /// `Complete` was carried and its answer lost: the source CH waits on this connection,
    /// VM paused, for whoever settles the outcome.
    pub unsettled: Option<C>,
}

impl<C> std::fmt::Display for Failed<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.error)?;
        if self.unsettled.is_some() {
            f.write_str(" (after Complete was carried: the source CH is left waiting, paused)")?;
        }
        Ok(())
    }
}

/// Copies exactly `n` bytes from `from` to `to`, calling `pace` per piece before it goes.
/// With `hashes`, each 4 KiB of it (the last piece may be shorter) is hashed into it.
fn carry(
    from: &mut impl Read,
    to: &mut impl Write,
    mut n: u64,
    pace: &Pace<'_>,
    mut hashes: Option<&mut Vec<u64>>,
) -> anyhow::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    while n > 0 {
        let k = usize::try_from(n.min(buf.len() as u64)).expect("at most 1 MiB");
        from.read_exact(&mut buf[..k])
            .context("reading from the source CH")?;
        if let Some(h) = hashes.as_deref_mut() {
            h.extend(buf[..k].chunks(CHECK_UNIT).map(page_hash));
        }
        pace(k as u64)?;
        to.write_all(&buf[..k])
            .context("writing to the destination half")?;
        n -= k as u64;
    }
    Ok(())
}

/// Carries one request (header and payload; `Memory`: its table and its bytes) from the
/// source CH to the destination half, and the answer back. Returns the memory bytes.
fn carry_request(
    ch: &mut (impl Read + Write),
    peer: &mut (impl Read + Write),
    req: &Request,
    pace: &Pace<'_>,
) -> anyhow::Result<u64> {
    let mut req = *req;
    req.version = if req.command == Command::Start {
        req.version
    } else {
        0
    };
    peer.write_all(&req.encode())
        .context("writing to the destination half")?;
    let mut memory = 0;
    if req.command == Command::Memory {
        let mut table = vec![0u8; usize::try_from(req.length).context("table too large")?];
        ch.read_exact(&mut table)
            .context("reading from the source CH")?;
        let ranges = decode_ranges(&table)?;
        peer.write_all(&table)
            .context("writing to the destination half")?;
        memory = ranges.iter().map(|r| r.length).sum();
        // Per-page checks: each range's bytes, then a hash per 4 KiB of every range
        // (`crate::link::land_memory` compares them with what landed).
        let mut hashes = Vec::new();
        for r in &ranges {
            carry(ch, peer, r.length, pace, Some(&mut hashes))?;
        }
        let trailer: Vec<u8> = hashes.iter().flat_map(|h| h.to_le_bytes()).collect();
        peer.write_all(&trailer)
            .context("writing to the destination half")?;
    } else {
        carry(ch, peer, req.length, &|_| Ok(()), None)?;
    }
    answer_back(peer, ch)?;
    Ok(memory)
}

/// Reads the destination half's answer and gives it to the source CH.
fn answer_back(peer: &mut impl Read, ch: &mut impl Write) -> anyhow::Result<()> {
    let mut h = [0u8; HEADER_LEN];
    peer.read_exact(&mut h)
        .context("waiting for the destination half's answer")?;
    let r = Response::decode(&h)?;
    if r.length != 0 {
        bail!(
            "the destination half answered with {} unexpected bytes",
            r.length
        );
    }
    ch.write_all(&h).context("answering the source CH")?;
    if r.status != crate::wire::Status::Ok {
        bail!("the destination half answered Error (its log says why: a page check, or a step its CH refused)");
    }
    Ok(())
}

/// Carries one of the source CH's memory connections over one of Ferry's data
/// connections until the source CH closes it.
fn carry_memory_connection(
    ch: &mut (impl Read + Write),
    peer: &mut (impl Read + Write),
    pace: &Pace<'_>,
) -> anyhow::Result<(u64, u64)> {
    let mut role = [0u8; 2];
    ch.read_exact(&mut role)
        .context("reading the connection's role")?;
    peer.write_all(&role)
        .context("writing to the destination half")?;
    let (mut requests, mut bytes) = (0, 0);
    loop {
        let mut first = [0u8; 1];
        match ch.read(&mut first) {
            Ok(0) => return Ok((requests, bytes)),
            Ok(_) => {}
            Err(e) => return Err(e).context("reading from the source CH"),
        }
        let mut h = [0u8; HEADER_LEN];
        h[0] = first[0];
        ch.read_exact(&mut h[1..])
            .context("reading from the source CH")?;
        let req = Request::decode(&h)?;
        if req.command != Command::Memory {
            bail!("{} on a memory connection", req.command.name());
        }
        bytes += carry_request(ch, peer, &req, pace)?;
        requests += 1;
    }
}

/// Runs the source half: `ch` is the source CH's main connection, `listener` (with
/// `connections=N`) where its memory connections arrive, `peer` Ferry's control connection
/// to the destination half and `data` Ferry's data connections (at least N; unused ones
/// are closed at the end). `pace` paces memory; `decide` records the commit decision
/// before `Complete` is carried; `carried_complete` runs once it was (before its answer).
///
/// # Errors
///
/// Whatever stopped the migration; see the module documentation for what the source CH
/// was told.
pub fn proxy<C, P, D>(
    mut ch: C,
    listener: Option<&TcpListener>,
    mut peer: P,
    data: Vec<D>,
    pace: &Pace<'_>,
    decide: impl FnOnce() -> anyhow::Result<()>,
    carried_complete: impl FnOnce(),
) -> Result<Carried, Failed<C>>
where
    C: Read + Write,
    P: Read + Write,
    D: Read + Write + Send,
{
    let mut carried = Carried::default();
    let mut complete_sent = false;
    let mut decide = Some(decide);
    let mut carried_complete = Some(carried_complete);
    let stop = AtomicBool::new(false);
    let result = std::thread::scope(|sc| -> anyhow::Result<()> {
        let stop = &stop;
        let pumps = listener.map(|l| {
            sc.spawn(move || -> anyhow::Result<Vec<_>> {
                l.set_nonblocking(true)?;
                let mut data = data.into_iter();
                let mut pumps = Vec::new();
                while !stop.load(Ordering::Acquire) {
                    match l.accept() {
                        Ok((mut s, _)) => {
                            s.set_nonblocking(false)?;
                            let mut d = data
                                .next()
                                .context("the source CH opened more memory connections than Ferry has data connections")?;
                            pumps.push(sc.spawn(move || carry_memory_connection(&mut s, &mut d, pace)));
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        Err(e) => return Err(e).context("accepting a CH memory connection"),
                    }
                }
                // Data connections CH did not use end here, before their role.
                drop(data);
                Ok(pumps)
            })
        });
        let mut pumps = pumps;
        let mut join_pumps = |carried: &mut Carried| -> anyhow::Result<()> {
            if let Some(p) = pumps.take() {
                stop.store(true, Ordering::Release);
                for pump in p.join().expect("acceptor thread")? {
                    let (requests, bytes) = pump.join().expect("memory pump")?;
                    carried.memory_connections += 1;
                    carried.memory_requests += requests;
                    carried.memory_bytes += bytes;
                }
            }
            Ok(())
        };
        let r = (|| loop {
            let req = read_request(&mut ch)?;
            match req.command {
                Command::Complete | Command::CompletePaused => {
                    let decided = decide.take().context("a second Complete")?();
                    if let Err(e) = decided {
                        let _ = peer.write_all(&Request::new(Command::Abandon, 0).encode());
                        return Err(e.context("the commit decision could not be recorded"));
                    }
                    complete_sent = true;
                    peer.write_all(&req.encode())
                        .context("writing to the destination half")?;
                    if let Some(f) = carried_complete.take() {
                        f();
                    }
                    answer_back(&mut peer, &mut ch)?;
                    return Ok(());
                }
                Command::State => {
                    // CH closed its memory connections before it snapshotted the VM.
                    join_pumps(&mut carried)?;
                    carry_request(&mut ch, &mut peer, &req, pace)?;
                }
                Command::Memory => {
                    carried.memory_bytes += carry_request(&mut ch, &mut peer, &req, pace)?;
                    carried.memory_requests += 1;
                }
                _ => {
                    carry_request(&mut ch, &mut peer, &req, pace)?;
                }
            }
        })();
        if r.is_err() && !complete_sent {
            // The source CH resumes on Error; its memory connections then close, and the
            // pumps end. The destination half abandons when Ferry's connections end.
            let _ = respond(&mut ch, false);
            // A memory connection's failure is the cause (CH closed its main connection
            // because of it): say that one.
            join_pumps(&mut carried)?;
        }
        stop.store(true, Ordering::Release);
        r
    });
    match result {
        Ok(()) => Ok(carried),
        Err(error) if complete_sent => Err(Failed {
            error,
            unsettled: Some(ch),
        }),
        Err(error) => Err(Failed {
            error,
            unsettled: None,
        }),
    }
}
