//! Source sessions of this host: a migration out (the checks before it: a recorded
//! decision owns the VM; the session's configuration from the request; the run; the
//! summary the CLI gets), and the settling of a recorded, unconfirmed decision (`ferry
//! recover`, or a restarted daemon). Each run itself is [`Driver`]'s.

use std::sync::Arc;
use std::time::Duration;

use ferry_engine::precopy::{ConvergencePolicy, LimitAction};
use ferry_engine::session::{DecisionState, SessionId, SourceConfig, SourceOutcome, SourceSession};
use ferry_proto::auth::random;
use ferry_proto::cli::{CliMsg, MigrateRequest, OnLimit, Phase, UNKNOWN};
use ferry_proto::mem::GuestRegion;
use ferry_proto::records::{self, Decision};

use crate::context::Daemon;
use crate::entries::SourceVm;
use crate::queue::{Finished, Job};
use crate::replay::{settle_undecided, stop_reattached};
use crate::source::{Driver, Reporter};
use crate::summary::Summary;

/// The session's configuration for a request.
pub fn config_of(d: &Daemon, req: &MigrateRequest, regions: Vec<u64>) -> SourceConfig {
    let mut c = SourceConfig::new(regions);
    c.policy = ConvergencePolicy {
        downtime_budget: Duration::from_millis(u64::from(req.downtime_ms)),
        max_rounds: req.max_rounds.max(1),
        timeout: Duration::from_millis(req.timeout_ms),
        on_limit: match req.on_limit {
            OnLimit::Abort => LimitAction::Abort,
            OnLimit::Force => LimitAction::ForceStopAndCopy,
        },
    };
    c.verify = req.verify;
    c.observe = Duration::from_millis(u64::from(req.observe_ms));
    c.replay_window = d.cfg.replay_window;
    c
}

/// The session's configuration for settling a recorded decision (no rounds to run).
pub fn config_of_recovery(d: &Daemon, window: Duration) -> SourceConfig {
    let mut c = SourceConfig::new(Vec::new());
    c.replay_window = window;
    let _ = d;
    c
}

/// Whether a new migration of `vm_id` may start, given its record: a committed,
/// unconfirmed decision owns the VM (migrating it again could make it run in two places
/// once the first destination gets its decision). With `held` (this migration holds the
/// VM, so no other runs), an "undecided" record is a session that died before it decided:
/// its destination is released before the new record replaces it.
pub fn check_record(d: &Daemon, vm_id: &str, held: bool) -> Result<(), String> {
    match records::read_decision(&d.cfg.state_dir, vm_id) {
        Ok(Some(dec)) if dec.state == DecisionState::Committed => Err(format!(
            "VM {vm_id} has a committed, unconfirmed migration to {}: run `ferry recover {vm_id}` first",
            dec.to
        )),
        Ok(Some(dec)) if held && dec.state == DecisionState::Undecided => {
            settle_undecided(d, vm_id, &dec)
                .map_err(|e| format!("{:#}", anyhow::Error::new(e)))
        }
        Ok(_) => Ok(()),
        Err(e) => Err(format!("{:#}", anyhow::Error::new(e))),
    }
}

