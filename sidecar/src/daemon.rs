//! `ferry serve`: the sidecar daemon.
//!
//! One Unix socket takes VMMs (registering a VM, or waiting for an incoming one) and the
//! CLI; one TCP listener takes peer sidecars (control connections and data connections).
//! What any peer or local client can cost is bounded: a cap on connections (and so on
//! threads), a deadline for every handshake as a whole, back-off when accepting fails
//! (out of file descriptors), and registrations dropped when their VMM's link closes.

use std::io::ErrorKind;
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::context::{Daemon, DaemonConfig};
use crate::lifecycle::{notify, Lock};
use crate::peer::{accept, Accepted, PeerAuth, HANDSHAKE_DEADLINE};
use crate::queue::Slot;
use crate::watchdog::watchdog;

/// Most peer connections handled at once (control and data; each has a thread). Far
/// above what migrations need (64 data channels per migration at most), low enough that
/// a flood of connections cannot exhaust threads or memory.
pub const MAX_PEER_CONNECTIONS: usize = 256;
/// Most local (VMM and CLI) connections at once.
pub const MAX_LOCAL_CONNECTIONS: usize = 256;

/// Logs a repeated condition at most once per interval, with how often it happened.
struct RateLimited {
    what: &'static str,
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimited {
    fn new(what: &'static str) -> Self {
        Self {
            what,
            last: None,
            suppressed: 0,
        }
    }

    fn warn(&mut self, detail: &str) {
        let now = Instant::now();
        if self.last.is_some_and(|t| now - t < Duration::from_secs(5)) {
            self.suppressed += 1;
            return;
        }
        tracing::warn!(suppressed = self.suppressed, "{}: {detail}", self.what);
        self.last = Some(now);
        self.suppressed = 0;
    }
}

/// Accept errors that mean "no resources now": wait before trying again.
fn resource_error(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    ) || e.kind() == ErrorKind::OutOfMemory
}

/// Runs `accept` forever, handing each connection to `handle` on a thread of its own
/// while fewer than `max` run; beyond that connections are closed at once. Backs off
/// (10 ms doubling to 1 s) while accepting fails for lack of resources.
fn accept_loop<S: Send + 'static>(
    what: &'static str,
    max: usize,
    mut accept: impl FnMut() -> std::io::Result<S>,
    handle: impl Fn(S) + Send + Sync + 'static,
) {
    let live = Arc::new(AtomicUsize::new(0));
    let handle = Arc::new(handle);
    let mut full = RateLimited::new(what);
    let mut failing = RateLimited::new(what);
    let mut backoff = Duration::from_millis(10);
    loop {
        let conn = match accept() {
            Ok(c) => {
                backoff = Duration::from_millis(10);
                c
            }
            Err(e) => {
                failing.warn(&format!("accept failed: {e}"));
                if resource_error(&e) {
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
                continue;
            }
        };
        let Some(slot) = Slot::take(&live, max) else {
            full.warn(&format!(
                "{max} connections already open; closing a new one"
            ));
            drop(conn);
            continue;
        };
        let handle = Arc::clone(&handle);
        let spawned = std::thread::Builder::new()
            .name(what.into())
            .spawn(move || {
                let _slot = slot;
                handle(conn);
            });
        if let Err(e) = spawned {
            failing.warn(&format!("no thread for a connection: {e}"));
            std::thread::sleep(backoff);
        }
    }
}

/// Binds the Unix socket, refusing to take it from a daemon that still answers on it
/// (the caller holds the socket's lock, so no daemon of this version does).
fn bind_socket(path: &PathBuf) -> anyhow::Result<UnixListener> {
    if UnixStream::connect(path).is_ok() {
        bail!(
            "another ferry daemon is serving {}: stop it first (this one would make it unreachable)",
            path.display()
        );
    }
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    // VMMs and the CLI run as this user (root): nobody else may register a VM or migrate.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {}", path.display()))?;
    Ok(l)
}

/// Checks the state directory exists and can be written (decisions go there).
fn check_state_dir(dir: &PathBuf) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating state dir {}", dir.display()))?;
    let probe = dir.join(".ferry-probe");
    std::fs::write(&probe, b"probe")
        .with_context(|| format!("the state dir {} is not writable", dir.display()))?;
    let _ = std::fs::remove_file(probe);
    Ok(())
}

/// The lock file guarding a socket: `<socket>.lock` next to it.
fn socket_lock_path(socket: &std::path::Path) -> PathBuf {
    let mut name = socket.file_name().unwrap_or_default().to_os_string();
    name.push(".lock");
    socket.with_file_name(name)
}

