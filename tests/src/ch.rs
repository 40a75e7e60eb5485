//! Cloud Hypervisor for the end-to-end tests: where the binaries are, the nested-state
//! shim this kind of host needs, and CH processes running Ferry's PVH test guest
//! (`testbeds/ch-guest`) in the test hosts' namespaces.
//!
//! CH is found through `FERRY_CH_BIN` (the `cloud-hypervisor` binary; `ch-remote` next to
//! it), then `PATH`, then `../shared/vmm/cloud-hypervisor/bin` beside the repository.
//!
//! The shim: on a PVM host `KVM_GET_NESTED_STATE` fails with EINVAL (`KVM_CAP_NESTED_STATE`
//! is 0) and unmodified CH aborts every vCPU snapshot, so every migration. The shim
//! answers "no nested state", as a KVM host without a nested guest does; it is built from
//! the C source shipped beside the CH binaries and preloaded only when the capability is
//! missing. A real KVM host needs none.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::Context;
pub use ferry_ch_guest::Progress;

use crate::{bin, wait_for, Proc, TwoHosts};

/// The repository's parent: `../shared` lives there.
fn beside_repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap_or_else(|_| PathBuf::from("/nonexistent"))
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|f| f.is_file())
    })
}

/// The `cloud-hypervisor` binary, if there is one.
pub fn ch_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("FERRY_CH_BIN").map(PathBuf::from) {
        return p.is_file().then_some(p);
    }
    on_path("cloud-hypervisor").or_else(|| {
        let p = beside_repo().join("shared/vmm/cloud-hypervisor/bin/cloud-hypervisor");
        p.is_file().then_some(p)
    })
}

/// `ch-remote`, next to the `cloud-hypervisor` found.
pub fn ch_remote_bin() -> Option<PathBuf> {
    let p = ch_bin()?.with_file_name("ch-remote");
    p.is_file().then_some(p).or_else(|| on_path("ch-remote"))
}

/// Fails the test unless Cloud Hypervisor was found (tests asking for it explicitly).
pub fn require_ch() -> PathBuf {
    ch_bin().unwrap_or_else(|| {
        panic!("this test needs Cloud Hypervisor: set FERRY_CH_BIN, put cloud-hypervisor on PATH, or provide ../shared/vmm/cloud-hypervisor/bin")
    })
}

/// Whether `/dev/kvm` reports `KVM_CAP_NESTED_STATE`.
fn has_nested_state() -> bool {
    const KVM_CHECK_EXTENSION: libc::c_ulong = 0xae03;
    const KVM_CAP_NESTED_STATE: libc::c_ulong = 157;
    let Ok(f) = std::fs::File::open("/dev/kvm") else {
        return false;
    };
    // SAFETY: KVM_CHECK_EXTENSION takes an integer and touches no memory of ours.
    let r = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            KVM_CHECK_EXTENSION,
            KVM_CAP_NESTED_STATE,
        )
    };
    r > 0
}

/// The shim to preload into CH on this host, built once; `None` when KVM has nested state.
///
/// # Errors
///
/// The host needs the shim and it cannot be built.
pub fn shim() -> anyhow::Result<Option<PathBuf>> {
    static SHIM: OnceLock<Result<Option<PathBuf>, String>> = OnceLock::new();
    SHIM.get_or_init(|| {
        if has_nested_state() {
            return Ok(None);
        }
        let src = ch_bin()
            .and_then(|b| Some(b.parent()?.parent()?.join("nested-state-shim.c")))
            .filter(|p| p.is_file())
            .ok_or("this host lacks KVM_CAP_NESTED_STATE and no nested-state-shim.c is beside the CH binaries")?;
        let out = bin("ferry").with_file_name("ch-nested-state-shim.so");
        let o = Command::new("cc")
            .args(["-shared", "-fPIC", "-O2", "-o"])
            .arg(&out)
            .arg(&src)
            .arg("-ldl")
            .output()
            .map_err(|e| format!("cc: {e}"))?;
        if !o.status.success() {
            return Err(format!(
                "building the shim failed: {}",
                String::from_utf8_lossy(&o.stderr)
            ));
        }
        Ok(Some(out))
    })
    .clone()
    .map_err(|e| anyhow::anyhow!(e))
}

/// Writes the PVH test guest kernel into `dir` and returns its path.
///
/// # Errors
///
/// The file cannot be written.
pub fn guest_kernel(dir: &Path) -> anyhow::Result<PathBuf> {
    let p = dir.join("guest.elf");
    std::fs::write(&p, ferry_ch_guest::GUEST_ELF)?;
    Ok(p)
}

/// A `cloud-hypervisor` process in host `i`'s namespace.
pub struct Ch {
    /// The process.
    pub proc: Proc,
    /// Its API socket.
    pub api: PathBuf,
    /// Its guest's serial log (source VMs).
    pub serial: PathBuf,
}

impl Ch {
    /// Starts CH in host `i` as `name`: with `kernel`, a VM of `mem_mib` MiB (`shared=on`
    /// when `shared`) running it; without, an empty CH waiting to receive a migration.
    ///
    /// # Errors
    ///
    /// CH missing, or its API socket not appearing.
    pub fn start(
        hosts: &TwoHosts,
        i: usize,
        name: &str,
        kernel: Option<&Path>,
        mem_mib: u64,
        shared: bool,
    ) -> anyhow::Result<Self> {
        let ch = require_ch();
        let api = hosts.path(&format!("{name}.api"));
        let serial = hosts.path(&format!("{name}.serial"));
        let _ = std::fs::remove_file(&api);
        let mut c = hosts.cmd(i, &ch);
        c.arg("--api-socket")
            .arg(&api)
            .args(["--seccomp", "log", "-v"]);
        if let Some(k) = kernel {
            c.arg("--kernel")
                .arg(k)
                .args(["--cpus", "boot=1"])
                .arg("--memory")
                .arg(format!(
                    "size={mem_mib}M{}",
                    if shared { ",shared=on" } else { "" }
                ))
                .arg("--serial")
                .arg(format!("file={}", serial.display()))
                .args(["--console", "off"]);
        }
        if let Some(s) = shim()? {
            c.env("LD_PRELOAD", s);
        }
        let proc = Proc::spawn(name, c, hosts.path(&format!("{name}.log")))?;
        wait_for(
            &format!("{name}'s API socket"),
            Duration::from_secs(10),
            || api.exists(),
        )?;
        Ok(Self { proc, api, serial })
    }

    /// `ch-remote --api-socket <api> <args>` in host `i`, as a child (send-migration
    /// returns at once; receive-migration blocks until the migration ends).
    ///
    /// # Errors
    ///
    /// `ch-remote` missing or not starting.
    pub fn remote(
        &self,
        hosts: &TwoHosts,
        i: usize,
        args: &[&str],
    ) -> anyhow::Result<std::process::Child> {
        let r = ch_remote_bin().context("ch-remote is missing beside cloud-hypervisor")?;
        Ok(hosts
            .cmd(i, &r)
            .arg("--api-socket")
            .arg(&self.api)
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?)
    }

    /// The VM's state from CH's API (`vm.info`): "Running", "Paused", ...; `None` without
    /// a VM.
    ///
    /// # Errors
    ///
    /// CH not answering.
    pub fn vm_state(&self) -> anyhow::Result<Option<String>> {
        ferry_ch::api::vm_state(&self.api)
    }

    /// The guest's progress as its serial log shows it.
    pub fn guest(&self) -> Progress {
        ferry_ch_guest::progress(&self.serial)
    }
}
