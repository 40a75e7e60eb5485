//! KVM glue for Rust VMMs: what a VMM links to become migratable by Ferry.
//!
//! KVM's VM and vCPU ioctls only work from the process that created the VM (docs/platform.md:
//! any other process gets `EIO`), so dirty-log reads, pausing and state saving happen
//! inside the VMM. This crate gives a VMM those pieces, on top of `kvm-ioctls`:
//!
//! - [`dirty`]: dirty-page tracking per memory slot, switched on only for a migration
//!   (manual-protect bitmap by default, classic bitmap, or the dirty ring), with the VMM's
//!   own writes ORed in; get-and-clear re-protects before it returns (docs/design.md §2).
//! - [`vcpu`]: pausing vCPU threads promptly (signal + `immediate_exit`), measuring the
//!   pause, resuming, stopping, and lending the parked vCPUs out for state saving.
//! - [`state`]: complete vCPU and VM state save/restore and its versioned blob.
//! - [`cpu`]: the CPU-compatibility profile a destination checks before accepting a VM.
//! - [`endpoint`]: the VMM side of the sidecar protocol (traits the VMM implements and the
//!   socket loop).
//! - [`ioctls`]: the raw KVM calls `kvm-ioctls` lacks, in one place.
//!
//! # Quick start
//!
//! ```no_run
//! use std::time::Duration;
//! use ferry_kvm_glue::dirty::{DirtyModeRequest, DirtyTracker, MemorySlot};
//! use ferry_kvm_glue::vcpu::{RunState, VcpuControl};
//! use ferry_kvm_glue::state::VmState;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let kvm = kvm_ioctls::Kvm::new()?;
//! let vm = kvm.create_vm()?;
//! # let (host_addr, size) = (0u64, 1u64 << 30);
//! let slot = MemorySlot { slot: 0, guest_phys_addr: 0, memory_size: size,
//!                         userspace_addr: host_addr, flags: 0 };
//! // ... KVM_SET_USER_MEMORY_REGION for `slot` as usual ...
//! // SAFETY: the slot is registered with these values and stays mapped.
//! let tracker = unsafe { DirtyTracker::new(&vm, vec![slot], DirtyModeRequest::Auto)? };
//! let control = VcpuControl::new(1)?;
//!
//! let mut vcpu = vm.create_vcpu(0)?;
//! let ctl = control.clone();
//! std::thread::scope(|s| -> Result<(), Box<dyn std::error::Error>> {
//!     s.spawn(move || {
//!         let mut t = ctl.attach(0, &mut vcpu).expect("attach");
//!         while t.checkpoint() == RunState::Run {
//!             match t.run() {
//!                 Ok(None) => continue,     // interrupted: checkpoint parks if paused
//!                 Ok(Some(_exit)) => {}     // handle the exit
//!                 Err(_) => break,
//!             }
//!         }
//!     });
//!     tracker.start(&vm)?;                     // enable logging, then read all of RAM
//!     let round = tracker.get_and_clear(&vm)?; // bitmaps, already re-protected
//!     # let _ = round;
//!     let pause = control.pause(Duration::from_millis(100))?;
//!     println!("paused in {:?}", pause.elapsed);
//!     let last = tracker.get_and_clear(&vm)?;  // complete: nothing runs
//!     # let _ = last;
//!     let blob = control.with_vcpus(|v| VmState::save(&kvm, &vm, v, Vec::new()))??.encode();
//!     # let _ = blob;
//!     tracker.stop(&vm)?;
//!     control.stop(Duration::from_secs(1))?;
//!     Ok(())
//! })?;
//! # Ok(())
//! # }
//! ```
//!
//! # Threads
//!
//! - Every vCPU runs in its own thread, attached with [`vcpu::VcpuControl::attach`]; the
//!   returned [`vcpu::VcpuThread`] stays in that thread (it is `!Send`). Pause, resume and
//!   stop may be called from any thread; the pause signal (`SIGRTMIN`) is reserved.
//! - [`dirty::DirtyTracker`] is shared with `Arc`: `get_and_clear` runs on the migration
//!   thread while vCPU threads call `handle_ring_full` (ring mode); an internal mutex
//!   serialises them. [`dirty::OwnWrites`] is lock-free and may be marked from any thread.
//! - State is saved and restored only while the vCPUs are parked
//!   ([`vcpu::VcpuControl::with_vcpus`]) or before they first run.
//!
//! # Resource cleanup
//!
//! - Call [`dirty::DirtyTracker::stop`] to switch logging off (a tracker dropped while
//!   logging leaves the slots logging; that is harmless but costs write faults).
//! - Dirty-ring mappings are unmapped when the tracker is dropped, in any order relative to
//!   the vCPU fds (the kernel keeps the ring pages until both are gone).
//! - A [`vcpu::VcpuThread`] detaches on drop; [`vcpu::VcpuControl::stop`] waits for every
//!   vCPU thread to detach.

mod codec;
pub mod cpu;
pub mod dirty;
pub mod endpoint;
pub mod error;
pub mod ioctls;
pub mod state;
pub mod vcpu;

pub use error::{Error, Result};
