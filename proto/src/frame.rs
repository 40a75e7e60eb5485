//! Frames: an 8-byte header (`len: u32`, `tag: u16`, `magic: u16`, little-endian), then
//! `len` payload bytes. The magic names the protocol ([`crate::common::VMM_MAGIC`],
//! [`crate::common::CLI_MAGIC`], [`crate::common::PEER_MAGIC`]); the reader checks it and
//! caps `len` before allocating. On the Unix socket, file descriptors ride along with a
//! frame via `SCM_RIGHTS`.

use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

use crate::common::{decode_payload, encode_payload, protocol_of, Message, MAX_REGIONS};
use crate::ProtoError;

/// Bytes of a frame header.
pub const HEADER_LEN: usize = 8;

/// A frame read before its protocol is known (the Unix socket's first frame).
#[derive(Debug)]
pub struct RawFrame {
    /// The header's magic.
    pub magic: u16,
    /// The message tag.
    pub tag: u16,
    /// The payload.
    pub payload: Vec<u8>,
}

impl RawFrame {
    /// Decodes the frame as a message of `M`'s protocol.
    ///
    /// # Errors
    ///
    /// [`ProtoError::WrongProtocol`] for another protocol's frame, and decode errors.
    pub fn decode<M: Message>(&self) -> Result<M, ProtoError> {
        check_magic::<M>(self.magic)?;
        decode_payload(self.tag, &self.payload)
    }
}

fn header(magic: u16, tag: u16, len: usize) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..4].copy_from_slice(&(len as u32).to_le_bytes());
    h[4..6].copy_from_slice(&tag.to_le_bytes());
    h[6..].copy_from_slice(&magic.to_le_bytes());
    h
}

/// (magic, tag, len) of a header, with the magic known to be Ferry's and `len` capped.
fn parse_header(h: &[u8; HEADER_LEN], cap: usize) -> Result<(u16, u16, usize), ProtoError> {
    let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
    let tag = u16::from_le_bytes([h[4], h[5]]);
    let magic = u16::from_le_bytes([h[6], h[7]]);
    if protocol_of(magic).is_none() {
        return Err(ProtoError::BadMagic { magic });
    }
    if len > cap {
        return Err(ProtoError::FrameTooLarge {
            len: len as u64,
            cap: cap as u64,
        });
    }
    Ok((magic, tag, len))
}

fn check_magic<M: Message>(magic: u16) -> Result<(), ProtoError> {
    if magic == M::MAGIC {
        return Ok(());
    }
    Err(match protocol_of(magic) {
        Some(got) => ProtoError::WrongProtocol {
            expected: M::PROTOCOL,
            got,
        },
        None => ProtoError::BadMagic { magic },
    })
}

/// Writes one message as a frame.
///
/// # Errors
///
/// [`ProtoError::Io`] from the writer.
pub fn write_msg<M: Message, W: Write>(w: &mut W, msg: &M) -> Result<(), ProtoError> {
    let payload = encode_payload(msg);
    let h = header(M::MAGIC, msg.tag(), payload.len());
    let mut bufs = [IoSlice::new(&h), IoSlice::new(&payload)];
    write_all_vectored(w, &mut bufs[..], "write frame")?;
    w.flush().map_err(ProtoError::io("flush frame"))
}

