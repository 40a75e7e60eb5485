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

use std::os::unix::net::UnixStream;

use anyhow::{bail, Context};

use crate::link::{land_memory, next_from_source, respond, FromSource, ToDest};
use crate::ram::{layout_of, Ram};
use crate::wire::Command;

/// What a relayed migration did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Guest RAM of the VM.
    pub ram_bytes: u64,
    /// `Memory` requests landed.
    pub memory_requests: u64,
    /// Bytes landed in the memfds (pages sent more than once count each time).
    pub bytes_landed: u64,
    /// Whether the destination CH runs the VM (false: it stays paused, as asked).
    pub running: bool,
}

/// Why a relayed migration stopped.
#[derive(Debug)]
pub struct Failed {
    /// What went wrong.
    pub error: anyhow::Error,
    /// `Complete` went to the destination CH and its answer was lost: the VM may run
    /// there. The source CH was not answered and waits on this connection, VM paused (it
    /// waits forever); whoever settles the outcome answers it (Ok once the destination is
    /// known to run the VM, Error once it is known not to).
    pub unsettled: Option<UnixStream>,
}

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.error)?;
        if self.unsettled.is_some() {
            f.write_str(" (after Complete was sent: the source CH is left waiting, paused)")?;
        }
        Ok(())
    }
}

/// Relays the migration a source CH sends on `source`; `open_dest` connects to the
/// destination CH's `receive-migration` socket. Returns when the destination CH runs the
/// VM and the source CH was told so.
///
/// # Errors
///
/// Whatever stopped the migration. Before `Complete` reached the destination CH, the
/// source CH was answered Error (it resumes its VM) and the destination CH was told to
/// abandon, as far as their connections allowed; after, see [`Failed::unsettled`].
pub fn relay_local(
    mut source: UnixStream,
    vm_id: &str,
    open_dest: impl FnOnce() -> anyhow::Result<UnixStream>,
) -> Result<Report, Failed> {
    let mut report = Report::default();
    let mut open_dest = Some(open_dest);
    let mut dest: Option<(ToDest, Ram)> = None;
    let mut complete_sent = false;
    let result = (|| -> anyhow::Result<()> {
        loop {
            match next_from_source(&mut source)? {
                FromSource::Started => {}
                FromSource::Config(config) => {
                    let layout = layout_of(&config)?;
                    let ram = Ram::create(vm_id, &layout)?;
                    report.ram_bytes = ram.size();
                    let s = open_dest.take().context("a second Config")?()?;
                    let d = ToDest::open(s, &ram, &config)
                        .context("the destination CH refused the VM")?;
                    dest = Some((d, ram));
                    respond(&mut source, true)?;
                }
                FromSource::Memory(req) => {
                    let (_, ram) = dest.as_mut().context("Memory before Config")?;
                    // SAFETY: the destination CH has the memfds mapped but does not run
                    // the VM before Complete; nothing else in this process touches them.
                    let got = unsafe { land_memory(&mut source, &req, ram)? };
                    report.memory_requests += 1;
                    report.bytes_landed += got.bytes;
                    respond(&mut source, true)?;
                }
                FromSource::State(state) => {
                    let (d, _) = dest.as_mut().context("State before Config")?;
                    d.send(Command::State, &state)
                        .context("the destination CH could not restore the VM")?;
                    respond(&mut source, true)?;
                }
                FromSource::Complete { paused } => {
                    let (d, _) = dest.as_mut().context("Complete before Config")?;
                    let cmd = if paused {
                        Command::CompletePaused
                    } else {
                        Command::Complete
                    };
                    complete_sent = true;
                    d.send(cmd, &[])
                        .context("the destination CH did not confirm it started the VM")?;
                    report.running = !paused;
                    // The destination runs it: now, and only now, the source may stop.
                    respond(&mut source, true)?;
                    return Ok(());
                }
                FromSource::Abandoned => bail!("the source CH abandoned the migration"),
            }
        }
    })();
    match result {
        Ok(()) => Ok(report),
        Err(error) if complete_sent => Err(Failed {
            error,
            unsettled: Some(source),
        }),
        Err(error) => {
            // The source CH resumes on Error (or on the connection closing).
            let _ = respond(&mut source, false);
            if let Some((d, _)) = dest {
                d.abandon();
            }
            Err(Failed {
                error,
                unsettled: None,
            })
        }
    }
}
