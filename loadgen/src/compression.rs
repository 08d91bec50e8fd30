//! `compression`: typical JSON chat payloads (300-1500 bytes, the repetitive structure of
//! real chat messages) to N subscribers, once with permessage-deflate offered and once
//! without; bytes on the wire per delivery (counted from the sockets), deliveries per
//! second, and the node's CPU (from /proc/PID/stat).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Args, ValueEnum};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::watch;

use crate::common::{self, Common, CpuMeter, Target, per_second};
use crate::fanout::{self, PongOwed, SubStats};
use crate::proto::{self, Proto};

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Debug)]
pub enum Deflate {
    On,
    Off,
}

#[derive(Args)]
pub struct CompressionArgs {
    #[command(flatten)]
    pub common: Common,
    #[arg(long, default_value_t = 200)]
    pub subs: usize,
    /// Publications per second.
    #[arg(long, default_value_t = 500)]
    pub rate: u64,
    /// Seconds per run (one run per --modes entry).
    #[arg(long, default_value_t = 5)]
    pub duration_secs: u64,
    #[arg(long, default_value_t = 300)]
    pub size_min: usize,
    #[arg(long, default_value_t = 1500)]
    pub size_max: usize,
    /// Runs, in order: permessage-deflate offered (`on`) or not (`off`). --deflate is
    /// ignored here.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Deflate::On, Deflate::Off])]
    pub modes: Vec<Deflate>,
    /// Subscribers that time every message.
    #[arg(long, default_value_t = 20)]
    pub timed: usize,
    /// Seed of the payload generator (the same payloads in every run).
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Node process id(s), comma separated, for their CPU use.
    #[arg(long, value_delimiter = ',')]
    pub node_pid: Vec<u32>,
}

/// Everyday chat words (the text of the messages is drawn from them).
const WORDS: &str = "the a to and is it you that we for on in this can be with have just not are so do if but \
    will me what i think deploy build merge review meeting tomorrow today thanks please fixed issue release \
    customer ticket branch staging production looks good check later lunch call update docs test failing \
    green again sure ok great morning cache latency dashboard alert rollback config question about new feature";
static WORD_LIST: LazyLock<Vec<&'static str>> = LazyLock::new(|| WORDS.split_whitespace().collect());
const NAMES: &[&str] = &[
    "Alice Martin",
    "Bob Nguyen",
    "Carla Rossi",
    "Deepak Iyer",
    "Emma Schulz",
    "Farid Haddad",
    "Grace Kim",
    "Hugo Lefebvre",
    "Ines Duarte",
    "Jonas Berg",
    "Keiko Tanaka",
    "Liam O'Brien",
];
const EMOJI: &[&str] = &["thumbsup", "eyes", "tada", "rocket", "heart", "laughing", "white_check_mark"];

/// A chat message as a realistic backend would publish it: ids, author, text, mentions,
/// reactions, maybe an attachment and a thread; about `target` bytes.
pub fn chat_payload(rng: &mut StdRng, n: u64, target: usize) -> String {
    const B32: &[u8] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
    let id: String = (0..26).map(|_| B32[rng.random_range(0..B32.len())] as char).collect();
    let author = rng.random_range(0..NAMES.len());
    let name = NAMES[author];
    let handle = name.split(' ').next().unwrap_or("user").to_ascii_lowercase();
    let secs = 1_714_560_000 + n / 10;
    let mut head = format!(
        "{{\"kind\":\"chat.message\",\"id\":\"msg_{id}\",\"seq\":{n},\"room\":\"team:engineering-general\",\
         \"author\":{{\"id\":\"usr_{author:04}\",\"name\":\"{name}\",\"handle\":\"@{handle}\",\
         \"avatar\":\"https://cdn.example.com/avatars/usr_{author:04}/64x64.png\",\"role\":\"member\",\
         \"status\":\"online\"}},\"sent_at\":\"2024-05-01T{:02}:{:02}:{:02}.{:03}Z\",\"edited\":false,\
         \"client\":{{\"platform\":\"web\",\"version\":\"3.14.2\"}}",
        (secs / 3600) % 24,
        (secs / 60) % 60,
        secs % 60,
        n % 1000
    );
    let m = rng.random_range(0..NAMES.len());
    head.push_str(&format!(",\"mentions\":[{{\"id\":\"usr_{m:04}\",\"name\":\"{}\"}}]", NAMES[m]));
    let r = rng.random_range(0..EMOJI.len());
    head.push_str(&format!(
        ",\"reactions\":[{{\"emoji\":\"{}\",\"count\":{}}}]",
        EMOJI[r],
        rng.random_range(1..9)
    ));
    if rng.random_bool(0.3) {
        head.push_str(&format!(
            ",\"attachments\":[{{\"type\":\"image\",\"url\":\"https://cdn.example.com/uploads/{}/screenshot.png\",\
             \"width\":1280,\"height\":720,\"size\":{}}}]",
            &id[..12],
            rng.random_range(20_000..900_000)
        ));
    }
    if rng.random_bool(0.2) {
        head.push_str(&format!(
            ",\"thread\":{{\"id\":\"thr_{}\",\"replies\":{}}}",
            &id[..10],
            rng.random_range(1..40)
        ));
    }
    // The text fills up to the target size.
    let mut text = String::new();
    let room_for_text = target.saturating_sub(head.len() + 12).max(8);
    while text.len() < room_for_text {
        if !text.is_empty() {
            text.push(' ');
        }
        text.push_str(WORD_LIST[rng.random_range(0..WORD_LIST.len())]);
    }
    text.truncate(room_for_text);
    format!("{head},\"text\":\"{text}\"}}")
}

