//! `loadgen`: load scenarios against roomcast nodes (and, for comparison, a Socket.IO 4
//! server: `--proto socketio`, see bench/socketio). Every scenario is bounded in count and
//! time, prints a readable table, and ends with one JSON line (`RESULT {...}`).
//!
//! - `idle`: N connections, each subscribed to a room, spread over one or more nodes,
//!   held; with `--node-pid`, the nodes' RSS growth per connection.
//! - `fanout`: N subscribers in one room, a publisher at a fixed rate; deliveries per
//!   second, end-to-end latency percentiles, messages lost.
//! - `storm`: connections per second (`--mode rate`), or a reconnect storm with recovery
//!   (`--mode reconnect`).
//! - `compression`: chat-like JSON with and without permessage-deflate: bytes on the wire
//!   per delivery, node CPU.
//! - `cluster`: publishers on one node, subscribers on others: cross-node latency.
//! - `api-publish`: backend publications over NATS (requests or fire and forget):
//!   publications per second the cluster accepted.

mod api_publish;
mod cluster;
mod common;
mod compression;
mod fanout;
mod idle;
mod proto;
mod rawws;
mod storm;

use anyhow::bail;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "loadgen", about = "Load scenarios for roomcast")]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Hold N idle subscribed connections.
    Idle(idle::IdleArgs),
    /// One room, N subscribers, one publisher at a fixed rate.
    Fanout(fanout::FanoutArgs),
    /// Connection rate, or a reconnect storm with recovery.
    Storm(storm::StormArgs),
    /// Chat-like JSON with and without permessage-deflate: wire bytes, node CPU.
    Compression(compression::CompressionArgs),
    /// Publishers on one node, subscribers on others: cross-node latency.
    Cluster(cluster::ClusterArgs),
    /// Backend publications over NATS: publications per second accepted.
    ApiPublish(api_publish::ApiPublishArgs),
}

/// Connections a scenario holds at once (plus a margin for the publisher and stdio).
fn fds_needed(s: &Scenario) -> usize {
    match s {
        Scenario::Idle(a) => a.conns,
        Scenario::Fanout(a) => a.subs,
        Scenario::Storm(a) => a.conns,
        Scenario::Compression(a) => a.subs,
        Scenario::Cluster(a) => a.subs + a.publishers,
        Scenario::ApiPublish(_) => 1,
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadgen: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let limit = rawws::raise_fd_limit();
    let need = fds_needed(&cli.scenario) as u64 + 64;
    if need > limit {
        bail!(
            "{} connections need more file descriptors than this process may hold ({limit}): \
             split them over several loadgen processes",
            need - 64
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        match cli.scenario {
            Scenario::Idle(a) => idle::run(a).await,
            Scenario::Fanout(a) => fanout::run(a).await,
            Scenario::Storm(a) => storm::run(a).await,
            Scenario::Compression(a) => compression::run(a).await,
            Scenario::Cluster(a) => cluster::run(a).await,
            Scenario::ApiPublish(a) => api_publish::run(a).await,
        }
    })
}
