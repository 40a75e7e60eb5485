//! The source side of a migration: rounds, stop-and-copy, verification, commit.
//!
//! The driver asks the engine what to do ([`PrecopyController`], [`SourceCommit`]) and
//! does the I/O: VMM requests, the peer control connection, the data transport. Any
//! error before the commit point resumes the VM here and tells the destination to
//! discard; the decision to commit is recorded on disk before `Commit` is sent.
//!
//! Dirty-log order (DESIGN.md): every page is sent only after the log read that covers
//! its latest logged write has cleared it. Ferry applies the rule per window of a round,
//! not once per round: before each window the log is read and cleared, and the pages of
//! that window leave the carried dirty set because they are about to be sent with
//! whatever they hold. A write after that read is in the next read. The final round runs
//! with the VM paused, in one window.

use std::io::Write;
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ferry_engine::bitmap::DirtyBitmap;
use ferry_engine::commit::{SourceAction, SourceCommit, SourceEvent};
use ferry_engine::digest::MemoryDigest;
use ferry_engine::plan::{cold_first, plan, ranges_of, windows, PageRange, DEFAULT_CHUNK_PAGES};
use ferry_engine::precopy::{ConvergencePolicy, LimitAction, PrecopyController, RoundRecord, Step};
use ferry_engine::transport::{PageSender, RoundStats};
use ferry_engine::PAGE_SIZE;
use ferry_proto::auth::{self, random};
use ferry_proto::frame::{read_msg, write_msg};
use ferry_proto::mem::GuestRegion;
use ferry_proto::msg::{
    MigrateRequest, Msg, OnLimit, Phase, TransportChoice, VerifyMode, MAX_FRAME, MAX_PULL_RANGES,
};
use ferry_proto::net::{set_buffers, tune_peer_socket, DEAD_PEER_AFTER};
use ferry_tcp_fallback::TcpSender;
use ferry_verbs::RdmaExport;

use crate::daemon::{proof, Daemon, RegisteredVm};
use crate::dest::checked_ranges;
use crate::summary::{RoundSummary, Summary, GUEST_CONTINUED_MARKER};
use crate::vmm::{request, request_ok};

/// Longest wait for the destination to answer one control step (a round's
/// confirmation, preparing memory, loading the VM). A live peer that takes longer is
/// treated as hung; a dead one is noticed in seconds by TCP keepalive.
const PEER_STEP_TIMEOUT: Duration = Duration::from_secs(300);

/// Socket buffer for data connections: 4 MiB lets one stream keep a 10 Gb/s x 1 ms
/// path full (bandwidth-delay product 1.25 MB) with room to spare.
const DATA_SOCKET_BUFFER: i32 = 4 << 20;

/// Fault injection for tests: after recording the commit decision, drop the control
/// connection instead of sending `Commit` (the link breaking in the commit window), then
/// wait the variable's value in milliseconds before replaying.
const DROP_COMMIT_ENV: &str = "FERRY_TEST_DROP_COMMIT";

/// Where a VM's commit decision is recorded.
fn decision_path(d: &Daemon, vm_id: &str) -> std::path::PathBuf {
    d.state_dir.join(format!("{vm_id}.decision"))
}

/// Records (durably) that the migration of `vm_id` in `session` to `to` is `state`:
/// "committed" (decided, not yet confirmed by the destination) or "confirmed".
fn write_decision(
    d: &Daemon,
    vm_id: &str,
    state: &str,
    session: &[u8; 16],
    to: &str,
) -> anyhow::Result<()> {
    let hex: String = session.iter().map(|b| format!("{b:02x}")).collect();
    let path = decision_path(d, vm_id);
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)
        .with_context(|| format!("recording the commit decision in {}", tmp.display()))?;
    writeln!(f, "{state} session={hex} to={to}")?;
    f.sync_all().context("syncing the commit decision")?;
    std::fs::rename(&tmp, &path).context("recording the commit decision")?;
    Ok(())
}

/// Reads a recorded decision: (state, session, destination).
fn read_decision(d: &Daemon, vm_id: &str) -> anyhow::Result<(String, [u8; 16], String)> {
    let path = decision_path(d, vm_id);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("no decision is recorded for {vm_id} ({})", path.display()))?;
    let mut words = text.split_whitespace();
    let state = words.next().context("empty decision file")?.to_owned();
    let mut session = None;
    let mut to = None;
    for w in words {
        if let Some(h) = w.strip_prefix("session=") {
            let mut s = [0u8; 16];
            anyhow::ensure!(h.len() == 32, "bad session in {}", path.display());
            for (i, b) in s.iter_mut().enumerate() {
                *b = u8::from_str_radix(&h[2 * i..2 * i + 2], 16)?;
            }
            session = Some(s);
        } else if let Some(t) = w.strip_prefix("to=") {
            to = Some(t.to_owned());
        }
    }
    Ok((
        state,
        session.context("decision file without a session")?,
        to.context("decision file without a destination")?,
    ))
}

