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

/// The connection's smoothed round-trip time (`TCP_INFO`), once it carried some data.
pub fn rtt(s: &TcpStream) -> Option<Duration> {
    use std::os::fd::AsRawFd;
    // SAFETY: tcp_info is plain integers; all-zero is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` and `len` describe a writable buffer of the size given.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    (rc == 0 && info.tcpi_rtt > 0).then(|| Duration::from_micros(u64::from(info.tcpi_rtt)))
}

/// The largest send buffer the kernel's autotuning grows a TCP socket to
/// (`net.ipv4.tcp_wmem`'s third field; 4 MiB when it cannot be read).
pub fn autotuned_send_max() -> usize {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
        .ok()
        .and_then(|s| s.split_whitespace().nth(2)?.parse().ok())
        .unwrap_or(4 << 20)
}

/// The send buffer one of `streams` connections needs to keep a `link_bps` path with
/// round trip `rtt` full: twice its share of the bandwidth-delay product (data in flight
/// plus what waits for acknowledgement), at most 256 MiB. `None` when autotuning, which
/// grows a buffer up to `autotuned_max`, covers it: an explicit size would switch
/// autotuning off.
pub fn bdp_send_buffer(
    link_bps: u64,
    rtt: Duration,
    streams: u16,
    autotuned_max: usize,
) -> Option<usize> {
    let bdp = u128::from(link_bps) * rtt.as_micros() / 8 / 1_000_000;
    let want = (bdp * 2 / u128::from(streams.max(1))).min(256 << 20) as usize;
    (want > autotuned_max).then_some(want)
}

/// Sets the socket's send buffer to `bytes`, above `net.core.wmem_max` when the process
/// may (`SO_SNDBUFFORCE`, CAP_NET_ADMIN), and returns what the kernel granted (it reports
/// twice the size asked for, its bookkeeping included).
///
/// # Errors
///
/// The kernel refuses both options.
pub fn force_send_buffer(s: &TcpStream, bytes: usize) -> Result<usize, ProtoError> {
    use std::os::fd::AsRawFd;
    let v = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    for opt in [libc::SO_SNDBUFFORCE, libc::SO_SNDBUF] {
        // SAFETY: `v` is a live c_int of the size given.
        let rc = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&raw const v).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            return SockRef::from(s)
                .send_buffer_size()
                .map_err(ProtoError::io("SO_SNDBUF"));
        }
    }
    Err(ProtoError::io("SO_SNDBUF")(std::io::Error::last_os_error()))
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
    fn send_buffers_follow_the_bandwidth_delay_product_above_autotuning() {
        let ms = Duration::from_millis;
        // 10 Gb/s x 2 ms = 2.5 MB; 4 streams: 1.25 MB in flight each, 2.5 MB buffered:
        // under a 4 MiB autotuning ceiling, left alone.
        assert_eq!(bdp_send_buffer(10_000_000_000, ms(2), 4, 4 << 20), None);
        // 100 Gb/s x 2 ms over 4 streams: 12.5 MB each, above the ceiling.
        assert_eq!(
            bdp_send_buffer(100_000_000_000, ms(2), 4, 4 << 20),
            Some(12_500_000)
        );
        // A stock ceiling (tcp_wmem max 4 MiB) and one stream at 10 Gb/s x 5 ms.
        assert_eq!(
            bdp_send_buffer(10_000_000_000, ms(5), 1, 4 << 20),
            Some(12_500_000)
        );
        // Never more than 256 MiB, whatever the numbers.
        assert_eq!(
            bdp_send_buffer(u64::MAX, Duration::from_secs(1), 1, 0),
            Some(256 << 20)
        );
    }

    #[test]
    fn a_forced_send_buffer_is_granted_and_the_rtt_is_read() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let c = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (mut a, _) = l.accept().expect("accept");
        let mut c2 = c.try_clone().expect("clone");
        c2.write_all(&[1u8; 1000]).expect("write");
        let mut buf = [0u8; 1000];
        a.read_exact(&mut buf).expect("read");
        a.write_all(&[2u8; 10]).expect("answer");
        c2.read_exact(&mut buf[..10]).expect("read answer");
        assert!(rtt(&c).is_some_and(|r| r < Duration::from_secs(1)));
        let want = 16 << 20;
        let got = force_send_buffer(&c, want).expect("SO_SNDBUF");
        // As root (SO_SNDBUFFORCE) the kernel grants twice the size; otherwise at most
        // net.core.wmem_max doubled.
        let wmem_max: usize = std::fs::read_to_string("/proc/sys/net/core/wmem_max")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        assert!(got >= want.min(wmem_max), "granted {got}");
        assert!(autotuned_send_max() >= 4096);
    }

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
