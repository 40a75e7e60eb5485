//! `ferry`: the Ferry sidecar daemon and its command line.
//!
//! - `ferry serve` runs the daemon next to a VMM: a Unix socket for VMMs and the CLI, a
//!   TCP listener for peer sidecars (mutual TLS 1.3, or `--insecure-psk`).
//! - `ferry migrate <vm> --to <host:port>` asks the local daemon to live-migrate a
//!   registered VM, shows progress, and prints a summary (`--json`: one JSON object).
//! - `ferry status` shows running, queued and recent migrations (`--json`: the document
//!   orchestrators read, `docs/operations.md`).
//! - `ferry drain --to <host:port>` migrates every registered VM through the queue.
//! - `ferry cancel <vm>` stops a queued or running migration before its commit decision;
//!   `ferry set-bandwidth <vm> <MiB/s>` changes a migration's cap while it runs.
//! - `ferry recover <vm>` settles a recorded commit decision the link lost (delivers it,
//!   or with `--abort` rolls it back once the destination confirms it discarded its copy).
//! - `ferry devices` lists RDMA devices (TCP is used when there are none).
//! - `ferry cert ca|host` makes a fleet CA and host certificates; `ferry keygen` a shared
//!   key for `--insecure-psk`.
//!
//! Exit status: 0 on success, 1 when the operation failed (a migration that did not
//! commit, a refused request, an unreachable daemon), 2 for usage errors (bad flags or
//! values, caught before anything connects).

mod args;
mod bandwidth;
mod ch;
mod ch_vms;
mod cli;
mod config;
mod context;
mod daemon;
mod dest;
mod dest_exec;
mod drain;
mod entries;
#[cfg(feature = "fault-injection")]
mod faults;
mod intake;
mod job;
mod lifecycle;
mod local;
mod memory;
mod metrics;
mod offer;
mod outgoing;
mod peer;
mod placement;
mod queue;
mod registry;
mod replay;
mod source;
mod status;
mod summary;
mod transport;
mod vmm;
mod watchdog;
mod window;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use ferry_proto::cli::{CliMsg, RecoverMode};

use crate::args::MigrateOpts;

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

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    /// Human-readable lines (colour only on a terminal).
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Subcommand)]
enum ChCmd {
    /// (Started by the sidecar.) Hold a source CH's migration connection through the
    /// commit window.
    #[command(hide = true)]
    Keep {
        /// Where to listen.
        #[arg(long)]
        socket: PathBuf,
    },
    /// Register a running CH VM with the local sidecar; then `ferry migrate` it.
    Register(ChAttachArgs),
    /// Attach a CH started without a VM (only --api-socket) to receive the VM `--vm-id`.
    Await(ChAttachArgs),
}

