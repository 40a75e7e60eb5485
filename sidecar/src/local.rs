//! The Unix socket: VMMs (registering a VM, or waiting for one) and the CLI. The first
//! frame's magic says which protocol the connection speaks; it must arrive within
//! [`FIRST_FRAME_DEADLINE`].

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use ferry_engine::session::{DecisionState, SourceOutcome};
use ferry_proto::cli::{CliMsg, MigrateRequest, RecoverMode};
use ferry_proto::common::{chain, check_layout, Message, CLI_MAGIC, MAX_FRAME, VMM_MAGIC};
use ferry_proto::frame::{recv_frame_with_fds, recv_with_fds, write_msg};
use ferry_proto::mem::GuestRegion;
use ferry_proto::net::Timeouts;
use ferry_proto::vmm::VmmMsg;
use ferry_proto::{check_version, VERSION};

use crate::context::Daemon;
use crate::offer::MAX_CHANNELS;
use crate::registry::{SourceVm, WaitingVmm};
use crate::watchdog::{watchdog, Armed};
use ferry_proto::records;

/// Longest a local client may take to send its first message (and a VMM its
/// registration).
const FIRST_FRAME_DEADLINE: Duration = Duration::from_secs(10);

/// How long `ferry cancel` waits for a running migration to take it (it does at its
/// next step: a window of pages, a VMM request, the destination loading the VM).
const CANCEL_WAIT: Duration = Duration::from_secs(120);

/// How long `ferry recover` keeps trying to reach the destination.
const RECOVER_WINDOW: Duration = Duration::from_secs(10);

/// Serves one accepted connection on the Unix socket.
///
/// # Errors
///
/// Protocol errors (the client was told why).
pub fn handle(d: &Arc<Daemon>, s: UnixStream) -> anyhow::Result<()> {
    // The hello and the request (a VMM's registration) must arrive in time, however
    // slowly their bytes come: the watchdog shuts the socket down at the deadline.
    let armed = watchdog().arm(s.as_fd(), Instant::now() + FIRST_FRAME_DEADLINE)?;
    s.set_timeouts(Some(FIRST_FRAME_DEADLINE))?;
    let (frame, _fds) = recv_frame_with_fds(&s, ferry_proto::auth::HANDSHAKE_CAP)?;
    match frame.magic {
        VMM_MAGIC => match frame.decode::<VmmMsg>()? {
            VmmMsg::Hello { version } => {
                let mut w = &s;
                if let Err(e) = check_version(version) {
                    let _ = write_msg(
                        &mut w,
                        &VmmMsg::Refused {
                            reason: e.to_string(),
                        },
                    );
                    return Err(e.into());
                }
                write_msg(&mut w, &VmmMsg::Welcome { version: VERSION })?;
                handle_vmm(d, s, armed)
            }
            other => refuse_vmm(&s, format!("expected Hello, got {}", other.name())),
        },
        CLI_MAGIC => match frame.decode::<CliMsg>()? {
            CliMsg::Hello { version } => {
                let mut w = &s;
                if let Err(e) = check_version(version) {
                    let _ = write_msg(
                        &mut w,
                        &CliMsg::Refused {
                            reason: e.to_string(),
                        },
                    );
                    return Err(e.into());
                }
                write_msg(&mut w, &CliMsg::Welcome { version: VERSION })?;
                handle_cli(d, s, armed)
            }
            other => {
                let mut w = &s;
                let reason = format!("expected Hello, got {}", other.name());
                let _ = write_msg(
                    &mut w,
                    &CliMsg::Refused {
                        reason: reason.clone(),
                    },
                );
                bail!(reason)
            }
        },
        _ => bail!("a peer-protocol frame on the local socket"),
    }
}

fn refuse_vmm(s: &UnixStream, reason: String) -> anyhow::Result<()> {
    let mut w = s;
    let _ = write_msg(
        &mut w,
        &VmmMsg::Refused {
            reason: reason.clone(),
        },
    );
    bail!(reason)
}

/// Maps a VMM's memfds, each checked (fstat) to cover its region and guarded against
/// shrinking later, and faults them into this process's page tables.
fn map_regions(
    regions: &[ferry_proto::common::RegionInfo],
    fds: &[std::os::fd::OwnedFd],
) -> Result<Vec<GuestRegion>, String> {
    if fds.len() != regions.len() {
        return Err(format!(
            "{} memfds for {} regions",
            fds.len(),
            regions.len()
        ));
    }
    check_layout(regions)?;
    let mut mem = Vec::with_capacity(regions.len());
    for (i, (r, fd)) in regions.iter().zip(fds).enumerate() {
        let m = GuestRegion::map_guarded(fd.as_fd(), r.offset, r.size)
            .map_err(|e| format!("region {i} cannot be mapped: {}", chain(&e)))?;
        mem.push(m);
    }
    Ok(mem)
}

