//! End-to-end with an unmodified Cloud Hypervisor (CH) running Ferry's PVH test guest
//! (`testbeds/ch-guest`) on `/dev/kvm`, hosts as network namespaces.
//!
//! `#[ignore]`d where CH cannot be found (listed as ignored, with the reason);
//! `scripts/test.sh` runs them with `--include-ignored` whenever it finds CH, and an
//! explicitly requested test without CH fails (`ferry_tests::ch` says where CH is looked
//! for, and why this host preloads a shim).

use std::time::Duration;

use std::os::unix::net::UnixStream;

use ferry_ch::relay::MemoryConnections;
use ferry_tests::ch::{guest_kernel, require_ch, Ch};
use ferry_tests::*;

/// CH's own migration of the test guest, TCP with 4 connections: the reference Ferry is
/// measured against, and the proof that the guest, the shim and the harness work. The
/// guest keeps counting at the destination and never finds a page it wrote missing.
#[test]
#[ignore = "needs Cloud Hypervisor: scripts/test.sh runs it when it finds CH"]
fn ch_migrates_the_test_guest_by_itself() -> anyhow::Result<()> {
    require_ch();
    require_kvm();
    let _g = serial();
    let hosts = TwoHosts::new()?;
    let kernel = guest_kernel(&hosts.dir)?;
    let src = Ch::start(&hosts, 0, "src", Some(&kernel), 256, false)?;
    wait_for(
        "the guest counting at the source",
        Duration::from_secs(20),
        || src.guest().pass >= 16,
    )?;
    let dst = Ch::start(&hosts, 1, "dst", None, 0, false)?;
    let url = format!("tcp:{ADDR_B}:6000");
    let before = src.guest().pass;
    let recv = dst.remote(
        &hosts,
        1,
        &["receive-migration", &format!("receiver_url={url}")],
    )?;
    wait_for(
        "the destination CH listening",
        Duration::from_secs(10),
        || {
            hosts
                .cmd(1, std::path::Path::new("ss"))
                .args(["-Hltn", "sport = :6000"])
                .output()
                .is_ok_and(|o| !o.stdout.is_empty())
        },
    )?;
    let send = src.remote(
        &hosts,
        0,
        &[
            "send-migration",
            &format!("destination_url={url},connections=4,downtime_ms=300"),
        ],
    )?;
    let sent = send.wait_with_output()?;
    assert!(
        sent.status.success(),
        "{}",
        String::from_utf8_lossy(&sent.stderr)
    );
    let received = recv.wait_with_output()?;
    assert!(
        received.status.success(),
        "receive-migration: {}\n{}\n{}",
        String::from_utf8_lossy(&received.stderr),
        src.proc.log_text(),
        dst.proc.log_text()
    );
    // The source CH exits after a successful migration; the destination runs the guest,
    // which writes to the serial file the source's config named (the same path here: CH
    // truncates it at the destination). A guest that kept its memory counts on from
    // where it was; a restarted one would start again from 8.
    wait_for(
        "the guest counting on at the destination",
        Duration::from_secs(20),
        || src.guest().pass >= before + 16,
    )?;
    let g = src.guest();
    assert_eq!(g.bad, 0, "{:?}", g.bad_lines);
    assert!(g.bad_lines.is_empty(), "{:?}", g.bad_lines);
    let state = dst.vm_state()?;
    assert_eq!(state.as_deref(), Some("Running"));
    Ok(())
}

/// A source CH running the test guest in host A and a destination CH in host B receiving
/// on a Unix socket (`ch-remote receive-migration`): the tests that drive Ferry's halves
/// themselves, between them.
struct Direct {
    hosts: std::sync::Arc<TwoHosts>,
    src: Ch,
    dst: Ch,
    dst_sock: std::path::PathBuf,
    recv: Option<std::process::Child>,
}

impl Direct {
    /// Both CHs, the guest counting at the source (`mem_mib` of RAM), the destination
    /// listening.
    fn start(mem_mib: u64) -> anyhow::Result<Self> {
        let hosts = std::sync::Arc::new(TwoHosts::new()?);
        let kernel = guest_kernel(&hosts.dir)?;
        let src = Ch::start(&hosts, 0, "src", Some(&kernel), mem_mib, false)?;
        wait_for(
            "the guest counting at the source",
            Duration::from_secs(20),
            || src.guest().pass >= 16,
        )?;
        let dst = Ch::start(&hosts, 1, "dst", None, 0, false)?;
        let dst_sock = hosts.path("dst-migration.sock");
        let recv = dst.remote(
            &hosts,
            1,
            &[
                "receive-migration",
                &format!("receiver_url=unix:{}", dst_sock.display()),
            ],
        )?;
        wait_for(
            "the destination CH listening",
            Duration::from_secs(10),
            || dst_sock.exists(),
        )?;
        Ok(Self {
            hosts,
            src,
            dst,
            dst_sock,
            recv: Some(recv),
        })
    }

    /// `ch-remote send-migration destination_url=<url>` at the source; it must be taken.
    fn send(&self, url: &str) -> anyhow::Result<()> {
        let sent = self
            .src
            .remote(
                &self.hosts,
                0,
                &["send-migration", &format!("destination_url={url}")],
            )?
            .wait_with_output()?;
        assert!(
            sent.status.success(),
            "{}",
            String::from_utf8_lossy(&sent.stderr)
        );
        Ok(())
    }

    /// After a migration: the destination's `receive-migration` succeeded, the guest
    /// counts on there from `before` with no page check failing, the destination CH runs
    /// it and the source CH exited.
    fn finish(&mut self, before: u64) -> anyhow::Result<()> {
        let received = self.recv.take().expect("receiving").wait_with_output()?;
        assert!(
            received.status.success(),
            "receive-migration: {}\n{}",
            String::from_utf8_lossy(&received.stderr),
            self.dst.proc.log_text()
        );
        wait_for(
            "the guest counting on at the destination",
            Duration::from_secs(20),
            || self.src.guest().pass >= before + 16,
        )?;
        let g = self.src.guest();
        assert_eq!(g.bad, 0, "{:?}", g.bad_lines);
        assert_eq!(self.dst.vm_state()?.as_deref(), Some("Running"));
        let src = &mut self.src;
        wait_for("the source CH exiting", Duration::from_secs(10), || {
            !src.proc.alive()
        })
    }
}

