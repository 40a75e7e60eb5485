//! Prometheus metrics (`ferry serve --metrics <addr:port>`): counters and histograms the
//! migrations update, and [`Gauges`] the daemon reads at scrape time, as text exposition
//! format 0.0.4 on `GET /metrics` from a small HTTP/1.0 responder.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// What is read at scrape time.
#[derive(Clone, Copy, Debug, Default)]
pub struct Gauges {
    /// Outgoing migrations running.
    pub outgoing: usize,
    /// Outgoing migrations waiting.
    pub queued: usize,
    /// Incoming migrations running.
    pub incoming: usize,
    /// `max_outgoing`.
    pub max_outgoing: usize,
    /// `max_incoming`.
    pub max_incoming: usize,
    /// The host's cap, bytes per second (0: none).
    pub cap: u64,
}

/// Downtime histogram bucket bounds, seconds.
const DOWNTIME_BUCKETS: [f64; 9] = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];
/// Whole-migration histogram bucket bounds, seconds.
const TOTAL_BUCKETS: [f64; 9] = [1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0];

/// A histogram with fixed buckets.
#[derive(Debug)]
struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, v: f64) {
        for (b, c) in self.bounds.iter().zip(&mut self.counts) {
            if v <= *b {
                *c += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}", self.sum);
        let _ = writeln!(out, "{name}_count {}", self.count);
    }
}

/// What the migrations add up to since the daemon started.
#[derive(Debug)]
pub struct Metrics {
    tcp_bytes: AtomicU64,
    rdma_bytes: AtomicU64,
    rounds: AtomicU64,
    results: Mutex<BTreeMap<(&'static str, String), u64>>,
    downtime: Mutex<Histogram>,
    total: Mutex<Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            tcp_bytes: AtomicU64::new(0),
            rdma_bytes: AtomicU64::new(0),
            rounds: AtomicU64::new(0),
            results: Mutex::new(BTreeMap::new()),
            downtime: Mutex::new(Histogram::new(&DOWNTIME_BUCKETS)),
            total: Mutex::new(Histogram::new(&TOTAL_BUCKETS)),
        }
    }
}

impl Metrics {
    /// Payload bytes sent over a transport ("tcp" or "rdma").
    pub fn add_bytes(&self, rdma: bool, bytes: u64) {
        let c = if rdma {
            &self.rdma_bytes
        } else {
            &self.tcp_bytes
        };
        c.fetch_add(bytes, Ordering::Relaxed);
    }

    /// A migration ended: its direction, result, rounds, downtime and whole time.
    pub fn finished(
        &self,
        direction: &'static str,
        result: &str,
        rounds: u32,
        downtime: Option<Duration>,
        total: Duration,
    ) {
        *self
            .results
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((direction, result.to_owned()))
            .or_default() += 1;
        self.rounds.fetch_add(u64::from(rounds), Ordering::Relaxed);
        if let Some(d) = downtime {
            self.downtime
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .observe(d.as_secs_f64());
        }
        if direction == "outgoing" {
            self.total
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .observe(total.as_secs_f64());
        }
    }
}

