//! The RDMA offer and answer a peer sends (`ferry_verbs::transport::parse_offer`,
//! `parse_answer`: what `RdmaPuller::new` and `RdmaExport::connect` check before any
//! device is touched). First byte selects which.
#![no_main]

use ferry_fuzz as _; // links the allocation hook behind -malloc_limit_mb (src/lib.rs)
use ferry_verbs::transport::{parse_answer, parse_offer};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    if which % 2 == 0 {
        if let Ok((qps, _remote)) = parse_offer(rest) {
            assert!(!qps.is_empty());
        }
    } else if let Ok(qps) = parse_answer(rest) {
        assert!(!qps.is_empty());
    }
});
