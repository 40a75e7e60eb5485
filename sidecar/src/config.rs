//! `ferry serve`'s settings: a TOML file (`--config`), each key overridable by a flag.
//!
//! ```toml
//! socket = "/run/ferry/ferry.sock"
//! listen = "0.0.0.0:7780"
//! state_dir = "/var/lib/ferry"
//! replay_window_s = 120
//! rdma_peers = ["10.0.0.2"]        # RDMA is not encrypted: only to hosts listed here
//! max_outgoing = 2                 # migrations out at once (the rest queue)
//! max_incoming = 2                 # migrations in at once (sources keep the rest queued)
//! max_bandwidth_mibps = 0          # this host's cap for outgoing migrations (0: none)
//! metrics = "127.0.0.1:9477"       # Prometheus text on GET /metrics (absent: off)
//! populate = "overlap"             # incoming memory filled while pages arrive, or "ahead"
//! data_cpus = "0-3"                # data threads' CPUs (absent: the NIC's NUMA node's)
//! log_format = "text"              # or "json"
//!
//! [tls]                            # mutual TLS 1.3 (`ferry cert` makes these)
//! ca = "/etc/ferry/ca.pem"
//! cert = "/etc/ferry/host.pem"
//! key = "/etc/ferry/host-key.pem"
//!
//! # insecure_psk_key_file = "/etc/ferry/key"   # instead of [tls]: nothing encrypted
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use serde::Deserialize;

use crate::context::DaemonConfig;
use crate::intake::Populate;
use crate::peer::PeerAuth;
use ferry_tls::{Tls, TlsFiles};

/// The `[tls]` table.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// The fleet CA certificate.
    pub ca: Option<PathBuf>,
    /// This host's certificate.
    pub cert: Option<PathBuf>,
    /// This host's private key.
    pub key: Option<PathBuf>,
}

/// The configuration file.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Unix socket for VMMs and the CLI.
    pub socket: Option<PathBuf>,
    /// Peer listen address.
    pub listen: Option<String>,
    /// Decisions and incoming records.
    pub state_dir: Option<PathBuf>,
    /// Replay window in seconds.
    pub replay_window_s: Option<u64>,
    /// Hosts RDMA may be used with.
    #[serde(default)]
    pub rdma_peers: Vec<String>,
    /// TLS identity.
    #[serde(default)]
    pub tls: TlsSection,
    /// `--insecure-psk`'s key file.
    pub insecure_psk_key_file: Option<PathBuf>,
    /// Most outgoing migrations at once.
    pub max_outgoing: Option<usize>,
    /// Most incoming migrations at once.
    pub max_incoming: Option<usize>,
    /// Host bandwidth cap, MiB/s.
    pub max_bandwidth_mibps: Option<u64>,
    /// Metrics address.
    pub metrics: Option<String>,
    /// "overlap" or "ahead".
    pub populate: Option<String>,
    /// A CPU list.
    pub data_cpus: Option<String>,
    /// "text" or "json".
    pub log_format: Option<String>,
}

impl FileConfig {
    /// Reads a configuration file.
    ///
    /// # Errors
    ///
    /// Unreadable file, bad TOML, unknown keys.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }
}

/// Flags of `ferry serve` (each overrides the file).
#[derive(Clone, Debug, Default)]
pub struct ServeFlags {
    /// `--socket`.
    pub socket: Option<PathBuf>,
    /// `--listen`.
    pub listen: Option<String>,
    /// `--state-dir`.
    pub state_dir: Option<PathBuf>,
    /// `--replay-window-s`.
    pub replay_window_s: Option<u64>,
    /// `--rdma-peer`.
    pub rdma_peers: Vec<String>,
    /// `--tls-ca`.
    pub tls_ca: Option<PathBuf>,
    /// `--tls-cert`.
    pub tls_cert: Option<PathBuf>,
    /// `--tls-key`.
    pub tls_key: Option<PathBuf>,
    /// `--insecure-psk`.
    pub insecure_psk: bool,
    /// `--key-file`.
    pub key_file: Option<PathBuf>,
    /// `--max-outgoing`.
    pub max_outgoing: Option<usize>,
    /// `--max-incoming`.
    pub max_incoming: Option<usize>,
    /// `--max-bandwidth-mibps`.
    pub max_bandwidth_mibps: Option<u64>,
    /// `--metrics`.
    pub metrics: Option<String>,
    /// `--populate`.
    pub populate: Option<String>,
    /// `--data-cpus`.
    pub data_cpus: Option<String>,
}

/// Default limit of migrations at once, each way.
pub const DEFAULT_MAX_MIGRATIONS: usize = 2;
/// Highest `max_outgoing` / `max_incoming` accepted.
pub const MAX_MIGRATIONS: usize = 64;

/// Highest bandwidth cap accepted, MiB/s (1 TiB/s: "no cap" is 0).
pub const MAX_MIBPS: u64 = 1 << 20;

/// Default Unix socket.
pub const DEFAULT_SOCKET: &str = "/run/ferry/ferry.sock";