/// The size of the pages behind a VMM's memfds (`fstat`: huge pages for hugetlbfs): one
/// for the whole VM, every region whole pages of it (the destination backs its copy so).
fn backing_page_size(
    regions: &[ferry_proto::common::RegionInfo],
    fds: &[std::os::fd::OwnedFd],
) -> Result<u64, String> {
    let mut size = None;
    for (i, (r, fd)) in regions.iter().zip(fds).enumerate() {
        let p = GuestRegion::backing_page_size(fd.as_fd())
            .map_err(|e| format!("region {i}: {}", chain(&e)))?;
        match size {
            Some(s) if s != p => {
                return Err(format!(
                    "region {i} is backed by {p}-byte pages, the ones before by {s}-byte pages: one page size per VM"
                ))
            }
            _ => size = Some(p),
        }
        if [r.gpa, r.size, r.offset]
            .iter()
            .any(|v| !v.is_multiple_of(p))
        {
            return Err(format!(
                "region {i} (gpa {:#x}, size {:#x}, offset {:#x}) is not whole pages of its memfd's {p}-byte pages",
                r.gpa, r.size, r.offset
            ));
        }
    }
    size.ok_or_else(|| "no regions".to_string())
}

fn handle_vmm(d: &Arc<Daemon>, s: UnixStream, armed: Armed) -> anyhow::Result<()> {
    let (msg, fds) = match recv_with_fds::<VmmMsg>(&s, MAX_FRAME) {
        Ok(m) => m,
        Err(e) if e.is_disconnect() => return Err(e.into()),
        Err(e) => return refuse_vmm(&s, chain(&e)),
    };
    drop(armed);
    match msg {
        VmmMsg::RegisterVm {
            vm_id,
            regions,
            cpu_profile,
            fence,
        } => {
            if let Err(reason) = d.registry.can_add_source(&vm_id, fence.as_ref()) {
                return refuse_vmm(&s, reason);
            }
            let mem = match map_regions(&regions, &fds) {
                Ok(m) => m,
                Err(reason) => return refuse_vmm(&s, reason),
            };
            let backing_page_size = match backing_page_size(&regions, &fds) {
                Ok(p) => p,
                Err(reason) => return refuse_vmm(&s, reason),
            };
            {
                let mut w = &s;
                write_msg(&mut w, &VmmMsg::Ok)?;
            }
            s.set_timeouts(None)?;
            // Map the VM's RAM into our page tables now, off the migration's path (after
            // Ok: a large VM takes seconds, and the VMM waits for the answer). Only what
            // holds data: a read fault on a memfd's hole would allocate a page there.
            for ((m, fd), r) in mem.iter().zip(&fds).zip(&regions) {
                if let Err(e) = m.prefault_data(fd.as_fd(), r.offset) {
                    tracing::warn!(vm = %vm_id, "prefaulting guest RAM: {}", chain(&e));
                }
            }
            let vm = SourceVm {
                link: s,
                regions,
                mem: Arc::new(mem),
                memfds: fds,
                cpu_profile,
                backing_page_size,
                fence: fence.clone(),
            };
            let vm = match &fence {
                Some(f) if !d.registry.has_outgoing(&vm_id) => {
                    match crate::replay::settle_fenced(d, &vm_id, f, vm) {
                        Some(vm) => vm,
                        None => return Ok(()),
                    }
                }
                _ => vm,
            };
            match d.registry.add_source(&vm_id, vm) {
                Ok(()) => {
                    tracing::info!(vm = %vm_id, regions = regions_len(d, &vm_id), fenced = fence.is_some(), "VM registered")
                }
                Err(e) => tracing::warn!(vm = %vm_id, "registration dropped: {e}"),
            }
            Ok(())
        }
        VmmMsg::AwaitIncoming { vm_id, held } => {
            if held.is_none() {
                if let Err(reason) = d.registry.can_add_waiting(&vm_id) {
                    return refuse_vmm(&s, reason);
                }
            }
            {
                let mut w = &s;
                write_msg(&mut w, &VmmMsg::Ok)?;
            }
            s.set_timeouts(None)?;
            let vmm = WaitingVmm { link: s };
            match held {
                Some(session) => crate::dest::reattach(d, &vm_id, session, vmm),
                None => match d.registry.add_waiting(&vm_id, vmm) {
                    Ok(()) => tracing::info!(vm = %vm_id, "VMM waits for an incoming VM"),
                    Err(e) => tracing::warn!(vm = %vm_id, "{e}"),
                },
            }
            Ok(())
        }
        other => refuse_vmm(
            &s,
            format!("expected RegisterVm or AwaitIncoming, got {}", other.name()),
        ),
    }
}

