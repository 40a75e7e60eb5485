//! What one daemon holds, in one structure behind one lock: registered VMs, VMMs waiting
//! for incoming VMs, migrations in both directions, held VMs and the data connections
//! migrations wait for.
//!
//! Links to VMMs live here only while idle; a migration takes what it needs out and puts
//! it back (or not) when it ends, so no lock is held across I/O.

use std::collections::HashMap;
use std::net::TcpStream;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use ferry_engine::session::SessionId;
use ferry_proto::auth::SessionKey;
use ferry_proto::vmm::Fence;

pub use crate::entries::{
    link_alive, DataWaiter, HeldVm, Incoming, Outgoing, Snapshot, SourceVm, WaitingVmm,
};
use crate::peer::PeerStream;

#[derive(Default)]
struct Inner {
    sources: HashMap<String, SourceVm>,
    outgoing: HashMap<String, Outgoing>,
    waiting: HashMap<String, WaitingVmm>,
    incoming: HashMap<SessionId, Incoming>,
    held: HashMap<SessionId, HeldVm>,
    data: HashMap<SessionId, DataWaiter>,
}

/// The daemon's registry. See the module documentation.
#[derive(Default)]
pub struct Registry {
    inner: Mutex<Inner>,
    changed: Condvar,
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn notify(&self) {
        self.changed.notify_all();
    }

