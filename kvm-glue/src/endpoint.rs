//! The VMM side of Ferry's VMM protocol: link this and a VMM is migratable.
//!
//! A source VMM keeps one [`SourceEndpoint`] for its VM's lifetime and calls
//! [`SourceEndpoint::serve`] in a loop: each call connects to the sidecar's Unix socket,
//! registers the VM (RAM regions as memfds over `SCM_RIGHTS`) and answers the sidecar's
//! requests through [`MigratableVm`] until the link ends. A destination VMM keeps one
//! [`IncomingEndpoint`] and calls [`IncomingEndpoint::receive`] in a loop until a VM runs.
//! The byte-level protocol is in `docs/vmm-protocol.md`.
//!
//! ```text
//! VMM (source)                      sidecar
//!   Hello{version}           --->
//!                            <---   Welcome{version}
//!   RegisterVm{.., fence}+memfds ->
//!                            <---   Ok
//!                            <---   StartDirtyLog | TakeDirty | Pause | SaveState
//!   Ok | Dirty | Paused | State ->
//!                            <---   Fence{session, to}  (a commit decision may follow)
//!   Ok                       --->
//!                            <---   Resume (failed or rolled back: run on, logging off)
//!                            <---   Stop   (the destination runs the VM: stop for good)
//!
//! VMM (destination)                 sidecar
//!   Hello, AwaitIncoming{vm_id, held} ->
//!                            <---   Ok
//!                            <---   CheckCompat{cpu_profile} (before accepting)
//!   Ok | Error{reason}       --->
//!                            <---   Load{vm_id, session, regions, blob}+memfds
//!   Loaded | Error           --->
//!                            <---   Start            | Discard
//!   Running{detail} | Error  --->   | Ok (wait for the next Load)
//! ```
//!
//! # Exactly one VM
//!
//! - A paused source VMM whose sidecar link breaks resumes on its own only when it was
//!   never fenced: the sidecar fences before it records a commit decision, so an unfenced
//!   VMM knows no decision exists. A fenced one stays paused, reconnects, and registers
//!   naming the fence; the sidecar reads its decision record and answers `Resume` (no
//!   decision) or `Stop` (the destination runs the VM).
//! - A destination VMM that loses its link while holding a loaded VM keeps it (not
//!   running), reconnects and names the session in `AwaitIncoming`; the sidecar starts it
//!   or discards it when the source's decision arrives.
//! - [`IncomingVm::start`] failing must leave the VM not running.
//!
//! Requests are answered in order; a failing request is answered with
//! [`VmmMsg::Error`] and the link stays up, so the sidecar decides what follows.

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_engine::session::SessionId;
use ferry_proto::common::{Message, RegionInfo, MAX_FRAME};
use ferry_proto::frame::{recv_with_fds, send_with_fds};
use ferry_proto::vmm::{unexpected, Fence, VmmMsg};
use ferry_proto::{ProtoError, VERSION};

/// An error a VMM callback returns; its text goes to the sidecar and the operator.
pub type VmError = Box<dyn std::error::Error + Send + Sync>;

/// How long the sidecar may take to answer the hello and the registration.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a source VMM does for a migration. Called from the thread running
/// [`SourceEndpoint::serve`], one call at a time.
pub trait MigratableVm {
    /// Switches dirty logging on (and clears any earlier log).
    ///
    /// # Errors
    ///
    /// When logging cannot be enabled; the migration aborts.
    fn start_dirty_log(&mut self) -> Result<(), VmError>;

    /// Gets and clears the dirty log: one bitmap per registered region (LSB-first
    /// words, bit i = page i), KVM's log ORed with the VMM's own writes. The bits
    /// returned must be cleared before this returns (`docs/design.md`: get-and-clear
    /// first, then send). `final_round` is set when the VM is paused.
    ///
    /// # Errors
    ///
    /// When the log cannot be read; the migration aborts.
    fn take_dirty(&mut self, final_round: bool) -> Result<Vec<Vec<u64>>, VmError>;

    /// Stops every vCPU and the VMM's own writers to guest memory; returns how long
    /// that took.
    ///
    /// # Errors
    ///
    /// When the VM cannot be paused; the migration aborts and the VM is resumed.
    fn pause(&mut self) -> Result<Duration, VmError>;

    /// The complete vCPU and device state, opaque to Ferry.
    ///
    /// # Errors
    ///
    /// When state cannot be saved; the migration aborts and the VM is resumed.
    fn save_state(&mut self) -> Result<Vec<u8>, VmError>;

    /// The migration failed (or was rolled back): switch dirty logging off and run
    /// (again) if paused.
    ///
    /// # Errors
    ///
    /// When the VM cannot run again: the VMM must say so loudly.
    fn resume(&mut self) -> Result<(), VmError>;