/// Parses `data_cpus` and checks each CPU is online here.
fn data_cpus(list: &str) -> anyhow::Result<Vec<usize>> {
    let cpus =
        crate::placement::parse_cpu_list(list).map_err(|e| anyhow::anyhow!("data_cpus: {e}"))?;
    let online = std::fs::read_to_string("/sys/devices/system/cpu/online")
        .context("reading /sys/devices/system/cpu/online")?;
    let online = crate::placement::parse_cpu_list(online.trim())
        .map_err(|e| anyhow::anyhow!("/sys/devices/system/cpu/online: {e}"))?;
    if let Some(c) = cpus.iter().find(|c| !online.contains(c)) {
        bail!(
            "data_cpus: CPU {c} is not online here (online: {})",
            crate::placement::cpu_list(&online)
        );
    }
    Ok(cpus)
}

/// Merges file and flags into the daemon's settings and its peer authentication.
///
/// # Errors
///
/// Missing or contradictory authentication settings, unreadable or unsafe key files.
pub fn resolve(file: FileConfig, f: ServeFlags) -> anyhow::Result<(DaemonConfig, PeerAuth)> {
    let cfg = DaemonConfig {
        socket: f
            .socket
            .or(file.socket)
            .unwrap_or_else(|| DEFAULT_SOCKET.into()),
        listen: f
            .listen
            .or(file.listen)
            .unwrap_or_else(|| "0.0.0.0:7780".into()),
        state_dir: f
            .state_dir
            .or(file.state_dir)
            .unwrap_or_else(|| "/var/lib/ferry".into()),
        replay_window: Duration::from_secs(
            f.replay_window_s.or(file.replay_window_s).unwrap_or(120),
        ),
        rdma_peers: if f.rdma_peers.is_empty() {
            file.rdma_peers
        } else {
            f.rdma_peers
        },
        max_outgoing: f
            .max_outgoing
            .or(file.max_outgoing)
            .unwrap_or(DEFAULT_MAX_MIGRATIONS),
        max_incoming: f
            .max_incoming
            .or(file.max_incoming)
            .unwrap_or(DEFAULT_MAX_MIGRATIONS),
        max_bandwidth_mibps: f
            .max_bandwidth_mibps
            .or(file.max_bandwidth_mibps)
            .unwrap_or(0),
        metrics: f.metrics.or(file.metrics),
        populate: match f.populate.or(file.populate) {
            Some(p) => Populate::parse(&p)?,
            None => Populate::default(),
        },
        data_cpus: match f.data_cpus.or(file.data_cpus) {
            Some(list) => data_cpus(&list)?,
            None => Vec::new(),
        },
    };
    for (name, v) in [
        ("max_outgoing", cfg.max_outgoing),
        ("max_incoming", cfg.max_incoming),
    ] {
        if !(1..=MAX_MIGRATIONS).contains(&v) {
            bail!("{name} must be 1 to {MAX_MIGRATIONS}, got {v}");
        }
    }
    if cfg.max_bandwidth_mibps > MAX_MIBPS {
        bail!(
            "max_bandwidth_mibps must be at most {MAX_MIBPS} (0: no cap), got {}",
            cfg.max_bandwidth_mibps
        );
    }
    let tls = (
        f.tls_ca.or(file.tls.ca),
        f.tls_cert.or(file.tls.cert),
        f.tls_key.or(file.tls.key),
    );
    // The file's key is named `insecure_psk_key_file`: setting it is the explicit choice.
    let explicit = f.insecure_psk || file.insecure_psk_key_file.is_some();
    let psk = f.key_file.or(file.insecure_psk_key_file);
    let insecure = explicit || (psk.is_some() && tls == (None, None, None));
    let auth = match (tls, insecure, psk) {
        ((Some(ca), Some(cert), Some(key)), false, _) => {
            PeerAuth::Tls(Tls::load(&TlsFiles { ca, cert, key })?)
        }
        ((None, None, None), true, Some(k)) => {
            if !explicit {
                bail!("a shared key alone does not encrypt anything: give --tls-ca/--tls-cert/--tls-key (see `ferry cert`), or choose --insecure-psk explicitly");
            }
            PeerAuth::Psk(
                ferry_proto::auth::Key::from_file(&k)
                    .with_context(|| format!("reading key file {}", k.display()))?,
            )
        }
        ((None, None, None), true, None) => bail!("--insecure-psk needs --key-file"),
        ((None, None, None), false, None) => {
            bail!("peers must authenticate: give --tls-ca, --tls-cert and --tls-key (see `ferry cert`), or --insecure-psk --key-file")
        }
        (_, true, _) => bail!("choose TLS or --insecure-psk, not both"),
        _ => bail!("TLS needs all three of --tls-ca, --tls-cert and --tls-key"),
    };
    Ok((cfg, auth))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_file_parses_and_states_every_default() {
        let f: FileConfig =
            toml::from_str(include_str!("../../dist/ferry.toml")).expect("dist/ferry.toml parses");
        assert_eq!(f.socket.as_deref(), Some(Path::new(DEFAULT_SOCKET)));
        assert_eq!(f.listen.as_deref(), Some("0.0.0.0:7780"));
        assert_eq!(f.state_dir.as_deref(), Some(Path::new("/var/lib/ferry")));
        assert_eq!(f.replay_window_s, Some(120));
        assert_eq!(f.max_outgoing, Some(DEFAULT_MAX_MIGRATIONS));
        assert_eq!(f.max_incoming, Some(DEFAULT_MAX_MIGRATIONS));
        assert_eq!(f.max_bandwidth_mibps, Some(0));
        assert_eq!(f.log_format.as_deref(), Some("text"));
        assert!(f.rdma_peers.is_empty() && f.metrics.is_none());
        assert!(f.tls.ca.is_some() && f.insecure_psk_key_file.is_none());
    }
}
