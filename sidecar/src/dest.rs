//! The destination side of a migration: prepare memory, receive rounds, load the VM
//! into the waiting VMM, report the digest, and run the VM only on `Commit`.

use std::net::TcpStream;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ferry_engine::commit::{DestAction, DestCommit, DestEvent};
use ferry_engine::digest::{page_hash, PageHashes};
use ferry_engine::plan::PageRange;
use ferry_engine::transport::TransportError;
use ferry_proto::frame::{read_msg, write_msg};
use ferry_proto::mem::{GuestRegion, PAGE};
use ferry_proto::msg::{Msg, RegionInfo, MAX_FRAME, MAX_UNFINISHED};
use ferry_tcp_fallback::TcpReceiver;
use ferry_verbs::RdmaPuller;

use crate::daemon::{refuse, Daemon, HeldVm, WaitingVmm};
use crate::vmm::request;

/// Most data channels a peer may ask for: far above what fills any link (8 streams
/// fill 100 Gb/s with Ferry's batches), low enough to bound threads and sockets.
pub const MAX_CHANNELS: u16 = 64;

/// How long the data connections may take to arrive after `Accept`.
const DATA_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest silence on the data connections within a round before the source is
/// considered gone (keepalive usually notices first).
const ROUND_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Longest time one RDMA READ may stay unanswered before the queue pair is declared
/// dead (rxe reports nothing when the peer's QP dies, so the puller must time out).
const RDMA_STALL_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a replayed decision waits for the old control connection's handler to
/// notice the link is gone and park the loaded VM.
const SETTLE_WAIT: Duration = Duration::from_secs(30);

/// Fault injection for tests: fail RDMA queue pair 0 after this many bytes pulled.
const FAIL_RDMA_ENV: &str = "FERRY_TEST_FAIL_RDMA_AFTER_BYTES";

/// Checks page ranges a peer named (a pull list, or ranges handed back unfinished)
/// against the VM's layout before anything touches memory.
pub(crate) fn checked_ranges(
    list: &[(u32, u64, u64)],
    mem: &[GuestRegion],
) -> anyhow::Result<Vec<PageRange>> {
    list.iter()
        .map(|&(region, first, count)| {
            let ok = mem.get(region as usize).is_some_and(|r| {
                count > 0 && first.checked_add(count).is_some_and(|e| e <= r.npages())
            });
            if !ok {
                bail!("the peer named pages {first}+{count} of region {region}, outside the VM");
            }
            Ok(PageRange {
                region,
                first,
                count,
            })
        })
        .collect()
}

