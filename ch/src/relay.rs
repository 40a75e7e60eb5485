//! One CH migration through Ferry's memory on one host: a source CH sends to Ferry, Ferry
//! lands every page in memfds it created from the VM's layout, and a destination CH runs
//! the VM from those memfds. This is the pre-copy path of the CH adapter with the two
//! sidecars' network left out; the adapter splits it at the network (the source half
//! reads from the source CH, the destination half owns the memfds).
//!
//! The order keeps exactly one VM: the destination CH is opened (`Start`, `MemoryFd`s,
//! `Config`) when the source's `Config` arrives, so a destination that cannot build the
//! VM is refused before any memory moves; each `Memory` is acknowledged only once its
//! bytes are in the memfds (CH's bandwidth and downtime estimates stay true); the source
//! CH's `State` is acknowledged once the destination CH restored it (paused); and the
//! source CH's `Complete` is answered Ok only after the destination CH runs the VM. Any
//! failure before that is answered Error (the source CH resumes its VM) and the
//! destination CH is told to `Abandon`.
//!
//! With `connections=N` (TCP) CH sends memory on N extra connections, in chunks of at most
//! 64 MiB, each acknowledged; the chunks of one round are disjoint and a round ends only
//! when all were acknowledged, so the connections land in parallel without overlapping.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{bail, Context};

use crate::link::{
    land_memory, next_from_source, respond, serve_memory_connection, FromSource, Landed, ToDest,
};
use crate::ram::{layout_of, Ram};
use crate::wire::Command;

/// What a relayed migration did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Guest RAM of the VM.
    pub ram_bytes: u64,
    /// `Memory` requests landed from the main connection.
    pub memory_requests: u64,
    /// Extra memory connections CH opened.
    pub memory_connections: u64,
    /// Bytes landed in the memfds (pages sent more than once count each time).
    pub bytes_landed: u64,
    /// Whether the destination CH runs the VM (false: it stays paused, as asked).
    pub running: bool,
}

/// Why a relayed migration stopped.
#[derive(Debug)]
pub struct Failed<S> {
    /// What went wrong.
    pub error: anyhow::Error,
    /// `Complete` went to the destination CH and its answer was lost: the VM may run
    /// there. The source CH was not answered and waits on this connection, VM paused (it
    /// waits forever); whoever settles the outcome answers it (Ok once the destination is
    /// known to run the VM, Error once it is known not to).
    pub unsettled: Option<S>,
}

impl<S> std::fmt::Display for Failed<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.error)?;
        if self.unsettled.is_some() {
            f.write_str(" (after Complete was sent: the source CH is left waiting, paused)")?;
        }
        Ok(())
    }
}

