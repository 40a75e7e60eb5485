//! The sidecar's end of a VMM link: request, then expect a reply.

use std::os::fd::RawFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use ferry_engine::session::{Failure, FailureKind};
use ferry_proto::common::{Message, MAX_FRAME};
use ferry_proto::frame::{recv_with_fds, send_with_fds};
use ferry_proto::vmm::VmmMsg;
use ferry_proto::ProtoError;

/// How long a VMM may take to answer one request. Pausing, saving state and loading a
/// multi-GiB VM (with its own page check) are the slow ones; 120 s bounds a hung VMM.
pub const VMM_REPLY_TIMEOUT: Duration = Duration::from_secs(120);

/// Errors talking to a VMM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The request could not be sent: the VMM is gone and never saw it.
    #[error("VMM link closed before {request} was delivered")]
    NotDelivered {
        /// Request name.
        request: &'static str,
        /// Cause.
        #[source]
        source: ProtoError,
    },
    /// The link failed (the VMM died, closed it, or did not answer in time).
    #[error("VMM link failed during {request}")]
    Link {
        /// Request name.
        request: &'static str,
        /// Cause.
        #[source]
        source: ProtoError,
    },
    /// The VMM answered with an error.
    #[error("VMM refused {request}: {message}")]
    Refused {
        /// Request name.
        request: &'static str,
        /// The VMM's message.
        message: String,
    },
    /// The VMM answered something else.
    #[error("VMM answered {got} to {request}")]
    Unexpected {
        /// Request name.
        request: &'static str,
        /// Reply name.
        got: &'static str,
    },
}

impl VmmError {
    /// The failure the sessions see.
    pub fn failure(&self) -> Failure {
        let kind = match self {
            VmmError::Link { .. } | VmmError::NotDelivered { .. } => FailureKind::VmmLost,
            _ => FailureKind::VmmRefused,
        };
        Failure::new(kind, self.to_string())
    }
}

/// Sends `req` (with `fds`) and returns the reply; `Error`/`Refused` replies become
/// [`VmmError::Refused`].
///
/// # Errors
///
/// [`VmmError`].
pub fn request(sock: &UnixStream, req: &VmmMsg, fds: &[RawFd]) -> Result<VmmMsg, VmmError> {
    let name = req.name();
    let link = |source| VmmError::Link {
        request: name,
        source,
    };
    sock.set_read_timeout(Some(VMM_REPLY_TIMEOUT))
        .map_err(|e| link(ProtoError::io("set VMM timeout")(e)))?;
    send_with_fds(sock, req, fds).map_err(|source| VmmError::NotDelivered {
        request: name,
        source,
    })?;
    let (reply, _fds) = recv_with_fds::<VmmMsg>(sock, MAX_FRAME).map_err(link)?;
    match reply {
        VmmMsg::Error { message } | VmmMsg::Refused { reason: message } => Err(VmmError::Refused {
            request: name,
            message,
        }),
        other => Ok(other),
    }
}

/// [`request`] expecting `Ok`.
///
/// # Errors
///
/// [`VmmError`].
pub fn request_ok(sock: &UnixStream, req: &VmmMsg) -> Result<(), VmmError> {
    match request(sock, req, &[])? {
        VmmMsg::Ok => Ok(()),
        other => Err(VmmError::Unexpected {
            request: req.name(),
            got: other.name(),
        }),
    }
}
