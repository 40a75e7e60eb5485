//! Cloud Hypervisor's live-migration protocol, as Ferry speaks it to an unmodified CH on
//! either side (`docs/cloud-hypervisor.md` has the whole exchange and where each fact
//! comes from).
//!
//! Every request is a 16-byte header (u16 command, 6 command-header bytes of which a
//! `Start` uses the first two for the protocol version, u64 payload length) and every
//! request gets one 16-byte response (u16 status, 6 padding bytes, u64 length, always 0
//! except for page-fault replies), all little-endian. A `Memory` request's length counts
//! only its range table (n x {u64 gpa, u64 length}); the ranges' bytes follow, in table
//! order, unannounced. A `MemoryFd` request's 4-byte payload (u32 slot) carries the memfd
//! as `SCM_RIGHTS`. Extra connections begin with a u16 role and get no answer.

use ferry_proto::ProtoError;

/// The only CH migration protocol version this CH build sends and accepts.
pub const CH_PROTOCOL_VERSION: u16 = 0;

/// Size of a request and of a response header.
pub const HEADER_LEN: usize = 16;

/// Largest `Config` or `State` JSON Ferry accepts from a CH (CH sets none; a VM's config
/// and device state are kilobytes to a few MiB).
pub const MAX_JSON: u64 = 64 << 20;

/// Most ranges in one `Memory` table Ferry accepts (CH sends one range per run of dirty
/// pages: a fully fragmented 64 MiB chunk is 16,384 ranges; a one-connection round may
/// hold a whole VM's worth).
pub const MAX_RANGES: u64 = 1 << 24;

/// The role a CH writes first on an extra connection (`connections=N`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Pre-copy memory: `Memory` requests, each answered.
    PrecopyMemory = 1,
    /// Post-copy page faults: the destination asks, the source answers.
    PageFaults = 2,
}

impl Role {
    /// The role from its two bytes.
    ///
    /// # Errors
    ///
    /// Neither role.
    pub fn decode(b: [u8; 2]) -> Result<Self, ProtoError> {
        match u16::from_le_bytes(b) {
            1 => Ok(Role::PrecopyMemory),
            2 => Ok(Role::PageFaults),
            v => Err(ProtoError::BadValue {
                what: "CH connection role",
                value: u64::from(v),
            }),
        }
    }

    /// Its two bytes.
    pub fn encode(self) -> [u8; 2] {
        (self as u16).to_le_bytes()
    }
}

/// A CH migration command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// Opens the migration; carries the protocol version.
    Start = 1,
    /// The VM's configuration and memory layout (JSON).
    Config = 2,
    /// The paused VM's vCPU and device state (JSON).
    State = 3,
    /// A table of guest-physical ranges, then their bytes.
    Memory = 4,
    /// Resume the VM at the destination; the migration is over.
    Complete = 5,
    /// Give up; the destination drops what it has.
    Abandon = 6,
    /// A memfd for one RAM slot (Unix sockets only).
    MemoryFd = 7,
    /// As `Complete`, leaving the VM paused.
    CompletePaused = 8,
    /// Post-copy: one range the destination faulted on.
    PageFault = 9,
}

impl Command {
    fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            1 => Command::Start,
            2 => Command::Config,
            3 => Command::State,
            4 => Command::Memory,
            5 => Command::Complete,
            6 => Command::Abandon,
            7 => Command::MemoryFd,
            8 => Command::CompletePaused,
            9 => Command::PageFault,
            _ => return None,
        })
    }

    /// Its name, for logs and errors.
    pub fn name(self) -> &'static str {
        match self {
            Command::Start => "Start",
            Command::Config => "Config",
            Command::State => "State",
            Command::Memory => "Memory",
            Command::Complete => "Complete",
            Command::Abandon => "Abandon",
            Command::MemoryFd => "MemoryFd",
            Command::CompletePaused => "CompletePaused",
            Command::PageFault => "PageFault",
        }
    }
}

/// A request header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// What is asked.
    pub command: Command,
    /// `Start` only: the sender's protocol version (0 elsewhere).
    pub version: u16,
    /// Payload bytes after the header (for `Memory`: the range table only).
    pub length: u64,
}

