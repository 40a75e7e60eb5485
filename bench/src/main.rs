//! `ferry-bench`: end-to-end benchmarks of Ferry, each reported against a reference
//! measured in the same run on the same link (this machine is shared and noisy).
//!
//! - `ferry-bench coldfirst`: bytes saved by the cold-first round-1 order.
//! - `ferry-bench tcp`: full-copy throughput over loopback vs iperf3, CPU s/GiB.
//! - `ferry-bench rdma`: RDMA READ pull throughput vs ib_read_bw (1/2/4 queue pairs), source
//!   CPU s/GiB over RDMA vs TCP; boots the SoftRoCE guest when the host has no RDMA device.
//! - `ferry-bench ch`: an unmodified Cloud Hypervisor VM migrated by CH's own transport
//!   and through Ferry, same guest, same connections.
//! - `ferry-bench cap`: how closely `--max-bandwidth` holds (achieved/cap, vs uncapped).
//! - `ferry-bench total`: the whole migration (destination preparation included) against
//!   the wire time of the same bytes at iperf3's rate.
//! - `ferry-bench control-path`: the source's per-round bitmap scan, coalescing and planning,
//!   GB of guest memory per second per core at 1/10/50 % dirty.
//! - `ferry-bench downtime`: downtime p50/p90 and total time of a running KVM guest
//!   (1 and 4 GiB, dirtying 0/64/256 MiB/s) over loopback, with dirty-log cost per read.

mod cap;
mod ch;
mod coldfirst;
mod control;
mod downtime;
mod fill;
mod link;
mod local;
mod rdma;
mod report;
mod tcp;
mod total;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "ferry-bench", about = "Ferry end-to-end benchmarks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Bytes saved by sending recently written pages last in round 1 (hot-set guest).
    Coldfirst(coldfirst::ColdFirstArgs),
    /// Full-copy throughput of a random-filled region over loopback, vs iperf3.
    Tcp(tcp::TcpArgs),
    /// Downtime and total time of a running KVM guest migrated over loopback, per guest
    /// size and dirtying rate (strict verification, the sidecar's default).
    Downtime(downtime::DowntimeArgs),
    /// RDMA READ pull throughput vs ib_read_bw per queue-pair count, and source CPU per
    /// GiB over RDMA vs TCP (in the SoftRoCE guest when this host has no RDMA device).
    Rdma(rdma::RdmaArgs),
    /// How closely `--max-bandwidth` caps hold: achieved rate over cap, several runs.
    Cap(cap::CapArgs),
    /// An unmodified Cloud Hypervisor VM: CH's own transport vs through Ferry.
    Ch(ch::ChArgs),
    /// The source's per-round control work (bitmap scan, coalescing, windows, plan): GB
    /// of guest memory per second per core.
    ControlPath(control::ControlArgs),
    /// The whole migration of a random-filled idle guest against the wire time of the same
    /// bytes (iperf3, same streams, same run).
    Total(total::TotalArgs),
    /// Ferry against iperf3 on links shaped with tc (10/25/40 Gbit/s) between two network
    /// namespaces, whole migration included.
    Link(link::LinkArgs),
    /// What filling the destination's memory costs here: 4 KiB pages vs transparent huge
    /// pages, on memory just freed vs memory the hypervisor took back.
    Fill(fill::FillArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Tcp(a) => tcp::run(&a),
        Cmd::Coldfirst(a) => coldfirst::run(&a),
        Cmd::Downtime(a) => downtime::run(&a),
        Cmd::Rdma(a) => rdma::run(&a),
        Cmd::Cap(a) => cap::run(&a),
        Cmd::Ch(a) => ch::run(&a),
        Cmd::ControlPath(a) => control::run(&a),
        Cmd::Total(a) => total::run(&a),
        Cmd::Link(a) => link::run(&a),
        Cmd::Fill(a) => fill::run(&a),
    }
}
