//! The blobs a source VMM sends a destination VMM: the vCPU and VM state
//! (`ferry_kvm_glue::state::VmState::decode`) and the CPU profile
//! (`ferry_kvm_glue::cpu::CpuProfile::decode`). First byte selects which. What decodes
//! re-encodes to the same bytes.
#![no_main]

use ferry_fuzz as _; // links the allocation hook behind -malloc_limit_mb (src/lib.rs)
use ferry_kvm_glue::cpu::CpuProfile;
use ferry_kvm_glue::state::VmState;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    if which % 2 == 0 {
        if let Ok(s) = VmState::decode(rest) {
            assert_eq!(s.encode(), rest);
        }
    } else if let Ok(p) = CpuProfile::decode(rest) {
        assert_eq!(p.encode(), rest);
    }
});