/// A CH migration through Ferry's memory: the source CH sends to Ferry, Ferry lands every
/// page in memfds it created from the VM's layout, hands them to the destination CH before
/// its `Config`, and answers the source's `Complete` only once the destination runs. The
/// guest counts on with no page missing, and runs from Ferry's memfds.
#[test]
#[ignore = "needs Cloud Hypervisor: scripts/test.sh runs it when it finds CH"]
fn a_ch_migration_lands_in_ferrys_memfds_and_the_destination_runs_from_them() -> anyhow::Result<()>
{
    require_ch();
    require_kvm();
    let _g = serial();
    let mut d = Direct::start(256)?;
    let relay_sock = d.hosts.path("relay.sock");
    let listener = std::os::unix::net::UnixListener::bind(&relay_sock)?;
    let before = d.src.guest().pass;
    let dst_sock = d.dst_sock.clone();
    let relay = std::thread::spawn(move || {
        let (s, _) = listener.accept()?;
        ferry_ch::relay::relay(
            s,
            MemoryConnections::<UnixStream>::None,
            "vm1",
            || Ok(std::os::unix::net::UnixStream::connect(&dst_sock)?),
            &|_| {},
        )
        .map_err(|f| anyhow::anyhow!("{f}"))
    });
    d.send(&format!("unix:{}", relay_sock.display()))?;
    let report = relay.join().expect("relay thread")?;
    assert!(report.running, "{report:?}");
    assert_eq!(report.ram_bytes, 256 << 20, "{report:?}");
    // Round 0 is all of RAM (zero pages included), then what the guest dirtied.
    assert!(report.bytes_landed >= 256 << 20, "{report:?}");
    assert!(report.memory_requests >= 2, "{report:?}");
    d.finish(before)?;
    // The source CH shut its VM down and exited, as after any successful migration.
    assert_eq!(
        d.src.proc.child.wait()?.code(),
        Some(0),
        "{}",
        d.src.proc.log_text()
    );
    Ok(())
}

/// A destination that cannot take the VM (here: no destination CH listening when the
/// source's `Config` arrives) is refused before any memory moves: the source CH is
/// answered Error and its VM runs on, counting.
#[test]
#[ignore = "needs Cloud Hypervisor: scripts/test.sh runs it when it finds CH"]
fn a_destination_that_cannot_take_the_vm_leaves_it_running_at_the_source() -> anyhow::Result<()> {
    require_ch();
    require_kvm();
    let _g = serial();
    let hosts = TwoHosts::new()?;
    let kernel = guest_kernel(&hosts.dir)?;
    let src = Ch::start(&hosts, 0, "src", Some(&kernel), 128, false)?;
    wait_for("the guest counting", Duration::from_secs(20), || {
        src.guest().pass >= 16
    })?;
    let relay_sock = hosts.path("relay.sock");
    let listener = std::os::unix::net::UnixListener::bind(&relay_sock)?;
    let nowhere = hosts.path("no-destination.sock");
    let relay = std::thread::spawn(move || {
        let (s, _) = listener.accept()?;
        match ferry_ch::relay::relay(
            s,
            MemoryConnections::<UnixStream>::None,
            "vm1",
            || Ok(std::os::unix::net::UnixStream::connect(&nowhere)?),
            &|_| {},
        ) {
            Ok(r) => anyhow::bail!("relayed without a destination: {r:?}"),
            Err(f) => Ok(f),
        }
    });
    let sent = src
        .remote(
            &hosts,
            0,
            &[
                "send-migration",
                &format!("destination_url=unix:{}", relay_sock.display()),
            ],
        )?
        .wait_with_output()?;
    assert!(
        sent.status.success(),
        "{}",
        String::from_utf8_lossy(&sent.stderr)
    );
    let failed = relay.join().expect("relay thread")?;
    assert!(failed.unsettled.is_none(), "{failed}");
    // The source CH resumed its VM: it keeps counting and says Running.
    wait_for(
        "the source VM running again",
        Duration::from_secs(10),
        || src.vm_state().ok().flatten().as_deref() == Some("Running"),
    )?;
    let at = src.guest().pass;
    wait_for(
        "the guest counting on at the source",
        Duration::from_secs(20),
        || src.guest().pass >= at + 16,
    )?;
    assert_eq!(src.guest().bad, 0);
    Ok(())
}

/// As above with CH's own parallel transport: the source CH sends memory on 4 extra TCP
/// connections (64 MiB chunks, each acknowledged only once landed), landed in parallel
/// into Ferry's memfds.
#[test]
#[ignore = "needs Cloud Hypervisor: scripts/test.sh runs it when it finds CH"]
fn a_ch_migration_over_four_connections_lands_in_parallel() -> anyhow::Result<()> {
    require_ch();
    require_kvm();
    let _g = serial();
    let mut d = Direct::start(512)?;
    // The relay listens in host A, where the source CH connects.
    let (tx, rx) = std::sync::mpsc::channel();
    let relay = {
        let hosts = std::sync::Arc::clone(&d.hosts);
        let dst_sock = d.dst_sock.clone();
        std::thread::spawn(move || -> anyhow::Result<ferry_ch::relay::Report> {
            hosts.enter(0)?;
            let l = std::net::TcpListener::bind("127.0.0.1:0")?;
            tx.send(l.local_addr()?.port())?;
            let (s, _) = l.accept()?;
            ferry_ch::relay::relay(
                s,
                MemoryConnections::<std::net::TcpStream>::Listener(&l),
                "vm1",
                || Ok(std::os::unix::net::UnixStream::connect(&dst_sock)?),
                &|_| {},
            )
            .map_err(|f| anyhow::anyhow!("{f}"))
        })
    };
    let port = rx.recv_timeout(Duration::from_secs(10))?;
    let before = d.src.guest().pass;
    d.send(&format!("tcp:127.0.0.1:{port},connections=4"))?;
    let report = relay.join().expect("relay thread")?;
    assert_eq!(report.memory_connections, 4, "{report:?}");
    assert_eq!(report.ram_bytes, 512 << 20, "{report:?}");
    assert!(report.bytes_landed >= 512 << 20, "{report:?}");
    d.finish(before)
}

