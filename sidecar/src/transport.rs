//! The source's transports, as the sessions see them ([`Transport`]): a window's control
//! messages around the data movers of `ferry-tcp-fallback` and `ferry-verbs`.
//!
//! TCP: `RoundStart`, the pages pushed over the data connections, the destination's
//! `RoundDone` (with the pages that failed their checksum). RDMA: `RoundStart`, the
//! window's ranges streamed as `PullRanges` while the destination pulls them, then
//! `RoundDone`, or `RdmaFailed` with the ranges it could not confirm.

use ferry_engine::session::TransportKind;
use ferry_engine::transport::{RoundStats, Transport, TransportError, Window, WindowOutcome};
use ferry_engine::PAGE_SIZE;
use ferry_proto::common::{Message, MAX_FRAME};
use ferry_proto::frame::{read_msg, write_msg};
use ferry_proto::peer::{PeerMsg, MAX_PULL_RANGES};
use ferry_proto::ProtoError;
use ferry_tcp_fallback::TcpSender;

use crate::peer::PeerStream;

fn link(e: ProtoError) -> TransportError {
    if e.is_disconnect() {
        TransportError::PeerGone(e.to_string())
    } else {
        TransportError::Protocol(e.to_string())
    }
}

fn start(ctl: &mut PeerStream, w: &Window) -> Result<(), TransportError> {
    write_msg(
        ctl,
        &PeerMsg::RoundStart {
            round: w.wire_round,
            final_round: w.final_round,
        },
    )
    .map_err(link)
}

fn refused(what: &str, got: PeerMsg) -> TransportError {
    match got {
        PeerMsg::Refused { reason } => {
            TransportError::Protocol(format!("destination refused {what}: {reason}"))
        }
        other => {
            TransportError::Protocol(format!("destination answered {} to {what}", other.name()))
        }
    }
}

/// Multi-stream TCP for one window, borrowing the migration's sender and control link.
pub struct TcpPath<'a> {
    /// The data connections.
    pub sender: &'a mut TcpSender,
    /// The control connection.
    pub ctl: &'a mut PeerStream,
}

impl Transport for TcpPath<'_> {
    fn kind(&self) -> TransportKind {
        TransportKind::Tcp
    }

    fn channels(&self) -> usize {
        self.sender.channels()
    }

    fn send_window(
        &mut self,
        w: &Window,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<WindowOutcome, TransportError> {
        start(self.ctl, w)?;
        let sent = self.sender.send_plan(w.wire_round, &w.plan, progress)?;
        match read_msg(self.ctl, MAX_FRAME).map_err(link)? {
            PeerMsg::RoundDone {
                round,
                pages,
                bytes,
                torn,
            } if round == w.wire_round => {
                if pages != w.plan.pages() || bytes != sent.bytes {
                    return Err(TransportError::Protocol(format!(
                        "destination confirmed {pages} pages / {bytes} bytes of round {round}; {} / {} were sent",
                        w.plan.pages(),
                        sent.bytes
                    )));
                }
                Ok(WindowOutcome::Done(RoundStats { torn, ..sent }))
            }
            other => Err(refused("a round", other)),
        }
    }
}

/// RDMA READ for one window: the destination pulls, the source streams the list.
pub struct RdmaPath<'a> {
    /// Queue pairs per migration.
    pub channels: usize,
    /// The control connection.
    pub ctl: &'a mut PeerStream,
}

impl Transport for RdmaPath<'_> {
    fn kind(&self) -> TransportKind {
        TransportKind::Rdma
    }

    fn channels(&self) -> usize {
        self.channels
    }

    fn send_window(
        &mut self,
        w: &Window,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<WindowOutcome, TransportError> {
        start(self.ctl, w)?;
        // The list in pieces of at most MAX_PULL_RANGES; an empty list is one empty piece.
        let mut ranges = w.plan.ranges().copied().peekable();
        loop {
            let piece: Vec<_> = ranges.by_ref().take(MAX_PULL_RANGES).collect();
            let last = ranges.peek().is_none();
            write_msg(
                self.ctl,
                &PeerMsg::PullRanges {
                    round: w.wire_round,
                    ranges: piece,
                    last,
                },
            )
            .map_err(link)?;
            if last {
                break;
            }
        }
        match read_msg(self.ctl, MAX_FRAME).map_err(link)? {
            PeerMsg::RoundDone {
                round,
                pages,
                bytes,
                ..
            } if round == w.wire_round => {
                // Every page of the list is pulled whole: nothing else adds up.
                if pages != w.plan.pages() || Some(bytes) != pages.checked_mul(PAGE_SIZE) {
                    return Err(TransportError::Protocol(format!(
                        "destination confirmed {pages} pages / {bytes} bytes of pulled round {round}; {} pages were listed",
                        w.plan.pages()
                    )));
                }
                progress(bytes);
                Ok(WindowOutcome::Done(RoundStats {
                    pages,
                    bytes,
                    ..RoundStats::default()
                }))
            }
            PeerMsg::RdmaFailed {
                round,
                reason,
                confirmed_pages,
                unfinished,
            } if round == w.wire_round => {
                if confirmed_pages > w.plan.pages() {
                    return Err(TransportError::Protocol(format!(
                        "destination confirmed {confirmed_pages} pages of pulled round {round}; {} were listed",
                        w.plan.pages()
                    )));
                }
                tracing::warn!(round, %reason, unfinished = unfinished.len(), "RDMA failed; the rest goes over TCP");
                progress(confirmed_pages * PAGE_SIZE);
                Ok(WindowOutcome::Unfinished {
                    confirmed: RoundStats {
                        pages: confirmed_pages,
                        bytes: confirmed_pages * PAGE_SIZE,
                        ..RoundStats::default()
                    },
                    unfinished,
                    reason,
                })
            }
            other => Err(refused("a pulled round", other)),
        }
    }
}
