//! What the sidecar holds of the Cloud Hypervisor VMs attached to it (the adapter itself
//! is `ch.rs`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

/// How long a silent peer is waited for on a CH migration's connections (a 64 MiB chunk
/// under a low bandwidth cap takes a while).
pub(crate) const PEER_IDLE: Duration = Duration::from_secs(300);

/// A CH attached to this sidecar.
#[derive(Clone, Debug)]
pub struct ChVm {
    /// Its API socket.
    pub api: PathBuf,
    /// Its guest RAM (sources).
    pub ram_bytes: u64,
}

/// CH VMs attached here: sources (`ferry ch register`) and CHs waiting for an incoming
/// VM (`ferry ch await`).
#[derive(Default)]
pub struct ChVms {
    pub(crate) sources: Mutex<HashMap<String, ChVm>>,
    pub(crate) waiting: Mutex<HashMap<String, ChVm>>,
    /// Source CH connections whose `Complete` answer was lost: held open (the source CH
    /// waits, paused) until the outcome is settled.
    pub(crate) unsettled: Mutex<HashMap<String, std::os::fd::OwnedFd>>,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ChVms {
    /// Whether `vm_id` is a CH source here.
    pub fn has_source(&self, vm_id: &str) -> bool {
        lock(&self.sources).contains_key(vm_id)
    }

    /// Registered CH sources: id and RAM.
    pub fn sources(&self) -> Vec<(String, u64)> {
        let mut v: Vec<_> = lock(&self.sources)
            .iter()
            .map(|(k, c)| (k.clone(), c.ram_bytes))
            .collect();
        v.sort();
        v
    }

    /// CHs waiting for an incoming VM.
    pub fn waiting(&self) -> Vec<String> {
        let mut v: Vec<_> = lock(&self.waiting).keys().cloned().collect();
        v.sort();
        v
    }
}
