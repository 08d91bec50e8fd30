//! `fanout`: one room, N subscribers, one publisher at a fixed rate; deliveries per
//! second, end-to-end latency percentiles, messages lost. Also the reading and publishing
//! helpers the other delivery scenarios use.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use hdrhistogram::Histogram;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;

use crate::common::{self, Common, CpuMeter, Target, now_micros, per_second};
use crate::proto::{self, Conn, Proto, Step};

#[derive(Args)]
pub struct FanoutArgs {
    #[command(flatten)]
    pub common: Common,
    #[arg(long, default_value_t = 1000)]
    pub subs: usize,
    /// Publications per second.
    #[arg(long, default_value_t = 1000)]
    pub rate: u64,
    #[arg(long, default_value_t = 10)]
    pub duration_secs: u64,
    /// Size of each publication's data, in bytes.
    #[arg(long, default_value_t = 100)]
    pub size: usize,
    /// Subscribers that time every message (the others only count).
    #[arg(long, default_value_t = 20)]
    pub timed: usize,
    #[arg(long, default_value = "bench")]
    pub room: String,
    /// URL the publisher uses (default: the first of --url).
    #[arg(long)]
    pub publish_url: Option<String>,
    /// Node process id(s), comma separated, to report their CPU use.
    #[arg(long, value_delimiter = ',')]
    pub node_pid: Vec<u32>,
}

/// Opens `n` connections subscribed to `room_of(i)`, `concurrency` handshakes at a time;
/// fails on the first that cannot be opened.
pub async fn open_many(
    c: &Common,
    t: &Target,
    n: usize,
    room_of: impl Fn(usize) -> String,
) -> anyhow::Result<Vec<Conn>> {
    let sem = Arc::new(Semaphore::new(c.concurrency.max(1)));
    let mut opened = Vec::with_capacity(n);
    for i in 0..n {
        let permit = sem.clone().acquire_owned().await?;
        let (c2, t2, room) = (c.clone(), t.clone(), room_of(i));
        opened.push(tokio::spawn(async move {
            let r = tokio::time::timeout(
                Duration::from_secs(30),
                proto::open(c2.proto, &t2.dial(&c2, i), Some(&room), None),
            )
            .await;
            drop(permit);
            match r {
                Ok(r) => r.map(|(conn, _)| conn),
                Err(_) => Err(anyhow::anyhow!("timed out")),
            }
        }));
    }
    let mut conns = Vec::with_capacity(n);
    for (i, h) in opened.into_iter().enumerate() {
        conns.push(h.await?.with_context(|| format!("subscriber {i}"))?);
    }
    Ok(conns)
}

/// What one subscriber saw.
pub struct SubStats {
    pub delivered: u64,
    /// Bytes read from the socket (every frame, compressed or not).
    pub bytes_read: u64,
    /// Bytes on the wire (headers included) of the frames that carried publications.
    pub publication_frame_bytes: u64,
    /// Bytes of the publications themselves, uncompressed (of those inflated).
    pub msg_bytes: u64,
    /// Publications read (inflated when compressed): what `msg_bytes` is over.
    pub msgs_read: u64,
    /// Most publications found in one compressed frame (of those inflated).
    pub max_per_compressed_frame: u64,
    pub hist: Option<Histogram<u64>>,
}

