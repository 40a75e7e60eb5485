//! Post-copy's pieces against each other over socket pairs, and over a real RDMA device.

use super::pages::Via;
use super::*;
use crate::ram::RamMapping;
use crate::wire::GpaRange;

fn ram() -> Ram {
    Ram::create(
        "pc",
        &[
            RamMapping {
                slot: 0,
                gpa: 0,
                size: 64 * PAGE,
                file_offset: 0,
            },
            RamMapping {
                slot: 1,
                gpa: 1 << 32,
                size: 16 * PAGE,
                file_offset: 0,
            },
        ],
    )
    .expect("memfds")
}

#[test]
fn pages_are_indexed_across_slots_and_claimed_once() {
    let r = ram();
    let p = Pages::new(&r).expect("pages");
    assert_eq!(p.total(), 80);
    assert_eq!(p.index(0), Some(0));
    assert_eq!(p.index(63 * PAGE), Some(63));
    assert_eq!(p.index(64 * PAGE), None, "the hole between the slots");
    assert_eq!(p.index(1 << 32), Some(64));
    assert_eq!(p.index((1 << 32) + 16 * PAGE), None);
    for i in [0, 63, 64, 79] {
        assert_eq!(p.index(p.gpa(i)), Some(i));
    }
    assert_eq!(p.claim(5), Some(false));
    assert_eq!(p.claim(5), None, "a page is claimed once");
    p.land(&[5]);
    assert_eq!(p.claim(5), None, "a landed page is never pulled again");
    assert_eq!(p.missing.load(Ordering::Acquire), 79);
}

/// The source's RAM of these tests: page `i` filled with `i + 1`, except pages 62 and
/// 66, never written (holes of the memfd).
fn source_ram() -> Ram {
    let src = ram();
    for i in (0..80u64).filter(|i| ![62, 66].contains(i)) {
        let (p, _) = src
            .range_ptr(GpaRange {
                gpa: gpa_of(i),
                length: PAGE,
            })
            .expect("in RAM");
        // SAFETY: this test is the only user.
        unsafe { std::ptr::write_bytes(p, i as u8 + 1, PAGE as usize) };
    }
    src
}

/// Checks that pages `pages` of `dst` hold what [`source_ram`] wrote.
fn assert_landed(dst: &Ram, pages: std::ops::Range<u64>) {
    for i in pages {
        let (p, _) = dst
            .range_ptr(GpaRange {
                gpa: gpa_of(i),
                length: PAGE,
            })
            .expect("in RAM");
        // SAFETY: this test is the only user.
        let page = unsafe { std::slice::from_raw_parts(p, PAGE as usize) };
        let want = if [62, 66].contains(&i) {
            0
        } else {
            i as u8 + 1
        };
        assert!(page.iter().all(|&x| x == want), "page {i}");
    }
}

fn gpa_of(i: u64) -> u64 {
    if i < 64 {
        i * PAGE
    } else {
        (1 << 32) + (i - 64) * PAGE
    }
}

/// A pull over a socket pair: the destination learns the source's holes (pages 62
/// and 66 never written there) and fills them itself; the data pages come over in runs
/// split at the slot boundary and at the holes, each lands once with the source's
/// bytes, and the end request ends the server cleanly.
#[test]
fn pulled_runs_land_the_sources_bytes_and_holes_are_filled_here() {
    let src = source_ram();
    let (a, mut b) = UnixStream::pair().expect("pair");
    let server = std::thread::spawn(move || {
        let got = serve_pulls(&mut b, &src, &|_| Ok(()), None);
        (got.map_err(|e| e.to_string()), src)
    });
    let a = Mutex::new(a);
    let dst = ram();
    let pages = Pages::new(&dst).expect("pages");
    assert_eq!(pages.learn_holes(&mut *lock(&a)).expect("map"), 2 * PAGE);
    // A source without RDMA says so; the pull goes over TCP.
    let why = open_rdma(&mut *lock(&a), &dst)
        .expect("asked")
        .expect_err("no RDMA");
    assert!(why.contains("offers no RDMA"), "{why}");
    let (rdma, lost, moved) = (Mutex::new(None), Mutex::new(None), AtomicU64::new(0));
    let via = Via {
        conn: &a,
        rdma: &rdma,
        rdma_lost: &lost,
        rdma_moved: &moved,
    };
    let claimed: Vec<(usize, bool)> = (60..70)
        .filter_map(|i| pages.claim(i).map(|h| (i, h)))
        .collect();
    assert_eq!(claimed.iter().filter(|c| c.1).count(), 2);
    let moved = pages.pull(&via, &dst, &claimed).expect("pulled");
    assert_eq!(
        moved,
        Moved {
            pulled: 8 * PAGE,
            rdma: 0,
            filled: 2 * PAGE
        }
    );
    lock(&a).write_all(&encode_pull(PULL_END, 0)).expect("end");
    let (got, _) = server.join().expect("server");
    assert_eq!(
        got,
        Ok(Served {
            end: PullEnd::Done,
            tcp_bytes: 8 * PAGE,
            rdma_bytes: 0,
            rdma: false
        })
    );
    assert_landed(&dst, 60..70);
    assert_eq!(pages.missing.load(Ordering::Acquire), 70);
}

