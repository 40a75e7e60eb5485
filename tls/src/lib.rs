//! Mutual TLS 1.3 for Ferry's peer connections (rustls with the `ring` provider), and the
//! `ferry cert` helpers [`make_ca`] and [`make_host`] that make a fleet CA and host certificates
//! for it.
//!
//! # How a migration uses it
//!
//! Every sidecar holds one identity ([`TlsFiles`]: the fleet CA certificate, its own host
//! certificate and key), loaded once at start-up with [`Tls::load`]. Both ends of every peer
//! connection authenticate each other: the server (destination) only accepts clients whose
//! certificate chains to the fleet CA, and the client (source) only talks to a server whose
//! certificate chains to the same CA *and* names the host the operator gave (`--to host:port`).
//! Only TLS 1.3 is offered or accepted; session resumption is off, so every connection runs a
//! full handshake with certificates.
//!
//! - **Control connection.** The source connects ([`Tls::connect`], with the host part of
//!   `host:port` as the server name), the destination accepts ([`Tls::accept`]). A finished
//!   handshake means the peer is a member of the fleet (and, for the source, the host it asked
//!   for); the crate does not report the peer certificate's name, so logs name the peer by its
//!   address (`TlsStream::tcp().peer_addr()`).
//! - **Data connections.** Each data connection is its own TLS connection, authenticated the same
//!   way. To bind it to the migration's control connection, both sides compute
//!   [`TlsStream::exporter`] on the *control* connection (same label at both ends): the 32 bytes
//!   are equal at both ends and known to nobody else. On each data connection the destination
//!   sends a fresh random challenge and the source answers with an HMAC keyed by the control
//!   value over the session, the channel and that challenge (so a proof cannot be replayed on
//!   another connection); the destination recomputes it and drops a data connection that does
//!   not belong to a session it runs (the sidecar's `peer` module).
//!
//! Handshakes are bounded by a deadline: the socket's read and write timeouts are set to the time
//! left before each blocking step, and a handshake still unfinished at the deadline fails with
//! [`TlsError::Timeout`], so a silent or slow peer cannot hold a thread. After the handshake
//! both timeouts are cleared (blocking, no timeout) and the caller sets its own on
//! [`TlsStream::tcp`].
//!
//! # Threads
//!
//! [`Tls`] is cheap to clone (two `Arc`s) and `Send + Sync`: share it between the accept loop and
//! the workers. A [`TlsStream`] is `Send` but holds one rustls state machine, so it is used by one
//! thread at a time (it cannot be split into independent read and write halves); give each data
//! connection its own worker thread.
//!
//! # Cleanup
//!
//! Dropping a [`TlsStream`] closes its socket. No `close_notify` alert is sent, so a peer reading
//! past the last frame gets an `UnexpectedEof` error rather than a clean end of stream: Ferry's
//! framed protocol ends each conversation with an explicit message, so a truncated stream is
//! always detected. Call `flush` before dropping to push the last TLS records out. A failed
//! handshake drops the socket (after a best-effort alert to the peer within the deadline).
//! [`make_ca`] and [`make_host`] create their files new (mode 0600) and remove the files they
//! created when a later step fails, so a failed run leaves nothing half-written behind.