impl Request {
    /// A request with no version.
    pub fn new(command: Command, length: u64) -> Self {
        Self {
            command,
            version: 0,
            length,
        }
    }

    /// The header's bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..2].copy_from_slice(&(self.command as u16).to_le_bytes());
        if self.command == Command::Start {
            b[2..4].copy_from_slice(&self.version.to_le_bytes());
        }
        b[8..16].copy_from_slice(&self.length.to_le_bytes());
        b
    }

    /// A header from its bytes. Lengths are checked against what each command may carry:
    /// none for `Start`, `Complete`, `CompletePaused`, `Abandon`; 4 for `MemoryFd`; 16 for
    /// `PageFault`; a whole number of ranges, at most [`MAX_RANGES`], for `Memory`; at
    /// most [`MAX_JSON`] for `Config` and `State`.
    ///
    /// # Errors
    ///
    /// An unknown command, or a length the command cannot have.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Self, ProtoError> {
        let raw = u16::from_le_bytes([b[0], b[1]]);
        let command = Command::from_u16(raw).ok_or(ProtoError::UnknownTag {
            protocol: "CH migration",
            tag: raw,
        })?;
        let version = u16::from_le_bytes([b[2], b[3]]);
        let length = u64::from_le_bytes(b[8..16].try_into().expect("8 bytes"));
        let bad = |what| {
            Err(ProtoError::BadValue {
                what,
                value: length,
            })
        };
        match command {
            Command::Start | Command::Complete | Command::CompletePaused | Command::Abandon
                if length != 0 =>
            {
                return bad("length of an empty CH request");
            }
            Command::MemoryFd if length != 4 => return bad("CH MemoryFd length"),
            Command::PageFault if length != 16 => return bad("CH PageFault length"),
            Command::Memory if !length.is_multiple_of(16) || length == 0 => {
                return bad("CH Memory table length")
            }
            Command::Memory if length / 16 > MAX_RANGES => {
                return Err(ProtoError::TooLong {
                    what: "CH Memory table",
                    len: length / 16,
                    cap: MAX_RANGES,
                })
            }
            Command::Config | Command::State if length > MAX_JSON => {
                return Err(ProtoError::TooLong {
                    what: "CH JSON payload",
                    len: length,
                    cap: MAX_JSON,
                })
            }
            _ => {}
        }
        Ok(Self {
            command,
            version: if command == Command::Start {
                version
            } else {
                0
            },
            length,
        })
    }
}

/// A response's status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Done.
    Ok = 1,
    /// Failed: the sender gives up (a source CH resumes its VM).
    Error = 2,
}

/// A response header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Response {
    /// Ok or Error.
    pub status: Status,
    /// Bytes after it (page-fault replies carrying the page; else 0).
    pub length: u64,
}

impl Response {
    /// Ok, nothing after it.
    pub const OK: Response = Response {
        status: Status::Ok,
        length: 0,
    };
    /// Error, nothing after it.
    pub const ERROR: Response = Response {
        status: Status::Error,
        length: 0,
    };

    /// The header's bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..2].copy_from_slice(&(self.status as u16).to_le_bytes());
        b[8..16].copy_from_slice(&self.length.to_le_bytes());
        b
    }

    /// A header from its bytes.
    ///
    /// # Errors
    ///
    /// A status other than Ok or Error.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Self, ProtoError> {
        let status = match u16::from_le_bytes([b[0], b[1]]) {
            1 => Status::Ok,
            2 => Status::Error,
            v => {
                return Err(ProtoError::BadValue {
                    what: "CH response status",
                    value: u64::from(v),
                })
            }
        };
        Ok(Self {
            status,
            length: u64::from_le_bytes(b[8..16].try_into().expect("8 bytes")),
        })
    }
}

/// One guest-physical range of a `Memory` table or a `PageFault`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GpaRange {
    /// Guest-physical start.
    pub gpa: u64,
    /// Bytes.
    pub length: u64,
}

impl GpaRange {
    /// One past its last byte, if that fits in 64 bits.
    pub fn end(&self) -> Option<u64> {
        self.gpa.checked_add(self.length)
    }
}

