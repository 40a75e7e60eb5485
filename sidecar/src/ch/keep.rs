//! The keeper of a CH migration's source CH connection, from the sidecar's side: where it
//! listens, starting it before the migration, dismissing it when it was never handed
//! anything (`ferry_ch::keeper` is the keeper itself).

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::context::Daemon;

/// Where the keeper of `vm_id`'s source CH connection listens.
pub fn keeper_path(d: &Daemon, vm_id: &str) -> PathBuf {
    d.cfg.state_dir.join(format!("ch-{vm_id}.keeper"))
}

/// Starts a keeper (`ferry ch keep`, in a session of its own so it outlives this
/// sidecar), before the migration starts: starting a process inside the downtime would
/// lengthen it. [`KeeperGuard`] ends one that was never handed anything.
pub(super) fn start_keeper(socket: &Path) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    let _ = std::fs::remove_file(socket);
    let mut c = std::process::Command::new(std::env::current_exe()?);
    c.args(["ch", "keep", "--socket"])
        .arg(socket)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null());
    let parent = i32::try_from(std::process::id()).context("pid")?;
    // SAFETY: setsid, sigemptyset, sigprocmask, prctl, getppid and _exit are
    // async-signal-safe and touch nothing of the parent.
    unsafe {
        c.pre_exec(move || {
            libc::setsid();
            // The daemon blocks the signals it waits for; the keeper takes them as usual.
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
            // Until it is handed a connection, the keeper ends with this sidecar (a
            // sidecar killed before its decision leaves no keeper behind); it clears this
            // once it holds one, and outlives the sidecar from then on.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    let mut child = c.spawn().context("starting the keeper")?;
    let end = Instant::now() + Duration::from_secs(5);
    while !socket.exists() {
        if Instant::now() > end || child.try_wait()?.is_some() {
            bail!("the keeper did not start");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    // Reaped by a thread: the keeper ends when released, answered or dismissed.
    std::thread::spawn(move || child.wait());
    Ok(())
}

/// A started keeper: one that was never handed the source CH's connection is dismissed
/// when this drops (a link that hands nothing over makes it exit).
pub(super) struct KeeperGuard<'a> {
    pub(super) socket: &'a Path,
    pub(super) handed: bool,
}

impl Drop for KeeperGuard<'_> {
    fn drop(&mut self) {
        if !self.handed {
            drop(UnixStream::connect(self.socket));
        }
    }
}