    /// The destination runs the VM: stop for good and release guest memory.
    ///
    /// # Errors
    ///
    /// Reported to the sidecar; the destination runs regardless.
    fn stop(&mut self) -> Result<(), VmError>;

    /// The sidecar fenced the VM (a commit decision may be recorded from now on), or a
    /// sidecar link broke while fenced (`lost`): the VM stays paused. For status displays;
    /// the endpoint enforces the rule.
    fn fenced(&mut self, fence: &Fence, lost: bool) {
        let _ = (fence, lost);
    }
}

/// What a destination VMM does with an incoming VM.
pub trait IncomingVm {
    /// Says whether this host can run a VM whose source VMM registered `cpu_profile`;
    /// asked before the destination accepts a migration, so an incompatible host
    /// refuses before any memory moves. The default accepts everything (a VMM without
    /// CPU state, such as a memory-only workload).
    ///
    /// # Errors
    ///
    /// The reason this host cannot run the VM; it reaches the operator.
    fn check_compat(&mut self, cpu_profile: &[u8]) -> Result<(), VmError> {
        let _ = cpu_profile;
        Ok(())
    }

    /// Takes the migrated RAM (one memfd per region, same layout as the source) and the
    /// state blob; loads but does not run. Verification of the VM's own records
    /// belongs here.
    ///
    /// # Errors
    ///
    /// When the state does not fit this VMM: the source resumes its VM.
    fn load(
        &mut self,
        vm_id: &str,
        regions: Vec<(RegionInfo, OwnedFd)>,
        blob: Vec<u8>,
    ) -> Result<(), VmError>;

    /// Runs the loaded VM; returns a line for the operator (what was checked).
    ///
    /// # Errors
    ///
    /// When the VM cannot start. The VM must then not be running (stop its vCPUs again if
    /// they were started): the sidecar reports a failed start and both copies are kept
    /// for the operator.
    fn start(&mut self) -> Result<String, VmError>;

    /// Throws the loaded VM away (the source keeps it).
    fn discard(&mut self);
}

/// How a [`SourceEndpoint::serve`] call ended.
#[derive(Debug, PartialEq, Eq)]
pub enum ServeEnd {
    /// The VM runs on the destination; this VMM stopped it.
    MigratedAway,
    /// The sidecar closed the link. The VM runs here, unless it is paused under a fence
    /// ([`SourceEndpoint::fence`]): then it waits for the next sidecar to say what became
    /// of the migration.
    SidecarGone,
}

/// Errors of the VMM side of the protocol.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// The sidecar's socket could not be reached.
    #[error("Cannot connect to the sidecar at {path}")]
    Connect {
        /// Socket path.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A protocol exchange failed.
    #[error("Sidecar protocol error while {during}")]
    Protocol {
        /// What was being done.
        during: &'static str,
        /// The underlying error.
        #[source]
        source: ProtoError,
    },
    /// The sidecar refused a request.
    #[error("Sidecar refused {during}: {reason}")]
    Refused {
        /// What was refused.
        during: &'static str,
        /// The sidecar's reason.
        reason: String,
    },
}

fn proto(during: &'static str) -> impl FnOnce(ProtoError) -> EndpointError {
    move |source| EndpointError::Protocol { during, source }
}

fn refused(during: &'static str, got: VmmMsg) -> EndpointError {
    match unexpected("Ok", got) {
        ProtoError::Refused { reason } => EndpointError::Refused { during, reason },
        e => EndpointError::Protocol { during, source: e },
    }
}

/// A connected, greeted link.
struct Link {
    sock: UnixStream,
}

impl Link {
    fn connect(path: &Path) -> Result<Self, EndpointError> {
        let sock = UnixStream::connect(path).map_err(|source| EndpointError::Connect {
            path: path.display().to_string(),
            source,
        })?;
        let link = Self { sock };
        link.sock
            .set_read_timeout(Some(HANDSHAKE_TIMEOUT))
            .map_err(|e| proto("saying hello")(ProtoError::io("set timeout")(e)))?;
        link.send(&VmmMsg::Hello { version: VERSION }, &[])
            .map_err(proto("saying hello"))?;
        match link.recv().map_err(proto("saying hello"))?.0 {
            VmmMsg::Welcome { .. } => Ok(link),
            other => Err(refused("hello", other)),
        }
    }

    fn send(&self, m: &VmmMsg, fds: &[std::os::fd::RawFd]) -> Result<(), ProtoError> {
        send_with_fds(&self.sock, m, fds)
    }

    fn recv(&self) -> Result<(VmmMsg, Vec<OwnedFd>), ProtoError> {
        recv_with_fds(&self.sock, MAX_FRAME)
    }

