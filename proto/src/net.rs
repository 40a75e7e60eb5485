//! Socket settings that make a dead peer visible in seconds.

use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::time::Duration;

use crate::ProtoError;

/// How long unacknowledged data may sit before the kernel gives up on the peer, and the
/// idle time before keepalive probes start: a dead or unreachable peer is noticed in
/// about this time (keepalive: idle + 3 probes 1 s apart).
pub const DEAD_PEER_AFTER: Duration = Duration::from_secs(5);

fn setsockopt(s: &TcpStream, level: i32, name: i32, value: i32) -> Result<(), ProtoError> {
    // SAFETY: `s` is an open socket for the duration of the call, and the option value
    // points to a live i32 whose size is passed alongside.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            level,
            name,
            (&value as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(ProtoError::Io {
            op: "setsockopt",
            source: std::io::Error::last_os_error(),
        })
    }
}

/// Sets `TCP_NODELAY`, `TCP_USER_TIMEOUT` and keepalive on a peer connection.
///
/// # Errors
///
/// [`ProtoError::Io`] when the kernel refuses an option.
pub fn tune_peer_socket(s: &TcpStream, dead_after: Duration) -> Result<(), ProtoError> {
    s.set_nodelay(true).map_err(ProtoError::io("TCP_NODELAY"))?;
    let ms = dead_after.as_millis().clamp(1000, i32::MAX as u128) as i32;
    setsockopt(s, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, ms)?;
    setsockopt(s, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
    let idle = (ms / 1000 - 3).max(1);
    setsockopt(s, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, idle)?;
    setsockopt(s, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 1)?;
    setsockopt(s, libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3)?;
    Ok(())
}

/// Sets the socket's send and receive buffer sizes (best effort; the kernel may clamp).
pub fn set_buffers(s: &TcpStream, bytes: i32) {
    let _ = setsockopt(s, libc::SOL_SOCKET, libc::SO_SNDBUF, bytes);
    let _ = setsockopt(s, libc::SOL_SOCKET, libc::SO_RCVBUF, bytes);
}
