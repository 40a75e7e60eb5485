//! The destination side of a CH migration: the waiting CH given the VM (pre-copy into
//! Ferry's memfds, or post-copy), and the answer to `ChQuery` about one that arrived.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use ferry_ch::relay::MemoryConnections;
use ferry_engine::session::SessionId;
use ferry_proto::frame::write_msg;
use ferry_proto::net::Timeouts;
use ferry_proto::peer::PeerMsg;
use ferry_proto::records::{self, ChKind, ChRecord};

use crate::ch_vms::{lock, ChVm};
use crate::context::Daemon;
use crate::peer::{refuse, Control, PeerStream};

use crate::ch_vms::PEER_IDLE;

/// How long `vm.receive-migration` may run (it returns when the migration ends).
const RECEIVE_LIMIT: Duration = Duration::from_secs(24 * 3600);

/// The destination side of a CH migration (a `ChOffer` on a control connection).
///
/// # Errors
///
/// Whatever ended it (the source was told when it could be).
pub fn receive(
    d: &Arc<Daemon>,
    mut ctl: Control,
    vm_id: String,
    session: SessionId,
    channels: u16,
    postcopy: bool,
) -> anyhow::Result<()> {
    if channels == 0 || channels > crate::offer::MAX_CHANNELS {
        return Err(refuse(
            &mut ctl.stream,
            format!("{channels} channels requested"),
        ));
    }
    let Some(_slot) = crate::dest::admit(d, &mut ctl, &vm_id)? else {
        return Ok(());
    };
    let Some(ch) = lock(&d.ch.waiting).remove(&vm_id) else {
        return Err(refuse(
            &mut ctl.stream,
            format!("no Cloud Hypervisor waits for VM {vm_id} here (`ferry ch await`)"),
        ));
    };
    let sock = d.cfg.state_dir.join(format!("ch-{vm_id}.sock"));
    let _ = std::fs::remove_file(&sock);
    // What the destination CH makes of this migration is asked for by `ferry recover` at
    // the source (`answer_query`), across restarts of this sidecar.
    let recorded = records::write_ch(
        &d.cfg.state_dir,
        &vm_id,
        ChKind::Incoming,
        &ChRecord {
            session,
            at: ch.api.to_string_lossy().into_owned(),
        },
    );
    if let Err(e) = recorded {
        lock(&d.ch.waiting).insert(vm_id.clone(), ch);
        return Err(refuse(&mut ctl.stream, format!("{e:#}")));
    }
    let t0 = Instant::now();
    let peer = crate::dest::peer_ip(&ctl);
    let res = receive_into(d, &mut ctl, &vm_id, session, channels, postcopy, &ch, &sock);
    let _ = std::fs::remove_file(&sock);
    let state = if res.is_ok() {
        "committed"
    } else {
        "discarded"
    };
    let error = res
        .as_ref()
        .err()
        .map(|e| format!("{e:#}"))
        .unwrap_or_default();
    crate::dest::record_incoming(d, &vm_id, &peer, state, t0, error);
    match &res {
        Ok(()) => tracing::info!(vm = %vm_id, "Cloud Hypervisor VM runs here"),
        Err(e) => {
            tracing::warn!(vm = %vm_id, "incoming Cloud Hypervisor migration: {e:#}");
            // The destination CH abandoned what it built and can receive again.
            if ferry_ch::api::vm_state(&ch.api).ok() == Some(None) {
                lock(&d.ch.waiting).insert(vm_id.clone(), ch);
            }
        }
    }
    res
}

