//! A migration's start. The source's side: connect and authenticate, offer the VM, open
//! the data connections, and find out whether RDMA works between the two hosts (a full
//! destination answers [`DestinationBusy`]). The destination's side: [`check_offer`].
//!
//! TCP data connections always exist, so RDMA can hand its unfinished ranges to them
//! mid-round without a pause. RDMA is tried only with a destination the operator allowed
//! (`--rdma-peer`: RDMA is not encrypted), when both hosts have a device; `--transport
//! rdma` makes a missing device or permission an error instead of a fall back to TCP.

use std::sync::Arc;

use anyhow::{bail, Context};
use ferry_engine::session::{SessionId, TransportKind};
use ferry_engine::PAGE_SIZE;
use ferry_proto::cli::{MigrateRequest, TransportChoice};
use ferry_proto::common::{RegionInfo, MAX_FRAME};
use ferry_proto::frame::{read_msg, write_msg};
use ferry_proto::mem::PAGE;
use ferry_proto::net::Timeouts;
use ferry_proto::peer::{unexpected, PeerMsg, OFFER_RDMA, OFFER_TCP};
use ferry_tcp_fallback::TcpSender;
use ferry_verbs::RdmaExport;

use crate::context::Daemon;
use crate::peer::{connect_control, connect_data, Control, PeerStream};
use crate::registry::SourceVm;

/// What the start of a migration set up.
pub struct Negotiated {
    /// The authenticated control connection.
    pub ctl: Control,
    /// The TCP data path.
    pub sender: TcpSender,
    /// The RDMA export, when RDMA is the data path.
    pub rdma: Option<RdmaExport>,
    /// Transports in order of use, with their channels.
    pub transports: Vec<(TransportKind, usize)>,
    /// Why this transport, for the summary.
    pub reason: String,
    /// How long the destination took to prepare its memory.
    pub prepare_us: u64,
    /// Where the sending threads run, and why.
    pub placement: String,
}

/// Longest the source waits for any answer on the control connection: the destination
/// VMM's longest request (`VMM_REPLY_TIMEOUT`: `CheckCompat`, `Load`, `Start`) with a
/// margin, plus 1 s per 64 MiB of guest RAM for what grows with it (populating memory, a
/// final round pulled over RDMA). A destination that is alive but stuck cannot keep the
/// source waiting, its VM paused, for longer.
pub fn control_timeout(guest_bytes: u64) -> std::time::Duration {
    let t =
        crate::vmm::VMM_REPLY_TIMEOUT + std::time::Duration::from_secs(30 + (guest_bytes >> 26));
    #[cfg(feature = "fault-injection")]
    let t = crate::faults::control_timeout(t);
    t
}

