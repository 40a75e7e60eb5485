//! Connections between sidecars: TLS 1.3 with mutual certificates (or, when the operator
//! chose `--insecure-psk`, the shared-key handshake in plain TCP), the version exchange,
//! and data connections bound to their migration with a fresh challenge.
//!
//! Every handshake must finish within [`HANDSHAKE_DEADLINE`] as a whole, however slowly
//! its bytes trickle in.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ferry_engine::session::{FailureKind, SessionId};
use ferry_proto::auth::{
    self, data_proof, random, verify_data_proof, Key, SessionKey, HANDSHAKE_CAP,
};
use ferry_proto::frame::{read_msg, write_msg};
use ferry_proto::net::{
    deadline_error, force_send_buffer, tune_peer_socket, Deadline, Timeouts, DEAD_PEER_AFTER,
};
use ferry_proto::peer::{unexpected, PeerMsg};
use ferry_proto::{check_version, ProtoError, VERSION};

use ferry_tls::{Tls, TlsStream};

/// Longest a whole handshake (TLS, version, authentication, data binding) may take.
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);

/// How long connecting to a peer may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Link rate assumed for a path whose interface does not say its speed.
const ASSUMED_LINK_BPS: u64 = 10_000_000_000;

/// The send buffer each of `streams` data connections needs on the path of `ctl` (its
/// measured round trip, the speed of the local interface it leaves by), when autotuning
/// cannot grow that far; `None` leaves autotuning on.
pub fn data_send_buffer(ctl: &TcpStream, streams: u16) -> Option<usize> {
    let rtt = ferry_proto::net::rtt(ctl)?;
    let link = ctl
        .local_addr()
        .ok()
        .and_then(|a| crate::placement::interface_of(a.ip()))
        .and_then(|dev| std::fs::read_to_string(format!("/sys/class/net/{dev}/speed")).ok())
        .and_then(|s| s.trim().parse::<u64>().ok())
        .filter(|&mbps| mbps > 0 && mbps < 10_000_000)
        .map_or(ASSUMED_LINK_BPS, |mbps| mbps * 1_000_000);
    let b = ferry_proto::net::bdp_send_buffer(
        link,
        rtt,
        streams,
        ferry_proto::net::autotuned_send_max(),
    );
    tracing::info!(
        ?rtt,
        link_gbps = link as f64 / 1e9,
        streams,
        send_buffer = ?b,
        "data connections sized for the bandwidth-delay product (None: autotuning covers it)"
    );
    b
}

/// Label of the TLS exporter that keys a control connection's session.
const EXPORTER_LABEL: &[u8] = b"EXPERIMENTAL ferry session key";

/// How this daemon authenticates peers.
#[derive(Clone)]
pub enum PeerAuth {
    /// Mutual TLS 1.3 against the fleet CA.
    Tls(Tls),
    /// `--insecure-psk`: HMAC challenge-response over a shared key; nothing encrypted.
    Psk(Key),
}

impl PeerAuth {
    /// Whether the wire is encrypted.
    pub fn encrypted(&self) -> bool {
        matches!(self, PeerAuth::Tls(_))
    }
}

/// A connection to a peer: TLS, or plain TCP in `--insecure-psk` mode.
pub enum PeerStream {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS 1.3.
    Tls(Box<TlsStream>),
}

impl PeerStream {
    /// The socket underneath.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            PeerStream::Plain(s) => s,
            PeerStream::Tls(t) => t.tcp(),
        }
    }
}

impl PeerStream {
    /// The connection as a data channel of the TCP transport.
    ///
    /// # Errors
    ///
    /// The socket cannot be duplicated (out of descriptors).
    pub fn into_channel(self) -> std::io::Result<ferry_tcp_fallback::Channel> {
        Ok(match self {
            PeerStream::Plain(s) => ferry_tcp_fallback::Channel::Plain(s),
            PeerStream::Tls(t) => ferry_tcp_fallback::Channel::Secure {
                tcp: t.tcp().try_clone()?,
                stream: t,
            },
        })
    }
}

