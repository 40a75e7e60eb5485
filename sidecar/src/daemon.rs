//! `ferry serve`: the sidecar daemon.
//!
//! One Unix socket takes VMMs (registering a VM, or waiting for an incoming one) and
//! the CLI; one TCP listener takes authenticated peer sidecars (control connections
//! carrying an `Offer`, and data connections presenting a session proof).

use std::collections::HashMap;
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use crossbeam_channel::Sender;
use ferry_proto::auth::{self, data_proof, Key};
use ferry_proto::frame::{read_msg, recv_with_fds, write_msg};
use ferry_proto::mem::GuestRegion;
use ferry_proto::msg::{Msg, RegionInfo, Role, MAX_FRAME, MAX_STR};
use ferry_proto::net::{tune_peer_socket, DEAD_PEER_AFTER};
use ferry_proto::{ProtoError, VERSION};

/// Hands an authenticated data connection (channel index, socket) to its migration.
pub type DataConnSender = Sender<(u16, TcpStream)>;

/// A VM a source VMM registered.
pub struct RegisteredVm {
    /// The VMM's socket, for requests.
    pub link: UnixStream,
    /// Layout.
    pub regions: Vec<RegionInfo>,
    /// The VM's RAM, mapped from the VMM's memfds.
    pub mem: Arc<Vec<GuestRegion>>,
    /// CPU compatibility blob.
    pub cpu_profile: Vec<u8>,
}

/// A VMM waiting for an incoming VM.
pub struct WaitingVmm {
    /// The VMM's socket.
    pub link: UnixStream,
}

/// A loaded VM waiting for its source's decision.
pub struct HeldVm {
    /// The VM's id.
    pub vm_id: String,
    /// Its VMM (loaded, vCPUs not running).
    pub vmm: WaitingVmm,
}

/// Shared daemon state.
pub struct Daemon {
    /// Peer authentication key.
    pub key: Key,
    /// Where decisions are recorded.
    pub state_dir: PathBuf,
    /// How long a source keeps replaying a commit decision the link lost before it
    /// leaves it to `ferry recover`.
    pub replay_window: Duration,
    /// Registered VMs by id (taken out while migrating).
    pub vms: Mutex<HashMap<String, RegisteredVm>>,
    /// VMMs waiting for incoming VMs, by id.
    pub waiting: Mutex<HashMap<String, WaitingVmm>>,
    /// Migrations in progress, by VM id, with their phase for `ferry status`.
    pub active: Mutex<HashMap<String, String>>,
    /// VMMs holding a loaded, paused VM whose source became unreachable after `Ready`,
    /// by session: never discarded or started on our own (the source may have
    /// committed); only the source's replayed [`Msg::Decision`] settles them.
    pub held: Mutex<HashMap<[u8; 16], HeldVm>>,
    /// Sessions whose VM runs here, with the VMM's start line, so a replayed `Commit`
    /// (its `PeerRunning` was lost) is answered instead of refused.
    pub running: Mutex<HashMap<[u8; 16], String>>,
    /// Control connections of incoming migrations, by session, so a replayed decision
    /// can cut a half-open one.
    pub controls: Mutex<HashMap<[u8; 16], TcpStream>>,
    /// Data connections awaited by incoming migrations, by session.
    pub sessions: Mutex<HashMap<[u8; 16], DataConnSender>>,
}

/// Options of `ferry serve`.
pub struct ServeConfig {
    /// Unix socket for VMMs and the CLI.
    pub socket: PathBuf,
    /// Peer listen address.
    pub listen: String,
    /// Shared key file.
    pub key_file: PathBuf,
    /// State directory.
    pub state_dir: PathBuf,
    /// How long a source keeps replaying a commit decision the link lost.
    pub replay_window: Duration,
}

/// Runs the daemon until killed.
///
/// # Errors
///
/// When the sockets cannot be bound or the key cannot be read.
pub fn serve(cfg: ServeConfig) -> anyhow::Result<()> {
    let key = Key::from_file(&cfg.key_file)
        .with_context(|| format!("reading key file {}", cfg.key_file.display()))?;
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("creating state dir {}", cfg.state_dir.display()))?;
    let _ = std::fs::remove_file(&cfg.socket);
    let unix = UnixListener::bind(&cfg.socket)
        .with_context(|| format!("binding {}", cfg.socket.display()))?;
    let tcp = TcpListener::bind(&cfg.listen).with_context(|| format!("binding {}", cfg.listen))?;
    tracing::info!(socket = %cfg.socket.display(), listen = %tcp.local_addr()?, "ferry sidecar serving");
    let d = Arc::new(Daemon {
        key,
        state_dir: cfg.state_dir,
        replay_window: cfg.replay_window,
        vms: Mutex::default(),
        waiting: Mutex::default(),
        active: Mutex::default(),
        held: Mutex::default(),
        running: Mutex::default(),
        controls: Mutex::default(),
        sessions: Mutex::default(),
    });
    {
        let d = Arc::clone(&d);
        std::thread::spawn(move || {
            for conn in tcp.incoming() {
                match conn {
                    Ok(s) => {
                        let d = Arc::clone(&d);
                        std::thread::spawn(move || {
                            let peer = s.peer_addr().map(|a| a.to_string()).unwrap_or_default();
                            if let Err(e) = handle_peer(&d, s) {
                                tracing::warn!(%peer, "peer connection: {e:#}");
                            }
                        });
                    }
                    Err(e) => tracing::warn!("accept peer: {e}"),
                }
            }
        });
    }
    for conn in unix.incoming() {
        match conn {
            Ok(s) => {
                let d = Arc::clone(&d);
                std::thread::spawn(move || {
                    if let Err(e) = handle_local(&d, s) {
                        tracing::warn!("local connection: {e:#}");
                    }
                });
            }
            Err(e) => tracing::warn!("accept local: {e}"),
        }
    }
    Ok(())
}

