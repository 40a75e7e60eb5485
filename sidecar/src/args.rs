//! The options of `ferry migrate` and `ferry drain`, and how they become a request.

use std::path::PathBuf;

use clap::ValueEnum;
use ferry_engine::session::VerifyMode;
use ferry_proto::cli::{MigrateRequest, OnLimit, Priority, TransportChoice};

use crate::config;

/// `--on-limit`.
#[derive(Clone, Copy, ValueEnum)]
pub enum LimitArg {
    /// Give up; the VM keeps running here.
    Abort,
    /// Pause anyway and copy the rest.
    Force,
}

/// `--verify`.
#[derive(Clone, Copy, ValueEnum)]
pub enum VerifyArg {
    /// Compare memory digests before the destination resumes (costs downtime).
    Strict,
    /// Compare after the destination resumes, keeping the source VM until then.
    AfterResume,
}

/// `--priority`.
#[derive(Clone, Copy, ValueEnum)]
pub enum PriorityArg {
    /// Ahead of normal and low.
    High,
    /// The default.
    Normal,
    /// After the others (it moves up while it waits).
    Low,
}

/// `--transport`.
#[derive(Clone, Copy, ValueEnum)]
pub enum TransportArg {
    /// RDMA when both hosts can and the destination is an `--rdma-peer`, else TCP.
    Auto,
    /// Multi-stream TCP.
    Tcp,
    /// RDMA READ; fail if it cannot be used.
    Rdma,
}

/// Options of a migration (`migrate` and `drain`).
#[derive(clap::Args, Clone)]
pub struct MigrateOpts {
    /// The local daemon's socket.
    #[arg(long, default_value = config::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Data streams (TCP connections or RDMA queue pairs), 1 to 64.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub streams: u16,
    /// Downtime budget in milliseconds.
    #[arg(long, default_value_t = 300)]
    pub downtime_ms: u32,
    /// Most pre-copy rounds.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_rounds: u32,
    /// Pre-copy timeout in seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout_s: u64,
    /// At the round limit or timeout: abort, or pause and copy the rest.
    #[arg(long, value_enum, default_value_t = LimitArg::Force)]
    pub on_limit: LimitArg,
    /// Data transport.
    #[arg(long, value_enum, default_value_t = TransportArg::Auto)]
    pub transport: TransportArg,
    /// Watch writes this long before round 1 and send those pages last (0: off; at most
    /// 60000).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=60_000))]
    pub observe_ms: u32,
    /// When to compare the memory digests.
    #[arg(long, value_enum, default_value_t = VerifyArg::AfterResume)]
    pub verify: VerifyArg,
    /// Same as `--verify strict`.
    #[arg(long)]
    pub verify_before_resume: bool,
    /// Place in the queue.
    #[arg(long, value_enum, default_value_t = PriorityArg::Normal)]
    pub priority: PriorityArg,
    /// This migration's bandwidth cap in MiB/s (the host's cap applies as well; change it
    /// live with `ferry set-bandwidth`).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1_048_576))]
    pub max_bandwidth: Option<u32>,
    /// Post-copy (Cloud Hypervisor VMs): move the VM at once and pull its memory after it
    /// runs at the destination. Downtime is the state copy only, but until the pull ends
    /// the VM depends on both hosts: losing either loses it.
    #[arg(long)]
    pub postcopy: bool,
}

impl MigrateOpts {
    pub fn request(&self, vm_id: String, to: String) -> MigrateRequest {
        MigrateRequest {
            vm_id,
            to,
            channels: self.streams,
            downtime_ms: self.downtime_ms,
            max_rounds: self.max_rounds,
            timeout_ms: self.timeout_s.saturating_mul(1000),
            on_limit: match self.on_limit {
                LimitArg::Abort => OnLimit::Abort,
                LimitArg::Force => OnLimit::Force,
            },
            transport: match self.transport {
                TransportArg::Auto => TransportChoice::Auto,
                TransportArg::Tcp => TransportChoice::Tcp,
                TransportArg::Rdma => TransportChoice::Rdma,
            },
            observe_ms: self.observe_ms,
            verify: match (self.verify, self.verify_before_resume) {
                (VerifyArg::Strict, _) | (_, true) => VerifyMode::Strict,
                (VerifyArg::AfterResume, false) => VerifyMode::AfterResume,
            },
            priority: match self.priority {
                PriorityArg::High => Priority::High,
                PriorityArg::Normal => Priority::Normal,
                PriorityArg::Low => Priority::Low,
            },
            max_bandwidth_mibps: self.max_bandwidth.unwrap_or(0),
            postcopy: self.postcopy,
        }
    }
}