impl Read for PeerStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            PeerStream::Plain(s) => s.read(buf),
            PeerStream::Tls(t) => t.read(buf),
        }
    }
}

impl Write for PeerStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            PeerStream::Plain(s) => s.write(buf),
            PeerStream::Tls(t) => t.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            PeerStream::Plain(s) => s.flush(),
            PeerStream::Tls(t) => t.flush(),
        }
    }
}

impl Timeouts for PeerStream {
    fn set_timeouts(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.tcp().set_timeouts(t)
    }
}

/// An authenticated control connection and the key its data connections prove.
pub struct Control {
    /// The connection.
    pub stream: PeerStream,
    /// The session key both ends derived.
    pub key: SessionKey,
}

/// How a failed peer exchange counts for the session: the peer gone, or saying no.
pub fn failure_kind(e: &anyhow::Error) -> FailureKind {
    match e.downcast_ref::<ProtoError>() {
        Some(p) if p.is_disconnect() => FailureKind::PeerLost,
        Some(_) => FailureKind::PeerRefused,
        None if e.downcast_ref::<std::io::Error>().is_some() => FailureKind::PeerLost,
        None => FailureKind::PeerRefused,
    }
}

fn resolve(to: &str) -> anyhow::Result<std::net::SocketAddr> {
    to.to_socket_addrs()
        .with_context(|| format!("resolving {to}"))?
        .next()
        .with_context(|| format!("{to} resolves to no address"))
}