/// `ferry recover`: delivers a recorded, unconfirmed commit decision, then stops the
/// paused source VM for good. Returns what the destination VMM reported.
///
/// # Errors
///
/// No decision recorded, or the destination still unreachable or refusing.
pub fn recover(d: &Daemon, vm_id: &str) -> anyhow::Result<String> {
    let (state, session, to) = read_decision(d, vm_id)?;
    if state == "confirmed" {
        return Ok(format!(
            "the migration of {vm_id} to {to} was already confirmed"
        ));
    }
    anyhow::ensure!(state == "committed", "unknown decision state {state:?}");
    let detail = replay_commit(d, &to, session)?;
    write_decision(d, vm_id, "confirmed", &session, &to)?;
    if let Some(vm) = d.vms.lock().expect("lock").remove(vm_id) {
        if let Err(e) = request_ok(&vm.link, &Msg::Stop) {
            tracing::warn!(%vm_id, "source VMM did not stop cleanly: {e}");
        }
    }
    Ok(detail)
}

/// Pages sent between two reads of the dirty log within a round: 64 MiB. Each window's
/// dirty bits are read and cleared right before the window is sent, so a page written
/// earlier in the round but sent after that read is not sent again next round (and a
/// cold-first round 1 sends the hot set last, after the last read). One read of a 1 GiB
/// log costs under 1 ms (FACTS.md: GET ~12-33 us, CLEAR ~0.5-0.7 ms with 64 Ki dirty
/// pages), against ~64 ms of sending per window at 1 GB/s: ~2 % for far fewer re-sends.
const WINDOW_PAGES: u64 = 16_384;

/// Sends progress to whoever asked for the migration.
pub type Reporter<'a> = &'a (dyn Fn(Msg) + Sync);

