//! Deadlines for whole exchanges on any socket: one thread shuts down a socket whose
//! deadline passed (its blocked reads and writes return at once), however the bytes of
//! the exchange trickled in. Handshakes on the peer port and first frames on the Unix
//! socket are armed with it, so a slow peer costs at most its slot for the deadline.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::Instant;

struct Entry {
    id: u64,
    end: Instant,
    fd: OwnedFd,
}

#[derive(Default)]
struct Inner {
    next: u64,
    armed: Vec<Entry>,
}

/// The process's watchdog (started on first use).
pub struct Watchdog {
    inner: Mutex<Inner>,
    changed: Condvar,
}

/// A deadline armed on a socket; disarmed on drop.
pub struct Armed {
    id: u64,
}

impl Drop for Armed {
    fn drop(&mut self) {
        let w = watchdog();
        let mut g = w.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.armed.retain(|e| e.id != self.id);
    }
}

/// The process's watchdog.
pub fn watchdog() -> &'static Watchdog {
    static W: OnceLock<&'static Watchdog> = OnceLock::new();
    W.get_or_init(|| {
        let w: &'static Watchdog = Box::leak(Box::new(Watchdog {
            inner: Mutex::new(Inner::default()),
            changed: Condvar::new(),
        }));
        std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || w.run())
            .expect("the watchdog thread starts at daemon start-up");
        w
    })
}

impl Watchdog {
    /// Shuts `sock` down at `end` unless the returned guard is dropped first.
    ///
    /// # Errors
    ///
    /// `dup` failing (out of file descriptors).
    pub fn arm(&self, sock: BorrowedFd<'_>, end: Instant) -> std::io::Result<Armed> {
        let fd = sock.try_clone_to_owned()?;
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.next += 1;
        let id = g.next;
        g.armed.push(Entry { id, end, fd });
        drop(g);
        self.changed.notify_all();
        Ok(Armed { id })
    }

    fn run(&self) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let now = Instant::now();
            g.armed.retain(|e| {
                if e.end > now {
                    return true;
                }
                // SAFETY: `e.fd` is an open descriptor of the socket (a dup we own);
                // shutdown changes the socket's state, not memory.
                unsafe { libc::shutdown(e.fd.as_fd().as_raw_fd(), libc::SHUT_RDWR) };
                false
            });
            let next = g.armed.iter().map(|e| e.end).min();
            g = match next {
                Some(t) => {
                    self.changed
                        .wait_timeout(g, t.saturating_duration_since(Instant::now()))
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
                None => self.changed.wait(g).unwrap_or_else(|p| p.into_inner()),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    #[test]
    fn a_blocked_read_ends_at_the_deadline_and_a_disarmed_one_does_not() {
        let (a, mut b) = UnixStream::pair().expect("pair");
        let t = Instant::now();
        let _armed = watchdog()
            .arm(b.as_fd(), Instant::now() + Duration::from_millis(200))
            .expect("arm");
        let mut buf = [0u8; 1];
        let n = b.read(&mut buf).unwrap_or(0);
        assert_eq!(n, 0, "the read ends with EOF after the shutdown");
        assert!(t.elapsed() >= Duration::from_millis(190) && t.elapsed() < Duration::from_secs(2));
        drop(a);

        let (a, b) = UnixStream::pair().expect("pair");
        let armed = watchdog()
            .arm(b.as_fd(), Instant::now() + Duration::from_millis(100))
            .expect("arm");
        drop(armed);
        std::thread::sleep(Duration::from_millis(300));
        let mut w = &a;
        std::io::Write::write_all(&mut w, b"x").expect("still open");
        let mut r = &b;
        let mut buf = [0u8; 1];
        assert_eq!(r.read(&mut buf).expect("read"), 1);
    }
}