/// The host part of `host:port` (brackets of an IPv6 literal removed).
fn host_of(to: &str) -> &str {
    let host = to.rsplit_once(':').map_or(to, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

fn tcp_to(to: &str) -> anyhow::Result<TcpStream> {
    let addr = resolve(to)?;
    let s = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
        .with_context(|| format!("connecting to {addr}"))?;
    tune_peer_socket(&s, DEAD_PEER_AFTER)?;
    Ok(s)
}

/// Runs `f` on `s` under the handshake deadline, mapping a passed deadline to
/// [`ProtoError::Deadline`].
fn by_deadline<S: Timeouts + Read + Write, T>(
    s: &mut S,
    end: Instant,
    what: &'static str,
    f: impl FnOnce(&mut Deadline<'_, S>) -> Result<T, ProtoError>,
) -> Result<T, ProtoError> {
    let mut d = Deadline::new(s, end);
    let r = f(&mut d);
    let expired = d.expired();
    r.map_err(|e| deadline_error(e, expired, what, HANDSHAKE_DEADLINE.as_secs()))
}

fn secure(auth: &PeerAuth, tcp: TcpStream, to: &str, end: Instant) -> anyhow::Result<PeerStream> {
    Ok(match auth {
        PeerAuth::Tls(tls) => PeerStream::Tls(Box::new(
            tls.connect(tcp, host_of(to), end)
                .with_context(|| format!("TLS handshake with {to}"))?,
        )),
        PeerAuth::Psk(_) => PeerStream::Plain(tcp),
    })
}

/// Connects to a peer's control port and authenticates both ways.
///
/// # Errors
///
/// Connection, TLS, version and authentication failures, with the peer's reason.
pub fn connect_control(auth: &PeerAuth, to: &str) -> anyhow::Result<Control> {
    let end = Instant::now() + HANDSHAKE_DEADLINE;
    let mut stream = secure(auth, tcp_to(to)?, to, end)?;
    let key = by_deadline(&mut stream, end, "the peer handshake", |s| match auth {
        PeerAuth::Tls(_) => {
            write_msg(s, &PeerMsg::Hello { version: VERSION })?;
            match read_msg(s, HANDSHAKE_CAP)? {
                PeerMsg::Welcome { version } => check_version(version),
                other => Err(unexpected("Welcome", other)),
            }?;
            Ok([0u8; 32])
        }
        PeerAuth::Psk(key) => auth::connect(s, key),
    })
    .context("authenticating to the destination")?;
    let key = match &stream {
        PeerStream::Tls(t) => t.exporter(EXPORTER_LABEL)?,
        PeerStream::Plain(_) => key,
    };
    stream.tcp().set_timeouts(None)?;
    Ok(Control { stream, key })
}

/// Opens data connection `channel` of `session` and proves it belongs there.
///
/// # Errors
///
/// Connection, TLS and binding failures.
pub fn connect_data(
    auth: &PeerAuth,
    to: &str,
    session: SessionId,
    key: &SessionKey,
    channel: u16,
    send_buffer: Option<usize>,
) -> anyhow::Result<PeerStream> {
    let end = Instant::now() + HANDSHAKE_DEADLINE;
    let tcp = tcp_to(to)?;
    if let Some(b) = send_buffer {
        // Before any data: the buffer is there from the first window on.
        if let Err(e) = force_send_buffer(&tcp, b) {
            tracing::warn!("sizing a data connection's send buffer: {e}");
        }
    }
    let mut stream = secure(auth, tcp, to, end)?;
    by_deadline(&mut stream, end, "a data connection's handshake", |s| {
        write_msg(s, &PeerMsg::DataHello { session, channel })?;
        let nonce = match read_msg(s, HANDSHAKE_CAP)? {
            PeerMsg::DataChallenge { nonce } => nonce,
            other => return Err(unexpected("DataChallenge", other)),
        };
        write_msg(
            s,
            &PeerMsg::DataProof {
                proof: data_proof(key, &session, channel, &nonce),
            },
        )?;
        match read_msg(s, HANDSHAKE_CAP)? {
            PeerMsg::DataOk => Ok(()),
            other => Err(unexpected("DataOk", other)),
        }
    })
    .with_context(|| format!("binding data connection {channel}"))?;
    stream.tcp().set_timeouts(None)?;
    Ok(stream)
}

/// What an accepted connection turned out to be.
pub enum Accepted {
    /// An authenticated control connection, with its first request.
    Control(Control, PeerMsg),
    /// A data connection bound to a migration waiting for it.
    Data {
        /// The migration.
        session: SessionId,
        /// Channel index.
        channel: u16,
        /// The connection.
        stream: PeerStream,
    },
}

/// Tells the peer why (best effort) and returns the same reason as an error.
pub fn refuse(s: &mut impl Write, reason: String) -> anyhow::Error {
    let _ = write_msg(
        s,
        &PeerMsg::Refused {
            reason: reason.clone(),
        },
    );
    anyhow::anyhow!(reason)
}

/// Runs the listening side of a handshake on an accepted connection. `data_key` gives
/// the key of a migration waiting for data connections.
///
/// # Errors
///
/// Anything the peer did wrong (it was told why) or a passed deadline.
pub fn accept(
    auth: &PeerAuth,
    tcp: TcpStream,
    data_key: impl Fn(SessionId) -> Option<SessionKey>,
) -> anyhow::Result<Accepted> {
    let end = Instant::now() + HANDSHAKE_DEADLINE;
    tune_peer_socket(&tcp, DEAD_PEER_AFTER)?;
    let tls_hello = {
        let mut b = [0u8; 1];
        tcp.set_read_timeout(Some(HANDSHAKE_DEADLINE))?;
        tcp.peek(&mut b)
            .context("waiting for the peer's first byte")?
            == 1
            && b[0] == 0x16
    };
    let mut stream = match (auth, tls_hello) {
        (PeerAuth::Tls(tls), true) => PeerStream::Tls(Box::new(
            tls.accept(tcp, end).context("TLS handshake with a peer")?,
        )),
        (PeerAuth::Tls(_), false) => {
            let mut tcp = tcp;
            return Err(refuse(
                &mut tcp,
                "this sidecar requires TLS (it has certificates); the peer speaks plain Ferry (--insecure-psk?)".into(),
            ));
        }
        (PeerAuth::Psk(_), true) => {
            // A TLS client cannot read our frame; say it in the log at least.
            bail!("a peer started a TLS handshake, but this sidecar runs with --insecure-psk")
        }
        (PeerAuth::Psk(_), false) => PeerStream::Plain(tcp),
    };
    let first = by_deadline(&mut stream, end, "the peer handshake", |s| {
        read_msg::<PeerMsg, _>(s, HANDSHAKE_CAP)
    });
    let first = match first {
        Ok(m) => m,
        Err(e @ ProtoError::Closed) => return Err(e.into()),
        Err(e) => return Err(refuse(&mut stream, e.to_string())),
    };
    match (first, auth) {
        (PeerMsg::DataHello { session, channel }, _) => {
            // An unknown session gets a challenge too (against a key nobody has): whether a
            // session exists is not told to a peer that cannot prove it belongs to it.
            let key = match data_key(session) {
                Some(k) => k,
                None => random()?,
            };
            let nonce: [u8; 32] = random()?;
            let proof = by_deadline(&mut stream, end, "a data connection's handshake", |s| {
                write_msg(s, &PeerMsg::DataChallenge { nonce })?;
                match read_msg(s, HANDSHAKE_CAP)? {
                    PeerMsg::DataProof { proof } => Ok(proof),
                    other => Err(unexpected("DataProof", other)),
                }
            })?;
            if !verify_data_proof(&key, &session, channel, &nonce, &proof) {
                return Err(refuse(
                    &mut stream,
                    "data connection proof does not match".into(),
                ));
            }
            write_msg(&mut stream, &PeerMsg::DataOk)?;
            stream.tcp().set_timeouts(None)?;
            Ok(Accepted::Data {
                session,
                channel,
                stream,
            })
        }
        (PeerMsg::Hello { version }, PeerAuth::Tls(_)) => {
            if let Err(e) = check_version(version) {
                return Err(refuse(&mut stream, e.to_string()));
            }
            write_msg(&mut stream, &PeerMsg::Welcome { version: VERSION })?;
            let key = match &stream {
                PeerStream::Tls(t) => t.exporter(EXPORTER_LABEL)?,
                PeerStream::Plain(_) => bail!("TLS mode without TLS"),
            };
            control_request(stream, key, end)
        }
        (PeerMsg::PskHello { version, nonce }, PeerAuth::Psk(k)) => {
            let key = by_deadline(&mut stream, end, "the peer handshake", |s| {
                auth::accept_after_hello(s, k, version, nonce)
            })?;
            control_request(stream, key, end)
        }
        (other, auth) => {
            let expected = match auth {
                PeerAuth::Tls(_) => "Hello or DataHello (this sidecar uses TLS)",
                PeerAuth::Psk(_) => "PskHello or DataHello (this sidecar uses --insecure-psk)",
            };
            Err(refuse(
                &mut stream,
                format!(
                    "expected {expected}, got {}",
                    ferry_proto::common::Message::name(&other)
                ),
            ))
        }
    }
}

fn control_request(
    mut stream: PeerStream,
    key: SessionKey,
    end: Instant,
) -> anyhow::Result<Accepted> {
    let first = by_deadline(&mut stream, end, "the peer's request", |s| {
        read_msg::<PeerMsg, _>(s, ferry_proto::common::MAX_FRAME)
    })?;
    stream.tcp().set_timeouts(None)?;
    Ok(Accepted::Control(Control { stream, key }, first))
}

#[cfg(test)]
mod tests {
    use super::host_of;

    #[test]
    fn host_part_of_addresses() {
        assert_eq!(host_of("10.0.0.2:7780"), "10.0.0.2");
        assert_eq!(host_of("[::1]:7780"), "::1");
        assert_eq!(host_of("dest.example:1"), "dest.example");
    }
}