struct RunResult {
    mode: Deflate,
    negotiated: usize,
    published: u64,
    expected: u64,
    delivered: u64,
    secs: f64,
    /// Wire bytes (headers included) of the frames that carried publications.
    wire_bytes: u64,
    /// Every byte read from the subscribers' sockets during the run (joins, pings too).
    socket_bytes: u64,
    app_bytes_per_delivery: f64,
    /// Most publications in one compressed frame, seen by the timed subscribers.
    max_per_frame: u64,
    node_cpu_s: f64,
    node_cores: f64,
    hist: hdrhistogram::Histogram<u64>,
}

async fn one_run(a: &CompressionArgs, mode: Deflate) -> anyhow::Result<RunResult> {
    let mut c = a.common.clone();
    c.deflate = mode == Deflate::On;
    let t = Target::new(&c.url, c.proto)?;
    let room = format!("compression-{}", if c.deflate { "on" } else { "off" });
    let origin = Instant::now();
    let total = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop_rx) = watch::channel(false);
    let conns = fanout::open_many(&c, &t, a.subs, |_| room.clone()).await?;
    let negotiated = conns.iter().filter(|c| c.ws.deflate).count();
    let mut readers = Vec::with_capacity(conns.len());
    for (i, conn) in conns.into_iter().enumerate() {
        readers.push(fanout::spawn_subscriber(
            conn,
            i < a.timed,
            true,
            origin,
            total.clone(),
            stop_rx.clone(),
        )?);
    }
    let (publisher, _) =
        proto::open(c.proto, &t.dial(&c, 0), Some(&room), None).await.context("publisher")?;
    let (prd, mut pwr) = publisher.into_split();
    let pong = Arc::new(PongOwed::default());
    let drain = fanout::spawn_publisher_reader(prd, pong.clone(), |_| {});
    let mut rng = StdRng::seed_from_u64(a.seed);
    let (lo, hi) = (a.size_min.min(a.size_max), a.size_max.max(a.size_min));
    let room2 = room.clone();
    let cpu = CpuMeter::start(&a.node_pid);
    let start = Instant::now();
    let sent = fanout::publish_at_rate(
        c.proto,
        &mut pwr,
        &pong,
        |_| room2.clone(),
        a.rate,
        Duration::from_secs(a.duration_secs),
        origin,
        |n, t| {
            let target = rng.random_range(lo..=hi);
            let body = chat_payload(&mut rng, n, target);
            // `t` first, for the latency; the rest is the chat message.
            format!("{{\"t\":{t},{}", &body[1..])
        },
    )
    .await?;
    let expected = sent * a.subs as u64;
    fanout::wait_deliveries(&total, expected, Duration::from_secs(10)).await;
    let secs = start.elapsed().as_secs_f64();
    let (node_cpu_s, node_cores) = cpu.read();
    let delivered = total.load(Ordering::Relaxed);
    drop(pwr);
    drain.abort();
    let _ = stop_tx.send(true);
    let mut hist = common::new_hist()?;
    let (mut wire_bytes, mut socket_bytes, mut msg_bytes, mut msgs_read, mut max_per_frame) = (0, 0, 0, 0, 0);
    for r in readers {
        let SubStats {
            bytes_read,
            publication_frame_bytes,
            msg_bytes: m,
            msgs_read: k,
            max_per_compressed_frame,
            hist: h,
            ..
        } = r.await?;
        wire_bytes += publication_frame_bytes;
        socket_bytes += bytes_read;
        msg_bytes += m;
        msgs_read += k;
        max_per_frame = max_per_frame.max(max_per_compressed_frame);
        if let Some(h) = h {
            hist.add(&h)?;
        }
    }
    Ok(RunResult {
        mode,
        negotiated,
        published: sent,
        expected,
        delivered,
        secs,
        wire_bytes,
        socket_bytes,
        app_bytes_per_delivery: msg_bytes as f64 / msgs_read.max(1) as f64,
        max_per_frame,
        node_cpu_s,
        node_cores,
        hist,
    })
}

