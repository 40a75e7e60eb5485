//! Running an unmodified CH on this host, for Ferry's tests and benchmarks: where the
//! binaries are, and the nested-state shim a PVM host needs.
//!
//! CH is found through `FERRY_CH_BIN` (the `cloud-hypervisor` binary; `ch-remote` next to
//! it), then `PATH`, then `<beside>/shared/vmm/cloud-hypervisor/bin` (`beside`: the
//! directory holding the repository).
//!
//! The shim: where `/dev/kvm` lacks `KVM_CAP_NESTED_STATE` (the PVM hosts this project is
//! developed on), `KVM_GET_NESTED_STATE` fails with EINVAL and unmodified CH aborts every
//! vCPU snapshot, so every migration. The shim answers "no nested state", as a KVM host
//! without a nested guest does; it is built from the C source shipped beside the CH
//! binaries, and only where the capability is missing. A real KVM host needs none.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|f| f.is_file())
    })
}

/// The `cloud-hypervisor` binary, if there is one (`beside`: the repository's parent).
pub fn ch_bin(beside: &Path) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("FERRY_CH_BIN").map(PathBuf::from) {
        return p.is_file().then_some(p);
    }
    on_path("cloud-hypervisor").or_else(|| {
        let p = beside.join("shared/vmm/cloud-hypervisor/bin/cloud-hypervisor");
        p.is_file().then_some(p)
    })
}

/// Whether `/dev/kvm` reports `KVM_CAP_NESTED_STATE`.
pub fn has_nested_state() -> bool {
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

/// Builds the shim to preload into CH at `out`, where this host needs it; `None` where
/// KVM has nested state.
///
/// # Errors
///
/// The host needs the shim and its source is missing, or `cc` fails.
pub fn shim(ch: &Path, out: &Path) -> anyhow::Result<Option<PathBuf>> {
    if has_nested_state() {
        return Ok(None);
    }
    let src = ch
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("nested-state-shim.c"))
        .filter(|p| p.is_file())
        .context("this host lacks KVM_CAP_NESTED_STATE and no nested-state-shim.c is beside the CH binaries")?;
    let o = Command::new("cc")
        .args(["-shared", "-fPIC", "-O2", "-o"])
        .arg(out)
        .arg(&src)
        .arg("-ldl")
        .output()
        .context("running cc")?;
    if !o.status.success() {
        bail!(
            "building the shim failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok(Some(out.to_owned()))
}