/// Runs a queued migration: waits for its turn, runs it (waiting again whenever the
/// destination is busy), and returns its summary ("cancelled" when cancelled while
/// queued). The job leaves the queue; status and metrics learn how it ended.
pub fn run_queued(
    d: &Daemon,
    req: &MigrateRequest,
    job: &Arc<Job>,
    report: Reporter<'_>,
) -> Summary {
    let asked = std::time::Instant::now();
    let mut queued = Duration::ZERO;
    let summary = loop {
        let waited = std::time::Instant::now();
        let turn = d.queue.wait_turn(job, |position| {
            report(CliMsg::Progress {
                phase: Phase::Queued,
                round: u32::try_from(position).unwrap_or(u32::MAX),
                round_done: 0,
                round_total: 0,
                total_done: 0,
                rate: UNKNOWN,
                dirty_rate: UNKNOWN,
                expected_downtime_ms: UNKNOWN,
            });
        });
        queued += waited.elapsed();
        let turn = match turn {
            Ok(t) => t,
            Err(why) => {
                let mut s = Summary::new(req, d.auth.encrypted());
                s.result = "cancelled".into();
                s.error = format!("{why}: nothing was moved; the VM runs here");
                break s;
            }
        };
        d.bandwidth.attach(&job.flow);
        let attempt = migrate(d, req, Some(job), report);
        d.bandwidth.detach(&job.flow);
        drop(turn);
        match attempt {
            Ok(s) => break s,
            Err(why) => {
                tracing::info!(vm = %req.vm_id, to = %req.to, "{why}: the migration waits in the queue");
                d.queue.defer(job, format!("destination busy: {why}"));
            }
        }
    };
    let mut summary = summary;
    summary.queued_ms = queued.as_secs_f64() * 1e3;
    summary.max_bandwidth_mibps = job.flow.own() >> 20;
    let downtime =
        (summary.result == "committed").then(|| Duration::from_secs_f64(summary.downtime_ms / 1e3));
    d.metrics.finished(
        "outgoing",
        &summary.result,
        summary.rounds,
        downtime,
        asked.elapsed(),
    );
    d.queue.finish(
        job,
        Some(Finished {
            vm_id: req.vm_id.clone(),
            direction: "outgoing",
            peer: req.to.clone(),
            state: summary.result.clone(),
            priority: Some(req.priority),
            rounds: summary.rounds,
            bytes: summary.bytes_transferred,
            downtime_ms: downtime.map(|_| summary.downtime_ms),
            total_ms: asked.elapsed().as_secs_f64() * 1e3,
            ended_at: std::time::SystemTime::now(),
            error: summary.error.clone(),
        }),
    );
    summary
}

/// Runs a migration of `req.vm_id`; returns a summary (result "aborted" with the reason
/// on failure, the VM running here again).
///
/// # Errors
///
/// The destination had no free slot (it answered `Busy`): nothing happened, and the job
/// waits again.
fn migrate(
    d: &Daemon,
    req: &MigrateRequest,
    job: Option<&Arc<Job>>,
    report: Reporter<'_>,
) -> Result<Summary, String> {
    if d.ch.has_source(&req.vm_id) {
        return crate::ch::migrate(d, req, job, report);
    }
    let mut summary = Summary::new(req, d.auth.encrypted());
    if let Err(e) = check_record(d, &req.vm_id, false) {
        summary.error = e;
        return Ok(summary);
    }
    let vm = match d.registry.begin_outgoing(&req.vm_id, &req.to) {
        Ok(vm) => vm,
        Err(e) => {
            summary.error = e;
            return Ok(summary);
        }
    };
    // The VM is this migration's now: settle what its record says about the last one.
    if let Err(e) = check_record(d, &req.vm_id, true) {
        summary.error = e;
        d.registry.end_outgoing(&req.vm_id, Some(vm));
        return Ok(summary);
    }
    let session = match random() {
        Ok(b) => SessionId(b),
        Err(e) => {
            summary.error = e.to_string();
            d.registry.end_outgoing(&req.vm_id, Some(vm));
            return Ok(summary);
        }
    };
    d.registry
        .update_outgoing(&req.vm_id, |o| o.session = Some(session));
    summary.session = session.to_string();
    summary.ram_bytes = vm.regions.iter().map(|r| r.size).sum();
    let mut s = SourceSession::new(config_of(
        d,
        req,
        vm.mem.iter().map(GuestRegion::npages).collect(),
    ));
    let mut drv = Driver::new(d, &req.vm_id, &req.to, session, Some(vm));
    drv.req = Some(req);
    drv.report = Some(report);
    drv.job = job.cloned();
    drv.run(&mut s);
    let outcome = s.outcome().cloned().unwrap_or(SourceOutcome::Aborted);
    let net = drv.net.take();
    summary.fill(&s, &outcome, net.as_ref(), drv.t0.elapsed());
    // Deregister guest RAM from the NIC (rkeys die), success or failure.
    drop(net);
    let keep = match outcome {
        SourceOutcome::Committed => None,
        _ if !drv.vmm_alive => None,
        _ => drv.vm.take(),
    };
    if outcome == SourceOutcome::Committed {
        stop_reattached(d, &req.vm_id);
    }
    d.registry.end_outgoing(&req.vm_id, keep);
    // What is left of the VM here (its RAM mapped from memfds this process may hold last)
    // is released off the path to the summary: unmapping and freeing gigabytes takes
    // 0.2-0.5 s per 2 GiB on the measured hosts, time the operator would wait for nothing.
    release_in_background(drv.vm.take());
    match drv.dest_busy.take() {
        Some(busy) if outcome == SourceOutcome::Aborted => Err(busy),
        _ => Ok(summary),
    }
}

