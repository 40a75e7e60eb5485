//! Errors of `ferry-verbs`: one variant per failing operation, plus the typed
//! work-completion statuses ([`WcError`]).

use std::io;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can fail in `ferry-verbs`.
///
/// The engine branches on [`Error::is_no_rdma`] to fall back to TCP before a
/// migration starts, and on [`Error::QpFailed`] / failed [`ReadCompletion`]s
/// (`crate::ReadCompletion`) to hand unfinished ranges to TCP during one.
///
/// [`ReadCompletion`]: crate::ReadCompletion
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The host has no RDMA support at all (`ENOSYS`, `EOPNOTSUPP`, `ENODEV`
    /// from libibverbs, e.g. a kernel without `CONFIG_INFINIBAND`).
    #[error("RDMA is not supported here ({op})")]
    Unsupported {
        /// The verbs call that reported it.
        op: &'static str,
        /// The errno it reported.
        #[source]
        source: io::Error,
    },
    /// libibverbs works but lists no RDMA device.
    #[error("No RDMA device found")]
    NoDevice,
    /// Devices are listed but none is usable (no active port, or no GID to
    /// address it with): the engine should use TCP instead.
    #[error("No usable RDMA device: {reason}")]
    NoUsableDevice {
        /// What was wrong with each device.
        reason: String,
    },
    /// A device was asked for by name and is not in the device list.
    #[error("No RDMA device named {name:?}")]
    DeviceNotFound {
        /// The name asked for.
        name: String,
    },
    /// `ibv_get_device_list` failed for a reason other than "no RDMA".
    #[error("Cannot list RDMA devices")]
    ListDevices {
        /// The errno it reported.
        #[source]
        source: io::Error,
    },
    /// `ibv_open_device` failed.
    #[error("Cannot open RDMA device {name}")]
    OpenDevice {
        /// Device name.
        name: String,
        /// The errno it reported.
        #[source]
        source: io::Error,
    },
    /// `ibv_query_device` failed.
    #[error("Cannot query attributes of RDMA device {name}")]
    QueryDevice {
        /// Device name.
        name: String,
        /// The errno it reported.
        #[source]
        source: io::Error,
    },
    /// `ibv_query_port` failed (or the port does not exist).
    #[error("Cannot query port {port} of RDMA device {name}")]
    QueryPort {
        /// Device name.
        name: String,
        /// Port number (1-based).
        port: u8,
        /// The errno it reported.
        #[source]
        source: io::Error,
    },
    /// `ibv_query_gid` failed.
    #[error("Cannot query GID {index} on port {port}")]
    QueryGid {
        /// Port number (1-based).
        port: u8,
        /// GID table index.
        index: u32,
        /// The errno it reported.
        #[source]
        source: io::Error,
    },
    /// A sysfs attribute of the device could not be read.
    #[error("Cannot read {path}")]
    Sysfs {
        /// The sysfs file.
        path: String,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The port has no RoCE v2 GID that carries an IPv4 address.
    #[error("Port {port} of RDMA device {name} has no RoCE v2 IPv4 GID")]
    NoRoceV2Ipv4Gid {
        /// Device name.
        name: String,
        /// Port number (1-based).
        port: u8,
    },
    /// `ibv_alloc_pd` failed.
    #[error("Cannot allocate a protection domain")]
    AllocPd {
        /// The errno it reported.
        #[source]
        source: io::Error,
    },
    /// `ibv_reg_mr` failed for one piece of a region.
    #[error("Cannot register memory {addr:#x}+{len:#x} for {access}")]
    RegisterMemory {
        /// Start of the piece that failed.
        addr: u64,
        /// Length of the piece that failed.
        len: u64,
        /// The access asked for.
        access: &'static str,
        /// The errno it reported.
        #[source]
        source: io::Error,
    },
    /// `ibv_create_cq` failed.
    #[error("Cannot create a completion queue of {capacity} entries")]
    CreateCq {
        /// Entries asked for.
        capacity: u32,
        /// The errno it reported.
        #[source]
        source: io::Error,
    },
    /// `ibv_create_qp` failed.
    #[error("Cannot create an RC queue pair")]
    CreateQp {
        /// The errno it reported.
        #[source]
        source: io::Error,
    },
    /// `ibv_modify_qp` failed.
    #[error("Cannot move queue pair {qpn} to {to}")]
    ModifyQp {
        /// Local queue pair number.
        qpn: u32,
        /// Target state (INIT, RTR, RTS, ERR).
        to: &'static str,
        /// The errno it reported.
        #[source]
        source: io::Error,
    },
    /// `ibv_post_send` failed. The queue pair was moved to the error state;
    /// the first `accepted` requests of the call are tracked and will be
    /// reported by `poll` (most as flushed), the rest were never posted.
    #[error("Cannot post RDMA READs on queue pair {qpn} ({accepted} requests accepted)")]
    PostSend {
        /// Local queue pair number.
        qpn: u32,
        /// Requests of this call that are tracked (reported later by `poll`).
        accepted: usize,
        /// The errno it reported.
        #[source]
        source: io::Error,
    },
    /// `ibv_poll_cq` failed.
    #[error("Cannot poll the completion queue of queue pair {qpn}")]
    PollCq {
        /// Local queue pair number.
        qpn: u32,
        /// The errno it reported.
        #[source]
        source: io::Error,
    },
    /// The queue pair is in the error state (a completion failed or it was
    /// forced there): nothing more can be posted on it.
    #[error("Queue pair {qpn} is in the error state")]
    QpFailed {
        /// Local queue pair number.
        qpn: u32,
    },
    /// A read request's local range is not inside the local memory region.
    #[error("Read {wr_id}: local range {addr:#x}+{len:#x} is not registered")]
    LocalRangeNotRegistered {
        /// The request's id.
        wr_id: u64,
        /// Local start address.
        addr: u64,
        /// Length.
        len: u64,
    },
    /// A read request's remote range is not inside what the peer advertised.
    #[error("Read {wr_id}: remote range {addr:#x}+{len:#x} was not advertised by the peer")]
    RemoteRangeNotAdvertised {
        /// The request's id.
        wr_id: u64,
        /// Remote start address.
        addr: u64,
        /// Length.
        len: u64,
    },
    /// A read request of zero bytes.
    #[error("Read {wr_id} has zero length")]
    EmptyRead {
        /// The request's id.
        wr_id: u64,
    },
    /// A read request needs more READ work requests than the queue pair may
    /// ever have outstanding: split it into smaller requests.
    #[error(
        "Read {wr_id} needs {reads} READs, more than the {limit} a queue pair may have outstanding"
    )]
    ReadTooLarge {
        /// The request's id.
        wr_id: u64,
        /// READ work requests it would need.
        reads: usize,
        /// The queue pair's outstanding-READ limit.
        limit: usize,
    },
    /// Bytes received from a peer have the wrong length for the type.
    #[error("Malformed {what}: expected {expected} bytes, got {got}")]
    BadEncoding {
        /// The type being decoded.
        what: &'static str,
        /// Expected length.
        expected: usize,
        /// Actual length.
        got: usize,
    },
    /// Bytes received from a peer, or an argument, have a value that is not
    /// allowed.
    #[error("Invalid {what}: {reason}")]
    Invalid {
        /// What was being validated.
        what: &'static str,
        /// Why it was refused.
        reason: String,
    },
}