fn regions_len(d: &Daemon, vm_id: &str) -> usize {
    d.registry
        .snapshot()
        .registered
        .iter()
        .find(|r| r.0 == vm_id)
        .map_or(0, |r| r.1)
}

fn check(req: &MigrateRequest) -> Result<(), String> {
    if req.channels == 0 || req.channels > MAX_CHANNELS {
        return Err(format!("--streams must be 1 to {MAX_CHANNELS}"));
    }
    if req.max_rounds == 0 {
        return Err("--max-rounds must be at least 1".into());
    }
    if u64::from(req.max_bandwidth_mibps) > crate::config::MAX_MIBPS {
        return Err(format!(
            "--max-bandwidth must be at most {} MiB/s",
            crate::config::MAX_MIBPS
        ));
    }
    if req.observe_ms > MAX_OBSERVE_MS {
        // The destination gives up on a control connection silent for 300 s.
        return Err(format!(
            "--observe-ms must be at most {MAX_OBSERVE_MS} (one minute)"
        ));
    }
    Ok(())
}

/// Longest cold-first observation window before round 1.
const MAX_OBSERVE_MS: u32 = 60_000;

fn handle_cli(d: &Arc<Daemon>, s: UnixStream, armed: Armed) -> anyhow::Result<()> {
    let (msg, _) = recv_with_fds::<CliMsg>(&s, ferry_proto::common::MAX_STR * 3)?;
    drop(armed);
    s.set_timeouts(None)?;
    let mut w = &s;
    match msg {
        CliMsg::Migrate(req) => {
            // Counted until the summary is written: a stopping daemon waits for it.
            let _client = crate::queue::Slot::take(&d.clients, usize::MAX);
            let job = check(&req)
                .and_then(|()| crate::outgoing::check_record(d, &req.vm_id, false))
                .and_then(|()| {
                    if d.ch.has_source(&req.vm_id) {
                        Ok(())
                    } else if req.postcopy {
                        Err(format!(
                            "--postcopy is for Cloud Hypervisor VMs (`ferry ch register`); {} is migrated with pre-copy",
                            req.vm_id
                        ))
                    } else {
                        d.registry.can_migrate(&req.vm_id)
                    }
                })
                .and_then(|()| {
                    d.queue.submit(
                        &req.vm_id,
                        &req.to,
                        req.priority,
                        u64::from(req.max_bandwidth_mibps) << 20,
                    )
                });
            let job = match job {
                Ok(j) => j,
                Err(reason) => {
                    write_msg(&mut w, &CliMsg::Refused { reason })?;
                    return Ok(());
                }
            };
            let out = Mutex::new(s.try_clone()?);
            // Progress is best effort: a CLI that went away does not stop the migration.
            let report = |m: CliMsg| {
                if let Ok(mut o) = out.lock() {
                    let _ = o.set_write_timeout(Some(Duration::from_secs(1)));
                    let _ = write_msg(&mut *o, &m);
                }
            };
            let summary = crate::outgoing::run_queued(d, &req, &job, &report);
            let json = serde_json::to_string(&summary)?;
            let _ = s.set_write_timeout(Some(Duration::from_secs(10)));
            write_msg(&mut w, &CliMsg::Summary { json })?;
        }
        CliMsg::Recover { vm_id, mode } => {
            let reply = match recover(d, &vm_id, mode) {
                Ok(detail) => CliMsg::Recovered { detail },
                Err(e) => CliMsg::Error {
                    message: format!("{e:#}"),
                },
            };
            write_msg(&mut w, &reply)?;
        }
        CliMsg::Status => {
            let json = serde_json::to_string(&crate::status::of(d))?;
            write_msg(&mut w, &CliMsg::StatusReport { json })?;
        }
        CliMsg::Cancel { vm_id } => {
            let reply = match d.queue.cancel(&vm_id, CANCEL_WAIT) {
                Some(Ok(detail)) => CliMsg::Done { detail },
                Some(Err(message)) => CliMsg::Error { message },
                None => CliMsg::Error {
                    message: format!("no migration of {vm_id} is queued or running on this host"),
                },
            };
            write_msg(&mut w, &reply)?;
        }
        CliMsg::ChAttach {
            vm_id,
            api_socket,
            incoming,
        } => {
            let reply =
                match crate::ch::attach(d, &vm_id, std::path::Path::new(&api_socket), incoming) {
                    Ok(detail) => {
                        tracing::info!(vm = %vm_id, "{detail}");
                        CliMsg::Done { detail }
                    }
                    Err(e) => CliMsg::Error {
                        message: format!("{e:#}"),
                    },
                };
            write_msg(&mut w, &reply)?;
        }
        CliMsg::SetBandwidth { vm_id, mibps } => {
            let reply = match d.queue.job(&vm_id) {
                Some(job) => {
                    d.bandwidth.set_own(&job.flow, u64::from(mibps) << 20);
                    tracing::info!(vm = %vm_id, mibps, "bandwidth cap changed");
                    CliMsg::Done {
                        detail: if mibps == 0 {
                            format!("the migration of {vm_id} has no cap of its own now")
                        } else {
                            format!("the migration of {vm_id} is capped at {mibps} MiB/s now")
                        },
                    }
                }
                None => CliMsg::Error {
                    message: format!("no migration of {vm_id} is queued or running on this host"),
                },
            };
            write_msg(&mut w, &reply)?;
        }
        other => {
            write_msg(
                &mut w,
                &CliMsg::Refused {
                    reason: format!(
                        "expected Migrate, Status, Recover, Cancel or SetBandwidth, got {}",
                        other.name()
                    ),
                },
            )?;
        }
    }
    Ok(())
}