/// Called at named points of the destination half (`ch-dest-restored`: the destination
/// CH restored the VM, paused, and the source was not answered yet; `ch-dest-running`:
/// the destination CH runs it, the source not answered yet): the sidecar's fault
/// injection holds there in tests; otherwise it does nothing.
pub type Hold<'a> = &'a (dyn Fn(&'static str) + Sync);

/// Where a relayed migration's memory connections come from.
pub enum MemoryConnections<'a, D> {
    /// None: all memory comes on the main connection.
    None,
    /// CH opens its `connections=N` memory connections to this listener.
    Listener(&'a TcpListener),
    /// Already open (the source half's data connections, each carrying one of CH's memory
    /// connections, every `Memory` followed by the source half's page checks); one CH did
    /// not use ends at once.
    Given(Vec<D>),
}

/// Relays the migration a source CH sends on `source` (its main connection), its memory
/// connections coming as `extra` says. `open_dest`
/// connects to the destination CH's `receive-migration` socket; `hold` see [`Hold`]. Returns when the
/// destination CH runs the VM and the source CH was told so.
///
/// # Errors
///
/// Whatever stopped the migration. Before `Complete` reached the destination CH, the
/// source CH was answered Error (it resumes its VM) and the destination CH was told to
/// abandon, as far as their connections allowed; after, see [`Failed::unsettled`].
pub fn relay<S: Read + Write, D: Read + Write + Send>(
    mut source: S,
    extra: MemoryConnections<'_, D>,
    vm_id: &str,
    open_dest: impl FnOnce() -> anyhow::Result<UnixStream>,
    hold: Hold<'_>,
) -> Result<Report, Failed<S>> {
    let mut report = Report::default();
    let mut complete_sent = false;
    let mut dest: Option<ToDest> = None;
    // Given connections come from Ferry's source half, which checks every page it carries.
    let checked = matches!(extra, MemoryConnections::Given(_));
    let result = (|| -> anyhow::Result<()> {
        // Up to Config: the layout, the memfds, the destination CH opened on them.
        let (config, ram) = loop {
            match next_from_source(&mut source)? {
                FromSource::Started => {}
                FromSource::Config(config) => {
                    let layout = layout_of(&config)?;
                    break (config, Ram::create(vm_id, &layout)?);
                }
                FromSource::Abandoned => bail!("the source CH abandoned the migration"),
                other => bail!("the source CH sent {other:?} before its Config"),
            }
        };
        report.ram_bytes = ram.size();
        let s = open_dest()?;
        dest = Some(ToDest::open(s, &ram, &config).context("the destination CH refused the VM")?);
        let d = dest.as_mut().expect("just set");
        respond(&mut source, true)?;
        let stop = AtomicBool::new(false);
        std::thread::scope(|sc| {
            let ram = &ram;
            let stop = &stop;
            // For every memory connection below: CH's chunks of a round are disjoint,
            // rounds end at acknowledgement barriers, and the destination CH does not run
            // the VM before Complete, so the writes never overlap anything.
            let acceptor = match extra {
                MemoryConnections::None => None,
                MemoryConnections::Listener(l) => {
                    Some(sc.spawn(move || -> anyhow::Result<Vec<_>> {
                        l.set_nonblocking(true)?;
                        let mut workers = Vec::new();
                        while !stop.load(Ordering::Acquire) {
                            match l.accept() {
                                Ok((mut s, _)) => {
                                    s.set_nonblocking(false)?;
                                    workers.push(sc.spawn(move || {
                                        // SAFETY: see above.
                                        unsafe { serve_memory_connection(&mut s, ram, false) }
                                    }));
                                }
                                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                                    std::thread::sleep(Duration::from_millis(5));
                                }
                                Err(e) => {
                                    return Err(e).context("accepting a CH memory connection")
                                }
                            }
                        }
                        Ok(workers)
                    }))
                }
                MemoryConnections::Given(streams) => {
                    let workers: Vec<_> = streams
                        .into_iter()
                        .map(|mut s| {
                            sc.spawn(move || {
                                // SAFETY: see above.
                                unsafe { serve_memory_connection(&mut s, ram, true) }
                            })
                        })
                        .collect();
                    Some(sc.spawn(move || Ok(workers)))
                }
            };
            let mut acceptor = acceptor;
            // The memory connections' totals, once CH closed them (before its State).
            let mut join_extra = || -> anyhow::Result<Landed> {
                let mut total = Landed::default();
                if let Some(a) = acceptor.take() {
                    stop.store(true, Ordering::Release);
                    let workers = a.join().expect("acceptor thread")?;
                    for w in workers {
                        let got = w.join().expect("memory connection thread")?;
                        // A connection CH never used carried no role.
                        report.memory_connections += u64::from(got.used);
                        total.ranges += got.ranges;
                        total.bytes += got.bytes;
                    }
                }
                Ok(total)
            };
            let r = (|| loop {
                match next_from_source(&mut source)? {
                    FromSource::Memory(req) => {
                        // SAFETY: as for the memory connections: CH sends on the main
                        // connection only once its memory connections are idle or closed.
                        let got = unsafe { land_memory(&mut source, &req, ram, checked)? };
                        report.memory_requests += 1;
                        report.bytes_landed += got.bytes;
                        respond(&mut source, true)?;
                    }
                    FromSource::State(state) => {
                        report.bytes_landed += join_extra()?.bytes;
                        d.send(Command::State, &state)
                            .context("the destination CH could not restore the VM")?;
                        hold("ch-dest-restored");
                        respond(&mut source, true)?;
                    }
                    FromSource::Complete { paused } => {
                        let cmd = if paused {
                            Command::CompletePaused
                        } else {
                            Command::Complete
                        };
                        complete_sent = true;
                        d.send(cmd, &[])
                            .context("the destination CH did not confirm it started the VM")?;
                        report.running = !paused;
                        hold("ch-dest-running");
                        // The destination runs it: now, and only now, the source may stop.
                        respond(&mut source, true)?;
                        return Ok(());
                    }
                    FromSource::Abandoned => bail!("the source CH abandoned the migration"),
                    other => bail!("the source CH sent {other:?} after its Config"),
                }
            })();
            // Whatever ended the loop, the acceptor stops; memory connections end when CH
            // closes them (it does on its way to State, and when it gives up).
            stop.store(true, Ordering::Release);
            if r.is_err() {
                // A memory connection's failure is the cause (the source gave up because
                // of it): say that one.
                join_extra()?;
            }
            r
        })
    })();
    match result {
        Ok(()) => Ok(report),
        Err(error) if complete_sent => Err(Failed {
            error,
            unsettled: Some(source),
        }),
        Err(error) => Err(give_up(source, dest, error)),
    }
}

/// A migration that failed before `Complete` reached the destination CH: the source is
/// answered Error (a source CH resumes its VM on it, or on the connection closing) and the
/// destination CH, if it was opened, is told to abandon.
pub(crate) fn give_up<S: Write>(
    mut source: S,
    dest: Option<ToDest>,
    error: anyhow::Error,
) -> Failed<S> {
    let _ = respond(&mut source, false);
    if let Some(d) = dest {
        d.abandon();
    }
    Failed {
        error,
        unsettled: None,
    }
}