    /// Sends `m`, expects `Ok`, then waits without a timeout (the link idles between
    /// migrations).
    fn request_ok(
        &self,
        m: &VmmMsg,
        fds: &[std::os::fd::RawFd],
        during: &'static str,
    ) -> Result<(), EndpointError> {
        self.send(m, fds).map_err(proto(during))?;
        match self.recv().map_err(proto(during))?.0 {
            VmmMsg::Ok => {
                self.sock
                    .set_read_timeout(None)
                    .map_err(|e| proto(during)(ProtoError::io("clear timeout")(e)))?;
                Ok(())
            }
            other => Err(refused(during, other)),
        }
    }
}

/// A source VM's standing with its sidecar, kept across links for the VM's lifetime.
#[derive(Debug)]
pub struct SourceEndpoint {
    socket: PathBuf,
    vm_id: String,
    regions: Vec<RegionInfo>,
    cpu_profile: Vec<u8>,
    paused: bool,
    fence: Option<Fence>,
}

impl SourceEndpoint {
    /// A VM `vm_id` with these regions (in memfd order) and CPU-compatibility blob, to be
    /// registered with the sidecar at `socket`.
    pub fn new(socket: &Path, vm_id: &str, regions: Vec<RegionInfo>, cpu_profile: Vec<u8>) -> Self {
        Self {
            socket: socket.to_owned(),
            vm_id: vm_id.to_owned(),
            regions,
            cpu_profile,
            paused: false,
            fence: None,
        }
    }

    /// The fence the VM is paused under, if any.
    pub fn fence(&self) -> Option<&Fence> {
        self.fence.as_ref()
    }

