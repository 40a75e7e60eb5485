//! Support for Ferry's end-to-end tests: real binaries as processes, hosts as network
//! namespaces joined by a veth pair (created here, removed on drop), status files read
//! the way an operator would.
//!
//! The binaries come from the same target directory as the test executable
//! (`cargo build --release --workspace` first; the test command does that).

pub mod ch;
pub mod matrix;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Deserialize;

/// The host side addresses of the two test hosts.
pub const ADDR_A: &str = "10.77.0.1";
/// Destination host address.
pub const ADDR_B: &str = "10.77.0.2";
/// Peer port each sidecar listens on.
pub const PORT: u16 = 7780;

static SERIAL: Mutex<()> = Mutex::new(());
static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Runs end-to-end tests one at a time (the machine has 2 cores; each test moves
/// hundreds of MiB).
pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// Path of a workspace binary in the running executable's target directory (a test runs
/// from `target/<profile>/deps`, `ferry-bench` from `target/<profile>`).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let here = exe.parent().expect("executable directory");
    let dir = if here.ends_with("deps") {
        here.parent().expect("target profile directory")
    } else {
        here
    };
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: build the workspace first (cargo build --release --workspace)",
        p.display()
    );
    p
}

fn sh(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {args:?}"))?;
    if !out.status.success() {
        bail!(
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Two network namespaces ("hosts") joined by a veth pair.
pub struct TwoHosts {
    /// Namespace names.
    pub ns: [String; 2],
    /// Veth interface names (a's side, b's side).
    pub veth: [String; 2],
    /// Scratch directory for sockets, keys and logs.
    pub dir: PathBuf,
}

impl TwoHosts {
    /// `ferry <args> --socket <host i's sidecar socket>` in host i's namespace, as a child
    /// with piped output (the sidecars of [`Cluster::spawn_sidecar`] listen there).
    ///
    /// # Errors
    ///
    /// When it cannot be spawned.
    pub fn spawn_ferry(&self, i: usize, args: &[&str]) -> anyhow::Result<Child> {
        let side = ["a", "b"][i];
        Ok(self
            .cmd(i, &bin("ferry"))
            .args(args)
            .arg("--socket")
            .arg(self.path(&format!("{side}.sock")))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?)
    }

    /// Creates the namespaces, the veth pair, addresses, and a scratch directory.
    ///
    /// # Errors
    ///
    /// When namespaces cannot be made (not root, no iproute2): the test fails loudly.
    pub fn new() -> anyhow::Result<Self> {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{}{}", std::process::id() % 100_000, n);
        let ns = [format!("ferry-{tag}-a"), format!("ferry-{tag}-b")];
        let veth = [format!("fa{tag}"), format!("fb{tag}")];
        let dir = std::env::temp_dir().join(format!("ferry-tests-{tag}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let h = Self { ns, veth, dir };
        for ns in &h.ns {
            sh(&["ip", "netns", "add", ns])?;
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
        }
        sh(&[
            "ip", "link", "add", &h.veth[0], "netns", &h.ns[0], "type", "veth", "peer", "name",
            &h.veth[1], "netns", &h.ns[1],
        ])?;
        for (i, addr) in [ADDR_A, ADDR_B].iter().enumerate() {
            let cidr = format!("{addr}/24");
            sh(&[
                "ip", "-n", &h.ns[i], "addr", "add", &cidr, "dev", &h.veth[i],
            ])?;
            sh(&["ip", "-n", &h.ns[i], "link", "set", &h.veth[i], "up"])?;
        }
        Ok(h)
    }

    /// Limits host `i`'s egress rate with a token bucket (`tbf`; this kernel has no
    /// `netem`), e.g. `"200mbit"`.
    ///
    /// # Errors
    ///
    /// When `tc` fails.
    pub fn limit_rate(&self, i: usize, rate: &str) -> anyhow::Result<()> {
        sh(&[
            "ip",
            "netns",
            "exec",
            &self.ns[i],
            "tc",
            "qdisc",
            "replace",
            "dev",
            &self.veth[i],
            "root",
            "tbf",
            "rate",
            rate,
            "burst",
            "256kb",
            "latency",
            "50ms",
        ])
    }

    /// Cuts the link: both ends lose carrier and drop everything silently, as with a
    /// pulled cable (no RST, no FIN reaches either side).
    ///
    /// # Errors
    ///
    /// When `ip` fails.
    pub fn cut(&self) -> anyhow::Result<()> {
        for i in 0..2 {
            sh(&[
                "ip",
                "-n",
                &self.ns[i],
                "link",
                "set",
                &self.veth[i],
                "down",
            ])?;
        }
        Ok(())
    }

    /// Brings a cut link back up.
    ///
    /// # Errors
    ///
    /// When `ip` fails.
    pub fn restore(&self) -> anyhow::Result<()> {
        for i in 0..2 {
            sh(&["ip", "-n", &self.ns[i], "link", "set", &self.veth[i], "up"])?;
        }
        Ok(())
    }

    /// A command run inside host `i`.
    pub fn cmd(&self, i: usize, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns[i]]).arg(program);
        c
    }

    /// Moves the calling thread into host `i`'s network namespace (for a test thread that
    /// must listen or connect there; other threads stay where they are).
    ///
    /// # Errors
    ///
    /// The namespace cannot be opened or entered.
    pub fn enter(&self, i: usize) -> anyhow::Result<()> {
        let f = std::fs::File::open(format!("/var/run/netns/{}", self.ns[i]))?;
        // SAFETY: setns on a namespace fd this function holds open; it changes only the
        // calling thread's network namespace.
        let r = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
        if r != 0 {
            bail!(
                "entering {}: {}",
                self.ns[i],
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    }

    /// A file in the scratch directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        for ns in &self.ns {
            let _ = sh(&["ip", "netns", "del", ns]);
        }
        if std::env::var_os("FERRY_KEEP_E2E").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A child process killed (SIGKILL) and reaped on drop.
pub struct Proc {
    /// The child.
    pub child: Child,
    /// Name for messages.
    pub name: String,
    /// Its log file.
    pub log: PathBuf,
}

impl Proc {
    /// Starts `cmd` with stdout and stderr to `log`.
    ///
    /// # Errors
    ///
    /// When it cannot be spawned.
    pub fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> anyhow::Result<Self> {
        let f = std::fs::File::create(&log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .spawn()
            .with_context(|| format!("spawning {name}"))?;
        Ok(Self {
            child,
            name: name.to_owned(),
            log,
        })
    }

    /// SIGKILL now (kill -9), and reap.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether it still runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A VMM's status file (`ferry-workload-vmm` and `ferry-kvm-vmm` write the same shape).
#[derive(Debug, Clone, Deserialize)]
pub struct VmStatus {
    /// "running", "paused", "migrated", "waiting", "loaded".
    pub state: String,
    /// Writer (or vCPU) counters.
    pub counters: Vec<u64>,
    /// Sum of the counters.
    pub total: u64,
    /// What the VMM last said.
    pub detail: String,
    /// KVM VMM only: outcome of a record check run after the guest resumed.
    #[serde(default)]
    pub record_check: String,
    /// The VMM's process id.
    #[serde(default)]
    pub pid: Option<u32>,
}

impl VmStatus {
    /// Whether the VM runs: its VMM says so and is alive (a killed VMM leaves its last
    /// status file behind).
    pub fn runs(&self) -> bool {
        self.state == "running"
            && self.pid.is_none_or(|p| {
                std::fs::read_to_string(format!("/proc/{p}/stat"))
                    .is_ok_and(|s| !s.split(") ").nth(1).is_some_and(|r| r.starts_with('Z')))
            })
    }
}

/// Reads a status file (None while it does not exist or is being replaced).
pub fn status(path: &Path) -> Option<VmStatus> {
    let t = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(&t).ok()
}

/// Waits until `f` holds, polling every 10 ms, for at most `limit`.
///
/// # Errors
///
/// When the time runs out; the message says what was awaited.
pub fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> anyhow::Result<()> {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if f() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    bail!("timed out after {:?} waiting for {what}", limit)
}

/// A two-host Ferry setup: a sidecar in each namespace, a source VMM on A and an
/// incoming VMM on B (workload or KVM VMM: [`VmmKind`]).
pub struct Cluster {
    /// The processes (killed first on drop).
    pub procs: Vec<Proc>,
    /// The tmpfs on the source's state directory, if asked for.
    pub tmpfs: Option<Tmpfs>,
    /// Hosts (removed last).
    pub hosts: TwoHosts,
}

/// Which VMM a [`Cluster`] runs on both hosts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum VmmKind {
    /// `ferry-workload-vmm`: writer threads stand in for vCPUs.
    #[default]
    Workload,
    /// `ferry-kvm-vmm`: a real KVM guest (CPL3 program stamping pages) with the given
    /// vCPUs. Needs `/dev/kvm`: [`Cluster::start`] fails loudly without it.
    Kvm {
        /// vCPUs.
        vcpus: u32,
    },
}

/// Options of a [`Cluster`].
#[derive(Clone, Debug)]
pub struct ClusterOpts {
    /// Guest RAM.
    pub mem_mib: u64,
    /// Dirtying rate (for the KVM guest: page writes per second over all vCPUs, in
    /// MiB/s; random pages, so mostly distinct pages).
    pub rate_mib: u64,
    /// Authenticate with a shared key (`--insecure-psk`) instead of TLS certificates.
    pub psk: bool,
    /// Give the destination a different key (PSK) or a certificate of another CA (TLS).
    pub wrong_key: bool,
    /// Extra args for the destination VMM.
    pub dest_vmm_args: Vec<String>,
    /// The VMM on both hosts.
    pub vmm: VmmKind,
    /// Environment for the source sidecar (fault injection).
    pub source_env: Vec<(String, String)>,
    /// Extra `ferry serve` arguments for the source sidecar.
    pub source_sidecar_args: Vec<String>,
    /// Extra `ferry serve` arguments for the destination sidecar.
    pub dest_sidecar_args: Vec<String>,
    /// Environment for the destination sidecar (fault injection).
    pub dest_env: Vec<(String, String)>,
    /// Extra args for the source VMM.
    pub source_vmm_args: Vec<String>,
    /// Further subject alternative names in B's certificate (a proxy's address).
    pub dest_sans: Vec<String>,
    /// A 64 KiB tmpfs on the source's state directory ([`Cluster::tmpfs`]).
    pub state_tmpfs: bool,
}

impl Default for ClusterOpts {
    fn default() -> Self {
        Self {
            mem_mib: 256,
            rate_mib: 32,
            psk: false,
            wrong_key: false,
            dest_vmm_args: Vec::new(),
            vmm: VmmKind::Workload,
            source_env: Vec::new(),
            source_sidecar_args: Vec::new(),
            dest_sidecar_args: Vec::new(),
            dest_env: Vec::new(),
            source_vmm_args: Vec::new(),
            dest_sans: Vec::new(),
            state_tmpfs: false,
        }
    }
}

/// A tmpfs mounted on a directory (a state directory made to fail), unmounted on drop.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts a 64 KiB tmpfs on `path`.
    ///
    /// # Errors
    ///
    /// `mount` failing (not root).
    pub fn mount(path: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(path)?;
        sh(&[
            "mount",
            "-t",
            "tmpfs",
            "-o",
            "size=64k",
            "ferry-test",
            &path.display().to_string(),
        ])?;
        Ok(Self(path.to_owned()))
    }

    /// Fills every block (writes fail with ENOSPC from now on).
    ///
    /// # Errors
    ///
    /// When `dd` cannot run.
    pub fn fill(&self) -> anyhow::Result<()> {
        // dd stops with "No space left on device": that is the point.
        let _ = Command::new("dd")
            .args([
                "if=/dev/zero",
                &format!("of={}/filler", self.0.display()),
                "bs=4k",
            ])
            .output()?;
        Ok(())
    }

    /// Makes the file system read-only.
    ///
    /// # Errors
    ///
    /// `mount` failing.
    pub fn read_only(&self) -> anyhow::Result<()> {
        sh(&["mount", "-o", "remount,ro", &self.0.display().to_string()])
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).output();
    }
}

/// The environment that makes a sidecar hold at `point` for 5 s (the `fault-injection`
/// build's `FERRY_TEST_HOLD`; points in `sidecar/src/faults.rs`).
pub fn hold_at(point: &str) -> Vec<(String, String)> {
    hold_for(point, 5000)
}

/// As [`hold_at`], for `ms` milliseconds.
pub fn hold_for(point: &str, ms: u64) -> Vec<(String, String)> {
    vec![
        ("FERRY_TEST_HOLD".into(), point.into()),
        ("FERRY_TEST_HOLD_MS".into(), ms.to_string()),
    ]
}

/// Runs `ferry` with `args` and fails loudly if it fails.
fn ferry(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(bin("ferry")).args(args).output()?;
    if !out.status.success() {
        bail!(
            "ferry {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Makes a fleet CA in `dir/<ca>` and a host certificate for each `(name, addresses)`
/// (comma-separated) in `dir/certs`, with `ferry cert` as an operator would.
///
/// # Errors
///
/// When `ferry cert` fails.
pub fn make_certs(dir: &Path, ca: &str, hosts: &[(&str, &str)]) -> anyhow::Result<()> {
    let ca_dir = dir.join(ca);
    let ca_s = ca_dir.display().to_string();
    ferry(&["cert", "ca", "--out", &ca_s])?;
    let certs = dir.join("certs").display().to_string();
    for (name, addrs) in hosts {
        let mut args = vec![
            "cert", "host", "--ca", &ca_s, "--name", name, "--out", &certs,
        ];
        for a in addrs.split(',') {
            args.extend(["--san", a]);
        }
        ferry(&args)?;
    }
    Ok(())
}

/// `ferry serve` arguments for host `name` authenticating with certificates from
/// [`make_certs`] (CA directory `ca`).
pub fn tls_args(dir: &Path, ca: &str, name: &str) -> Vec<String> {
    vec![
        "--tls-ca".into(),
        dir.join(ca).join("ca.pem").display().to_string(),
        "--tls-cert".into(),
        dir.join("certs")
            .join(format!("{name}.pem"))
            .display()
            .to_string(),
        "--tls-key".into(),
        dir.join("certs")
            .join(format!("{name}-key.pem"))
            .display()
            .to_string(),
    ]
}

/// Writes a shared key file readable by its owner only.
///
/// # Errors
///
/// I/O errors.
pub fn write_key(path: &Path, key: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, key)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(())
}

/// Fails (panics) loudly when `/dev/kvm` is missing: a KVM test must never pass by
/// skipping.
pub fn require_kvm() {
    assert!(
        Path::new("/dev/kvm").exists(),
        "/dev/kvm is missing: this KVM end-to-end test cannot run here and fails instead of skipping"
    );
}

/// Indices into [`Cluster::procs`].
pub const SIDECAR_A: usize = 0;
/// Destination sidecar.
pub const SIDECAR_B: usize = 1;
/// Source VMM.
pub const VMM_A: usize = 2;
/// Destination VMM.
pub const VMM_B: usize = 3;

impl Cluster {
    /// Starts sidecars and VMMs without waiting for the VM to register.
    ///
    /// # Errors
    ///
    /// When any part cannot be spawned.
    pub fn start_unregistered(opts: &ClusterOpts) -> anyhow::Result<Self> {
        let hosts = TwoHosts::new()?;
        if opts.psk {
            write_key(&hosts.path("key-a"), "e2e-shared-key-0123456789\n")?;
            let key_b = if opts.wrong_key {
                "another-key-9876543210abcdef\n"
            } else {
                "e2e-shared-key-0123456789\n"
            };
            write_key(&hosts.path("key-b"), key_b)?;
        } else {
            let b_sans = std::iter::once(ADDR_B)
                .chain(opts.dest_sans.iter().map(String::as_str))
                .collect::<Vec<_>>()
                .join(",");
            make_certs(&hosts.dir, "ca", &[("a", ADDR_A), ("b", &b_sans)])?;
            if opts.wrong_key {
                // B's certificate comes from another CA.
                make_certs(&hosts.dir.join("other"), "ca", &[("b", ADDR_B)])?;
            }
        }
        let tmpfs = if opts.state_tmpfs {
            Some(Tmpfs::mount(&hosts.path("state-a"))?)
        } else {
            None
        };
        let mut procs = Vec::new();
        for i in 0..2 {
            procs.push(Self::spawn_sidecar(&hosts, opts, i)?);
        }
        for side in ["a", "b"] {
            let sock = hosts.path(&format!("{side}.sock"));
            wait_for("the sidecar socket", Duration::from_secs(10), || {
                sock.exists()
            })?;
        }
        let (src, dst) = match opts.vmm {
            VmmKind::Workload => {
                let vmm = bin("ferry-workload-vmm");
                let mut src = hosts.cmd(0, &vmm);
                src.arg("--socket")
                    .arg(hosts.path("a.sock"))
                    .args(["--vm-id", "vm1", "--mem-mib", &opts.mem_mib.to_string()])
                    .args(["--rate-mib", &opts.rate_mib.to_string()]);
                let mut dst = hosts.cmd(1, &vmm);
                dst.arg("--socket").arg(hosts.path("b.sock")).args([
                    "--vm-id",
                    "vm1",
                    "--incoming",
                ]);
                (src, dst)
            }
            VmmKind::Kvm { vcpus } => {
                require_kvm();
                let vmm = bin("ferry-kvm-vmm");
                // Pages per second per vCPU for rate_mib MiB/s over all vCPUs.
                let rate = (opts.rate_mib << 20) / 4096 / u64::from(vcpus.max(1));
                let mut src = hosts.cmd(0, &vmm);
                src.arg("source")
                    .arg("--sidecar")
                    .arg(hosts.path("a.sock"))
                    .args(["--vm-id", "vm1", "--ram-mib", &opts.mem_mib.to_string()])
                    .args(["--vcpus", &vcpus.to_string(), "--rate", &rate.to_string()])
                    // RAM with data everywhere, as a booted guest's: holes would be skipped.
                    .arg("--ballast");
                let mut dst = hosts.cmd(1, &vmm);
                dst.arg("dest")
                    .arg("--sidecar")
                    .arg(hosts.path("b.sock"))
                    .args(["--vm-id", "vm1"]);
                (src, dst)
            }
        };
        let mut c = src;
        c.args(["--max-runtime-s", "300"])
            .arg("--status-file")
            .arg(hosts.path("vm-a.json"))
            .args(&opts.source_vmm_args);
        procs.push(Proc::spawn("vmm-a", c, hosts.path("vmm-a.log"))?);
        let mut c = dst;
        c.args(["--max-runtime-s", "300"])
            .arg("--status-file")
            .arg(hosts.path("vm-b.json"))
            .args(&opts.dest_vmm_args);
        procs.push(Proc::spawn("vmm-b", c, hosts.path("vmm-b.log"))?);
        Ok(Self {
            procs,
            tmpfs,
            hosts,
        })
    }

    /// Starts sidecars and VMMs and waits until the VM is registered and the destination
    /// VMM waits.
    ///
    /// # Errors
    ///
    /// When any part does not come up.
    pub fn start(opts: &ClusterOpts) -> anyhow::Result<Self> {
        let cl = Self::start_unregistered(opts)?;
        cl.wait_registered()?;
        Ok(cl)
    }

    /// Starts host `i`'s sidecar (again: a restart keeps its state directory).
    ///
    /// # Errors
    ///
    /// When it cannot be spawned.
    pub fn spawn_sidecar(hosts: &TwoHosts, opts: &ClusterOpts, i: usize) -> anyhow::Result<Proc> {
        let (side, addr) = [("a", ADDR_A), ("b", ADDR_B)][i];
        let mut c = hosts.cmd(i, &bin("ferry"));
        c.arg("serve")
            .arg("--socket")
            .arg(hosts.path(&format!("{side}.sock")))
            .arg("--listen")
            .arg(format!("{addr}:{PORT}"))
            .arg("--state-dir")
            .arg(hosts.path(&format!("state-{side}")));
        if opts.psk {
            c.arg("--insecure-psk")
                .arg("--key-file")
                .arg(hosts.path(&format!("key-{side}")));
        } else if opts.wrong_key && i == 1 {
            c.args(tls_args(&hosts.dir.join("other"), "ca", side));
        } else {
            c.args(tls_args(&hosts.dir, "ca", side));
        }
        let (env, args) = if i == 0 {
            (&opts.source_env, &opts.source_sidecar_args[..])
        } else {
            (&opts.dest_env, &opts.dest_sidecar_args[..])
        };
        c.envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        c.args(args);
        let log = hosts.path(&format!("sidecar-{side}.log"));
        // A restarted sidecar appends to its log.
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let child = c
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .spawn()
            .with_context(|| format!("spawning sidecar-{side}"))?;
        Ok(Proc {
            child,
            name: format!("sidecar-{side}"),
            log,
        })
    }

    /// Kills host `i`'s sidecar (kill -9) and starts it again on the same socket, port
    /// and state directory; waits until it answers.
    ///
    /// # Errors
    ///
    /// When it does not come back.
    pub fn restart_sidecar(&mut self, opts: &ClusterOpts, i: usize) -> anyhow::Result<()> {
        self.procs[i].kill9();
        self.procs[i] = Self::spawn_sidecar(&self.hosts, opts, i)?;
        wait_for("the restarted sidecar", Duration::from_secs(10), || {
            self.ferry_status(i).is_some()
        })
    }

    /// Waits until sidecar `i` logs that it holds at `point` (see [`hold_at`]).
    ///
    /// # Errors
    ///
    /// When it does not within 60 s.
    pub fn wait_hold(&self, i: usize, point: &str) -> anyhow::Result<()> {
        let marker = format!("test hook: holding at {point}");
        wait_for(&marker, Duration::from_secs(60), || {
            self.procs[i].log_text().contains(&marker)
        })
    }

    /// Waits until the source VM runs and is registered, and the destination VMM waits.
    ///
    /// # Errors
    ///
    /// On timeout.
    pub fn wait_registered(&self) -> anyhow::Result<()> {
        wait_for("source VM registered", Duration::from_secs(60), || {
            self.ferry_status(0)
                .is_some_and(|s| s["registered"].as_array().is_some_and(|a| !a.is_empty()))
        })?;
        wait_for("destination VMM waiting", Duration::from_secs(30), || {
            self.ferry_status(1).is_some_and(|s| {
                s["waiting_incoming"]
                    .as_array()
                    .is_some_and(|a| !a.is_empty())
            })
        })
    }

    /// Starts a further workload VM `id` (`mem_mib` of RAM dirtied at `rate_mib` MiB/s) on
    /// host A and a VMM waiting for it on B; status files `vm-a-<id>.json` and
    /// `vm-b-<id>.json`.
    ///
    /// # Errors
    ///
    /// When a VMM cannot be spawned.
    pub fn add_vm(&mut self, id: &str, mem_mib: u64, rate_mib: u64) -> anyhow::Result<()> {
        let vmm = bin("ferry-workload-vmm");
        let mut src = self.hosts.cmd(0, &vmm);
        src.arg("--socket")
            .arg(self.hosts.path("a.sock"))
            .args(["--vm-id", id, "--mem-mib", &mem_mib.to_string()])
            .args([
                "--rate-mib",
                &rate_mib.to_string(),
                "--max-runtime-s",
                "300",
            ])
            .arg("--status-file")
            .arg(self.hosts.path(&format!("vm-a-{id}.json")));
        let log = self.hosts.path(&format!("vmm-a-{id}.log"));
        self.procs
            .push(Proc::spawn(&format!("vmm-a-{id}"), src, log)?);
        let mut dst = self.hosts.cmd(1, &vmm);
        dst.arg("--socket")
            .arg(self.hosts.path("b.sock"))
            .args(["--vm-id", id, "--incoming", "--max-runtime-s", "300"])
            .arg("--status-file")
            .arg(self.hosts.path(&format!("vm-b-{id}.json")));
        let log = self.hosts.path(&format!("vmm-b-{id}.log"));
        self.procs
            .push(Proc::spawn(&format!("vmm-b-{id}"), dst, log)?);
        Ok(())
    }

    /// Waits until `n` VMs are registered on A and `n` VMMs wait on B.
    ///
    /// # Errors
    ///
    /// On timeout.
    pub fn wait_vms(&self, n: usize) -> anyhow::Result<()> {
        let count = |i: usize, key: &str| {
            self.ferry_status(i)
                .and_then(|s| s[key].as_array().map(Vec::len))
                .unwrap_or(0)
        };
        wait_for(
            &format!("{n} VMs registered"),
            Duration::from_secs(60),
            || count(0, "registered") == n,
        )?;
        wait_for(
            &format!("{n} VMMs waiting"),
            Duration::from_secs(60),
            || count(1, "waiting_incoming") == n,
        )
    }

    /// VM `id`'s status on host `i` (vm1's files have no id in their name).
    pub fn vm(&self, i: usize, id: &str) -> Option<VmStatus> {
        let side = ["a", "b"][i];
        if id == "vm1" {
            status(&self.hosts.path(&format!("vm-{side}.json")))
        } else {
            status(&self.hosts.path(&format!("vm-{side}-{id}.json")))
        }
    }

    /// `ferry <args> --socket <host i's socket>` in host i's namespace, as a child with
    /// piped output.
    ///
    /// # Errors
    ///
    /// When it cannot be spawned.
    pub fn spawn_ferry(&self, i: usize, args: &[&str]) -> anyhow::Result<Child> {
        self.hosts.spawn_ferry(i, args)
    }

    /// As [`Cluster::spawn_ferry`], waiting for it: exit code, stdout, stderr.
    ///
    /// # Errors
    ///
    /// When it cannot be run.
    pub fn ferry(&self, i: usize, args: &[&str]) -> anyhow::Result<(Option<i32>, String, String)> {
        let out = self.spawn_ferry(i, args)?.wait_with_output()?;
        Ok((
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// `ferry status` of host `i`'s sidecar.
    pub fn ferry_status(&self, i: usize) -> Option<serde_json::Value> {
        let side = ["a", "b"][i];
        let out = Command::new(bin("ferry"))
            .args(["status", "--json", "--socket"])
            .arg(self.hosts.path(&format!("{side}.sock")))
            .output()
            .ok()?;
        serde_json::from_slice(&out.stdout).ok()
    }

    /// `ferry migrate vm1 --to B --json` from host A with extra args, as a child.
    ///
    /// # Errors
    ///
    /// When it cannot be spawned.
    pub fn spawn_migrate(&self, extra: &[&str]) -> anyhow::Result<Child> {
        self.spawn_migrate_to(&format!("{ADDR_B}:{PORT}"), extra)
    }

    /// As [`Cluster::spawn_migrate`], to another address (a proxy in front of B).
    ///
    /// # Errors
    ///
    /// When it cannot be spawned.
    pub fn spawn_migrate_to(&self, to: &str, extra: &[&str]) -> anyhow::Result<Child> {
        let mut c = self.hosts.cmd(0, &bin("ferry"));
        c.args(["migrate", "vm1", "--to", to, "--json"])
            .arg("--socket")
            .arg(self.hosts.path("a.sock"))
            .args(extra)
            // Tests verify strictly (before the destination resumes) unless they ask.
            .args(if extra.contains(&"--verify") {
                &[][..]
            } else {
                &["--verify", "strict"][..]
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        Ok(c.spawn()?)
    }

    /// Slows host A's link to 200 Mbit/s (round 1 of a 256 MiB guest then takes ~8 s),
    /// starts a migration, and returns once round 1 is under way at the destination:
    /// the window fault tests strike in.
    ///
    /// # Errors
    ///
    /// When shaping fails or round 1 does not start within 20 s.
    pub fn spawn_slow_migration(&self) -> anyhow::Result<Child> {
        self.hosts.limit_rate(0, "200mbit")?;
        let child = self.spawn_migrate(&[])?;
        wait_for("round 1 under way", Duration::from_secs(20), || {
            self.ferry_status(1)
                .is_some_and(|s| s["migrating"]["vm1"] == "receiving")
        })?;
        Ok(child)
    }

    /// Waits until the destination sidecar has dropped an interrupted incoming migration
    /// and its VMM waits again, and returns the destination VMM's status (which must say
    /// it waits: nothing runs there).
    ///
    /// # Errors
    ///
    /// When that does not happen within 90 s, or the VMM is not waiting.
    pub fn destination_discarded(&self) -> anyhow::Result<VmStatus> {
        let r = wait_for("destination discards", Duration::from_secs(90), || {
            self.ferry_status(1).is_some_and(|s| {
                s["migrating"].as_object().is_some_and(|m| m.is_empty())
                    && s["waiting_incoming"]
                        .as_array()
                        .is_some_and(|a| !a.is_empty())
            }) && self.vm_b().is_some_and(|b| b.state == "waiting")
        });
        let b = self.vm_b().context("destination status")?;
        if r.is_err() {
            bail!("destination VMM is {:?}, not waiting: {b:?}", b.state);
        }
        Ok(b)
    }

    /// Runs a migration to completion and parses its JSON summary.
    ///
    /// # Errors
    ///
    /// When the command fails to produce a summary.
    pub fn migrate(&self, extra: &[&str]) -> anyhow::Result<serde_json::Value> {
        let child = self.spawn_migrate(extra)?;
        summary_of(child)
    }

    /// Source VM status.
    pub fn vm_a(&self) -> Option<VmStatus> {
        status(&self.hosts.path("vm-a.json"))
    }

    /// Destination VM status.
    pub fn vm_b(&self) -> Option<VmStatus> {
        status(&self.hosts.path("vm-b.json"))
    }

    /// Logs of every process, for failure messages.
    pub fn logs(&self) -> String {
        self.procs
            .iter()
            .map(|p| format!("----- {} -----\n{}", p.name, p.log_text()))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Asserts the source VM runs and its counters increase (no burned bridges).
    ///
    /// # Errors
    ///
    /// When the VM is not running or its counters do not move.
    pub fn source_keeps_running(&self) -> anyhow::Result<()> {
        wait_for("source VM running again", Duration::from_secs(30), || {
            self.vm_a().is_some_and(|s| s.state == "running")
        })?;
        let t1 = self.vm_a().context("source status")?.total;
        std::thread::sleep(Duration::from_millis(600));
        let s2 = self.vm_a().context("source status")?;
        if s2.state != "running" || s2.total <= t1 {
            bail!("source VM not making progress: {t1} -> {s2:?}");
        }
        Ok(())
    }

    /// Asserts the source VM runs and every one of its counters increases past `paused`
    /// (the per-counter values seen while it was paused), or past the values seen now
    /// when `paused` is `None`.
    ///
    /// # Errors
    ///
    /// When the VM is not running or a counter does not move.
    pub fn source_continues_from(&self, paused: Option<&[u64]>) -> anyhow::Result<()> {
        wait_for("source VM running again", Duration::from_secs(30), || {
            self.vm_a().is_some_and(|s| s.state == "running")
        })?;
        let s1 = self.vm_a().context("source status")?;
        let base = paused.map_or_else(|| s1.counters.clone(), <[u64]>::to_vec);
        std::thread::sleep(Duration::from_millis(600));
        let s2 = self.vm_a().context("source status")?;
        let moved = s2.counters.len() == base.len()
            && !base.is_empty()
            && s2.counters.iter().zip(&base).all(|(n, b)| n > b);
        if s2.state != "running" || !moved {
            bail!("source VM not making progress from {base:?}: {s2:?}");
        }
        Ok(())
    }
}

/// Waits for a `ferry migrate --json` child and parses its summary.
///
/// # Errors
///
/// When the output holds no JSON object.
pub fn summary_of(child: Child) -> anyhow::Result<serde_json::Value> {
    let out = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .with_context(|| {
            format!(
                "no JSON summary (exit {:?}); stderr: {}",
                out.status.code(),
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    Ok(serde_json::from_str(line)?)
}

/// 2 MiB huge pages reserved for a test (`/proc/sys/vm/nr_hugepages`, root); the count
/// before is put back on drop.
pub struct HugePages {
    before: u64,
}

const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

impl HugePages {
    /// Reserves `n` more 2 MiB pages than the host had.
    ///
    /// # Errors
    ///
    /// Not root, or the kernel found fewer free pages than asked.
    pub fn reserve(n: u64) -> anyhow::Result<Self> {
        let before: u64 = std::fs::read_to_string(NR_HUGEPAGES)?.trim().parse()?;
        let h = Self { before };
        h.set(n)?;
        Ok(h)
    }

    /// Sets the test's share to `n` pages (beyond what the host had).
    ///
    /// # Errors
    ///
    /// As [`HugePages::reserve`].
    pub fn set(&self, n: u64) -> anyhow::Result<()> {
        std::fs::write(NR_HUGEPAGES, (self.before + n).to_string())
            .context("reserving huge pages (needs root)")?;
        let now: u64 = std::fs::read_to_string(NR_HUGEPAGES)?.trim().parse()?;
        if now < self.before + n {
            bail!(
                "the kernel reserved {} of {} huge pages asked for",
                now - self.before.min(now),
                n
            );
        }
        Ok(())
    }
}

impl Drop for HugePages {
    fn drop(&mut self) {
        let _ = std::fs::write(NR_HUGEPAGES, self.before.to_string());
    }
}

const SHMEM_ENABLED: &str = "/sys/kernel/mm/transparent_hugepage/shmem_enabled";

/// The active value of the host's transparent huge pages for shared memory
/// (`shmem_enabled`'s bracketed word), or why it cannot be read.
pub fn shmem_thp_setting() -> String {
    match std::fs::read_to_string(SHMEM_ENABLED) {
        Ok(s) => s
            .split_whitespace()
            .find_map(|w| w.strip_prefix('[').and_then(|w| w.strip_suffix(']')))
            .unwrap_or("unknown")
            .to_owned(),
        Err(e) => format!("unreadable ({e})"),
    }
}

/// The host's `shmem_enabled` set to a value for as long as this lives, the earlier value
/// put back on drop (a failing test or benchmark still restores it).
pub struct ShmemThp {
    before: Option<String>,
}

impl ShmemThp {
    /// Sets `shmem_enabled` to `mode`; `keep` leaves the host as it is.
    ///
    /// # Errors
    ///
    /// Not root, or a kernel without transparent huge pages.
    pub fn set(mode: &str) -> anyhow::Result<Self> {
        if mode == "keep" {
            return Ok(Self { before: None });
        }
        let before = shmem_thp_setting();
        std::fs::write(SHMEM_ENABLED, mode)
            .with_context(|| format!("setting {SHMEM_ENABLED} to {mode} (needs root)"))?;
        Ok(Self {
            before: Some(before),
        })
    }
}

impl Drop for ShmemThp {
    fn drop(&mut self) {
        if let Some(b) = &self.before {
            if let Err(e) = std::fs::write(SHMEM_ENABLED, b) {
                eprintln!("could not put {SHMEM_ENABLED} back to {b}: {e}");
            }
        }
    }
}

/// Shared memory the kernel holds in transparent huge pages, host-wide, in KiB
/// (`ShmemHugePages` of `/proc/meminfo`).
///
/// # Errors
///
/// `/proc/meminfo` unreadable or without the field.
pub fn shmem_huge_kib() -> anyhow::Result<u64> {
    let m = std::fs::read_to_string("/proc/meminfo")?;
    m.lines()
        .find_map(|l| l.strip_prefix("ShmemHugePages:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("ShmemHugePages in /proc/meminfo")
}

/// The page sizes (KiB, from `/proc/<pid>/smaps`) of the mappings of process `pid` whose
/// name contains `name`.
///
/// # Errors
///
/// `smaps` unreadable.
pub fn mapped_page_sizes_kib(pid: u32, name: &str) -> anyhow::Result<Vec<u64>> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    let mut sizes = Vec::new();
    let mut inside = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            inside = line.contains(name);
        } else if inside {
            if let Some(v) = line.strip_prefix("KernelPageSize:") {
                sizes.push(v.trim().trim_end_matches("kB").trim().parse()?);
            }
        }
    }
    Ok(sizes)
}