use std::fs;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::client::Resumption;
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{
    ClientConfig, ClientConnection, Connection, RootCertStore, ServerConfig, ServerConnection,
    StreamOwned,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

mod certs;
mod error;
#[cfg(test)]
mod tests;

pub use certs::{make_ca, make_host};
pub use error::{Role, TlsError};

/// Paths of this host's TLS identity: the fleet CA certificate, this host's certificate (chain)
/// and its private key (PEM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The fleet CA certificate (PEM); peers must present a certificate chaining to it.
    pub ca: PathBuf,
    /// This host's certificate, optionally followed by intermediates (PEM).
    pub cert: PathBuf,
    /// This host's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// Client and server configurations built once from [`TlsFiles`]; cheap to clone (Arc inside).
#[derive(Clone, Debug)]
pub struct Tls {
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
}

impl Tls {
    /// Loads and checks the files. Refuses ([`TlsError::Permissions`]) any of the three files
    /// whose mode grants any access to group or others, naming the file and its mode and saying
    /// `chmod 600`. Both sides require TLS 1.3 only, and both sides require the peer to present a
    /// certificate chaining to the CA (mutual authentication): the server uses a
    /// `WebPkiClientVerifier` over a root store holding only the CA; the client verifies the
    /// server against the same CA.
    ///
    /// Also checks that this host's certificate is currently valid under the CA for client
    /// authentication and matches its key, so a wrong file fails here rather than at every peer.
    pub fn load(files: &TlsFiles) -> Result<Tls, TlsError> {
        for path in [&files.ca, &files.cert, &files.key] {
            check_private_mode(path)?;
        }
        let (roots, verifier) = ca_verifier(&files.ca, read_certs(&files.ca)?)?;
        let chain = read_certs(&files.cert)?;
        let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|source| TlsError::ReadPem {
            path: files.key.clone(),
            source,
        })?;
        if let Some((end_entity, intermediates)) = chain.split_first() {
            verifier
                .verify_client_cert(end_entity, intermediates, UnixTime::now())
                .map_err(|source| TlsError::NotFromCa {
                    cert: files.cert.clone(),
                    ca: files.ca.clone(),
                    source,
                })?;
        }

        let config_err = |source| TlsError::Config {
            cert: files.cert.clone(),
            key: files.key.clone(),
            source,
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(config_err)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(config_err)?;
        // Every connection runs a full handshake with certificates: no tickets, no session cache.
        server.session_storage = Arc::new(NoServerSessionStorage {});
        server.send_tls13_tickets = 0;

        let mut client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(config_err)?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(config_err)?;
        client.resumption = Resumption::disabled();

        Ok(Tls {
            client: Arc::new(client),
            server: Arc::new(server),
        })
    }

    /// Client handshake over a connected TCP stream, verifying the server's certificate for
    /// `server_name` (an IP address or DNS name: the host part of the `host:port` the operator
    /// gave; an IPv6 address may keep its brackets). The whole handshake must finish before
    /// `deadline` (the socket's read/write timeouts are set to the time left before each
    /// blocking step; fails with [`TlsError::Timeout`] when it passes). Returns once the
    /// handshake is complete.
    ///
    /// In TLS 1.3 the client finishes before the server has checked the client's certificate: a
    /// server that refuses this host's certificate is seen as an error on the first read.
    pub fn connect(
        &self,
        tcp: TcpStream,
        server_name: &str,
        deadline: Instant,
    ) -> Result<TlsStream, TlsError> {
        let host = server_name
            .strip_prefix('[')
            .and_then(|s| s.strip_suffix(']'))
            .unwrap_or(server_name);
        let name =
            ServerName::try_from(host.to_owned()).map_err(|source| TlsError::ServerName {
                name: server_name.to_owned(),
                source,
            })?;
        let conn = ClientConnection::new(self.client.clone(), name).map_err(|source| {
            TlsError::NewConnection {
                role: Role::Client,
                peer: peer_label(&tcp),
                source,
            }
        })?;
        handshake(Connection::Client(conn), tcp, deadline)
    }

    /// Server handshake over an accepted TCP stream, same deadline rule as [`Tls::connect`].
    pub fn accept(&self, tcp: TcpStream, deadline: Instant) -> Result<TlsStream, TlsError> {
        let conn = ServerConnection::new(self.server.clone()).map_err(|source| {
            TlsError::NewConnection {
                role: Role::Server,
                peer: peer_label(&tcp),
                source,
            }
        })?;
        handshake(Connection::Server(conn), tcp, deadline)
    }
}

/// An established TLS 1.3 connection (client or server side). Implements [`std::io::Read`] and
/// [`std::io::Write`] (`Write::flush` pushes all buffered TLS records to the socket). After the
/// handshake the socket has no timeouts; the caller sets its own on [`TlsStream::tcp`].
#[derive(Debug)]
pub struct TlsStream {
    inner: Inner,
}

/// The two sides, each with rustls' own blocking read/write driver.
#[derive(Debug)]
enum Inner {
    Client(Box<StreamOwned<ClientConnection, TcpStream>>),
    Server(Box<StreamOwned<ServerConnection, TcpStream>>),
}

/// Evaluates `$body` with `$s` bound to the stream of either side of `$inner`.
macro_rules! either {
    ($inner:expr, $s:ident => $body:expr) => {
        match $inner {
            Inner::Client($s) => $body,
            Inner::Server($s) => $body,
        }
    };
}

impl TlsStream {
    /// The underlying socket (for timeouts, shutdown, peer_addr).
    pub fn tcp(&self) -> &TcpStream {
        either!(&self.inner, s => s.get_ref())
    }

    /// 32 bytes of keying material exported from this connection (RFC 8446 exporter, rustls
    /// `export_keying_material`) with the given label and no context: both ends get the same
    /// bytes, nobody else can compute them. Used to bind data connections to the control
    /// connection's session.
    pub fn exporter(&self, label: &[u8]) -> Result<[u8; 32], TlsError> {
        either!(&self.inner, s => s.conn.export_keying_material([0u8; 32], label, None))
            .map_err(|source| TlsError::Exporter { source })
    }
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        either!(&mut self.inner, s => s.read(buf))
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        either!(&mut self.inner, s => s.write(buf))
    }

    fn flush(&mut self) -> io::Result<()> {
        either!(&mut self.inner, s => s.flush())
    }
}