/// The migration split in two halves as two sidecars run it: the source half carries the
/// source CH's main connection and its 4 memory connections byte for byte over Ferry's
/// connections (here socket pairs), paced, and records the decision before `Complete`;
/// the destination half lands the memory in its memfds and runs the destination CH from
/// them. Every acknowledgement the source CH gets comes from the destination half.
#[test]
#[ignore = "needs Cloud Hypervisor: scripts/test.sh runs it when it finds CH"]
fn a_ch_migration_split_in_a_source_and_a_destination_half() -> anyhow::Result<()> {
    require_ch();
    require_kvm();
    let _g = serial();
    let mut d = Direct::start(256)?;
    // Ferry's control connection and 4 data connections between the halves.
    let (ctl_src, ctl_dst) = UnixStream::pair()?;
    let (data_src, data_dst): (Vec<_>, Vec<_>) = (0..4)
        .map(|_| UnixStream::pair())
        .collect::<std::io::Result<Vec<_>>>()?
        .into_iter()
        .unzip();
    let dst_sock = d.dst_sock.clone();
    let dest_half = std::thread::spawn(move || {
        ferry_ch::relay::relay(
            ctl_dst,
            MemoryConnections::Given(data_dst),
            "vm1",
            || Ok(UnixStream::connect(&dst_sock)?),
            &|_| {},
        )
        .map_err(|f| anyhow::anyhow!("{f}"))
    });
    let decided = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::channel();
    let source_half = {
        let (hosts, decided) = (
            std::sync::Arc::clone(&d.hosts),
            std::sync::Arc::clone(&decided),
        );
        std::thread::spawn(move || -> anyhow::Result<ferry_ch::proxy::Carried> {
            hosts.enter(0)?;
            let l = std::net::TcpListener::bind("127.0.0.1:0")?;
            tx.send(l.local_addr()?.port())?;
            let (main, _) = l.accept()?;
            ferry_ch::proxy::proxy(
                main,
                Some(&l),
                ctl_src,
                data_src,
                &|_| Ok(()),
                || {
                    decided.store(true, std::sync::atomic::Ordering::SeqCst);
                    Ok(())
                },
                || {},
            )
            .map_err(|f| anyhow::anyhow!("{f}"))
        })
    };
    let port = rx.recv_timeout(Duration::from_secs(10))?;
    let before = d.src.guest().pass;
    d.send(&format!("tcp:127.0.0.1:{port},connections=4"))?;
    let carried = source_half.join().expect("source half")?;
    let landed = dest_half.join().expect("destination half")?;
    assert!(decided.load(std::sync::atomic::Ordering::SeqCst));
    assert_eq!(carried.memory_connections, 4, "{carried:?}");
    assert_eq!(landed.memory_connections, 4, "{landed:?}");
    assert_eq!(
        carried.memory_bytes, landed.bytes_landed,
        "{carried:?} {landed:?}"
    );
    assert!(landed.bytes_landed >= 256 << 20, "{landed:?}");
    d.finish(before)
}

/// The whole path with real sidecars: a running CH VM registered with the source sidecar
/// (`ferry ch register`), a CH without a VM attached to the destination sidecar (`ferry ch
/// await`), then `ferry migrate` as for any VM: TLS between the sidecars, CH's memory over
/// 4 Ferry data connections, landed in the destination sidecar's memfds, the destination CH
/// running the guest from them. The guest counts on with no page missing.
#[test]
#[ignore = "needs Cloud Hypervisor: scripts/test.sh runs it when it finds CH"]
fn ferry_migrates_an_unmodified_ch_vm_between_two_sidecars() -> anyhow::Result<()> {
    require_ch();
    require_kvm();
    let _g = serial();
    let (mut p, registered) = ChPair::start_sized(ClusterOpts::default(), false, 256)?;
    assert!(registered.contains("256 MiB"), "{registered}");
    // A CH without a VM cannot be registered as a source.
    let api_b = p.dst.api.to_string_lossy().into_owned();
    let o = p
        .ferry(
            1,
            &["ch", "register", "--api-socket", &api_b, "--vm-id", "vm2"],
        )?
        .wait_with_output()?;
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let st = p.status(0).expect("status");
    assert_eq!(st["registered"][0]["vmm"], "cloud-hypervisor", "{st:#}");
    let before = p.src.guest().pass;
    let to = format!("{ADDR_B}:{PORT}");
    let o = p
        .ferry(
            0,
            &["migrate", "vm1", "--to", &to, "--json", "--streams", "4"],
        )?
        .wait_with_output()?;
    let s: serde_json::Value = serde_json::from_slice(&o.stdout).map_err(|e| {
        anyhow::anyhow!(
            "{e}: {}{}\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr),
            p.logs()
        )
    })?;
    assert_eq!(s["result"], "committed", "{s:#}\n{}", p.logs());
    assert_eq!(s["encrypted"], true, "{s:#}");
    assert!(s["bytes_transferred"].as_u64() >= Some(256 << 20), "{s:#}");
    assert_eq!(o.status.code(), Some(0));
    wait_for(
        "the guest counting on at the destination",
        Duration::from_secs(20),
        || p.src.guest().pass >= before + 16,
    )?;
    assert_eq!(p.src.guest().bad, 0, "{:?}", p.src.guest().bad_lines);
    assert_eq!(p.dst.vm_state()?.as_deref(), Some("Running"));
    wait_for("the source CH exiting", Duration::from_secs(10), || {
        !p.src.proc.alive()
    })?;
    // Both sidecars say how it ended.
    let st = p.status(1).expect("status");
    assert!(incoming(&st, |m| m["state"] == "committed"), "{st:#}");
    Ok(())
}

/// Whether a status lists an incoming migration for which `pred` holds.
fn incoming(st: &serde_json::Value, pred: impl Fn(&serde_json::Value) -> bool) -> bool {
    st["migrations"]
        .as_array()
        .is_some_and(|m| m.iter().any(|m| m["direction"] == "incoming" && pred(m)))
}

/// Two sidecars (A with `source_env`), a running CH VM registered at A and a CH waiting
/// for it at B.
struct ChPair {
    hosts: TwoHosts,
    opts: ClusterOpts,
    sidecars: Vec<Proc>,
    src: Ch,
    dst: Ch,
}

impl ChPair {
    fn start(source_env: Vec<(String, String)>) -> anyhow::Result<Self> {
        Self::start_with(
            ClusterOpts {
                source_env,
                ..ClusterOpts::default()
            },
            false,
        )
    }