/// Reads publications until `stop`; counts them (also into `total`), times them from their
/// `"t":` (µs since `origin`) when `timed`, and counts the bytes read from the socket.
/// With `count_compressed`, a subscriber that is not timed does not inflate: it counts each
/// compressed frame as one publication (roomcast compresses each large message in a frame
/// of its own; timed subscribers inflate and report `max_per_compressed_frame` to check).
pub fn spawn_subscriber(
    mut conn: Conn,
    timed: bool,
    count_compressed: bool,
    origin: Instant,
    total: Arc<AtomicU64>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<JoinHandle<SubStats>> {
    let mut hist = if timed { Some(common::new_hist()?) } else { None };
    let start_bytes = conn.ws.bytes_read;
    conn.inflate = timed || !count_compressed;
    Ok(tokio::spawn(async move {
        let proto = conn.proto;
        let (mut delivered, mut msg_bytes, mut msgs_read, mut max_per_compressed_frame) =
            (0u64, 0u64, 0u64, 0u64);
        let mut publication_frame_bytes = 0u64;
        loop {
            let mut n = 0u64;
            let inflated_before = conn.inflated_frames;
            let r = tokio::select! {
                _ = stop.changed() => break,
                r = conn.recv(|m| {
                    if proto.is_publication(m) {
                        n += 1;
                        msg_bytes += m.len() as u64;
                        if let (Some(h), Some(t)) = (hist.as_mut(), proto::parse_num(m, b"\"t\":")) {
                            let _ = h.record(now_micros(origin).saturating_sub(t).max(1));
                        }
                    }
                }) => r,
            };
            msgs_read += n;
            if conn.inflated_frames != inflated_before {
                max_per_compressed_frame = max_per_compressed_frame.max(n);
            }
            match r {
                Ok(Step::Frame { compressed: true, .. }) => n = 1,
                Ok(Step::Frame { .. }) => {}
                _ => break,
            }
            if n > 0 {
                publication_frame_bytes += conn.last_frame_len as u64;
            }
            delivered += n;
            total.fetch_add(n, Ordering::Relaxed);
        }
        SubStats {
            delivered,
            bytes_read: conn.ws.bytes_read - start_bytes,
            publication_frame_bytes,
            msg_bytes,
            msgs_read,
            max_per_compressed_frame,
            hist,
        }
    }))
}

/// The answer a publisher owes to a ping its reader saw: 0 none, 1 protocol pong, 2
/// WebSocket pong.
#[derive(Default)]
pub struct PongOwed(AtomicU8);

impl PongOwed {
    fn set(&self, p: &[u8]) {
        self.0.store(if p.is_empty() { 2 } else { 1 }, Ordering::Relaxed);
    }
    /// Sends the pong owed, if any.
    pub async fn pay(&self, proto: Proto, w: &mut OwnedWriteHalf) -> std::io::Result<()> {
        match self.0.swap(0, Ordering::Relaxed) {
            1 => {
                proto::send_pong(w, if proto == Proto::Roomcast { b"{\"type\":\"pong\"}" } else { b"3" })
                    .await
            }
            2 => proto::send_pong(w, b"").await,
            _ => Ok(()),
        }
    }
}

/// Reads a publisher's connection (replies, pings) on its own task until it ends; returns
/// the close code, if any.
pub fn spawn_publisher_reader(
    mut rd: Conn<OwnedReadHalf>,
    pong: Arc<PongOwed>,
    mut on_msg: impl FnMut(&[u8]) + Send + 'static,
) -> JoinHandle<Option<u16>> {
    tokio::spawn(async move {
        loop {
            match rd.read(&mut on_msg).await {
                Ok(Step::Frame { pong: Some(p), .. }) => pong.set(p),
                Ok(Step::Frame { pong: None, .. }) => {}
                Ok(Step::Closed { code }) => return code,
                Err(_) => return None,
            }
        }
    })
}

/// Publishes at `rate` per second for `duration`, each publication's data made by
/// `data(seq, t)` (seq from 1, t in µs since `origin`), several per write when due;
/// returns how many were sent.
#[allow(clippy::too_many_arguments)]
pub async fn publish_at_rate(
    proto: Proto,
    wr: &mut OwnedWriteHalf,
    pong: &PongOwed,
    room_of: impl Fn(u64) -> String,
    rate: u64,
    duration: Duration,
    origin: Instant,
    mut data: impl FnMut(u64, u64) -> String,
) -> anyhow::Result<u64> {
    let start = Instant::now();
    let mut sent: u64 = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut out = Vec::new();
    while start.elapsed() < duration {
        tick.tick().await;
        pong.pay(proto, wr).await?;
        // At most rate × duration, even when a write was slow.
        let due = ((start.elapsed().as_secs_f64() * rate as f64) as u64)
            .min((rate as f64 * duration.as_secs_f64()) as u64);
        if due <= sent {
            continue;
        }
        let mut batch: Vec<(String, String)> = Vec::with_capacity((due - sent) as usize);
        while sent < due {
            sent += 1;
            batch.push((room_of(sent), data(sent, now_micros(origin))));
        }
        out.clear();
        proto.publish_frames(&mut out, batch.iter().map(|(r, d)| (None, r.as_str(), d.as_str())));
        wr.write_all(&out).await?;
    }
    Ok(sent)
}

/// Waits (at most `limit`) until `total` reaches `expected` or stops growing for a second.
pub async fn wait_deliveries(total: &AtomicU64, expected: u64, limit: Duration) {
    let deadline = Instant::now() + limit;
    let mut last = (total.load(Ordering::Relaxed), Instant::now());
    while total.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = total.load(Ordering::Relaxed);
        if now != last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(1) {
            break;
        }
    }
}

