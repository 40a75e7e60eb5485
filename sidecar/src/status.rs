//! `ferry status`: what the daemon holds, as one JSON document (typed, so its shape is
//! the code's).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::context::Daemon;
use crate::queue::{Finished, Job};

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
    /// "cloud-hypervisor" for a VM attached with `ferry ch register` (absent: a VMM
    /// speaking Ferry's VMM protocol).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmm: Option<String>,
}

/// A migration: queued, running or recently ended, either way.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Migration {
    /// The VM.
    pub vm_id: String,
    /// "outgoing" or "incoming".
    pub direction: String,
    /// "queued", "running", or how it ended: "committed", "aborted", "cancelled",
    /// "committed-unconfirmed", "start-failed", "digest-mismatch" (outgoing);
    /// "committed", "discarded", "held", "start-failed" (incoming).
    pub state: String,
    /// The session's phase while it runs ("preparing", "precopy", "stop-and-copy", ...).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub phase: String,
    /// "high", "normal" or "low" (outgoing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<String>,
    /// The other host: the destination (outgoing) or the source's address (incoming).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub peer: String,
    /// Round in progress, or rounds run.
    pub round: u32,
    /// Payload bytes moved.
    pub bytes: u64,
    /// MiB/s over the last second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_mibps: Option<f64>,
    /// How fast the guest dirties memory, MiB/s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dirty_rate_mibps: Option<f64>,
    /// The final copy's expected length at the rate in force, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_downtime_ms: Option<f64>,
    /// Place in the queue (queued ones; 1 is next).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_position: Option<usize>,
    /// Its own cap, MiB/s (outgoing; 0: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bandwidth_mibps: Option<u64>,
    /// The cap in force now (its own and its share of the host's), MiB/s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_mibps: Option<f64>,
    /// Why it waits, when not just for its turn.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub note: String,
    /// Downtime of a committed outgoing migration, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<f64>,
    /// Whole migration (ended ones), ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_ms: Option<f64>,
    /// When it ended, seconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<u64>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
}

/// This host's limits.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Limits {
    /// Most outgoing migrations at once.
    pub outgoing: usize,
    /// Most incoming migrations at once.
    pub incoming: usize,
    /// The host's bandwidth cap for outgoing migrations, MiB/s (0: none).
    pub max_bandwidth_mibps: u64,
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

/// The document `ferry status --json` prints (documented in `docs/operations.md`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    /// This host's limits.
    pub limits: Limits,
    /// Running and queued migrations (queue order), then recently ended ones (newest
    /// first).
    pub migrations: Vec<Migration>,
    /// Registered VMs.
    pub registered: Vec<Registered>,
    /// VMs a local VMM waits for.
    pub waiting_incoming: Vec<String>,
    /// Migrations in progress (either way, settlements included), by VM: their phase.
    pub migrating: BTreeMap<String, String>,
    /// VMs held after their source's link was lost (or their start failed).
    pub held: Vec<Held>,
    /// Whether peer connections are encrypted (TLS).
    pub encrypted: bool,
}

