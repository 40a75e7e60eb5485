//! Tests that need a real RDMA device: run inside the SoftRoCE guest by
//! `scripts/rdma-tests.sh` (one `rxe0` on `lo`, both ends of every connection on
//! that one device, over loopback).
//!
//! Each test is `#[ignore]`d, so a host without RDMA lists it as ignored rather than
//! passed; `scripts/rdma-tests.sh` runs them with `--include-ignored`, and an explicitly
//! requested test that finds no device fails.

use std::collections::HashSet;
use std::os::fd::{FromRawFd, OwnedFd};
use std::ptr;
use std::time::{Duration, Instant};

use ferry_verbs::{
    CompletionBuffer, ConnectedQp, Context, Error, GidType, LinkLayer, LocalWrite, MemoryRegion,
    PortState, ProtectionDomain, QpEndpoint, ReadCompletion, ReadRequest, RemoteMemory, RemoteRead,
    RemoteRegion, WcError,
};

/// Opens the test device; fails the test when there is none.
fn device() -> Context {
    let name = std::env::var("RXE_DEV").ok();
    let opened = match &name {
        Some(n) => Context::open(n),
        None => Context::open_first(),
    };
    match opened {
        Ok(ctx) => ctx,
        Err(e) if e.is_no_rdma() => {
            panic!("this test needs an RDMA device and there is none: {e}")
        }
        Err(e) => panic!("cannot open the RDMA device: {e}"),
    }
}

/// GID index to use: `RXE_GID_INDEX` if set, else the device's RoCE v2 IPv4 GID.
fn gid_index(ctx: &Context) -> u8 {
    if let Some(i) = std::env::var("RXE_GID_INDEX")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        return i;
    }
    let g = ctx.roce_v2_ipv4_gid(1).expect("RoCE v2 IPv4 GID");
    u8::try_from(g.index).expect("small GID index")
}

/// A `MAP_SHARED` mapping of a memfd, like guest RAM handed over by a VMM.
struct SharedMapping {
    ptr: *mut u8,
    len: usize,
    _fd: OwnedFd,
}