/// What `ferry ch register` and `ferry ch await` take.
#[derive(clap::Args)]
struct ChAttachArgs {
    /// CH's --api-socket.
    #[arg(long)]
    api_socket: PathBuf,
    /// The VM's id (here, and at the other host).
    #[arg(long)]
    vm_id: String,
    /// The local daemon's socket.
    #[arg(long, default_value = config::DEFAULT_SOCKET)]
    socket: PathBuf,
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

// Parsed once per process: `serve`'s many flags make its variant large, which costs
// nothing here.
#[allow(clippy::large_enum_variant)]
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
        /// Most outgoing migrations at once; the rest wait in the queue [default: 2].
        #[arg(long)]
        max_outgoing: Option<usize>,
        /// Most incoming migrations at once; sources keep the rest queued [default: 2].
        #[arg(long)]
        max_incoming: Option<usize>,
        /// This host's bandwidth cap for outgoing migrations in MiB/s, shared fairly by
        /// those running [default: 0, no cap].
        #[arg(long)]
        max_bandwidth_mibps: Option<u64>,
        /// Serve Prometheus metrics on this address (GET /metrics).
        #[arg(long)]
        metrics: Option<String>,
        /// How an incoming VM's memory is filled: `overlap` (in the background while its
        /// pages arrive) or `ahead` (all of it before the source may send: a memory
        /// shortage shows before any data moves) [default: overlap].
        #[arg(long, value_parser = ["overlap", "ahead"])]
        populate: Option<String>,
        /// CPUs the data threads (TCP streams, RDMA pulls) run on, e.g. `0-3,8`
        /// [default: those of the NUMA node of the network device a migration uses, as
        /// hwloc sees it; unbound when it is virtual or local to every CPU].
        #[arg(long)]
        data_cpus: Option<String>,
        /// Log lines as text or JSON [default: text].
        #[arg(long, value_enum)]
        log_format: Option<LogFormat>,
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
    /// Live-migrate a registered VM to another sidecar (queued until this host and the
    /// destination have a free slot).
    Migrate {
        /// VM id.
        vm: String,
        /// Destination sidecar, host:port.
        #[arg(long)]
        to: String,
        #[command(flatten)]
        opts: MigrateOpts,
        /// Print one JSON object (the summary, or the error) instead of the progress bar
        /// and summary.
        #[arg(long)]
        json: bool,
    },
    /// Migrate every VM registered with the local sidecar to another sidecar, through the
    /// queue; reports each; exits 1 if any VM stayed.
    Drain {
        /// Destination sidecar, host:port.
        #[arg(long)]
        to: String,
        #[command(flatten)]
        opts: MigrateOpts,
        /// Print one JSON array of the summaries.
        #[arg(long)]
        json: bool,
    },
    /// Cancel a queued or running migration (refused once its commit decision is taken):
    /// the VM keeps running here and the destination discards its copy.
    Cancel {
        /// VM id.
        vm: String,
        /// The local daemon's socket.
        #[arg(long, default_value = config::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Change a queued or running migration's bandwidth cap (0 removes its own cap).
    SetBandwidth {
        /// VM id.
        vm: String,
        /// MiB/s.
        #[arg(value_parser = clap::value_parser!(u32).range(0..=1_048_576))]
        mibps: u32,
        /// The local daemon's socket.
        #[arg(long, default_value = config::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Show running, queued and recent migrations, limits and registered VMs.
    Status {
        /// The local daemon's socket.
        #[arg(long, default_value = config::DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Print the status document as JSON.
        #[arg(long)]
        json: bool,
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
    /// Attach Cloud Hypervisor VMs (unmodified CH, through its API socket).
    #[command(subcommand)]
    Ch(ChCmd),
}

/// Logs to stderr: text (colour only on a terminal) or JSON lines.
fn init_logging(format: LogFormat) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let b = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    match format {
        LogFormat::Json => b.json().flatten_event(true).init(),
        LogFormat::Text => b
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
}

/// A usage error: a bad value the CLI catches before it connects to anything (exit 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Usage(String);

fn main() -> ExitCode {
    let cli = Cli::parse();
    let format = match &cli.cmd {
        Cmd::Serve {
            config, log_format, ..
        } => match log_format {
            Some(f) => *f,
            None => match config.as_deref().map(config::FileConfig::load) {
                Some(Ok(c)) if c.log_format.as_deref() == Some("json") => LogFormat::Json,
                _ => LogFormat::Text,
            },
        },
        _ => LogFormat::Text,
    };
    init_logging(format);
    match run(cli) {
        Ok(code) => code,
        Err(e) if e.downcast_ref::<Usage>().is_some() => {
            eprintln!("ferry: {e:#}");
            ExitCode::from(2)
        }
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
    if !ok {
        return Err(Usage(format!(
            "--to must be host:port (e.g. 10.0.0.2:7780), got {to:?}"
        ))
        .into());
    }
    Ok(())
}

/// Checks a VM id before anything is sent to the daemon.
fn check_vm(vm: &str) -> anyhow::Result<()> {
    ferry_proto::common::check_vm_id(vm).map_err(|e| Usage(e.to_string()).into())
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
            max_outgoing,
            max_incoming,
            max_bandwidth_mibps,
            metrics,
            populate,
            data_cpus,
            log_format: _,
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
                max_outgoing,
                max_incoming,
                max_bandwidth_mibps,
                metrics,
                populate,
                data_cpus,
            };
            if let Some(f) = file.log_format.as_deref() {
                if f != "text" && f != "json" {
                    return Err(Usage(format!(
                        "log_format must be \"text\" or \"json\", got {f:?}"
                    ))
                    .into());
                }
            }
            let (cfg, auth) = config::resolve(file, flags)?;
            daemon::serve(cfg, auth)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Devices => {
            match placement::describe() {
                Ok(lines) => lines.iter().for_each(|l| println!("{l}")),
                Err(e) => println!("no topology from hwloc: {e}"),
            }
            devices_rdma()
        }
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
            check_vm(&vm)?;
            let mode = match (abort, force) {
                (false, _) => RecoverMode::Deliver,
                (true, false) => RecoverMode::Abort,
                (true, true) => RecoverMode::ForceAbort,
            };
            cli::recover(&socket, vm, mode)
        }
        Cmd::Status { socket, json } => cli::status(&socket, json),
        Cmd::Ch(ChCmd::Keep { socket }) => {
            ferry_ch::keeper::run(&socket)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Ch(c) => {
            let (
                ChAttachArgs {
                    api_socket: api,
                    vm_id: vm,
                    socket,
                },
                incoming,
            ) = match c {
                ChCmd::Keep { .. } => unreachable!("handled above"),
                ChCmd::Register(a) => (a, false),
                ChCmd::Await(a) => (a, true),
            };
            check_vm(&vm)?;
            let api = std::path::absolute(&api)
                .map_err(|e| Usage(format!("--api-socket {}: {e}", api.display())))?;
            cli::request(
                &socket,
                CliMsg::ChAttach {
                    vm_id: vm,
                    api_socket: api.to_string_lossy().into_owned(),
                    incoming,
                },
            )
        }
        Cmd::Cancel { vm, socket } => {
            check_vm(&vm)?;
            cli::request(&socket, CliMsg::Cancel { vm_id: vm })
        }
        Cmd::SetBandwidth { vm, mibps, socket } => {
            check_vm(&vm)?;
            cli::request(&socket, CliMsg::SetBandwidth { vm_id: vm, mibps })
        }
        Cmd::Migrate { vm, to, opts, json } => {
            check_vm(&vm)?;
            check_destination(&to)?;
            let mut s = cli::connect(&opts.socket)?;
            ferry_proto::frame::write_msg(&mut s, &CliMsg::Migrate(opts.request(vm.clone(), to)))?;
            cli::follow(&mut s, &vm, json)
        }
        Cmd::Drain { to, opts, json } => {
            check_destination(&to)?;
            drain::drain(&to, &opts, json)
        }
    }
}

/// `ferry devices`' RDMA part; exit 1 when there is none (migrations use TCP).
fn devices_rdma() -> anyhow::Result<ExitCode> {
    match ferry_verbs::device_reports() {
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
    }
}