fn tenth(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

fn mibps(bytes_per_s: f64) -> f64 {
    tenth(bytes_per_s / (1u64 << 20) as f64)
}

fn job_row(job: &Job, position: usize) -> Migration {
    let l = job.live();
    Migration {
        vm_id: job.vm_id.clone(),
        direction: "outgoing".into(),
        state: if position == 0 { "running" } else { "queued" }.into(),
        phase: l.phase.into(),
        priority: Some(job.priority.name().into()),
        peer: job.to.clone(),
        round: l.round,
        bytes: l.bytes,
        rate_mibps: l.rate.map(mibps),
        dirty_rate_mibps: l.dirty_rate.map(mibps),
        expected_downtime_ms: l.expected_downtime.map(|d| tenth(d.as_secs_f64() * 1e3)),
        queue_position: (position > 0).then_some(position),
        max_bandwidth_mibps: Some(job.flow.own() >> 20),
        bandwidth_mibps: (position == 0)
            .then(|| job.flow.rate().map(|r| mibps(r as f64)))
            .flatten(),
        note: l.note,
        ..Migration::default()
    }
}

fn finished_row(f: Finished) -> Migration {
    Migration {
        vm_id: f.vm_id,
        direction: f.direction.into(),
        state: f.state,
        priority: f.priority.map(|p| p.name().into()),
        peer: f.peer,
        round: f.rounds,
        bytes: f.bytes,
        downtime_ms: f.downtime_ms.map(tenth),
        total_ms: Some(tenth(f.total_ms)),
        ended_at: f
            .ended_at
            .duration_since(std::time::UNIX_EPOCH)
            .ok()
            .map(|d| d.as_secs()),
        error: f.error,
        ..Migration::default()
    }
}

/// What the metrics read at scrape time.
pub fn gauges(d: &Daemon) -> crate::metrics::Gauges {
    let (outgoing, queued) = d.queue.counts();
    crate::metrics::Gauges {
        outgoing,
        queued,
        incoming: d.incoming.load(std::sync::atomic::Ordering::Relaxed),
        max_outgoing: d.cfg.max_outgoing,
        max_incoming: d.cfg.max_incoming,
        cap: d.bandwidth.host_cap().unwrap_or(0),
    }
}

/// The daemon's status now.
pub fn of(d: &Daemon) -> Status {
    let s = d.registry.snapshot();
    let (jobs, recent) = d.queue.snapshot();
    let mut migrations: Vec<Migration> = jobs.iter().map(|(j, p)| job_row(j, *p)).collect();
    // Incoming ones, and settlements of recorded decisions (not queued).
    for (vm, dir, phase, round, bytes, peer) in &s.migrating {
        if *dir == "outgoing" && jobs.iter().any(|(j, _)| &j.vm_id == vm) {
            continue;
        }
        migrations.push(Migration {
            vm_id: vm.clone(),
            direction: (*dir).into(),
            state: "running".into(),
            phase: (*phase).into(),
            peer: peer.clone(),
            round: *round,
            bytes: *bytes,
            ..Migration::default()
        });
    }
    migrations.extend(recent.into_iter().rev().map(finished_row));
    Status {
        limits: Limits {
            outgoing: d.cfg.max_outgoing,
            incoming: d.cfg.max_incoming,
            max_bandwidth_mibps: d.cfg.max_bandwidth_mibps,
        },
        migrations,
        registered: s
            .registered
            .into_iter()
            .map(|(vm_id, regions, ram_bytes, fence)| Registered {
                vm_id,
                regions,
                ram_bytes,
                fenced_session: fence.map(|f| f.to_string()),
                vmm: None,
            })
            .chain(
                d.ch.sources()
                    .into_iter()
                    .map(|(vm_id, ram_bytes)| Registered {
                        vm_id,
                        regions: 0,
                        ram_bytes,
                        fenced_session: None,
                        vmm: Some("cloud-hypervisor".into()),
                    }),
            )
            .collect(),
        waiting_incoming: s.waiting.into_iter().chain(d.ch.waiting()).collect(),
        migrating: s
            .migrating
            .iter()
            .map(|(vm, _, phase, _, _, _)| (vm.clone(), (*phase).to_owned()))
            .collect(),
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

fn or_dash<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

/// `ferry status` for people: limits, then one line per migration, then what is held.
pub fn table(st: &Status) -> String {
    let mut out = format!(
        "limits: {} outgoing, {} incoming, bandwidth {}\n",
        st.limits.outgoing,
        st.limits.incoming,
        if st.limits.max_bandwidth_mibps == 0 {
            "uncapped".to_string()
        } else {
            format!("{} MiB/s", st.limits.max_bandwidth_mibps)
        }
    );
    out.push_str(&format!(
        "registered: {}\n",
        if st.registered.is_empty() {
            "none".to_string()
        } else {
            st.registered
                .iter()
                .map(|r| format!("{} ({} MiB)", r.vm_id, r.ram_bytes >> 20))
                .collect::<Vec<_>>()
                .join(", ")
        }
    ));
    if st.migrations.is_empty() {
        out.push_str("no migrations\n");
    } else {
        let rows: Vec<[String; 11]> = st
            .migrations
            .iter()
            .map(|m| {
                [
                    m.vm_id.clone(),
                    if m.direction == "outgoing" {
                        "out"
                    } else {
                        "in"
                    }
                    .into(),
                    m.peer.clone(),
                    match (m.state.as_str(), m.queue_position) {
                        ("queued", Some(p)) => format!("queued #{p}"),
                        ("running", _) => m.phase.clone(),
                        (s, _) => s.to_owned(),
                    },
                    m.priority.clone().unwrap_or_else(|| "-".into()),
                    // The destination does not count rounds or bytes: its source does.
                    if m.direction == "incoming" {
                        "-".into()
                    } else {
                        m.round.to_string()
                    },
                    if m.direction == "incoming" {
                        "-".into()
                    } else {
                        format!("{}", m.bytes >> 20)
                    },
                    or_dash(m.rate_mibps),
                    or_dash(m.dirty_rate_mibps),
                    or_dash(m.expected_downtime_ms.map(|d| format!("{d:.0}"))),
                    match (&m.bandwidth_mibps, m.max_bandwidth_mibps) {
                        (Some(b), _) => format!("{b}"),
                        (None, Some(own)) if own > 0 => format!("{own}"),
                        _ => "-".into(),
                    },
                ]
            })
            .collect();
        let head = [
            "VM",
            "DIR",
            "PEER",
            "STATE",
            "PRIO",
            "ROUND",
            "MiB",
            "MiB/s",
            "DIRTY",
            "EXP.DT ms",
            "CAP",
        ];
        let mut widths: Vec<usize> = head.iter().map(|h| h.len()).collect();
        for r in &rows {
            for (w, c) in widths.iter_mut().zip(r) {
                *w = (*w).max(c.len());
            }
        }
        let line = |cells: &[String]| {
            let mut l = cells
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect::<Vec<_>>()
                .join("  ");
            l.truncate(l.trim_end().len());
            l.push('\n');
            l
        };
        out.push_str(&line(&head.map(String::from)));
        for r in &rows {
            out.push_str(&line(r));
        }
        for m in st
            .migrations
            .iter()
            .filter(|m| !m.note.is_empty() || !m.error.is_empty())
        {
            let text = if m.note.is_empty() { &m.error } else { &m.note };
            out.push_str(&format!("  {}: {text}\n", m.vm_id));
        }
    }
    for h in &st.held {
        out.push_str(&format!(
            "held: {} (session {}, {}): `ferry recover` on its source settles it\n",
            h.vm_id, h.session, h.phase
        ));
    }
    out
}
