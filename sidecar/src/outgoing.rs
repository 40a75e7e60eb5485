//! Starting a migration out of this host: the checks before it (a recorded decision
//! owns the VM), the session's configuration from the request, the run, and the summary
//! the CLI gets. The run itself is [`Driver`]'s.

use std::time::Duration;

use ferry_engine::digest::MemoryDigest;
use ferry_engine::precopy::{ConvergencePolicy, LimitAction};
use ferry_engine::session::{
    DecisionState, Failure, FailureKind, SessionId, SourceConfig, SourceOutcome, SourceSession,
};
use ferry_proto::auth::random;
use ferry_proto::cli::{CliMsg, MigrateRequest, OnLimit};
use ferry_proto::mem::GuestRegion;
use ferry_proto::records;

use crate::daemon::Daemon;
use crate::source::Driver;
use crate::summary::Summary;

/// Sends progress to whoever asked for the migration.
pub type Reporter<'a> = &'a (dyn Fn(CliMsg) + Sync);

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
                        // memory: nothing changes the bytes while they are hashed. A page
                        // cut off by a shrinking memfd reads as zeros (the guard) and is
                        // caught by `memory_shrank`.
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

/// A failure if the VMM shrank a memfd under the mapping (what was read from it is void).
pub(crate) fn memory_shrank(mem: &[GuestRegion]) -> Option<Failure> {
    mem.iter().enumerate().find(|(_, r)| r.faulted()).map(|(i, _)| {
        Failure::new(
            FailureKind::VmmRefused,
            format!("the VMM shrank the memfd of region {i} under the sidecar: its guest memory cannot be migrated"),
        )
    })
}

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

/// Runs a migration of `req.vm_id`; always returns a summary (result "aborted" with the
/// reason on failure, the VM running here again).
pub fn migrate(d: &Daemon, req: &MigrateRequest, report: Reporter<'_>) -> Summary {
    let mut summary = Summary::new(req, d.auth.encrypted());
    // A committed, unconfirmed decision owns this VM: migrating it again could make it
    // run in two places once the first destination gets its decision.
    match records::read_decision(&d.cfg.state_dir, &req.vm_id) {
        Ok(Some(dec)) if dec.state == DecisionState::Committed => {
            summary.error = format!(
                "VM {} has a committed, unconfirmed migration to {}: run `ferry recover {}` first",
                req.vm_id, dec.to, req.vm_id
            );
            return summary;
        }
        Err(e) => {
            summary.error = format!("{:#}", anyhow::Error::new(e));
            return summary;
        }
        Ok(_) => {}
    }
    let vm = match d.registry.begin_outgoing(&req.vm_id, &req.to) {
        Ok(vm) => vm,
        Err(e) => {
            summary.error = e;
            return summary;
        }
    };
    let session = match random() {
        Ok(b) => SessionId(b),
        Err(e) => {
            summary.error = e.to_string();
            d.registry.end_outgoing(&req.vm_id, Some(vm));
            return summary;
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
        crate::replay::stop_reattached(d, &req.vm_id);
    }
    d.registry.end_outgoing(&req.vm_id, keep);
    summary
}
