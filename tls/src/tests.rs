//! Tests of loading, the handshake and the exporter over loopback sockets, with certificates made
//! by the helpers in temporary directories (their own tests are in `tests/certs.rs`).

use std::error::Error;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::{self, JoinHandle};

use super::*;
use crate::certs::{write_new_files, CA_CERT_FILE};

mod certs;

type TestResult = Result<(), Box<dyn Error>>;

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> io::Result<TempDir> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "ferry-tls-{}-{tag}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path)?;
        Ok(TempDir(path))
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.0.join(rel)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn sans(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// Identity files of host `name` whose certificates are in `hosts`, trusting the CA in `ca`.
fn files(ca: &Path, hosts: &Path, name: &str) -> TlsFiles {
    TlsFiles {
        ca: ca.join(CA_CERT_FILE),
        cert: hosts.join(format!("{name}.pem")),
        key: hosts.join(format!("{name}-key.pem")),
    }
}

/// A temp dir with a CA in `ca/` and hosts `hosta`, `hostb` (SAN 127.0.0.1) in `hosts/`.
fn fleet(tag: &str) -> Result<TempDir, Box<dyn Error>> {
    let dir = TempDir::new(tag)?;
    make_ca(&dir.path("ca"), "Ferry test CA")?;
    for host in ["hosta", "hostb"] {
        make_host(
            &dir.path("ca"),
            &dir.path("hosts"),
            host,
            &sans(&["127.0.0.1"]),
        )?;
    }
    Ok(dir)
}

/// Loads host `name` of `fleet`.
fn load(dir: &TempDir, ca: &str, hosts: &str, name: &str) -> Result<Tls, TlsError> {
    Tls::load(&files(&dir.path(ca), &dir.path(hosts), name))
}

fn deadline(ms: u64) -> Instant {
    Instant::now() + Duration::from_millis(ms)
}

/// Listens on loopback and runs `f` on the result of one `accept` (2 s deadline).
fn serve<R: Send + 'static>(
    tls: Tls,
    f: impl FnOnce(Result<TlsStream, TlsError>) -> R + Send + 'static,
) -> io::Result<(SocketAddr, JoinHandle<R>)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let handle = thread::spawn(move || {
        let (tcp, _) = listener.accept().expect("the test client connects");
        f(tls.accept(tcp, deadline(2000)))
    });
    Ok((addr, handle))
}

