//! The source's transports, as the sessions see them ([`Transport`]): a window's control
//! messages around the data movers of `ferry-tcp-fallback` and `ferry-verbs`.
//!
//! TCP: `RoundStart`, the pages pushed over the data connections, the destination's
//! `RoundDone` (with the pages that failed their checksum). RDMA: `RoundStart`, the
//! window's ranges streamed as `PullRanges` while the destination pulls them, then
//! `RoundDone`, or `RdmaFailed` with the ranges it could not confirm.

use ferry_engine::plan::PageRange;
use ferry_engine::session::TransportKind;
use ferry_engine::transport::{
    PhaseCpu, RoundStats, Transport, TransportError, Window, WindowOutcome,
};
use ferry_engine::PAGE_SIZE;
use ferry_proto::common::{Message, MAX_FRAME};
use ferry_proto::frame::{read_msg, write_msg};
use ferry_proto::peer::{PeerMsg, MAX_PULL_RANGES};
use ferry_proto::ProtoError;
use ferry_tcp_fallback::TcpSender;

use crate::bandwidth::Flow;
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
                cpu_us,
            } if round == w.wire_round => {
                if pages != w.plan.pages() || bytes != sent.bytes {
                    return Err(TransportError::Protocol(format!(
                        "destination confirmed {pages} pages / {bytes} bytes of round {round}; {} / {} were sent",
                        w.plan.pages(),
                        sent.bytes
                    )));
                }
                let ns = |us: u64| us.saturating_mul(1000);
                let peer_cpu = PhaseCpu {
                    data_ns: ns(cpu_us[0]),
                    hash_ns: ns(cpu_us[1]),
                    populate_ns: ns(cpu_us[2]),
                };
                Ok(WindowOutcome::Done(RoundStats {
                    torn,
                    peer_cpu,
                    ..sent
                }))
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
    /// The migration's bandwidth: with a cap in force the list goes out in pieces of
    /// about 100 ms each, each booked before the destination may pull it.
    pub pace: Option<&'a Flow>,
}

/// Smallest and largest piece of a paced pull list.
const PACED_PIECE: (u64, u64) = (256 << 10, 16 << 20);

/// `ranges` cut so that no piece of the list is larger than `piece_bytes`, grouped into
/// pieces of at most that many bytes (and [`MAX_PULL_RANGES`] ranges).
fn paced_pieces(ranges: &[PageRange], piece_bytes: u64) -> Vec<Vec<PageRange>> {
    let per_piece = (piece_bytes / PAGE_SIZE).max(1);
    let mut pieces = vec![Vec::new()];
    let mut room = per_piece;
    for r in ranges {
        let mut left = *r;
        while left.count > 0 {
            if room == 0 || pieces.last().is_some_and(|p| p.len() >= MAX_PULL_RANGES) {
                pieces.push(Vec::new());
                room = per_piece;
            }
            let n = left.count.min(room);
            pieces.last_mut().expect("never empty").push(PageRange {
                region: left.region,
                first: left.first,
                count: n,
            });
            left.first += n;
            left.count -= n;
            room -= n;
        }
    }
    pieces
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
        if let Some((flow, rate)) = self.pace.and_then(|f| f.rate().map(|r| (f, r))) {
            let piece = (rate / 10 / PAGE_SIZE * PAGE_SIZE).clamp(PACED_PIECE.0, PACED_PIECE.1);
            let all: Vec<PageRange> = w.plan.ranges().copied().collect();
            let pieces = paced_pieces(&all, piece);
            let n = pieces.len();
            for (i, ranges) in pieces.into_iter().enumerate() {
                flow.take(ranges.iter().map(|r| r.count).sum::<u64>() * PAGE_SIZE);
                write_msg(
                    self.ctl,
                    &PeerMsg::PullRanges {
                        round: w.wire_round,
                        ranges,
                        last: i + 1 == n,
                    },
                )
                .map_err(link)?;
            }
            return self.finish(w, progress);
        }
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
        self.finish(w, progress)
    }
}

impl RdmaPath<'_> {
    /// The destination's answer to a pulled window.
    fn finish(
        &mut self,
        w: &Window,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<WindowOutcome, TransportError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paced_pieces_cover_the_list_in_order_and_stay_within_their_size() {
        let r = |region, first, count| PageRange {
            region,
            first,
            count,
        };
        let list = vec![r(0, 0, 10), r(0, 20, 3), r(1, 5, 7)];
        let pieces = paced_pieces(&list, 4 * PAGE_SIZE);
        for p in &pieces {
            assert!(p.iter().map(|x| x.count).sum::<u64>() <= 4, "{p:?}");
        }
        let flat: Vec<(u32, u64)> = pieces
            .iter()
            .flatten()
            .flat_map(|x| (x.first..x.end()).map(move |p| (x.region, p)))
            .collect();
        let want: Vec<(u32, u64)> = list
            .iter()
            .flat_map(|x| (x.first..x.end()).map(move |p| (x.region, p)))
            .collect();
        assert_eq!(flat, want);
        assert_eq!(pieces.len(), 5); // 20 pages in pieces of 4
        assert_eq!(
            paced_pieces(&[], 4 * PAGE_SIZE),
            vec![Vec::<PageRange>::new()]
        );
    }
}
