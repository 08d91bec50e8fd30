//! `loadgen`: load scenarios against roomcast nodes. Every scenario is bounded in count and
//! time, prints a readable table, and ends with one JSON line (`RESULT {...}`).
//!
//! - `idle`: N connections, each subscribed to a room, held; with `--node-pid`, the node's
//!   RSS growth per connection.
//! - `fanout`: N subscribers in one room, a publisher at a fixed rate; deliveries per
//!   second, end-to-end latency percentiles, messages lost.

mod rawws;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use hdrhistogram::Histogram;
use tokio::sync::{Mutex, Semaphore};

#[derive(Parser)]
#[command(name = "loadgen", about = "Load scenarios for roomcast")]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Args, Clone)]
struct Common {
    /// Node WebSocket URL(s), comma separated; connections are spread over them.
    #[arg(long, default_value = "ws://127.0.0.1:8000/ws")]
    url: String,
    /// Source addresses to connect from (to go past one address's port range).
    #[arg(long, default_value = "127.0.0.1", value_delimiter = ',')]
    sources: Vec<IpAddr>,
    /// Offer permessage-deflate.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    deflate: bool,
    /// Handshakes in flight at once.
    #[arg(long, default_value_t = 200)]
    concurrency: usize,
}

#[derive(Subcommand)]
enum Scenario {
    /// Hold N idle subscribed connections.
    Idle {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 1000)]
        conns: usize,
        /// Rooms to spread the connections over.
        #[arg(long, default_value_t = 100)]
        rooms: usize,
        /// Seconds to hold the connections once all are up.
        #[arg(long, default_value_t = 5)]
        hold_secs: u64,
        /// Node process id(s), comma separated, to sample RSS from /proc.
        #[arg(long, value_delimiter = ',')]
        node_pid: Vec<u32>,
    },
    /// One room, N subscribers, one publisher at a fixed rate.
    Fanout {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 1000)]
        subs: usize,
        /// Publications per second.
        #[arg(long, default_value_t = 1000)]
        rate: u64,
        #[arg(long, default_value_t = 10)]
        duration_secs: u64,
        /// Size of each publication's data, in bytes.
        #[arg(long, default_value_t = 100)]
        size: usize,
        /// Subscribers that time every message (the others only count).
        #[arg(long, default_value_t = 20)]
        timed: usize,
        #[arg(long, default_value = "bench")]
        room: String,
        /// URL the publisher uses (default: the first of --url).
        #[arg(long)]
        publish_url: Option<String>,
        /// Node process id(s), comma separated, to report their CPU use.
        #[arg(long, value_delimiter = ',')]
        node_pid: Vec<u32>,
    },
}

fn parse_url(url: &str) -> anyhow::Result<(SocketAddr, String)> {
    let rest = url.strip_prefix("ws://").context("only ws:// URLs")?;
    let (hostport, path) =
        rest.split_once('/').map_or((rest, "/".to_string()), |(h, p)| (h, format!("/{p}")));
    let addr: SocketAddr = hostport.parse().with_context(|| format!("{hostport} is not ip:port"))?;
    Ok((addr, path))
}

fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// CPU time (user + system) of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = s.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let limit = rawws::raise_fd_limit();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        match cli.scenario {
            Scenario::Idle { common, conns, rooms, hold_secs, node_pid } => {
                if conns as u64 + 64 > limit {
                    bail!(
                        "{conns} connections need more file descriptors than this process may hold ({limit})"
                    );
                }
                idle(common, conns, rooms, hold_secs, node_pid).await
            }
            Scenario::Fanout {
                common,
                subs,
                rate,
                duration_secs,
                size,
                timed,
                room,
                publish_url,
                node_pid,
            } => fanout(common, subs, rate, duration_secs, size, timed, room, publish_url, node_pid).await,
        }
    })
}

struct Target {
    addrs: Vec<(SocketAddr, String)>,
}

impl Target {
    fn new(url: &str) -> anyhow::Result<Self> {
        Ok(Target { addrs: url.split(',').map(parse_url).collect::<anyhow::Result<_>>()? })
    }
    fn pick(&self, i: usize) -> &(SocketAddr, String) {
        &self.addrs[i % self.addrs.len()]
    }
}

