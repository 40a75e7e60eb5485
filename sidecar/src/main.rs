//! `ferry`: the Ferry sidecar daemon and its command line.
//!
//! - `ferry serve` runs the daemon next to a VMM: a Unix socket for VMMs and the CLI,
//!   a TCP listener for peer sidecars (authenticated with a shared key).
//! - `ferry migrate <vm> --to <host:port>` asks the local daemon to live-migrate a
//!   registered VM, shows progress, and prints a summary (`--json`: one JSON object).
//! - `ferry status` prints what the daemon holds.
//! - `ferry recover <vm>` delivers a recorded commit decision the link lost.
//! - `ferry devices` lists RDMA devices (TCP is used when there are none).
//! - `ferry keygen <file>` writes a fresh random shared key.

mod cli_server;
mod daemon;
mod dest;
mod source;
mod summary;
mod vmm;

use std::io::IsTerminal;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use ferry_proto::frame::{read_msg, write_msg};
use ferry_proto::msg::{
    MigrateRequest, Msg, OnLimit, Phase, Role, TransportChoice, VerifyMode, MAX_FRAME,
};
use ferry_proto::VERSION;

#[derive(Parser)]
#[command(
    name = "ferry",
    version,
    about = "RDMA-accelerated live migration sidecar for KVM"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum LimitArg {
    Abort,
    Force,
}

#[derive(Clone, Copy, ValueEnum)]
enum VerifyArg {
    /// Compare memory digests before the destination resumes (costs downtime).
    Strict,
    /// Compare after the destination resumes, keeping the source VM until then.
    AfterResume,
}

#[derive(Clone, Copy, ValueEnum)]
enum TransportArg {
    Auto,
    Tcp,
    Rdma,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the sidecar daemon.
    Serve {
        /// Unix socket for VMMs and the CLI.
        #[arg(long, default_value = "/run/ferry/ferry.sock")]
        socket: PathBuf,
        /// Address peers connect to.
        #[arg(long, default_value = "0.0.0.0:7780")]
        listen: String,
        /// File holding the shared key (at least 16 bytes).
        #[arg(long)]
        key_file: PathBuf,
        /// Where commit decisions are recorded.
        #[arg(long, default_value = "/var/lib/ferry")]
        state_dir: PathBuf,
        /// How long a committed migration whose link broke keeps replaying its decision
        /// before leaving it to `ferry recover` (the source VM stays paused meanwhile).
        #[arg(long, default_value_t = 120)]
        replay_window_s: u64,
    },
    /// Deliver a VM's recorded but unconfirmed commit decision (after a link failure in
    /// the commit window), then stop the paused source VM for good.
    Recover {
        /// VM id.
        vm: String,
        /// The local daemon's socket.
        #[arg(long, default_value = "/run/ferry/ferry.sock")]
        socket: PathBuf,
    },
    /// Live-migrate a registered VM to another sidecar.
    Migrate {
        /// VM id.
        vm: String,
        /// Destination sidecar, host:port.
        #[arg(long)]
        to: String,
        /// The local daemon's socket.
        #[arg(long, default_value = "/run/ferry/ferry.sock")]
        socket: PathBuf,
        /// Data streams (TCP connections or RDMA queue pairs).
        #[arg(long, default_value_t = 4)]
        streams: u16,
        /// Downtime budget in milliseconds.
        #[arg(long, default_value_t = 300)]
        downtime_ms: u32,
        /// Most pre-copy rounds.
        #[arg(long, default_value_t = 30)]
        max_rounds: u32,
        /// Pre-copy timeout in seconds.
        #[arg(long, default_value_t = 600)]
        timeout_s: u64,
        /// At the round limit or timeout: abort, or pause and copy the rest.
        #[arg(long, value_enum, default_value_t = LimitArg::Force)]
        on_limit: LimitArg,
        /// Data transport.
        #[arg(long, value_enum, default_value_t = TransportArg::Auto)]
        transport: TransportArg,
        /// Watch writes this long before round 1 and send those pages last (0: off).
        #[arg(long, default_value_t = 0)]
        observe_ms: u32,
        /// When to compare the memory digests.
        #[arg(long, value_enum, default_value_t = VerifyArg::AfterResume)]
        verify: VerifyArg,
        /// Same as `--verify strict`.
        #[arg(long)]
        verify_before_resume: bool,
        /// Print one JSON object instead of the progress bar and summary.
        #[arg(long)]
        json: bool,
    },
    /// Show what the local daemon holds.
    Status {
        /// The local daemon's socket.
        #[arg(long, default_value = "/run/ferry/ferry.sock")]
        socket: PathBuf,
    },
    /// List RDMA devices: ports, link layer, GIDs (RoCE v2 IPv4 marked), limits, NUMA node.
    Devices,
    /// Write a fresh random shared key to a file (mode 0600).
    Keygen {
        /// Key file to create.
        file: PathBuf,
    },
}