    /// As [`ChPair::start`], the sidecars as `opts` says; `shared`: the source VM's RAM is
    /// shared memory (post-copy needs it: the source CH hands its memfds over in local
    /// mode).
    fn start_with(opts: ClusterOpts, shared: bool) -> anyhow::Result<Self> {
        Self::start_sized(opts, shared, 128).map(|(p, _)| p)
    }

    /// As [`ChPair::start_with`] with a guest of `mem_mib`; also returns what `ferry ch
    /// register` said.
    fn start_sized(
        opts: ClusterOpts,
        shared: bool,
        mem_mib: u64,
    ) -> anyhow::Result<(Self, String)> {
        let hosts = TwoHosts::new()?;
        make_certs(&hosts.dir, "ca", &[("a", ADDR_A), ("b", ADDR_B)])?;
        let mut sidecars = Vec::new();
        for i in 0..2 {
            sidecars.push(Cluster::spawn_sidecar(&hosts, &opts, i)?);
        }
        for side in ["a", "b"] {
            let s = hosts.path(&format!("{side}.sock"));
            wait_for("a sidecar", Duration::from_secs(10), || s.exists())?;
        }
        let kernel = guest_kernel(&hosts.dir)?;
        let src = Ch::start(&hosts, 0, "src", Some(&kernel), mem_mib, shared)?;
        wait_for(
            "the guest counting at the source",
            Duration::from_secs(20),
            || src.guest().pass >= 16,
        )?;
        let dst = Ch::start(&hosts, 1, "dst", None, 0, false)?;
        let p = Self {
            hosts,
            opts,
            sidecars,
            src,
            dst,
        };
        let api = p.src.api.to_string_lossy().into_owned();
        let registered = p.ok(
            0,
            &["ch", "register", "--api-socket", &api, "--vm-id", "vm1"],
        )?;
        let api = p.dst.api.to_string_lossy().into_owned();
        p.ok(1, &["ch", "await", "--api-socket", &api, "--vm-id", "vm1"])?;
        Ok((p, registered))
    }

    fn ferry(&self, i: usize, args: &[&str]) -> anyhow::Result<std::process::Child> {
        self.hosts.spawn_ferry(i, args)
    }

    fn ok(&self, i: usize, args: &[&str]) -> anyhow::Result<String> {
        let o = self.ferry(i, args)?.wait_with_output()?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        anyhow::ensure!(o.status.success(), "ferry {args:?}: {text}");
        Ok(text)
    }

    fn migrate(&self) -> anyhow::Result<std::process::Child> {
        self.migrate_with(&[])
    }

    /// `ferry migrate vm1` over 2 streams with `more` options, `--json`.
    fn migrate_with(&self, more: &[&str]) -> anyhow::Result<std::process::Child> {
        let to = format!("{ADDR_B}:{PORT}");
        let mut args = vec!["migrate", "vm1", "--to", &to, "--json", "--streams", "2"];
        args.extend_from_slice(more);
        self.ferry(0, &args)
    }

    /// Waits until sidecar `i` holds at `point`.
    fn wait_hold_at(&self, i: usize, point: &str) -> anyhow::Result<()> {
        let marker = format!("test hook: holding at {point}");
        wait_for(&marker, Duration::from_secs(60), || {
            self.sidecars[i].log_text().contains(&marker)
        })
    }

    /// The JSON summary a `ferry migrate --json` child printed.
    fn summary(&self, child: std::process::Child) -> anyhow::Result<serde_json::Value> {
        let o = child.wait_with_output()?;
        serde_json::from_slice(&o.stdout).map_err(|e| {
            anyhow::anyhow!(
                "{e}: {}{}\n--- A ---\n{}\n--- B ---\n{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr),
                self.sidecars[0].log_text(),
                self.sidecars[1].log_text()
            )
        })
    }

    /// Waits until the guest counted `n` more passes (at whichever host runs it: both
    /// CHs write the same serial file).
    fn guest_counts_on(&self, n: u64, what: &str) -> anyhow::Result<()> {
        let at = self.src.guest().pass;
        wait_for(what, Duration::from_secs(20), || {
            self.src.guest().pass >= at + n
        })
    }

    /// Every log of the pair, for failure messages.
    fn logs(&self) -> String {
        format!(
            "--- sidecar A ---\n{}\n--- sidecar B ---\n{}\n--- source CH ---\n{}\n--- destination CH ---\n{}",
            self.sidecars[0].log_text(),
            self.sidecars[1].log_text(),
            self.src.proc.log_text(),
            self.dst.proc.log_text()
        )
    }

    /// Waits until the source CH resumed its VM.
    fn wait_source_resumed(&self) -> anyhow::Result<()> {
        wait_for("the source CH resuming", Duration::from_secs(20), || {
            self.source_resumed()
        })
        .map_err(|e| anyhow::anyhow!("{e}\n{}", self.logs()))
    }

    /// Waits until the source CH gave the migration up during pre-copy (its VM never
    /// paused, so it has nothing to resume) and runs its VM.
    fn wait_source_gave_up(&self) -> anyhow::Result<()> {
        wait_for("the source CH giving up", Duration::from_secs(30), || {
            self.src.proc.log_text().contains("Migration failed")
                && self.src.vm_state().ok().flatten().as_deref() == Some("Running")
        })
        .map_err(|e| anyhow::anyhow!("{e}\n{}", self.logs()))
    }

    /// Sidecar `i`'s `ferry status --json`, once it answers.
    fn status(&self, i: usize) -> Option<serde_json::Value> {
        let t = self.ok(i, &["status", "--json"]).ok()?;
        serde_json::from_str(&t).ok()
    }