/// Connects, sends `connect` + `subscribe` in one frame, waits for `subscribed`.
async fn open_subscribed(c: &Common, t: &Target, i: usize, room: &str) -> anyhow::Result<rawws::Ws> {
    let (addr, path) = t.pick(i);
    let src = c.sources[i % c.sources.len()];
    let mut ws = rawws::connect(*addr, path, Some(src), "roomcast.v1.json", c.deflate).await?;
    let cmds =
        format!("{{\"type\":\"connect\",\"id\":1}}\n{{\"type\":\"subscribe\",\"id\":2,\"room\":\"{room}\"}}");
    ws.send_text(cmds.as_bytes()).await?;
    ws.wait_for("subscribed").await?;
    Ok(ws)
}

/// Answers pings and discards everything else until the connection ends.
async fn keep_alive(mut ws: rawws::Ws, closed: Arc<AtomicUsize>) {
    loop {
        match ws.next_frame().await {
            Ok(Some(f)) if f.opcode == 0x8 => break,
            Ok(Some(f)) => {
                if memchr::memmem::find(&f.payload, b"\"type\":\"ping\"").is_some()
                    && ws.send_text(b"{\"type\":\"pong\"}").await.is_err()
                {
                    break;
                }
            }
            _ => break,
        }
    }
    closed.fetch_add(1, Ordering::Relaxed);
}