impl Error {
    /// True when the error means "this host has no usable RDMA" (no kernel
    /// support, or no device): the engine should use TCP instead.
    #[must_use]
    pub fn is_no_rdma(&self) -> bool {
        matches!(
            self,
            Error::Unsupported { .. } | Error::NoDevice | Error::NoUsableDevice { .. }
        )
    }
}

/// Whether an errno from libibverbs means "no RDMA support here".
pub(crate) fn is_unsupported_errno(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP) | Some(libc::ENODEV)
    )
}

/// Build the error for a failed verbs call: `Unsupported` for the "no RDMA"
/// errnos, `other(source)` for anything else.
pub(crate) fn verbs_error(
    op: &'static str,
    source: io::Error,
    other: impl FnOnce(io::Error) -> Error,
) -> Error {
    if is_unsupported_errno(&source) {
        Error::Unsupported { op, source }
    } else {
        other(source)
    }
}

/// The `errno` value returned directly by a verbs call (`ibv_modify_qp`,
/// `ibv_post_send`, ... return a positive errno rather than setting it).
pub(crate) fn returned_errno(rc: i32) -> io::Error {
    io::Error::from_raw_os_error(rc.abs())
}

/// A work completion that did not succeed: one variant per `ibv_wc_status`.
///
/// Everything except [`WcError::WrFlushErr`] and [`WcError::PostFailed`] is
/// the *first* failure on a queue pair; an RC queue pair is in the error state
/// after any of them, and every later work request completes with
/// [`WcError::WrFlushErr`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
#[non_exhaustive]
pub enum WcError {
    /// `IBV_WC_LOC_LEN_ERR`: local length error.
    #[error("Local length error")]
    LocalLengthError,
    /// `IBV_WC_LOC_QP_OP_ERR`: local queue pair operation error.
    #[error("Local QP operation error")]
    LocalQpOperationError,
    /// `IBV_WC_LOC_EEC_OP_ERR`: local EE context operation error.
    #[error("Local EEC operation error")]
    LocalEecOperationError,
    /// `IBV_WC_LOC_PROT_ERR`: local protection error (bad lkey, or the local
    /// memory region was deregistered).
    #[error("Local protection error")]
    LocalProtectionError,
    /// `IBV_WC_WR_FLUSH_ERR`: flushed because the queue pair is in the error
    /// state; the work request was not (or not completely) executed.
    #[error("Work request flushed")]
    WrFlushErr,
    /// `IBV_WC_MW_BIND_ERR`: memory window bind error.
    #[error("Memory window bind error")]
    MemoryWindowBindError,
    /// `IBV_WC_BAD_RESP_ERR`: bad response from the responder.
    #[error("Bad response")]
    BadResponse,
    /// `IBV_WC_LOC_ACCESS_ERR`: local access error.
    #[error("Local access error")]
    LocalAccessError,
    /// `IBV_WC_REM_INV_REQ_ERR`: the responder found the request invalid.
    #[error("Remote invalid request")]
    RemoteInvalidRequest,
    /// `IBV_WC_REM_ACCESS_ERR`: the responder refused access (wrong rkey,
    /// range outside the remote region, or no REMOTE_READ permission).
    #[error("Remote access error")]
    RemoteAccessError,
    /// `IBV_WC_REM_OP_ERR`: the responder could not complete the operation.
    #[error("Remote operation error")]
    RemoteOperationError,
    /// `IBV_WC_RETRY_EXC_ERR`: transport retries exceeded (peer unreachable).
    #[error("Transport retry counter exceeded")]
    RetryExceeded,
    /// `IBV_WC_RNR_RETRY_EXC_ERR`: receiver-not-ready retries exceeded.
    #[error("RNR retry counter exceeded")]
    RnrRetryExceeded,
    /// `IBV_WC_LOC_RDD_VIOL_ERR`: local RDD violation.
    #[error("Local RDD violation")]
    LocalRddViolation,
    /// `IBV_WC_REM_INV_RD_REQ_ERR`: remote invalid RD request.
    #[error("Remote invalid RD request")]
    RemoteInvalidRdRequest,
    /// `IBV_WC_REM_ABORT_ERR`: remote aborted.
    #[error("Remote aborted")]
    RemoteAborted,
    /// `IBV_WC_INV_EECN_ERR`: invalid EE context number.
    #[error("Invalid EEC number")]
    InvalidEecNumber,
    /// `IBV_WC_INV_EEC_STATE_ERR`: invalid EE context state.
    #[error("Invalid EEC state")]
    InvalidEecState,
    /// `IBV_WC_FATAL_ERR`: fatal device error.
    #[error("Fatal device error")]
    Fatal,
    /// `IBV_WC_RESP_TIMEOUT_ERR`: response timeout.
    #[error("Response timeout")]
    ResponseTimeout,
    /// `IBV_WC_GENERAL_ERR`: general error.
    #[error("General error")]
    General,
    /// `IBV_WC_TM_ERR`: tag matching error.
    #[error("Tag matching error")]
    TagMatching,
    /// `IBV_WC_TM_RNDV_INCOMPLETE`: tag matching rendezvous incomplete.
    #[error("Tag matching rendezvous incomplete")]
    TagMatchingRendezvousIncomplete,
    /// A status value this crate does not know.
    #[error("Unknown completion status {0}")]
    Unknown(u32),
    /// Not a device status: `ibv_post_send` failed part-way through this
    /// request, so only some of its READs were posted and the range is
    /// incomplete.
    #[error("Only part of the request could be posted")]
    PostFailed,
}

