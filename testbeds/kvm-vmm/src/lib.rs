//! ferry-kvm-vmm: a small, real KVM VMM whose guest dirties memory verifiably, for
//! testing and demonstrating Ferry's migrations.
//!
//! The guest is a hand-assembled 64-bit program running at CPL3 (the only mode that runs
//! natively under the project's PVM `/dev/kvm`), 2 vCPUs by default, RAM in memfds mapped
//! `MAP_SHARED`, one KVM slot per region. Each vCPU writes pages with a stamp (page index,
//! generation) and keeps counters in guest memory; [`guest::verify`] checks that record
//! after a migration. The binary (`ferry-kvm-vmm`) runs it standalone, as a migration
//! source or destination through a sidecar, or migrates it within one process.
//!
//! # Quick start
//!
//! ```no_run
//! use ferry_kvm_vmm::guest::{GuestConfig, Pattern};
//! use ferry_kvm_vmm::machine::{Machine, RunOptions};
//! use ferry_kvm_glue::dirty::DirtyModeRequest;
//!
//! # fn main() -> anyhow::Result<()> {
//! let cfg = GuestConfig { ram: 1 << 30, regions: 1, vcpus: 2, pattern: Pattern::Random,
//!                         hot_pages: 0, burst: 64, fill_words: 8 };
//! let opts = RunOptions { rate: 10_000, dirty: DirtyModeRequest::Auto, irqchip: true };
//! let mut m = Machine::boot(cfg, opts)?;
//! m.start()?;
//! std::thread::sleep(std::time::Duration::from_secs(1));
//! m.pause()?;
//! let report = ferry_kvm_vmm::guest::verify(m.ram(), &m.cfg)?;
//! println!("{report:?}");
//! m.stop()?;
//! # Ok(())
//! # }
//! ```
//!
//! # Threads
//!
//! One thread per vCPU (named `vcpuN`), started by [`machine::Machine::start`]; the caller's
//! thread pauses, saves state and reads the dirty log through kvm-glue. With a status file
//! ([`status::StatusFile`]) one more thread rewrites it every 100 ms and ends the process
//! at `--max-runtime-s`.
//!
//! # Migration through a sidecar
//!
//! `ferry-kvm-vmm source` registers the guest with its sidecar (RAM memfds and the CPU
//! profile its vCPUs have) and serves it as a [`migrate::SourceVm`]; `ferry-kvm-vmm dest`
//! waits as a [`migrate::DestVm`], which at load checks the CPU, rebuilds the VM and
//! verifies the guest's record without writing guest RAM, and on start confirms every
//! vCPU's counter moved past the source's paused value: its start line then begins with
//! [`migrate::CONTINUED_MARKER`], which the sidecar reports as `guest_continued`.
//!
//! # Resource cleanup
//!
//! Dropping a [`machine::Machine`] stops and joins its vCPU threads, then closes the VM,
//! then unmaps guest RAM (field order), so KVM never points at unmapped memory.

pub mod device;
pub mod guest;
pub mod machine;
pub mod migrate;
pub mod status;
