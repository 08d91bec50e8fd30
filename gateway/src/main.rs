//! `roomcast`: runs a node (default), or acts as a client (`roomcast sub ROOM`, …).

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use roomcast_gateway::config::{Config, ProcessEnv};
use roomcast_gateway::{Node, server};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(name = "roomcast", version, about = "roomcast: a horizontally scaled realtime messaging node")]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a node (the default).
    Serve {
        /// TOML configuration file (also ROOMCAST_CONFIG).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    #[command(flatten)]
    Client(roomcast_client::cli::CliCommand),
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("roomcast: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_env("ROOMCAST_LOG").unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .init();
    let rt =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")?;
    match cli.command {
        None => rt.block_on(serve(None)),
        Some(Cmd::Serve { config }) => rt.block_on(serve(config)),
        Some(Cmd::Client(cmd)) => rt.block_on(roomcast_client::cli::run(cmd)).map_err(Into::into),
    }
}

async fn serve(config_path: Option<PathBuf>) -> anyhow::Result<()> {
    let config = Config::load(config_path.as_deref(), &ProcessEnv).context("invalid configuration")?;
    let addr = config.listen_addr()?;
    let ws_path = config.ws_path.clone();
    // Installed before anything starts: a SIGTERM at any moment from here on stops the node
    // cleanly instead of killing it with the default action.
    let mut signals = ShutdownSignals::install().context("installing signal handlers")?;
    let node = tokio::select! {
        node = Node::start(config) => node.context("starting the node")?,
        _ = signals.recv() => {
            tracing::info!("stopped while starting");
            return Ok(());
        }
    };
    let listener = bind(addr).with_context(|| format!("binding {addr}"))?;
    let local = listener.local_addr()?;
    tracing::info!(node = %node.id, %local, "listening");
    // A machine-readable line for scripts and tests: the address actually bound.
    println!("roomcast listening on ws://{local}{ws_path} node={}", node.id);

    let server = tokio::spawn(server::serve(node.clone(), listener));
    signals.recv().await;
    tracing::info!("shutting down: closing connections with 4000");
    node.begin_shutdown();
    let drained = node.drain().await;
    if !drained {
        tracing::warn!("grace period over with connections still open");
    }
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), server).await;
    Ok(())
}

/// Binds with a listen backlog sized for connection storms (the default 128 overflows
/// when thousands of clients reconnect at once; the kernel caps it at somaxconn).
fn bind(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket =
        if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// SIGTERM and SIGINT (Ctrl-C), listened to from [`ShutdownSignals::install`] on.
struct ShutdownSignals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    /// Replaces the default actions of the signals (which end the process at once) from now on.
    fn install() -> std::io::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(ShutdownSignals {
                term: signal(SignalKind::terminate())?,
                int: signal(SignalKind::interrupt())?,
            })
        }
        #[cfg(not(unix))]
        {
            Ok(ShutdownSignals {})
        }
    }

    /// Waits for the next signal.
    async fn recv(&mut self) {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.term.recv() => {}
                _ = self.int.recv() => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
