//! Raw vectored I/O between sockets and guest memory, without forming Rust references
//! to memory the guest (or the NIC) may change.

use std::io;
use std::os::fd::RawFd;

/// Writes every byte described by `iov` to `fd`, advancing through partial writes.
///
/// # Safety
///
/// - Every `iovec` must describe memory valid for reads of `iov_len` bytes for the
///   duration of the call (guest RAM mappings that stay mapped; buffers we own).
pub unsafe fn writev_all(fd: RawFd, iov: &mut [libc::iovec]) -> io::Result<()> {
    let mut start = 0;
    while start < iov.len() {
        let cnt = (iov.len() - start).min(libc::UIO_MAXIOV as usize) as libc::c_int;
        // SAFETY: `iov[start..]` are valid iovecs (caller's obligation) and `cnt` does
        // not exceed them; the kernel only reads the memory they describe.
        let n = unsafe { libc::writev(fd, iov[start..].as_ptr(), cnt) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "socket accepted no bytes",
            ));
        }
        let mut n = n as usize;
        while n > 0 && start < iov.len() {
            let v = &mut iov[start];
            if n >= v.iov_len {
                n -= v.iov_len;
                start += 1;
            } else {
                // SAFETY: advancing within the same iovec's memory by less than its length.
                v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
                v.iov_len -= n;
                n = 0;
            }
        }
        while start < iov.len() && iov[start].iov_len == 0 {
            start += 1;
        }
    }
    Ok(())
}

/// Reads exactly `len` bytes from `fd` into `dst`.
///
/// # Safety
///
/// - `dst` must be valid for writes of `len` bytes, and nothing else may access those
///   bytes during the call.
pub unsafe fn read_exact_raw(fd: RawFd, dst: *mut u8, len: usize) -> io::Result<()> {
    let mut got = 0;
    while got < len {
        // SAFETY: `dst + got .. dst + len` is valid for writes (caller's obligation).
        let n = unsafe { libc::read(fd, dst.add(got).cast(), len - got) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "peer closed the data connection mid-frame",
            ));
        }
        got += n as usize;
    }
    Ok(())
}

/// An `iovec` for `len` bytes at `base`.
pub fn iovec(base: *const u8, len: usize) -> libc::iovec {
    libc::iovec {
        iov_base: base as *mut libc::c_void,
        iov_len: len,
    }
}