fn connect(socket: &PathBuf) -> anyhow::Result<UnixStream> {
    let mut s = UnixStream::connect(socket)
        .with_context(|| format!("connecting to the sidecar at {}", socket.display()))?;
    write_msg(
        &mut s,
        &Msg::Hello {
            version: VERSION,
            role: Role::Cli,
        },
    )?;
    match read_msg(&mut s, 4096)? {
        Msg::Welcome { .. } => Ok(s),
        Msg::Refused { reason } => anyhow::bail!("sidecar refused: {reason}"),
        other => anyhow::bail!("sidecar answered {}", other.name()),
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ferry: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.cmd {
        Cmd::Serve {
            socket,
            listen,
            key_file,
            state_dir,
            replay_window_s,
        } => {
            if let Some(dir) = socket.parent() {
                std::fs::create_dir_all(dir)?;
            }
            daemon::serve(daemon::ServeConfig {
                socket,
                listen,
                key_file,
                state_dir,
                replay_window: std::time::Duration::from_secs(replay_window_s),
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Devices => match ferry_verbs::device_reports() {
            Ok(reports) if !reports.is_empty() => {
                for r in reports {
                    println!("{r}");
                }
                Ok(ExitCode::SUCCESS)
            }
            Ok(_) => {
                println!("no RDMA devices; migrations use TCP");
                Ok(ExitCode::from(1))
            }
            Err(e) => {
                println!("no RDMA devices ({e}); migrations use TCP");
                Ok(ExitCode::from(1))
            }
        },
        Cmd::Keygen { file } => {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let key: [u8; 32] = ferry_proto::auth::random()?;
            let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&file)
                .with_context(|| format!("creating {}", file.display()))?;
            writeln!(f, "{hex}")?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Recover { vm, socket } => {
            let mut s = connect(&socket)?;
            write_msg(&mut s, &Msg::Recover { vm_id: vm })?;
            match read_msg(&mut s, MAX_FRAME)? {
                Msg::Running { detail } => {
                    println!("recovered: {detail}");
                    Ok(ExitCode::SUCCESS)
                }
                Msg::Error { message } | Msg::Refused { reason: message } => {
                    eprintln!("ferry: recovery failed: {message}");
                    Ok(ExitCode::from(1))
                }
                other => anyhow::bail!("sidecar answered {}", other.name()),
            }
        }
        Cmd::Status { socket } => {
            let mut s = connect(&socket)?;
            write_msg(&mut s, &Msg::Status)?;
            match read_msg(&mut s, MAX_FRAME)? {
                Msg::StatusReport { json } => println!("{json}"),
                other => anyhow::bail!("sidecar answered {}", other.name()),
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Migrate {
            vm,
            to,
            socket,
            streams,
            downtime_ms,
            max_rounds,
            timeout_s,
            on_limit,
            transport,
            observe_ms,
            verify,
            verify_before_resume,
            json,
        } => {
            let mut s = connect(&socket)?;
            write_msg(
                &mut s,
                &Msg::Migrate(MigrateRequest {
                    vm_id: vm,
                    to,
                    channels: streams,
                    downtime_ms,
                    max_rounds,
                    timeout_ms: timeout_s.saturating_mul(1000),
                    on_limit: match on_limit {
                        LimitArg::Abort => OnLimit::Abort,
                        LimitArg::Force => OnLimit::Force,
                    },
                    transport: match transport {
                        TransportArg::Auto => TransportChoice::Auto,
                        TransportArg::Tcp => TransportChoice::Tcp,
                        TransportArg::Rdma => TransportChoice::Rdma,
                    },
                    observe_ms,
                    verify: match (verify, verify_before_resume) {
                        (VerifyArg::Strict, _) | (_, true) => VerifyMode::Strict,
                        (VerifyArg::AfterResume, false) => VerifyMode::AfterResume,
                    },
                }),
            )?;
            follow(&mut s, json)
        }
    }
}

/// Shows progress until the summary arrives; exit 0 only for a committed migration.
fn follow(s: &mut UnixStream, json: bool) -> anyhow::Result<ExitCode> {
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
            Msg::Progress {
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
            Msg::Summary { json: text } => {
                if let Some(b) = &bar {
                    b.finish_and_clear();
                }
                let summary: summary::Summary = serde_json::from_str(&text)?;
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
            Msg::Refused { reason } | Msg::Error { message: reason } => {
                anyhow::bail!("sidecar refused the migration: {reason}")
            }
            other => anyhow::bail!("sidecar sent {}", other.name()),
        }
    }
}