#[allow(clippy::too_many_arguments)]
fn receive_into(
    d: &Daemon,
    ctl: &mut Control,
    vm_id: &str,
    session: SessionId,
    channels: u16,
    postcopy: bool,
    ch: &ChVm,
    sock: &Path,
) -> anyhow::Result<()> {
    let expected = crate::intake::expect_data(&d.registry, session, ctl.key, channels);
    write_msg(&mut ctl.stream, &PeerMsg::Accept { prepare_us: 0 })?;
    let data: Vec<PeerStream> = expected.collect()?;
    for s in &data {
        s.tcp().set_timeouts(Some(PEER_IDLE))?;
    }
    ctl.stream.tcp().set_timeouts(Some(PEER_IDLE))?;
    let api = ch.api.clone();
    let url = format!("unix:{}", sock.display());
    let body = if postcopy {
        serde_json::json!({ "receiver_url": url, "memory_mode": "Postcopy" })
    } else {
        serde_json::json!({ "receiver_url": url })
    };
    let receiver = std::thread::spawn(move || {
        ferry_ch::api::call(
            &api,
            "PUT",
            "vm.receive-migration",
            Some(&body),
            RECEIVE_LIMIT,
        )
    });
    let end = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        if Instant::now() > end || receiver.is_finished() {
            bail!("the destination CH did not start receiving");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let open_dest = || {
        Ok(ferry_ch::link::connect_listening(
            sock,
            Duration::from_secs(5),
        )?)
    };
    let hold = |_point: &'static str| {
        #[cfg(feature = "fault-injection")]
        crate::faults::hold(_point);
    };
    let outcome = if postcopy {
        ferry_ch::postcopy::receive(&mut ctl.stream, data, vm_id, open_dest, || {
            tracing::info!(vm = %vm_id, "Cloud Hypervisor VM runs here; pulling its memory (post-copy)");
        }, &hold)
        .map(|r| {
            tracing::info!(vm = %vm_id, faults = r.faults, fault_bytes = r.fault_bytes, bulk_bytes = r.bulk_bytes, zero_bytes = r.zero_bytes, rdma_bytes = r.rdma_bytes, transport = %r.transport, pull_ms = r.pull.as_millis() as u64, "post-copy pull ended: every page is here");
        })
        .map_err(|f| f.error)
    } else {
        ferry_ch::relay::relay(
            &mut ctl.stream,
            MemoryConnections::Given(data),
            vm_id,
            open_dest,
            &hold,
        )
        .map(|r| {
            tracing::info!(vm = %vm_id, bytes = r.bytes_landed, connections = r.memory_connections, "Cloud Hypervisor VM landed in Ferry's memfds and runs");
        })
        .map_err(|f| f.error)
    };
    let answer = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("the receive thread panicked"))?;
    outcome?;
    let a = answer?;
    if !a.ok() {
        bail!("the destination CH reported {} {}", a.status, a.body);
    }
    Ok(())
}

/// The destination's answer to `ChQuery`: what its CH says of the VM it received in
/// `session`.
///
/// # Errors
///
/// The connection failed.
pub fn answer_query(
    d: &Daemon,
    mut ctl: Control,
    vm_id: &str,
    session: SessionId,
) -> anyhow::Result<()> {
    use ferry_proto::peer::{CH_ABSENT, CH_PAUSED, CH_RUNNING, CH_UNKNOWN};
    let rec = records::read_ch(&d.cfg.state_dir, vm_id, ChKind::Incoming)
        .ok()
        .flatten()
        .filter(|r| r.session == session);
    let (state, detail) = match rec {
        None => (CH_UNKNOWN, format!("no record here of migration {session}")),
        Some(r) => {
            let api = Path::new(&r.at);
            match UnixStream::connect(api) {
                Err(e) => (
                    CH_ABSENT,
                    format!("the destination CH at {} is gone ({e})", r.at),
                ),
                Ok(_) => match ferry_ch::api::vm_state(api) {
                    Ok(Some(s)) if s == "Running" => (CH_RUNNING, format!("{} runs it", r.at)),
                    Ok(Some(s)) if s == "Paused" => {
                        (CH_PAUSED, format!("{} holds it paused", r.at))
                    }
                    Ok(Some(s)) => (
                        CH_ABSENT,
                        format!("{} has only its configuration ({s})", r.at),
                    ),
                    Ok(None) => (CH_ABSENT, format!("{} has no VM", r.at)),
                    Err(e) => (CH_UNKNOWN, format!("{} does not answer: {e:#}", r.at)),
                },
            }
        }
    };
    write_msg(&mut ctl.stream, &PeerMsg::ChState { state, detail })?;
    Ok(())
}
