//! The durable records a daemon reads back at start-up and on `ferry recover`
//! (`ferry_proto::records::parse_decision`, `parse_incoming`, `parse_release`): arbitrary
//! text is parsed or refused with a reason, never a panic. First byte selects which.
#![no_main]

use ferry_fuzz as _; // links the allocation hook behind -malloc_limit_mb (src/lib.rs)
use ferry_proto::records::{parse_decision, parse_incoming, parse_release};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    match which % 3 {
        0 => drop(parse_decision(text)),
        1 => drop(parse_incoming(text)),
        _ => drop(parse_release(text)),
    }
});