/// Post-copy's pull over RDMA READ against a real device (the SoftRoCE guest of
/// `scripts/rdma-tests.sh`): the source exports its memfds (REMOTE_READ) on the
/// destination's asking, the first half of RAM comes with RDMA READ; then both queue
/// pairs fail, the puller is dropped, and the second half comes over TCP. Every page
/// lands once with the source's bytes, holes zero-filled, and the source is told what
/// RDMA moved.
#[test]
#[ignore = "needs an RDMA device: scripts/rdma-tests.sh runs it in the SoftRoCE guest"]
fn pages_come_with_rdma_read_and_over_tcp_once_rdma_fails() {
    if let Err(e) = ferry_verbs::Context::open_first() {
        panic!("this test needs an RDMA device: {e}");
    }
    let src = source_ram();
    let (a, mut b) = UnixStream::pair().expect("pair");
    let server = std::thread::spawn(move || {
        let got = serve_pulls(&mut b, &src, &|_| Ok(()), Some(2));
        (got.map_err(|e| e.to_string()), src)
    });
    let a = Mutex::new(a);
    let dst = ram();
    let pages = Pages::new(&dst).expect("pages");
    pages.learn_holes(&mut *lock(&a)).expect("map");
    let puller = open_rdma(&mut *lock(&a), &dst)
        .expect("asked")
        .unwrap_or_else(|why| panic!("no RDMA: {why}"));
    let (rdma, lost, moved) = (
        Mutex::new(Some(puller)),
        Mutex::new(None),
        AtomicU64::new(0),
    );
    let via = Via {
        conn: &a,
        rdma: &rdma,
        rdma_lost: &lost,
        rdma_moved: &moved,
    };
    let claim = |r: std::ops::Range<usize>| -> Vec<(usize, bool)> {
        r.filter_map(|i| pages.claim(i).map(|h| (i, h))).collect()
    };
    let first = pages.pull(&via, &dst, &claim(0..40)).expect("pulled");
    assert_eq!(first.rdma, 40 * PAGE, "{first:?}");
    assert_eq!(first.pulled, 0);
    for qp in 0..2 {
        lock(&rdma)
            .as_mut()
            .expect("puller")
            .inject_qp_failure(qp, 0);
    }
    let second = pages.pull(&via, &dst, &claim(40..80)).expect("pulled");
    assert!(lock(&rdma).is_none(), "a failed puller is dropped");
    assert!(lock(&lost).is_some());
    assert_eq!(second.filled, 2 * PAGE);
    assert_eq!(second.rdma + second.pulled, 38 * PAGE, "{second:?}");
    assert!(second.pulled > 0, "{second:?}");
    let by_rdma = moved.load(Ordering::Acquire);
    lock(&a)
        .write_all(&encode_pull(PULL_END, by_rdma))
        .expect("end");
    let (got, _) = server.join().expect("server");
    let got = got.expect("served");
    assert!(got.rdma && got.end == PullEnd::Done, "{got:?}");
    assert_eq!(got.rdma_bytes, by_rdma);
    assert_eq!(got.tcp_bytes, second.pulled);
    assert_landed(&dst, 0..80);
    assert_eq!(pages.missing.load(Ordering::Acquire), 0);
}

/// A run longer than one pull request may ask for (a fault on a 1 GiB huge page) goes
/// as several requests, each within what the source answers.
#[test]
fn runs_longer_than_a_pull_request_are_split() {
    let big = |name| {
        Ram::create(
            name,
            &[RamMapping {
                slot: 0,
                gpa: 0,
                size: MAX_PULL + 4 * PAGE,
                file_offset: 0,
            }],
        )
        .expect("memfds")
    };
    let src = big("split-src");
    let (a, mut b) = UnixStream::pair().expect("pair");
    let server = std::thread::spawn(move || {
        serve_pulls(&mut b, &src, &|_| Ok(()), None).map_err(|e| e.to_string())
    });
    let a = Mutex::new(a);
    let dst = big("split-dst");
    let pages = Pages::new(&dst).expect("pages");
    let claimed: Vec<(usize, bool)> = (0..pages.total())
        .filter_map(|i| pages.claim(i).map(|h| (i, h)))
        .collect();
    let (rdma, lost, moved) = (Mutex::new(None), Mutex::new(None), AtomicU64::new(0));
    let via = Via {
        conn: &a,
        rdma: &rdma,
        rdma_lost: &lost,
        rdma_moved: &moved,
    };
    let got = pages.pull(&via, &dst, &claimed).expect("pulled");
    assert_eq!(got.pulled, MAX_PULL + 4 * PAGE);
    lock(&a).write_all(&encode_pull(PULL_END, 0)).expect("end");
    let served = server.join().expect("server").expect("served");
    assert_eq!(served.tcp_bytes, MAX_PULL + 4 * PAGE);
}

#[test]
fn hostile_pull_requests_are_refused() {
    let src = ram();
    for (gpa, len) in [
        (0, 0),
        (1, PAGE),
        (0, PAGE + 1),
        (64 * PAGE, PAGE),
        (60 * PAGE, 8 * PAGE),
        (0, MAX_PULL + PAGE),
    ] {
        let (mut a, mut b) = UnixStream::pair().expect("pair");
        a.write_all(&encode_pull(gpa, len)).expect("request");
        let got = serve_pulls(&mut b, &src, &|_| Ok(()), None);
        assert!(got.is_err(), "{gpa:#x}+{len:#x}");
    }
    // Closed without the end request: said so, not an error of the server.
    let (a, mut b) = UnixStream::pair().expect("pair");
    drop(a);
    assert_eq!(
        serve_pulls(&mut b, &src, &|_| Ok(()), None)
            .expect("ends")
            .end,
        PullEnd::Closed
    );
}
