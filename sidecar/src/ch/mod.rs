//! The Cloud Hypervisor adapter: unmodified CH VMs migrate through Ferry
//! (`docs/cloud-hypervisor.md`).
//!
//! `ferry ch register` attaches a running CH VM (its API socket) to this sidecar;
//! `ferry ch await` attaches a CH started without a VM that is to receive one. A
//! migration of a CH VM goes through the same queue, limits, caps, cancel and status as
//! any other; its session is CH's own pre-copy: the source sidecar asks the source CH to
//! send to a local listener (`connections` = the migration's streams), carries its
//! connections byte for byte over Ferry's authenticated control and data connections
//! (`ferry_ch::proxy`), and the destination sidecar lands the memory in memfds it hands to
//! the destination CH, which runs the VM from them (`ferry_ch::relay`).

use std::path::Path;
use std::time::Duration;

use anyhow::bail;
use ferry_proto::common::MAX_FRAME;
use ferry_proto::frame::{read_msg, write_msg};
use ferry_proto::net::Timeouts;
use ferry_proto::peer::PeerMsg;
use ferry_proto::records::{self, ChKind, ChRecord};

use crate::ch_vms::{lock, ChVm};
use crate::context::Daemon;
use crate::peer::connect_control;

mod dest;
mod keep;
mod source;

pub use dest::{answer_query, receive};
pub use keep::keeper_path;
pub use source::migrate;

/// `ferry ch register` / `ferry ch await`: attaches the CH answering at `api`.
///
/// # Errors
///
/// No CH there, a source without a VM (or a waiting CH with one), or the id taken.
pub fn attach(d: &Daemon, vm_id: &str, api: &Path, incoming: bool) -> anyhow::Result<String> {
    let version = ferry_ch::api::ping(api)?;
    let info = ferry_ch::api::call(api, "GET", "vm.info", None, Duration::from_secs(5))?;
    let has_vm = info.status == 200;
    if d.registry.can_migrate(vm_id).is_ok() || d.ch.has_source(vm_id) {
        bail!("VM {vm_id} is already registered with this sidecar");
    }
    if incoming {
        if has_vm {
            bail!("the CH at {} already runs a VM: start it without one (only --api-socket) to receive {vm_id}", api.display());
        }
        lock(&d.ch.waiting).insert(
            vm_id.to_owned(),
            ChVm {
                api: api.to_owned(),
                ram_bytes: 0,
            },
        );
        Ok(format!(
            "Cloud Hypervisor {version} at {} waits for VM {vm_id}",
            api.display()
        ))
    } else {
        if !has_vm {
            bail!(
                "the CH at {} runs no VM ({}): start the VM first",
                api.display(),
                info.body
            );
        }
        let v: serde_json::Value = serde_json::from_str(&info.body)?;
        let ram_bytes = v["config"]["memory"]["size"].as_u64().unwrap_or(0);
        lock(&d.ch.sources).insert(
            vm_id.to_owned(),
            ChVm {
                api: api.to_owned(),
                ram_bytes,
            },
        );
        Ok(format!(
            "VM {vm_id} ({} MiB, Cloud Hypervisor {version} at {}) is registered",
            ram_bytes >> 20,
            api.display()
        ))
    }
}

/// `ferry recover` of a CH VM whose migration's outcome was not settled: its source CH
/// waits, paused, held by the keeper (its sidecar died in the commit window, or the
/// destination's answer to `Complete` was lost). The recorded decision names the
/// destination, which is asked what became of the VM there (`ChQuery`): running, the
/// source CH is told Ok (it stops its VM for good); absent, it is told Error (it resumes).
/// `--abort` rolls back only when the destination does not run it; `--abort --force`
/// without asking.
///
/// Returns `None` when nothing is held for `vm_id`.
///
/// # Errors
///
/// The destination unreachable, or in a state that needs the operator (the error says
/// what to do); the keeper not answering.
pub fn recover(
    d: &Daemon,
    vm_id: &str,
    mode: ferry_proto::cli::RecoverMode,
) -> anyhow::Result<Option<String>> {
    use ferry_proto::cli::RecoverMode;
    use ferry_proto::peer::{CH_ABSENT, CH_PAUSED, CH_RUNNING};
    let socket = keeper_path(d, vm_id);
    if !socket.exists() {
        return Ok(None);
    }
    let rec = records::read_ch(&d.cfg.state_dir, vm_id, ChKind::Decision)?;
    let commit = match (mode, &rec) {
        (RecoverMode::ForceAbort, _) => false,
        // No record (a keeper left by an older build): as the operator says.
        (_, None) => mode == RecoverMode::Deliver,
        (_, Some(rec)) => {
            let (state, detail) = ask_destination(d, vm_id, rec).map_err(|e| {
                anyhow::anyhow!(
                    "cannot ask the destination {} what became of {vm_id}: {e:#}. Its source CH stays paused: if the VM runs there, stop the source CH; if not, `ferry recover {vm_id} --abort --force` resumes it here",
                    rec.at
                )
            })?;
            match (state, mode) {
                (CH_RUNNING, RecoverMode::Deliver) => true,
                (CH_RUNNING, _) => bail!(
                    "the destination {} runs {vm_id} ({detail}): rolling back would run it twice; `ferry recover {vm_id}` stops the source instead",
                    rec.at
                ),
                (CH_ABSENT, _) => false,
                (CH_PAUSED, _) => bail!(
                    "the destination {} holds {vm_id} restored but paused ({detail}): resume it there and run `ferry recover {vm_id}`, or delete it there and run `ferry recover {vm_id} --abort`",
                    rec.at
                ),
                _ => bail!(
                    "the destination {} has no record of this migration of {vm_id} ({detail}): check it; `ferry recover {vm_id} --abort --force` resumes the source CH",
                    rec.at
                ),
            }
        }
    };
    ferry_ch::keeper::answer(&socket, commit)?;
    lock(&d.ch.unsettled).remove(vm_id);
    records::remove_ch(&d.cfg.state_dir, vm_id, ChKind::Decision);
    Ok(Some(if commit {
        format!("the destination runs {vm_id}: its source CH was told the migration completed and stops its VM")
    } else {
        format!("{vm_id} does not run at the destination: its source CH was told the migration failed and resumes its VM")
    }))
}

/// Asks the destination of `rec` what became of `vm_id` (`ChQuery`).
fn ask_destination(d: &Daemon, vm_id: &str, rec: &ChRecord) -> anyhow::Result<(u8, String)> {
    let mut ctl = connect_control(&d.auth, &rec.at)?;
    ctl.stream
        .tcp()
        .set_timeouts(Some(Duration::from_secs(15)))?;
    write_msg(
        &mut ctl.stream,
        &PeerMsg::ChQuery {
            vm_id: vm_id.to_owned(),
            session: rec.session,
        },
    )?;
    match read_msg(&mut ctl.stream, MAX_FRAME)? {
        PeerMsg::ChState { state, detail } => Ok((state, detail)),
        other => Err(ferry_proto::peer::unexpected("ChState", other).into()),
    }
}
