//! The destination's data paths: fresh memory for the incoming VM, the data connections,
//! and one window at a time over TCP (the reader threads land pages and check them) or
//! RDMA (pulled as the source streams the window's list; on a failure the rest of the list
//! is handed back for TCP).

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ferry_engine::digest::{page_hash, PageHashes};
use ferry_engine::plan::PageRange;
use ferry_engine::session::SessionId;
use ferry_engine::transport::TransportError;
use ferry_proto::auth::SessionKey;
use ferry_proto::common::{RegionInfo, MAX_FRAME};
use ferry_proto::frame::read_msg;
use ferry_proto::mem::{GuestRegion, PAGE};
use ferry_proto::peer::{PeerMsg, MAX_UNFINISHED};
use ferry_tcp_fallback::TcpReceiver;
use ferry_verbs::RdmaPuller;

use crate::peer::PeerStream;
use crate::registry::{DataWaiter, Registry};

/// How long the data connections may take to arrive after `Accept`.
const DATA_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest silence on the data connections within a round before the source is
/// considered gone (keepalive usually notices first).
const ROUND_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Longest time one RDMA READ may stay unanswered before the queue pair is declared
/// dead (rxe reports nothing when the peer's QP dies, so the puller must time out).
const RDMA_STALL_TIMEOUT: Duration = Duration::from_secs(10);

/// How the memory of an incoming VM is filled before its pages land in it (`populate` in
/// the daemon's configuration). Filling (the kernel allocating and zeroing each page) runs
/// at about the wire rate of a 10 Gbit/s link on the measured hosts, so where it happens
/// decides much of the whole migration's time (`docs/design.md`, "Destination memory").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Populate {
    /// `Accept` leaves as soon as the memfds exist; each TCP receiver fills a frame's
    /// pages with one call just before it lands them (never a page fault per page), and
    /// pages the source sends as zero markers are never allocated. RDMA registers the
    /// memory when the source offers it, which fills it all then.
    #[default]
    Overlap,
    /// All of it before `Accept`: a memory shortage shows before any data moves, and the
    /// source waits meanwhile.
    Ahead,
}

impl Populate {
    /// Parses the configuration's spelling.
    ///
    /// # Errors
    ///
    /// Anything but `overlap` or `ahead`.
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        match s {
            "overlap" => Ok(Self::Overlap),
            "ahead" => Ok(Self::Ahead),
            other => bail!("populate must be \"overlap\" or \"ahead\", got {other:?}"),
        }
    }
}

/// Fresh memory for an incoming VM.
pub struct Landing {
    /// The regions, mapped.
    pub mem: Arc<Vec<GuestRegion>>,
    /// Their memfds (handed to the VMM with `Load`).
    pub fds: Vec<OwnedFd>,
    /// The hash of every page as it landed (the destination's digest at `Ready`).
    pub landed: Arc<PageHashes>,
    /// How long the source waited for this memory (creating it, and populating it with
    /// [`Populate::Ahead`]).
    pub prepare: Duration,
}

/// Creates memfds of the offered layout, backed by pages of `page_size` (the source's: huge
/// pages for a huge-page VM), populated before the first page with [`Populate::Ahead`].
///
/// # Errors
///
/// Out of memory (or huge pages), `memfd_create`/`mmap` failures.
pub fn prepare(
    vm_id: &str,
    regions: &[RegionInfo],
    page_size: u64,
    how: Populate,
) -> anyhow::Result<Landing> {
    let t = Instant::now();
    let mut mem = Vec::new();
    let mut fds = Vec::new();
    for (i, r) in regions.iter().enumerate() {
        let (m, fd) =
            GuestRegion::create_backed(&format!("ferry-in-{vm_id}-{i}"), r.size, page_size)
                .with_context(|| format!("creating region {i} ({} MiB)", r.size >> 20))?;
        if page_size == PAGE as u64 {
            // Transparent huge pages where the host allows them on request: filling
            // memory is then ~10x cheaper (docs/operations.md, "Destination memory").
            m.advise_huge();
        }
        if how == Populate::Ahead {
            m.populate(2)
                .with_context(|| format!("populating region {i}"))?;
        }
        mem.push(m);
        fds.push(fd);
    }
    let npages: Vec<u64> = mem.iter().map(GuestRegion::npages).collect();
    Ok(Landing {
        landed: Arc::new(PageHashes::new(&npages)),
        mem: Arc::new(mem),
        fds,
        prepare: t.elapsed(),
    })
}

/// The data connections a migration waits for. Registered before `Accept` is sent, so
/// that the source's first connection (it connects as soon as it reads `Accept`) finds
/// the session's key; forgotten when this is dropped.
pub struct ExpectedData<'a> {
    reg: &'a Registry,
    session: SessionId,
    channels: u16,
    rx: crossbeam_channel::Receiver<(u16, PeerStream)>,
}

impl Drop for ExpectedData<'_> {
    fn drop(&mut self) {
        self.reg.forget_data(self.session);
    }
}

/// Starts expecting `channels` data connections of `session`, authenticated with `key`.
pub fn expect_data(
    reg: &Registry,
    session: SessionId,
    key: SessionKey,
    channels: u16,
) -> ExpectedData<'_> {
    let (tx, rx) = crossbeam_channel::bounded(usize::from(channels));
    reg.expect_data(session, DataWaiter { key, tx });
    ExpectedData {
        reg,
        session,
        channels,
        rx,
    }
}

