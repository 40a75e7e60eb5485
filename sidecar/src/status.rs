//! `ferry status`: what the daemon holds, as one JSON document (typed, so its shape is
//! the code's).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::context::Daemon;

/// A registered VM.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Registered {
    /// Its id.
    pub vm_id: String,
    /// RAM regions.
    pub regions: usize,
    /// Guest RAM.
    pub ram_bytes: u64,
    /// The session of the commit fence it is paused under, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fenced_session: Option<String>,
}

/// A migration in progress.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Migration {
    /// "outgoing" or "incoming".
    pub direction: String,
    /// Where it stands.
    pub phase: String,
    /// Current round (outgoing).
    pub round: u32,
    /// Payload bytes moved so far (outgoing).
    pub bytes: u64,
    /// The destination (outgoing).
    #[serde(skip_serializing_if = "String::is_empty", default)]
    pub to: String,
}

/// A VM held here for its source's decision (or the operator).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Held {
    /// Its id.
    pub vm_id: String,
    /// The migration.
    pub session: String,
    /// "held" (waiting for the decision), "start-failed", ...
    pub phase: String,
}

/// The document `ferry status` prints.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    /// Registered VMs.
    pub registered: Vec<Registered>,
    /// VMs a local VMM waits for.
    pub waiting_incoming: Vec<String>,
    /// Migrations in progress, by VM: their phase.
    pub migrating: BTreeMap<String, String>,
    /// The same with their numbers.
    pub migrations: BTreeMap<String, Migration>,
    /// VMs held after their source's link was lost (or their start failed).
    pub held_after_link_loss: Vec<String>,
    /// The same with their sessions.
    pub held: Vec<Held>,
    /// Whether peer connections are encrypted (TLS).
    pub encrypted: bool,
}

/// The daemon's status now.
pub fn of(d: &Daemon) -> Status {
    let s = d.registry.snapshot();
    Status {
        registered: s
            .registered
            .into_iter()
            .map(|(vm_id, regions, ram_bytes, fence)| Registered {
                vm_id,
                regions,
                ram_bytes,
                fenced_session: fence.map(|f| f.to_string()),
            })
            .collect(),
        waiting_incoming: s.waiting,
        migrating: s
            .migrating
            .iter()
            .map(|(vm, _, phase, _, _, _)| (vm.clone(), (*phase).to_owned()))
            .collect(),
        migrations: s
            .migrating
            .into_iter()
            .map(|(vm, dir, phase, round, bytes, to)| {
                (
                    vm,
                    Migration {
                        direction: dir.into(),
                        phase: phase.into(),
                        round,
                        bytes,
                        to,
                    },
                )
            })
            .collect(),
        held_after_link_loss: s.held.iter().map(|h| h.0.clone()).collect(),
        held: s
            .held
            .into_iter()
            .map(|(vm_id, session, phase)| Held {
                vm_id,
                session: session.to_string(),
                phase: phase.into(),
            })
            .collect(),
        encrypted: d.auth.encrypted(),
    }
}