/// Tells the peer why (best effort) and returns the same reason as an error.
pub(crate) fn refuse(s: &mut impl Write, reason: String) -> anyhow::Error {
    let _ = write_msg(
        s,
        &Msg::Refused {
            reason: reason.clone(),
        },
    );
    anyhow::anyhow!(reason)
}

/// A VMM or the CLI on the Unix socket.
fn handle_local(d: &Arc<Daemon>, mut s: UnixStream) -> anyhow::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let (hello, _) = recv_with_fds(&s, MAX_STR)?;
    let role = match hello {
        Msg::Hello { version, role } if version == VERSION => role,
        Msg::Hello { version, .. } => {
            return Err(refuse(
                &mut s,
                format!("protocol version {version} not supported; this sidecar speaks {VERSION}"),
            ))
        }
        other => {
            return Err(refuse(
                &mut s,
                format!("expected Hello, got {}", other.name()),
            ))
        }
    };
    write_msg(&mut s, &Msg::Welcome { version: VERSION })?;
    match role {
        Role::Vmm => handle_vmm(d, s),
        Role::Cli => {
            s.set_read_timeout(None)?;
            crate::cli_server::handle(d, s)
        }
    }
}

fn handle_vmm(d: &Arc<Daemon>, mut s: UnixStream) -> anyhow::Result<()> {
    let (msg, fds) = recv_with_fds(&s, MAX_FRAME)?;
    match msg {
        Msg::RegisterVm {
            vm_id,
            regions,
            cpu_profile,
        } => {
            if fds.len() != regions.len() || regions.is_empty() {
                return Err(refuse(
                    &mut s,
                    format!("{} memfds for {} regions", fds.len(), regions.len()),
                ));
            }
            let mut mem = Vec::new();
            for (r, fd) in regions.iter().zip(&fds) {
                use std::os::fd::AsFd;
                match GuestRegion::map(fd.as_fd(), r.offset, r.size) {
                    Ok(m) => mem.push(m),
                    Err(e) => return Err(refuse(&mut s, format!("cannot map region: {e}"))),
                }
            }
            // Map the VM's RAM into our page tables now, off the migration's path.
            let t = std::time::Instant::now();
            for m in &mem {
                if let Err(e) = m.prefault_read(2) {
                    tracing::warn!(%vm_id, "prefaulting guest RAM: {e}");
                }
            }
            tracing::debug!(%vm_id, ms = t.elapsed().as_millis() as u64, "guest RAM prefaulted");
            if d.active.lock().expect("lock").contains_key(&vm_id) {
                return Err(refuse(&mut s, format!("VM {vm_id} is being migrated")));
            }
            write_msg(&mut s, &Msg::Ok)?;
            s.set_read_timeout(None)?;
            tracing::info!(%vm_id, regions = regions.len(), "VM registered");
            d.vms.lock().expect("lock").insert(
                vm_id,
                RegisteredVm {
                    link: s,
                    regions,
                    mem: Arc::new(mem),
                    cpu_profile,
                },
            );
            Ok(())
        }
        Msg::AwaitIncoming { vm_id } => {
            write_msg(&mut s, &Msg::Ok)?;
            s.set_read_timeout(None)?;
            tracing::info!(%vm_id, "VMM waits for an incoming VM");
            d.waiting
                .lock()
                .expect("lock")
                .insert(vm_id, WaitingVmm { link: s });
            Ok(())
        }
        other => Err(refuse(
            &mut s,
            format!("expected RegisterVm or AwaitIncoming, got {}", other.name()),
        )),
    }
}

/// A peer sidecar's connection: authenticate, then an offer or a data connection.
fn handle_peer(d: &Arc<Daemon>, mut s: TcpStream) -> anyhow::Result<()> {
    tune_peer_socket(&s, DEAD_PEER_AFTER)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    // Data connections present a session proof instead of the full handshake.
    let first = read_msg(&mut s, 4096);
    match first {
        Ok(Msg::DataHello {
            session,
            channel,
            proof,
        }) => {
            if !d
                .key
                .verify(b"ferry-data", &[&session, &channel.to_le_bytes()], &proof)
            {
                return Err(refuse(
                    &mut s,
                    "data connection proof does not match".into(),
                ));
            }
            let tx = d.sessions.lock().expect("lock").get(&session).cloned();
            match tx {
                Some(tx) => {
                    s.set_read_timeout(None)?;
                    tx.send((channel, s))
                        .map_err(|_| anyhow::anyhow!("session ended"))?;
                    Ok(())
                }
                None => Err(refuse(&mut s, "unknown migration session".into())),
            }
        }
        Ok(Msg::PeerHello { version, nonce }) => {
            auth::accept_after_hello(&mut s, &d.key, version, nonce)?;
            s.set_read_timeout(Some(Duration::from_secs(60)))?;
            match read_msg(&mut s, MAX_FRAME)? {
                offer @ Msg::Offer { .. } => crate::dest::run(d, s, offer),
                Msg::Decision { session, commit } => crate::dest::settle(d, s, session, commit),
                other => Err(refuse(
                    &mut s,
                    format!("expected Offer or Decision, got {}", other.name()),
                )),
            }
        }
        Ok(other) => Err(refuse(
            &mut s,
            format!("expected PeerHello or DataHello, got {}", other.name()),
        )),
        Err(e @ ProtoError::Closed) => Err(e.into()),
        Err(e) => Err(refuse(&mut s, e.to_string())),
    }
}

/// The proof a data connection presents (re-exported for the source side).
pub fn proof(key: &Key, session: &[u8; 16], channel: u16) -> [u8; 32] {
    data_proof(key, session, channel)
}
