//! `ferry_proto::frame::read_frame` with a 1 MiB cap on arbitrary bytes, then the frame
//! decoded as each protocol's message: Ok or Err, never a panic, never an allocation past
//! the cap. A message that decodes survives `write_msg` + `read_msg` unchanged.
#![no_main]

use ferry_fuzz as _; // links the allocation hook behind -malloc_limit_mb (src/lib.rs)
use ferry_proto::cli::CliMsg;
use ferry_proto::common::Message;
use ferry_proto::frame::{read_frame, read_msg, write_msg, RawFrame};
use ferry_proto::peer::PeerMsg;
use ferry_proto::vmm::VmmMsg;
use libfuzzer_sys::fuzz_target;

const CAP: usize = 1 << 20;

fn round_trip<M: Message + PartialEq + std::fmt::Debug>(f: &RawFrame) {
    if let Ok(msg) = f.decode::<M>() {
        let mut wire = Vec::new();
        write_msg(&mut wire, &msg).expect("writing to a Vec");
        let again: M =
            read_msg(&mut &wire[..], usize::MAX).expect("a re-encoded message reads back");
        assert_eq!(again, msg);
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(f) = read_frame(&mut &data[..], CAP) {
        round_trip::<VmmMsg>(&f);
        round_trip::<CliMsg>(&f);
        round_trip::<PeerMsg>(&f);
    }
});
