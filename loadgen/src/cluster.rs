//! `cluster`: publishers on one node, subscribers on the others; cross-node
//! publish-to-deliver latency at a fixed rate. Works with any set of nodes: when they share
//! no broker (memory brokers) nothing crosses, and the scenario says so.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use tokio::sync::watch;

use crate::common::{self, Common, CpuMeter, Target, per_second};
use crate::fanout::{self, PongOwed, SubStats};
use crate::proto::{self, Proto};

#[derive(Args)]
pub struct ClusterArgs {
    /// --url: the subscribers' nodes (comma separated); subscriber i goes to node i mod n.
    #[command(flatten)]
    pub common: Common,
    /// The publishers' node.
    #[arg(long)]
    pub publish_url: String,
    /// Subscribers in all (spread over the --url nodes and the rooms).
    #[arg(long, default_value_t = 200)]
    pub subs: usize,
    /// Rooms; publications go round robin over them.
    #[arg(long, default_value_t = 100)]
    pub rooms: usize,
    /// Publications per second, all publishers together.
    #[arg(long, default_value_t = 10_000)]
    pub rate: u64,
    /// Publisher connections (each publishes into its share of the rooms).
    #[arg(long, default_value_t = 1)]
    pub publishers: usize,
    #[arg(long, default_value_t = 5)]
    pub duration_secs: u64,
    /// Size of each publication's data, in bytes.
    #[arg(long, default_value_t = 100)]
    pub size: usize,
    /// Subscribers that time every message (the others only count).
    #[arg(long, default_value_t = 100)]
    pub timed: usize,
    /// Node process id(s), comma separated, for their CPU use.
    #[arg(long, value_delimiter = ',')]
    pub node_pid: Vec<u32>,
}

fn room_name(r: usize) -> String {
    format!("cluster{r}")
}

/// The id of the request each publisher sends after its publications.
const BARRIER_ID: u32 = 4_000_000_000;
const BARRIER_ID_FIELD: &str = "\"id\":4000000000";
/// How long a publisher waits for the node to take its queued publications.
const FLUSH_LIMIT: Duration = Duration::from_secs(60);

