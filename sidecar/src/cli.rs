//! The command line's side of the CLI protocol: connect to the local daemon, send one
//! request, show what comes back.

use std::io::IsTerminal;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use ferry_proto::cli::{CliMsg, Phase, RecoverMode, UNKNOWN};
use ferry_proto::common::{Message, MAX_FRAME};
use ferry_proto::frame::{read_msg, write_msg};
use ferry_proto::VERSION;

use crate::status::Status;
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
            "cannot reach the sidecar at {}: is `ferry serve` running? Start it with `systemctl start ferry` or `ferry serve --config /etc/ferry/ferry.toml`, or point --socket at the socket it serves",
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

/// The daemon's status document.
///
/// # Errors
///
/// The daemon unreachable or answering out of protocol.
pub fn status_json(socket: &Path) -> anyhow::Result<String> {
    let mut s = connect(socket)?;
    write_msg(&mut s, &CliMsg::Status)?;
    match read_msg(&mut s, MAX_FRAME)? {
        CliMsg::StatusReport { json } => Ok(json),
        other => bail!("sidecar answered {}", other.name()),
    }
}

/// `ferry status [--json]`.
///
/// # Errors
///
/// The daemon unreachable or answering out of protocol.
pub fn status(socket: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let text = status_json(socket)?;
    if json {
        println!("{text}");
    } else {
        let st: Status = serde_json::from_str(&text)?;
        print!("{}", crate::status::table(&st));
    }
    Ok(ExitCode::SUCCESS)
}

/// A request answered by `Done` (cancel, set-bandwidth): prints the answer.
///
/// # Errors
///
/// The daemon unreachable or answering out of protocol.
pub fn request(socket: &Path, msg: CliMsg) -> anyhow::Result<ExitCode> {
    let what = msg.name();
    let mut s = connect(socket)?;
    write_msg(&mut s, &msg)?;
    match read_msg(&mut s, MAX_FRAME)? {
        CliMsg::Done { detail } => {
            println!("{detail}");
            Ok(ExitCode::SUCCESS)
        }
        CliMsg::Error { message } | CliMsg::Refused { reason: message } => {
            eprintln!("ferry: {}: {message}", what.to_lowercase());
            Ok(ExitCode::from(1))
        }
        other => bail!("sidecar answered {}", other.name()),
    }
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

fn per_s(v: u64) -> String {
    if v == UNKNOWN {
        "-".into()
    } else {
        format!("{:.1} MiB/s", v as f64 / (1u64 << 20) as f64)
    }
}

/// One progress line: where it stands, and the numbers convergence is judged by.
fn progress_line(m: &CliMsg) -> Option<(String, String)> {
    let CliMsg::Progress {
        phase,
        round,
        total_done,
        rate,
        dirty_rate,
        expected_downtime_ms,
        ..
    } = m
    else {
        return None;
    };
    let name = match phase {
        Phase::Queued => return Some((format!("queued, position {round}"), String::new())),
        Phase::Preparing => "preparing".to_string(),
        Phase::Precopy => format!("round {round}"),
        Phase::StopAndCopy => format!("final round {round}"),
        Phase::Verifying => "verifying".to_string(),
        Phase::Done => "done".to_string(),
        Phase::Postcopy => "post-copy pull (the VM runs at the destination)".to_string(),
    };
    let downtime = if *expected_downtime_ms == UNKNOWN {
        "-".into()
    } else {
        format!("{expected_downtime_ms} ms")
    };
    Some((
        name,
        format!(
            "{} MiB sent, {}, dirtying {}, expected downtime {downtime}",
            total_done >> 20,
            per_s(*rate),
            per_s(*dirty_rate)
        ),
    ))
}

/// Prints a refusal: one JSON object with `--json`, else a line on stderr. Exit 1.
fn refused(json: bool, vm: &str, reason: &str) -> ExitCode {
    if json {
        println!(
            "{}",
            serde_json::json!({"result": "refused", "vm_id": vm, "error": reason})
        );
    } else {
        eprintln!("ferry: the migration of {vm} was refused: {reason}");
    }
    ExitCode::from(1)
}

/// Shows a migration's progress until its summary arrives; exit 0 only when committed.
///
/// # Errors
///
/// The daemon went away or refused the request.
pub fn follow(s: &mut UnixStream, vm: &str, json: bool) -> anyhow::Result<ExitCode> {
    let (summary, code) = follow_quiet(s, vm, json, !json)?;
    if let Some(text) = summary {
        if json {
            println!("{text}");
        } else {
            let summary: Summary = serde_json::from_str(&text)?;
            print!("{}", summary.render());
        }
    }
    Ok(code)
}

/// Follows a migration to its end; with `show`, a live bar on a terminal or a line per
/// second on stderr otherwise. Returns the summary's JSON (none when refused) and the
/// exit status.
///
/// # Errors
///
/// The daemon went away.
pub fn follow_quiet(
    s: &mut UnixStream,
    vm: &str,
    json: bool,
    show: bool,
) -> anyhow::Result<(Option<String>, ExitCode)> {
    let bar = if show && std::io::stderr().is_terminal() {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{prefix:>18} [{bar:30.cyan/blue}] {bytes}/{total_bytes} {msg}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        Some(b)
    } else {
        None
    };
    let mut last_line: Option<std::time::Instant> = None;
    loop {
        let m = read_msg(s, MAX_FRAME).context("waiting for the migration's result")?;
        match &m {
            CliMsg::Progress {
                round_done,
                round_total,
                ..
            } => {
                let Some((name, numbers)) = progress_line(&m) else {
                    continue;
                };
                if let Some(b) = &bar {
                    b.set_prefix(name);
                    b.set_length(*round_total);
                    b.set_position(*round_done);
                    b.set_message(numbers);
                } else if show && last_line.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                    last_line = Some(std::time::Instant::now());
                    eprintln!("{vm}: {name}: {numbers}");
                }
            }
            CliMsg::Summary { json: text } => {
                if let Some(b) = &bar {
                    b.finish_and_clear();
                }
                let summary: Summary = serde_json::from_str(text)?;
                let code = if summary.result == "committed" {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(1)
                };
                return Ok((Some(text.clone()), code));
            }
            CliMsg::Refused { reason } | CliMsg::Error { message: reason } => {
                if let Some(b) = &bar {
                    b.finish_and_clear();
                }
                return Ok((None, refused(json, vm, reason)));
            }
            other => bail!("sidecar sent {}", other.name()),
        }
    }
}
