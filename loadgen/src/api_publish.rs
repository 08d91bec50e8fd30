//! `api-publish`: backend publications over NATS (`<prefix>.api.publish`), as a backend
//! sends them; publications per second the cluster accepted.
//!
//! - `--mode request`: `--concurrency` requests in flight, each waiting for its reply;
//!   counts `result`s and errors, with reply latency.
//! - `--mode fire`: publishes without a reply subject (fire and forget) at `--rate`.
//!
//! In both modes "accepted" is measured on the cluster's side too: the rooms are fresh and
//! keep history, so the sum of their offsets once they stop moving is the number of
//! publications the nodes published.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::{Args, ValueEnum};
use serde_json::{Value, json};

use crate::common::{self, per_second};

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Requests: wait for each reply.
    Request,
    /// No reply subject: carried out, not answered.
    Fire,
}

#[derive(Args)]
pub struct ApiPublishArgs {
    /// NATS server of the cluster's API.
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    pub nats: String,
    /// The nodes' `api.prefix`.
    #[arg(long, default_value = "roomcast")]
    pub prefix: String,
    #[arg(long, value_enum, default_value_t = Mode::Request)]
    pub mode: Mode,
    /// Publications per second in all; 0: as fast as possible (request mode: as fast as
    /// replies come back).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    #[arg(long, default_value_t = 10)]
    pub duration_secs: u64,
    /// Requests in flight at once (request mode).
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Rooms, published round robin (fresh rooms of the default namespace).
    #[arg(long, default_value_t = 16)]
    pub rooms: usize,
    /// Size of each publication's data, in bytes.
    #[arg(long, default_value_t = 100)]
    pub size: usize,
}

fn rooms(n: usize) -> Vec<String> {
    let run = format!("{:08x}", rand::random::<u32>());
    (0..n).map(|i| format!("apibench-{run}-{i}")).collect()
}

fn body(room: &str, size: usize, seq: u64) -> bytes::Bytes {
    let pad = "x".repeat(size.saturating_sub(24));
    json!({"room": room, "data": {"seq": seq, "pad": pad}}).to_string().into()
}

/// Sum of the rooms' offsets (their publications), read with `history` `limit: 0`.
async fn published(nc: &async_nats::Client, prefix: &str, rooms: &[String]) -> anyhow::Result<u64> {
    let mut sum = 0;
    for r in rooms {
        let req = json!({"room": r, "limit": 0}).to_string();
        let reply = nc.request(format!("{prefix}.api.history"), req.into()).await?;
        let v: Value = serde_json::from_slice(&reply.payload)?;
        match v["result"]["offset"].as_u64() {
            Some(o) => sum += o,
            None => bail!("history of {r} failed: {v}"),
        }
    }
    Ok(sum)
}