impl Metrics {
    /// The exposition text: the counters, and `g` read now.
    pub fn render(&self, g: &Gauges) -> String {
        let m = self;
        let mut out = String::new();
        let _ = writeln!(
        out,
        "# HELP ferry_bytes_total Guest memory payload bytes sent by outgoing migrations.\n# TYPE ferry_bytes_total counter"
    );
        let _ = writeln!(
            out,
            "ferry_bytes_total{{transport=\"tcp\"}} {}",
            m.tcp_bytes.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "ferry_bytes_total{{transport=\"rdma\"}} {}",
            m.rdma_bytes.load(Ordering::Relaxed)
        );
        let _ = writeln!(
        out,
        "# HELP ferry_migrations_total Migrations ended, by direction and result.\n# TYPE ferry_migrations_total counter"
    );
        for ((dir, result), n) in m.results.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = writeln!(
                out,
                "ferry_migrations_total{{direction=\"{dir}\",result=\"{result}\"}} {n}"
            );
        }
        let _ = writeln!(
        out,
        "# HELP ferry_rounds_total Pre-copy rounds (the final one included) of ended outgoing migrations.\n# TYPE ferry_rounds_total counter\nferry_rounds_total {}",
        m.rounds.load(Ordering::Relaxed)
    );
        m.downtime.lock().unwrap_or_else(|p| p.into_inner()).render(
            &mut out,
            "ferry_downtime_seconds",
            "Guest pause of committed outgoing migrations.",
        );
        m.total.lock().unwrap_or_else(|p| p.into_inner()).render(
            &mut out,
            "ferry_migration_seconds",
            "Whole outgoing migrations, request to end.",
        );
        let (running, queued, incoming) = (g.outgoing, g.queued, g.incoming);
        let _ = writeln!(
        out,
        "# HELP ferry_queue_length Outgoing migrations waiting for a slot.\n# TYPE ferry_queue_length gauge\nferry_queue_length {queued}"
    );
        let _ = writeln!(
        out,
        "# HELP ferry_running_migrations Migrations running now.\n# TYPE ferry_running_migrations gauge\nferry_running_migrations{{direction=\"outgoing\"}} {running}\nferry_running_migrations{{direction=\"incoming\"}} {incoming}"
    );
        let _ = writeln!(
        out,
        "# HELP ferry_migration_limit Most migrations at once.\n# TYPE ferry_migration_limit gauge\nferry_migration_limit{{direction=\"outgoing\"}} {}\nferry_migration_limit{{direction=\"incoming\"}} {}",
        g.max_outgoing, g.max_incoming
    );
        let _ = writeln!(
        out,
        "# HELP ferry_bandwidth_cap_bytes_per_second The host's bandwidth cap for outgoing migrations (0: none).\n# TYPE ferry_bandwidth_cap_bytes_per_second gauge\nferry_bandwidth_cap_bytes_per_second {}",
        g.cap
    );
        out
    }
}

/// Serves `GET /metrics` on `l` until the daemon exits, with the text `render` gives.
pub fn serve(l: TcpListener, render: impl Fn() -> String) {
    for s in l.incoming().flatten() {
        if let Err(e) = answer(&render, s) {
            tracing::debug!("metrics request: {e}");
        }
    }
}

fn answer(render: &impl Fn() -> String, mut s: TcpStream) -> std::io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.set_write_timeout(Some(Duration::from_secs(2)))?;
    // The request line is all that matters; read until the headers end (bounded).
    let mut req = Vec::new();
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 8192 {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        req.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&req);
    let path = line.split_whitespace().nth(1).unwrap_or("");
    let (status, body) = if line.starts_with("GET ") && (path == "/metrics" || path == "/") {
        ("200 OK", render())
    } else {
        ("404 Not Found", "GET /metrics\n".to_owned())
    };
    write!(
        s,
        "HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    s.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_count_each_observation_in_every_bucket_at_or_above_it() {
        let mut h = Histogram::new(&DOWNTIME_BUCKETS);
        h.observe(0.02);
        h.observe(3.0);
        let mut s = String::new();
        h.render(&mut s, "x", "help");
        assert!(s.contains("x_bucket{le=\"0.01\"} 0\n"), "{s}");
        assert!(s.contains("x_bucket{le=\"0.025\"} 1\n"), "{s}");
        assert!(s.contains("x_bucket{le=\"2.5\"} 1\n"), "{s}");
        assert!(s.contains("x_bucket{le=\"5\"} 2\n"), "{s}");
        assert!(s.contains("x_bucket{le=\"+Inf\"} 2\n"), "{s}");
        assert!(s.contains("x_count 2\n"), "{s}");
        assert!(s.contains("x_sum 3.02\n"), "{s}");
    }
}
