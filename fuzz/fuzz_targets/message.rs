//! Every message of the three protocols (VMM, CLI, peer), payload by payload: input =
//! protocol selector (1 byte) + tag (2 bytes, LE) + payload. Decoding is Ok or Err, never a
//! panic or an allocation past the caps; what decodes re-encodes to the same payload.
#![no_main]

use ferry_fuzz as _; // links the allocation hook behind -malloc_limit_mb (src/lib.rs)
use ferry_proto::cli::CliMsg;
use ferry_proto::common::{decode_payload, encode_payload, Message};
use ferry_proto::peer::PeerMsg;
use ferry_proto::vmm::VmmMsg;
use libfuzzer_sys::fuzz_target;

fn check<M: Message + PartialEq + std::fmt::Debug>(tag: u16, payload: &[u8]) {
    if let Ok(m) = decode_payload::<M>(tag, payload) {
        assert_eq!(m.tag(), tag);
        assert_eq!(
            encode_payload(&m),
            payload,
            "{m:?} does not re-encode to its payload"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let tag = u16::from_le_bytes([data[1], data[2]]) % 64;
    let payload = &data[3..];
    match data[0] % 3 {
        0 => check::<VmmMsg>(tag, payload),
        1 => check::<CliMsg>(tag, payload),
        _ => check::<PeerMsg>(tag, payload),
    }
});