/// Connects, offers and sets up the data paths for migrating `vm`.
///
/// # Errors
///
/// Anything that stops the migration before its first page; the destination's reason
/// when it refused.
pub fn negotiate(
    d: &Daemon,
    req: &MigrateRequest,
    vm: &SourceVm,
    session: SessionId,
) -> anyhow::Result<Negotiated> {
    let channels = usize::from(req.channels);
    let (mut export, mut reason) = match req.transport {
        TransportChoice::Tcp => (None, "requested".to_string()),
        choice => {
            let explicit = choice == TransportChoice::Rdma;
            let device = match ferry_verbs::device_reports() {
                Ok(r) if !r.is_empty() => Ok(()),
                Ok(_) => Err("no device".to_string()),
                Err(e) => Err(e.to_string()),
            };
            match device {
                Err(e) if explicit => bail!("RDMA was requested but is unavailable on the source: {e}"),
                Err(e) => (None, format!("auto: no RDMA on the source ({e})")),
                // RDMA is not encrypted: only to peers the operator listed, asked for or not.
                Ok(()) if explicit && !d.rdma_allowed(&req.to) => bail!(
                    "RDMA was requested but {} is not an allowed RDMA peer (ferry serve --rdma-peer): RDMA is not encrypted",
                    req.to
                ),
                Ok(()) if !d.rdma_allowed(&req.to) => (
                    None,
                    format!(
                        "auto: RDMA is not allowed for {} (ferry serve --rdma-peer); RDMA is not encrypted",
                        req.to
                    ),
                ),
                Ok(()) => match RdmaExport::new(&vm.mem, channels) {
                    Ok(e) => (Some(e), String::new()),
                    Err(e) if explicit => {
                        bail!("RDMA was requested but is unavailable on the source: {e}")
                    }
                    Err(e) => (None, format!("auto: no RDMA on the source ({e})")),
                },
            }
        }
    };
    let mut ctl = connect_control(&d.auth, &req.to)?;
    let guest: u64 = vm.regions.iter().map(|r| r.size).sum();
    // Both ways: a destination that stops reading must not block a write forever either.
    ctl.stream
        .tcp()
        .set_timeouts(Some(control_timeout(guest)))?;
    write_msg(
        &mut ctl.stream,
        &PeerMsg::Offer {
            vm_id: req.vm_id.clone(),
            page_size: PAGE_SIZE as u32,
            regions: vm.regions.clone(),
            channels: req.channels,
            transports: OFFER_TCP | if export.is_some() { OFFER_RDMA } else { 0 },
            cpu_profile: vm.cpu_profile.clone(),
            session,
            backing_page_size: vm.backing_page_size,
        },
    )?;
    let prepare_us = match read_msg(&mut ctl.stream, MAX_FRAME)? {
        PeerMsg::Accept { prepare_us } => prepare_us,
        PeerMsg::Busy { running, limit } => return Err(DestinationBusy { running, limit }.into()),
        other => return Err(unexpected("Accept", other).into()),
    };
    let mut streams = Vec::with_capacity(channels);
    let send_buffer = crate::peer::data_send_buffer(ctl.stream.tcp(), req.channels);
    for ch in 0..req.channels {
        streams.push(
            connect_data(&d.auth, &req.to, session, &ctl.key, ch, send_buffer)?.into_channel()?,
        );
    }
    let mut sender = TcpSender::with_channels(streams, Arc::clone(&vm.mem));
    let local = ctl.stream.tcp().local_addr().ok().map(|a| a.ip());
    let placement = crate::placement::for_connection(&d.cfg.data_cpus, local);
    tracing::info!(vm = %req.vm_id, placement = %placement.why, "data threads placed");
    sender.bind_to(placement.cpus);
    let mut transports = vec![(TransportKind::Tcp, channels)];
    if let Some(exp) = export.as_mut() {
        match rdma_handshake(&mut ctl.stream, exp)? {
            Ok(()) => {
                reason = format!(
                    "both sidecars have RDMA and {channels} queue pairs connected ({}); the destination pulls with RDMA READ (not encrypted)",
                    exp.describe()
                );
                transports.insert(0, (TransportKind::Rdma, channels));
            }
            Err(why) if req.transport == TransportChoice::Rdma => {
                bail!("RDMA was requested: {why}")
            }
            Err(why) => reason = format!("auto: {why}"),
        }
    }
    if transports[0].0 == TransportKind::Tcp {
        export = None;
    }
    Ok(Negotiated {
        ctl,
        sender,
        rdma: export,
        transports,
        reason,
        prepare_us,
        placement: placement.why,
    })
}

/// Offers the export and connects its queue pairs; `Ok(Err(why))` when RDMA is not to be.
fn rdma_handshake(
    ctl: &mut PeerStream,
    exp: &mut RdmaExport,
) -> anyhow::Result<Result<(), String>> {
    write_msg(ctl, &PeerMsg::RdmaOffer { blob: exp.offer() })?;
    Ok(
        match read_msg(ctl, MAX_FRAME).context("waiting for the RDMA answer")? {
            PeerMsg::RdmaAnswer { blob } => match exp.connect(&blob) {
                Ok(()) => Ok(()),
                Err(e) => {
                    // The destination thinks RDMA is on: tell it otherwise.
                    let reason = format!("the source could not connect its queue pairs: {e}");
                    write_msg(
                        ctl,
                        &PeerMsg::RdmaUnavailable {
                            reason: reason.clone(),
                        },
                    )?;
                    Err(reason)
                }
            },
            PeerMsg::RdmaUnavailable { reason } => {
                Err(format!("no RDMA at the destination ({reason})"))
            }
            other => return Err(unexpected("RdmaAnswer", other).into()),
        },
    )
}

// ---- the destination's side: checking an offer ----

/// Most data channels a peer may ask for: far above what fills any link (8 streams
/// fill 100 Gb/s with Ferry's batches), low enough to bound threads and sockets.
pub const MAX_CHANNELS: u16 = 64;