impl SharedMapping {
    fn new(len: usize) -> SharedMapping {
        // SAFETY: valid NUL-terminated name; flags are plain bits.
        let fd = unsafe { libc::memfd_create(c"ferry-rxe-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` was just returned to us and is owned only here.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        use std::os::fd::AsRawFd;
        // SAFETY: valid fd, plain length.
        let rc = unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) };
        assert_eq!(rc, 0, "ftruncate: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh shared mapping of our own memfd; unmapped in Drop.
        let p = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        assert_ne!(
            p,
            libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        SharedMapping {
            ptr: p.cast(),
            len,
            _fd: fd,
        }
    }

    fn addr(&self) -> u64 {
        self.ptr as u64
    }

    /// Fill with a position-dependent pattern (no RDMA may be in flight).
    fn fill_pattern(&mut self, seed: u64) {
        for i in 0..self.len / 8 {
            let v = (i as u64 ^ seed)
                .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                .rotate_left(17);
            // SAFETY: `i * 8 + 8 <= len`; the mapping is ours, no device
            // access is in flight while we fill it.
            unsafe { ptr::write_unaligned(self.ptr.add(i * 8).cast::<u64>(), v) };
        }
    }

    /// Copy the contents out (volatile-safe: a raw copy into a buffer we own).
    fn snapshot(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.len];
        // SAFETY: both ranges are `len` bytes and do not overlap.
        unsafe { ptr::copy_nonoverlapping(self.ptr, v.as_mut_ptr(), self.len) };
        v
    }

    /// # Safety
    /// As `ProtectionDomain::register`: `self` must outlive the region.
    unsafe fn register_in<A: ferry_verbs::Access>(
        &self,
        pd: &ProtectionDomain,
        max_piece: u64,
    ) -> MemoryRegion<A> {
        // SAFETY: forwarded to the caller.
        unsafe { pd.register_in_pieces::<A>(self.ptr, self.len, max_piece) }
            .expect("register memfd mapping")
    }
}

impl Drop for SharedMapping {
    fn drop(&mut self) {
        // SAFETY: our own mapping; every test drops its regions first.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Create a reader QP (in `reader_pd`) and a responder QP (in `source_pd`)
/// and connect them to each other on the one device, exchanging endpoints
/// through their wire encoding as two hosts would.
fn connect_pair(
    ctx: &Context,
    reader_pd: &ProtectionDomain,
    source_pd: &ProtectionDomain,
    gid: u8,
) -> (ConnectedQp, ConnectedQp) {
    let reader = reader_pd
        .create_qp(ctx.create_cq(256).expect("cq"), 1)
        .expect("reader qp");
    let responder = source_pd
        .create_qp(ctx.create_cq(16).expect("cq"), 1)
        .expect("responder qp");
    let er = reader.endpoint(gid).expect("reader endpoint");
    let es = responder.endpoint(gid).expect("responder endpoint");
    let er = QpEndpoint::from_bytes(&er.to_bytes()).expect("decode");
    let es = QpEndpoint::from_bytes(&es.to_bytes()).expect("decode");
    assert_eq!(er.gid, es.gid, "one device serves both ends");
    let reader = reader.connect(gid, &es).expect("connect reader");
    let responder = responder.connect(gid, &er).expect("connect responder");
    (reader, responder)
}

/// The source's regions as the destination receives them: encoded, decoded,
/// validated.
fn advertise(regions: &[RemoteRegion]) -> RemoteMemory {
    let wire: Vec<u8> = regions.iter().flat_map(|r| r.to_bytes()).collect();
    let decoded = wire
        .chunks(RemoteRegion::ENCODED_LEN)
        .map(RemoteRegion::from_bytes)
        .collect::<Result<Vec<_>, _>>()
        .expect("decode regions");
    RemoteMemory::new(decoded).expect("valid regions")
}

/// Poll `qp` until nothing is outstanding; returns every completion.
fn drain(qp: &mut ConnectedQp, buf: &mut CompletionBuffer, limit: Duration) -> Vec<ReadCompletion> {
    let deadline = Instant::now() + limit;
    let mut all = Vec::new();
    while qp.outstanding() > 0 {
        all.extend(qp.poll(buf).expect("poll"));
        assert!(
            Instant::now() < deadline,
            "{} READs still outstanding on QP {} after {limit:?}",
            qp.outstanding(),
            qp.qpn()
        );
    }
    all.extend(qp.poll(buf).expect("poll"));
    all
}

#[test]
#[ignore = "needs an RDMA device: scripts/rdma-tests.sh runs it in the SoftRoCE guest"]
fn lists_devices_ports_and_gids() {
    let ctx = device();
    let list = ferry_verbs::devices().expect("device list");
    assert!(
        list.iter().any(|d| d.name == ctx.name()),
        "{} not in {list:?}",
        ctx.name()
    );

    let port = ctx.port(1).expect("port 1");
    assert_eq!(port.state, PortState::Active, "{port:?}");
    assert_eq!(
        port.link_layer,
        LinkLayer::Ethernet,
        "rxe is RoCE: {port:?}"
    );
    assert!(port.active_mtu.bytes().is_some(), "{port:?}");
    assert!(port.max_msg_size >= 1 << 20, "{port:?}");

    let gids = ctx.gid_table(1).expect("gid table");
    let loopback = gids
        .iter()
        .find(|g| g.gid.to_string() == "::ffff:127.0.0.1" && g.kind == GidType::RoceV2)
        .unwrap_or_else(|| panic!("no RoCE v2 ::ffff:127.0.0.1 in {gids:?}"));
    let selected = ctx.roce_v2_ipv4_gid(1).expect("RoCE v2 IPv4 GID");
    assert_eq!(selected.index, loopback.index);
    if ctx.name() == "rxe0" {
        assert_eq!(
            selected.index, 1,
            "rxe over lo puts ::ffff:127.0.0.1 at index 1"
        );
    }
    assert_eq!(
        ctx.gid(1, selected.index).expect("query gid").0,
        selected.gid.0
    );

    let limits = ctx.limits();
    assert!(limits.max_qp > 4 && limits.max_qp_rd_atom > 0 && limits.max_mr_size > 0);

    let report = ctx.report().expect("report");
    let text = report.to_string();
    println!("{text}");
    assert!(text.starts_with(ctx.name()), "{text}");
    assert!(text.contains("NUMA node"), "{text}");
    assert!(text.contains("link layer Ethernet"), "{text}");
    assert!(
        text.contains(&format!("gid[{}] ::ffff:127.0.0.1 RoCE v2", selected.index)),
        "{text}"
    );
    assert!(ferry_verbs::device_reports()
        .expect("reports")
        .iter()
        .any(|r| r.name == ctx.name()));
}

#[test]
#[ignore = "needs an RDMA device: scripts/rdma-tests.sh runs it in the SoftRoCE guest"]
fn pulls_64_mib_over_four_qps_and_every_byte_matches() {
    let ctx = device();
    let gid = gid_index(&ctx);
    const LEN: usize = 64 << 20;
    const RANGE: u64 = 256 << 10;
    const QPS: usize = 4;

    // Source side: pattern-filled guest RAM, REMOTE_READ, in 3 pieces of
    // 24 MiB (forces piecewise registration even though rxe allows any size).
    let source_pd = ctx.alloc_pd().expect("source pd");
    let mut src = SharedMapping::new(LEN);
    src.fill_pattern(0xfe77);
    // SAFETY: `src` outlives `src_mr` (dropped at the end of this test,
    // declared later so dropped earlier); only the NIC reads it meanwhile.
    let src_mr: MemoryRegion<RemoteRead> = unsafe { src.register_in(&source_pd, 24 << 20) };
    assert_eq!(src_mr.piece_count(), 3);
    let remote = advertise(&src_mr.remote_regions());

    // Destination side: zeroed RAM, LOCAL_WRITE, pieces of 20 MiB (piece
    // boundaries differ from the source's, so READs split at both).
    let dest_pd = ctx.alloc_pd().expect("dest pd");
    let dst = SharedMapping::new(LEN);
    // SAFETY: `dst` outlives `dst_mr`; we only read it after all READs completed.
    let dst_mr: MemoryRegion<LocalWrite> = unsafe { dst.register_in(&dest_pd, 20 << 20) };
    assert_eq!(dst_mr.piece_count(), 4);

    let mut pairs: Vec<(ConnectedQp, ConnectedQp)> = (0..QPS)
        .map(|_| connect_pair(&ctx, &dest_pd, &source_pd, gid))
        .collect();
    for (qp, _) in &mut pairs {
        qp.set_max_read_len(64 << 10); // 4+ READs per range: exercises splitting
    }

    // Deal the ranges round-robin to the QPs, as a puller would.
    let ranges: Vec<ReadRequest> = (0..LEN as u64 / RANGE)
        .map(|i| ReadRequest {
            wr_id: i,
            local_addr: dst.addr() + i * RANGE,
            remote_addr: src.addr() + i * RANGE,
            len: RANGE,
        })
        .collect();
    let mut queues: Vec<Vec<ReadRequest>> = vec![Vec::new(); QPS];
    for (i, r) in ranges.iter().enumerate() {
        queues[i % QPS].push(*r);
    }
    let mut next = [0usize; QPS];
    let mut done = HashSet::new();
    let mut buf = CompletionBuffer::new(256);
    let mut max_outstanding = [0usize; QPS];
    let t0 = Instant::now();
    while done.len() < ranges.len() {
        for (q, (qp, _)) in pairs.iter_mut().enumerate() {
            if next[q] < queues[q].len() {
                next[q] += qp
                    .post_reads(&dst_mr, &remote, &queues[q][next[q]..])
                    .expect("post");
            }
            max_outstanding[q] = max_outstanding[q].max(qp.outstanding());
            assert!(qp.outstanding() <= qp.capacity());
            for c in qp.poll(&mut buf).expect("poll") {
                assert_eq!(c.status, Ok(()), "range {} failed: {c:?}", c.wr_id);
                assert_eq!(c.len, RANGE);
                assert!(done.insert(c.wr_id), "range {} reported twice", c.wr_id);
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "pull too slow: {} done",
            done.len()
        );
    }
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "pulled 64 MiB in {secs:.2} s ({:.1} MB/s) over {QPS} QPs; max outstanding per QP {max_outstanding:?} (capacity {})",
        LEN as f64 / secs / 1e6,
        pairs[0].0.capacity()
    );
    for (qp, _) in &pairs {
        assert_eq!(qp.outstanding(), 0);
        assert_eq!(qp.pending_requests(), 0);
        assert!(!qp.is_failed());
    }
    assert!(
        max_outstanding.iter().all(|&m| m > 1),
        "QPs were never kept busy"
    );

    let (want, got) = (src.snapshot(), dst.snapshot());
    if let Some(off) = want.iter().zip(&got).position(|(a, b)| a != b) {
        panic!(
            "first differing byte at offset {off:#x}: want {:#x} got {:#x}",
            want[off], got[off]
        );
    }
    assert_eq!(want.len(), got.len());
}

#[test]
#[ignore = "needs an RDMA device: scripts/rdma-tests.sh runs it in the SoftRoCE guest"]
fn reads_outside_the_region_or_with_a_wrong_rkey_fail_with_remote_access_error() {
    let ctx = device();
    let gid = gid_index(&ctx);
    const LEN: usize = 64 << 10;
    let source_pd = ctx.alloc_pd().expect("pd");
    let dest_pd = ctx.alloc_pd().expect("pd");
    let mut src = SharedMapping::new(2 * LEN);
    src.fill_pattern(1);
    let dst = SharedMapping::new(LEN);
    // SAFETY: only the first half of `src` is registered; both mappings
    // outlive their regions.
    let src_mr: MemoryRegion<RemoteRead> =
        unsafe { source_pd.register::<RemoteRead>(src.ptr, LEN) }.expect("register");
    // SAFETY: as above.
    let dst_mr: MemoryRegion<LocalWrite> = unsafe { dst.register_in(&dest_pd, u64::MAX) };
    let real = src_mr.remote_regions();
    assert_eq!(real.len(), 1);
    let real = real[0];

    let cases = [
        // A peer advertising more than it registered: the READ goes past the MR.
        (
            "beyond the registered range",
            RemoteRegion {
                len: real.len * 2,
                ..real
            },
            real.addr + real.len,
        ),
        // A stale or forged rkey.
        (
            "wrong rkey",
            RemoteRegion {
                rkey: real.rkey ^ 0x0000_ff00,
                ..real
            },
            real.addr,
        ),
    ];
    for (what, advertised, remote_addr) in cases {
        let (mut qp, _responder) = connect_pair(&ctx, &dest_pd, &source_pd, gid);
        let remote = RemoteMemory::new(vec![advertised]).expect("valid-looking regions");
        let reqs = [
            ReadRequest {
                wr_id: 1,
                local_addr: dst.addr(),
                remote_addr,
                len: 4096,
            },
            ReadRequest {
                wr_id: 2,
                local_addr: dst.addr() + 4096,
                remote_addr: real.addr,
                len: 4096,
            },
        ];
        assert_eq!(qp.post_reads(&dst_mr, &remote, &reqs).expect("post"), 2);
        let mut buf = CompletionBuffer::new(8);
        let all = drain(&mut qp, &mut buf, Duration::from_secs(30));
        println!("{what}: {all:?}");
        assert_eq!(all.len(), 2, "{what}: every accepted request is reported");
        assert_eq!(all[0].wr_id, 1);
        assert_eq!(all[0].status, Err(WcError::RemoteAccessError), "{what}");
        assert_eq!(
            all[1].status,
            Err(WcError::WrFlushErr),
            "{what}: work behind the failure is flushed"
        );
        assert!(qp.is_failed(), "{what}");
        assert!(
            matches!(
                qp.post_reads(&dst_mr, &remote, &reqs),
                Err(Error::QpFailed { .. })
            ),
            "{what}: a failed QP refuses new work"
        );
    }

    // Requests that cannot be right are refused before anything is posted.
    let (mut qp, _responder) = connect_pair(&ctx, &dest_pd, &source_pd, gid);
    let remote = RemoteMemory::new(vec![real]).expect("regions");
    let outside_local = ReadRequest {
        wr_id: 9,
        local_addr: dst.addr() + 4096,
        remote_addr: real.addr,
        len: LEN as u64,
    };
    assert!(matches!(
        qp.post_reads(&dst_mr, &remote, &[outside_local]),
        Err(Error::LocalRangeNotRegistered { wr_id: 9, .. })
    ));
    let outside_remote = ReadRequest {
        wr_id: 10,
        local_addr: dst.addr(),
        remote_addr: real.addr + 1,
        len: LEN as u64,
    };
    assert!(matches!(
        qp.post_reads(&dst_mr, &remote, &[outside_remote]),
        Err(Error::RemoteRangeNotAdvertised { wr_id: 10, .. })
    ));
    qp.set_outstanding_limit(4);
    qp.set_max_read_len(4096);
    let too_many_reads = ReadRequest {
        wr_id: 11,
        local_addr: dst.addr(),
        remote_addr: real.addr,
        len: 8 * 4096,
    };
    assert!(matches!(
        qp.post_reads(&dst_mr, &remote, &[too_many_reads]),
        Err(Error::ReadTooLarge {
            wr_id: 11,
            reads: 8,
            limit: 4
        })
    ));
    assert_eq!(qp.outstanding(), 0);
    // With that limit, a batch takes only what fits: 4 READs = 2 requests of 2.
    let two_reads: Vec<ReadRequest> = (0..4)
        .map(|i| ReadRequest {
            wr_id: 20 + i,
            local_addr: dst.addr() + i * 8192,
            remote_addr: real.addr + i * 8192,
            len: 8192,
        })
        .collect();
    assert_eq!(
        qp.post_reads(&dst_mr, &remote, &two_reads).expect("post"),
        2
    );
    assert_eq!(qp.outstanding(), 4);
    let mut buf = CompletionBuffer::new(8);
    let all = drain(&mut qp, &mut buf, Duration::from_secs(30));
    assert_eq!(
        all.iter().map(|c| c.wr_id).collect::<Vec<_>>(),
        vec![20, 21]
    );
    assert!(all.iter().all(ReadCompletion::is_ok), "{all:?}");
    let (want, got) = (src.snapshot(), dst.snapshot());
    assert_eq!(&got[..4 * 4096], &want[..4 * 4096]);
}

#[test]
#[ignore = "needs an RDMA device: scripts/rdma-tests.sh runs it in the SoftRoCE guest"]
fn forced_error_state_flushes_outstanding_reads_with_typed_errors() {
    let ctx = device();
    let gid = gid_index(&ctx);
    const LEN: usize = 8 << 20;
    let source_pd = ctx.alloc_pd().expect("pd");
    let dest_pd = ctx.alloc_pd().expect("pd");
    let mut src = SharedMapping::new(LEN);
    src.fill_pattern(2);
    let dst = SharedMapping::new(LEN);
    // SAFETY: both mappings outlive their regions.
    let src_mr: MemoryRegion<RemoteRead> = unsafe { src.register_in(&source_pd, u64::MAX) };
    // SAFETY: as above.
    let dst_mr: MemoryRegion<LocalWrite> = unsafe { dst.register_in(&dest_pd, u64::MAX) };
    let remote = advertise(&src_mr.remote_regions());
    let reqs: Vec<ReadRequest> = (0..(LEN as u64 / (64 << 10)))
        .map(|i| ReadRequest {
            wr_id: 1000 + i,
            local_addr: dst.addr() + i * (64 << 10),
            remote_addr: src.addr() + i * (64 << 10),
            len: 64 << 10,
        })
        .collect();

    // On rxe over lo a READ can complete inside `ibv_post_send` itself, so to
    // catch work in flight the peer's QP is put in ERR first (a dead peer:
    // it drops our requests and they wait for the retry timer).
    let (mut qp, mut responder) = connect_pair(&ctx, &dest_pd, &source_pd, gid);
    responder.force_error().expect("responder to ERR");
    qp.set_max_read_len(16 << 10);
    let accepted = qp.post_reads(&dst_mr, &remote, &reqs).expect("post");
    assert!(accepted > 0 && accepted < reqs.len(), "accepted {accepted}");
    assert_eq!(qp.outstanding(), accepted * 4);
    // Now force our own QP into ERR: everything outstanding is flushed.
    qp.force_error().expect("modify to ERR");
    assert!(qp.is_failed());
    let mut buf = CompletionBuffer::new(64);
    let all = drain(&mut qp, &mut buf, Duration::from_secs(60));
    let flushed = all
        .iter()
        .filter(|c| c.status == Err(WcError::WrFlushErr))
        .count();
    println!(
        "forced ERR with {accepted} ranges accepted: {flushed} flushed, all: {:?}",
        all.iter().map(|c| c.status).collect::<HashSet<_>>()
    );
    assert_eq!(
        all.len(),
        accepted,
        "every accepted range is reported exactly once"
    );
    assert!(
        all.iter()
            .all(|c| matches!(c.status, Err(WcError::WrFlushErr | WcError::RetryExceeded))),
        "{all:?}"
    );
    assert!(flushed > 0, "nothing was flushed: {all:?}");
    let ids: HashSet<u64> = all.iter().map(|c| c.wr_id).collect();
    assert_eq!(ids, reqs[..accepted].iter().map(|r| r.wr_id).collect());
    assert!(matches!(
        qp.post_reads(&dst_mr, &remote, &reqs[accepted..]),
        Err(Error::QpFailed { .. })
    ));
    assert_eq!(qp.outstanding(), 0);
    assert!(qp.into_unfinished().is_empty());

    // Note: a dead peer alone (its QP in ERR, ours left alone) was NOT
    // detected by rxe within 120 s (no RetryExceeded), so the engine must
    // apply its own progress timeout and call `force_error`, as done above.

    // Giving up on a QP without draining hands back every unreported range.
    let (mut qp, mut responder) = connect_pair(&ctx, &dest_pd, &source_pd, gid);
    responder.force_error().expect("responder to ERR");
    let accepted = qp.post_reads(&dst_mr, &remote, &reqs[..8]).expect("post");
    assert_eq!(accepted, 8);
    qp.force_error().expect("modify to ERR");
    let unfinished = qp.into_unfinished();
    assert_eq!(
        unfinished,
        reqs[..8].iter().map(|r| r.wr_id).collect::<Vec<_>>()
    );
}

#[test]
#[ignore = "needs an RDMA device: scripts/rdma-tests.sh runs it in the SoftRoCE guest"]
fn a_read_with_the_rkey_of_a_deregistered_region_fails() {
    // What happens to a migration's source memory when the migration ends: its region is
    // deregistered, and a READ with the old rkey (a peer that kept it) is refused.
    let ctx = device();
    let gid = gid_index(&ctx);
    const LEN: usize = 64 << 10;
    let source_pd = ctx.alloc_pd().expect("pd");
    let dest_pd = ctx.alloc_pd().expect("pd");
    let mut src = SharedMapping::new(LEN);
    src.fill_pattern(7);
    let dst = SharedMapping::new(LEN);
    // SAFETY: both mappings outlive their regions.
    let src_mr: MemoryRegion<RemoteRead> =
        unsafe { source_pd.register::<RemoteRead>(src.ptr, LEN) }.expect("register");
    // SAFETY: as above.
    let dst_mr: MemoryRegion<LocalWrite> = unsafe { dst.register_in(&dest_pd, u64::MAX) };
    let old = src_mr.remote_regions()[0];
    let remote = RemoteMemory::new(vec![old]).expect("regions");
    let read = |qp: &mut ConnectedQp| {
        let req = ReadRequest {
            wr_id: 1,
            local_addr: dst.addr(),
            remote_addr: old.addr,
            len: 4096,
        };
        assert_eq!(qp.post_reads(&dst_mr, &remote, &[req]).expect("post"), 1);
        let mut buf = CompletionBuffer::new(4);
        drain(qp, &mut buf, Duration::from_secs(30))
    };
    // While registered, the READ works.
    let (mut qp, _responder) = connect_pair(&ctx, &dest_pd, &source_pd, gid);
    let ok = read(&mut qp);
    assert!(ok.iter().all(ReadCompletion::is_ok), "{ok:?}");
    assert_eq!(dst.snapshot()[..4096], src.snapshot()[..4096]);
    // The migration ends: the region is deregistered (the source's queue pairs stay up
    // here, so only the rkey can refuse the READ).
    drop(src_mr);
    let (mut qp, _responder) = connect_pair(&ctx, &dest_pd, &source_pd, gid);
    let after = read(&mut qp);
    println!("after deregistration: {after:?}");
    assert_eq!(after.len(), 1);
    assert_eq!(
        after[0].status,
        Err(WcError::RemoteAccessError),
        "{after:?}"
    );
}