    /// Waits (up to `limit`) until `f` returns something.
    fn wait_for<T>(
        &self,
        limit: Duration,
        mut f: impl FnMut(&mut Inner) -> Option<T>,
    ) -> Option<T> {
        let end = Instant::now() + limit;
        let mut g = self.lock();
        loop {
            if let Some(t) = f(&mut g) {
                return Some(t);
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            g = self
                .changed
                .wait_timeout(g, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Whether [`Registry::add_source`] would take a registration of `vm_id` (checked
    /// before the VMM is told `Ok`).
    ///
    /// # Errors
    ///
    /// Why not.
    pub fn can_add_source(&self, vm_id: &str, fence: Option<&Fence>) -> Result<(), String> {
        let g = self.lock();
        if let Some(o) = g.outgoing.get(vm_id) {
            return match (fence, o.session) {
                (Some(f), Some(s)) if f.session == s => Ok(()),
                _ => Err(format!("VM {vm_id} is being migrated")),
            };
        }
        match g.sources.get(vm_id) {
            Some(old) if link_alive(&old.link) => {
                Err(format!("VM {vm_id} is already registered by a running VMM"))
            }
            _ => Ok(()),
        }
    }

    /// Whether [`Registry::add_waiting`] would take a VMM waiting for `vm_id`.
    ///
    /// # Errors
    ///
    /// Another live VMM already waits for it.
    pub fn can_add_waiting(&self, vm_id: &str) -> Result<(), String> {
        match self.lock().waiting.get(vm_id) {
            Some(old) if link_alive(&old.link) => {
                Err(format!("another VMM already waits for VM {vm_id}"))
            }
            _ => Ok(()),
        }
    }

    /// Registers a source VM. A VMM re-registering under the fence of a migration in
    /// progress is handed to that migration instead.
    ///
    /// # Errors
    ///
    /// The VM is already registered (with a live VMM) or being migrated under another
    /// session.
    pub fn add_source(&self, vm_id: &str, vm: SourceVm) -> Result<(), String> {
        let mut g = self.lock();
        if let Some(o) = g.outgoing.get_mut(vm_id) {
            return match (&vm.fence, o.session) {
                (Some(f), Some(s)) if f.session == s => {
                    o.reattached = Some(vm);
                    drop(g);
                    self.notify();
                    Ok(())
                }
                _ => Err(format!("VM {vm_id} is being migrated")),
            };
        }
        if let Some(old) = g.sources.get(vm_id) {
            if link_alive(&old.link) {
                return Err(format!("VM {vm_id} is already registered by a running VMM"));
            }
        }
        g.sources.insert(vm_id.to_owned(), vm);
        drop(g);
        self.notify();
        Ok(())
    }

    /// Whether a migration of `vm_id` may be queued: registered, not paused under a
    /// fence, not migrating.
    ///
    /// # Errors
    ///
    /// Why not, and what to do.
    pub fn can_migrate(&self, vm_id: &str) -> Result<(), String> {
        Self::migratable(&self.lock(), vm_id)
    }

    fn migratable(g: &Inner, vm_id: &str) -> Result<(), String> {
        if g.outgoing.contains_key(vm_id) {
            return Err(format!("VM {vm_id} is already being migrated"));
        }
        match g.sources.get(vm_id) {
            None => Err(format!(
                "no VM {vm_id} is registered with this sidecar (`ferry status` lists the registered VMs; its VMM registers it when it starts)"
            )),
            Some(v) if v.fence.is_some() => Err(format!(
                "VM {vm_id} is paused under the commit fence of an earlier migration: run `ferry recover {vm_id}`"
            )),
            Some(_) => Ok(()),
        }
    }

    /// Takes a registered VM out for a migration and marks it outgoing.
    ///
    /// # Errors
    ///
    /// Not registered, paused under a fence, or already migrating.
    pub fn begin_outgoing(&self, vm_id: &str, to: &str) -> Result<SourceVm, String> {
        let mut g = self.lock();
        Self::migratable(&g, vm_id)?;
        let vm = g.sources.remove(vm_id).expect("checked above");
        g.outgoing.insert(
            vm_id.to_owned(),
            Outgoing {
                to: to.to_owned(),
                phase: "preparing",
                ..Outgoing::default()
            },
        );
        Ok(vm)
    }

    /// Whether a migration of `vm_id` is going out.
    pub fn has_outgoing(&self, vm_id: &str) -> bool {
        self.lock().outgoing.contains_key(vm_id)
    }

    /// Marks a recorded decision of `vm_id` being settled (replayed or rolled back) as
    /// an outgoing migration, so a fenced VMM that re-registers meanwhile is handed to it;
    /// returns the VM if its VMM is registered now.
    ///
    /// # Errors
    ///
    /// A migration or settlement of the VM is already in progress.
    pub fn begin_settle(
        &self,
        vm_id: &str,
        to: &str,
        session: SessionId,
    ) -> Result<Option<SourceVm>, String> {
        let mut g = self.lock();
        if g.outgoing.contains_key(vm_id) {
            return Err(format!("VM {vm_id} is already being migrated or settled"));
        }
        let vm = g.sources.remove(vm_id);
        g.outgoing.insert(
            vm_id.to_owned(),
            Outgoing {
                to: to.to_owned(),
                session: Some(session),
                phase: "committed",
                ..Outgoing::default()
            },
        );
        Ok(vm)
    }

    /// Updates an outgoing migration's status.
    pub fn update_outgoing(&self, vm_id: &str, f: impl FnOnce(&mut Outgoing)) {
        if let Some(o) = self.lock().outgoing.get_mut(vm_id) {
            f(o);
        }
    }

    /// A VMM that re-registered during this migration, waiting up to `limit` for one.
    pub fn take_reattached(&self, vm_id: &str, limit: Duration) -> Option<SourceVm> {
        self.wait_for(limit, |g| g.outgoing.get_mut(vm_id)?.reattached.take())
    }

    /// Ends an outgoing migration; `keep` goes back to the registered VMs (a reattached
    /// VMM's registration wins over a dead link).
    pub fn end_outgoing(&self, vm_id: &str, keep: Option<SourceVm>) {
        let mut g = self.lock();
        let reattached = g.outgoing.remove(vm_id).and_then(|o| o.reattached);
        let keep = match (keep, reattached) {
            (_, Some(r)) => Some(r),
            (k, None) => k,
        };
        if let Some(vm) = keep {
            g.sources.insert(vm_id.to_owned(), vm);
        }
        drop(g);
        self.notify();
    }

    /// Takes a registered VM out (to stop or resume it outside a migration), waiting up
    /// to `limit` for it to register.
    pub fn take_source(&self, vm_id: &str, limit: Duration) -> Option<SourceVm> {
        self.wait_for(limit, |g| g.sources.remove(vm_id))
    }

    /// Adds a VMM waiting for `vm_id`.
    ///
    /// # Errors
    ///
    /// Another live VMM already waits for it.
    pub fn add_waiting(&self, vm_id: &str, vmm: WaitingVmm) -> Result<(), String> {
        let mut g = self.lock();
        if let Some(old) = g.waiting.get(vm_id) {
            if link_alive(&old.link) {
                return Err(format!("another VMM already waits for VM {vm_id}"));
            }
        }
        g.waiting.insert(vm_id.to_owned(), vmm);
        drop(g);
        self.notify();
        Ok(())
    }

    /// Takes the VMM waiting for `vm_id`.
    pub fn take_waiting(&self, vm_id: &str) -> Option<WaitingVmm> {
        self.lock().waiting.remove(vm_id)
    }

    /// Marks an incoming migration in progress.
    pub fn begin_incoming(&self, session: SessionId, vm_id: &str, control: Option<TcpStream>) {
        self.lock().incoming.insert(
            session,
            Incoming {
                vm_id: vm_id.to_owned(),
                phase: "receiving",
                control,
            },
        );
    }

    /// Updates an incoming migration's phase.
    pub fn incoming_phase(&self, session: SessionId, phase: &'static str) {
        if let Some(i) = self.lock().incoming.get_mut(&session) {
            i.phase = phase;
        }
    }

    /// Ends an incoming migration (its VM is held, runs, or was discarded).
    pub fn end_incoming(&self, session: SessionId) {
        self.lock().incoming.remove(&session);
        self.notify();
    }

    /// Cuts an in-progress incoming migration's control connection (a replayed decision
    /// arrived: the old link is dead even if the kernel has not noticed).
    pub fn cut_incoming(&self, session: SessionId) {
        if let Some(c) = self
            .lock()
            .incoming
            .get(&session)
            .and_then(|i| i.control.as_ref())
        {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Parks a held VM.
    pub fn hold(&self, session: SessionId, vm: HeldVm) {
        self.lock().held.insert(session, vm);
        self.notify();
    }

    /// Takes a held VM, waiting up to `limit` while an incoming migration of the session
    /// is still winding down (it parks the VM when it notices its link died).
    pub fn take_held(&self, session: SessionId, limit: Duration) -> Option<HeldVm> {
        self.wait_for(limit, |g| {
            if let Some(h) = g.held.remove(&session) {
                return Some(Some(h));
            }
            (!g.incoming.contains_key(&session)).then_some(None)
        })
        .flatten()
    }

    /// The session of a held VM of `vm_id`, if any (for `ferry recover` on a destination).
    pub fn held_session_of(&self, vm_id: &str) -> Option<SessionId> {
        self.lock()
            .held
            .iter()
            .find(|(_, h)| h.vm_id == vm_id)
            .map(|(s, _)| *s)
    }

    /// Attaches a VMM that reattached holding the loaded VM of `session` to its held
    /// entry; gives the VMM back when nothing is held for the session.
    pub fn attach_held(&self, session: SessionId, vmm: WaitingVmm) -> Option<WaitingVmm> {
        let mut g = self.lock();
        match g.held.get_mut(&session) {
            Some(h) => {
                h.vmm = Some(vmm);
                h.session.vm_reattached();
                drop(g);
                self.notify();
                None
            }
            None => Some(vmm),
        }
    }

    /// Expects data connections for `session`.
    pub fn expect_data(&self, session: SessionId, waiter: DataWaiter) {
        self.lock().data.insert(session, waiter);
    }

    /// Stops expecting data connections for `session`.
    pub fn forget_data(&self, session: SessionId) {
        self.lock().data.remove(&session);
    }

    /// The key and channel of the migration a data connection claims to belong to.
    pub fn data_waiter(
        &self,
        session: SessionId,
    ) -> Option<(SessionKey, Sender<(u16, PeerStream)>)> {
        self.lock()
            .data
            .get(&session)
            .map(|w| (w.key, w.tx.clone()))
    }

    /// Drops registrations and waiting VMMs whose VMM closed its link (unmapping their
    /// memory); returns the ids dropped.
    pub fn reap_closed_links(&self) -> Vec<String> {
        let mut g = self.lock();
        let dead: Vec<String> = g
            .sources
            .iter()
            .filter(|(_, v)| !link_alive(&v.link))
            .map(|(k, _)| k.clone())
            .collect();
        for k in &dead {
            g.sources.remove(k);
        }
        let dead_waiting: Vec<String> = g
            .waiting
            .iter()
            .filter(|(_, v)| !link_alive(&v.link))
            .map(|(k, _)| k.clone())
            .collect();
        for k in &dead_waiting {
            g.waiting.remove(k);
        }
        for h in g.held.values_mut() {
            if h.vmm.as_ref().is_some_and(|v| !link_alive(&v.link)) {
                h.vmm = None;
            }
        }
        dead.into_iter().chain(dead_waiting).collect()
    }

    /// What `ferry status` shows.
    pub fn snapshot(&self) -> Snapshot {
        let g = self.lock();
        let mut s = Snapshot {
            registered: g
                .sources
                .iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        v.regions.len(),
                        v.regions.iter().map(|r| r.size).sum(),
                        v.fence.as_ref().map(|f| f.session),
                    )
                })
                .collect(),
            waiting: g.waiting.keys().cloned().collect(),
            migrating: g
                .outgoing
                .iter()
                .map(|(k, o)| {
                    (
                        k.clone(),
                        "outgoing",
                        o.phase,
                        o.round,
                        o.bytes,
                        o.to.clone(),
                    )
                })
                .chain(g.incoming.values().map(|i| {
                    let from = i
                        .control
                        .as_ref()
                        .and_then(|c| c.peer_addr().ok())
                        .map(|a| a.ip().to_string())
                        .unwrap_or_default();
                    (i.vm_id.clone(), "incoming", i.phase, 0, 0, from)
                }))
                .collect(),
            held: g
                .held
                .iter()
                .map(|(s, h)| (h.vm_id.clone(), *s, h.session.phase().name()))
                .collect(),
        };
        s.registered.sort();
        s.waiting.sort();
        s.migrating.sort();
        s
    }
}
