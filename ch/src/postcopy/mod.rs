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
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::link::{next_from_source, respond, FromSource, ToDest};
use crate::ram::{layout_of, Ram};
use crate::relay::{Failed, Hold};
use crate::wire::{Command, Request, Role, HEADER_LEN};

mod pages;
mod pull;
mod source;

use pages::{Moved, Pages, Via};
use pull::{encode_pull, lock, read_blob, write_blob, PULL_END, RDMA_OFFER};
pub use pull::{MAX_PULL, PAGE};
pub use source::{accept_local, serve_pulls, LocalSource, PullEnd, Replayed, Served};

/// Pages one bulk request asks for at most (2 MiB).
const BULK_PAGES: usize = 512;

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
        pages.wait_until(|| pages.all_landed(first..=last))?;
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
    let mut pulling = false;
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
                pulling = true;
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
        // Whatever ended a pull (the source gone, a connection cut, RDMA set-up failing on
        // a dead peer) says so first: the VM here lacks pages only the source had.
        Err(error) if complete_sent => Err(Failed {
            error: if pulling {
                error.context("the post-copy pull broke off")
            } else {
                error
            },
            unsettled: (!answered).then_some(source),
        }),
        Err(error) => Err(crate::relay::give_up(source, dest, error)),
    }
}

#[cfg(test)]
mod tests;