async fn idle(c: Common, conns: usize, rooms: usize, hold_secs: u64, pids: Vec<u32>) -> anyhow::Result<()> {
    let t = Arc::new(Target::new(&c.url)?);
    let rss_before: Vec<u64> = pids.iter().map(|p| rss_kib(*p).unwrap_or(0)).collect();
    let sem = Arc::new(Semaphore::new(c.concurrency));
    let failed = Arc::new(AtomicUsize::new(0));
    let closed = Arc::new(AtomicUsize::new(0));
    let first_error = Arc::new(Mutex::new(None::<String>));
    let start = Instant::now();
    let mut handles = Vec::with_capacity(conns);
    for i in 0..conns {
        let permit = sem.clone().acquire_owned().await?;
        let (c2, t2, failed, closed, first_error) =
            (c.clone(), t.clone(), failed.clone(), closed.clone(), first_error.clone());
        handles.push(tokio::spawn(async move {
            let room = format!("idle{}", i % rooms.max(1));
            match tokio::time::timeout(Duration::from_secs(30), open_subscribed(&c2, &t2, i, &room)).await {
                Ok(Ok(ws)) => {
                    drop(permit);
                    tokio::spawn(keep_alive(ws, closed));
                }
                Ok(Err(e)) => {
                    failed.fetch_add(1, Ordering::Relaxed);
                    first_error.lock().await.get_or_insert(e.to_string());
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
    let established = conns - failed.load(Ordering::Relaxed);
    // Let the node settle (allocator, queues), then sample.
    tokio::time::sleep(Duration::from_secs(hold_secs)).await;
    let still_open = established - closed.load(Ordering::Relaxed);
    let rss_after: Vec<u64> = pids.iter().map(|p| rss_kib(*p).unwrap_or(0)).collect();
    let delta_kib: u64 = rss_after.iter().zip(&rss_before).map(|(a, b)| a.saturating_sub(*b)).sum();
    let per_conn = if still_open > 0 { delta_kib as f64 * 1024.0 / still_open as f64 } else { 0.0 };
    println!("scenario            idle");
    println!(
        "connections         {established} established, {} failed, {still_open} still open after {hold_secs}s",
        failed.load(Ordering::Relaxed)
    );
    println!(
        "setup               {:.2}s ({:.0} connections/s)",
        setup.as_secs_f64(),
        established as f64 / setup.as_secs_f64()
    );
    if !pids.is_empty() {
        println!("node RSS            {:?} KiB -> {:?} KiB", rss_before, rss_after);
        println!("RSS per connection  {:.0} bytes ({:.2} KiB)", per_conn, per_conn / 1024.0);
    }
    if let Some(e) = first_error.lock().await.as_ref() {
        println!("first error         {e}");
    }
    println!(
        "RESULT {}",
        serde_json::json!({
            "scenario": "idle", "connections": established, "failed": failed.load(Ordering::Relaxed),
            "still_open": still_open, "setup_s": setup.as_secs_f64(),
            "connections_per_s": established as f64 / setup.as_secs_f64(),
            "node_rss_kib_before": rss_before, "node_rss_kib_after": rss_after,
            "rss_bytes_per_connection": per_conn,
        })
    );
    Ok(())
}

fn now_micros(origin: Instant) -> u64 {
    origin.elapsed().as_micros() as u64
}

/// Parses the number after `"t":` in a publication line.
fn parse_t(line: &[u8]) -> Option<u64> {
    let at = memchr::memmem::find(line, b"\"t\":")? + 4;
    let mut v: u64 = 0;
    let mut any = false;
    for &b in &line[at..] {
        if b.is_ascii_digit() {
            v = v * 10 + (b - b'0') as u64;
            any = true;
        } else {
            break;
        }
    }
    any.then_some(v)
}

#[allow(clippy::too_many_arguments)]
async fn fanout(
    c: Common,
    subs: usize,
    rate: u64,
    duration_secs: u64,
    size: usize,
    timed: usize,
    room: String,
    publish_url: Option<String>,
    node_pids: Vec<u32>,
) -> anyhow::Result<()> {
    let t = Arc::new(Target::new(&c.url)?);
    let origin = Instant::now();
    let received = Arc::new(AtomicU64::new(0));
    let hist = Arc::new(std::sync::Mutex::new(Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?));
    let sem = Arc::new(Semaphore::new(c.concurrency));
    let mut opened = Vec::with_capacity(subs);
    for i in 0..subs {
        let permit = sem.clone().acquire_owned().await?;
        let (c2, t2, room2) = (c.clone(), t.clone(), room.clone());
        opened.push(tokio::spawn(async move {
            let r = open_subscribed(&c2, &t2, i, &room2).await;
            drop(permit);
            r
        }));
    }
    let mut readers = Vec::new();
    for (i, h) in opened.into_iter().enumerate() {
        let mut ws = h.await?.with_context(|| format!("subscriber {i}"))?;
        let (received, hist) = (received.clone(), hist.clone());
        let is_timed = i < timed;
        readers.push(tokio::spawn(async move {
            let mut count = 0u64;
            let mut ping = false;
            while let Ok(Some(f)) = ws.next_frame().await {
                if f.opcode == 0x8 {
                    break;
                }
                let payload: Vec<u8> = if f.rsv1 { inflate(&f.payload) } else { f.payload.to_vec() };
                let now = now_micros(origin);
                let mut n = 0;
                {
                    let mut timed_guard = if is_timed { hist.lock().ok() } else { None };
                    for line in payload.split(|b| *b == b'\n') {
                        if line.starts_with(b"{\"type\":\"publication\"") {
                            n += 1;
                            if let (Some(t), Some(h)) = (parse_t(line), timed_guard.as_mut()) {
                                let _ = h.record(now.saturating_sub(t).max(1));
                            }
                        } else if line.starts_with(b"{\"type\":\"ping\"") {
                            ping = true;
                        }
                    }
                }
                if std::mem::take(&mut ping) {
                    let _ = ws.send_text(b"{\"type\":\"pong\"}").await;
                }
                count += n;
                received.fetch_add(n, Ordering::Relaxed);
            }
            count
        }));
    }
    // The publisher: subscribed (the default namespace lets subscribers publish), skip_self.
    let pub_url = publish_url.unwrap_or_else(|| t.addrs[0].1.clone());
    let pt = if pub_url.starts_with("ws://") {
        Target::new(&pub_url)?
    } else {
        Target { addrs: vec![t.addrs[0].clone()] }
    };
    let mut publisher = open_subscribed(&c, &pt, 0, &room).await.context("publisher")?;
    let pub_reader_stream = publisher.stream;
    let (mut prd, mut pwr) = pub_reader_stream.into_split();
    let drain = tokio::spawn(async move {
        let mut sink = vec![0u8; 65536];
        use tokio::io::AsyncReadExt;
        while let Ok(n) = prd.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    });
    publisher.buf.clear();
    let pad = "x".repeat(size.saturating_sub(30));
    let duration = Duration::from_secs(duration_secs);
    let cpu_before: u64 = node_pids.iter().filter_map(|p| cpu_ticks(*p)).sum();
    println!(
        "scenario            fanout: {subs} subscribers, {rate} publications/s of ~{size} B for {duration_secs}s"
    );
    let start = Instant::now();
    let mut sent: u64 = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    use tokio::io::AsyncWriteExt;
    while start.elapsed() < duration {
        tick.tick().await;
        let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
        if due <= sent {
            continue;
        }
        let mut frame_payload = Vec::with_capacity(((due - sent) as usize) * (size + 80));
        while sent < due {
            if !frame_payload.is_empty() {
                frame_payload.push(b'\n');
            }
            let t = now_micros(origin);
            frame_payload.extend_from_slice(
                format!("{{\"type\":\"publish\",\"room\":\"{room}\",\"skip_self\":true,\"data\":{{\"t\":{t},\"p\":\"{pad}\"}}}}")
                    .as_bytes(),
            );
            sent += 1;
        }
        let mut out = Vec::with_capacity(frame_payload.len() + 14);
        rawws::client_frame(&mut out, 0x1, &frame_payload);
        pwr.write_all(&out).await?;
    }
    let publish_time = start.elapsed();
    let expected = sent * subs as u64;
    let deadline = Instant::now() + Duration::from_secs(10);
    while received.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let total_time = start.elapsed();
    let got = received.load(Ordering::Relaxed);
    let cpu_after: u64 = node_pids.iter().filter_map(|p| cpu_ticks(*p)).sum();
    // Linux reports CPU time in clock ticks of 1/100 s.
    let node_cpu = (cpu_after - cpu_before) as f64 / 100.0 / total_time.as_secs_f64();
    drop(pwr);
    drain.abort();
    for r in &readers {
        r.abort();
    }
    for r in readers {
        let _ = r.await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let h = hist.lock().map_err(|_| anyhow::anyhow!("histogram lock"))?.clone();
    let rate_delivered = got as f64 / total_time.as_secs_f64();
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "published           {sent} in {:.2}s ({:.0}/s)",
        publish_time.as_secs_f64(),
        sent as f64 / publish_time.as_secs_f64()
    );
    println!("delivered           {got} of {expected} in {:.2}s", total_time.as_secs_f64());
    println!("deliveries/s        {:.0}", rate_delivered);
    println!("lost                {}", expected.saturating_sub(got));
    if !node_pids.is_empty() {
        println!("node CPU            {:.0}% of one core", node_cpu * 100.0);
    }
    println!(
        "latency ms          p50 {:.2}  p99 {:.2}  p999 {:.2}  max {:.2}",
        ms(0.5),
        ms(0.99),
        ms(0.999),
        h.max() as f64 / 1000.0
    );
    println!(
        "RESULT {}",
        serde_json::json!({
            "scenario": "fanout", "subscribers": subs, "rate": rate, "size": size, "published": sent,
            "expected": expected, "delivered": got, "lost": expected.saturating_sub(got),
            "deliveries_per_s": rate_delivered, "seconds": total_time.as_secs_f64(), "node_cpu_cores": node_cpu,
            "latency_ms": {"p50": ms(0.5), "p99": ms(0.99), "p999": ms(0.999), "max": h.max() as f64 / 1000.0},
        })
    );
    Ok(())
}

/// Inflates a permessage-deflate payload (no context takeover).
fn inflate(p: &[u8]) -> Vec<u8> {
    let mut input = p.to_vec();
    input.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut d = flate2::Decompress::new(false);
    let mut out = Vec::with_capacity(p.len() * 4 + 64);
    loop {
        let before = d.total_in();
        if d.decompress_vec(&input[d.total_in() as usize..], &mut out, flate2::FlushDecompress::Sync).is_err()
        {
            return Vec::new();
        }
        if d.total_in() as usize >= input.len() && out.len() < out.capacity() {
            return out;
        }
        if d.total_in() == before && out.len() < out.capacity() {
            return out;
        }
        out.reserve(out.capacity().max(1024));
    }
}
