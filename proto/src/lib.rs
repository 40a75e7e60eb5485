//! Ferry's wire formats: the VMM socket, the CLI socket and the peer link.
//!
//! Every control message is a [`msg::Msg`] in a [`frame`] (8-byte little-endian header,
//! length capped before allocation). Data connections of the TCP transport use the
//! fixed [`data`] header. Peers authenticate with [`auth`] before anything else moves.
//!
//! # Versions
//!
//! The version travels in the first message of every connection ([`msg::Msg::Hello`],
//! [`msg::Msg::PeerHello`]). This is version [`VERSION`]; a peer outside
//! [`MIN_VERSION`]..=[`VERSION`] is refused with a message naming both.
//!
//! # A whole migration
//!
//! ```text
//! src VMM          src sidecar                       dst sidecar            dst VMM
//!   | Hello/RegisterVm+memfds |                           |  Hello/AwaitIncoming  |
//!   |------------------------>|                           |<----------------------|
//!   |            (CLI: Migrate)                           |                       |
//!   |                         |== PeerHello/Challenge/Auth (HMAC) ==>|            |
//!   |                         |---- Offer{layout,channels,cpu} ---->|             |
//!   |                         |         (creates + populates memfds)|             |
//!   |                         |<--- Accept{prepare_us} -------------|             |
//!   |                         |==== N x DataHello (data conns) ====>|             |
//!   |<-- StartDirtyLog -------|                           |                       |
//!   |<-- TakeDirty{false} ----|  (round 1: all pages; zero pages as markers)      |
//!   |--- Dirty{bitmaps} ----->|---- RoundStart{k} ------->|                       |
//!   |                         |==== Pages/Zero/RoundEnd ==>| (per-page hash check)|
//!   |                         |<--- RoundDone{k, torn} ---|                       |
//!   |          ... rounds until dirty bytes <= bandwidth x downtime budget ...    |
//!   |<-- Pause / Paused ------|                           |                       |
//!   |<-- TakeDirty{true} -----|---- RoundStart{final} --->|                       |
//!   |<-- SaveState / State ---|==== final pages =========>|                       |
//!   |                         |<--- RoundDone ------------|                       |
//!   |                         |---- StateBlob ----------->|-- Load+memfds+blob -->|
//!   |                         |                           |<-- Loaded ------------|
//!   |                         |<--- Ready{digest} --------|                       |
//!   |              (digests compared; decision recorded: COMMIT POINT)            |
//!   |                         |---- Commit -------------->|-- Start ------------->|
//!   |                         |                           |<-- Running -----------|
//!   |                         |<--- PeerRunning ----------|                       |
//!   |<-- Stop ----------------|                           |                       |
//!  Any failure before the commit point: src sidecar sends Resume to its VMM and
//!  Abort to the peer (best effort); the destination sends Discard to its VMM.
//! ```
//!
//! # Threads
//!
//! Codecs are plain functions; the framing functions block on the stream they are given.
//!
//! # Resource cleanup
//!
//! Received file descriptors come back as [`std::os::fd::OwnedFd`] and close on drop.

pub mod auth;
pub mod codec;
pub mod data;
pub mod frame;
pub mod mem;
pub mod msg;
pub mod net;

/// Protocol version this build speaks.
pub const VERSION: u16 = 1;
/// Oldest protocol version this build accepts.
pub const MIN_VERSION: u16 = 1;

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
    /// A frame header announced more bytes than allowed.
    #[error("Frame of {len} bytes exceeds the limit of {cap}")]
    FrameTooLarge {
        /// Announced length.
        len: u64,
        /// Limit.
        cap: u64,
    },
    /// A frame did not start with Ferry's magic: not a Ferry peer.
    #[error("Not a Ferry frame (magic {magic:#06x})")]
    BadMagic {
        /// The bytes found.
        magic: u16,
    },
    /// Unknown message tag.
    #[error("Unknown message tag {tag}")]
    UnknownTag {
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
        matches!(self, ProtoError::Closed | ProtoError::Io { .. })
    }
}

/// Maps a reply that is not what the protocol expects to an error (a `Refused` or
/// `Error` reply carries the peer's reason).
pub fn unexpected(expected: &'static str, got: msg::Msg) -> ProtoError {
    match got {
        msg::Msg::Refused { reason } | msg::Msg::Error { message: reason } => {
            ProtoError::Refused { reason }
        }
        other => ProtoError::Unexpected {
            expected,
            got: other.name(),
        },
    }
}
