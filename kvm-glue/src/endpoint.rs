//! The VMM side of Ferry's sidecar protocol: link this and a VMM is migratable.
//!
//! A source VMM connects to the sidecar's Unix socket, registers its VM (RAM regions as
//! memfds over `SCM_RIGHTS`) and then serves the sidecar's requests from a thread of its
//! own ([`SidecarLink::serve`]), implementing [`MigratableVm`]. A destination VMM waits
//! with [`SidecarLink::await_incoming`] and [`SidecarLink::receive`], implementing
//! [`IncomingVm`].
//!
//! ```text
//! VMM (source)                      sidecar
//!   Hello{version, Vmm}      --->
//!                            <---   Welcome{version}
//!   RegisterVm{...}+memfds   --->
//!                            <---   Ok
//!                            <---   StartDirtyLog | TakeDirty | Pause | SaveState
//!   Ok | Dirty | Paused | State ->
//!                            <---   Resume (migration failed: run on, logging off)
//!                            <---   Stop   (destination runs the VM: stop for good)
//!
//! VMM (destination)                 sidecar
//!   Hello, AwaitIncoming{vm_id} ->
//!                            <---   Ok
//!                            <---   CheckCompat{cpu_profile} (before accepting)
//!   Ok | Error{reason}       --->
//!                            <---   Load{regions, blob}+memfds
//!   Loaded | Error           --->
//!                            <---   Start            | Discard
//!   Running{detail}          --->   | Ok (wait for the next Load)
//! ```
//!
//! Requests are answered in order; a failing request is answered with
//! [`Msg::Error`] and the link stays up, so the sidecar decides what follows (it
//! resumes the VM on any failure before the commit point).

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use ferry_proto::frame::{recv_with_fds, send_with_fds};
use ferry_proto::msg::{Msg, RegionInfo, Role, MAX_FRAME};
use ferry_proto::{unexpected, ProtoError, VERSION};

/// An error a VMM callback returns; its text goes to the sidecar and the operator.
pub type VmError = Box<dyn std::error::Error + Send + Sync>;

/// What a source VMM does for a migration. Called from the thread running
/// [`SidecarLink::serve`], one call at a time.
pub trait MigratableVm {
    /// Switches dirty logging on (and clears any earlier log).
    ///
    /// # Errors
    ///
    /// When logging cannot be enabled; the migration aborts.
    fn start_dirty_log(&mut self) -> Result<(), VmError>;

    /// Gets and clears the dirty log: one bitmap per registered region (LSB-first
    /// words, bit i = page i), KVM's log ORed with the VMM's own writes. The bits
    /// returned must be cleared before this returns (DESIGN.md: get-and-clear first,
    /// then send). `final_round` is set when the VM is paused.
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

    /// The migration failed: switch dirty logging off and run (again) if paused.
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
    /// When the VM cannot start.
    fn start(&mut self) -> Result<String, VmError>;

    /// Throws the loaded VM away (the source keeps it).
    fn discard(&mut self);
}

/// How a [`SidecarLink::serve`] loop ended.
#[derive(Debug, PartialEq, Eq)]
pub enum ServeEnd {
    /// The VM runs on the destination; this VMM stopped it.
    MigratedAway,
    /// The sidecar closed the link; the VM keeps running here.
    SidecarGone,
}

/// Errors of the VMM side of the sidecar protocol.
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

/// A VMM's connection to its sidecar.
pub struct SidecarLink {
    sock: UnixStream,
}

fn proto(during: &'static str) -> impl FnOnce(ProtoError) -> EndpointError {
    move |source| EndpointError::Protocol { during, source }
}

impl SidecarLink {
    /// Connects and says hello.
    ///
    /// # Errors
    ///
    /// [`EndpointError::Connect`], or the sidecar refusing this protocol version.
    pub fn connect(path: &Path) -> Result<Self, EndpointError> {
        let sock = UnixStream::connect(path).map_err(|source| EndpointError::Connect {
            path: path.display().to_string(),
            source,
        })?;
        let link = Self { sock };
        link.send(&Msg::Hello {
            version: VERSION,
            role: Role::Vmm,
        })
        .map_err(proto("saying hello"))?;
        match link.recv().map_err(proto("saying hello"))?.0 {
            Msg::Welcome { .. } => Ok(link),
            other => Err(refused("hello", other)),
        }
    }

    fn send(&self, m: &Msg) -> Result<(), ProtoError> {
        send_with_fds(&self.sock, m, &[])
    }

    fn recv(&self) -> Result<(Msg, Vec<OwnedFd>), ProtoError> {
        recv_with_fds(&self.sock, MAX_FRAME)
    }

