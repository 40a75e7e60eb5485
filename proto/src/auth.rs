//! `--insecure-psk` peer authentication: mutual HMAC-SHA256 challenge-response over a
//! shared key, and the binding of data connections to their control connection's session
//! (used in TLS mode too, with a key exported from the TLS connection).
//!
//! ```text
//! connecting sidecar                      listening sidecar
//!   PskHello{version, nonce_c}    ---->
//!                                 <----   PskChallenge{version, nonce_l}
//!   PskProof{HMAC(k, "ferry-connector" | nonce_l | nonce_c)}  ---->
//!                                 <----   PskWelcome{HMAC(k, "ferry-listener" | nonce_c | nonce_l)}
//!                                         (or Refused, then close)
//! session key = HMAC(k, "ferry-session" | nonce_c | nonce_l)
//! ```
//!
//! The connecting side proves itself first, so a peer without the key gets no proof over a
//! nonce of its choosing (nothing to test key guesses against offline). Each proof covers
//! both fresh nonces, so a recorded exchange cannot be replayed. Nothing after the
//! handshake is encrypted in this mode: that is why it must be chosen explicitly.
//!
//! Data connections: `DataHello{session, channel}`, then the listener's fresh
//! `DataChallenge{nonce}`, answered with `DataProof{HMAC(session key, "ferry-data" |
//! session | channel | nonce)}`: a proof seen once is worth nothing on another connection.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use ferry_engine::session::SessionId;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::common::MAX_STR;
use crate::frame::{read_msg, write_msg};
use crate::peer::{unexpected, PeerMsg};
use crate::{check_version, ProtoError, VERSION};

/// Frame cap during a handshake: nothing before authentication may be large.
pub const HANDSHAKE_CAP: usize = MAX_STR + 64;

/// A key both ends of a control connection share after its handshake; data connections
/// prove they belong to the session with it.
pub type SessionKey = [u8; 32];

/// A shared key, at least 16 bytes.
#[derive(Clone)]
pub struct Key(Vec<u8>);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

/// Refuses a secret file that its group or others may read or write.
///
/// # Errors
///
/// [`ProtoError::Io`] when it cannot be inspected, [`ProtoError::KeyFileMode`].
pub fn check_private(path: &Path) -> Result<(), ProtoError> {
    let mode = std::fs::metadata(path)
        .map_err(ProtoError::io("inspect key file"))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(ProtoError::KeyFileMode {
            path: path.display().to_string(),
            mode: mode & 0o7777,
        });
    }
    Ok(())
}