/// `ferry recover`: settles a VM's recorded decision.
///
/// # Errors
///
/// Nothing to recover, or the destination unreachable or refusing.
fn recover(d: &Arc<Daemon>, vm_id: &str, mode: RecoverMode) -> anyhow::Result<String> {
    if let Some(line) = crate::ch::recover(d, vm_id, mode)? {
        return Ok(line);
    }
    let Some(dec) = records::read_decision(&d.cfg.state_dir, vm_id)? else {
        if let Some(line) = crate::dest::describe_held(d, vm_id) {
            bail!("{line}");
        }
        bail!("no decision is recorded for VM {vm_id} on this host");
    };
    let released = |line: String| {
        let mut out = vec![line];
        out.extend(crate::replay::release_vm_now(d, vm_id));
        out.join("; ")
    };
    match (dec.state, mode) {
        (DecisionState::Undecided, _) => {
            if d.registry.has_outgoing(vm_id) {
                bail!(
                    "a migration of {vm_id} to {} is in progress: nothing to recover",
                    dec.to
                );
            }
            crate::replay::settle_undecided(d, vm_id, &dec)?;
            Ok(released(format!(
                "the migration of {vm_id} to {} ended before any decision: the VM is this host's",
                dec.to
            )))
        }
        (DecisionState::Confirmed, _) => {
            // A fenced VMM that never heard: stop it now.
            if let Some(vm) = d.registry.take_source(vm_id, Duration::ZERO) {
                if let Some(vm) = crate::replay::settle_fenced(
                    d,
                    vm_id,
                    &vm.fence.clone().unwrap_or(ferry_proto::vmm::Fence {
                        session: dec.session,
                        to: dec.to.clone(),
                    }),
                    vm,
                ) {
                    let _ = d.registry.add_source(vm_id, vm);
                }
            }
            Ok(format!(
                "the migration of {vm_id} to {} was already confirmed",
                dec.to
            ))
        }
        (DecisionState::Aborted, _) => Ok(released(format!(
            "the migration of {vm_id} to {} was aborted or rolled back; the VM is this host's",
            dec.to
        ))),
        (DecisionState::Committed, mode) => {
            let roll_back = match mode {
                RecoverMode::Deliver => None,
                RecoverMode::Abort => Some(false),
                RecoverMode::ForceAbort => Some(true),
            };
            let (outcome, line) =
                crate::outgoing::settle_recorded(d, vm_id, &dec, roll_back, RECOVER_WINDOW);
            match outcome {
                SourceOutcome::Committed | SourceOutcome::Aborted => Ok(line),
                _ => bail!("{line}"),
            }
        }
    }
}
