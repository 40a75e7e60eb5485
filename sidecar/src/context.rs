//! What every part of the sidecar shares: its settings, how peers authenticate, and the
//! registry of VMs and migrations. The daemon (`daemon.rs`) builds it and hands it to
//! the handlers; handlers depend on this, never on the daemon's loops.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::Arc;
use std::time::Duration;

use crate::bandwidth::Bandwidth;
use crate::metrics::Metrics;
use crate::peer::PeerAuth;
use crate::queue::Scheduler;
use crate::registry::Registry;

/// The daemon's settings.
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    /// Unix socket for VMMs and the CLI.
    pub socket: PathBuf,
    /// Peer listen address.
    pub listen: String,
    /// Where decisions and incoming records are kept.
    pub state_dir: PathBuf,
    /// How long a decision the link lost is replayed before the operator is asked.
    pub replay_window: Duration,
    /// Destinations (host or host:port) RDMA may be used with; RDMA is not encrypted.
    pub rdma_peers: Vec<String>,
    /// Most outgoing migrations at once.
    pub max_outgoing: usize,
    /// Most incoming migrations at once.
    pub max_incoming: usize,
    /// The host's bandwidth cap for outgoing migrations, MiB/s (0: none).
    pub max_bandwidth_mibps: u64,
    /// Where Prometheus metrics are served, if anywhere.
    pub metrics: Option<String>,
    /// How incoming VMs' memory is filled.
    pub populate: crate::intake::Populate,
    /// CPUs data threads run on (empty: those local to the migration's network device).
    pub data_cpus: Vec<usize>,
}

/// Shared daemon state.
pub struct Daemon {
    /// Settings.
    pub cfg: DaemonConfig,
    /// How peers authenticate.
    pub auth: PeerAuth,
    /// What the daemon holds.
    pub registry: Registry,
    /// When it started serving.
    pub started: std::time::Instant,
    /// Outgoing migrations: the queue and its slots.
    pub queue: Scheduler,
    /// Bandwidth caps.
    pub bandwidth: Bandwidth,
    /// Counters for `--metrics`.
    pub metrics: Metrics,
    /// Incoming migrations running (slots of `max_incoming`).
    pub incoming: Arc<AtomicUsize>,
    /// Set on SIGTERM: no new migration starts.
    pub stopping: AtomicBool,
    /// `ferry migrate` requests not yet answered with their summary.
    pub clients: Arc<AtomicUsize>,
    /// Cloud Hypervisor VMs attached here.
    pub ch: crate::ch_vms::ChVms,
}

impl Daemon {
    /// A daemon with nothing registered and nothing running.
    pub fn new(cfg: DaemonConfig, auth: PeerAuth) -> Self {
        Self {
            queue: Scheduler::new(cfg.max_outgoing),
            bandwidth: Bandwidth::new(cfg.max_bandwidth_mibps.saturating_mul(1 << 20)),
            metrics: Metrics::default(),
            incoming: Arc::new(AtomicUsize::new(0)),
            stopping: AtomicBool::new(false),
            clients: Arc::new(AtomicUsize::new(0)),
            ch: crate::ch_vms::ChVms::default(),
            registry: Registry::default(),
            started: std::time::Instant::now(),
            cfg,
            auth,
        }
    }

    /// Whether RDMA may carry a migration to `to` (the operator allowed that host).
    pub fn rdma_allowed(&self, to: &str) -> bool {
        let host = to.rsplit_once(':').map_or(to, |(h, _)| h);
        self.cfg
            .rdma_peers
            .iter()
            .any(|p| p == "*" || p == to || p == host)
    }
}