/// Writes every byte of `bufs`, without copying them together.
fn write_all_vectored<W: Write>(
    w: &mut W,
    mut bufs: &mut [IoSlice<'_>],
    op: &'static str,
) -> Result<(), ProtoError> {
    while !bufs.is_empty() {
        let n = w.write_vectored(bufs).map_err(ProtoError::io(op))?;
        if n == 0 {
            return Err(ProtoError::Closed);
        }
        IoSlice::advance_slices(&mut bufs, n);
    }
    Ok(())
}

/// Reads one frame of any Ferry protocol, of at most `cap` payload bytes.
///
/// # Errors
///
/// [`ProtoError::Closed`] at a clean end of stream, [`ProtoError::Io`],
/// [`ProtoError::BadMagic`], [`ProtoError::FrameTooLarge`], [`ProtoError::Truncated`].
pub fn read_frame<R: Read>(r: &mut R, cap: usize) -> Result<RawFrame, ProtoError> {
    let mut h = [0u8; HEADER_LEN];
    read_full(r, &mut h, true)?;
    let (magic, tag, len) = parse_header(&h, cap)?;
    let mut payload = vec![0u8; len];
    read_full(r, &mut payload, false)?;
    Ok(RawFrame {
        magic,
        tag,
        payload,
    })
}

/// Reads one frame of at most `cap` payload bytes and decodes it as `M`.
///
/// # Errors
///
/// As [`read_frame`], plus [`ProtoError::WrongProtocol`] and decode errors.
pub fn read_msg<M: Message, R: Read>(r: &mut R, cap: usize) -> Result<M, ProtoError> {
    let mut h = [0u8; HEADER_LEN];
    read_full(r, &mut h, true)?;
    let (magic, tag, len) = parse_header(&h, cap)?;
    // Refuse another protocol's frame before reading (and allocating for) its payload.
    check_magic::<M>(magic)?;
    let mut payload = vec![0u8; len];
    read_full(r, &mut payload, false)?;
    decode_payload(tag, &payload)
}

fn read_full<R: Read>(r: &mut R, buf: &mut [u8], at_boundary: bool) -> Result<(), ProtoError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) if got == 0 && at_boundary => return Err(ProtoError::Closed),
            Ok(0) => return Err(ProtoError::Truncated { what: "frame" }),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(ProtoError::TimedOut { op: "read frame" })
            }
            Err(e) => {
                return Err(ProtoError::Io {
                    op: "read frame",
                    source: e,
                })
            }
        }
    }
    Ok(())
}

/// Sends a message with file descriptors attached (`SCM_RIGHTS`).
///
/// # Errors
///
/// [`ProtoError::Io`] from `sendmsg` or the following writes.
pub fn send_with_fds<M: Message>(
    sock: &UnixStream,
    msg: &M,
    fds: &[RawFd],
) -> Result<(), ProtoError> {
    if fds.is_empty() {
        let mut s = sock;
        return write_msg(&mut s, msg);
    }
    let payload = encode_payload(msg);
    let h = header(M::MAGIC, msg.tag(), payload.len());
    let mut iov = [IoSlice::new(&h), IoSlice::new(&payload)];
    let cmsg = [ControlMessage::ScmRights(fds)];
    let sent = loop {
        match sendmsg::<()>(sock.as_raw_fd(), &iov, &cmsg, MsgFlags::MSG_NOSIGNAL, None) {
            Ok(n) => break n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                return Err(ProtoError::Io {
                    op: "sendmsg with fds",
                    source: e.into(),
                })
            }
        }
    };
    // The descriptors went with the first byte; the rest (a state blob can be 64 MiB) is a
    // plain stream write from the same buffers.
    let mut rest = &mut iov[..];
    IoSlice::advance_slices(&mut rest, sent);
    let mut s = sock;
    write_all_vectored(&mut s, rest, "write frame rest")
}