impl WcError {
    /// Map an `ibv_wc_status` value; `None` for `IBV_WC_SUCCESS`.
    #[must_use]
    pub fn from_status(status: u32) -> Option<WcError> {
        use crate::sys::ibv_wc_status as s;
        Some(match status {
            s::IBV_WC_SUCCESS => return None,
            s::IBV_WC_LOC_LEN_ERR => WcError::LocalLengthError,
            s::IBV_WC_LOC_QP_OP_ERR => WcError::LocalQpOperationError,
            s::IBV_WC_LOC_EEC_OP_ERR => WcError::LocalEecOperationError,
            s::IBV_WC_LOC_PROT_ERR => WcError::LocalProtectionError,
            s::IBV_WC_WR_FLUSH_ERR => WcError::WrFlushErr,
            s::IBV_WC_MW_BIND_ERR => WcError::MemoryWindowBindError,
            s::IBV_WC_BAD_RESP_ERR => WcError::BadResponse,
            s::IBV_WC_LOC_ACCESS_ERR => WcError::LocalAccessError,
            s::IBV_WC_REM_INV_REQ_ERR => WcError::RemoteInvalidRequest,
            s::IBV_WC_REM_ACCESS_ERR => WcError::RemoteAccessError,
            s::IBV_WC_REM_OP_ERR => WcError::RemoteOperationError,
            s::IBV_WC_RETRY_EXC_ERR => WcError::RetryExceeded,
            s::IBV_WC_RNR_RETRY_EXC_ERR => WcError::RnrRetryExceeded,
            s::IBV_WC_LOC_RDD_VIOL_ERR => WcError::LocalRddViolation,
            s::IBV_WC_REM_INV_RD_REQ_ERR => WcError::RemoteInvalidRdRequest,
            s::IBV_WC_REM_ABORT_ERR => WcError::RemoteAborted,
            s::IBV_WC_INV_EECN_ERR => WcError::InvalidEecNumber,
            s::IBV_WC_INV_EEC_STATE_ERR => WcError::InvalidEecState,
            s::IBV_WC_FATAL_ERR => WcError::Fatal,
            s::IBV_WC_RESP_TIMEOUT_ERR => WcError::ResponseTimeout,
            s::IBV_WC_GENERAL_ERR => WcError::General,
            s::IBV_WC_TM_ERR => WcError::TagMatching,
            s::IBV_WC_TM_RNDV_INCOMPLETE => WcError::TagMatchingRendezvousIncomplete,
            other => WcError::Unknown(other),
        })
    }