/// Decodes a range table (`bytes.len()` a multiple of 16).
///
/// # Errors
///
/// A length that is not whole ranges, a range that wraps around the address space.
pub fn decode_ranges(bytes: &[u8]) -> Result<Vec<GpaRange>, ProtoError> {
    if !bytes.len().is_multiple_of(16) {
        return Err(ProtoError::BadValue {
            what: "CH range table length",
            value: bytes.len() as u64,
        });
    }
    bytes
        .chunks_exact(16)
        .map(|c| {
            let r = GpaRange {
                gpa: u64::from_le_bytes(c[0..8].try_into().expect("8 bytes")),
                length: u64::from_le_bytes(c[8..16].try_into().expect("8 bytes")),
            };
            r.end().map(|_| r).ok_or(ProtoError::BadValue {
                what: "CH range (wraps around)",
                value: r.gpa,
            })
        })
        .collect()
}

/// Encodes a range table.
pub fn encode_ranges(ranges: &[GpaRange]) -> Vec<u8> {
    let mut out = Vec::with_capacity(ranges.len() * 16);
    for r in ranges {
        out.extend_from_slice(&r.gpa.to_le_bytes());
        out.extend_from_slice(&r.length.to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_have_chs_byte_layout() {
        // Start with version 0: command 1, then zeros.
        let start = Request {
            command: Command::Start,
            version: 0,
            length: 0,
        };
        assert_eq!(
            start.encode(),
            [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        // Memory with a 2-range table: command 4, length 32.
        let m = Request::new(Command::Memory, 32);
        assert_eq!(
            m.encode(),
            [4, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(Request::decode(&m.encode()).expect("decodes"), m);
        // A version travels only in Start's first command-header bytes.
        let v1 = Request {
            command: Command::Start,
            version: 1,
            length: 0,
        };
        assert_eq!(Request::decode(&v1.encode()).expect("decodes").version, 1);
        assert_eq!(
            Response::OK.encode(),
            [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(
            Response::decode(&Response::ERROR.encode()).expect("decodes"),
            Response::ERROR
        );
        assert_eq!(Role::PrecopyMemory.encode(), [1, 0]);
        assert_eq!(Role::decode([2, 0]).expect("decodes"), Role::PageFaults);
        assert!(Role::decode([3, 0]).is_err());
    }

    #[test]
    fn impossible_lengths_and_unknown_commands_are_refused() {
        let with = |cmd: u16, len: u64| {
            let mut b = [0u8; HEADER_LEN];
            b[0..2].copy_from_slice(&cmd.to_le_bytes());
            b[8..16].copy_from_slice(&len.to_le_bytes());
            Request::decode(&b)
        };
        assert!(with(0, 0).is_err());
        assert!(with(10, 0).is_err());
        assert!(with(1, 8).is_err(), "Start carries nothing");
        assert!(with(5, 1).is_err(), "Complete carries nothing");
        assert!(with(7, 8).is_err(), "MemoryFd carries a u32");
        assert!(with(9, 8).is_err(), "PageFault carries one range");
        assert!(with(4, 0).is_err(), "an empty table");
        assert!(with(4, 17).is_err(), "part of a range");
        assert!(with(4, (MAX_RANGES + 1) * 16).is_err());
        assert!(with(2, MAX_JSON + 1).is_err());
        assert!(with(4, 16).is_ok() && with(7, 4).is_ok() && with(3, 100).is_ok());
        let mut b = [0u8; HEADER_LEN];
        b[0] = 3;
        assert!(Response::decode(&b).is_err());
    }

    #[test]
    fn range_tables_round_trip_and_wrapping_ranges_are_refused() {
        let t = vec![
            GpaRange {
                gpa: 0x1000,
                length: 0x2000,
            },
            GpaRange {
                gpa: 1 << 32,
                length: 4096,
            },
        ];
        let b = encode_ranges(&t);
        assert_eq!(b.len(), 32);
        assert_eq!(decode_ranges(&b).expect("decodes"), t);
        assert!(decode_ranges(&b[..31]).is_err());
        let wrap = encode_ranges(&[GpaRange {
            gpa: u64::MAX - 10,
            length: 4096,
        }]);
        assert!(decode_ranges(&wrap).is_err());
    }
}
