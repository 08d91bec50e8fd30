//! `idle`: N subscribed connections, spread over one or more nodes, held; the nodes' RSS
//! growth per connection.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use tokio::sync::{Mutex, Semaphore};

use crate::common::{self, Common, Target, per_second, say};
use crate::proto::{self, Conn, Step};

#[derive(Args)]
pub struct IdleArgs {
    #[command(flatten)]
    pub common: Common,
    #[arg(long, default_value_t = 1000)]
    pub conns: usize,
    /// Rooms to spread the connections over.
    #[arg(long, default_value_t = 100)]
    pub rooms: usize,
    /// Seconds to hold the connections once all are up (then RSS is sampled).
    #[arg(long, default_value_t = 5)]
    pub hold_secs: u64,
    /// Node process id(s), comma separated, to sample RSS from /proc. Several load
    /// generators against the same nodes: leave it out and let bench/run.sh sample
    /// (it waits for every process's `READY` line).
    #[arg(long, value_delimiter = ',')]
    pub node_pid: Vec<u32>,
}

/// Answers pings and discards everything else until the connection ends.
pub async fn keep_alive(mut conn: Conn, closed: Arc<AtomicUsize>) {
    while let Ok(Step::Frame { .. }) = conn.recv(|_| {}).await {}
    closed.fetch_add(1, Ordering::Relaxed);
}

pub async fn run(a: IdleArgs) -> anyhow::Result<()> {
    let c = a.common;
    let t = Arc::new(Target::new(&c.url, c.proto)?);
    let rss_before: Vec<u64> = a.node_pid.iter().map(|p| common::rss_kib(*p).unwrap_or(0)).collect();
    let sem = Arc::new(Semaphore::new(c.concurrency.max(1)));
    let failed = Arc::new(AtomicUsize::new(0));
    let closed = Arc::new(AtomicUsize::new(0));
    let first_error = Arc::new(Mutex::new(None::<String>));
    let start = Instant::now();
    let mut handles = Vec::with_capacity(a.conns);
    let rooms = a.rooms.max(1);
    for i in 0..a.conns {
        let permit = sem.clone().acquire_owned().await?;
        let (c2, t2, failed, closed, first_error) =
            (c.clone(), t.clone(), failed.clone(), closed.clone(), first_error.clone());
        handles.push(tokio::spawn(async move {
            let room = format!("idle{}", i % rooms);
            let opened = tokio::time::timeout(
                Duration::from_secs(30),
                proto::open(c2.proto, &t2.dial(&c2, i), Some(&room), None),
            )
            .await;
            drop(permit);
            match opened {
                Ok(Ok((conn, _))) => {
                    tokio::spawn(keep_alive(conn, closed));
                }
                Ok(Err(e)) => {
                    failed.fetch_add(1, Ordering::Relaxed);
                    first_error.lock().await.get_or_insert(format!("{e:#}"));
                }
                Err(_) => {
                    failed.fetch_add(1, Ordering::Relaxed);
                    first_error.lock().await.get_or_insert("timeout".into());
                }
            }
        }));
    }
    for h in handles {
        let _ = h.await;
    }
    let setup = start.elapsed();
    let n_failed = failed.load(Ordering::Relaxed);
    let established = a.conns - n_failed;
    say(&format!("READY established={established} failed={n_failed}"));
    // Let the node settle (allocator, queues), then sample.
    tokio::time::sleep(Duration::from_secs(a.hold_secs)).await;
    let still_open = established - closed.load(Ordering::Relaxed);
    let rss_after: Vec<u64> = a.node_pid.iter().map(|p| common::rss_kib(*p).unwrap_or(0)).collect();
    let delta_kib: u64 = rss_after.iter().zip(&rss_before).map(|(a, b)| a.saturating_sub(*b)).sum();
    let per_conn = if still_open > 0 { delta_kib as f64 * 1024.0 / still_open as f64 } else { 0.0 };
    println!("scenario            idle ({}, {} node(s))", c.proto.name(), t.addrs.len());
    println!(
        "connections         {established} established, {n_failed} failed, {still_open} still open after {}s",
        a.hold_secs
    );
    println!(
        "setup               {:.2}s ({:.0} connections/s)",
        setup.as_secs_f64(),
        per_second(established as u64, setup.as_secs_f64())
    );
    if !a.node_pid.is_empty() {
        println!("node RSS            {rss_before:?} KiB -> {rss_after:?} KiB");
        println!("RSS per connection  {:.0} bytes ({:.2} KiB)", per_conn, per_conn / 1024.0);
    }
    if let Some(e) = first_error.lock().await.as_ref() {
        println!("first error         {e}");
    }
    common::result(serde_json::json!({
        "scenario": "idle", "proto": c.proto.name(), "nodes": t.addrs.len(),
        "connections": established, "failed": n_failed,
        "still_open": still_open, "setup_s": setup.as_secs_f64(),
        "connections_per_s": per_second(established as u64, setup.as_secs_f64()),
        "node_rss_kib_before": rss_before, "node_rss_kib_after": rss_after,
        "rss_bytes_per_connection": per_conn,
    }));
    Ok(())
}