    /// Waits until sidecar `i`'s status satisfies `pred`.
    fn wait_status(
        &self,
        i: usize,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> anyhow::Result<()> {
        wait_for(what, Duration::from_secs(30), || {
            self.status(i).is_some_and(|st| pred(&st))
        })
        .map_err(|e| anyhow::anyhow!("{e}\n{}", self.logs()))
    }

    /// Waits until the running migration moved more than 16 MiB.
    fn wait_memory_moving(&self) -> anyhow::Result<()> {
        self.wait_status(0, "memory moving", |st| {
            st["migrations"][0]["bytes"].as_u64() > Some(16 << 20)
        })
    }

    /// Waits until the destination lists vm1's CH as waiting again.
    fn wait_destination_waiting(&self) -> anyhow::Result<()> {
        self.wait_status(1, "the destination waiting again", |st| {
            st["waiting_incoming"].to_string().contains("vm1")
        })
    }

    /// A pair whose sidecar `i` holds at `point`, a `ferry migrate` with `more` options
    /// started, and sidecar `i` killed -9 there. Returns the pair and the migrate child.
    fn killed_at(
        i: usize,
        point: &str,
        shared: bool,
        more: &[&str],
    ) -> anyhow::Result<(Self, std::process::Child)> {
        let env = hold_for(point, 3000);
        let opts = if i == 0 {
            ClusterOpts {
                source_env: env,
                ..ClusterOpts::default()
            }
        } else {
            ClusterOpts {
                dest_env: env,
                ..ClusterOpts::default()
            }
        };
        let mut p = Self::start_with(opts, shared)?;
        let child = p.migrate_with(more)?;
        p.wait_hold_at(i, point)?;
        p.sidecars[i].kill9();
        Ok((p, child))
    }

    /// After a failure in pre-copy: the source CH gave up and runs the VM on, and the
    /// destination CH dropped what it had.
    fn wait_vm_stayed_at_source(&self) -> anyhow::Result<()> {
        self.wait_source_gave_up()?;
        self.guest_counts_on(16, "the guest counting on at the source")?;
        wait_for(
            "the destination CH without a VM",
            Duration::from_secs(30),
            || matches!(self.dst.vm_state(), Ok(None)),
        )
    }

    /// The destination waits again, and a new `ferry migrate` moves the VM.
    fn retry_moves_it(&self) -> anyhow::Result<()> {
        self.wait_destination_waiting()?;
        let s = self.summary(self.migrate()?)?;
        assert_eq!(s["result"], "committed", "{s:#}");
        self.guest_counts_on(16, "the guest counting at the destination")?;
        assert_eq!(self.src.guest().bad, 0, "{:?}", self.src.guest().bad_lines);
        Ok(())
    }

    /// `ferry recover vm1 <more>` on A, expected to be refused with `why` in its error;
    /// the source CH stays paused.
    fn recover_refused(&self, more: &[&str], why: &str) -> anyhow::Result<()> {
        let mut args = vec!["recover", "vm1"];
        args.extend_from_slice(more);
        let o = self.ferry(0, &args)?.wait_with_output()?;
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(err.contains(why), "{err}");
        assert!(!self.source_resumed());
        Ok(())
    }

    /// Whether a keeper process for vm1 is left on host A.
    fn keeper_alive(&self) -> bool {
        let sock = self.hosts.path("state-a/ch-vm1.keeper");
        let needle = sock.to_string_lossy().into_owned();
        std::fs::read_dir("/proc").is_ok_and(|d| {
            d.flatten().any(|e| {
                std::fs::read(e.path().join("cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&needle))
            })
        })
    }

    /// Starts sidecar A again (after a kill -9: its old socket file is still there).
    fn restart_source_sidecar(&mut self) -> anyhow::Result<()> {
        self.restart_sidecar(0)
    }

    /// Starts sidecar `i` again, without the test's hold points.
    fn restart_sidecar(&mut self, i: usize) -> anyhow::Result<()> {
        let opts = ClusterOpts {
            source_env: Vec::new(),
            dest_env: Vec::new(),
            ..self.opts.clone()
        };
        self.sidecars[i] = Cluster::spawn_sidecar(&self.hosts, &opts, i)?;
        wait_for("the restarted sidecar", Duration::from_secs(10), || {
            self.ok(i, &["status", "--json"]).is_ok()
        })
    }

    fn source_resumed(&self) -> bool {
        self.src.proc.log_text().contains("Resumed VM successfully")
    }
}

/// The source sidecar killed after `Complete` went to the destination, before the source
/// CH got its answer: the destination runs the VM, and the keeper holds the source CH's
/// connection, so the source CH does not resume (as it would on a closed connection). The
/// operator, seeing the VM run at B, runs `ferry recover vm1` on the restarted sidecar: the
/// source CH is told Ok, stops its VM and exits.
#[test]
#[ignore = "needs Cloud Hypervisor: scripts/test.sh runs it when it finds CH"]
fn a_source_sidecar_killed_after_complete_never_lets_the_source_ch_resume() -> anyhow::Result<()> {
    require_ch();
    require_kvm();
    let _g = serial();
    let (mut p, child) = ChPair::killed_at(0, "ch-complete-carried", false, &[])?;
    let before = p.src.guest().pass;
    drop(child);
    // The destination runs the guest, which counts on from where it was.
    wait_for(
        "the guest running at the destination",
        Duration::from_secs(20),
        || p.dst.vm_state().ok().flatten().as_deref() == Some("Running"),
    )?;
    wait_for(
        "the guest counting at the destination",
        Duration::from_secs(20),
        || p.src.guest().pass >= before + 16,
    )?;
    // The source CH waits, its VM paused: it did not resume.
    std::thread::sleep(Duration::from_secs(2));
    assert!(!p.source_resumed(), "{}", p.src.proc.log_text());
    assert!(p.src.proc.alive());
    // The operator restarts the sidecar and settles it. Rolling back is refused: the
    // destination says it runs the VM.
    p.restart_source_sidecar()?;
    p.recover_refused(&["--abort"], "would run it twice")?;
    let line = p.ok(0, &["recover", "vm1"])?;
    assert!(line.contains("stops its VM"), "{line}");
    wait_for("the source CH exiting", Duration::from_secs(10), || {
        !p.src.proc.alive()
    })?;
    assert!(!p.source_resumed());
    assert_eq!(p.src.guest().bad, 0);
    Ok(())
}

/// The source sidecar killed right after its decision, before `Complete` left: the
/// destination CH never ran the VM and drops it when Ferry's connection ends; the source CH
/// stays paused (held by the keeper) until `ferry recover vm1 --abort`, then resumes and
/// counts on.
#[test]
#[ignore = "needs Cloud Hypervisor: scripts/test.sh runs it when it finds CH"]
fn a_source_sidecar_killed_after_the_decision_is_rolled_back_by_recover_abort() -> anyhow::Result<()>
{
    rolled_back_after_the_decision(false)
}

/// The source sidecar killed after its decision (pre-copy or post-copy), then
/// `ferry recover vm1 --abort`: the destination says it has no VM, and the source CH,
/// held paused by the keeper until then, resumes and counts on with every page intact.
fn rolled_back_after_the_decision(postcopy: bool) -> anyhow::Result<()> {
    require_ch();
    require_kvm();
    let _g = serial();
    let more: &[&str] = if postcopy { &["--postcopy"] } else { &[] };
    let (mut p, child) = ChPair::killed_at(0, "ch-decided", postcopy, more)?;
    drop(child);
    // The destination CH drops the half-received VM.
    wait_for(
        "the destination CH without a VM",
        Duration::from_secs(20),
        || matches!(p.dst.vm_state(), Ok(None)),
    )?;
    std::thread::sleep(Duration::from_secs(1));
    assert!(!p.source_resumed(), "{}", p.src.proc.log_text());
    p.restart_source_sidecar()?;
    let line = p.ok(0, &["recover", "vm1", "--abort"])?;
    assert!(line.contains("resumes its VM"), "{line}");
    p.wait_source_resumed()?;
    p.guest_counts_on(16, "the guest counting on at the source")?;
    assert_eq!(p.src.guest().bad, 0);
    Ok(())
}

/// Post-copy (`ferry migrate --postcopy`): the source CH hands its memfds to the source
/// sidecar (local mode) and pauses; the destination CH restores the VM with nothing of its
/// memory and runs it at once, every page it touches pulled on its fault, everything else
/// pulled in bulk over the other streams. The guest counts on at the destination with no
/// page check failing (each page it wrote before must read back), the source CH exits,
/// and the summary says how long the VM depended on both hosts.
#[test]
#[ignore = "needs Cloud Hypervisor: scripts/test.sh runs it when it finds CH"]
fn a_postcopy_migration_runs_the_vm_at_once_and_pulls_every_page() -> anyhow::Result<()> {
    require_ch();
    require_kvm();
    let _g = serial();
    let mut p = ChPair::start_with(ClusterOpts::default(), true)?;
    let before = p.src.guest().pass;
    let to = format!("{ADDR_B}:{PORT}");
    let o = p
        .ferry(
            0,
            &[
                "migrate",
                "vm1",
                "--to",
                &to,
                "--json",
                "--streams",
                "4",
                "--postcopy",
            ],
        )?
        .wait_with_output()?;
    let s: serde_json::Value = serde_json::from_slice(&o.stdout).map_err(|e| {
        anyhow::anyhow!(
            "{e}: {}{}\n{}\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr),
            p.sidecars[0].log_text(),
            p.sidecars[1].log_text()
        )
    })?;
    assert_eq!(
        s["result"],
        "committed",
        "{s:#}\n{}\n{}\n--- source CH ---\n{}\n--- destination CH ---\n{}",
        p.sidecars[0].log_text(),
        p.sidecars[1].log_text(),
        p.src.proc.log_text(),
        p.dst.proc.log_text()
    );
    assert_eq!(s["postcopy"], true, "{s:#}");
    assert_eq!(s["error"], "", "{s:#}");
    let pulled = s["bytes_transferred"].as_u64().unwrap_or(0);
    assert!(pulled > 0 && pulled <= 128 << 20, "{s:#}");
    assert!(s["postcopy_pull_ms"].as_f64() > Some(0.0), "{s:#}");
    assert!(s["downtime_ms"].as_f64() > Some(0.0), "{s:#}");
    assert_eq!(o.status.code(), Some(0));
    wait_for(
        "the guest counting on at the destination",
        Duration::from_secs(20),
        || p.src.guest().pass >= before + 16,
    )?;
    assert_eq!(p.src.guest().bad, 0, "{:?}", p.src.guest().bad_lines);
    assert_eq!(p.dst.vm_state()?.as_deref(), Some("Running"));
    wait_for("the source CH exiting", Duration::from_secs(10), || {
        !p.src.proc.alive()
    })?;
    // The destination served the faults of the restore and the guest, then the bulk.
    let log = p.sidecars[1].log_text();
    let line = log
        .lines()
        .find(|l| l.contains("post-copy pull ended"))
        .unwrap_or_else(|| panic!("{log}"));
    let field = |k: &str| -> u64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{k}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {k} in {line}"))
    };
    eprintln!("{line}");
    assert!(field("faults") > 0, "{line}");
    // Every page came once: pulled (on its fault or in bulk), or zero-filled here for a
    // page the source never wrote (a hole of its memfd); nothing twice.
    assert_eq!(field("fault_bytes") + field("bulk_bytes"), pulled, "{line}");
    assert_eq!(
        field("fault_bytes") + field("bulk_bytes") + field("zero_bytes"),
        128 << 20,
        "{line}"
    );
    p.wait_status(1, "the destination recording the migration", |st| {
        incoming(st, |m| m["state"] == "committed")
    })?;
    Ok(())
}

/// The destination sidecar killed once the destination CH restored the VM (paused),
/// before the source got that answer: the source CH is answered Error (its connection
/// ends) and resumes; the destination CH never runs the VM.
#[test]
#[ignore = "needs Cloud Hypervisor: scripts/test.sh runs it when it finds CH"]
fn a_destination_sidecar_killed_after_the_restore_leaves_the_vm_at_the_source() -> anyhow::Result<()>
{
    require_ch();
    require_kvm();
    let _g = serial();
    let (p, child) = ChPair::killed_at(1, "ch-dest-restored", false, &[])?;
    let s = p.summary(child)?;
    assert_eq!(s["result"], "aborted", "{s:#}");
    p.wait_source_resumed()?;
    p.guest_counts_on(16, "the guest counting on at the source")?;
    assert_eq!(p.src.guest().bad, 0);
    // The destination CH holds the restored VM paused, never running (the operator
    // deletes it, or stops that CH).
    assert_ne!(p.dst.vm_state()?.as_deref(), Some("Running"));
    assert!(!p.keeper_alive(), "no keeper is left behind");
    Ok(())
}

/// The destination sidecar killed once the destination CH runs the VM, before the source
/// got that answer: the source half lost the answer to `Complete`, so the source CH is
/// neither resumed nor stopped: it waits, paused (`committed-unconfirmed`), while the VM
/// runs at the destination. `ferry recover vm1` (the operator saw it run there) tells the
/// source CH Ok: it stops its VM and exits. One VM ran throughout.
#[test]
#[ignore = "needs Cloud Hypervisor: scripts/test.sh runs it when it finds CH"]
fn a_destination_sidecar_killed_once_the_vm_runs_there_keeps_the_source_paused_until_recover(
) -> anyhow::Result<()> {
    require_ch();
    require_kvm();
    let _g = serial();
    let (mut p, child) = ChPair::killed_at(1, "ch-dest-running", false, &[])?;
    let s = p.summary(child)?;
    assert_eq!(s["result"], "committed-unconfirmed", "{s:#}");
    assert_eq!(p.dst.vm_state()?.as_deref(), Some("Running"));
    p.guest_counts_on(16, "the guest counting at the destination")?;
    std::thread::sleep(Duration::from_secs(1));
    assert!(!p.source_resumed(), "{}", p.src.proc.log_text());
    assert!(p.src.proc.alive());
    // `ferry recover` asks the destination, which is down: nothing is settled blindly.
    p.recover_refused(&[], "cannot ask the destination")?;
    // The destination sidecar back (its record of the migration survived), it says its
    // CH runs the VM: the source CH is told to stop.
    p.restart_sidecar(1)?;
    let line = p.ok(0, &["recover", "vm1"])?;
    assert!(line.contains("stops its VM"), "{line}");
    wait_for("the source CH exiting", Duration::from_secs(10), || {
        !p.src.proc.alive()
    })?;
    assert!(!p.source_resumed());
    assert_eq!(p.src.guest().bad, 0);
    assert!(!p.keeper_alive(), "the keeper ends once it answered");
    Ok(())
}

/// The source sidecar killed in the middle of pre-copy (slowed by a bandwidth cap): the
/// source CH's connections end and it resumes its VM; the destination sidecar abandons
/// the half-received VM (the destination CH can receive again), and the keeper started
/// for the commit window does not outlive the sidecar that never handed it anything.
#[test]
#[ignore = "needs Cloud Hypervisor: scripts/test.sh runs it when it finds CH"]
fn a_source_sidecar_killed_during_precopy_leaves_the_vm_running_at_the_source() -> anyhow::Result<()>
{
    require_ch();
    require_kvm();
    let _g = serial();
    let mut p = ChPair::start(Vec::new())?;
    let child = p.migrate_with(&["--max-bandwidth", "16"])?;
    p.wait_memory_moving()?;
    p.sidecars[0].kill9();
    drop(child);
    p.wait_vm_stayed_at_source()?;
    assert_eq!(p.src.guest().bad, 0);
    wait_for("the keeper ending", Duration::from_secs(5), || {
        !p.keeper_alive()
    })?;
    Ok(())
}

/// The link cut in the middle of pre-copy: both sidecars notice within seconds; the source
/// CH is answered Error and resumes, the destination CH is told to abandon. With the link
/// back, the same VM migrates.
#[test]
#[ignore = "needs Cloud Hypervisor: scripts/test.sh runs it when it finds CH"]
fn a_link_cut_during_precopy_leaves_the_vm_at_the_source_and_a_retry_moves_it() -> anyhow::Result<()>
{
    require_ch();
    require_kvm();
    let _g = serial();
    let p = ChPair::start(Vec::new())?;
    let child = p.migrate_with(&["--max-bandwidth", "16"])?;
    p.wait_memory_moving()?;
    p.hosts.cut()?;
    let s = p.summary(child)?;
    assert_eq!(s["result"], "aborted", "{s:#}");
    p.wait_vm_stayed_at_source()?;
    p.hosts.restore()?;
    // The destination sidecar put the CH back in its waiting list: the same VM moves.
    p.retry_moves_it()?;
    assert_eq!(p.dst.vm_state()?.as_deref(), Some("Running"));
    Ok(())
}

/// Post-copy, the source sidecar killed right after its decision, before `Complete`
/// left: the destination CH restored the VM from pulled pages but never ran it and drops
/// it; the source CH (paused, its memory never gone) is held by the keeper until `ferry
/// recover vm1 --abort`, then resumes and counts on with every page intact.
#[test]
#[ignore = "needs Cloud Hypervisor: scripts/test.sh runs it when it finds CH"]
fn a_postcopy_source_sidecar_killed_after_the_decision_is_rolled_back_by_recover_abort(
) -> anyhow::Result<()> {
    rolled_back_after_the_decision(true)
}

/// Waits until the destination sidecar says the post-copy VM runs there and its pull is
/// under way.
fn wait_pulling(p: &ChPair) -> anyhow::Result<()> {
    wait_for("the post-copy pull", Duration::from_secs(30), || {
        p.sidecars[1]
            .log_text()
            .contains("runs here; pulling its memory")
    })
    .map_err(|e| anyhow::anyhow!("{e}\n{}", p.logs()))
}

/// Post-copy's stated risk, with the source sidecar killed during the pull (slowed by a
/// bandwidth cap): the VM runs at the destination, part of its memory only at the source,
/// and the source is gone. The destination CH cannot have its next missing page and ends
/// (the VM is lost: what the README and the summary warn of), and the destination
/// sidecar records the migration as failed with the reason.
#[test]
#[ignore = "needs Cloud Hypervisor: scripts/test.sh runs it when it finds CH"]
fn a_postcopy_pull_losing_its_source_loses_the_vm_and_says_so() -> anyhow::Result<()> {
    require_ch();
    require_kvm();
    let _g = serial();
    let mut p = ChPair::start_with(ClusterOpts::default(), true)?;
    let child = p.migrate_with(&["--postcopy", "--max-bandwidth", "2"])?;
    wait_pulling(&p)?;
    p.sidecars[0].kill9();
    drop(child);
    wait_for("the destination CH ending", Duration::from_secs(60), || {
        !p.dst.proc.alive()
    })
    .map_err(|e| anyhow::anyhow!("{e}\n{}", p.logs()))?;
    p.wait_status(1, "the destination recording the failure", |st| {
        incoming(st, |m| {
            m["state"] == "discarded" && m["error"].as_str().is_some_and(|e| e.contains("pull"))
        })
    })?;
    // The source CH was answered Ok before the pull began, and left.
    assert!(!p.src.proc.alive());
    assert!(!p.source_resumed());
    Ok(())
}

/// The same risk from the other side: the destination sidecar killed during the pull.
/// The destination CH loses the one who serves its page faults and ends; the source
/// sidecar's summary says the VM ran at the destination and its pull broke off.
#[test]
#[ignore = "needs Cloud Hypervisor: scripts/test.sh runs it when it finds CH"]
fn a_postcopy_pull_losing_its_destination_sidecar_is_reported_by_the_source() -> anyhow::Result<()>
{
    require_ch();
    require_kvm();
    let _g = serial();
    let mut p = ChPair::start_with(ClusterOpts::default(), true)?;
    let child = p.migrate_with(&["--postcopy", "--max-bandwidth", "2"])?;
    wait_pulling(&p)?;
    p.sidecars[1].kill9();
    let s = p.summary(child)?;
    assert_eq!(s["result"], "committed", "{s:#}");
    assert_eq!(s["postcopy"], true, "{s:#}");
    assert!(
        s["error"]
            .as_str()
            .is_some_and(|e| e.contains("pull broke off")),
        "{s:#}"
    );
    wait_for("the destination CH ending", Duration::from_secs(60), || {
        !p.dst.proc.alive()
    })
    .map_err(|e| anyhow::anyhow!("{e}\n{}", p.logs()))?;
    assert!(!p.source_resumed());
    Ok(())
}

/// `ferry cancel` of a running CH migration (pre-copy, slowed by a bandwidth cap): the
/// memory connection it is moving on ends, the source CH gives the migration up with its
/// VM still running, the destination CH abandons what it had and waits again, and the
/// summary says `cancelled`. The VM is registered here again and migrates afterwards.
#[test]
#[ignore = "needs Cloud Hypervisor: scripts/test.sh runs it when it finds CH"]
fn a_running_ch_migration_is_cancelled_and_the_vm_runs_on_at_the_source() -> anyhow::Result<()> {
    require_ch();
    require_kvm();
    let _g = serial();
    let p = ChPair::start(Vec::new())?;
    let child = p.migrate_with(&["--max-bandwidth", "16"])?;
    p.wait_memory_moving()?;
    let line = p.ok(0, &["cancel", "vm1"])?;
    assert!(line.contains("cancelled"), "{line}");
    let s = p.summary(child)?;
    assert_eq!(s["result"], "cancelled", "{s:#}");
    p.wait_vm_stayed_at_source()?;
    p.retry_moves_it()?;
    Ok(())
}

/// Per-page checks between the two sidecars: one byte of CH's memory flipped on its way
/// (after the source sidecar hashed it): the destination finds the page that landed
/// differently, answers Error, the source CH gives the migration up with its VM running,
/// and the summary names the page check.
#[test]
#[ignore = "needs Cloud Hypervisor: scripts/test.sh runs it when it finds CH"]
fn a_page_corrupted_on_the_way_fails_the_page_check_and_the_vm_runs_on() -> anyhow::Result<()> {
    require_ch();
    require_kvm();
    let _g = serial();
    let p = ChPair::start(vec![(
        "FERRY_TEST_CORRUPT_CH_BYTE".into(),
        "1000000".into(),
    )])?;
    let s = p.summary(p.migrate()?)?;
    assert_eq!(s["result"], "aborted", "{s:#}");
    p.wait_source_gave_up()?;
    assert!(
        s["error"]
            .as_str()
            .is_some_and(|e| e.contains("answered Error")),
        "{s:#}"
    );
    wait_for(
        "the destination naming the page check",
        Duration::from_secs(30),
        || p.sidecars[1].log_text().contains("page check failed"),
    )
    .map_err(|e| anyhow::anyhow!("{e}\n{}", p.logs()))?;
    p.guest_counts_on(16, "the guest counting on at the source")?;
    assert_eq!(p.src.guest().bad, 0);
    wait_for(
        "the destination CH without a VM",
        Duration::from_secs(30),
        || matches!(p.dst.vm_state(), Ok(None)),
    )?;
    Ok(())
}

/// Post-copy, the destination sidecar killed once the destination CH restored the VM
/// (paused, its pages served by that sidecar), before the source got that answer: the
/// source CH (paused since its `Config`, its memory with the source sidecar) is answered
/// and resumes; the destination CH never runs the VM.
#[test]
#[ignore = "needs Cloud Hypervisor: scripts/test.sh runs it when it finds CH"]
fn a_postcopy_destination_sidecar_killed_after_the_restore_leaves_the_vm_at_the_source(
) -> anyhow::Result<()> {
    require_ch();
    require_kvm();
    let _g = serial();
    let (p, child) = ChPair::killed_at(1, "ch-dest-restored", true, &["--postcopy"])?;
    let s = p.summary(child)?;
    assert_eq!(s["result"], "aborted", "{s:#}");
    p.wait_source_resumed()?;
    p.guest_counts_on(16, "the guest counting on at the source")?;
    assert_eq!(p.src.guest().bad, 0);
    assert_ne!(p.dst.vm_state().ok().flatten().as_deref(), Some("Running"));
    Ok(())
}

/// Post-copy, the destination sidecar killed once the destination CH runs the VM: nobody
/// serves its page faults any more, so the destination CH ends (post-copy's stated risk);
/// the source, whose answer to `Complete` was lost, holds its CH paused. `ferry recover`
/// refuses while the destination is down; with it back, the destination says its CH is
/// gone, and the source CH resumes with every page intact.
#[test]
#[ignore = "needs Cloud Hypervisor: scripts/test.sh runs it when it finds CH"]
fn a_postcopy_destination_sidecar_killed_once_the_vm_runs_there_is_rolled_back_by_recover(
) -> anyhow::Result<()> {
    require_ch();
    require_kvm();
    let _g = serial();
    let (mut p, child) = ChPair::killed_at(1, "ch-dest-running", true, &["--postcopy"])?;
    let s = p.summary(child)?;
    assert_eq!(s["result"], "committed-unconfirmed", "{s:#}");
    wait_for("the destination CH ending", Duration::from_secs(60), || {
        !p.dst.proc.alive()
    })
    .map_err(|e| anyhow::anyhow!("{e}\n{}", p.logs()))?;
    assert!(!p.source_resumed(), "{}", p.src.proc.log_text());
    p.recover_refused(&[], "cannot ask the destination")?;
    p.restart_sidecar(1)?;
    let line = p.ok(0, &["recover", "vm1"])?;
    assert!(line.contains("resumes its VM"), "{line}");
    p.wait_source_resumed()?;
    p.guest_counts_on(16, "the guest counting on at the source")?;
    assert_eq!(p.src.guest().bad, 0);
    Ok(())
}
