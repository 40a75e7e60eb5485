//! The keeper: a small process that holds the source CH's migration connection through
//! the commit window, so that a source sidecar dying there cannot make the source CH
//! resume its VM while the destination may already run it.
//!
//! CH waits for the answer to its `Complete` forever, and resumes its VM on any error,
//! including its connection closing. Before the source sidecar carries `Complete` to the
//! destination it hands a duplicate of that connection to a keeper (`ferry ch keep`,
//! started in a session of its own so it outlives the sidecar). While the sidecar lives,
//! it answers CH itself and then tells the keeper `release`. If the sidecar dies, the
//! keeper's link to it ends and the keeper goes on holding the connection: the source CH
//! stays paused until `ferry recover <vm>` (after checking the destination) tells the
//! keeper to answer Ok (the source CH stops its VM for good) or, with `--abort`, Error
//! (the source CH resumes it).
//!
//! The keeper's socket: `hold` with the connection attached (`SCM_RIGHTS`), answered
//! `held`; then on that same link `release`. Later links: `answer ok` / `answer error`,
//! answered `answered`. Lines of text, one per message.

use std::io::{BufRead, BufReader, IoSlice, Write};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use anyhow::{bail, Context};
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};

use crate::wire::Response;

/// Sends `line` with `fd` attached.
fn send_fd(s: &UnixStream, line: &str, fd: RawFd) -> anyhow::Result<()> {
    let iov = [IoSlice::new(line.as_bytes())];
    let fds = [fd];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let n = sendmsg::<()>(s.as_raw_fd(), &iov, &cmsg, MsgFlags::MSG_NOSIGNAL, None)
        .context("handing the connection to the keeper")?;
    if n != line.len() {
        bail!("sent {n} of {} bytes to the keeper", line.len());
    }
    Ok(())
}

/// Receives a line (up to 64 bytes, one read) and the descriptor that came with it.
fn recv_fd(s: &UnixStream) -> anyhow::Result<(String, Option<OwnedFd>)> {
    let mut buf = [0u8; 64];
    let (n, fd) = crate::link::recv_with_fd(s, &mut buf).context("reading from the sidecar")?;
    Ok((String::from_utf8_lossy(&buf[..n]).trim().to_owned(), fd))
}

/// The keeper process: listens on `socket`, holds what the sidecar hands it, answers CH
/// when told. Returns when the connection was released or answered.
///
/// # Errors
///
/// The socket cannot be bound, or the first link does not hand a connection over.
pub fn run(socket: &Path) -> anyhow::Result<()> {
    let _ = std::fs::remove_file(socket);
    // Bound (and listening) under another name first, then renamed: the socket's path
    // appears only once connecting to it works (between bind and listen a connection is
    // refused, which a slow host hits).
    let binding = socket.with_extension("binding");
    let _ = std::fs::remove_file(&binding);
    let l = UnixListener::bind(&binding)
        .with_context(|| format!("binding the keeper socket {}", binding.display()))?;
    std::fs::rename(&binding, socket)
        .with_context(|| format!("naming the keeper socket {}", socket.display()))?;
    let result = serve(&l);
    let _ = std::fs::remove_file(socket);
    result
}

fn serve(l: &UnixListener) -> anyhow::Result<()> {
    let (link, _) = l.accept()?;
    let (line, fd) = recv_fd(&link)?;
    let ch = match (line.as_str(), fd) {
        // Dismissed: the migration ended before its decision.
        ("", None) => return Ok(()),
        // TCP (pre-copy) or Unix (post-copy's local mode): only written to.
        ("hold", Some(fd)) => std::fs::File::from(fd),
        _ => bail!("the first message was not a connection to hold"),
    };
    // From here on the keeper outlives its sidecar (it was started to end with it).
    // SAFETY: prctl with these arguments only changes this process's death signal.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, 0);
    }
    (&link).write_all(b"held\n")?;
    let mut lines = BufReader::new(&link).lines();
    match lines.next() {
        Some(Ok(l)) if l == "release" => return Ok(()),
        // The sidecar is gone (or spoke nonsense): hold on until told what to answer.
        _ => {}
    }
    loop {
        let (s, _) = l.accept()?;
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line)?;
        let answer = match line.trim() {
            "answer ok" => Response::OK,
            "answer error" => Response::ERROR,
            _ => continue,
        };
        (&ch).write_all(&answer.encode())?;
        (&s).write_all(b"answered\n")?;
        return Ok(());
    }
}

/// The sidecar's end: a keeper holding a duplicate of the source CH's connection.
pub struct Kept {
    link: UnixStream,
}

impl Kept {
    /// Hands `ch` (a duplicate of the source CH's main connection) to the keeper listening
    /// on `socket`; returns once the keeper holds it.
    ///
    /// # Errors
    ///
    /// No keeper there, or it did not confirm.
    pub fn hand_over(socket: &Path, ch: BorrowedFd<'_>) -> anyhow::Result<Self> {
        let link = UnixStream::connect(socket)
            .with_context(|| format!("connecting to the keeper at {}", socket.display()))?;
        send_fd(&link, "hold\n", ch.as_raw_fd())?;
        let mut line = String::new();
        BufReader::new(&link).read_line(&mut line)?;
        if line.trim() != "held" {
            bail!("the keeper answered {line:?}");
        }
        Ok(Self { link })
    }

    /// The sidecar answered CH itself: the keeper lets go and exits.
    pub fn release(self) {
        let _ = (&self.link).write_all(b"release\n");
    }
}

/// Tells the keeper on `socket` (its sidecar gone) to answer the source CH: Ok (it stops
/// its VM for good) or Error (it resumes it).
///
/// # Errors
///
/// No keeper there, or it did not confirm.
pub fn answer(socket: &Path, ok: bool) -> anyhow::Result<()> {
    let s = UnixStream::connect(socket)
        .with_context(|| format!("connecting to the keeper at {}", socket.display()))?;
    (&s).write_all(if ok {
        b"answer ok\n"
    } else {
        b"answer error\n"
    })?;
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line)?;
    if line.trim() != "answered" {
        bail!("the keeper answered {line:?}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::AsFd;

    fn tcp_pair() -> (std::net::TcpStream, std::net::TcpStream) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let a = std::net::TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (b, _) = l.accept().expect("accept");
        (a, b)
    }

    #[test]
    fn a_kept_connection_outlives_its_sidecar_and_is_answered_when_told() {
        let dir = std::env::temp_dir().join(format!("ferry-keeper-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let sock = dir.join("k.sock");
        // `ch` plays the source CH; `mine` is the sidecar's end of its connection.
        let (mut ch, mine) = tcp_pair();
        let keeper = {
            let sock = sock.clone();
            std::thread::spawn(move || run(&sock))
        };
        while !sock.exists() {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let kept = Kept::hand_over(&sock, mine.as_fd()).expect("held");
        // The sidecar dies: its link and its own copy of the connection close.
        drop(kept);
        drop(mine);
        // CH sees no end of its connection: nothing to read yet.
        ch.set_read_timeout(Some(std::time::Duration::from_millis(200)))
            .expect("timeout");
        let mut b = [0u8; 16];
        assert!(ch.read(&mut b).is_err(), "the connection must stay open");
        answer(&sock, false).expect("answered");
        ch.set_read_timeout(None).expect("timeout");
        ch.read_exact(&mut b).expect("CH gets an answer");
        assert_eq!(Response::decode(&b).expect("decodes"), Response::ERROR);
        keeper.join().expect("thread").expect("keeper ends");
        assert!(!sock.exists());
        let _ = std::fs::remove_dir_all(dir);
    }
}