/// Pulls one round's ranges as the source streams their list. On a failure the rest of
/// the list is still read and handed back as unfinished.
fn pull_round(
    ctl: &mut TcpStream,
    puller: &mut RdmaPuller,
    mem: &[GuestRegion],
    landed: &PageHashes,
    round: u32,
) -> anyhow::Result<Msg> {
    let (mut pages, mut bytes) = (0u64, 0u64);
    let mut failure: Option<String> = None;
    let mut unfinished: Vec<(u32, u64, u64)> = Vec::new();
    let mut listed = 0u64;
    loop {
        let (r, list, last) = match read_msg(ctl, MAX_FRAME)? {
            Msg::PullRanges {
                round,
                ranges,
                last,
            } => (round, ranges, last),
            other => bail!("expected the round's pull list, got {}", other.name()),
        };
        if r != round {
            bail!("pull list of round {r} inside round {round}");
        }
        let ranges = checked_ranges(&list, mem)?;
        listed += ranges.iter().map(|x| x.count).sum::<u64>();
        if failure.is_some() {
            unfinished.extend(list);
        } else {
            let result = puller.pull(&ranges, &|_| {}, RDMA_STALL_TIMEOUT);
            // Hash what was pulled for the end-to-end digest (RC already checked the wire).
            // Ranges left unfinished are re-sent over TCP, which hashes them again.
            for x in &ranges {
                let r = &mem[x.region as usize];
                for p in x.first..x.end() {
                    let ptr = r.pages_ptr(p, 1).expect("range checked against the layout");
                    // SAFETY: this process owns the destination memory until it hands the
                    // memfds to the VMM; after `pull` returned no READ is in flight (the
                    // puller destroys failed QPs before returning).
                    let page = unsafe { std::slice::from_raw_parts(ptr, PAGE) };
                    landed.set(x.region, p, page_hash(page));
                }
            }
            match result {
                Ok(st) => {
                    pages += st.pages;
                    bytes += st.bytes;
                }
                Err(TransportError::Failed {
                    reason,
                    unfinished: left,
                }) => {
                    let left_pages: u64 = left.iter().map(|x| x.count).sum();
                    let chunk_pages: u64 = ranges.iter().map(|x| x.count).sum();
                    pages += chunk_pages.saturating_sub(left_pages);
                    bytes += chunk_pages.saturating_sub(left_pages) * PAGE as u64;
                    unfinished.extend(left.iter().map(|x| (x.region, x.first, x.count)));
                    failure = Some(reason);
                }
                Err(e) => {
                    unfinished.extend(list);
                    failure = Some(e.to_string());
                }
            }
        }
        if unfinished.len() > MAX_UNFINISHED {
            bail!("more than {MAX_UNFINISHED} unfinished ranges in round {round}");
        }
        if last {
            break;
        }
    }
    Ok(match failure {
        None => Msg::RoundDone {
            round,
            pages,
            bytes,
            torn: Vec::new(),
        },
        Some(reason) => {
            tracing::warn!(round, %reason, listed, confirmed = pages, "RDMA failed; handing the rest back for TCP");
            Msg::RdmaFailed {
                round,
                reason,
                confirmed_pages: pages,
                unfinished,
            }
        }
    })
}

/// Longest silence on the control connection between steps.
const CONTROL_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

