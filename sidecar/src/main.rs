//! `ferry`: the Ferry sidecar daemon and its command line.
//!
//! - `ferry serve` runs the daemon next to a VMM: a Unix socket for VMMs and the CLI, a
//!   TCP listener for peer sidecars (mutual TLS 1.3, or `--insecure-psk`).
//! - `ferry migrate <vm> --to <host:port>` asks the local daemon to live-migrate a
//!   registered VM, shows progress, and prints a summary (`--json`: one JSON object).
//! - `ferry status` prints what the daemon holds.
//! - `ferry recover <vm>` settles a recorded commit decision the link lost (delivers it,
//!   or with `--abort` rolls it back once the destination confirms it discarded its copy).
//! - `ferry devices` lists RDMA devices (TCP is used when there are none).
//! - `ferry cert ca|host` makes a fleet CA and host certificates; `ferry keygen` a shared
//!   key for `--insecure-psk`.
//!
//! Exit status: 0 on success, 1 when the operation failed (a migration that did not
//! commit, a refused request), 2 for usage errors.

mod cli;
mod config;
mod context;
mod daemon;
mod dest;
mod dest_exec;
mod entries;
#[cfg(feature = "fault-injection")]
mod faults;
mod intake;
mod local;
mod memory;
mod offer;
mod outgoing;
mod peer;
mod registry;
mod replay;
mod source;
mod status;
mod summary;
mod transport;
mod vmm;
mod watchdog;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use ferry_engine::session::VerifyMode;
use ferry_proto::cli::{CliMsg, MigrateRequest, OnLimit, RecoverMode, TransportChoice};
use ferry_proto::frame::write_msg;

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
enum CertCmd {
    /// Make a fleet CA: DIR/ca.pem and DIR/ca-key.pem (0600; never overwritten).
    Ca {
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// The CA's name.
        #[arg(long, default_value = "ferry fleet CA")]
        name: String,
    },
    /// Make a host certificate signed by the CA: OUT/NAME.pem and OUT/NAME-key.pem.
    Host {
        /// Directory holding ca.pem and ca-key.pem.
        #[arg(long)]
        ca: PathBuf,
        /// The host's name (certificate CN and a subject alternative name).
        #[arg(long)]
        name: String,
        /// Further names peers reach this host by (IP addresses or DNS names).
        #[arg(long)]
        san: Vec<String>,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the sidecar daemon.
    Serve {
        /// A TOML configuration file (flags override its keys).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Unix socket for VMMs and the CLI [default: /run/ferry/ferry.sock].
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Address peers connect to [default: 0.0.0.0:7780].
        #[arg(long)]
        listen: Option<String>,
        /// Where commit decisions are recorded [default: /var/lib/ferry].
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// How long a committed migration whose link broke keeps replaying its decision
        /// before leaving it to `ferry recover` (the source VM stays paused meanwhile)
        /// [default: 120].
        #[arg(long)]
        replay_window_s: Option<u64>,
        /// The fleet CA certificate (PEM).
        #[arg(long)]
        tls_ca: Option<PathBuf>,
        /// This host's certificate (PEM).
        #[arg(long)]
        tls_cert: Option<PathBuf>,
        /// This host's private key (PEM, mode 0600).
        #[arg(long)]
        tls_key: Option<PathBuf>,
        /// Authenticate peers with a shared key instead of TLS: NOTHING IS ENCRYPTED.
        #[arg(long)]
        insecure_psk: bool,
        /// The shared key for --insecure-psk (at least 16 bytes, mode 0600).
        #[arg(long)]
        key_file: Option<PathBuf>,
        /// A destination (host or host:port, `*` for any) RDMA may be used with; RDMA
        /// traffic is not encrypted. Repeat for several.
        #[arg(long)]
        rdma_peer: Vec<String>,
    },
    /// Settle a VM's recorded but unconfirmed commit decision (after a link failure in
    /// the commit window, or a failed start at the destination).
    Recover {
        /// VM id.
        vm: String,
        /// Roll the decision back instead: the destination discards its copy (it must
        /// confirm it never ran it), then the VM resumes here.
        #[arg(long)]
        abort: bool,
        /// With --abort: do not wait for the destination's confirmation (check it by hand
        /// first: the VM must not run there).
        #[arg(long, requires = "abort")]
        force: bool,
        /// The local daemon's socket.
        #[arg(long, default_value = config::DEFAULT_SOCKET)]
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
        #[arg(long, default_value = config::DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Data streams (TCP connections or RDMA queue pairs), 1 to 64.
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
        streams: u16,
        /// Downtime budget in milliseconds.
        #[arg(long, default_value_t = 300)]
        downtime_ms: u32,
        /// Most pre-copy rounds.
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..))]
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
        /// Watch writes this long before round 1 and send those pages last (0: off; at most
        /// 60000).
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
    /// Show what the local daemon holds (JSON).
    Status {
        /// The local daemon's socket.
        #[arg(long, default_value = config::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// List RDMA devices: ports, link layer, GIDs (RoCE v2 IPv4 marked), limits, NUMA node.
    Devices,
    /// Write a fresh random shared key to a file (mode 0600), for --insecure-psk.
    Keygen {
        /// Key file to create.
        file: PathBuf,
    },
    /// Make TLS certificates for a fleet.
    #[command(subcommand)]
    Cert(CertCmd),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ferry: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Checks `host:port` before anything is sent to the daemon.
fn check_destination(to: &str) -> anyhow::Result<()> {
    let ok = to
        .rsplit_once(':')
        .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
    anyhow::ensure!(ok, "--to must be host:port, got {to:?}");
    Ok(())
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.cmd {
        Cmd::Serve {
            config,
            socket,
            listen,
            state_dir,
            replay_window_s,
            tls_ca,
            tls_cert,
            tls_key,
            insecure_psk,
            key_file,
            rdma_peer,
        } => {
            let file = match &config {
                Some(p) => config::FileConfig::load(p)?,
                None => config::FileConfig::default(),
            };
            let flags = config::ServeFlags {
                socket,
                listen,
                state_dir,
                replay_window_s,
                rdma_peers: rdma_peer,
                tls_ca,
                tls_cert,
                tls_key,
                insecure_psk,
                key_file,
            };
            let (cfg, auth) = config::resolve(file, flags)?;
            daemon::serve(cfg, auth)?;
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
        Cmd::Cert(CertCmd::Ca { out, name }) => {
            ferry_tls::make_ca(&out, &name)?;
            println!("wrote {0}/ca.pem and {0}/ca-key.pem", out.display());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Cert(CertCmd::Host { ca, name, san, out }) => {
            ferry_tls::make_host(&ca, &out, &name, &san)?;
            println!("wrote {0}/{name}.pem and {0}/{name}-key.pem", out.display());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Recover {
            vm,
            abort,
            force,
            socket,
        } => {
            ferry_proto::common::check_vm_id(&vm)?;
            let mode = match (abort, force) {
                (false, _) => RecoverMode::Deliver,
                (true, false) => RecoverMode::Abort,
                (true, true) => RecoverMode::ForceAbort,
            };
            cli::recover(&socket, vm, mode)
        }
        Cmd::Status { socket } => cli::status(&socket),
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
            ferry_proto::common::check_vm_id(&vm)?;
            check_destination(&to)?;
            let mut s = cli::connect(&socket)?;
            write_msg(
                &mut s,
                &CliMsg::Migrate(MigrateRequest {
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
            cli::follow(&mut s, json)
        }
    }
}
