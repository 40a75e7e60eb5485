//! Peer authentication: mutual HMAC-SHA256 challenge-response over a shared key.
//!
//! ```text
//! connecting sidecar                      listening sidecar
//!   PeerHello{version, nonce_c}   ---->
//!                                 <----   PeerChallenge{version, nonce_l,
//!                                                HMAC(k, "ferry-listener" | nonce_c | nonce_l)}
//!   PeerAuth{HMAC(k, "ferry-connector" | nonce_l | nonce_c)}  ---->
//!                                 <----   PeerAuthOk   (or Refused, then close)
//! ```
//!
//! Both sides prove knowledge of the key before any capability or memory moves; each
//! proof is bound to both fresh nonces, so a recorded exchange cannot be replayed.
//! Data connections present `HMAC(k, "ferry-data" | session | channel)`.

use std::io::{Read, Write};
use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::frame::{read_msg, write_msg};
use crate::msg::{Msg, MAX_STR};
use crate::{unexpected, ProtoError, MIN_VERSION, VERSION};

/// Frame cap during the handshake: nothing before authentication may be large.
const HANDSHAKE_CAP: usize = MAX_STR + 64;

/// A shared key, at least 16 bytes.
#[derive(Clone)]
pub struct Key(Vec<u8>);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

impl Key {
    /// Shortest key accepted.
    pub const MIN_LEN: usize = 16;

    /// A key from bytes.
    ///
    /// # Errors
    ///
    /// [`ProtoError::WeakKey`] when shorter than [`Key::MIN_LEN`].
    pub fn new(bytes: Vec<u8>) -> Result<Self, ProtoError> {
        if bytes.len() < Self::MIN_LEN {
            return Err(ProtoError::WeakKey { len: bytes.len() });
        }
        Ok(Self(bytes))
    }

    /// Reads a key file (surrounding whitespace is ignored).
    ///
    /// # Errors
    ///
    /// [`ProtoError::Io`] when the file cannot be read, [`ProtoError::WeakKey`].
    pub fn from_file(path: &Path) -> Result<Self, ProtoError> {
        let raw = std::fs::read(path).map_err(ProtoError::io("read key file"))?;
        let text = raw.trim_ascii();
        Self::new(text.to_vec())
    }

    fn mac(&self, label: &[u8], parts: &[&[u8]]) -> Hmac<Sha256> {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&self.0)
            .expect("HMAC accepts keys of any length");
        m.update(label);
        for p in parts {
            m.update(p);
        }
        m
    }

    /// `HMAC(key, label | parts...)`.
    pub fn proof(&self, label: &[u8], parts: &[&[u8]]) -> [u8; 32] {
        self.mac(label, parts).finalize().into_bytes().into()
    }

    /// Constant-time check of a proof.
    pub fn verify(&self, label: &[u8], parts: &[&[u8]], proof: &[u8; 32]) -> bool {
        self.mac(label, parts).verify_slice(proof).is_ok()
    }
}

/// Fresh random bytes.
///
/// # Errors
///
/// [`ProtoError::Io`] when the OS has no randomness to give.
pub fn random<const N: usize>() -> Result<[u8; N], ProtoError> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(|e| ProtoError::Io {
        op: "getrandom",
        source: std::io::Error::from_raw_os_error(e.raw_os_error().unwrap_or(libc::EIO)),
    })?;
    Ok(b)
}

fn check_version(peer: u16) -> Result<(), ProtoError> {
    if (MIN_VERSION..=VERSION).contains(&peer) {
        Ok(())
    } else {
        Err(ProtoError::VersionMismatch {
            peer,
            min: MIN_VERSION,
            max: VERSION,
        })
    }
}

fn refuse<S: Write>(s: &mut S, err: ProtoError) -> ProtoError {
    // Best effort: the peer learns why before the connection closes.
    let _ = write_msg(
        s,
        &Msg::Refused {
            reason: err.to_string(),
        },
    );
    err
}

/// Runs the connecting side of the handshake.
///
/// # Errors
///
/// [`ProtoError::AuthFailed`] when the listener cannot prove the key,
/// [`ProtoError::Refused`] with the listener's reason, [`ProtoError::VersionMismatch`],
/// I/O and framing errors.
pub fn connect<S: Read + Write>(s: &mut S, key: &Key) -> Result<(), ProtoError> {
    let nonce_c: [u8; 32] = random()?;
    write_msg(
        s,
        &Msg::PeerHello {
            version: VERSION,
            nonce: nonce_c,
        },
    )?;
    let (version, nonce_l, proof) = match read_msg(s, HANDSHAKE_CAP)? {
        Msg::PeerChallenge {
            version,
            nonce,
            proof,
        } => (version, nonce, proof),
        other => return Err(unexpected("PeerChallenge", other)),
    };
    check_version(version).map_err(|e| refuse(s, e))?;
    if !key.verify(b"ferry-listener", &[&nonce_c, &nonce_l], &proof) {
        return Err(refuse(
            s,
            ProtoError::AuthFailed {
                reason: "the listening sidecar does not know the shared key",
            },
        ));
    }
    write_msg(
        s,
        &Msg::PeerAuth {
            proof: key.proof(b"ferry-connector", &[&nonce_l, &nonce_c]),
        },
    )?;
    match read_msg(s, HANDSHAKE_CAP)? {
        Msg::PeerAuthOk => Ok(()),
        other => Err(unexpected("PeerAuthOk", other)),
    }
}