fn mac(key: &[u8], label: &[u8], parts: &[&[u8]]) -> Hmac<Sha256> {
    let mut m =
        <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC accepts keys of any length");
    m.update(label);
    for p in parts {
        m.update(p);
    }
    m
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

    /// Reads a key file (surrounding whitespace is ignored); refuses one that others may
    /// read.
    ///
    /// # Errors
    ///
    /// [`ProtoError::Io`], [`ProtoError::KeyFileMode`], [`ProtoError::WeakKey`].
    pub fn from_file(path: &Path) -> Result<Self, ProtoError> {
        check_private(path)?;
        let raw = std::fs::read(path).map_err(ProtoError::io("read key file"))?;
        Self::new(raw.trim_ascii().to_vec())
    }

    /// `HMAC(key, label | parts...)`.
    pub fn proof(&self, label: &[u8], parts: &[&[u8]]) -> [u8; 32] {
        mac(&self.0, label, parts).finalize().into_bytes().into()
    }

    /// Constant-time check of a proof.
    pub fn verify(&self, label: &[u8], parts: &[&[u8]], proof: &[u8; 32]) -> bool {
        mac(&self.0, label, parts).verify_slice(proof).is_ok()
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

/// Tells the peer why (best effort) and returns the error.
pub fn refuse<S: Write>(s: &mut S, err: ProtoError) -> ProtoError {
    let _ = write_msg(
        s,
        &PeerMsg::Refused {
            reason: err.to_string(),
        },
    );
    err
}

/// Runs the connecting side of the handshake; returns the session key.
///
/// # Errors
///
/// [`ProtoError::AuthFailed`] when the listener cannot prove the key,
/// [`ProtoError::Refused`] with the listener's reason, [`ProtoError::VersionMismatch`],
/// I/O and framing errors.
pub fn connect<S: Read + Write>(s: &mut S, key: &Key) -> Result<SessionKey, ProtoError> {
    let nonce_c: [u8; 32] = random()?;
    write_msg(
        s,
        &PeerMsg::PskHello {
            version: VERSION,
            nonce: nonce_c,
        },
    )?;
    let (version, nonce_l) = match read_msg(s, HANDSHAKE_CAP)? {
        PeerMsg::PskChallenge { version, nonce } => (version, nonce),
        other => return Err(unexpected("PskChallenge", other)),
    };
    check_version(version).map_err(|e| refuse(s, e))?;
    write_msg(
        s,
        &PeerMsg::PskProof {
            proof: key.proof(b"ferry-connector", &[&nonce_l, &nonce_c]),
        },
    )?;
    let proof = match read_msg(s, HANDSHAKE_CAP)? {
        PeerMsg::PskWelcome { proof } => proof,
        other => return Err(unexpected("PskWelcome", other)),
    };
    if !key.verify(b"ferry-listener", &[&nonce_c, &nonce_l], &proof) {
        return Err(ProtoError::AuthFailed {
            reason: "the listening sidecar does not know the shared key",
        });
    }
    Ok(key.proof(b"ferry-session", &[&nonce_c, &nonce_l]))
}

/// The listening side of the handshake after the caller read the `PskHello` itself (to
/// tell it from other first messages); returns the session key.
///
/// # Errors
///
/// As [`connect`]; the peer is told why before the error returns.
pub fn accept_after_hello<S: Read + Write>(
    s: &mut S,
    key: &Key,
    version: u16,
    nonce_c: [u8; 32],
) -> Result<SessionKey, ProtoError> {
    check_version(version).map_err(|e| refuse(s, e))?;
    let nonce_l: [u8; 32] = random()?;
    write_msg(
        s,
        &PeerMsg::PskChallenge {
            version: VERSION,
            nonce: nonce_l,
        },
    )?;
    let proof = match read_msg(s, HANDSHAKE_CAP)? {
        PeerMsg::PskProof { proof } => proof,
        other => return Err(refuse(s, unexpected("PskProof", other))),
    };
    if !key.verify(b"ferry-connector", &[&nonce_l, &nonce_c], &proof) {
        return Err(refuse(
            s,
            ProtoError::AuthFailed {
                reason: "the connecting sidecar does not know the shared key",
            },
        ));
    }
    write_msg(
        s,
        &PeerMsg::PskWelcome {
            proof: key.proof(b"ferry-listener", &[&nonce_c, &nonce_l]),
        },
    )?;
    Ok(key.proof(b"ferry-session", &[&nonce_c, &nonce_l]))
}

/// The proof a data connection gives for `channel` of `session`, over the listener's
/// fresh `nonce`.
pub fn data_proof(
    key: &SessionKey,
    session: &SessionId,
    channel: u16,
    nonce: &[u8; 32],
) -> [u8; 32] {
    mac(
        key,
        b"ferry-data",
        &[&session.0, &channel.to_le_bytes(), nonce],
    )
    .finalize()
    .into_bytes()
    .into()
}

/// Checks a data connection's proof (constant time).
pub fn verify_data_proof(
    key: &SessionKey,
    session: &SessionId,
    channel: u16,
    nonce: &[u8; 32],
    proof: &[u8; 32],
) -> bool {
    mac(
        key,
        b"ferry-data",
        &[&session.0, &channel.to_le_bytes(), nonce],
    )
    .verify_slice(proof)
    .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn accept<S: Read + Write>(s: &mut S, key: &Key) -> Result<SessionKey, ProtoError> {
        match read_msg(s, HANDSHAKE_CAP)? {
            PeerMsg::PskHello { version, nonce } => accept_after_hello(s, key, version, nonce),
            other => Err(refuse(s, unexpected("PskHello", other))),
        }
    }

    fn run(
        kc: &[u8],
        kl: &[u8],
    ) -> (
        Result<SessionKey, ProtoError>,
        Result<SessionKey, ProtoError>,
    ) {
        let (mut a, mut b) = UnixStream::pair().expect("pair");
        let kl = Key::new(kl.to_vec()).expect("key");
        let t = std::thread::spawn(move || accept(&mut b, &kl));
        let c = connect(&mut a, &Key::new(kc.to_vec()).expect("key"));
        drop(a);
        (c, t.join().expect("thread"))
    }

    #[test]
    fn same_key_authenticates_both_ways_with_a_shared_session_key() {
        let (c, l) = run(b"0123456789abcdef", b"0123456789abcdef");
        let (c, l) = (c.expect("connector"), l.expect("listener"));
        assert_eq!(c, l);
        // Fresh nonces: a second handshake gives another key.
        let (c2, _) = run(b"0123456789abcdef", b"0123456789abcdef");
        assert_ne!(c, c2.expect("connector"));
    }

    #[test]
    fn wrong_key_fails_on_both_sides_and_the_connector_gets_no_proof() {
        // A connector with the wrong key: the listener refuses before proving anything.
        let (mut a, mut b) = UnixStream::pair().expect("pair");
        let kl = Key::new(b"fedcba9876543210".to_vec()).expect("key");
        let t = std::thread::spawn(move || accept(&mut b, &kl));
        write_msg(
            &mut a,
            &PeerMsg::PskHello {
                version: VERSION,
                nonce: [1; 32],
            },
        )
        .expect("hello");
        let challenge: PeerMsg = read_msg(&mut a, HANDSHAKE_CAP).expect("challenge");
        assert!(
            matches!(challenge, PeerMsg::PskChallenge { .. }),
            "no proof in the challenge"
        );
        write_msg(&mut a, &PeerMsg::PskProof { proof: [0; 32] }).expect("proof");
        let answer: PeerMsg = read_msg(&mut a, HANDSHAKE_CAP).expect("answer");
        assert!(matches!(answer, PeerMsg::Refused { .. }), "{answer:?}");
        assert!(matches!(
            t.join().expect("thread"),
            Err(ProtoError::AuthFailed { .. })
        ));
        let (c, l) = run(b"0123456789abcdef", b"fedcba9876543210");
        assert!(matches!(c, Err(ProtoError::Refused { .. })), "{c:?}");
        assert!(matches!(l, Err(ProtoError::AuthFailed { .. })));
    }

    #[test]
    fn data_proofs_are_bound_to_key_session_channel_and_nonce() {
        let k = [5u8; 32];
        let s = SessionId([1; 16]);
        let p = data_proof(&k, &s, 2, &[9; 32]);
        assert!(verify_data_proof(&k, &s, 2, &[9; 32], &p));
        assert!(!verify_data_proof(&k, &s, 2, &[8; 32], &p), "another nonce");
        assert!(
            !verify_data_proof(&k, &s, 3, &[9; 32], &p),
            "another channel"
        );
        assert!(
            !verify_data_proof(&k, &SessionId([2; 16]), 2, &[9; 32], &p),
            "another session"
        );
        assert!(
            !verify_data_proof(&[6; 32], &s, 2, &[9; 32], &p),
            "another key"
        );
    }

    #[test]
    fn short_keys_and_readable_key_files_are_refused() {
        assert!(matches!(
            Key::new(b"short".to_vec()),
            Err(ProtoError::WeakKey { len: 5 })
        ));
        let dir = std::env::temp_dir().join(format!("ferry-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let f = dir.join("key");
        std::fs::write(&f, "0123456789abcdef0123\n").expect("write");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let e = Key::from_file(&f).expect_err("world-readable");
        assert!(e.to_string().contains("chmod 600"), "{e}");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert!(Key::from_file(&f).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn wrong_version_is_refused_with_a_clear_message() {
        let (mut a, mut b) = UnixStream::pair().expect("pair");
        let key = Key::new(b"0123456789abcdef".to_vec()).expect("key");
        let t = std::thread::spawn(move || accept(&mut b, &key));
        write_msg(
            &mut a,
            &PeerMsg::PskHello {
                version: 99,
                nonce: [0; 32],
            },
        )
        .expect("write");
        match read_msg::<PeerMsg, _>(&mut a, 4096).expect("reply") {
            PeerMsg::Refused { reason } => assert!(reason.contains("version 99"), "{reason}"),
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
                &PeerMsg::StateBlob {
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
