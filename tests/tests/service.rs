//! End-to-end: `ferry` as an operator meets it. The configuration file and the flags
//! over it, readiness and stopping told to systemd, JSON logs, Prometheus metrics,
//! refused key files, and the command line's errors and exit codes (2 for usage, caught
//! before anything connects; 1 for failures, saying what to do).

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use ferry_tests::*;

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `ferry serve` in host A's namespace with a config file, as a process.
fn serve(hosts: &TwoHosts, config: &str, extra: &[&str]) -> anyhow::Result<Proc> {
    let cfg = hosts.path("ferry.toml");
    std::fs::write(&cfg, config)?;
    let mut c = hosts.cmd(0, &bin("ferry"));
    c.arg("serve").arg("--config").arg(&cfg).args(extra);
    Proc::spawn("sidecar", c, hosts.path("sidecar.log"))
}

fn config(hosts: &TwoHosts, more: &str) -> anyhow::Result<String> {
    write_key(&hosts.path("key"), "service-test-key-0123456789\n")?;
    Ok(format!(
        "socket = {:?}\nlisten = \"127.0.0.1:7781\"\nstate_dir = {:?}\ninsecure_psk_key_file = {:?}\n{more}",
        hosts.path("a.sock"),
        hosts.path("state"),
        hosts.path("key"),
    ))
}

fn ferry_in(hosts: &TwoHosts, args: &[&str]) -> anyhow::Result<Output> {
    Ok(hosts
        .cmd(0, &bin("ferry"))
        .args(args)
        .stdin(Stdio::null())
        .output()?)
}