/// Drops `vm` on a thread of its own (named `ferry-release`); where no thread can be
/// started, the refused closure, and so `vm`, is dropped here.
fn release_in_background(vm: Option<SourceVm>) {
    if let Some(vm) = vm {
        let _ = std::thread::Builder::new()
            .name("ferry-release".into())
            .spawn(move || drop(vm));
    }
}

/// Settles a recorded, unconfirmed decision with a session of its own (`ferry recover`,
/// or a restarted daemon): deliver it (or roll it back), record the outcome, stop (or
/// resume) the VM if its VMM is registered. Returns the outcome and a line for the
/// operator.
pub fn settle_recorded(
    d: &Daemon,
    vm_id: &str,
    dec: &Decision,
    roll_back: Option<bool>,
    window: Duration,
) -> (SourceOutcome, String) {
    let mut cfg = crate::outgoing::config_of_recovery(d, window);
    cfg.replay_window = window;
    let mut s = match roll_back {
        None => SourceSession::deliver_recorded(cfg),
        Some(force) => SourceSession::roll_back(cfg, force),
    };
    let vm = match d.registry.begin_settle(vm_id, &dec.to, dec.session) {
        Ok(vm) => vm,
        Err(e) => return (SourceOutcome::CommittedUnconfirmed, e),
    };
    let had_vmm = vm.is_some();
    let mut drv = Driver::new(d, vm_id, &dec.to, dec.session, vm);
    drv.vmm_alive = had_vmm;
    drv.run(&mut s);
    let outcome = s
        .outcome()
        .cloned()
        .unwrap_or(SourceOutcome::CommittedUnconfirmed);
    let r = s.report();
    let mut line = match &outcome {
        SourceOutcome::Committed => format!(
            "the migration of {vm_id} to {} is confirmed: {}",
            dec.to,
            r.peer_detail.clone().unwrap_or_default()
        ),
        SourceOutcome::Aborted => format!(
            "rolled back: the destination {} holds no copy; VM {vm_id} runs here again",
            dec.to
        ),
        SourceOutcome::StartFailed(reason) => format!(
            "the destination {} still cannot start VM {vm_id}: {reason}",
            dec.to
        ),
        _ => r.error.clone().unwrap_or_else(|| "not settled".into()),
    };
    for w in &r.warnings {
        line.push_str(&format!("; {w}"));
    }
    // The VM goes back to the registry unless it is gone for good.
    let keep = match outcome {
        SourceOutcome::Committed => None,
        _ if !drv.vmm_alive => None,
        _ => drv.vm.take(),
    };
    if outcome == SourceOutcome::Committed {
        stop_reattached(d, vm_id);
    }
    d.registry.end_outgoing(vm_id, keep);
    (outcome, line)
}

/// A restarted daemon: every VM with a committed, unconfirmed decision gets its
/// decision replayed (in the background, for the replay window).
pub fn resume_recorded(d: &Arc<Daemon>) {
    let Ok(entries) = std::fs::read_dir(&d.cfg.state_dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(vm_id) = name.strip_suffix(".decision") else {
            continue;
        };
        if ferry_proto::common::check_vm_id(vm_id).is_err() {
            continue;
        }
        match records::read_decision(&d.cfg.state_dir, vm_id) {
            Ok(Some(dec)) if dec.state == DecisionState::Undecided => {
                tracing::warn!(vm = vm_id, session = %dec.session, to = %dec.to, "a migration died before it decided: the VM is this host's; telling the destination to discard its copy");
                if let Err(e) = settle_undecided(d, vm_id, &dec) {
                    tracing::error!(vm = vm_id, "{:#}", anyhow::Error::new(e));
                }
            }
            Ok(Some(dec)) if dec.state == DecisionState::Committed => {
                tracing::warn!(vm = vm_id, session = %dec.session, to = %dec.to, "a committed, unconfirmed decision is on disk: replaying it");
                let d = Arc::clone(d);
                let vm_id = vm_id.to_owned();
                std::thread::spawn(move || {
                    // Give a fenced VMM a moment to re-register so it can be stopped.
                    std::thread::sleep(Duration::from_secs(1));
                    let (o, line) = settle_recorded(&d, &vm_id, &dec, None, d.cfg.replay_window);
                    tracing::info!(vm = %vm_id, outcome = o.name(), "{line}");
                });
            }
            Ok(_) => {}
            Err(e) => tracing::error!(vm = vm_id, "{:#}", anyhow::Error::new(e)),
        }
    }
}