/// Runs the listening side of the handshake.
///
/// # Errors
///
/// As [`connect`]; the peer is told why before the error returns.
pub fn accept<S: Read + Write>(s: &mut S, key: &Key) -> Result<(), ProtoError> {
    let (version, nonce_c) = match read_msg(s, HANDSHAKE_CAP)? {
        Msg::PeerHello { version, nonce } => (version, nonce),
        other => return Err(refuse(s, unexpected("PeerHello", other))),
    };
    accept_after_hello(s, key, version, nonce_c)
}

/// The listening side of the handshake after the caller read the `PeerHello` itself
/// (to tell control connections from data connections).
///
/// # Errors
///
/// As [`connect`]; the peer is told why before the error returns.
pub fn accept_after_hello<S: Read + Write>(
    s: &mut S,
    key: &Key,
    version: u16,
    nonce_c: [u8; 32],
) -> Result<(), ProtoError> {
    check_version(version).map_err(|e| refuse(s, e))?;
    let nonce_l: [u8; 32] = random()?;
    write_msg(
        s,
        &Msg::PeerChallenge {
            version: VERSION,
            nonce: nonce_l,
            proof: key.proof(b"ferry-listener", &[&nonce_c, &nonce_l]),
        },
    )?;
    let proof = match read_msg(s, HANDSHAKE_CAP)? {
        Msg::PeerAuth { proof } => proof,
        other => return Err(refuse(s, unexpected("PeerAuth", other))),
    };
    if !key.verify(b"ferry-connector", &[&nonce_l, &nonce_c], &proof) {
        return Err(refuse(
            s,
            ProtoError::AuthFailed {
                reason: "the connecting sidecar does not know the shared key",
            },
        ));
    }
    write_msg(s, &Msg::PeerAuthOk)
}

/// The proof a data connection presents for `channel` of `session`.
pub fn data_proof(key: &Key, session: &[u8; 16], channel: u16) -> [u8; 32] {
    key.proof(b"ferry-data", &[session, &channel.to_le_bytes()])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn run(kc: &[u8], kl: &[u8]) -> (Result<(), ProtoError>, Result<(), ProtoError>) {
        let (mut a, mut b) = UnixStream::pair().expect("pair");
        let kl = Key::new(kl.to_vec()).expect("key");
        let t = std::thread::spawn(move || accept(&mut b, &kl));
        let c = connect(&mut a, &Key::new(kc.to_vec()).expect("key"));
        drop(a);
        (c, t.join().expect("thread"))
    }

    #[test]
    fn same_key_authenticates_both_ways() {
        let (c, l) = run(b"0123456789abcdef", b"0123456789abcdef");
        assert!(c.is_ok(), "{c:?}");
        assert!(l.is_ok(), "{l:?}");
    }

    #[test]
    fn wrong_key_fails_on_both_sides_with_a_reason() {
        let (c, l) = run(b"0123456789abcdef", b"fedcba9876543210");
        assert!(matches!(c, Err(ProtoError::AuthFailed { .. })), "{c:?}");
        assert!(l.is_err());
    }

    #[test]
    fn short_keys_are_refused() {
        assert!(matches!(
            Key::new(b"short".to_vec()),
            Err(ProtoError::WeakKey { len: 5 })
        ));
    }

    #[test]
    fn wrong_version_is_refused_with_a_clear_message() {
        let (mut a, mut b) = UnixStream::pair().expect("pair");
        let key = Key::new(b"0123456789abcdef".to_vec()).expect("key");
        let k2 = key.clone();
        let t = std::thread::spawn(move || accept(&mut b, &k2));
        write_msg(
            &mut a,
            &Msg::PeerHello {
                version: 99,
                nonce: [0; 32],
            },
        )
        .expect("write");
        let reply = read_msg(&mut a, 4096).expect("reply");
        match reply {
            Msg::Refused { reason } => assert!(reason.contains("version 99"), "{reason}"),
            other => panic!("expected Refused, got {other:?}"),
        }
        assert!(matches!(
            t.join().expect("thread"),
            Err(ProtoError::VersionMismatch { peer: 99, .. })
        ));
    }

    #[test]
    fn a_large_frame_before_authentication_is_refused() {
        let (mut a, mut b) = UnixStream::pair().expect("pair");
        let key = Key::new(b"0123456789abcdef".to_vec()).expect("key");
        // The writer may see the connection close mid-frame; only the listener matters.
        let w = std::thread::spawn(move || {
            let _ = write_msg(
                &mut a,
                &Msg::State {
                    blob: vec![0; 1 << 20],
                },
            );
        });
        assert!(matches!(
            accept(&mut b, &key),
            Err(ProtoError::FrameTooLarge { .. })
        ));
        drop(b);
        w.join().expect("writer");
    }
}