    /// Whether a migration paused the VM (and nothing resumed it yet).
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Connects, registers the VM (with `memfds`, one per region; naming the fence when
    /// paused under one) and serves the sidecar's requests until the link ends. A failed
    /// migration (`Resume`) does not end the call.
    ///
    /// When the link breaks while the VM is paused: without a fence the VM is resumed
    /// here before this returns (no decision can exist); under a fence it stays paused
    /// and the next call reports the fence to the sidecar.
    ///
    /// # Errors
    ///
    /// Connection and protocol errors; the sidecar refusing the registration.
    pub fn serve<V: MigratableVm>(
        &mut self,
        vm: &mut V,
        memfds: &[BorrowedFd<'_>],
    ) -> Result<ServeEnd, EndpointError> {
        let result = self.serve_link(vm, memfds);
        match &result {
            Ok(ServeEnd::MigratedAway) => {}
            Ok(ServeEnd::SidecarGone) | Err(_) => self.link_lost(vm),
        }
        result
    }

    fn link_lost<V: MigratableVm>(&mut self, vm: &mut V) {
        if !self.paused {
            return;
        }
        match &self.fence {
            None => {
                // No fence: the sidecar cannot have recorded a decision. Never stay paused.
                match vm.resume() {
                    Ok(()) => {
                        self.paused = false;
                        tracing::warn!(vm = %self.vm_id, "sidecar lost while paused (no commit fence): the VM runs again");
                    }
                    Err(e) => {
                        tracing::error!(vm = %self.vm_id, "sidecar lost while paused; resuming failed: {e}")
                    }
                }
            }
            Some(f) => {
                tracing::warn!(
                    vm = %self.vm_id,
                    session = %f.session,
                    to = %f.to,
                    "sidecar lost after the commit fence: the VM stays paused until a sidecar says whether it moved"
                );
                vm.fenced(f, true);
            }
        }
    }

    fn serve_link<V: MigratableVm>(
        &mut self,
        vm: &mut V,
        memfds: &[BorrowedFd<'_>],
    ) -> Result<ServeEnd, EndpointError> {
        let link = Link::connect(&self.socket)?;
        let fds: Vec<_> = memfds.iter().map(|f| f.as_raw_fd()).collect();
        link.request_ok(
            &VmmMsg::RegisterVm {
                vm_id: self.vm_id.clone(),
                regions: self.regions.clone(),
                cpu_profile: self.cpu_profile.clone(),
                fence: self.fence.clone(),
            },
            &fds,
            "registering",
        )?;
        loop {
            let msg = match link.recv() {
                Ok((m, _)) => m,
                Err(ProtoError::Closed) => return Ok(ServeEnd::SidecarGone),
                Err(e) => return Err(proto("serving the sidecar")(e)),
            };
            let reply = match msg {
                VmmMsg::StartDirtyLog => vm.start_dirty_log().map(|()| VmmMsg::Ok),
                VmmMsg::TakeDirty { final_round } => vm
                    .take_dirty(final_round)
                    .map(|bitmaps| VmmMsg::Dirty { bitmaps }),
                VmmMsg::Pause => vm.pause().map(|d| {
                    self.paused = true;
                    VmmMsg::Paused {
                        pause_us: d.as_micros() as u64,
                    }
                }),
                VmmMsg::SaveState => vm.save_state().map(|blob| VmmMsg::State { blob }),
                VmmMsg::Fence(f) if self.paused => {
                    vm.fenced(&f, false);
                    self.fence = Some(f);
                    Ok(VmmMsg::Ok)
                }
                VmmMsg::Fence(_) => Ok(VmmMsg::Error {
                    message: "refusing a commit fence: the VM is not paused".into(),
                }),
                VmmMsg::Resume => vm.resume().map(|()| {
                    self.paused = false;
                    self.fence = None;
                    VmmMsg::Ok
                }),
                VmmMsg::Stop => {
                    let reply = match vm.stop() {
                        Ok(()) => VmmMsg::Ok,
                        Err(e) => VmmMsg::Error {
                            message: e.to_string(),
                        },
                    };
                    self.fence = None;
                    let _ = link.send(&reply, &[]);
                    return Ok(ServeEnd::MigratedAway);
                }
                other => Ok(VmmMsg::Error {
                    message: format!("a source VMM does not handle {}", other.name()),
                }),
            };
            let reply = reply.unwrap_or_else(|e| VmmMsg::Error {
                message: e.to_string(),
            });
            link.send(&reply, &[])
                .map_err(proto("answering the sidecar"))?;
        }
    }
}

/// A destination VMM's standing with its sidecar, kept across links until a VM runs.
#[derive(Debug)]
pub struct IncomingEndpoint {
    socket: PathBuf,
    vm_id: String,
    /// The session of the loaded (not running) VM this VMM holds.
    held: Option<SessionId>,
}

impl IncomingEndpoint {
    /// A VMM waiting for `vm_id` at the sidecar at `socket`.
    pub fn new(socket: &Path, vm_id: &str) -> Self {
        Self {
            socket: socket.to_owned(),
            vm_id: vm_id.to_owned(),
            held: None,
        }
    }

    /// The session of the loaded VM this VMM holds, if any.
    pub fn held(&self) -> Option<SessionId> {
        self.held
    }

    /// Connects, announces the wait (naming a held VM) and receives migrations until one
    /// runs here; returns the line [`IncomingVm::start`] produced. Discarded attempts do
    /// not end the call. When the link breaks while a VM is loaded, the VM is kept (not
    /// running) and the next call names it.
    ///
    /// # Errors
    ///
    /// Connection and protocol errors; the sidecar closing the link before a VM runs.
    pub fn receive<V: IncomingVm>(&mut self, vm: &mut V) -> Result<String, EndpointError> {
        let link = Link::connect(&self.socket)?;
        link.request_ok(
            &VmmMsg::AwaitIncoming {
                vm_id: self.vm_id.clone(),
                held: self.held,
            },
            &[],
            "announcing an incoming VM",
        )?;
        loop {
            let (msg, fds) = match link.recv() {
                Ok(x) => x,
                Err(e) => {
                    if let Some(s) = self.held {
                        tracing::warn!(vm = %self.vm_id, session = %s, "sidecar lost while holding a loaded VM: keeping it (not running) for the decision");
                    }
                    return Err(proto("waiting for an incoming VM")(e));
                }
            };
            let reply = match msg {
                VmmMsg::Load {
                    vm_id,
                    session,
                    regions,
                    blob,
                } => {
                    if self.held.take().is_some() {
                        vm.discard();
                    }
                    if fds.len() != regions.len() {
                        VmmMsg::Error {
                            message: format!(
                                "Load carried {} memfds for {} regions",
                                fds.len(),
                                regions.len()
                            ),
                        }
                    } else {
                        let pairs = regions.into_iter().zip(fds).collect();
                        match vm.load(&vm_id, pairs, blob) {
                            Ok(()) => {
                                self.held = Some(session);
                                VmmMsg::Loaded
                            }
                            Err(e) => VmmMsg::Error {
                                message: e.to_string(),
                            },
                        }
                    }
                }
                VmmMsg::CheckCompat { cpu_profile } => match vm.check_compat(&cpu_profile) {
                    Ok(()) => VmmMsg::Ok,
                    Err(e) => VmmMsg::Error {
                        message: e.to_string(),
                    },
                },
                VmmMsg::Start if self.held.is_some() => match vm.start() {
                    Ok(detail) => {
                        self.held = None;
                        link.send(
                            &VmmMsg::Running {
                                detail: detail.clone(),
                            },
                            &[],
                        )
                        .map_err(proto("confirming the VM runs"))?;
                        return Ok(detail);
                    }
                    Err(e) => VmmMsg::Error {
                        message: e.to_string(),
                    },
                },
                VmmMsg::Discard => {
                    if self.held.take().is_some() {
                        vm.discard();
                    }
                    VmmMsg::Ok
                }
                other => VmmMsg::Error {
                    message: format!("a waiting VMM does not handle {} now", other.name()),
                },
            };
            link.send(&reply, &[])
                .map_err(proto("answering the sidecar"))?;
        }
    }
}
