//! `ferry drain --to <host:port>`: every VM registered with the local sidecar is asked to
//! migrate there at once; the daemon's queue runs them within both hosts' limits. Each
//! one is reported as it ends; the exit status is 1 when any VM stayed.

use std::process::ExitCode;
use std::sync::mpsc;
use std::time::Instant;

use anyhow::Context;
use ferry_proto::cli::CliMsg;
use ferry_proto::frame::write_msg;

use crate::args::MigrateOpts;
use crate::cli::{connect, follow_quiet, status_json};
use crate::status::Status;
use crate::summary::Summary;

/// Runs the drain.
///
/// # Errors
///
/// The daemon unreachable.
pub fn drain(to: &str, opts: &MigrateOpts, json: bool) -> anyhow::Result<ExitCode> {
    let st: Status = serde_json::from_str(&status_json(&opts.socket)?)?;
    // A VM paused under a commit fence belongs to `ferry recover`, not to a new migration.
    let (vms, fenced): (Vec<_>, Vec<_>) = st
        .registered
        .iter()
        .partition(|r| r.fenced_session.is_none());
    for r in &fenced {
        eprintln!(
            "{}: paused under the commit fence of an earlier migration: run `ferry recover {}`",
            r.vm_id, r.vm_id
        );
    }
    if vms.is_empty() {
        if json {
            println!("[]");
        } else {
            eprintln!("no VMs to drain");
        }
        return Ok(if fenced.is_empty() {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        });
    }
    if !json {
        eprintln!(
            "draining {} VMs to {to} ({} at once from this host)",
            vms.len(),
            st.limits.outgoing
        );
    }
    let t0 = Instant::now();
    let (tx, rx) = mpsc::channel();
    for r in &vms {
        let (tx, vm, to, opts) = (tx.clone(), r.vm_id.clone(), to.to_owned(), opts.clone());
        std::thread::spawn(move || {
            let res = (|| {
                let mut s = connect(&opts.socket)?;
                write_msg(&mut s, &CliMsg::Migrate(opts.request(vm.clone(), to)))?;
                follow_quiet(&mut s, &vm, true, false)
            })();
            let _ = tx.send((vm, res));
        });
    }
    drop(tx);
    let mut moved = 0;
    let mut summaries = Vec::new();
    for (vm, res) in rx {
        let line = match res {
            Ok((Some(text), _)) => {
                let s: Summary = serde_json::from_str(&text).context("a summary")?;
                let line = if s.result == "committed" {
                    moved += 1;
                    format!(
                        "{vm}: committed in {:.1} s (queued {:.1} s, {} rounds, downtime {:.0} ms, digest_match {})",
                        s.total_ms / 1e3 + s.queued_ms / 1e3,
                        s.queued_ms / 1e3,
                        s.rounds,
                        s.downtime_ms,
                        s.digest_match
                    )
                } else {
                    format!("{vm}: {}: {}", s.result, s.error)
                };
                summaries.push(serde_json::from_str::<serde_json::Value>(&text)?);
                line
            }
            Ok((None, _)) => {
                summaries.push(serde_json::json!({"vm_id": vm, "result": "refused"}));
                format!("{vm}: refused (see above)")
            }
            Err(e) => {
                summaries.push(
                    serde_json::json!({"vm_id": vm, "result": "failed", "error": format!("{e:#}")}),
                );
                format!("{vm}: {e:#}")
            }
        };
        if !json {
            println!("{line}");
        }
    }
    let stayed = vms.len() - moved + fenced.len();
    if json {
        println!("{}", serde_json::Value::Array(summaries));
    } else {
        println!(
            "drained {moved} of {} VMs to {to} in {:.1} s{}",
            vms.len() + fenced.len(),
            t0.elapsed().as_secs_f64(),
            if stayed > 0 {
                format!("; {stayed} stayed here")
            } else {
                String::new()
            }
        );
    }
    Ok(if stayed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