pub async fn run(a: FanoutArgs) -> anyhow::Result<()> {
    let c = a.common;
    let t = Target::new(&c.url, c.proto)?;
    let origin = Instant::now();
    let total = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop_rx) = watch::channel(false);
    let room = a.room.clone();
    let conns = open_many(&c, &t, a.subs, |_| room.clone()).await?;
    let mut readers = Vec::with_capacity(conns.len());
    for (i, conn) in conns.into_iter().enumerate() {
        readers.push(spawn_subscriber(conn, i < a.timed, false, origin, total.clone(), stop_rx.clone())?);
    }
    let pt = match &a.publish_url {
        Some(u) => Target::new(u, c.proto)?,
        None => Target { addrs: vec![t.addrs[0].clone()] },
    };
    let (publisher, _) =
        proto::open(c.proto, &pt.dial(&c, 0), Some(&a.room), None).await.context("publisher")?;
    let (prd, mut pwr) = publisher.into_split();
    let pong = Arc::new(PongOwed::default());
    let drain = spawn_publisher_reader(prd, pong.clone(), |_| {});
    let pad = "x".repeat(a.size.saturating_sub(30));
    println!(
        "scenario            fanout ({}): {} subscribers, {} publications/s of ~{} B for {}s",
        c.proto.name(),
        a.subs,
        a.rate,
        a.size,
        a.duration_secs
    );
    let cpu = CpuMeter::start(&a.node_pid);
    let start = Instant::now();
    let sent = publish_at_rate(
        c.proto,
        &mut pwr,
        &pong,
        |_| a.room.clone(),
        a.rate,
        Duration::from_secs(a.duration_secs),
        origin,
        |_, t| format!("{{\"t\":{t},\"p\":\"{pad}\"}}"),
    )
    .await?;
    let publish_time = start.elapsed();
    let expected = sent * a.subs as u64;
    wait_deliveries(&total, expected, Duration::from_secs(10)).await;
    let total_time = start.elapsed();
    let got = total.load(Ordering::Relaxed);
    let (_, node_cpu) = cpu.read();
    drop(pwr);
    drain.abort();
    let _ = stop_tx.send(true);
    let mut h = common::new_hist()?;
    for r in readers {
        if let Ok(SubStats { hist: Some(sh), .. }) = r.await {
            h.add(&sh)?;
        }
    }
    let rate_delivered = per_second(got, total_time.as_secs_f64());
    println!(
        "published           {sent} in {:.2}s ({:.0}/s)",
        publish_time.as_secs_f64(),
        per_second(sent, publish_time.as_secs_f64())
    );
    println!("delivered           {got} of {expected} in {:.2}s", total_time.as_secs_f64());
    println!("deliveries/s        {rate_delivered:.0}");
    println!("lost                {}", expected.saturating_sub(got));
    if !a.node_pid.is_empty() {
        println!("node CPU            {:.0}% of one core", node_cpu * 100.0);
    }
    println!("latency ms          {}", common::latency_line(&h));
    common::result(serde_json::json!({
        "scenario": "fanout", "proto": c.proto.name(), "subscribers": a.subs, "rate": a.rate, "size": a.size,
        "published": sent, "expected": expected, "delivered": got, "lost": expected.saturating_sub(got),
        "deliveries_per_s": rate_delivered, "seconds": total_time.as_secs_f64(), "node_cpu_cores": node_cpu,
        "latency_ms": common::latency_json(&h),
    }));
    Ok(())
}
