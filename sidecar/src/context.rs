//! What every part of the sidecar shares: its settings, how peers authenticate, and the
//! registry of VMs and migrations. The daemon (`daemon.rs`) builds it and hands it to
//! the handlers; handlers depend on this, never on the daemon's loops.

use std::path::PathBuf;
use std::time::Duration;

use crate::peer::PeerAuth;
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
}

impl Daemon {
    /// Whether RDMA may carry a migration to `to` (the operator allowed that host).
    pub fn rdma_allowed(&self, to: &str) -> bool {
        let host = to.rsplit_once(':').map_or(to, |(h, _)| h);
        self.cfg
            .rdma_peers
            .iter()
            .any(|p| p == "*" || p == to || p == host)
    }
}