impl ExpectedData<'_> {
    /// Waits for every channel (at most [`DATA_CONNECT_TIMEOUT`]), in channel order.
    ///
    /// # Errors
    ///
    /// A channel out of range or twice, or fewer than all in time.
    pub fn collect(self) -> anyhow::Result<Vec<PeerStream>> {
        let channels = self.channels;
        let mut slots: Vec<Option<PeerStream>> = (0..channels).map(|_| None).collect();
        let deadline = Instant::now() + DATA_CONNECT_TIMEOUT;
        let mut got = 0;
        while got < usize::from(channels) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok((ch, s))
                    if usize::from(ch) < slots.len() && slots[usize::from(ch)].is_none() =>
                {
                    slots[usize::from(ch)] = Some(s);
                    got += 1;
                }
                Ok((ch, _)) => anyhow::bail!("data channel {ch} is out of range or duplicated"),
                Err(_) => anyhow::bail!("only {got} of {channels} data connections arrived"),
            }
        }
        Ok(slots.into_iter().flatten().collect())
    }
}

/// Checks page ranges a peer named (a pull list, or ranges handed back unfinished)
/// against the VM's layout before anything touches memory.
///
/// # Errors
///
/// A range outside the VM.
pub fn checked(list: &[PageRange], mem: &[GuestRegion]) -> anyhow::Result<()> {
    for r in list {
        let ok = mem.get(r.region as usize).is_some_and(|m| {
            r.count > 0
                && r.first
                    .checked_add(r.count)
                    .is_some_and(|e| e <= m.npages())
        });
        if !ok {
            bail!(
                "the peer named pages {}+{} of region {}, outside the VM",
                r.first,
                r.count,
                r.region
            );
        }
    }
    Ok(())
}

/// The data paths of one incoming migration.
pub struct Intake {
    /// TCP reader threads (until the state arrives).
    pub tcp: Option<TcpReceiver>,
    /// The RDMA puller, while RDMA READ is the data path.
    pub rdma: Option<RdmaPuller>,
}

impl Intake {
    /// One TCP window: wait for every channel's share, answer with what landed.
    ///
    /// # Errors
    ///
    /// A channel failed or went silent.
    pub fn tcp_window(&self, round: u32) -> anyhow::Result<PeerMsg> {
        let rx = self.tcp.as_ref().context("a round after the state blob")?;
        let stats = rx.wait_round(round, ROUND_IDLE_TIMEOUT)?;
        let us = |ns: u64| ns / 1000;
        Ok(PeerMsg::RoundDone {
            round,
            pages: stats.pages,
            bytes: stats.bytes,
            torn: stats.torn,
            cpu_us: [
                us(stats.cpu.data_ns),
                us(stats.cpu.hash_ns),
                us(stats.cpu.populate_ns),
            ],
        })
    }

    /// One RDMA window: pull the ranges as the source streams their list. On a failure
    /// the rest of the list is still read and handed back as unfinished; the puller is
    /// then dropped (queue pairs destroyed, memory deregistered).
    ///
    /// # Errors
    ///
    /// The control link failed, or the source named pages outside the VM.
    pub fn rdma_window(
        &mut self,
        ctl: &mut PeerStream,
        mem: &[GuestRegion],
        landed: &PageHashes,
        round: u32,
    ) -> anyhow::Result<PeerMsg> {
        let puller = self.rdma.as_mut().context("no RDMA puller")?;
        let (mut pages, mut failure) = (0u64, None::<String>);
        let mut unfinished: Vec<PageRange> = Vec::new();
        loop {
            let (r, list, last) = match read_msg(ctl, MAX_FRAME)? {
                PeerMsg::PullRanges {
                    round,
                    ranges,
                    last,
                } => (round, ranges, last),
                other => bail!(
                    "expected the round's pull list, got {}",
                    ferry_proto::common::Message::name(&other)
                ),
            };
            if r != round {
                bail!("pull list of round {r} inside round {round}");
            }
            checked(&list, mem)?;
            if failure.is_some() {
                unfinished.extend(list);
            } else {
                let result = puller.pull(&list, &|_| {}, RDMA_STALL_TIMEOUT);
                // Hash what was pulled for the end-to-end digest (RC already checked the
                // wire). Ranges left unfinished are re-sent over TCP, which hashes again.
                for x in &list {
                    let r = &mem[x.region as usize];
                    for p in x.first..x.end() {
                        let ptr = r.pages_ptr(p, 1).expect("range checked against the layout");
                        // SAFETY: this process owns the destination memory until it hands
                        // the memfds to the VMM; after `pull` returned no READ is in flight
                        // (the puller destroys failed QPs before returning).
                        let page = unsafe { std::slice::from_raw_parts(ptr, PAGE) };
                        landed.set(x.region, p, page_hash(page));
                    }
                }
                let listed: u64 = list.iter().map(|x| x.count).sum();
                match result {
                    Ok(st) => pages += st.pages,
                    Err(TransportError::Failed {
                        reason,
                        unfinished: left,
                    }) => {
                        let left_pages: u64 = left.iter().map(|x| x.count).sum();
                        pages += listed.saturating_sub(left_pages);
                        unfinished.extend(left);
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
            None => PeerMsg::RoundDone {
                round,
                pages,
                bytes: pages * PAGE as u64,
                torn: Vec::new(),
                cpu_us: [0; 3],
            },
            Some(reason) => {
                tracing::warn!(round, %reason, confirmed = pages, "RDMA failed; handing the rest back for TCP");
                // Deregister now; TCP carries the rest (the source re-sends this window).
                self.rdma = None;
                PeerMsg::RdmaFailed {
                    round,
                    reason,
                    confirmed_pages: pages,
                    unfinished,
                }
            }
        })
    }
}
