//! The command line's side of the CLI protocol: connect to the local daemon, send one
//! request, show what comes back.

use std::io::IsTerminal;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use ferry_proto::cli::{CliMsg, Phase, RecoverMode};
use ferry_proto::common::{Message, MAX_FRAME};
use ferry_proto::frame::{read_msg, write_msg};
use ferry_proto::VERSION;

use crate::summary::Summary;

/// How long the daemon may take to answer a request (status, recover); a migration's
/// progress arrives every 100 ms, so silence this long means the daemon is stuck.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(120);

/// Connects and says hello.
///
/// # Errors
///
/// No daemon at `socket`, or it refused this CLI's version.
pub fn connect(socket: &Path) -> anyhow::Result<UnixStream> {
    let mut s = UnixStream::connect(socket).with_context(|| {
        format!(
            "connecting to the sidecar at {} (is `ferry serve` running?)",
            socket.display()
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    write_msg(&mut s, &CliMsg::Hello { version: VERSION })?;
    match read_msg::<CliMsg, _>(&mut s, 4096)? {
        CliMsg::Welcome { .. } => {
            s.set_read_timeout(Some(ANSWER_TIMEOUT))?;
            Ok(s)
        }
        CliMsg::Refused { reason } => bail!("sidecar refused: {reason}"),
        other => bail!("sidecar answered {}", other.name()),
    }
}

/// `ferry status`.
///
/// # Errors
///
/// The daemon unreachable or answering out of protocol.
pub fn status(socket: &Path) -> anyhow::Result<ExitCode> {
    let mut s = connect(socket)?;
    write_msg(&mut s, &CliMsg::Status)?;
    match read_msg(&mut s, MAX_FRAME)? {
        CliMsg::StatusReport { json } => println!("{json}"),
        other => bail!("sidecar answered {}", other.name()),
    }
    Ok(ExitCode::SUCCESS)
}

/// `ferry recover`.
///
/// # Errors
///
/// The daemon unreachable or answering out of protocol.
pub fn recover(socket: &Path, vm: String, mode: RecoverMode) -> anyhow::Result<ExitCode> {
    let mut s = connect(socket)?;
    write_msg(&mut s, &CliMsg::Recover { vm_id: vm, mode })?;
    match read_msg(&mut s, MAX_FRAME)? {
        CliMsg::Recovered { detail } => {
            println!("recovered: {detail}");
            Ok(ExitCode::SUCCESS)
        }
        CliMsg::Error { message } | CliMsg::Refused { reason: message } => {
            eprintln!("ferry: recovery failed: {message}");
            Ok(ExitCode::from(1))
        }
        other => bail!("sidecar answered {}", other.name()),
    }
}

/// Shows a migration's progress until its summary arrives; exit 0 only when committed.
///
/// # Errors
///
/// The daemon went away or refused the request.
pub fn follow(s: &mut UnixStream, json: bool) -> anyhow::Result<ExitCode> {
    let bar = if !json && std::io::stderr().is_terminal() {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{prefix:>18} [{bar:40.cyan/blue}] {bytes}/{total_bytes} {binary_bytes_per_sec} {msg}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        Some(b)
    } else {
        None
    };
    let mut last_phase = None;
    loop {
        match read_msg(s, MAX_FRAME).context("waiting for the migration's result")? {
            CliMsg::Progress {
                phase,
                round,
                round_done,
                round_total,
                total_done,
            } => {
                if let Some(b) = &bar {
                    let name = match phase {
                        Phase::Preparing => "preparing".to_string(),
                        Phase::Precopy => format!("pre-copy round {round}"),
                        Phase::StopAndCopy => format!("final round {round}"),
                        Phase::Verifying => "verifying".to_string(),
                        Phase::Done => "done".to_string(),
                    };
                    if last_phase != Some((phase as u8, round)) {
                        b.set_position(0);
                        last_phase = Some((phase as u8, round));
                    }
                    b.set_prefix(name);
                    b.set_length(round_total);
                    b.set_position(round_done);
                    b.set_message(format!("total {} MiB", total_done >> 20));
                } else if !json {
                    eprintln!("{phase:?} round {round}: {round_done}/{round_total} bytes");
                }
            }
            CliMsg::Summary { json: text } => {
                if let Some(b) = &bar {
                    b.finish_and_clear();
                }
                let summary: Summary = serde_json::from_str(&text)?;
                if json {
                    println!("{text}");
                } else {
                    print!("{}", summary.render());
                }
                return Ok(if summary.result == "committed" {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(1)
                });
            }
            CliMsg::Refused { reason } | CliMsg::Error { message: reason } => {
                bail!("sidecar refused the migration: {reason}")
            }
            other => bail!("sidecar sent {}", other.name()),
        }
    }
}