/// Runs the daemon until SIGTERM or SIGINT (then it stops cleanly and exits 0).
///
/// # Errors
///
/// Another daemon holds the state directory or the socket, the sockets cannot be bound,
/// or the state directory is unusable.
pub fn serve(cfg: DaemonConfig, auth: PeerAuth) -> anyhow::Result<()> {
    crate::lifecycle::block_signals()?;
    check_state_dir(&cfg.state_dir)?;
    let _state_lock = Lock::take(&cfg.state_dir.join("ferry.lock"), "this state directory")?;
    if let Some(dir) = cfg.socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let _socket_lock = Lock::take(&socket_lock_path(&cfg.socket), "this socket")?;
    ferry_proto::guard::install().context("installing the SIGBUS guard")?;
    let unix = bind_socket(&cfg.socket)?;
    let tcp = TcpListener::bind(&cfg.listen).with_context(|| format!("binding {}", cfg.listen))?;
    let metrics = match &cfg.metrics {
        Some(a) => {
            Some(TcpListener::bind(a).with_context(|| format!("binding the metrics address {a}"))?)
        }
        None => None,
    };
    tracing::info!(
        socket = %cfg.socket.display(),
        listen = %tcp.local_addr()?,
        metrics = ?metrics.as_ref().and_then(|m| m.local_addr().ok()),
        max_outgoing = cfg.max_outgoing,
        max_incoming = cfg.max_incoming,
        max_bandwidth_mibps = cfg.max_bandwidth_mibps,
        encrypted = auth.encrypted(),
        "ferry sidecar serving"
    );
    if !auth.encrypted() {
        tracing::warn!("--insecure-psk: peers authenticate with the shared key, but guest memory and control messages cross the network unencrypted");
    }
    let d = Arc::new(Daemon::new(cfg, auth));
    {
        let d = Arc::clone(&d);
        std::thread::spawn(move || crate::lifecycle::wait_for_signal(d));
    }
    if let Some(l) = metrics {
        let d = Arc::clone(&d);
        std::thread::spawn(move || {
            crate::metrics::serve(l, || d.metrics.render(&crate::status::gauges(&d)));
        });
    }
    crate::outgoing::resume_recorded(&d);
    crate::replay::spawn_releaser(&d);
    {
        let d = Arc::clone(&d);
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_secs(1));
            for vm in d.registry.reap_closed_links() {
                tracing::info!(vm = %vm, "the VMM closed its link: dropped its registration (memory unmapped)");
            }
        });
    }
    {
        let d = Arc::clone(&d);
        std::thread::spawn(move || {
            accept_loop(
                "peer",
                MAX_PEER_CONNECTIONS,
                || tcp.accept().map(|(s, _)| s),
                move |s| handle_peer(&d, s),
            )
        });
    }
    notify("READY=1");
    let d2 = Arc::clone(&d);
    accept_loop(
        "local",
        MAX_LOCAL_CONNECTIONS,
        || unix.accept().map(|(s, _)| s),
        move |s| {
            if let Err(e) = crate::local::handle(&d2, s) {
                tracing::warn!("local connection: {e:#}");
            }
        },
    );
    Ok(())
}

fn handle_peer(d: &Arc<Daemon>, s: TcpStream) {
    let peer = s.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    // The whole handshake (TLS, version, authentication, the first request) must finish
    // in time, however slowly its bytes come.
    let armed = watchdog().arm(s.as_fd(), Instant::now() + HANDSHAKE_DEADLINE);
    let accepted = armed.map_err(anyhow::Error::from).and_then(|armed| {
        let a = accept(&d.auth, s, |session| {
            d.registry.data_waiter(session).map(|w| w.0)
        });
        drop(armed);
        a
    });
    let res = accepted.and_then(|a| match a {
        Accepted::Data {
            session,
            channel,
            stream,
        } => match d.registry.data_waiter(session) {
            Some((_, tx)) => tx
                .send((channel, stream))
                .map_err(|_| anyhow::anyhow!("the migration stopped waiting for data connections")),
            None => bail!("the migration stopped waiting for data connections"),
        },
        Accepted::Control(c, first) => match first {
            offer @ ferry_proto::peer::PeerMsg::Offer { .. } => crate::dest::run(d, c, offer),
            ferry_proto::peer::PeerMsg::Decision { session, commit } => {
                crate::dest::settle(d, c, session, commit)
            }
            ferry_proto::peer::PeerMsg::ChOffer {
                vm_id,
                session,
                channels,
                postcopy,
            } => crate::ch::receive(d, c, vm_id, session, channels, postcopy),
            ferry_proto::peer::PeerMsg::ChQuery { vm_id, session } => {
                crate::ch::answer_query(d, c, &vm_id, session)
            }
            other => {
                let mut c = c;
                Err(crate::peer::refuse(
                    &mut c.stream,
                    format!(
                        "expected Offer, ChOffer, ChQuery or Decision, got {}",
                        ferry_proto::common::Message::name(&other)
                    ),
                ))
            }
        },
    });
    if let Err(e) = res {
        tracing::warn!(%peer, "peer connection: {e:#}");
    }
}