/// Receives a frame of any Ferry protocol and the file descriptors that came with it.
///
/// # Errors
///
/// As [`read_frame`], plus [`ProtoError::TooManyFds`] when more descriptors arrive than a
/// VM may have regions (they are closed).
pub fn recv_frame_with_fds(
    sock: &UnixStream,
    cap: usize,
) -> Result<(RawFrame, Vec<OwnedFd>), ProtoError> {
    let mut h = [0u8; HEADER_LEN];
    let mut got = 0;
    let mut fds: Vec<OwnedFd> = Vec::new();
    while got < HEADER_LEN {
        let mut space = nix::cmsg_space!([RawFd; MAX_REGIONS]);
        let mut iov = [IoSliceMut::new(&mut h[got..])];
        let res = recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        );
        let m = match res {
            Ok(m) => m,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                return Err(ProtoError::Io {
                    op: "recvmsg",
                    source: e.into(),
                })
            }
        };
        let n = m.bytes;
        let truncated = m.flags.contains(MsgFlags::MSG_CTRUNC);
        for c in m.cmsgs().map_err(|e| ProtoError::Io {
            op: "read control messages",
            source: e.into(),
        })? {
            if let ControlMessageOwned::ScmRights(list) = c {
                for fd in list {
                    // SAFETY: the kernel just installed `fd` in this process for us
                    // (SCM_RIGHTS); nothing else owns it.
                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        if truncated || fds.len() > MAX_REGIONS {
            return Err(ProtoError::TooManyFds { got: fds.len() });
        }
        if n == 0 {
            return Err(if got == 0 {
                ProtoError::Closed
            } else {
                ProtoError::Truncated { what: "frame" }
            });
        }
        got += n;
    }
    let (magic, tag, len) = parse_header(&h, cap)?;
    let mut payload = vec![0u8; len];
    let mut s = sock;
    read_full(&mut s, &mut payload, false)?;
    Ok((
        RawFrame {
            magic,
            tag,
            payload,
        },
        fds,
    ))
}

/// Receives a message of `M`'s protocol and any file descriptors that came with it.
///
/// # Errors
///
/// As [`recv_frame_with_fds`], plus [`ProtoError::WrongProtocol`] and decode errors.
pub fn recv_with_fds<M: Message>(
    sock: &UnixStream,
    cap: usize,
) -> Result<(M, Vec<OwnedFd>), ProtoError> {
    let (frame, fds) = recv_frame_with_fds(sock, cap)?;
    Ok((frame.decode()?, fds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::CliMsg;
    use crate::common::{MAX_FRAME, PEER_MAGIC};
    use crate::vmm::VmmMsg;

    #[test]
    fn frames_round_trip_over_a_socket_with_fds() {
        let (a, b) = UnixStream::pair().expect("socketpair");
        let f = std::fs::File::open("/dev/null").expect("open");
        // Larger than a socket buffer: sendmsg takes part of it, the rest follows.
        let blob: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
        let want = blob.clone();
        let msg = VmmMsg::State { blob };
        let t = std::thread::spawn(move || {
            send_with_fds(&a, &msg, &[f.as_raw_fd(), f.as_raw_fd()]).expect("send");
            send_with_fds(&a, &VmmMsg::Ok, &[]).expect("send");
        });
        let (m, fds) = recv_with_fds::<VmmMsg>(&b, MAX_FRAME).expect("recv");
        assert!(matches!(m, VmmMsg::State { ref blob } if *blob == want));
        assert_eq!(fds.len(), 2);
        let (m, fds) = recv_with_fds::<VmmMsg>(&b, MAX_FRAME).expect("recv");
        assert_eq!(m, VmmMsg::Ok);
        assert!(fds.is_empty());
        t.join().expect("sender");
        assert!(matches!(
            recv_with_fds::<VmmMsg>(&b, MAX_FRAME),
            Err(ProtoError::Closed)
        ));
    }

    #[test]
    fn oversized_and_garbage_frames_are_refused_before_allocation() {
        let mut h = Vec::new();
        h.extend_from_slice(&u32::MAX.to_le_bytes());
        h.extend_from_slice(&6u16.to_le_bytes());
        h.extend_from_slice(&PEER_MAGIC.to_le_bytes());
        assert!(matches!(
            read_msg::<CliMsg, _>(&mut &h[..], 1024),
            Err(ProtoError::FrameTooLarge { .. })
        ));
        let http = b"GET / HTTP/1.1\r\n\r\n";
        assert!(matches!(
            read_msg::<CliMsg, _>(&mut &http[..], 1024),
            Err(ProtoError::BadMagic { .. })
        ));
        // A frame cut short.
        let mut v = Vec::new();
        write_msg(&mut v, &CliMsg::Refused { reason: "r".into() }).expect("vec write");
        assert!(matches!(
            read_msg::<CliMsg, _>(&mut &v[..v.len() - 1], 1024),
            Err(ProtoError::Truncated { .. })
        ));
        assert!(matches!(
            read_msg::<CliMsg, _>(&mut &v[..0], 1024),
            Err(ProtoError::Closed)
        ));
        // Another protocol's frame is refused before its payload is read.
        assert!(matches!(
            read_msg::<VmmMsg, _>(&mut &v[..], 1024),
            Err(ProtoError::WrongProtocol {
                expected: "VMM",
                got: "CLI"
            })
        ));
    }
}