pub async fn run(a: CompressionArgs) -> anyhow::Result<()> {
    if a.common.proto != Proto::Roomcast {
        anyhow::bail!("compression speaks roomcast only");
    }
    println!(
        "scenario            compression: {} subscribers, {} publications/s of {}-{} B chat JSON for {}s per run",
        a.subs, a.rate, a.size_min, a.size_max, a.duration_secs
    );
    let mut runs = Vec::new();
    for (i, mode) in a.modes.iter().enumerate() {
        if i > 0 {
            // Let the previous run's connections close.
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        runs.push(one_run(&a, *mode).await?);
    }
    println!(
        "{:<9} {:>10} {:>10} {:>8} {:>12} {:>10} {:>10} {:>9} {:>12} {:>10}",
        "deflate",
        "negotiated",
        "delivered",
        "lost",
        "deliveries/s",
        "wire B/msg",
        "app B/msg",
        "node CPU",
        "µs CPU/msg",
        "p99 ms"
    );
    let mut json_runs = Vec::new();
    for r in &runs {
        let per = r.wire_bytes as f64 / r.delivered.max(1) as f64;
        let cpu_per_pub = r.node_cpu_s * 1e6 / r.published.max(1) as f64;
        let cpu_per_delivery = r.node_cpu_s * 1e6 / r.delivered.max(1) as f64;
        let p99 = r.hist.value_at_quantile(0.99) as f64 / 1000.0;
        println!(
            "{:<9} {:>10} {:>10} {:>8} {:>12.0} {:>10.1} {:>10.1} {:>9.2} {:>12.1} {:>10.2}",
            format!("{:?}", r.mode).to_lowercase(),
            r.negotiated,
            r.delivered,
            r.expected.saturating_sub(r.delivered),
            per_second(r.delivered, r.secs),
            per,
            r.app_bytes_per_delivery,
            r.node_cores,
            cpu_per_delivery,
            p99
        );
        json_runs.push(serde_json::json!({
            "deflate": r.mode == Deflate::On, "negotiated": r.negotiated, "published": r.published,
            "expected": r.expected, "delivered": r.delivered, "lost": r.expected.saturating_sub(r.delivered),
            "deliveries_per_s": per_second(r.delivered, r.secs), "seconds": r.secs,
            "wire_bytes": r.wire_bytes, "wire_bytes_per_delivery": per, "socket_bytes_read": r.socket_bytes,
            "app_bytes_per_delivery": r.app_bytes_per_delivery,
            "node_cpu_s": r.node_cpu_s, "node_cpu_cores": r.node_cores, "node_cpu_us_per_publication": cpu_per_pub,
            "node_cpu_us_per_delivery": cpu_per_delivery, "max_publications_per_compressed_frame": r.max_per_frame,
            "latency_ms": common::latency_json(&r.hist),
        }));
    }
    if let (Some(on), Some(off)) =
        (runs.iter().find(|r| r.mode == Deflate::On), runs.iter().find(|r| r.mode == Deflate::Off))
    {
        let per = |r: &RunResult| r.wire_bytes as f64 / r.delivered.max(1) as f64;
        println!("wire bytes          deflate / plain = {:.2}", per(on) / per(off).max(1e-9));
    }
    for r in runs.iter().filter(|r| r.mode == Deflate::On) {
        match r.max_per_frame {
            0 => println!("check               no compressed frame reached a timed subscriber"),
            1 => println!(
                "check               each compressed frame held one publication (timed subscribers inflated all)"
            ),
            k => println!(
                "check               a compressed frame held {k} publications: untimed subscribers undercount (--timed {})",
                a.subs
            ),
        }
    }
    common::result(serde_json::json!({
        "scenario": "compression", "subscribers": a.subs, "rate": a.rate,
        "size_min": a.size_min, "size_max": a.size_max, "runs": json_runs,
    }));
    Ok(())
}