/// Sends a request after the publications and waits for its reply: a node handles a
/// connection's messages in order, so the reply means every publication before it was
/// published. Without this, publications still queued on the connection when it closes are
/// never published (the node drops them with the connection) and would count as lost
/// deliveries. `false` when no reply came within [`FLUSH_LIMIT`].
async fn flush(
    wr: &mut tokio::net::tcp::OwnedWriteHalf,
    pong: &PongOwed,
    done: &AtomicBool,
    own: &[usize],
) -> bool {
    use tokio::io::AsyncWriteExt;
    let Some(room) = own.first() else {
        return true;
    };
    // Any reply will do (an error too): `limit: 0` reads only the position.
    let req =
        format!("{{\"type\":\"history\",\"id\":{BARRIER_ID},\"room\":\"{}\",\"limit\":0}}", room_name(*room));
    let mut out = Vec::new();
    crate::rawws::client_frame(&mut out, 0x1, req.as_bytes());
    if wr.write_all(&out).await.is_err() {
        return false;
    }
    let deadline = Instant::now() + FLUSH_LIMIT;
    while !done.load(Ordering::Relaxed) {
        if Instant::now() >= deadline || pong.pay(Proto::Roomcast, wr).await.is_err() {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    true
}

pub async fn run(a: ClusterArgs) -> anyhow::Result<()> {
    let c = a.common.clone();
    let subs_t = Target::new(&c.url, c.proto)?;
    let pub_t = Target::new(&a.publish_url, c.proto)?;
    let nodes = subs_t.addrs.len();
    let rooms = a.rooms.max(1);
    let publishers = a.publishers.max(1).min(rooms);
    let same_node = subs_t.addrs.iter().any(|s| pub_t.addrs.iter().any(|p| p.0 == s.0));
    let origin = Instant::now();
    let total = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop_rx) = watch::channel(false);
    // Subscriber i: node i mod n, room (i / n) mod rooms, so every room has subscribers on
    // every node once there are rooms × n of them.
    let room_of_sub = |i: usize| (i / nodes) % rooms;
    let mut subs_in_room = vec![0u64; rooms];
    for i in 0..a.subs {
        subs_in_room[room_of_sub(i)] += 1;
    }
    let conns = fanout::open_many(&c, &subs_t, a.subs, |i| room_name(room_of_sub(i))).await?;
    let mut readers = Vec::with_capacity(conns.len());
    for (i, conn) in conns.into_iter().enumerate() {
        readers.push(fanout::spawn_subscriber(
            conn,
            i < a.timed,
            false,
            origin,
            total.clone(),
            stop_rx.clone(),
        )?);
    }
    // Publishers: publisher j owns the rooms r with r mod P == j.
    let per_rate = a.rate / publishers as u64;
    let pad = "x".repeat(a.size.saturating_sub(30));
    let duration = Duration::from_secs(a.duration_secs);
    println!(
        "scenario            cluster ({}): {} subscribers on {nodes} node(s), {rooms} rooms, {} publications/s of ~{} B \
         from {publishers} publisher(s) on {} for {}s",
        c.proto.name(),
        a.subs,
        per_rate * publishers as u64,
        a.size,
        a.publish_url,
        a.duration_secs
    );
    let mut pubs = Vec::new();
    for j in 0..publishers {
        let own: Vec<usize> = (0..rooms).filter(|r| r % publishers == j).collect();
        let (mut conn, _) = proto::open(c.proto, &pub_t.dial(&c, j), None, None)
            .await
            .with_context(|| format!("publisher {j}"))?;
        if c.proto == Proto::Roomcast {
            let names: Vec<String> = own.iter().map(|r| room_name(*r)).collect();
            conn.subscribe_all(&names).await.with_context(|| format!("publisher {j} subscribing"))?;
        }
        pubs.push((conn, own));
    }
    let cpu = CpuMeter::start(&a.node_pid);
    let start = Instant::now();
    let mut pub_tasks = Vec::new();
    for (conn, own) in pubs {
        let (rd, mut wr) = conn.into_split();
        let pong = Arc::new(PongOwed::default());
        let flushed = Arc::new(AtomicBool::new(false));
        let seen = flushed.clone();
        let drain = fanout::spawn_publisher_reader(rd, pong.clone(), move |m| {
            if memchr::memmem::find(m, BARRIER_ID_FIELD.as_bytes()).is_some() {
                seen.store(true, Ordering::Relaxed);
            }
        });
        let (proto, pad) = (c.proto, pad.clone());
        pub_tasks.push(tokio::spawn(async move {
            let own2 = own.clone();
            let sent = fanout::publish_at_rate(
                proto,
                &mut wr,
                &pong,
                move |seq| room_name(own2[(seq as usize - 1) % own2.len()]),
                per_rate,
                duration,
                origin,
                |_, t| format!("{{\"t\":{t},\"p\":\"{pad}\"}}"),
            )
            .await;
            let flushed = match (&sent, proto) {
                (Ok(_), Proto::Roomcast) => flush(&mut wr, &pong, &flushed, &own).await,
                _ => false,
            };
            drain.abort();
            sent.map(|s| (s, own, flushed))
        }));
    }
    let mut sent = 0u64;
    let mut all_flushed = true;
    let mut pubs_in_room = vec![0u64; rooms];
    for t in pub_tasks {
        let (s, own, flushed) = t.await??;
        sent += s;
        all_flushed &= flushed;
        for seq in 1..=s {
            pubs_in_room[own[(seq as usize - 1) % own.len()]] += 1;
        }
    }
    let expected: u64 = pubs_in_room.iter().zip(&subs_in_room).map(|(p, s)| p * s).sum();
    // Until the node took every publication (the barrier's reply came).
    let publish_time = start.elapsed();
    fanout::wait_deliveries(&total, expected, Duration::from_secs(5)).await;
    let secs = start.elapsed().as_secs_f64();
    let (_, node_cores) = cpu.read();
    let _ = stop_tx.send(true);
    let mut per_node: Vec<(u64, u64, hdrhistogram::Histogram<u64>)> = Vec::new();
    for _ in 0..nodes {
        per_node.push((0, 0, common::new_hist()?));
    }
    let mut all = common::new_hist()?;
    for (i, r) in readers.into_iter().enumerate() {
        let SubStats { delivered, hist, .. } = r.await?;
        let n = &mut per_node[i % nodes];
        n.0 += delivered;
        n.1 += pubs_in_room[room_of_sub(i)];
        if let Some(h) = hist {
            n.2.add(&h)?;
            all.add(&h)?;
        }
    }
    let delivered = total.load(Ordering::Relaxed);
    println!(
        "published           {sent} in {:.2}s ({:.0}/s), taken by the node{}",
        publish_time.as_secs_f64(),
        per_second(sent, publish_time.as_secs_f64()),
        if all_flushed { "" } else { " (NOT all: see the note below)" }
    );
    let mut nodes_json = Vec::new();
    for (k, (d, e, h)) in per_node.iter().enumerate() {
        let url = format!("ws://{}{}", subs_t.addrs[k].0, subs_t.addrs[k].1);
        println!(
            "node {k}              {url}: delivered {d} of {e}, lost {}, latency ms {}",
            e.saturating_sub(*d),
            common::latency_line(h)
        );
        nodes_json.push(serde_json::json!({
            "url": url, "delivered": d, "expected": e, "lost": e.saturating_sub(*d),
            "latency_ms": common::latency_json(h),
        }));
    }
    println!("delivered           {delivered} of {expected} ({:.0}/s)", per_second(delivered, secs));
    println!("latency ms          {}", common::latency_line(&all));
    if !a.node_pid.is_empty() {
        println!("nodes CPU           {:.2} cores", node_cores);
    }
    let crossed = delivered > 0;
    if !crossed {
        println!(
            "note                nothing crossed nodes: these nodes share no broker (e.g. each runs the memory \
             broker); start them with the same --broker redis|nats"
        );
    }
    if !all_flushed {
        println!(
            "note                a publisher's node did not answer the request sent after its publications \
             within {}s: publications still queued on its connection count as lost",
            FLUSH_LIMIT.as_secs()
        );
    }
    if same_node {
        println!(
            "note                the publishers' node also holds subscribers: not only cross-node deliveries"
        );
    }
    common::result(serde_json::json!({
        "scenario": "cluster", "proto": c.proto.name(), "subscriber_nodes": nodes, "subscribers": a.subs,
        "rooms": rooms, "publishers": publishers, "rate": per_rate * publishers as u64, "size": a.size,
        "published": sent, "publish_seconds": publish_time.as_secs_f64(), "taken_by_node": all_flushed,
        "expected": expected, "delivered": delivered, "lost": expected.saturating_sub(delivered),
        "deliveries_per_s": per_second(delivered, secs), "crossed": crossed, "same_node": same_node,
        "node_cpu_cores": node_cores, "latency_ms": common::latency_json(&all), "nodes": nodes_json,
    }));
    Ok(())
}