    /// Registers a VM: its RAM regions with their memfds (same order) and the CPU
    /// compatibility blob the destination checks before accepting.
    ///
    /// # Errors
    ///
    /// Protocol errors, or the sidecar refusing (e.g. an id already registered).
    pub fn register(
        &mut self,
        vm_id: &str,
        regions: &[RegionInfo],
        memfds: &[BorrowedFd<'_>],
        cpu_profile: Vec<u8>,
    ) -> Result<(), EndpointError> {
        let fds: Vec<_> = memfds.iter().map(|f| f.as_raw_fd()).collect();
        send_with_fds(
            &self.sock,
            &Msg::RegisterVm {
                vm_id: vm_id.to_owned(),
                regions: regions.to_vec(),
                cpu_profile,
            },
            &fds,
        )
        .map_err(proto("registering"))?;
        match self.recv().map_err(proto("registering"))?.0 {
            Msg::Ok => Ok(()),
            other => Err(refused("registration", other)),
        }
    }

    /// Serves migration requests until the VM is migrated away or the sidecar leaves.
    /// A failed migration (`Resume`) does not end the loop: the VM stays migratable.
    ///
    /// # Errors
    ///
    /// Protocol errors on the link (the VM keeps running: call `vm.resume()` if it
    /// was paused; `serve` has already done so when the link broke while paused).
    pub fn serve<V: MigratableVm>(&mut self, vm: &mut V) -> Result<ServeEnd, EndpointError> {
        let mut paused = false;
        loop {
            let msg = match self.recv() {
                Ok((m, _)) => m,
                Err(e) => {
                    // The sidecar is gone. No burned bridges: never stay paused.
                    if paused {
                        let _ = vm.resume();
                    }
                    return match e {
                        ProtoError::Closed => Ok(ServeEnd::SidecarGone),
                        e => Err(EndpointError::Protocol {
                            during: "serving the sidecar",
                            source: e,
                        }),
                    };
                }
            };
            let reply = match msg {
                Msg::StartDirtyLog => vm.start_dirty_log().map(|()| Msg::Ok),
                Msg::TakeDirty { final_round } => vm
                    .take_dirty(final_round)
                    .map(|bitmaps| Msg::Dirty { bitmaps }),
                Msg::Pause => vm.pause().map(|d| {
                    paused = true;
                    Msg::Paused {
                        pause_us: d.as_micros() as u64,
                    }
                }),
                Msg::SaveState => vm.save_state().map(|blob| Msg::State { blob }),
                Msg::Resume => vm.resume().map(|()| {
                    paused = false;
                    Msg::Ok
                }),
                Msg::Stop => {
                    let r = vm.stop();
                    let reply = match &r {
                        Ok(()) => Msg::Ok,
                        Err(e) => Msg::Error {
                            message: e.to_string(),
                        },
                    };
                    let _ = self.send(&reply);
                    return Ok(ServeEnd::MigratedAway);
                }
                other => Ok(Msg::Error {
                    message: format!("a source VMM does not handle {}", other.name()),
                }),
            };
            let reply = reply.unwrap_or_else(|e| Msg::Error {
                message: e.to_string(),
            });
            if let Err(e) = self.send(&reply) {
                if paused {
                    let _ = vm.resume();
                }
                return Err(EndpointError::Protocol {
                    during: "answering the sidecar",
                    source: e,
                });
            }
        }
    }

    /// Tells the sidecar this VMM waits for an incoming migration of `vm_id`.
    ///
    /// # Errors
    ///
    /// Protocol errors, or the sidecar refusing (another VMM already waits for it).
    pub fn await_incoming(&mut self, vm_id: &str) -> Result<(), EndpointError> {
        self.send(&Msg::AwaitIncoming {
            vm_id: vm_id.to_owned(),
        })
        .map_err(proto("announcing an incoming VM"))?;
        match self.recv().map_err(proto("announcing an incoming VM"))?.0 {
            Msg::Ok => Ok(()),
            other => Err(refused("waiting for an incoming VM", other)),
        }
    }

    /// Receives migrations until one runs here. Returns the line [`IncomingVm::start`]
    /// produced. Discarded attempts do not end the wait.
    ///
    /// # Errors
    ///
    /// Protocol errors; the sidecar closing the link before a VM runs.
    pub fn receive<V: IncomingVm>(&mut self, vm: &mut V) -> Result<String, EndpointError> {
        let mut loaded = false;
        loop {
            let (msg, fds) = match self.recv() {
                Ok(x) => x,
                Err(e) => {
                    if loaded {
                        vm.discard();
                    }
                    return Err(EndpointError::Protocol {
                        during: "waiting for an incoming VM",
                        source: e,
                    });
                }
            };
            let reply = match msg {
                Msg::Load {
                    vm_id,
                    regions,
                    blob,
                } => {
                    if fds.len() != regions.len() {
                        Msg::Error {
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
                                loaded = true;
                                Msg::Loaded
                            }
                            Err(e) => Msg::Error {
                                message: e.to_string(),
                            },
                        }
                    }
                }
                Msg::CheckCompat { cpu_profile } => match vm.check_compat(&cpu_profile) {
                    Ok(()) => Msg::Ok,
                    Err(e) => Msg::Error {
                        message: e.to_string(),
                    },
                },
                Msg::Start if loaded => match vm.start() {
                    Ok(detail) => {
                        self.send(&Msg::Running {
                            detail: detail.clone(),
                        })
                        .map_err(proto("confirming the VM runs"))?;
                        return Ok(detail);
                    }
                    Err(e) => Msg::Error {
                        message: e.to_string(),
                    },
                },
                Msg::Discard => {
                    if loaded {
                        vm.discard();
                        loaded = false;
                    }
                    Msg::Ok
                }
                other => Msg::Error {
                    message: format!("a waiting VMM does not handle {} now", other.name()),
                },
            };
            self.send(&reply).map_err(proto("answering the sidecar"))?;
        }
    }
}

fn refused(during: &'static str, got: Msg) -> EndpointError {
    match unexpected("Ok", got) {
        ProtoError::Refused { reason } => EndpointError::Refused { during, reason },
        e => EndpointError::Protocol { during, source: e },
    }
}