/// Digest of the source's memory. Call only while the VM is paused.
pub fn digest_of(mem: &[GuestRegion]) -> MemoryDigest {
    MemoryDigest {
        regions: std::thread::scope(|s| {
            let hs: Vec<_> = mem
                .iter()
                .map(|r| {
                    s.spawn(move || {
                        // SAFETY: the VM is paused and its VMM's writers are quiesced
                        // (Paused was answered), and the sidecar does not write source
                        // memory: nothing changes the bytes while they are hashed.
                        ferry_engine::digest::region_digest(unsafe { r.as_slice() })
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().unwrap_or_default())
                .collect()
        }),
    }
}

fn policy_of(req: &MigrateRequest) -> ConvergencePolicy {
    ConvergencePolicy {
        downtime_budget: Duration::from_millis(u64::from(req.downtime_ms)),
        max_rounds: req.max_rounds.max(1),
        timeout: Duration::from_millis(req.timeout_ms),
        on_limit: match req.on_limit {
            OnLimit::Abort => LimitAction::Abort,
            OnLimit::Force => LimitAction::ForceStopAndCopy,
        },
    }
}

fn bitmaps_of(words: Vec<Vec<u64>>, vm: &RegisteredVm) -> anyhow::Result<Vec<DirtyBitmap>> {
    if words.len() != vm.mem.len() {
        bail!(
            "VMM sent {} dirty bitmaps for {} regions",
            words.len(),
            vm.mem.len()
        );
    }
    words
        .into_iter()
        .zip(vm.mem.iter())
        .map(|(w, r)| DirtyBitmap::from_words(w, r.npages()).map_err(Into::into))
        .collect()
}

fn take_dirty(vm: &RegisteredVm, final_round: bool) -> anyhow::Result<Vec<DirtyBitmap>> {
    match request(&vm.link, &Msg::TakeDirty { final_round }, &[])? {
        Msg::Dirty { bitmaps } => bitmaps_of(bitmaps, vm),
        other => bail!("VMM answered {} to TakeDirty", other.name()),
    }
}

fn expect_reply(ctl: &mut TcpStream, what: &'static str) -> anyhow::Result<Msg> {
    match read_msg(ctl, MAX_FRAME) {
        Ok(Msg::Refused { reason }) => bail!("destination refused ({what}): {reason}"),
        Ok(m) => Ok(m),
        Err(e) => {
            Err(anyhow::Error::new(e).context(format!("destination link while waiting for {what}")))
        }
    }
}

/// One migration's driver state.
struct SourceRun<'a> {
    d: &'a Daemon,
    req: &'a MigrateRequest,
    report: Reporter<'a>,
    fsm: SourceCommit,
    ctl: Option<TcpStream>,
    engine: PrecopyController,
    summary: Summary,
    total_done: AtomicU64,
    t0: Instant,
    /// The RDMA export while RDMA READ is the data path; `None` on TCP.
    rdma: Option<RdmaExport>,
    /// The migration's session id, once offered.
    session: Option<[u8; 16]>,
    /// When the VM was asked to pause (downtime starts).
    paused_at: Option<Instant>,
    /// Set when the digests differed after the destination resumed.
    mismatch_after_resume: Option<String>,
    /// Rounds on the wire: one per window (the destination confirms each).
    wire_round: u32,
    /// What progress reports show: (engine round, bytes of it done before the current
    /// window, bytes of the whole round).
    progress: (u32, u64, u64),
}

/// Says which page ranges differ, for the operator.
fn describe_mismatch(bad: &[PageRange]) -> String {
    let list: Vec<String> = bad
        .iter()
        .take(8)
        .map(|r| format!("region {} pages {}..{}", r.region, r.first, r.end()))
        .collect();
    format!(
        "memory digest mismatch in {} ranges: {}",
        bad.len(),
        list.join(", ")
    )
}

/// Delivers a recorded decision on fresh authenticated connections until the
/// destination answers or the daemon's replay window passes. Returns the destination
/// VMM's line.
fn replay_commit(d: &Daemon, to: &str, session: [u8; 16]) -> anyhow::Result<String> {
    let end = Instant::now() + d.replay_window;
    let mut last = anyhow::anyhow!("no attempt made");
    while Instant::now() < end {
        let attempt = || -> anyhow::Result<String> {
            let addr = to.to_socket_addrs()?.next().context("no address")?;
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            tune_peer_socket(&s, DEAD_PEER_AFTER)?;
            s.set_read_timeout(Some(Duration::from_secs(30)))?;
            auth::connect(&mut s, &d.key)?;
            write_msg(
                &mut s,
                &Msg::Decision {
                    session,
                    commit: true,
                },
            )?;
            match expect_reply(&mut s, "the replayed Commit")? {
                Msg::PeerRunning { detail } => Ok(detail),
                other => bail!(
                    "destination answered {} to the replayed Commit",
                    other.name()
                ),
            }
        };
        match attempt() {
            Ok(detail) => return Ok(detail),
            Err(e) => {
                tracing::warn!("replaying Commit: {e:#}");
                let refused = e.to_string().contains("refused");
                last = e;
                if refused {
                    break;
                }
            }
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    Err(last)
}

impl SourceRun<'_> {
    fn ctl(&mut self) -> anyhow::Result<&mut TcpStream> {
        self.ctl.as_mut().context("no control connection")
    }

    fn phase(&self, phase: &str) {
        if let Some(p) = self.d.active.lock().expect("lock").get_mut(&self.req.vm_id) {
            *p = phase.to_owned();
        }
    }

    /// Runs one round and records it. A pre-copy round goes out in windows of
    /// [`WINDOW_PAGES`]; before each window after the first the dirty log is read and
    /// cleared (the first window follows the caller's read). Pages written before their
    /// window went out leave the carried set: what they hold now is what is sent.
    /// Returns the round's numbers and the pages dirtied but not sent since (plus pages
    /// that arrived torn), which the next round must send.
    fn round(
        &mut self,
        sender: &mut dyn PageSender,
        vm: &RegisteredVm,
        round: u32,
        final_round: bool,
        ranges: &[PageRange],
    ) -> anyhow::Result<(RoundStats, Vec<DirtyBitmap>)> {
        let t = Instant::now();
        let total_pages: u64 = ranges.iter().map(|r| r.count).sum();
        let mut carry: Vec<DirtyBitmap> = vm
            .mem
            .iter()
            .map(|r| DirtyBitmap::new(r.npages()))
            .collect();
        let parts = if final_round {
            vec![ranges.to_vec()]
        } else {
            windows(ranges, WINDOW_PAGES)
        };
        let mut stats = RoundStats::default();
        for (i, w) in parts.iter().enumerate() {
            if i > 0 {
                for (c, taken) in carry.iter_mut().zip(take_dirty(vm, false)?) {
                    c.union_with(&taken)?;
                }
            }
            for r in w {
                if let Some(c) = carry.get_mut(r.region as usize) {
                    c.clear_range(r.first, r.count);
                }
            }
            self.progress = (round, stats.bytes, total_pages * PAGE_SIZE);
            let s = self.send_window(sender, &vm.mem, final_round, w)?;
            for &(r, p) in &s.torn {
                if let Some(c) = carry.get_mut(r as usize) {
                    c.set(p);
                }
            }
            stats.merge(s);
        }
        if stats.pages != total_pages {
            bail!(
                "destination confirmed {} pages of round {round}; {total_pages} were planned",
                stats.pages
            );
        }
        self.record_round(round, final_round, &stats, t);
        Ok((stats, carry))
    }

    /// Sends one window as its own wire round on the current data path (RDMA, falling
    /// back to TCP for what RDMA could not confirm, or TCP).
    fn send_window(
        &mut self,
        sender: &mut dyn PageSender,
        mem: &[GuestRegion],
        final_round: bool,
        ranges: &[PageRange],
    ) -> anyhow::Result<RoundStats> {
        self.wire_round += 1;
        let round = self.wire_round;
        let window_pages: u64 = ranges.iter().map(|r| r.count).sum();
        let stats = if self.rdma.is_some() {
            match self.rdma_round(round, final_round, ranges)? {
                Ok(stats) => stats,
                Err((confirmed, unfinished)) => {
                    // RDMA is gone: the rest of this round, and every later one, over TCP.
                    let unfinished = checked_ranges(&unfinished, mem)?;
                    let mut rest = self.tcp_round(sender, round, final_round, &unfinished)?;
                    rest.pages += confirmed;
                    rest.bytes += confirmed * PAGE_SIZE;
                    rest
                }
            }
        } else {
            self.tcp_round(sender, round, final_round, ranges)?
        };
        if stats.pages != window_pages {
            bail!(
                "destination confirmed {} pages of wire round {round}; {window_pages} were sent",
                stats.pages
            );
        }
        Ok(stats)
    }

    /// Records a finished round (called by [`SourceRun::round`]).
    fn record_round(&mut self, round: u32, final_round: bool, stats: &RoundStats, t: Instant) {
        let elapsed = t.elapsed();
        self.total_done.fetch_add(stats.bytes, Ordering::Relaxed);
        self.engine.round_finished(RoundRecord {
            round,
            pages: stats.pages,
            bytes: stats.bytes,
            zero_pages: stats.zero_pages,
            elapsed,
        });
        self.summary.per_round.push(RoundSummary {
            round,
            final_round,
            dirty_pages: stats.pages,
            bytes: stats.bytes,
            zero_pages: stats.zero_pages,
            torn_pages: stats.torn.len() as u64,
            ms: elapsed.as_secs_f64() * 1e3,
        });
        tracing::info!(
            round,
            final_round,
            pages = stats.pages,
            mib = stats.bytes >> 20,
            zero = stats.zero_pages,
            torn = stats.torn.len(),
            ms = elapsed.as_millis() as u64,
            "round done"
        );
    }

    /// A round over RDMA: the destination pulls the listed ranges. Returns the
    /// destination's failure report (pages confirmed, ranges unfinished) when its QPs
    /// failed; RDMA is then dropped (memory registrations released).
    #[allow(clippy::type_complexity)]
    fn rdma_round(
        &mut self,
        round: u32,
        final_round: bool,
        ranges: &[PageRange],
    ) -> anyhow::Result<Result<RoundStats, (u64, Vec<(u32, u64, u64)>)>> {
        let ctl = self.ctl()?;
        write_msg(ctl, &Msg::RoundStart { round, final_round })?;
        let list: Vec<(u32, u64, u64)> = ranges
            .iter()
            .map(|r| (r.region, r.first, r.count))
            .collect();
        let mut pieces = list.chunks(MAX_PULL_RANGES).peekable();
        if pieces.peek().is_none() {
            write_msg(
                ctl,
                &Msg::PullRanges {
                    round,
                    ranges: Vec::new(),
                    last: true,
                },
            )?;
        }
        while let Some(piece) = pieces.next() {
            let last = pieces.peek().is_none();
            write_msg(
                ctl,
                &Msg::PullRanges {
                    round,
                    ranges: piece.to_vec(),
                    last,
                },
            )?;
        }
        match expect_reply(self.ctl()?, "a pulled round's confirmation")? {
            Msg::RoundDone {
                round: r,
                pages,
                bytes,
                ..
            } if r == round => Ok(Ok(RoundStats {
                pages,
                bytes,
                ..RoundStats::default()
            })),
            Msg::RdmaFailed {
                round: r,
                reason,
                confirmed_pages,
                unfinished,
            } if r == round => {
                tracing::warn!(round, %reason, unfinished = unfinished.len(), "RDMA failed; falling back to TCP");
                self.rdma = None;
                self.summary.transport = "rdma+tcp".into();
                self.summary.transport_reason = format!(
                    "{}; RDMA failed in round {round} ({reason}): {} unfinished ranges re-sent over TCP, TCP from then on",
                    self.summary.transport_reason,
                    unfinished.len()
                );
                Ok(Err((confirmed_pages, unfinished)))
            }
            other => bail!(
                "destination answered {} to pulled round {round}",
                other.name()
            ),
        }
    }

    /// A round over TCP: announce, push, wait for the destination's confirmation.
    fn tcp_round(
        &mut self,
        sender: &mut dyn PageSender,
        round: u32,
        final_round: bool,
        ranges: &[PageRange],
    ) -> anyhow::Result<RoundStats> {
        let work = plan(ranges, sender.channels(), DEFAULT_CHUNK_PAGES);
        write_msg(self.ctl()?, &Msg::RoundStart { round, final_round })?;
        let done = AtomicU64::new(0);
        let finished = AtomicBool::new(false);
        let total_before = self.total_done.load(Ordering::Relaxed) + self.progress.1;
        let (shown_round, round_base, round_total) = self.progress;
        let phase = if final_round {
            Phase::StopAndCopy
        } else {
            Phase::Precopy
        };
        let report = self.report;
        let sent = std::thread::scope(|s| {
            let reporter = s.spawn(|| {
                while !finished.load(Ordering::Acquire) {
                    let d = done.load(Ordering::Relaxed);
                    report(Msg::Progress {
                        phase,
                        round: shown_round,
                        round_done: round_base + d,
                        round_total,
                        total_done: total_before + d,
                    });
                    // Parked, not asleep: the round's end unparks it at once, so the
                    // scope (and the final round, inside the downtime) does not wait
                    // out the interval.
                    std::thread::park_timeout(Duration::from_millis(100));
                }
            });
            let r = sender.send_round(round, &work, &|b| {
                done.fetch_add(b, Ordering::Relaxed);
            });
            finished.store(true, Ordering::Release);
            reporter.thread().unpark();
            r
        })?;
        let (pages, bytes, torn) = match expect_reply(self.ctl()?, "a round's confirmation")? {
            Msg::RoundDone {
                round: r,
                pages,
                bytes,
                torn,
            } if r == round => (pages, bytes, torn),
            other => bail!("destination answered {} to round {round}", other.name()),
        };
        if pages != work.pages() || bytes != sent.bytes {
            bail!(
                "destination confirmed {pages} pages / {bytes} bytes of round {round}; {} / {} were sent",
                work.pages(),
                sent.bytes
            );
        }
        Ok(RoundStats { torn, ..sent })
    }

    fn execute(&mut self, vm: &RegisteredVm) -> anyhow::Result<()> {
        let req = self.req;
        let channels = req.channels;
        // RDMA first when allowed: register guest RAM read-only for the peer.
        let mut export = None;
        self.summary.transport = "tcp".into();
        self.summary.transport_reason = "requested".into();
        if req.transport != TransportChoice::Tcp {
            match RdmaExport::new(&vm.mem, usize::from(channels)) {
                Ok(e) => export = Some(e),
                Err(e) if req.transport == TransportChoice::Rdma => {
                    bail!("RDMA was requested but is unavailable on the source: {e}")
                }
                Err(e) => {
                    self.summary.transport_reason = format!("auto: no RDMA on the source ({e})")
                }
            }
        }
        // Connect and authenticate.
        let addr = req
            .to
            .to_socket_addrs()
            .with_context(|| format!("resolving {}", req.to))?
            .next()
            .with_context(|| format!("{} resolves to no address", req.to))?;
        let mut ctl = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .with_context(|| format!("connecting to {addr}"))?;
        tune_peer_socket(&ctl, DEAD_PEER_AFTER)?;
        ctl.set_read_timeout(Some(PEER_STEP_TIMEOUT))?;
        auth::connect(&mut ctl, &self.d.key).context("authenticating to the destination")?;
        let session: [u8; 16] = random()?;
        self.session = Some(session);
        write_msg(
            &mut ctl,
            &Msg::Offer {
                vm_id: req.vm_id.clone(),
                page_size: PAGE_SIZE as u32,
                regions: vm.regions.clone(),
                channels,
                transports: (1 << TransportChoice::Tcp as u8)
                    | if export.is_some() {
                        1 << TransportChoice::Rdma as u8
                    } else {
                        0
                    },
                cpu_profile: vm.cpu_profile.clone(),
                session,
            },
        )?;
        self.ctl = Some(ctl);
        let prepare_us = match expect_reply(self.ctl()?, "the offer's answer")? {
            Msg::Accept { prepare_us } => prepare_us,
            other => bail!("destination answered {} to the offer", other.name()),
        };
        self.summary.prepare_ms = prepare_us as f64 / 1e3;
        let mut streams = Vec::new();
        for ch in 0..channels {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                .with_context(|| format!("opening data connection {ch}"))?;
            tune_peer_socket(&s, DEAD_PEER_AFTER)?;
            set_buffers(&s, DATA_SOCKET_BUFFER);
            write_msg(
                &mut s,
                &Msg::DataHello {
                    session,
                    channel: ch,
                    proof: proof(&self.d.key, &session, ch),
                },
            )?;
            streams.push(s);
        }
        // TCP data connections always exist: RDMA falls back onto them without a pause.
        if let Some(mut exp) = export {
            write_msg(self.ctl()?, &Msg::RdmaOffer { blob: exp.offer() })?;
            let outcome = match expect_reply(self.ctl()?, "the RDMA answer")? {
                Msg::RdmaAnswer { blob } => match exp.connect(&blob) {
                    Ok(()) => Ok(()),
                    Err(e) => {
                        // The destination thinks RDMA is on: tell it otherwise.
                        let reason = format!("the source could not connect its queue pairs: {e}");
                        write_msg(
                            self.ctl()?,
                            &Msg::RdmaUnavailable {
                                reason: reason.clone(),
                            },
                        )?;
                        Err(reason)
                    }
                },
                Msg::RdmaUnavailable { reason } => {
                    Err(format!("no RDMA at the destination ({reason})"))
                }
                other => bail!("destination answered {} to the RDMA offer", other.name()),
            };
            match outcome {
                Ok(()) => {
                    self.summary.transport = "rdma".into();
                    self.summary.transport_reason = format!(
                        "both sidecars have RDMA and {channels} queue pairs connected ({}); the destination pulls with RDMA READ",
                        exp.describe()
                    );
                    self.rdma = Some(exp);
                }
                Err(reason) if req.transport == TransportChoice::Rdma => {
                    bail!("RDMA was requested: {reason}")
                }
                Err(reason) => self.summary.transport_reason = format!("auto: {reason}"),
            }
        }
        let mut sender = TcpSender::new(streams, Arc::clone(&vm.mem));
        self.fsm.on(SourceEvent::Accepted)?;

        // Round 1: every page (zero pages become markers), least recently written first.
        self.phase("precopy");
        request_ok(&vm.link, &Msg::StartDirtyLog)?;
        let full: Vec<DirtyBitmap> = vm
            .mem
            .iter()
            .map(|r| DirtyBitmap::full(r.npages()))
            .collect();
        let first = if req.observe_ms > 0 {
            std::thread::sleep(Duration::from_millis(u64::from(req.observe_ms)));
            // Pages written during the window go last; their bits are consumed here,
            // which is fine: round 1 sends every page anyway.
            let hot = take_dirty(vm, false)?;
            cold_first(&full, &hot)
        } else {
            ranges_of(&full)
        };
        let mut carry = self.round(&mut sender, vm, 1, false, &first)?.1;
        let reason = loop {
            let mut dirty = take_dirty(vm, false)?;
            for (d, c) in dirty.iter_mut().zip(&carry) {
                d.union_with(c)?;
            }
            let dirty_bytes: u64 = dirty.iter().map(DirtyBitmap::count).sum::<u64>() * PAGE_SIZE;
            match self.engine.next_step(self.t0.elapsed(), dirty_bytes) {
                Step::Precopy {
                    round,
                    threshold_bytes,
                } => {
                    tracing::info!(
                        round,
                        dirty_bytes,
                        threshold_bytes,
                        "another pre-copy round"
                    );
                    carry = self
                        .round(&mut sender, vm, round, false, &ranges_of(&dirty))?
                        .1;
                }
                Step::StopAndCopy(reason) => {
                    tracing::info!(%reason, "stop and copy");
                    break (reason, dirty);
                }
                Step::Abort(reason) => bail!("pre-copy gave up: {reason}"),
            }
        };
        let (stop_reason, mut carry) = reason;
        self.summary.stop_reason = stop_reason.to_string();

        // Stop and copy: pause, final dirty set (with what pre-copy left), state.
        self.phase("stop-and-copy");
        let t_pause = Instant::now();
        self.paused_at = Some(t_pause);
        let pause_us = match request(&vm.link, &Msg::Pause, &[])? {
            Msg::Paused { pause_us } => pause_us,
            other => bail!("VMM answered {} to Pause", other.name()),
        };
        self.fsm.on(SourceEvent::Paused)?;
        let t_paused = Instant::now();
        for (c, f) in carry.iter_mut().zip(take_dirty(vm, true)?) {
            c.union_with(&f)?;
        }
        let final_round = self.engine.rounds().len() as u32 + 1;
        let (fin, _) = self.round(&mut sender, vm, final_round, true, &ranges_of(&carry))?;
        if !fin.torn.is_empty() {
            bail!(
                "{} pages failed their checksum in the final round with the VM paused (first: region {} page {})",
                fin.torn.len(),
                fin.torn[0].0,
                fin.torn[0].1
            );
        }
        let t_final = Instant::now();
        let blob = match request(&vm.link, &Msg::SaveState, &[])? {
            Msg::State { blob } => blob,
            other => bail!("VMM answered {} to SaveState", other.name()),
        };
        write_msg(self.ctl()?, &Msg::StateBlob { blob })?;
        self.fsm.on(SourceEvent::FinalSent)?;
        let t_state = Instant::now();

        // Strict: compare both digests before the destination may resume. After-resume:
        // commit on the destination's Ready, compare once it runs (this VM stays kept).
        let strict = req.verify == VerifyMode::Strict;
        self.summary.verify_mode = if strict { "strict" } else { "after-resume" }.into();
        self.phase("verifying");
        (self.report)(Msg::Progress {
            phase: Phase::Verifying,
            round: final_round,
            round_done: 0,
            round_total: 0,
            total_done: self.total_done.load(Ordering::Relaxed),
        });
        // (In strict mode our digest is computed while the destination loads the VM.)
        let ours = strict.then(|| digest_of(&vm.mem));
        let theirs = match expect_reply(self.ctl()?, "the destination's digest")? {
            Msg::Ready { digest } => digest,
            other => bail!("destination answered {} to the state", other.name()),
        };
        let npages: Vec<u64> = vm.mem.iter().map(GuestRegion::npages).collect();
        let bad = ours
            .map(|o| o.mismatches(&theirs, &npages))
            .unwrap_or_default();
        self.summary.digest_match = bad.is_empty();
        let action = self.fsm.on(SourceEvent::Ready {
            digests_match: bad.is_empty(),
        })?;
        if action != SourceAction::RecordAndSendCommit {
            bail!(describe_mismatch(&bad));
        }
        let t_verified = Instant::now();
        // The commit point: recorded durably, then sent.
        write_decision(self.d, &req.vm_id, "committed", &session, &req.to)?;
        if let Ok(v) = std::env::var(DROP_COMMIT_ENV) {
            tracing::warn!("test fault injection: dropping the link instead of sending Commit");
            if let Some(c) = self.ctl.take() {
                let _ = c.shutdown(std::net::Shutdown::Both);
            }
            std::thread::sleep(Duration::from_millis(v.parse().unwrap_or(0)));
            bail!("control link lost after the commit decision (test fault injection)");
        }
        write_msg(self.ctl()?, &Msg::Commit)?;
        let detail = match expect_reply(self.ctl()?, "the destination VM to run")? {
            Msg::PeerRunning { detail } => detail,
            other => bail!("destination answered {} to Commit", other.name()),
        };
        let t_running = Instant::now();
        self.fsm.on(SourceEvent::Running)?;
        write_decision(self.d, &req.vm_id, "confirmed", &session, &req.to)?;
        if !strict {
            // The destination runs; this VM is still here, paused and intact.
            let t = Instant::now();
            let bad = digest_of(&vm.mem).mismatches(&theirs, &npages);
            self.summary.verify_after_resume_ms = t.elapsed().as_secs_f64() * 1e3;
            self.summary.digest_match = bad.is_empty();
            if !bad.is_empty() {
                let what = describe_mismatch(&bad);
                tracing::error!(vm = %req.vm_id, "{what} (after the destination resumed): the source VM is kept paused, not stopped");
                self.mismatch_after_resume = Some(what);
            }
        }
        if self.mismatch_after_resume.is_none() {
            if let Err(e) = request_ok(&vm.link, &Msg::Stop) {
                tracing::warn!("source VMM did not stop cleanly: {e}");
            }
        }
        let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e3;
        let s = &mut self.summary;
        s.guest_continued = detail.starts_with(GUEST_CONTINUED_MARKER);
        s.guest_detail = detail;
        s.downtime_ms = ms(t_pause, t_running);
        s.downtime_breakdown.pause_ms = pause_us as f64 / 1e3;
        s.downtime_breakdown.final_copy_ms = ms(t_paused, t_final);
        s.downtime_breakdown.state_ms = ms(t_final, t_state);
        s.downtime_breakdown.verify_ms = ms(t_state, t_verified);
        s.downtime_breakdown.restore_ms = ms(t_verified, t_running);
        Ok(())
    }
}

/// Runs a migration of `req.vm_id`; always returns a summary (result "aborted" with the
/// reason on failure, the VM running here again).
pub fn migrate(d: &Daemon, req: &MigrateRequest, report: Reporter<'_>) -> Summary {
    let mut summary = Summary {
        result: "aborted".into(),
        vm_id: req.vm_id.clone(),
        destination: req.to.clone(),
        channels: req.channels,
        verify_mode: match req.verify {
            VerifyMode::Strict => "strict",
            VerifyMode::AfterResume => "after-resume",
        }
        .into(),
        ..Summary::default()
    };
    // A committed, unconfirmed migration owns this VM: migrating it again could make it
    // run in two places once the first destination gets its decision.
    if let Ok((state, _, to)) = read_decision(d, &req.vm_id) {
        if state == "committed" {
            summary.error = format!(
                "VM {} has a committed, unconfirmed migration to {to}: run `ferry recover {}` first",
                req.vm_id, req.vm_id
            );
            return summary;
        }
    }
    let Some(vm) = d.vms.lock().expect("lock").remove(&req.vm_id) else {
        summary.error = format!("no VM {} is registered with this sidecar", req.vm_id);
        return summary;
    };
    d.active
        .lock()
        .expect("lock")
        .insert(req.vm_id.clone(), "preparing".into());
    summary.ram_bytes = vm.mem.iter().map(|r| r.len() as u64).sum();
    let mut run = SourceRun {
        d,
        req,
        report,
        fsm: SourceCommit::new(),
        ctl: None,
        engine: PrecopyController::new(policy_of(req)),
        summary,
        total_done: AtomicU64::new(0),
        t0: Instant::now(),
        rdma: None,
        session: None,
        paused_at: None,
        mismatch_after_resume: None,
        wire_round: 0,
        progress: (0, 0, 0),
    };
    let outcome = run.execute(&vm);
    // Deregister guest RAM from the NIC now (rkeys die), success or failure.
    run.rdma = None;
    let mut keep_vm = true;
    match outcome {
        Ok(()) => match run.mismatch_after_resume.take() {
            None => {
                run.summary.result = "committed".into();
                keep_vm = false;
            }
            Some(what) => {
                // A failed migration in every figure; nothing is lost: the source VM
                // stays registered here, paused, for the operator to decide.
                run.summary.result = "digest-mismatch".into();
                run.summary.error = format!(
                    "{what}; found after the destination resumed: the source VM is kept paused for inspection"
                );
            }
        },
        Err(e) => {
            let reason = format!("{e:#}");
            tracing::warn!(vm = %req.vm_id, "migration failed: {reason}");
            run.summary.error = reason.clone();
            match run.fsm.on(SourceEvent::Failed) {
                Ok(SourceAction::ReplayCommit) => {
                    // Committed: never resume here. Deliver the decision instead.
                    let session = run.session.expect("a session exists once committed");
                    match replay_commit(d, &req.to, session) {
                        Ok(detail) => {
                            tracing::info!(vm = %req.vm_id, "replayed Commit delivered; the VM runs at the destination");
                            if let Err(e) =
                                write_decision(d, &req.vm_id, "confirmed", &session, &req.to)
                            {
                                tracing::warn!("recording the confirmation: {e:#}");
                            }
                            let _ = run.fsm.on(SourceEvent::Running);
                            if let Err(e) = request_ok(&vm.link, &Msg::Stop) {
                                tracing::warn!("source VMM did not stop cleanly: {e}");
                            }
                            run.summary.result = "committed".into();
                            run.summary.guest_detail = detail;
                            if let Some(t) = run.paused_at {
                                run.summary.downtime_ms = t.elapsed().as_secs_f64() * 1e3;
                            }
                            run.summary.error =
                                format!("{reason}; the recorded Commit was replayed and confirmed");
                            keep_vm = false;
                        }
                        Err(e) => {
                            run.summary.result = "committed-unconfirmed".into();
                            run.summary.error = format!(
                                "{reason}; replaying the recorded Commit failed ({e:#}): the source VM stays paused (never resumed) and the destination holds the loaded VM; run `ferry recover {}` when the destination is reachable", req.vm_id
                            );
                        }
                    }
                }
                _ => {
                    if let Some(ctl) = run.ctl.as_mut() {
                        let _ = write_msg(
                            ctl,
                            &Msg::Abort {
                                reason: reason.clone(),
                            },
                        );
                    }
                    match request_ok(&vm.link, &Msg::Resume) {
                        Ok(()) => tracing::info!(vm = %req.vm_id, "source VM resumed"),
                        Err(e) => {
                            tracing::error!(vm = %req.vm_id, "source VM could not be resumed: {e}");
                            run.summary.error =
                                format!("{reason}; resuming the source VM failed: {e}");
                        }
                    }
                }
            }
        }
    }
    let s = &mut run.summary;
    s.rounds = s.per_round.len() as u32;
    s.bytes_transferred = s.per_round.iter().map(|r| r.bytes).sum();
    s.zero_pages_skipped = s.per_round.iter().map(|r| r.zero_pages).sum();
    let data_ms: f64 = s.per_round.iter().map(|r| r.ms).sum();
    if data_ms > 0.0 {
        s.throughput_gbps = s.bytes_transferred as f64 * 8.0 / (data_ms / 1e3) / 1e9;
    }
    s.total_ms = run.t0.elapsed().as_secs_f64() * 1e3;
    d.active.lock().expect("lock").remove(&req.vm_id);
    if keep_vm {
        d.vms.lock().expect("lock").insert(req.vm_id.clone(), vm);
    }
    run.summary
}