fn mem_available() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Checks an offer against what this host can do; the error text goes to the source.
fn check_offer(page_size: u32, regions: &[RegionInfo], channels: u16) -> Result<u64, String> {
    if page_size as usize != PAGE {
        return Err(format!(
            "page size {page_size} is not supported (only {PAGE})"
        ));
    }
    if regions.is_empty() {
        return Err("the offer has no RAM regions".into());
    }
    if channels == 0 || channels > MAX_CHANNELS {
        return Err(format!(
            "{channels} channels requested; 1 to {MAX_CHANNELS} are allowed"
        ));
    }
    let mut total = 0u64;
    for r in regions {
        if r.size == 0 || r.size % PAGE as u64 != 0 {
            return Err(format!(
                "region at {:#x} has size {} (not whole pages)",
                r.gpa, r.size
            ));
        }
        total = total
            .checked_add(r.size)
            .ok_or_else(|| "region sizes overflow".to_string())?;
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

/// Handles an authenticated control connection carrying an offer.
///
/// # Errors
///
/// Whatever ended the migration; the waiting VMM gets the VM only on `Commit`.
pub fn run(d: &Arc<Daemon>, mut ctl: TcpStream, offer: Msg) -> anyhow::Result<()> {
    let Msg::Offer {
        vm_id,
        page_size,
        regions,
        channels,
        transports: _,
        cpu_profile,
        session,
    } = offer
    else {
        bail!("not an offer");
    };
    if let Err(reason) = check_offer(page_size, &regions, channels) {
        return Err(refuse(&mut ctl, reason));
    }
    let Some(vmm) = d.waiting.lock().expect("lock").remove(&vm_id) else {
        return Err(refuse(
            &mut ctl,
            format!("no VMM on this host waits for VM {vm_id}"),
        ));
    };
    // The waiting VMM decides whether this host can run the VM, before any memory moves.
    if let Err(e) = request(&vmm.link, &Msg::CheckCompat { cpu_profile }, &[]) {
        d.waiting.lock().expect("lock").insert(vm_id, vmm);
        return Err(refuse(
            &mut ctl,
            format!("the destination cannot run this VM: {e}"),
        ));
    }
    d.active
        .lock()
        .expect("lock")
        .insert(vm_id.clone(), "receiving".into());
    let mut fsm = DestCommit::new();
    if let Ok(c) = ctl.try_clone() {
        d.controls.lock().expect("lock").insert(session, c);
    }
    let res = receive(
        d, &mut ctl, &vm_id, &regions, channels, session, &vmm, &mut fsm,
    );
    d.active.lock().expect("lock").remove(&vm_id);
    let res = settle_outcome(d, &mut ctl, session, vm_id, vmm, &mut fsm, res);
    d.controls.lock().expect("lock").remove(&session);
    res
}

/// After `receive` ended: hold, discard, or nothing, per the state machine.
fn settle_outcome(
    d: &Arc<Daemon>,
    ctl: &mut TcpStream,
    session: [u8; 16],
    vm_id: String,
    vmm: WaitingVmm,
    fsm: &mut DestCommit,
    res: anyhow::Result<()>,
) -> anyhow::Result<()> {
    match (&res, fsm.phase()) {
        (Ok(()), _) => {}
        (Err(e), _) => {
            let lost = e
                .downcast_ref::<ferry_proto::ProtoError>()
                .is_some_and(|p| p.is_disconnect());
            let event = if lost {
                DestEvent::LinkLost
            } else {
                DestEvent::Abort
            };
            match fsm.on(event) {
                DestAction::Hold => {
                    tracing::error!(
                        %vm_id,
                        "link to the source lost after Ready: holding the loaded, paused VM until the source's decision is replayed"
                    );
                    d.held
                        .lock()
                        .expect("lock")
                        .insert(session, HeldVm { vm_id, vmm });
                    return res;
                }
                _ => {
                    let _ = write_msg(
                        ctl,
                        &Msg::Refused {
                            reason: format!("{e:#}"),
                        },
                    );
                    if let Err(err) = request(&vmm.link, &Msg::Discard, &[]) {
                        tracing::warn!(%vm_id, "waiting VMM did not take Discard: {err}");
                        return res;
                    }
                }
            }
            // The VMM waits on for another attempt.
            d.waiting.lock().expect("lock").insert(vm_id, vmm);
        }
    }
    res
}

/// Runs a committed VM and remembers the session as running here (so a replayed
/// `Commit` whose `PeerRunning` got lost is answered). Returns the VMM's line.
fn start_vm(d: &Daemon, vmm: &WaitingVmm, vm_id: &str, session: [u8; 16]) -> String {
    let detail = match request(&vmm.link, &Msg::Start, &[]) {
        Ok(Msg::Running { detail }) => detail,
        Ok(other) => format!("VMM answered {} to Start", other.name()),
        Err(e) => format!("VMM failed to start the committed VM: {e}"),
    };
    tracing::info!(%vm_id, %detail, "VM runs here");
    d.running
        .lock()
        .expect("lock")
        .insert(session, detail.clone());
    detail
}

/// Settles a held VM with the source's replayed decision.
///
/// # Errors
///
/// An unknown session (answered with `Refused`), or a VMM failing to discard.
pub fn settle(
    d: &Arc<Daemon>,
    mut ctl: TcpStream,
    session: [u8; 16],
    commit: bool,
) -> anyhow::Result<()> {
    if let Some(detail) = d.running.lock().expect("lock").get(&session).cloned() {
        if commit {
            write_msg(&mut ctl, &Msg::PeerRunning { detail })?;
            return Ok(());
        }
        return Err(refuse(
            &mut ctl,
            "the VM of that session already runs here".into(),
        ));
    }
    // The replay may arrive before this side noticed the old link die (a half-open
    // connection can look alive for minutes): cut it, then wait for its handler to
    // park the VM.
    if let Some(old) = d.controls.lock().expect("lock").get(&session) {
        let _ = old.shutdown(std::net::Shutdown::Both);
    }
    let end = Instant::now() + SETTLE_WAIT;
    let held = loop {
        if let Some(h) = d.held.lock().expect("lock").remove(&session) {
            break Some(h);
        }
        if let Some(detail) = d.running.lock().expect("lock").get(&session).cloned() {
            write_msg(&mut ctl, &Msg::PeerRunning { detail })?;
            return Ok(());
        }
        if Instant::now() >= end || !d.controls.lock().expect("lock").contains_key(&session) {
            break d.held.lock().expect("lock").remove(&session);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let Some(held) = held else {
        return Err(refuse(&mut ctl, "no VM is held for that session".into()));
    };
    let HeldVm { vm_id, vmm } = held;
    if commit {
        let detail = start_vm(d, &vmm, &vm_id, session);
        tracing::info!(%vm_id, "the replayed Commit was carried out");
        write_msg(&mut ctl, &Msg::PeerRunning { detail })?;
    } else {
        request(&vmm.link, &Msg::Discard, &[])?;
        tracing::info!(%vm_id, "replayed Abort: the held VM is discarded");
        d.waiting.lock().expect("lock").insert(vm_id, vmm);
        write_msg(&mut ctl, &Msg::Ok)?;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn receive(
    d: &Daemon,
    ctl: &mut TcpStream,
    vm_id: &str,
    regions: &[RegionInfo],
    channels: u16,
    session: [u8; 16],
    vmm: &WaitingVmm,
    fsm: &mut DestCommit,
) -> anyhow::Result<()> {
    // Fresh memfds of the same layout, populated before the first page arrives.
    let t = Instant::now();
    let mut mem = Vec::new();
    let mut fds: Vec<OwnedFd> = Vec::new();
    for (i, r) in regions.iter().enumerate() {
        let (m, fd) = GuestRegion::create(&format!("ferry-in-{vm_id}-{i}"), r.size)
            .with_context(|| format!("creating region {i} ({} MiB)", r.size >> 20))?;
        m.populate(2)
            .with_context(|| format!("populating region {i}"))?;
        mem.push(m);
        fds.push(fd);
    }
    let mem = Arc::new(mem);
    let npages: Vec<u64> = mem.iter().map(GuestRegion::npages).collect();
    let landed = Arc::new(PageHashes::new(&npages));
    let prepare = t.elapsed();
    tracing::info!(%vm_id, ms = prepare.as_millis() as u64, "destination memory prepared");

    let (tx, rx) = crossbeam_channel::bounded(channels as usize);
    d.sessions.lock().expect("lock").insert(session, tx);
    write_msg(
        ctl,
        &Msg::Accept {
            prepare_us: prepare.as_micros() as u64,
        },
    )?;
    let mut slots: Vec<Option<TcpStream>> = (0..channels).map(|_| None).collect();
    let deadline = Instant::now() + DATA_CONNECT_TIMEOUT;
    let mut got = 0;
    let collected = loop {
        if got == channels as usize {
            break Ok(());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((ch, s)) if (ch as usize) < slots.len() && slots[ch as usize].is_none() => {
                slots[ch as usize] = Some(s);
                got += 1;
            }
            Ok((ch, _)) => {
                break Err(anyhow::anyhow!(
                    "data channel {ch} is out of range or duplicated"
                ))
            }
            Err(_) => {
                break Err(anyhow::anyhow!(
                    "only {got} of {channels} data connections arrived"
                ))
            }
        }
    };
    d.sessions.lock().expect("lock").remove(&session);
    collected?;
    let streams: Vec<TcpStream> = slots.into_iter().flatten().collect();
    let receiver = TcpReceiver::start(streams, Arc::clone(&mem), Arc::clone(&landed))?;
    let mut receiver = Some(receiver);
    let mut puller: Option<RdmaPuller> = None;
    ctl.set_read_timeout(Some(CONTROL_IDLE_TIMEOUT))?;
    loop {
        let msg = read_msg(ctl, MAX_FRAME)?;
        match msg {
            Msg::RdmaOffer { blob } => match RdmaPuller::new(&mem, &blob) {
                Ok((mut p, answer)) => {
                    if let Some(n) = std::env::var(FAIL_RDMA_ENV)
                        .ok()
                        .and_then(|v| v.parse().ok())
                    {
                        tracing::warn!(
                            after_bytes = n,
                            "test fault injection: RDMA QP 0 will fail"
                        );
                        p.inject_qp_failure(0, n);
                    }
                    tracing::info!(%vm_id, rdma = %p.describe(), "pulling with RDMA READ");
                    write_msg(ctl, &Msg::RdmaAnswer { blob: answer })?;
                    puller = Some(p);
                }
                Err(e) => {
                    tracing::info!(%vm_id, "no RDMA here: {e}");
                    write_msg(
                        ctl,
                        &Msg::RdmaUnavailable {
                            reason: e.to_string(),
                        },
                    )?;
                }
            },
            Msg::RdmaUnavailable { reason } => {
                tracing::info!(%vm_id, %reason, "the source turned RDMA down; TCP it is");
                puller = None;
            }
            Msg::RoundStart { round, .. } if puller.is_some() => {
                let p = puller.as_mut().expect("checked is_some");
                let reply = pull_round(ctl, p, &mem, &landed, round)?;
                if matches!(reply, Msg::RdmaFailed { .. }) {
                    // Deregister now; TCP carries the rest (the source re-sends this round).
                    puller = None;
                }
                write_msg(ctl, &reply)?;
            }
            Msg::RoundStart { round, .. } => {
                let rx = receiver
                    .as_ref()
                    .context("RoundStart after the state blob")?;
                let stats = rx.wait_round(round, ROUND_IDLE_TIMEOUT)?;
                write_msg(
                    ctl,
                    &Msg::RoundDone {
                        round,
                        pages: stats.pages,
                        bytes: stats.bytes,
                        torn: stats.torn,
                    },
                )?;
            }
            Msg::StateBlob { blob } => {
                // All memory is here: stop the readers, release the NIC's access
                // (rkeys and lkeys die), hand everything to the VMM.
                receiver = None;
                puller = None;
                let raw: Vec<_> = fds.iter().map(|f| f.as_raw_fd()).collect();
                let layout: Vec<RegionInfo> = regions
                    .iter()
                    .map(|r| RegionInfo { offset: 0, ..*r })
                    .collect();
                match request(
                    &vmm.link,
                    &Msg::Load {
                        vm_id: vm_id.to_owned(),
                        regions: layout,
                        blob,
                    },
                    &raw,
                ) {
                    Ok(Msg::Loaded) => {}
                    Ok(other) => bail!("destination VMM answered {} to Load", other.name()),
                    Err(e) => bail!("destination VMM refused the VM: {e}"),
                }
                if fsm.on(DestEvent::Loaded) != DestAction::SendReady {
                    bail!("state machine refused Loaded");
                }
                // The digest of every page as it landed, kept up to date by the
                // receivers: ready now, at no cost to the downtime.
                write_msg(
                    ctl,
                    &Msg::Ready {
                        digest: landed.digest(),
                    },
                )?;
            }
            Msg::Commit => {
                if fsm.on(DestEvent::Commit) != DestAction::StartVm {
                    bail!("Commit before the VM was loaded");
                }
                let detail = start_vm(d, vmm, vm_id, session);
                write_msg(ctl, &Msg::PeerRunning { detail })?;
                return Ok(());
            }
            Msg::Abort { reason } => bail!("the source aborted: {reason}"),
            other => bail!("unexpected {} from the source", other.name()),
        }
    }
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
        assert!(check_offer(4096, &[r(1 << 20)], 4).is_ok());
        assert!(check_offer(8192, &[r(1 << 20)], 4).is_err());
        assert!(check_offer(4096, &[], 4).is_err());
        assert!(check_offer(4096, &[r(1 << 20)], 0).is_err());
        assert!(check_offer(4096, &[r(1 << 20)], 65).is_err());
        assert!(check_offer(4096, &[r(1000)], 4).is_err());
        assert!(check_offer(4096, &[r(u64::MAX - 4095), r(1 << 20)], 4).is_err());
        let huge = check_offer(4096, &[r(1 << 50)], 4).expect_err("too big");
        assert!(huge.contains("MiB available"), "{huge}");
    }
}
