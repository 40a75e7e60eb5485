//! `ferry_proto::data::DataHeader::decode` on the first 32 bytes of the input: never
//! panics, and whatever it accepts re-encodes to the very same bytes (every byte of the
//! header is a checked field, so the encoding is canonical) and decodes to the same value.
#![no_main]

use ferry_fuzz as _; // links the allocation hook behind -malloc_limit_mb (src/lib.rs)
use ferry_proto::data::{DataHeader, DATA_HEADER_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(b) = data.first_chunk::<DATA_HEADER_LEN>() else {
        return;
    };
    if let Ok(h) = DataHeader::decode(b) {
        let again = h.encode();
        assert_eq!(&again, b, "re-encoding {h:?} changed the bytes");
        let h2 = DataHeader::decode(&again).expect("a re-encoded header decodes");
        assert_eq!(h2, h);
    }
});