/// Waits for the server thread, turning its panic into a test failure.
fn join<R>(handle: JoinHandle<R>) -> R {
    handle.join().expect("the server thread does not panic")
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

#[test]
fn types_are_send_and_sync_as_documented() {
    fn send<T: Send>() {}
    fn send_sync<T: Send + Sync>() {}
    send::<TlsStream>();
    send_sync::<Tls>();
    send_sync::<TlsError>();
}

#[test]
fn handshake_exchange_and_exporter() -> TestResult {
    const LEN: usize = 6000;
    let dir = fleet("ok")?;
    let server = load(&dir, "ca", "hosts", "hosta")?;
    let client = load(&dir, "ca", "hosts", "hostb")?;

    let (addr, server_done) = serve(server, |res| -> Result<_, String> {
        let mut s = res.map_err(|e| format!("server handshake: {e:?}"))?;
        let mut buf = vec![0u8; LEN];
        s.read_exact(&mut buf).map_err(|e| e.to_string())?;
        if buf != pattern(1, LEN) {
            return Err("server received other bytes".into());
        }
        s.write_all(&pattern(2, LEN)).map_err(|e| e.to_string())?;
        s.flush().map_err(|e| e.to_string())?;
        let key = s.exporter(b"ferry test").map_err(|e| e.to_string())?;
        Ok(key)
    })?;

    let tcp = TcpStream::connect(addr)?;
    let mut c = client.connect(tcp, "127.0.0.1", deadline(2000))?;
    assert_eq!(c.tcp().peer_addr()?, addr);
    assert_eq!(
        c.tcp().read_timeout()?,
        None,
        "handshake timeouts are cleared"
    );
    match &c.inner {
        Inner::Client(s) => assert_eq!(
            s.conn.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        ),
        Inner::Server(_) => panic!("connect made a server stream"),
    }
    c.tcp().set_read_timeout(Some(Duration::from_secs(2)))?;
    c.write_all(&pattern(1, LEN))?;
    c.flush()?;
    let mut buf = vec![0u8; LEN];
    c.read_exact(&mut buf)?;
    assert_eq!(buf, pattern(2, LEN));

    let client_key = c.exporter(b"ferry test")?;
    let server_key = join(server_done)?;
    assert_eq!(client_key, server_key);
    assert_ne!(client_key, [0u8; 32]);
    assert_ne!(c.exporter(b"other label")?, client_key);
    Ok(())
}

#[test]
fn client_refuses_server_from_other_ca() -> TestResult {
    let dir = fleet("srvca")?;
    make_ca(&dir.path("other"), "Other CA")?;
    make_host(
        &dir.path("other"),
        &dir.path("ohosts"),
        "rogue",
        &sans(&["127.0.0.1"]),
    )?;
    let server = load(&dir, "other", "ohosts", "rogue")?;
    let client = load(&dir, "ca", "hosts", "hostb")?;

    let (addr, server_done) = serve(server, |res| res.map(|_| ()))?;
    let tcp = TcpStream::connect(addr)?;
    let err = client
        .connect(tcp, "127.0.0.1", deadline(2000))
        .expect_err("the client must refuse a server certificate from another CA");
    assert!(
        matches!(
            err,
            TlsError::Handshake {
                role: Role::Client,
                source: rustls::Error::InvalidCertificate(_),
                ..
            }
        ),
        "{err:?}"
    );
    assert!(join(server_done).is_err());
    Ok(())
}

#[test]
fn server_refuses_client_from_other_ca() -> TestResult {
    let dir = fleet("clica")?;
    make_ca(&dir.path("other"), "Other CA")?;
    make_host(
        &dir.path("other"),
        &dir.path("ohosts"),
        "rogue",
        &sans(&["127.0.0.1"]),
    )?;
    // The rogue client trusts both CAs (so it accepts the server), but its own certificate is
    // from the other CA, which the server does not trust.
    let both = dir.path("both.pem");
    let mut pem = fs::read(dir.path("ca").join(CA_CERT_FILE))?;
    pem.extend(fs::read(dir.path("other").join(CA_CERT_FILE))?);
    write_new_files(&[(&both, &pem)])?;
    let mut rogue_files = files(&dir.path("other"), &dir.path("ohosts"), "rogue");
    rogue_files.ca = both;
    let client = Tls::load(&rogue_files)?;
    let server = load(&dir, "ca", "hosts", "hosta")?;

    let (addr, server_done) = serve(server, |res| res.map(|_| ()))?;
    let tcp = TcpStream::connect(addr)?;
    // TLS 1.3: the client finishes first; the server's refusal arrives as an alert.
    let client_result = client
        .connect(tcp, "127.0.0.1", deadline(2000))
        .map_err(io::Error::other)
        .and_then(|mut c| {
            c.tcp().set_read_timeout(Some(Duration::from_secs(2)))?;
            c.read(&mut [0u8; 1])
        });
    let server_err =
        join(server_done).expect_err("the server must refuse a client certificate from another CA");
    assert!(
        matches!(
            server_err,
            TlsError::Handshake {
                role: Role::Server,
                source: rustls::Error::InvalidCertificate(_),
                ..
            }
        ),
        "{server_err:?}"
    );
    assert!(client_result.is_err(), "{client_result:?}");
    Ok(())
}

#[test]
fn load_refuses_open_key_file() -> TestResult {
    let dir = fleet("mode")?;
    let f = files(&dir.path("ca"), &dir.path("hosts"), "hosta");
    fs::set_permissions(&f.key, fs::Permissions::from_mode(0o644))?;
    let err = Tls::load(&f).expect_err("a 0644 key file must be refused");
    assert!(
        matches!(&err, TlsError::Permissions { path, mode: 0o644 } if path == &f.key),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains(&f.key.display().to_string()), "{msg}");
    assert!(msg.contains("0644") && msg.contains("chmod 600"), "{msg}");
    Ok(())
}

#[test]
fn load_refuses_cert_from_other_ca() -> TestResult {
    let dir = fleet("notca")?;
    make_ca(&dir.path("other"), "Other CA")?;
    let mut f = files(&dir.path("ca"), &dir.path("hosts"), "hosta");
    f.ca = dir.path("other").join(CA_CERT_FILE);
    let err = Tls::load(&f).expect_err("a host certificate from another CA must be refused");
    assert!(matches!(err, TlsError::NotFromCa { .. }), "{err:?}");
    Ok(())
}

#[test]
fn server_name_must_match() -> TestResult {
    let dir = TempDir::new("name")?;
    make_ca(&dir.path("ca"), "Ferry test CA")?;
    make_host(
        &dir.path("ca"),
        &dir.path("hosts"),
        "hosta",
        &sans(&["127.0.0.1"]),
    )?;
    make_host(&dir.path("ca"), &dir.path("hosts"), "hostb", &[])?;
    let server = load(&dir, "ca", "hosts", "hosta")?;
    let client = load(&dir, "ca", "hosts", "hostb")?;

    let (addr, server_done) = serve(server.clone(), |res| res.map(|_| ()))?;
    let tcp = TcpStream::connect(addr)?;
    let err = client
        .connect(tcp, "10.9.9.9", deadline(2000))
        .expect_err("a certificate for 127.0.0.1 and hosta must not pass for 10.9.9.9");
    assert!(
        matches!(
            err,
            TlsError::Handshake {
                source: rustls::Error::InvalidCertificate(
                    rustls::CertificateError::NotValidForName
                        | rustls::CertificateError::NotValidForNameContext { .. }
                ),
                ..
            }
        ),
        "{err:?}"
    );
    assert!(join(server_done).is_err());

    // The DNS name (the CN, always a SAN too) does match.
    let (addr, server_done) = serve(server, |res| res.map(|_| ()))?;
    let tcp = TcpStream::connect(addr)?;
    client.connect(tcp, "hosta", deadline(2000))?;
    join(server_done)?;

    let listener = TcpListener::bind("127.0.0.1:0")?;
    let tcp = TcpStream::connect(listener.local_addr()?)?;
    let err = client
        .connect(tcp, "not a name", deadline(2000))
        .expect_err("a name with spaces is neither a DNS name nor an IP address");
    assert!(matches!(err, TlsError::ServerName { .. }), "{err:?}");
    Ok(())
}

#[test]
fn silent_peer_times_out() -> TestResult {
    let dir = fleet("slow")?;
    let server = load(&dir, "ca", "hosts", "hosta")?;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let _silent = TcpStream::connect(listener.local_addr()?)?;
    let (tcp, _) = listener.accept()?;
    let start = Instant::now();
    let err = server
        .accept(tcp, start + Duration::from_millis(300))
        .expect_err("a peer that sends nothing cannot complete a handshake");
    let took = start.elapsed();
    assert!(
        matches!(
            err,
            TlsError::Timeout {
                role: Role::Server,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        took >= Duration::from_millis(290) && took < Duration::from_millis(1000),
        "{took:?}"
    );
    Ok(())
}