fn http_get(hosts: &TwoHosts, addr: &str, port: u16, path: &str) -> anyhow::Result<String> {
    let script = format!(
        "exec 3<>/dev/tcp/{addr}/{port}; printf 'GET {path} HTTP/1.0\\r\\n\\r\\n' >&3; cat <&3"
    );
    let o = hosts
        .cmd(0, std::path::Path::new("/bin/bash"))
        .args(["-c", &script])
        .output()?;
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// Every setting from the file, the flags over it; readiness, metrics and JSON logs; a
/// clean stop on SIGTERM told to systemd.
#[test]
fn config_file_flags_readiness_metrics_and_json_logs() -> anyhow::Result<()> {
    let _g = serial();
    let hosts = TwoHosts::new()?;
    let notify = UnixDatagram::bind(hosts.path("notify.sock"))?;
    notify.set_read_timeout(Some(Duration::from_secs(20)))?;
    let cfg = config(
        &hosts,
        "max_outgoing = 3\nmax_incoming = 5\nmax_bandwidth_mibps = 250\nmetrics = \"127.0.0.1:9477\"\nlog_format = \"json\"\n",
    )?;
    let cfg_path = hosts.path("ferry.toml");
    std::fs::write(&cfg_path, &cfg)?;
    let mut c = hosts.cmd(0, &bin("ferry"));
    c.arg("serve")
        .arg("--config")
        .arg(&cfg_path)
        .args(["--max-incoming", "4"])
        .env("NOTIFY_SOCKET", hosts.path("notify.sock"));
    let mut d = Proc::spawn("sidecar", c, hosts.path("sidecar.log"))?;
    let mut buf = [0u8; 256];
    let n = notify.recv(&mut buf)?;
    assert_eq!(&buf[..n], b"READY=1");
    // Status: limits from the file, max_incoming from the flag.
    let o = ferry_in(
        &hosts,
        &[
            "status",
            "--json",
            "--socket",
            &hosts.path("a.sock").to_string_lossy(),
        ],
    )?;
    let st: serde_json::Value = serde_json::from_slice(&o.stdout)?;
    assert_eq!(st["limits"]["outgoing"], 3, "{st:#}");
    assert_eq!(st["limits"]["incoming"], 4, "{st:#}");
    assert_eq!(st["limits"]["max_bandwidth_mibps"], 250, "{st:#}");
    assert_eq!(st["migrations"], serde_json::json!([]), "{st:#}");
    // The table for people.
    let o = ferry_in(
        &hosts,
        &[
            "status",
            "--socket",
            &hosts.path("a.sock").to_string_lossy(),
        ],
    )?;
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(
        table.contains("limits: 3 outgoing, 4 incoming, bandwidth 250 MiB/s")
            && table.contains("no migrations"),
        "{table}"
    );
    // Metrics.
    let m = http_get(&hosts, "127.0.0.1", 9477, "/metrics")?;
    assert!(m.starts_with("HTTP/1.0 200 OK"), "{m}");
    for line in [
        "ferry_queue_length 0",
        "ferry_running_migrations{direction=\"outgoing\"} 0",
        "ferry_migration_limit{direction=\"incoming\"} 4",
        &format!("ferry_bandwidth_cap_bytes_per_second {}", 250u64 << 20),
        "ferry_bytes_total{transport=\"tcp\"} 0",
        "# TYPE ferry_downtime_seconds histogram",
        "ferry_migration_seconds_count 0",
    ] {
        assert!(m.contains(line), "missing {line:?} in\n{m}");
    }
    assert!(http_get(&hosts, "127.0.0.1", 9477, "/nope")?.starts_with("HTTP/1.0 404"));
    // JSON logs: every line is an object; no colour codes in a file.
    let log = d.log_text();
    assert!(!log.contains('\u{1b}'), "{log}");
    let first = log.lines().next().unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(first)?;
    assert_eq!(v["level"], "INFO", "{first}");
    assert!(log.contains("ferry sidecar serving"), "{log}");
    // SIGTERM: STOPPING=1, exit 0, socket gone.
    // SAFETY: signalling a child process this test started.
    assert_eq!(unsafe { libc::kill(d.child.id() as i32, libc::SIGTERM) }, 0);
    let n = notify.recv(&mut buf)?;
    assert_eq!(&buf[..n], b"STOPPING=1");
    assert_eq!(d.child.wait()?.code(), Some(0), "{}", d.log_text());
    assert!(!hosts.path("a.sock").exists());
    Ok(())
}

/// Bad settings are refused with a clear message and exit 2 (usage) or 1 (a file).
#[test]
fn bad_settings_and_key_files_others_can_read_are_refused() -> anyhow::Result<()> {
    let _g = serial();
    let hosts = TwoHosts::new()?;
    let base = config(&hosts, "")?;
    for (more, says) in [
        ("max_outgoing = 0\n", "max_outgoing must be 1 to 64"),
        ("max_incoming = 1000\n", "max_incoming must be 1 to 64"),
        (
            "max_bandwidth_mibps = 99999999\n",
            "max_bandwidth_mibps must be at most",
        ),
        ("no_such_key = 1\n", "unknown field"),
        ("log_format = \"xml\"\n", "log_format must be"),
    ] {
        std::fs::write(hosts.path("bad.toml"), format!("{base}{more}"))?;
        let o = ferry_in(
            &hosts,
            &[
                "serve",
                "--config",
                &hosts.path("bad.toml").to_string_lossy(),
            ],
        )?;
        assert!(
            !o.status.success() && text(&o).contains(says),
            "{more}: {}",
            text(&o)
        );
    }
    // A key file others may read.
    std::fs::set_permissions(hosts.path("key"), std::fs::Permissions::from_mode(0o644))?;
    let mut d = serve(&hosts, &base, &[])?;
    let status = d.child.wait()?;
    assert_eq!(status.code(), Some(1), "{}", d.log_text());
    assert!(
        d.log_text().contains("0600") || d.log_text().contains("others"),
        "{}",
        d.log_text()
    );
    Ok(())
}

/// The command line: usage errors exit 2 before anything connects; a daemon that is not
/// there, an unregistered VM, a cancel of nothing exit 1 and say what to do.
#[test]
fn cli_errors_say_what_to_do_with_distinct_exit_codes() -> anyhow::Result<()> {
    let _g = serial();
    let hosts = TwoHosts::new()?;
    let nowhere = hosts.path("nowhere.sock");
    let nowhere = nowhere.to_string_lossy();
    // Usage errors: exit 2, even with no daemon anywhere.
    for args in [
        &["migrate", "vm1", "--to", "nonsense", "--socket", &nowhere][..],
        &[
            "migrate",
            "vm1",
            "--to",
            "10.0.0.2:7780",
            "--streams",
            "0",
            "--socket",
            &nowhere,
        ],
        &[
            "migrate",
            "bad id!",
            "--to",
            "10.0.0.2:7780",
            "--socket",
            &nowhere,
        ],
        &[
            "migrate",
            "vm1",
            "--to",
            "10.0.0.2:7780",
            "--priority",
            "urgent",
        ],
        &["set-bandwidth", "vm1", "-5"],
        &["drain", "--to", "10.0.0.2"],
    ] {
        let o = Command::new(bin("ferry")).args(args).output()?;
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", text(&o));
    }
    // No daemon: exit 1 and how to start one.
    let o = Command::new(bin("ferry"))
        .args(["status", "--socket", &nowhere])
        .output()?;
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("is `ferry serve` running?"),
        "{}",
        text(&o)
    );
    // A daemon, but no such VM: one clear line (no summary of zeros), exit 1; JSON with
    // --json.
    let cfg = config(&hosts, "")?;
    let _d = serve(&hosts, &cfg, &[])?;
    let sock = hosts.path("a.sock");
    wait_for("the daemon", Duration::from_secs(10), || sock.exists())?;
    let sock = sock.to_string_lossy();
    let o = ferry_in(
        &hosts,
        &[
            "migrate",
            "vm9",
            "--to",
            "127.0.0.1:7790",
            "--socket",
            &sock,
        ],
    )?;
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("no VM vm9 is registered"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(o.stdout.is_empty(), "{}", text(&o));
    let o = ferry_in(
        &hosts,
        &[
            "migrate",
            "vm9",
            "--to",
            "127.0.0.1:7790",
            "--json",
            "--socket",
            &sock,
        ],
    )?;
    assert_eq!(o.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout)?;
    assert_eq!(v["result"], "refused", "{v:#}");
    assert!(
        v["error"]
            .as_str()
            .is_some_and(|e| e.contains("not") || e.contains("no VM")),
        "{v:#}"
    );
    for args in [&["cancel", "vm9"][..], &["set-bandwidth", "vm9", "10"]] {
        let mut a = args.to_vec();
        a.extend(["--socket", &sock]);
        let o = ferry_in(&hosts, &a)?;
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        assert!(text(&o).contains("no migration of vm9"), "{}", text(&o));
    }
    // Drain with nothing registered: nothing to do, exit 0.
    let o = ferry_in(
        &hosts,
        &["drain", "--to", "127.0.0.1:7790", "--socket", &sock],
    )?;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("no VMs to drain"), "{}", text(&o));
    Ok(())
}

/// The unit in `dist/` passes `systemd-analyze verify` (with `ExecStart` pointing at the
/// binary just built).
#[test]
fn the_systemd_unit_verifies() -> anyhow::Result<()> {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../dist/ferry.service"
    ))?;
    assert!(
        unit.contains("Type=notify") && unit.contains("ferry serve --config /etc/ferry/ferry.toml")
    );
    let dir = std::env::temp_dir().join(format!("ferry-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("ferry.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/ferry", &bin("ferry").to_string_lossy()),
    )?;
    let o = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()?;
    let _ = std::fs::remove_dir_all(&dir);
    assert!(o.status.success() && o.stderr.is_empty(), "{}", text(&o));
    Ok(())
}
