//! The `ferry cert` helpers: [`make_ca`] makes a fleet CA, [`make_host`] a host certificate
//! signed by it, and the file helpers they share (private modes, no overwriting, no half-written
//! leftovers).

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData,
};
use rustls::server::ParsedCertificate;
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, UnixTime};

use crate::{ca_verifier, check_private_mode, TlsError};

/// File name of the CA certificate written by [`make_ca`] and read by [`make_host`].
pub(crate) const CA_CERT_FILE: &str = "ca.pem";
/// File name of the CA private key written by [`make_ca`] and read by [`make_host`].
pub(crate) const CA_KEY_FILE: &str = "ca-key.pem";
/// Validity of a CA certificate made by [`make_ca`].
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Validity of a host certificate made by [`make_host`].
const HOST_VALIDITY: Duration = Duration::from_secs(2 * 365 * 24 * 3600);
/// How far back `notBefore` is set, so hosts whose clocks lag a little accept a fresh certificate.
const BACKDATE: Duration = Duration::from_secs(3600);

/// `ferry cert ca --out DIR`: writes DIR/ca.pem and DIR/ca-key.pem (mode 0600, created new:
/// refuse to overwrite existing files) for a self-signed CA named `name` (valid 10 years, key
/// usage cert signing). Creates DIR (mode 0700) if missing.
pub fn make_ca(dir: &Path, name: &str) -> Result<(), TlsError> {
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    refuse_existing(&[&cert_path, &key_path])?;

    let key = KeyPair::generate().map_err(|source| TlsError::Generate {
        what: "CA key".to_owned(),
        source,
    })?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, DnValue::Utf8String(name.to_owned()));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    set_validity(&mut params, CA_VALIDITY);
    let cert = params
        .self_signed(&key)
        .map_err(|source| TlsError::Generate {
            what: format!("CA certificate for {name:?}"),
            source,
        })?;

    create_dir(dir)?;
    write_new_files(&[
        (&cert_path, cert.pem().as_bytes()),
        (&key_path, key.serialize_pem().as_bytes()),
    ])
}

/// `ferry cert host --ca DIR --name NAME --san ... --out OUT`: a host certificate signed by the CA
/// in `ca_dir`, with CN `name` and subject alternative names `sans` (each parsed as an IP address
/// when it parses, else a DNS name; `name` itself is always added as a SAN too), usable both as
/// TLS server and client (extended key usages serverAuth + clientAuth), valid 2 years; writes
/// OUT/NAME.pem (the host certificate) and OUT/NAME-key.pem, mode 0600, refusing to overwrite;
/// creates OUT (mode 0700) if missing. Copies nothing else.
///
/// The CA is read with rcgen's certificate parser. Its key file must have mode 0600 (or
/// stricter) and hold the key of the CA certificate, and the new certificate must verify under
/// the CA before anything is written.
pub fn make_host(
    ca_dir: &Path,
    out_dir: &Path,
    name: &str,
    sans: &[String],
) -> Result<(), TlsError> {
    if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\0']) {
        return Err(TlsError::HostName {
            name: name.to_owned(),
        });
    }
    let cert_path = out_dir.join(format!("{name}.pem"));
    let key_path = out_dir.join(format!("{name}-key.pem"));
    refuse_existing(&[&cert_path, &key_path])?;

    let ca = load_issuer(ca_dir)?;

    let mut all_sans: Vec<String> = Vec::with_capacity(sans.len() + 1);
    for san in sans.iter().map(String::as_str).chain([name]) {
        if !all_sans.iter().any(|s| s == san) {
            all_sans.push(san.to_owned());
        }
    }
    let gen_err = |source| TlsError::Generate {
        what: format!("host certificate for {name:?}"),
        source,
    };
    let mut params = CertificateParams::new(all_sans).map_err(gen_err)?;
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, DnValue::Utf8String(name.to_owned()));
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, HOST_VALIDITY);

    let key = KeyPair::generate().map_err(|source| TlsError::Generate {
        what: format!("key for host {name:?}"),
        source,
    })?;
    let cert = params.signed_by(&key, &ca.issuer).map_err(gen_err)?;

    // rcgen writes the issuer name from the CA subject it parsed: the new certificate must chain
    // to the CA byte for byte (and be within its name constraints), or no peer would accept it.
    let (_, verifier) = ca_verifier(&ca.cert_path, vec![ca.cert])?;
    verifier
        .verify_client_cert(cert.der(), &[], UnixTime::now())
        .map_err(|e| TlsError::CaCertificateFormat {
            path: ca.cert_path,
            reason: format!("a certificate it issues does not verify under it ({e})"),
        })?;

    create_dir(out_dir)?;
    write_new_files(&[
        (&cert_path, cert.pem().as_bytes()),
        (&key_path, key.serialize_pem().as_bytes()),
    ])
}

