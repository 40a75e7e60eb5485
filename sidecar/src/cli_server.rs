//! The daemon's side of `ferry migrate` and `ferry status`.

use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use ferry_proto::frame::{read_msg, write_msg};
use ferry_proto::msg::{MigrateRequest, Msg, MAX_STR};

use crate::daemon::Daemon;
use crate::dest::MAX_CHANNELS;

fn check(req: &MigrateRequest) -> Result<(), String> {
    if req.channels == 0 || req.channels > MAX_CHANNELS {
        return Err(format!("--streams must be 1 to {MAX_CHANNELS}"));
    }
    if req.max_rounds == 0 {
        return Err("--max-rounds must be at least 1".into());
    }
    Ok(())
}

/// Serves one CLI request on an accepted connection.
///
/// # Errors
///
/// I/O errors on the CLI connection.
pub fn handle(d: &Arc<Daemon>, mut s: UnixStream) -> anyhow::Result<()> {
    match read_msg(&mut s, 2 * MAX_STR + 64)? {
        Msg::Migrate(req) => {
            if let Err(reason) = check(&req) {
                write_msg(&mut s, &Msg::Refused { reason })?;
                return Ok(());
            }
            let out = Mutex::new(s.try_clone()?);
            // Progress is best effort: a CLI that went away does not stop the migration.
            let report = |m: Msg| {
                if let Ok(mut o) = out.lock() {
                    let _ = write_msg(&mut *o, &m);
                }
            };
            let summary = crate::source::migrate(d, &req, &report);
            let json = serde_json::to_string(&summary)?;
            write_msg(&mut s, &Msg::Summary { json })?;
            Ok(())
        }
        Msg::Recover { vm_id } => {
            let reply = match crate::source::recover(d, &vm_id) {
                Ok(detail) => Msg::Running { detail },
                Err(e) => Msg::Error {
                    message: format!("{e:#}"),
                },
            };
            write_msg(&mut s, &reply)?;
            Ok(())
        }
        Msg::Status => {
            let vms: Vec<serde_json::Value> = d
                .vms
                .lock()
                .expect("lock")
                .iter()
                .map(|(id, vm)| {
                    serde_json::json!({
                        "vm_id": id,
                        "regions": vm.regions.len(),
                        "ram_bytes": vm.regions.iter().map(|r| r.size).sum::<u64>(),
                    })
                })
                .collect();
            let waiting: Vec<String> = d.waiting.lock().expect("lock").keys().cloned().collect();
            let active: serde_json::Map<String, serde_json::Value> = d
                .active
                .lock()
                .expect("lock")
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                .collect();
            let held: Vec<String> = d
                .held
                .lock()
                .expect("lock")
                .values()
                .map(|h| h.vm_id.clone())
                .collect();
            let json = serde_json::json!({
                "registered": vms,
                "waiting_incoming": waiting,
                "migrating": active,
                "held_after_link_loss": held,
            })
            .to_string();
            write_msg(&mut s, &Msg::StatusReport { json })?;
            Ok(())
        }
        other => {
            write_msg(
                &mut s,
                &Msg::Refused {
                    reason: format!("expected Migrate or Status, got {}", other.name()),
                },
            )?;
            Ok(())
        }
    }
}