    /// True for [`WcError::WrFlushErr`]: a consequence of an earlier failure
    /// (or of [`ConnectedQp::force_error`](crate::ConnectedQp::force_error)),
    /// not a failure of this request itself.
    #[must_use]
    pub fn is_flush(&self) -> bool {
        matches!(self, WcError::WrFlushErr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_known_status_maps_to_its_own_variant() {
        assert_eq!(WcError::from_status(0), None);
        let mapped: Vec<WcError> = (1..=23).filter_map(WcError::from_status).collect();
        assert_eq!(mapped.len(), 23);
        for (i, a) in mapped.iter().enumerate() {
            assert!(
                !matches!(a, WcError::Unknown(_)),
                "status {} unmapped",
                i + 1
            );
            for b in &mapped[i + 1..] {
                assert_ne!(a, b);
            }
        }
        assert_eq!(WcError::from_status(10), Some(WcError::RemoteAccessError));
        assert_eq!(WcError::from_status(12), Some(WcError::RetryExceeded));
        assert_eq!(WcError::from_status(5), Some(WcError::WrFlushErr));
        assert_eq!(WcError::from_status(99), Some(WcError::Unknown(99)));
    }

    #[test]
    fn no_rdma_errnos_are_unsupported() {
        for errno in [libc::ENOSYS, libc::EOPNOTSUPP, libc::ENODEV] {
            let e = verbs_error(
                "ibv_get_device_list",
                io::Error::from_raw_os_error(errno),
                |s| Error::ListDevices { source: s },
            );
            assert!(e.is_no_rdma(), "{e:?}");
        }
        let e = verbs_error(
            "ibv_get_device_list",
            io::Error::from_raw_os_error(libc::EPERM),
            |s| Error::ListDevices { source: s },
        );
        assert!(!e.is_no_rdma());
        assert!(Error::NoDevice.is_no_rdma());
    }
}
