//! [`TlsError`], everything that can fail in this crate, and [`Role`], the side of a handshake.

use std::fmt;
use std::io;
use std::path::PathBuf;

use rustls::server::VerifierBuilderError;
use rustls_pki_types::InvalidDnsNameError;

#[cfg(doc)]
use crate::{make_ca, make_host, Tls};

/// Which side of a handshake failed, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// This host connected (TLS client).
    Client,
    /// This host accepted (TLS server).
    Server,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Client => "client",
            Role::Server => "server",
        })
    }
}

/// Everything that can fail in this crate, one variant per failing operation.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Reading a file's metadata (to check its mode) failed.
    #[error("Cannot read the metadata of TLS file {}", path.display())]
    Stat {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A TLS file grants access to group or others.
    #[error(
        "TLS file {} has mode {mode:04o}, which grants access to group or others: run `chmod 600 {}`",
        path.display(),
        path.display()
    )]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Reading PEM items (certificates or a private key) from a file failed.
    #[error("Cannot read PEM from {}", path.display())]
    ReadPem {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    /// A certificate file holds no certificate.
    #[error("No certificate found in {}", path.display())]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// The CA certificate could not be added to the trust store.
    #[error("CA certificate in {} is not usable", path.display())]
    CaCertificate {
        /// The CA certificate file.
        path: PathBuf,
        /// Why.
        #[source]
        source: rustls::Error,
    },
    /// The client-certificate verifier could not be built from the CA.
    #[error("Cannot build a client-certificate verifier from the CA in {}", path.display())]
    Verifier {
        /// The CA certificate file.
        path: PathBuf,
        /// Why.
        #[source]
        source: VerifierBuilderError,
    },
    /// This host's certificate does not chain to the CA (or is not valid for client auth).
    #[error(
        "Host certificate {} is not valid under the CA in {} (expired, signed by another CA, or without clientAuth)",
        cert.display(),
        ca.display()
    )]
    NotFromCa {
        /// The host certificate file.
        cert: PathBuf,
        /// The CA certificate file.
        ca: PathBuf,
        /// Why.
        #[source]
        source: rustls::Error,
    },
    /// Building the client or server configuration from the certificate and key failed.
    #[error("Cannot use certificate {} with key {}", cert.display(), key.display())]
    Config {
        /// The host certificate file.
        cert: PathBuf,
        /// The private key file.
        key: PathBuf,
        /// Why.
        #[source]
        source: rustls::Error,
    },
    /// The server name given to [`Tls::connect`] is neither an IP address nor a DNS name.
    #[error("Invalid TLS server name {name:?}")]
    ServerName {
        /// The name as given.
        name: String,
        /// Why.
        #[source]
        source: InvalidDnsNameError,
    },
    /// Creating the rustls connection state failed.
    #[error("Cannot start a TLS {role} connection with {peer}")]
    NewConnection {
        /// Our side.
        role: Role,
        /// The peer's address.
        peer: String,
        /// Why.
        #[source]
        source: rustls::Error,
    },
    /// Setting the socket's timeouts failed.
    #[error("Cannot set the socket timeouts of the connection with {peer}")]
    SetTimeout {
        /// The peer's address.
        peer: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The handshake did not finish before its deadline.
    #[error("TLS {role} handshake with {peer} did not finish before its deadline")]
    Timeout {
        /// Our side.
        role: Role,
        /// The peer's address.
        peer: String,
    },
    /// The peer closed the connection during the handshake.
    #[error("Peer {peer} closed the connection during the TLS {role} handshake")]
    Closed {
        /// Our side.
        role: Role,
        /// The peer's address.
        peer: String,
    },
    /// Reading or writing the socket failed during the handshake.
    #[error("Socket error during the TLS {role} handshake with {peer}")]
    HandshakeIo {
        /// Our side.
        role: Role,
        /// The peer's address.
        peer: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The TLS handshake failed (bad certificate, wrong name, protocol error, alert from the peer).
    #[error("TLS {role} handshake with {peer} failed")]
    Handshake {
        /// Our side.
        role: Role,
        /// The peer's address.
        peer: String,
        /// Why.
        #[source]
        source: rustls::Error,
    },
    /// Exporting keying material failed.
    #[error("Cannot export keying material from the TLS connection")]
    Exporter {
        /// Why.
        #[source]
        source: rustls::Error,
    },
    /// A host name for [`make_host`] cannot be used as a file name.
    #[error("Invalid host name {name:?}: it must be non-empty and contain no '/' or NUL")]
    HostName {
        /// The name as given.
        name: String,
    },
    /// Generating a key or certificate failed.
    #[error("Cannot generate the {what}")]
    Generate {
        /// What was being generated.
        what: String,
        /// Why.
        #[source]
        source: rcgen::Error,
    },
    /// Reading a file failed.
    #[error("Cannot read {}", path.display())]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The CA private key could not be parsed.
    #[error("Cannot parse the CA private key in {}", path.display())]
    CaKey {
        /// The key file.
        path: PathBuf,
        /// Why.
        #[source]
        source: rcgen::Error,
    },
    /// The CA certificate could not be parsed, or a certificate it issues does not verify under it
    /// (its subject name cannot be reproduced exactly, its name constraints exclude the host, ...).
    #[error("Cannot use the CA certificate in {} to issue certificates: {reason}", path.display())]
    CaCertificateFormat {
        /// The CA certificate file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The CA private key does not belong to the CA certificate.
    #[error("CA key {} does not belong to CA certificate {}", key.display(), cert.display())]
    CaKeyMismatch {
        /// The CA certificate file.
        cert: PathBuf,
        /// The CA key file.
        key: PathBuf,
    },
    /// Creating an output directory failed.
    #[error("Cannot create directory {}", path.display())]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// An output file already exists.
    #[error("Refusing to overwrite existing file {}", path.display())]
    Exists {
        /// The file.
        path: PathBuf,
    },
    /// Creating or writing an output file failed.
    #[error("Cannot write {}", path.display())]
    WriteFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}
