//! The daemon's life: one daemon per state directory and socket (`flock`ed lock files),
//! readiness and stopping told to systemd (`NOTIFY_SOCKET`), and a clean stop on SIGTERM
//! or SIGINT: no new migration starts, queued ones end "cancelled", running ones are
//! cancelled if they have not reached their commit decision and finished otherwise,
//! incoming ones are waited for, then the socket is removed.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::context::Daemon;

/// An exclusive lock on a file, held while this lives (the kernel drops it on exit).
#[derive(Debug)]
pub struct Lock {
    _file: File,
}

impl Lock {
    /// Takes the lock on `path` (created if missing) without waiting.
    ///
    /// # Errors
    ///
    /// Another process holds it (`what` says what the lock guards), or the file cannot be
    /// opened.
    pub fn take(path: &Path, what: &str) -> anyhow::Result<Self> {
        // Held through a read-only descriptor: an open writable file would keep the
        // state directory's file system from being remounted read-only.
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(false)
            .create(false)
            .open(path)
            .or_else(|_| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(path)
                    .and_then(|_| std::fs::File::open(path))
            })
            .with_context(|| format!("opening the lock file {}", path.display()))?;
        // SAFETY: flock on a file descriptor this function owns; no memory involved.
        let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if r != 0 {
            let pid = std::fs::read_to_string(path).unwrap_or_default();
            let pid = pid.trim();
            bail!(
                "another ferry daemon{} uses {what} ({} is locked): stop it first, or give this one its own --socket and --state-dir",
                if pid.is_empty() { String::new() } else { format!(" (pid {pid})") },
                path.display()
            );
        }
        // Ours now: say whose, for the next one that tries.
        std::fs::write(path, format!("{}\n", std::process::id()))
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(Self { _file: f })
    }
}

/// Tells systemd (when it started us with `NOTIFY_SOCKET`) `state`, e.g. `READY=1`.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sock = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("sd_notify: {e}");
            return;
        }
    };
    let bytes = path.as_encoded_bytes();
    let sent = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|a| sock.send_to_addr(state.as_bytes(), &a))
    } else {
        sock.send_to(state.as_bytes(), Path::new(&path))
    };
    if let Err(e) = sent {
        tracing::warn!("sd_notify {state}: {e}");
    }
}

/// Blocks SIGTERM and SIGINT in this thread and every thread it starts afterwards, so
/// that only [`wait_for_signal`] receives them. Call before any thread is spawned.
///
/// # Errors
///
/// The signal mask cannot be set.
pub fn block_signals() -> anyhow::Result<()> {
    let mut set = nix::sys::signal::SigSet::empty();
    set.add(nix::sys::signal::Signal::SIGTERM);
    set.add(nix::sys::signal::Signal::SIGINT);
    set.thread_block().context("blocking SIGTERM and SIGINT")?;
    Ok(())
}

/// Waits for SIGTERM or SIGINT (blocked by [`block_signals`]), then stops the daemon
/// cleanly and exits with status 0.
pub fn wait_for_signal(d: Arc<Daemon>) {
    let mut set = nix::sys::signal::SigSet::empty();
    set.add(nix::sys::signal::Signal::SIGTERM);
    set.add(nix::sys::signal::Signal::SIGINT);
    let sig = match set.wait() {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("waiting for signals: {e}; SIGTERM will not stop the daemon cleanly");
            return;
        }
    };
    tracing::info!(signal = %sig, "stopping: no new migrations; running ones finish or abort");
    notify("STOPPING=1");
    shutdown(&d);
    let _ = std::fs::remove_file(&d.cfg.socket);
    tracing::info!("stopped");
    std::process::exit(0);
}

/// How long a stop waits for migrations that passed their commit decision (they replay
/// it for the replay window) and for incoming ones.
fn stop_limit(d: &Daemon) -> Duration {
    d.cfg.replay_window + Duration::from_secs(60)
}

fn shutdown(d: &Daemon) {
    d.stopping.store(true, std::sync::atomic::Ordering::Release);
    let running = d.queue.close("the sidecar is shutting down");
    for job in &running {
        match job.cancel_running(Duration::from_secs(30)) {
            Ok(line) => tracing::info!(vm = %job.vm_id, "{line}"),
            Err(why) => {
                tracing::info!(vm = %job.vm_id, "not cancelled, waiting for it to finish: {why}")
            }
        }
    }
    let end = Instant::now() + stop_limit(d);
    loop {
        let (out, _) = d.queue.counts();
        let inc = d.incoming.load(std::sync::atomic::Ordering::Relaxed);
        let clients = d.clients.load(std::sync::atomic::Ordering::Acquire);
        if out == 0 && inc == 0 && clients == 0 {
            return;
        }
        if Instant::now() >= end {
            tracing::error!(
                outgoing = out,
                incoming = inc,
                "migrations still running after {} s; stopping anyway (their records settle them on restart)",
                stop_limit(d).as_secs()
            );
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_file_is_refused_with_the_holders_pid() {
        let dir = std::env::temp_dir().join(format!("ferry-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("test setup");
        let p = dir.join("x.lock");
        let first = Lock::take(&p, "this state dir").expect("test setup");
        let e = Lock::take(&p, "this state dir")
            .expect_err("must fail")
            .to_string();
        assert!(e.contains(&format!("pid {}", std::process::id())), "{e}");
        assert!(e.contains("this state dir"), "{e}");
        drop(first);
        assert!(Lock::take(&p, "this state dir").is_ok());
        let _ = std::fs::remove_dir_all(dir);
    }
}
