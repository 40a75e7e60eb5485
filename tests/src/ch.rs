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

/// The `cloud-hypervisor` binary, if there is one.
pub fn ch_bin() -> Option<PathBuf> {
    ferry_ch::host::ch_bin(&beside_repo())
}

/// `ch-remote`, next to the `cloud-hypervisor` found.
pub fn ch_remote_bin() -> Option<PathBuf> {
    let p = ch_bin()?.with_file_name("ch-remote");
    p.is_file().then_some(p)
}

/// Fails the test unless Cloud Hypervisor was found (tests asking for it explicitly).
pub fn require_ch() -> PathBuf {
    ch_bin().unwrap_or_else(|| {
        panic!("this test needs Cloud Hypervisor: set FERRY_CH_BIN, put cloud-hypervisor on PATH, or provide ../shared/vmm/cloud-hypervisor/bin")
    })
}

/// The shim to preload into CH on this host, built once; `None` when KVM has nested state.
///
/// # Errors
///
/// The host needs the shim and it cannot be built.
pub fn shim() -> anyhow::Result<Option<PathBuf>> {
    static SHIM: OnceLock<Result<Option<PathBuf>, String>> = OnceLock::new();
    SHIM.get_or_init(|| {
        let ch = ch_bin().ok_or("no Cloud Hypervisor")?;
        ferry_ch::host::shim(&ch, &bin("ferry").with_file_name("ch-nested-state-shim.so"))
            .map_err(|e| format!("{e:#}"))
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