/// Waits until the rooms' offsets stop moving (fire-and-forget publications still being
/// carried out; the position reads may time out meanwhile, behind the backlog), at most
/// 120 s.
async fn settle(nc: &async_nats::Client, prefix: &str, rooms: &[String]) -> anyhow::Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut last = None;
    loop {
        match published(nc, prefix, rooms).await {
            Ok(now) if last == Some(now) => return Ok(now),
            Ok(now) => last = Some(now),
            Err(e) if Instant::now() < deadline => common::say(&format!("waiting for the backlog: {e}")),
            Err(e) => return Err(e),
        }
        if Instant::now() > deadline {
            return last.context("the cluster did not settle");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

pub async fn run(a: ApiPublishArgs) -> anyhow::Result<()> {
    let nc =
        async_nats::connect(a.nats.as_str()).await.with_context(|| format!("connecting to {}", a.nats))?;
    let rooms = Arc::new(rooms(a.rooms.max(1)));
    let subject = format!("{}.api.publish", a.prefix);
    // The API answers at all (and the rooms are new).
    let before = published(&nc, &a.prefix, &rooms).await.context("the cluster's API does not answer")?;
    let duration = Duration::from_secs(a.duration_secs.max(1));
    let ok = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let sent = Arc::new(AtomicU64::new(0));
    let mut hist = common::new_hist()?;
    common::say(&format!(
        "api-publish: {} mode, {} rooms, rate {}, {} s, data {} B",
        match a.mode {
            Mode::Request => "request",
            Mode::Fire => "fire",
        },
        rooms.len(),
        if a.rate == 0 { "max".to_string() } else { a.rate.to_string() },
        duration.as_secs(),
        a.size
    ));
    let start = Instant::now();
    match a.mode {
        Mode::Request => {
            let workers = a.concurrency.max(1);
            let mut tasks = Vec::new();
            for w in 0..workers {
                let (nc, rooms, subject) = (nc.clone(), rooms.clone(), subject.clone());
                let (ok, errors, sent) = (ok.clone(), errors.clone(), sent.clone());
                let per_worker = if a.rate == 0 { None } else { Some(a.rate as f64 / workers as f64) };
                let size = a.size;
                tasks.push(tokio::spawn(async move {
                    let mut h = common::new_hist()?;
                    let mut tick = per_worker.map(|r| {
                        let mut i = tokio::time::interval(Duration::from_secs_f64(1.0 / r.max(0.001)));
                        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                        i
                    });
                    let mut n = w as u64;
                    while start.elapsed() < duration {
                        if let Some(t) = &mut tick {
                            t.tick().await;
                        }
                        let room = &rooms[(n as usize) % rooms.len()];
                        let t0 = Instant::now();
                        sent.fetch_add(1, Ordering::Relaxed);
                        match nc.request(subject.clone(), body(room, size, n)).await {
                            Ok(reply)
                                if serde_json::from_slice::<Value>(&reply.payload)
                                    .is_ok_and(|v| v.get("result").is_some()) =>
                            {
                                ok.fetch_add(1, Ordering::Relaxed);
                                h.record(t0.elapsed().as_micros().max(1) as u64)?;
                            }
                            _ => {
                                errors.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        n += workers as u64;
                    }
                    anyhow::Ok(h)
                }));
            }
            for t in tasks {
                hist.add(t.await??)?;
            }
        }
        Mode::Fire => {
            // Batches every millisecond at the rate (or back to back at rate 0).
            let mut n = 0u64;
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            while start.elapsed() < duration {
                let due = if a.rate == 0 {
                    n + 1000
                } else {
                    tick.tick().await;
                    (start.elapsed().as_secs_f64() * a.rate as f64) as u64
                };
                while n < due {
                    let room = &rooms[(n as usize) % rooms.len()];
                    nc.publish(subject.clone(), body(room, a.size, n)).await?;
                    n += 1;
                }
                if a.rate == 0 {
                    tokio::task::yield_now().await;
                }
            }
            nc.flush().await?;
            sent.store(n, Ordering::Relaxed);
        }
    }
    let send_secs = start.elapsed().as_secs_f64();
    let accepted = settle(&nc, &a.prefix, &rooms).await? - before;
    let total_secs = start.elapsed().as_secs_f64();
    let sent = sent.load(Ordering::Relaxed);
    let (ok, errors) = (ok.load(Ordering::Relaxed), errors.load(Ordering::Relaxed));
    common::say(&format!("sent {sent} in {send_secs:.1} s ({:.0}/s)", per_second(sent, send_secs)));
    if a.mode == Mode::Request {
        common::say(&format!(
            "replies: {ok} results ({:.0}/s), {errors} errors or timeouts; latency ms {}",
            per_second(ok, send_secs),
            common::latency_line(&hist)
        ));
    }
    common::say(&format!(
        "accepted (published by the cluster): {accepted} ({:.0}/s over the sending time, {:.0}/s until settled)",
        per_second(accepted, send_secs),
        per_second(accepted, total_secs)
    ));
    common::result(json!({
        "scenario": "api-publish",
        "mode": match a.mode { Mode::Request => "request", Mode::Fire => "fire" },
        "rate": a.rate, "rooms": rooms.len(), "size": a.size, "concurrency": a.concurrency,
        "sent": sent, "results": ok, "errors": errors, "accepted": accepted,
        "accepted_per_sec": per_second(accepted, send_secs),
        "latency_ms": common::latency_json(&hist),
    }));
    Ok(())
}
