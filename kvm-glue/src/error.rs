//! The crate's error type: one variant per failing operation, with the context to act on it.

use std::io;

/// Errors from kvm-glue's dirty tracking, vCPU control and state save/restore.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A KVM capability this operation needs is not offered by the host kernel.
    #[error("KVM capability {cap} is not available on this host")]
    CapabilityMissing {
        /// Name of the capability (`KVM_CAP_*`).
        cap: &'static str,
    },
    /// `KVM_ENABLE_CAP` failed.
    #[error("Enabling {cap} (arg {arg:#x}) failed")]
    EnableCap {
        /// Name of the capability.
        cap: &'static str,
        /// The argument passed (`args[0]`).
        arg: u64,
        /// The kernel's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// `KVM_SET_USER_MEMORY_REGION` (switching dirty logging on or off) failed.
    #[error("Setting memory slot {slot} with flags {flags:#x} failed")]
    SetMemoryRegion {
        /// The slot id.
        slot: u32,
        /// The flags requested.
        flags: u32,
        /// The kernel's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// `KVM_GET_DIRTY_LOG` failed.
    #[error("Reading the dirty log of slot {slot} failed")]
    GetDirtyLog {
        /// The slot id.
        slot: u32,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
    /// `KVM_CLEAR_DIRTY_LOG` failed.
    #[error("Clearing the dirty log of slot {slot}, pages {first_page}+{num_pages}, failed")]
    ClearDirtyLog {
        /// The slot id.
        slot: u32,
        /// First page of the range (64-aligned).
        first_page: u64,
        /// Pages in the range.
        num_pages: u32,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
    /// Mapping a vCPU's dirty ring failed.
    #[error("Mapping the dirty ring of a vCPU failed")]
    MapDirtyRing(#[source] io::Error),
    /// `KVM_RESET_DIRTY_RINGS` failed.
    #[error("Resetting the dirty rings failed")]
    ResetDirtyRings(#[source] io::Error),
    /// The dirty ring named a slot this tracker does not know.
    #[error("The dirty ring reported slot {slot}, which is not tracked")]
    RingUnknownSlot {
        /// The slot field of the ring entry.
        slot: u32,
    },
    /// The operation needs dirty logging to be on (`DirtyTracker::start`).
    #[error("Dirty logging is not started")]
    NotLogging,
    /// A VMM write was recorded for an address outside every tracked slot.
    #[error("Own write at {gpa:#x}+{len:#x} is outside the tracked memory slots")]
    OwnWriteOutsideSlots {
        /// Guest-physical address of the write.
        gpa: u64,
        /// Length of the write.
        len: u64,
    },
    /// A memory slot description is unusable (empty, unaligned, duplicated).
    #[error("Memory slot {slot} is invalid: {reason}")]
    InvalidSlot {
        /// The slot id.
        slot: u32,
        /// What is wrong.
        reason: &'static str,
    },
    /// Installing the pause signal handler failed.
    #[error("Installing the handler for signal {signal} failed")]
    SignalHandler {
        /// The signal number.
        signal: i32,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Sending the pause signal to a vCPU thread failed.
    #[error("Signalling vCPU {vcpu} failed")]
    SignalVcpu {
        /// The vCPU index.
        vcpu: usize,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Not every vCPU parked within the deadline.
    #[error("{parked} of {expected} vCPUs parked within {waited_us} us")]
    PauseTimeout {
        /// vCPUs that parked.
        parked: usize,
        /// vCPUs that should have parked.
        expected: usize,
        /// How long the caller waited, in microseconds.
        waited_us: u64,
    },
    /// A vCPU or VM state operation is attempted while vCPUs run.
    #[error("The vCPUs must be paused for this operation")]
    NotPaused,
    /// Reading one piece of vCPU state failed.
    #[error("Reading {what} of vCPU {vcpu} failed")]
    GetVcpuState {
        /// The vCPU index.
        vcpu: usize,
        /// The piece of state (`regs`, `sregs`, ...).
        what: &'static str,
        /// The kernel's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Writing one piece of vCPU state failed.
    #[error("Restoring {what} of vCPU {vcpu} failed")]
    SetVcpuState {
        /// The vCPU index.
        vcpu: usize,
        /// The piece of state.
        what: &'static str,
        /// The kernel's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Reading one piece of VM-wide state failed.
    #[error("Reading VM {what} failed")]
    GetVmState {
        /// The piece of state (`clock`, `irqchip`, `pit`).
        what: &'static str,
        /// The kernel's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Writing one piece of VM-wide state failed.
    #[error("Restoring VM {what} failed")]
    SetVmState {
        /// The piece of state.
        what: &'static str,
        /// The kernel's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The blob holds state for a different number of vCPUs than the VM it is loaded into.
    #[error("The state blob has {blob} vCPUs, the VM has {vm}")]
    VcpuCountMismatch {
        /// vCPUs in the blob.
        blob: usize,
        /// vCPUs in the VM.
        vm: usize,
    },
    /// A blob does not start with the expected magic.
    #[error("Not a {what} blob (bad magic)")]
    BadMagic {
        /// Which blob was expected.
        what: &'static str,
    },
    /// A blob has a version this build does not read.
    #[error("{what} blob version {found} is not supported (this build reads version {supported})")]
    UnsupportedVersion {
        /// Which blob.
        what: &'static str,
        /// The version found.
        found: u32,
        /// The version this build reads.
        supported: u32,
    },
    /// A blob ends before a field it announces.
    #[error("Blob truncated in {what}: needs {need} more bytes, {have} left")]
    Truncated {
        /// The field being read.
        what: &'static str,
        /// Bytes needed.
        need: usize,
        /// Bytes left.
        have: usize,
    },
    /// A length or count in a blob exceeds its cap.
    #[error("Blob field {what} has length {len}, above the cap {max}")]
    LengthCap {
        /// The field.
        what: &'static str,
        /// The length found.
        len: u64,
        /// The cap.
        max: u64,
    },
    /// A fixed-size record in a blob has the wrong size.
    #[error("Blob record {what} is {len} bytes, expected {expected}")]
    RecordSize {
        /// The record.
        what: &'static str,
        /// Its length in the blob.
        len: usize,
        /// The size this build expects.
        expected: usize,
    },
    /// A flag byte in a blob is neither 0 nor 1 (blobs have one encoding).
    #[error("Blob field {what} is {value}; 0 or 1 expected")]
    BadFlag {
        /// The field.
        what: &'static str,
        /// The byte found.
        value: u8,
    },
    /// Bytes are left after the last field of a blob.
    #[error("Blob has {bytes} trailing bytes")]
    TrailingBytes {
        /// How many.
        bytes: usize,
    },
    /// The destination CPU cannot run a guest configured with the source's CPUID.
    #[error("CPU incompatible: {reason}")]
    CpuIncompatible {
        /// Every reason, e.g. `vendor AuthenticAMD != GenuineIntel` or the missing features.
        reason: String,
    },
}

/// Shorthand for `std::result::Result<T, kvm_glue::Error>`.
pub type Result<T> = std::result::Result<T, Error>;