/// The CA as loaded by [`make_host`].
struct LoadedCa {
    /// Subject name, key identifier and key usages as rcgen parsed them, with the CA key.
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate.
    cert: CertificateDer<'static>,
    /// Where it was read from.
    cert_path: PathBuf,
}

/// Reads `ca_dir/ca.pem` and `ca_dir/ca-key.pem` (which must be private) and checks that the key
/// belongs to the certificate.
fn load_issuer(ca_dir: &Path) -> Result<LoadedCa, TlsError> {
    let cert_path = ca_dir.join(CA_CERT_FILE);
    let key_path = ca_dir.join(CA_KEY_FILE);
    check_private_mode(&key_path)?;

    let read = |path: &Path| {
        fs::read_to_string(path).map_err(|source| TlsError::ReadFile {
            path: path.to_owned(),
            source,
        })
    };
    let cert_pem = read(&cert_path)?;
    let key = KeyPair::from_pem(&read(&key_path)?).map_err(|source| TlsError::CaKey {
        path: key_path.clone(),
        source,
    })?;
    let ca_cert = CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| match e {
        pem::Error::NoItemsFound => TlsError::NoCertificate {
            path: cert_path.clone(),
        },
        source => TlsError::ReadPem {
            path: cert_path.clone(),
            source,
        },
    })?;
    let format_err = |what: &str, e: &dyn std::fmt::Display| TlsError::CaCertificateFormat {
        path: cert_path.clone(),
        reason: format!("{what} ({e})"),
    };

    let parsed = ParsedCertificate::try_from(&ca_cert)
        .map_err(|e| format_err("it is not a valid X.509 certificate", &e))?;
    if parsed.subject_public_key_info().as_ref() != key.subject_public_key_info() {
        return Err(TlsError::CaKeyMismatch {
            cert: cert_path,
            key: key_path,
        });
    }
    let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)
        .map_err(|e| format_err("rcgen cannot read it", &e))?;
    Ok(LoadedCa {
        issuer,
        cert: ca_cert,
        cert_path,
    })
}

/// Creates `dir` (mode 0700, parents as needed) unless it exists.
fn create_dir(dir: &Path) -> Result<(), TlsError> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| TlsError::CreateDir {
            path: dir.to_owned(),
            source,
        })
}

/// Fails with [`TlsError::Exists`] for the first of `paths` that exists (early, clear error
/// before generating keys; [`write_new_files`] still refuses atomically).
fn refuse_existing(paths: &[&Path]) -> Result<(), TlsError> {
    match paths.iter().find(|p| p.symlink_metadata().is_ok()) {
        Some(p) => Err(TlsError::Exists {
            path: p.to_path_buf(),
        }),
        None => Ok(()),
    }
}

/// Creates each file new with mode 0600 and writes it; on any failure removes the files this call
/// created and fails.
pub(crate) fn write_new_files(files: &[(&Path, &[u8])]) -> Result<(), TlsError> {
    let mut created: Vec<(&Path, File)> = Vec::with_capacity(files.len());
    let cleanup = |created: &[(&Path, File)]| {
        for (path, _) in created {
            let _ = fs::remove_file(path);
        }
    };
    for (path, _) in files {
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
        {
            Ok(file) => created.push((path, file)),
            Err(source) => {
                cleanup(&created);
                return Err(if source.kind() == io::ErrorKind::AlreadyExists {
                    TlsError::Exists {
                        path: path.to_path_buf(),
                    }
                } else {
                    TlsError::WriteFile {
                        path: path.to_path_buf(),
                        source,
                    }
                });
            }
        }
    }
    for ((path, file), (_, data)) in created.iter_mut().zip(files) {
        if let Err(source) = file.write_all(data).and_then(|()| file.sync_all()) {
            let path = path.to_path_buf();
            cleanup(&created);
            return Err(TlsError::WriteFile { path, source });
        }
    }
    Ok(())
}

/// Sets `params` valid from [`BACKDATE`] ago until `valid` from now.
fn set_validity(params: &mut CertificateParams, valid: Duration) {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    // rcgen does not re-export its date type; build "now" from the epoch it can make.
    let now = rcgen::date_time_ymd(1970, 1, 1) + since_epoch;
    params.not_before = now - BACKDATE;
    params.not_after = now + valid;
}