/// Fails if `path`'s mode grants any access to group or others.
fn check_private_mode(path: &Path) -> Result<(), TlsError> {
    let meta = fs::metadata(path).map_err(|source| TlsError::Stat {
        path: path.to_owned(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(TlsError::Permissions {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

/// All certificates in a PEM file; at least one.
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem_err = |source| TlsError::ReadPem {
        path: path.to_owned(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(pem_err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_err)?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// A root store holding only the CA certificates `ca` (read from `path`), and a verifier that
/// accepts client certificates chaining to them.
pub(crate) fn ca_verifier(
    path: &Path,
    ca: Vec<CertificateDer<'static>>,
) -> Result<(Arc<RootCertStore>, Arc<dyn ClientCertVerifier>), TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in ca {
        roots.add(cert).map_err(|source| TlsError::CaCertificate {
            path: path.to_owned(),
            source,
        })?;
    }
    let roots = Arc::new(roots);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider)
        .build()
        .map_err(|source| TlsError::Verifier {
            path: path.to_owned(),
            source,
        })?;
    Ok((roots, verifier))
}

/// The peer's address for messages.
fn peer_label(tcp: &TcpStream) -> String {
    tcp.peer_addr()
        .map_or_else(|_| "an unknown peer".to_owned(), |a| a.to_string())
}

/// Drives a handshake to completion before `deadline`, then wraps the connection.
fn handshake(
    mut conn: Connection,
    mut tcp: TcpStream,
    deadline: Instant,
) -> Result<TlsStream, TlsError> {
    let role = match conn {
        Connection::Client(_) => Role::Client,
        Connection::Server(_) => Role::Server,
    };
    let peer = peer_label(&tcp);
    let timeout = || TlsError::Timeout {
        role,
        peer: peer.clone(),
    };
    let io_err = |source: io::Error| match source.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => timeout(),
        _ => TlsError::HandshakeIo {
            role,
            peer: peer.clone(),
            source,
        },
    };
    let set_timeouts = |tcp: &TcpStream, limit: Option<Duration>| {
        tcp.set_read_timeout(limit)
            .and_then(|()| tcp.set_write_timeout(limit))
            .map_err(|source| TlsError::SetTimeout {
                peer: peer.clone(),
                source,
            })
    };
    // Before each blocking step: both socket timeouts set to the time left before the deadline.
    let arm = |tcp: &TcpStream| match deadline.saturating_duration_since(Instant::now()) {
        left if left.is_zero() => Err(timeout()),
        left => set_timeouts(tcp, Some(left)),
    };

    loop {
        while conn.wants_write() {
            arm(&tcp)?;
            match conn.write_tls(&mut tcp) {
                Ok(0) => return Err(io_err(io::ErrorKind::WriteZero.into())),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_err(e)),
            }
        }
        if !conn.is_handshaking() {
            break;
        }
        arm(&tcp)?;
        match conn.read_tls(&mut tcp) {
            Ok(0) => {
                return Err(TlsError::Closed {
                    role,
                    peer: peer.clone(),
                })
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err(e)),
        }
        if let Err(source) = conn.process_new_packets() {
            // Tell the peer why (the alert rustls queued), without waiting past the deadline.
            while conn.wants_write() && arm(&tcp).is_ok() {
                if !matches!(conn.write_tls(&mut tcp), Ok(n) if n > 0) {
                    break;
                }
            }
            let _ = tcp.shutdown(Shutdown::Both);
            return Err(TlsError::Handshake {
                role,
                peer: peer.clone(),
                source,
            });
        }
    }

    set_timeouts(&tcp, None)?;
    let inner = match conn {
        Connection::Client(c) => Inner::Client(Box::new(StreamOwned::new(c, tcp))),
        Connection::Server(c) => Inner::Server(Box::new(StreamOwned::new(c, tcp))),
    };
    Ok(TlsStream { inner })
}
