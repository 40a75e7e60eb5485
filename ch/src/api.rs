//! Cloud Hypervisor's HTTP API, as the sidecar's CH adapter uses it: HTTP/1.1 requests
//! over the VMM's `--api-socket`, one per connection, JSON bodies (`docs/cloud-hypervisor.md`).
//!
//! CH serves the API on one thread, and `vm.receive-migration` holds it until that
//! migration ends: every call here has a deadline.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};

/// Largest response body read (CH's `vm.info` is kilobytes).
const MAX_BODY: usize = 4 << 20;

/// An answer: status code and body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// Body (JSON, or empty).
    pub body: String,
}

impl Answer {
    /// Whether CH said yes (200 or 204).
    pub fn ok(&self) -> bool {
        matches!(self.status, 200 | 204)
    }
}

/// One request to the API at `socket`, waiting at most `limit` for the answer.
///
/// # Errors
///
/// No CH at `socket`, no answer in time, or an answer that is not HTTP.
pub fn call(
    socket: &Path,
    method: &str,
    endpoint: &str,
    body: Option<&serde_json::Value>,
    limit: Duration,
) -> anyhow::Result<Answer> {
    let mut s = UnixStream::connect(socket).with_context(|| {
        format!(
            "connecting to Cloud Hypervisor's API socket {} (is cloud-hypervisor running with --api-socket?)",
            socket.display()
        )
    })?;
    s.set_read_timeout(Some(limit))?;
    s.set_write_timeout(Some(limit))?;
    let body = body.map(serde_json::Value::to_string).unwrap_or_default();
    let mut req = format!(
        "{method} /api/v1/{endpoint} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\nConnection: close\r\n"
    );
    if !body.is_empty() {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(&body);
    s.write_all(req.as_bytes())
        .with_context(|| format!("sending {endpoint} to Cloud Hypervisor"))?;
    read_answer(&mut s).with_context(|| format!("Cloud Hypervisor's answer to {endpoint}"))
}

/// Reads one HTTP/1.1 response: status line, headers, `Content-Length` bytes of body.
fn read_answer(s: &mut impl Read) -> anyhow::Result<Answer> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b)? == 0 {
            bail!("connection closed before the headers ended");
        }
        head.push(b[0]);
        if head.len() > 64 << 10 {
            bail!("headers longer than 64 KiB");
        }
    }
    let head = String::from_utf8_lossy(&head);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("not an HTTP status line: {status_line:?}"))?;
    let length = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    if length > MAX_BODY {
        bail!("a body of {length} bytes (at most {MAX_BODY})");
    }
    let mut body = vec![0u8; length];
    s.read_exact(&mut body)?;
    Ok(Answer {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// `vmm.ping`: whether a CH answers at `socket`, and its build version.
///
/// # Errors
///
/// No CH there, or it did not answer as CH does.
pub fn ping(socket: &Path) -> anyhow::Result<String> {
    let a = call(socket, "GET", "vmm.ping", None, Duration::from_secs(5))?;
    if !a.ok() {
        bail!("vmm.ping answered {}: {}", a.status, a.body);
    }
    let v: serde_json::Value = serde_json::from_str(&a.body)?;
    Ok(v["build_version"].as_str().unwrap_or_default().to_owned())
}

/// `vm.info`: the VM's state ("Running", "Paused", "Created", ...), or `None` when the
/// CH holds no VM.
///
/// # Errors
///
/// No CH there, or an answer out of its API.
pub fn vm_state(socket: &Path) -> anyhow::Result<Option<String>> {
    let a = call(socket, "GET", "vm.info", None, Duration::from_secs(5))?;
    match a.status {
        200 => {
            let v: serde_json::Value = serde_json::from_str(&a.body)?;
            Ok(v["state"].as_str().map(str::to_owned))
        }
        404 => Ok(None),
        s => bail!("vm.info answered {s}: {}", a.body),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_read_as_ch_writes_them() {
        let raw = b"HTTP/1.1 200 \r\nServer: Cloud Hypervisor API\r\nConnection: keep-alive\r\nContent-Type: application/json\r\nContent-Length: 19\r\n\r\n{\"state\":\"Running\"}trailing";
        // Only what Content-Length announced is read.
        let a = read_answer(&mut &raw[..]).expect("reads");
        assert_eq!(a.status, 200);
        assert_eq!(a.body, "{\"state\":\"Running\"}");
        let a = read_answer(&mut &b"HTTP/1.1 204 \r\n\r\n"[..]).expect("reads");
        assert!(a.ok() && a.body.is_empty());
        assert!(read_answer(&mut &b"garbage\r\n\r\n"[..]).is_err());
        assert!(read_answer(&mut &b"HTTP/1.1 200 OK\r\n"[..]).is_err());
    }
}
