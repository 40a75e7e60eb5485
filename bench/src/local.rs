//! Two sidecars on loopback with VMMs beside them, for benchmarks.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// A child process killed on drop.
pub struct Kid(pub Child);

impl Drop for Kid {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Directory of the running `ferry-bench` binary: the other binaries sit beside it.
pub fn bin(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let p = exe.parent().context("binary directory")?.join(name);
    if !p.exists() {
        bail!(
            "{} missing: build the workspace (cargo build --release --workspace)",
            p.display()
        );
    }
    Ok(p)
}

/// CPU time (user + system) a process has used so far.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = stat.rsplit_once(')').context("stat format")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks / hz)
}

/// Two sidecars ("a" source, "b" destination) on 127.0.0.1.
pub struct LocalPair {
    /// Scratch directory (sockets, key, logs).
    pub dir: PathBuf,
    /// Sidecar processes: [a, b].
    pub sidecars: Vec<Kid>,
    /// VMM processes.
    pub vmms: Vec<Kid>,
    /// Destination peer port.
    pub port_b: u16,
}

/// How the benchmark's sidecars authenticate each other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PairAuth {
    /// `--insecure-psk`: plain TCP (the setting every earlier figure was measured in).
    Psk,
    /// Mutual TLS 1.3: control and data connections encrypted.
    Tls,
}

fn run_ferry(ferry: &Path, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(ferry).args(args).output()?;
    anyhow::ensure!(
        out.status.success(),
        "ferry {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

impl LocalPair {
    /// Starts both sidecars (`--insecure-psk`); `tag` keeps concurrent pairs apart.
    ///
    /// # Errors
    ///
    /// When a sidecar does not come up.
    pub fn start(tag: &str, port_base: u16) -> anyhow::Result<Self> {
        Self::start_with(tag, port_base, PairAuth::Psk)
    }

    /// Starts both sidecars authenticating with `auth`.
    ///
    /// # Errors
    ///
    /// When a sidecar does not come up.
    pub fn start_with(tag: &str, port_base: u16, auth: PairAuth) -> anyhow::Result<Self> {
        Self::start_serving(tag, port_base, auth, &[])
    }

    /// Starts both sidecars authenticating with `auth`, with `extra` flags to `ferry serve`.
    ///
    /// # Errors
    ///
    /// When a sidecar does not come up.
    pub fn start_serving(
        tag: &str,
        port_base: u16,
        auth: PairAuth,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("ferry-bench-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let ferry = bin("ferry")?;
        let auth_args: Vec<String> = match auth {
            PairAuth::Psk => {
                let key = dir.join("key");
                std::fs::write(&key, "bench-shared-key-0123456789\n")?;
                std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))?;
                vec![
                    "--insecure-psk".into(),
                    "--key-file".into(),
                    key.display().to_string(),
                ]
            }
            PairAuth::Tls => {
                let (ca, certs) = (dir.join("ca"), dir.join("certs"));
                let (ca_s, certs_s) = (ca.display().to_string(), certs.display().to_string());
                run_ferry(&ferry, &["cert", "ca", "--out", &ca_s])?;
                run_ferry(
                    &ferry,
                    &[
                        "cert",
                        "host",
                        "--ca",
                        &ca_s,
                        "--name",
                        "local",
                        "--san",
                        "127.0.0.1",
                        "--out",
                        &certs_s,
                    ],
                )?;
                vec![
                    "--tls-ca".into(),
                    ca.join("ca.pem").display().to_string(),
                    "--tls-cert".into(),
                    certs.join("local.pem").display().to_string(),
                    "--tls-key".into(),
                    certs.join("local-key.pem").display().to_string(),
                ]
            }
        };
        let mut sidecars = Vec::new();
        for (i, side) in ["a", "b"].iter().enumerate() {
            let log = std::fs::File::create(dir.join(format!("sidecar-{side}.log")))?;
            let c = Command::new(&ferry)
                .arg("serve")
                .arg("--socket")
                .arg(dir.join(format!("{side}.sock")))
                .arg("--listen")
                .arg(format!("127.0.0.1:{}", port_base + i as u16))
                .args(&auth_args)
                .args(["--rdma-peer", "127.0.0.1"])
                .args(extra)
                .arg("--state-dir")
                .arg(dir.join(format!("state-{side}")))
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()?;
            sidecars.push(Kid(c));
        }
        for side in ["a", "b"] {
            wait(&dir.join(format!("{side}.sock")))?;
        }
        Ok(Self {
            dir,
            sidecars,
            vmms: Vec::new(),
            port_b: port_base + 1,
        })
    }

    /// The Unix socket of side "a" or "b".
    pub fn socket(&self, side: &str) -> PathBuf {
        self.dir.join(format!("{side}.sock"))
    }

    /// Starts a VMM process (`args` after the binary), logging to the scratch dir.
    ///
    /// # Errors
    ///
    /// When it cannot be spawned.
    pub fn spawn_vmm(&mut self, binary: &str, name: &str, args: &[String]) -> anyhow::Result<()> {
        let log = std::fs::File::create(self.dir.join(format!("{name}.log")))?;
        let c = Command::new(bin(binary)?)
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        self.vmms.push(Kid(c));
        Ok(())
    }

    /// Waits until `ferry status` on side `side` satisfies `f`.
    ///
    /// # Errors
    ///
    /// After `limit`.
    pub fn wait_status(
        &self,
        side: &str,
        limit: Duration,
        f: impl Fn(&serde_json::Value) -> bool,
    ) -> anyhow::Result<()> {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            let out = Command::new(bin("ferry")?)
                .args(["status", "--json", "--socket"])
                .arg(self.socket(side))
                .output()?;
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) {
                if f(&v) {
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("side {side} did not reach the expected state in {limit:?}")
    }

    /// Waits until the source has a registered VM and the destination a waiting VMM.
    ///
    /// # Errors
    ///
    /// After `limit`.
    pub fn wait_ready(&self, limit: Duration) -> anyhow::Result<()> {
        self.wait_status("a", limit, |v| {
            v["registered"].as_array().is_some_and(|a| !a.is_empty())
        })?;
        self.wait_status("b", limit, |v| {
            v["waiting_incoming"]
                .as_array()
                .is_some_and(|a| !a.is_empty())
        })
    }

    /// Runs `ferry migrate <vm> --json` with `extra` args; returns the summary.
    ///
    /// # Errors
    ///
    /// When no summary comes back.
    pub fn migrate(&self, vm: &str, extra: &[String]) -> anyhow::Result<serde_json::Value> {
        let out = Command::new(bin("ferry")?)
            .args(["migrate", vm, "--json", "--to"])
            .arg(format!("127.0.0.1:{}", self.port_b))
            .arg("--socket")
            .arg(self.socket("a"))
            .args(extra)
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .rev()
            .find(|l| l.starts_with('{'))
            .with_context(|| {
                format!(
                    "no summary; stderr: {}",
                    String::from_utf8_lossy(&out.stderr)
                )
            })?;
        Ok(serde_json::from_str(line)?)
    }

    /// PID of sidecar `i` (0 = source, 1 = destination).
    pub fn sidecar_pid(&self, i: usize) -> u32 {
        self.sidecars[i].0.id()
    }
}

impl Drop for LocalPair {
    fn drop(&mut self) {
        self.vmms.clear();
        self.sidecars.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn wait(p: &Path) -> anyhow::Result<()> {
    let end = Instant::now() + Duration::from_secs(10);
    while Instant::now() < end {
        if p.exists() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("{} did not appear", p.display())
}
