//! Tests of [`make_ca`] and [`make_host`]: private modes, no overwriting, the CA checks.

use std::fs;
use std::os::unix::fs::PermissionsExt;

use rcgen::string::{BmpString, PrintableString};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue, GeneralSubtree, IsCa,
    KeyPair, NameConstraints,
};

use super::{sans, TempDir, TestResult};
use crate::certs::{write_new_files, CA_CERT_FILE, CA_KEY_FILE};
use crate::{make_ca, make_host, Tls, TlsError, TlsFiles};

#[test]
fn make_ca_and_make_host_refuse_to_overwrite() -> TestResult {
    let dir = TempDir::new("overwrite")?;
    let ca = dir.path("ca");
    make_ca(&ca, "First CA")?;
    let before = fs::read(ca.join(CA_KEY_FILE))?;
    for file in [CA_CERT_FILE, CA_KEY_FILE] {
        let mode = fs::metadata(ca.join(file))?.permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{file}");
    }
    let err = make_ca(&ca, "Second CA").expect_err("existing CA files must not be replaced");
    assert!(matches!(err, TlsError::Exists { .. }), "{err:?}");
    assert_eq!(fs::read(ca.join(CA_KEY_FILE))?, before);

    // Only one of the two files present still refuses, and leaves it alone.
    fs::remove_file(ca.join(CA_CERT_FILE))?;
    assert!(matches!(
        make_ca(&ca, "Third CA"),
        Err(TlsError::Exists { .. })
    ));
    assert!(!ca.join(CA_CERT_FILE).exists());
    assert_eq!(fs::read(ca.join(CA_KEY_FILE))?, before);

    let dir2 = TempDir::new("overwrite-host")?;
    make_ca(&dir2.path("ca"), "CA")?;
    let hosts = dir2.path("new/hosts");
    make_host(&dir2.path("ca"), &hosts, "h1", &[])?;
    let mode = fs::metadata(hosts.join("h1-key.pem"))?.permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let err = make_host(&dir2.path("ca"), &hosts, "h1", &[])
        .expect_err("existing host files must not be replaced");
    assert!(matches!(err, TlsError::Exists { .. }), "{err:?}");
    assert!(matches!(
        make_host(&dir2.path("ca"), &hosts, "../h2", &[]),
        Err(TlsError::HostName { .. })
    ));
    Ok(())
}

#[test]
fn make_host_refuses_mismatched_ca_key() -> TestResult {
    let dir = TempDir::new("mismatch")?;
    make_ca(&dir.path("a"), "CA A")?;
    make_ca(&dir.path("b"), "CA B")?;
    fs::remove_file(dir.path("a").join(CA_KEY_FILE))?;
    fs::copy(
        dir.path("b").join(CA_KEY_FILE),
        dir.path("a").join(CA_KEY_FILE),
    )?;
    let err = make_host(&dir.path("a"), &dir.path("hosts"), "h", &[])
        .expect_err("a CA key that is not the CA certificate's must be refused");
    assert!(matches!(err, TlsError::CaKeyMismatch { .. }), "{err:?}");
    assert!(!dir.path("hosts").exists());

    // The CA key file must be private too.
    let key_b = dir.path("b").join(CA_KEY_FILE);
    fs::set_permissions(&key_b, fs::Permissions::from_mode(0o640))?;
    let err = make_host(&dir.path("b"), &dir.path("hosts"), "h", &[])
        .expect_err("an open CA key file must be refused");
    assert!(
        matches!(&err, TlsError::Permissions { path, mode: 0o640 } if path == &key_b),
        "{err:?}"
    );
    assert!(!dir.path("hosts").exists());
    Ok(())
}

#[test]
fn issuer_name_round_trips_for_foreign_ca_names() -> TestResult {
    // A CA whose subject uses several attributes and string types still issues certificates
    // whose issuer field is its exact subject.
    let dir = TempDir::new("dn")?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(
        DnType::CountryName,
        DnValue::PrintableString(PrintableString::try_from("DE")?),
    );
    params
        .distinguished_name
        .push(DnType::OrganizationName, "Ferry Ops ü");
    params.distinguished_name.push(
        DnType::CommonName,
        DnValue::BmpString(BmpString::try_from("Root")?),
    );
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let cert = params.self_signed(&key)?;
    write_new_files(&[
        (&dir.path(CA_CERT_FILE), cert.pem().as_bytes()),
        (&dir.path(CA_KEY_FILE), key.serialize_pem().as_bytes()),
    ])?;
    make_host(&dir.0, &dir.path("hosts"), "h", &sans(&["::1"]))?;
    Tls::load(&TlsFiles {
        ca: dir.path(CA_CERT_FILE),
        cert: dir.path("hosts/h.pem"),
        key: dir.path("hosts/h-key.pem"),
    })?;
    Ok(())
}

#[test]
fn make_host_refuses_certificate_that_would_not_verify() -> TestResult {
    // The CA files are fine in themselves, but the CA's name constraints exclude the host's
    // names, so the new certificate would not verify under it: refuse, write nothing.
    let dir = TempDir::new("constrained")?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.name_constraints = Some(NameConstraints {
        permitted_subtrees: vec![GeneralSubtree::DnsName("example.org".to_owned())],
        excluded_subtrees: Vec::new(),
    });
    let cert = params.self_signed(&key)?;
    write_new_files(&[
        (&dir.path(CA_CERT_FILE), cert.pem().as_bytes()),
        (&dir.path(CA_KEY_FILE), key.serialize_pem().as_bytes()),
    ])?;
    let err = make_host(&dir.0, &dir.path("hosts"), "h", &[])
        .expect_err("a certificate that does not verify under its CA must not be written");
    assert!(
        matches!(err, TlsError::CaCertificateFormat { .. }),
        "{err:?}"
    );
    assert!(!dir.path("hosts").exists());
    make_host(&dir.0, &dir.path("hosts"), "h.example.org", &[])?;
    Ok(())
}