fn mem_available() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Huge pages of `size` bytes on this host that no mapping has claimed yet (free, less
/// those reserved by mappings that have not faulted them in).
fn free_huge_pages(size: u64) -> Option<u64> {
    let read = |name: &str| -> Option<u64> {
        let p = format!("/sys/kernel/mm/hugepages/hugepages-{}kB/{name}", size >> 10);
        std::fs::read_to_string(p).ok()?.trim().parse().ok()
    };
    Some(read("free_hugepages")?.saturating_sub(read("resv_hugepages")?))
}

/// Checks an offer against what this host can do; the error text goes to the source.
pub fn check_offer(
    page_size: u32,
    regions: &[RegionInfo],
    channels: u16,
    transports: u8,
    backing_page_size: u64,
) -> Result<u64, String> {
    if page_size as usize != PAGE {
        return Err(format!(
            "page size {page_size} is not supported (only {PAGE})"
        ));
    }
    if regions.is_empty() {
        return Err("the offer has no RAM regions".into());
    }
    if transports & ferry_proto::peer::OFFER_TCP == 0 {
        // TCP carries the control messages and the fallback: it is never optional.
        return Err(format!("transports {transports:#x} do not include TCP"));
    }
    // Whole pages, aligned, in order, not overlapping: what a VMM may register.
    ferry_proto::common::check_layout(regions)?;
    if channels == 0 || channels > MAX_CHANNELS {
        return Err(format!(
            "{channels} channels requested; 1 to {} are allowed",
            MAX_CHANNELS
        ));
    }
    if !backing_page_size.is_power_of_two() || !(PAGE as u64..=1 << 30).contains(&backing_page_size)
    {
        return Err(format!(
            "backing page size {backing_page_size} is not supported"
        ));
    }
    for (i, r) in regions.iter().enumerate() {
        if [r.gpa, r.size, r.offset]
            .iter()
            .any(|v| !v.is_multiple_of(backing_page_size))
        {
            return Err(format!(
                "region {i} is not whole {backing_page_size}-byte pages"
            ));
        }
    }
    // Non-overlapping spans of the address space: their sizes add up without overflow.
    let total: u64 = regions.iter().map(|r| r.size).sum();
    if backing_page_size != PAGE as u64 {
        // Huge pages come from their own pool, not from MemAvailable.
        let need = total / backing_page_size;
        let free = free_huge_pages(backing_page_size).unwrap_or(0);
        if need > free {
            return Err(format!(
                "the VM needs {need} huge pages of {} KiB; this host has {free} free",
                backing_page_size >> 10
            ));
        }
        return Ok(total);
    }
    if let Some(avail) = mem_available() {
        // Keep 256 MiB for the host: the destination must not push its host into OOM.
        if total.saturating_add(256 << 20) > avail {
            return Err(format!(
                "the VM needs {} MiB of RAM; this host has {} MiB available",
                total >> 20,
                avail >> 20
            ));
        }
    }
    Ok(total)
}

/// The destination runs as many incoming migrations as it allows: not a failure, the
/// migration waits in the queue and is offered again.
#[derive(Debug, thiserror::Error)]
#[error("the destination runs {running} of its {limit} incoming migrations")]
pub struct DestinationBusy {
    /// Incoming migrations running there.
    pub running: u32,
    /// Its `max_incoming`.
    pub limit: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offers_are_checked() {
        let r = |size| RegionInfo {
            gpa: 0,
            size,
            offset: 0,
        };
        let both = ferry_proto::peer::OFFER_TCP | ferry_proto::peer::OFFER_RDMA;
        assert!(check_offer(4096, &[r(1 << 20)], 4, both, 4096).is_ok());
        assert!(check_offer(8192, &[r(1 << 20)], 4, both, 4096).is_err());
        assert!(check_offer(4096, &[], 4, both, 4096).is_err());
        assert!(check_offer(4096, &[r(1 << 20)], 0, both, 4096).is_err());
        assert!(check_offer(4096, &[r(1 << 20)], 65, both, 4096).is_err());
        assert!(check_offer(4096, &[r(1000)], 4, both, 4096).is_err());
        assert!(check_offer(4096, &[r(1 << 20)], 4, ferry_proto::peer::OFFER_RDMA, 4096).is_err());
        assert!(check_offer(4096, &[r(u64::MAX - 4095), r(1 << 20)], 4, both, 4096).is_err());
        // Overlapping and unaligned regions.
        assert!(check_offer(4096, &[r(1 << 20), r(1 << 20)], 4, both, 4096).is_err());
        let unaligned = RegionInfo {
            gpa: 100,
            size: 1 << 20,
            offset: 0,
        };
        assert!(check_offer(4096, &[unaligned], 4, both, 4096).is_err());
        let huge = check_offer(4096, &[r(1 << 50)], 4, both, 4096).expect_err("too big");
        assert!(huge.contains("MiB available"), "{huge}");
        // Huge pages: a power of two, whole pages of it, and enough free ones here.
        let two_mib = 2 << 20;
        assert!(check_offer(4096, &[r(1 << 20)], 4, both, 3 << 20).is_err());
        let half = check_offer(4096, &[r(1 << 20)], 4, both, two_mib).expect_err("half");
        assert!(half.contains("not whole"), "{half}");
        let lots = check_offer(4096, &[r(1 << 50)], 4, both, two_mib).expect_err("too many");
        assert!(lots.contains("huge pages"), "{lots}");
    }
}
