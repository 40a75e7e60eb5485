//! `ferry-bench`: end-to-end benchmarks of Ferry, each reported against a reference
//! measured in the same run on the same link (this machine is shared and noisy).
//!
//! - `ferry-bench tcp`: full-copy throughput over loopback vs iperf3, CPU s/GiB.

mod local;
mod tcp;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "ferry-bench", about = "Ferry end-to-end benchmarks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Full-copy throughput of a random-filled region over loopback, vs iperf3.
    Tcp(tcp::TcpArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Tcp(a) => tcp::run(&a),
    }
}
