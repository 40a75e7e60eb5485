//! The Unix socket's receive path (`recv_frame_with_fds`: `recvmsg` for the header, then
//! the payload), fed through a real socket pair: arbitrary bytes are Ok or Err, never a
//! panic or an allocation past the cap.
#![no_main]

use std::io::Write;
use std::os::unix::net::UnixStream;

use ferry_fuzz as _; // links the allocation hook behind -malloc_limit_mb (src/lib.rs)
use ferry_proto::frame::recv_frame_with_fds;
use ferry_proto::vmm::VmmMsg;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() > 60_000 {
        return; // fits the socket buffer: written before it is read, in one thread
    }
    let (mut a, b) = UnixStream::pair().expect("socketpair");
    a.write_all(data).expect("write");
    drop(a);
    if let Ok((f, fds)) = recv_frame_with_fds(&b, 1 << 20) {
        assert!(fds.is_empty());
        let _ = f.decode::<VmmMsg>();
    }
});
