//! Ferry's wire formats: the VMM link, the CLI link and the peer link, and guest RAM as
//! the sidecar maps it.
//!
//! Three protocols, three message types, one codec ([`codec`]): [`vmm::VmmMsg`] on the
//! VMM's Unix socket, [`cli::CliMsg`] on the CLI's, [`peer::PeerMsg`] between sidecars.
//! Each travels in a [`frame`] (8-byte little-endian header, length capped before
//! allocation) whose magic names its protocol, so a message of one protocol is refused on
//! another's socket before it is decoded. Data connections of the TCP transport carry the
//! fixed [`data`] header after their handshake. Peers authenticate with TLS 1.3 (the
//! sidecar's `tls` module) or, when the operator chose `--insecure-psk`, with [`auth`].
//!
//! The byte-level VMM protocol is written out in `docs/vmm-protocol.md`, the peer
//! protocol in `docs/peer-protocol.md`, and the rules a whole migration keeps in
//! `docs/design.md`.
//!
//! # Versions
//!
//! The version travels in the first message of every connection. This is version
//! [`VERSION`]; a peer outside [`MIN_VERSION`]..=[`VERSION`] is refused with a message
//! naming both.
//!
//! # Threads
//!
//! Codecs are plain functions; the framing functions block on the stream they are given.
//! [`guard`] installs a process-wide `SIGBUS` handler.
//!
//! # Resource cleanup
//!
//! Received file descriptors come back as [`std::os::fd::OwnedFd`] and close on drop;
//! [`mem::GuestRegion`] unmaps on drop.

pub mod auth;
pub mod cli;
pub mod codec;
pub mod common;
pub mod data;
pub mod frame;
pub mod guard;
pub mod mem;
pub mod net;
pub mod peer;
pub mod records;
pub mod vmm;

/// Protocol version this build speaks (2: separate VMM, CLI and peer protocols; commit
/// fences; TLS. 3: queues and limits (`Busy`), priorities, cancel, bandwidth caps. 4: the
/// offer carries the source RAM's backing page size, for huge pages; `RoundDone` the
/// destination's CPU time by phase).
pub const VERSION: u16 = 4;
/// Oldest protocol version this build accepts (a version 3 offer lacks the page size).
pub const MIN_VERSION: u16 = 4;

/// Checks a peer's version against [`MIN_VERSION`]..=[`VERSION`].
///
/// # Errors
///
/// [`ProtoError::VersionMismatch`].
pub fn check_version(peer: u16) -> Result<(), ProtoError> {
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

/// Errors reading, writing or checking wire data.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// An I/O operation on the connection failed.
    #[error("I/O error during {op}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The peer closed the connection at a frame boundary.
    #[error("Connection closed by peer")]
    Closed,
    /// The socket's read timeout passed: the peer is silent (gone, or stuck).
    #[error("No answer in time ({op} timed out)")]
    TimedOut {
        /// What was being done.
        op: &'static str,
    },
    /// A deadline for a whole exchange (a handshake) passed.
    #[error("{what} did not finish within {secs} s")]
    Deadline {
        /// Which exchange.
        what: &'static str,
        /// Its deadline.
        secs: u64,
    },
    /// A frame header announced more bytes than allowed.
    #[error("Frame of {len} bytes exceeds the limit of {cap}")]
    FrameTooLarge {
        /// Announced length.
        len: u64,
        /// Limit.
        cap: u64,
    },
    /// A frame did not start with a Ferry magic: not a Ferry peer.
    #[error("Not a Ferry frame (magic {magic:#06x})")]
    BadMagic {
        /// The bytes found.
        magic: u16,
    },
    /// A frame of another Ferry protocol (a CLI message on the peer port, say).
    #[error("A {got} message arrived where the {expected} protocol is spoken")]
    WrongProtocol {
        /// The protocol of this socket.
        expected: &'static str,
        /// The protocol the frame belongs to.
        got: &'static str,
    },
    /// Unknown message tag.
    #[error("Unknown {protocol} message tag {tag}")]
    UnknownTag {
        /// Which protocol.
        protocol: &'static str,
        /// The tag.
        tag: u16,
    },
    /// A message ended early.
    #[error("Truncated {what}")]
    Truncated {
        /// Which message or field.
        what: &'static str,
    },
    /// A length or count exceeded its cap.
    #[error("{what} of {len} exceeds the limit of {cap}")]
    TooLong {
        /// Which field.
        what: &'static str,
        /// Value given.
        len: u64,
        /// Limit.
        cap: u64,
    },
    /// A field held a value outside its domain.
    #[error("Invalid {what}: {value}")]
    BadValue {
        /// Which field.
        what: &'static str,
        /// Value given.
        value: u64,
    },
    /// A message had bytes after its last field.
    #[error("{extra} trailing bytes after {what}")]
    TrailingBytes {
        /// Which message.
        what: &'static str,
        /// How many.
        extra: usize,
    },
    /// A string was not UTF-8.
    #[error("Invalid UTF-8 in {what}")]
    BadUtf8 {
        /// Which field.
        what: &'static str,
    },
    /// A VM id outside `[A-Za-z0-9._-]{1,64}` (or starting with a dot).
    #[error("Invalid VM id {id:?}: use 1 to 64 of A-Z a-z 0-9 . _ - (not starting with a dot)")]
    BadVmId {
        /// The id given (cut to 80 characters).
        id: String,
    },
    /// The peer speaks a protocol version outside the supported range.
    #[error("Peer speaks protocol version {peer}; this sidecar supports versions {min} to {max}")]
    VersionMismatch {
        /// Peer's version.
        peer: u16,
        /// Oldest supported.
        min: u16,
        /// Newest supported.
        max: u16,
    },
    /// Authentication failed.
    #[error("Authentication failed: {reason}")]
    AuthFailed {
        /// Why.
        reason: &'static str,
    },
    /// A key is too short to be safe.
    #[error("Shared key is {len} bytes; at least 16 are required")]
    WeakKey {
        /// Length given.
        len: usize,
    },
    /// A secret file others may read.
    #[error("{path} is readable or writable by others (mode {mode:o}): run chmod 600 {path}")]
    KeyFileMode {
        /// The file.
        path: String,
        /// Its permission bits.
        mode: u32,
    },
    /// The peer refused, with its reason.
    #[error("Refused by peer: {reason}")]
    Refused {
        /// The peer's reason.
        reason: String,
    },
    /// A message arrived that the protocol does not allow here.
    #[error("Expected {expected}, got {got}")]
    Unexpected {
        /// What was expected.
        expected: &'static str,
        /// What came.
        got: &'static str,
    },
    /// More file descriptors arrived than any message may carry.
    #[error("Too many file descriptors ({got}) with one message")]
    TooManyFds {
        /// How many arrived.
        got: usize,
    },
}

impl ProtoError {
    /// Adapter for `map_err` on I/O results.
    pub fn io(op: &'static str) -> impl FnOnce(std::io::Error) -> ProtoError {
        move |source| ProtoError::Io { op, source }
    }

    /// Whether the error means the peer or the link is gone (as opposed to bad input).
    pub fn is_disconnect(&self) -> bool {
        matches!(
            self,
            ProtoError::Closed
                | ProtoError::TimedOut { .. }
                | ProtoError::Io { .. }
                | ProtoError::Deadline { .. }
        )
    }
}
