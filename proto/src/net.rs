//! Socket settings that make a dead peer visible in seconds, and deadlines for whole
//! exchanges (a handshake must finish in time, however slowly its bytes trickle in).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use socket2::{SockRef, TcpKeepalive};

use crate::ProtoError;

/// How long unacknowledged data may sit before the kernel gives up on the peer, and the
/// idle time before keepalive probes start: a dead or unreachable peer is noticed in
/// about this time (keepalive: idle + 3 probes 1 s apart).
pub const DEAD_PEER_AFTER: Duration = Duration::from_secs(5);

/// Sets `TCP_NODELAY`, `TCP_USER_TIMEOUT` and keepalive on a peer connection.
///
/// # Errors
///
/// [`ProtoError::Io`] when the kernel refuses an option.
pub fn tune_peer_socket(s: &TcpStream, dead_after: Duration) -> Result<(), ProtoError> {
    let sock = SockRef::from(s);
    sock.set_tcp_nodelay(true)
        .map_err(ProtoError::io("TCP_NODELAY"))?;
    let dead_after = dead_after.max(Duration::from_secs(1));
    sock.set_tcp_user_timeout(Some(dead_after))
        .map_err(ProtoError::io("TCP_USER_TIMEOUT"))?;
    let idle = dead_after
        .saturating_sub(Duration::from_secs(3))
        .max(Duration::from_secs(1));
    let ka = TcpKeepalive::new()
        .with_time(idle)
        .with_interval(Duration::from_secs(1))
        .with_retries(3);
    sock.set_tcp_keepalive(&ka)
        .map_err(ProtoError::io("TCP keepalive"))
}

/// Sets the socket's send and receive buffer sizes (best effort; the kernel may clamp).
pub fn set_buffers(s: &TcpStream, bytes: usize) {
    let sock = SockRef::from(s);
    let _ = sock.set_send_buffer_size(bytes);
    let _ = sock.set_recv_buffer_size(bytes);
}

/// A stream whose read and write timeouts can be set (TCP and Unix sockets).
pub trait Timeouts {
    /// Sets both timeouts (`None`: block forever).
    ///
    /// # Errors
    ///
    /// The OS error.
    fn set_timeouts(&self, t: Option<Duration>) -> std::io::Result<()>;
}

impl Timeouts for TcpStream {
    fn set_timeouts(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.set_read_timeout(t)?;
        self.set_write_timeout(t)
    }
}

impl Timeouts for UnixStream {
    fn set_timeouts(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.set_read_timeout(t)?;
        self.set_write_timeout(t)
    }
}

/// A stream borrowed under a deadline: before every read and write the socket's timeout is
/// set to the time left, so a peer sending one byte every few seconds cannot stretch an
/// exchange past it. Past the deadline every call fails with `TimedOut`.
pub struct Deadline<'a, S: Timeouts> {
    stream: &'a mut S,
    end: Instant,
}

impl<'a, S: Timeouts> Deadline<'a, S> {
    /// Borrows `stream` until `end`.
    pub fn new(stream: &'a mut S, end: Instant) -> Self {
        Self { stream, end }
    }

    fn arm(&self) -> std::io::Result<()> {
        let left = self.end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "deadline passed",
            ));
        }
        self.stream.set_timeouts(Some(left))
    }

    /// Whether the deadline has passed.
    pub fn expired(&self) -> bool {
        Instant::now() >= self.end
    }
}

impl<S: Timeouts + Read> Read for Deadline<'_, S> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.arm()?;
        self.stream.read(buf)
    }
}

impl<S: Timeouts + Write> Write for Deadline<'_, S> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.arm()?;
        self.stream.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.stream.flush()
    }
}

/// Maps an error seen under a [`Deadline`] to [`ProtoError::Deadline`] when the deadline
/// passed (a socket timeout reports `WouldBlock` or `TimedOut`).
pub fn deadline_error(e: ProtoError, expired: bool, what: &'static str, secs: u64) -> ProtoError {
    match e {
        ProtoError::TimedOut { .. } => ProtoError::Deadline { what, secs },
        ProtoError::Io { ref source, .. }
            if expired
                || matches!(
                    source.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
        {
            ProtoError::Deadline { what, secs }
        }
        e => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::read_msg;
    use crate::peer::PeerMsg;

    #[test]
    fn a_trickling_peer_cannot_stretch_a_read_past_its_deadline() {
        let (mut a, mut b) = UnixStream::pair().expect("pair");
        let writer = std::thread::spawn(move || {
            // One byte every 100 ms: each read returns before any per-read timeout.
            for byte in [8u8, 0, 0, 0, 1, 0, b'F', b'P'] {
                if a.write_all(&[byte]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let t = Instant::now();
        let mut d = Deadline::new(&mut b, Instant::now() + Duration::from_millis(350));
        let r = read_msg::<PeerMsg, _>(&mut d, 64);
        let expired = d.expired();
        let e = deadline_error(r.expect_err("must time out"), expired, "handshake", 0);
        assert!(matches!(e, ProtoError::Deadline { .. }), "{e}");
        assert!(
            t.elapsed() < Duration::from_millis(600),
            "{:?}",
            t.elapsed()
        );
        drop(b);
        writer.join().expect("writer");
    }
}
