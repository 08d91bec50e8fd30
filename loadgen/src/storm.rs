//! `storm`: (a) `--mode rate`: how fast a node takes new connections; (b) `--mode
//! reconnect`: N clients subscribed to a room with history, a publisher, then the node
//! goes away (killed or terminated by the operator or bench/run.sh after the `READY`
//! line) and every client reconnects with backoff and jitter and resubscribes with
//! `recover`. Reports how long until every client is back and what was lost or duplicated.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use tokio::io::AsyncWriteExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use crate::common::{self, Common, Target, now_micros, per_second, say};
use crate::fanout::{PongOwed, spawn_publisher_reader};
use crate::proto::{self, Conn, Proto, Step};

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Open --conns connections as fast as possible; connections per second.
    Rate,
    /// Reconnect storm: wait for the node to go away after `READY`, then measure recovery.
    Reconnect,
}

#[derive(Args)]
pub struct StormArgs {
    #[command(flatten)]
    pub common: Common,
    #[arg(long, value_enum, default_value_t = Mode::Rate)]
    pub mode: Mode,
    /// Connections (rate) or subscribed clients (reconnect).
    #[arg(long, default_value_t = 1000)]
    pub conns: usize,
    /// Rate mode: also subscribe each connection to this room (default: `connect` only).
    /// Reconnect mode: the room (default `storm`; its namespace needs history).
    #[arg(long)]
    pub room: Option<String>,
    /// Reconnect: rooms to spread the clients over (`ROOM0`, `ROOM1`, … when more than
    /// one); the publisher publishes into them in turn. In a namespace with `join_leave`,
    /// N members of one room cost N² join pushes when they all come back.
    #[arg(long, default_value_t = 1)]
    pub rooms: usize,
    /// Reconnect: publications per second (all rooms together) while the storm runs.
    #[arg(long, default_value_t = 50)]
    pub rate: u64,
    /// Reconnect: where clients (and the publisher) reconnect, comma separated (default:
    /// --url). Point it at another, already running node to fail over instead of waiting
    /// for a restart.
    #[arg(long)]
    pub reconnect_url: Option<String>,
    /// Reconnect: where the publisher connects first (default: the first of --url).
    #[arg(long)]
    pub publish_url: Option<String>,
    /// Reconnect: first backoff bound; attempt k waits a uniformly random time in
    /// [0, min(max, min * 2^k)] ("full jitter").
    #[arg(long, default_value_t = 200)]
    pub backoff_min_ms: u64,
    #[arg(long, default_value_t = 5000)]
    pub backoff_max_ms: u64,
    /// Reconnect: seconds of publishing before `READY`.
    #[arg(long, default_value_t = 2)]
    pub warmup_secs: u64,
    /// Reconnect: seconds to wait after `READY` for the node to go away.
    #[arg(long, default_value_t = 60)]
    pub wait_disconnect_secs: u64,
    /// Reconnect: seconds from the first disconnect for every client to be back; rate:
    /// seconds for the whole run.
    #[arg(long, default_value_t = 60)]
    pub timeout_secs: u64,
    /// Reconnect: seconds of publishing once every client is back, before counting.
    #[arg(long, default_value_t = 2)]
    pub settle_secs: u64,
    /// Reconnect: how many clients must have been disconnected for the storm to count as
    /// started (default: all of them; less when only some nodes of --url go away).
    #[arg(long)]
    pub expect_disconnects: Option<usize>,
}

pub async fn run(a: StormArgs) -> anyhow::Result<()> {
    if a.common.proto != Proto::Roomcast {
        bail!("storm speaks roomcast only");
    }
    match a.mode {
        Mode::Rate => rate(a).await,
        Mode::Reconnect => reconnect(a).await,
    }
}

async fn rate(a: StormArgs) -> anyhow::Result<()> {
    let c = Arc::new(a.common);
    let t = Arc::new(Target::new(&c.url, c.proto)?);
    let sem = Arc::new(Semaphore::new(c.concurrency.max(1)));
    let deadline = Instant::now() + Duration::from_secs(a.timeout_secs);
    let held = Arc::new(Mutex::new(Vec::with_capacity(a.conns)));
    let hist = Arc::new(Mutex::new(common::new_hist()?));
    let failed = Arc::new(AtomicUsize::new(0));
    let first_error = Arc::new(Mutex::new(None::<String>));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(a.conns);
    for i in 0..a.conns {
        if Instant::now() >= deadline {
            break;
        }
        let permit = sem.clone().acquire_owned().await?;
        let (c, t, held, hist, failed, first_error, room) = (
            c.clone(),
            t.clone(),
            held.clone(),
            hist.clone(),
            failed.clone(),
            first_error.clone(),
            a.room.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let t0 = Instant::now();
            let left = deadline.saturating_duration_since(t0).max(Duration::from_millis(1));
            let r =
                tokio::time::timeout(left, proto::open(c.proto, &t.dial(&c, i), room.as_deref(), None)).await;
            drop(permit);
            match r {
                Ok(Ok((conn, _))) => {
                    let _ = hist.lock().record(t0.elapsed().as_micros() as u64);
                    held.lock().push(conn);
                }
                Ok(Err(e)) => {
                    failed.fetch_add(1, Ordering::Relaxed);
                    first_error.lock().get_or_insert(format!("{e:#}"));
                }
                Err(_) => {
                    failed.fetch_add(1, Ordering::Relaxed);
                    first_error.lock().get_or_insert("timed out".into());
                }
            }
        }));
    }
    let attempted = tasks.len();
    for task in tasks {
        let _ = task.await;
    }
    let secs = start.elapsed().as_secs_f64();
    let established = held.lock().len();
    let n_failed = failed.load(Ordering::Relaxed);
    let h = hist.lock().clone();
    let what = if a.room.is_some() { "upgrade + connect + subscribe" } else { "upgrade + connect" };
    println!("scenario            storm rate: {} connections, {} in flight, {what}", a.conns, c.concurrency);
    println!("sources             {:?}", c.sources);
    println!("established         {established} of {attempted} attempted, {n_failed} failed, in {secs:.2}s");
    println!("connections/s       {:.0}", per_second(established as u64, secs));
    println!("handshake ms        {}", common::latency_line(&h));
    if let Some(e) = first_error.lock().as_ref() {
        println!("first error         {e}");
    }
    common::result(serde_json::json!({
        "scenario": "storm", "mode": "rate", "connections": established, "attempted": attempted,
        "failed": n_failed, "concurrency": c.concurrency, "sources": c.sources.len(), "seconds": secs,
        "connections_per_s": per_second(established as u64, secs), "handshake_ms": common::latency_json(&h),
    }));
    drop(std::mem::take(&mut *held.lock()));
    Ok(())
}

/// Shared state of a reconnect storm.
struct Ctx {
    common: Common,
    first: Target,
    again: Target,
    room: String,
    rooms: usize,
    backoff_min: Duration,
    backoff_max: Duration,
    stop: watch::Receiver<bool>,
    /// Clients subscribed at least once.
    subscribed: AtomicUsize,
    /// Clients disconnected at least once.
    disconnected_once: AtomicUsize,
    /// Clients disconnected and not yet subscribed again.
    down: AtomicUsize,
    /// First disconnect seen, µs since `origin` (0: none yet).
    first_down_us: AtomicU64,
    origin: Instant,
    attempts: AtomicU64,
    failed_attempts: AtomicU64,
    first_error: Mutex<Option<String>>,
    /// A client met an error that retrying cannot mend (e.g. a room without history).
    fatal: AtomicBool,
    /// Publications received by every client (for the final drain).
    received: AtomicU64,
}

/// What one client saw.
#[derive(Default)]
struct ClientStats {
    /// Times each publication (by its `seq`) arrived, indexed by seq.
    seen: Vec<u8>,
    disconnects: u32,
    recovered_true: u32,
    recovered_false: u32,
    /// Offsets that were not the last plus one, within an epoch.
    gaps: u32,
    /// Microseconds from this client's first disconnect to its first subscription after it.
    back_after_us: Option<u64>,
    close_codes: Vec<u16>,
}

impl ClientStats {
    fn saw(&mut self, seq: u64) {
        let i = seq as usize;
        if self.seen.len() <= i {
            self.seen.resize(i + 64, 0);
        }
        self.seen[i] = self.seen[i].saturating_add(1);
    }
}

impl Ctx {
    /// Room number `r`'s name.
    fn room_name(&self, r: usize) -> String {
        if self.rooms > 1 { format!("{}{r}", self.room) } else { self.room.clone() }
    }
    /// The room of client `i`.
    fn room_of_client(&self, i: usize) -> usize {
        i % self.rooms
    }
    /// The room publication `seq` goes to.
    fn room_of_seq(&self, seq: u64) -> usize {
        ((seq.max(1) - 1) % self.rooms as u64) as usize
    }
}

fn backoff(ctx: &Ctx, attempt: u32) -> Duration {
    let cap = ctx.backoff_min.saturating_mul(1u32 << attempt.min(16)).min(ctx.backoff_max);
    cap.mul_f64(rand::random::<f64>())
}

/// `data.seq` of a publication line.
fn seq_of(line: &[u8]) -> Option<u64> {
    proto::parse_num(line, b"\"seq\":")
}

/// Handles a `subscribed` reply: recovery outcome, replayed publications, position.
fn on_subscribed(line: &str, st: &mut ClientStats, pos: &mut Option<(u64, String)>) -> anyhow::Result<()> {
    let v: serde_json::Value = serde_json::from_str(line).context("subscribed reply is not JSON")?;
    match v.get("recovered").and_then(|r| r.as_bool()) {
        Some(true) => st.recovered_true += 1,
        Some(false) => st.recovered_false += 1,
        None => {}
    }
    let mut last = pos.as_ref().map(|p| p.0);
    for p in v.get("publications").and_then(|p| p.as_array()).into_iter().flatten() {
        if let Some(o) = p.get("offset").and_then(|o| o.as_u64()) {
            if last.is_some_and(|l| o != l + 1) {
                st.gaps += 1;
            }
            last = Some(o);
        }
        if let Some(s) = p.get("data").and_then(|d| d.get("seq")).and_then(|s| s.as_u64()) {
            st.saw(s);
        }
    }
    match (v.get("offset").and_then(|o| o.as_u64()), v.get("epoch").and_then(|e| e.as_str())) {
        (Some(o), Some(e)) => *pos = Some((o, e.to_string())),
        _ => bail!("room {} has no history (subscribed without offset/epoch): {line}", v["room"]),
    }
    Ok(())
}

/// One client: subscribes, reads, and after each disconnect waits a jittered backoff and
/// resubscribes with `recover`. `permit` is held until the first attempt is over.
async fn client(i: usize, ctx: Arc<Ctx>, mut permit: Option<OwnedSemaphorePermit>) -> ClientStats {
    let mut st = ClientStats::default();
    let mut ever_subscribed = false;
    let mut pos: Option<(u64, String)> = None;
    let mut attempt: u32 = 0;
    let mut stop = ctx.stop.clone();
    let mut down_since: Option<Instant> = None;
    let room = ctx.room_name(ctx.room_of_client(i));
    while !*stop.borrow() {
        let target = if st.disconnects == 0 { &ctx.first } else { &ctx.again };
        ctx.attempts.fetch_add(1, Ordering::Relaxed);
        let recover = pos.as_ref().map(|(o, e)| (*o, e.as_str()));
        let opened = tokio::time::timeout(
            Duration::from_secs(10),
            proto::open(Proto::Roomcast, &target.dial(&ctx.common, i), Some(&room), recover),
        )
        .await;
        drop(permit.take());
        let mut conn: Conn = match opened {
            Ok(Ok((conn, Some(line)))) => match on_subscribed(&line, &mut st, &mut pos) {
                Ok(()) => conn,
                Err(e) => {
                    *ctx.first_error.lock() = Some(format!("{e:#}"));
                    ctx.fatal.store(true, Ordering::Relaxed);
                    return st;
                }
            },
            other => {
                ctx.failed_attempts.fetch_add(1, Ordering::Relaxed);
                let e = match other {
                    Ok(Err(e)) => format!("{e:#}"),
                    Ok(Ok(_)) => "no subscribed reply".into(),
                    Err(_) => "timed out".into(),
                };
                // The node answered with an error (namespace, permission, token): retrying
                // cannot help.
                if e.starts_with("{\"type\":\"error\"") {
                    *ctx.first_error.lock() = Some(e);
                    ctx.fatal.store(true, Ordering::Relaxed);
                    return st;
                }
                ctx.first_error.lock().get_or_insert(e);
                let wait = backoff(&ctx, attempt);
                attempt += 1;
                tokio::select! {
                    _ = tokio::time::sleep(wait) => continue,
                    _ = stop.changed() => break,
                }
            }
        };
        if !ever_subscribed {
            ever_subscribed = true;
            ctx.subscribed.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(since) = down_since.take() {
            ctx.down.fetch_sub(1, Ordering::Relaxed);
            if st.back_after_us.is_none() {
                st.back_after_us = Some(since.elapsed().as_micros() as u64);
            }
        }
        // Live publications until the connection ends.
        let code = loop {
            let mut n = 0;
            let step = tokio::select! {
                _ = stop.changed() => return st,
                r = conn.recv(|m| {
                    if m.starts_with(b"{\"type\":\"publication\"") {
                        n += 1;
                        if let (Some(o), Some(p)) = (proto::parse_num(m, b"\"offset\":"), pos.as_mut()) {
                            if o != p.0 + 1 {
                                st.gaps += 1;
                            }
                            p.0 = o;
                        }
                        if let Some(s) = seq_of(m) {
                            st.saw(s);
                        }
                    }
                }) => r,
            };
            ctx.received.fetch_add(n, Ordering::Relaxed);
            match step {
                Ok(Step::Frame { .. }) => {}
                Ok(Step::Closed { code }) => break code,
                Err(_) => break None,
            }
        };
        if let Some(code) = code {
            st.close_codes.push(code);
        }
        st.disconnects += 1;
        down_since = Some(Instant::now());
        ctx.down.fetch_add(1, Ordering::Relaxed);
        if st.disconnects == 1 {
            ctx.disconnected_once.fetch_add(1, Ordering::Relaxed);
            let _ = ctx.first_down_us.compare_exchange(
                0,
                now_micros(ctx.origin).max(1),
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
        // The first try is jittered too, so that N clients do not all come back at once.
        let wait = backoff(&ctx, 0);
        attempt = 1;
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => break,
        }
    }
    st
}

/// The publisher: publishes `{"seq":N,"t":…}` with `id = N` at `rate`, reconnecting like the
/// clients; records which seqs the node acknowledged (`published`).
async fn publisher(
    ctx: Arc<Ctx>,
    first: Target,
    rate: u64,
    acked: Arc<Mutex<Vec<bool>>>,
    up: Arc<AtomicBool>,
) {
    let mut stop = ctx.stop.clone();
    let mut seq: u64 = 0;
    let mut attempt = 0;
    let mut moved = false;
    while !*stop.borrow() {
        let target = if moved { &ctx.again } else { &first };
        let rooms: Vec<String> = (0..ctx.rooms).map(|r| ctx.room_name(r)).collect();
        let opened = tokio::time::timeout(Duration::from_secs(10), async {
            let (mut conn, _) =
                proto::open(Proto::Roomcast, &target.dial(&ctx.common, 0), None, None).await?;
            conn.subscribe_all(&rooms).await?;
            anyhow::Ok(conn)
        })
        .await;
        let Ok(Ok(conn)) = opened else {
            let wait = backoff(&ctx, attempt);
            attempt += 1;
            tokio::select! {
                _ = tokio::time::sleep(wait) => continue,
                _ = stop.changed() => break,
            }
        };
        attempt = 0;
        up.store(true, Ordering::Relaxed);
        let (rd, mut wr) = conn.into_split();
        let pong = Arc::new(PongOwed::default());
        let acked2 = acked.clone();
        let mut reader = spawn_publisher_reader(rd, pong.clone(), move |m| {
            if !m.starts_with(b"{\"type\":\"published\"") {
                return;
            }
            if let Some(id) = proto::parse_num(m, b"\"id\":")
                && let Some(slot) = acked2.lock().get_mut(id as usize)
            {
                *slot = true;
            }
        });
        let start = Instant::now();
        let mut sent_here: u64 = 0;
        let mut tick = tokio::time::interval(Duration::from_millis(5));
        let mut out = Vec::new();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = &mut reader => break,
                _ = stop.changed() => return,
            }
            if pong.pay(Proto::Roomcast, &mut wr).await.is_err() {
                break;
            }
            let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
            if due <= sent_here {
                continue;
            }
            let mut items = Vec::new();
            while sent_here < due {
                sent_here += 1;
                seq += 1;
                let room = &rooms[ctx.room_of_seq(seq)];
                items.push((seq, room, format!("{{\"seq\":{seq},\"t\":{}}}", now_micros(ctx.origin))));
            }
            {
                let mut a = acked.lock();
                let need = seq as usize + 1;
                if a.len() < need {
                    a.resize(need, false);
                }
            }
            out.clear();
            Proto::Roomcast.publish_frames(
                &mut out,
                items.iter().map(|(s, r, d)| (u32::try_from(*s).ok(), r.as_str(), d.as_str())),
            );
            if wr.write_all(&out).await.is_err() {
                break;
            }
        }
        up.store(false, Ordering::Relaxed);
        reader.abort();
        moved = true;
        let wait = backoff(&ctx, 0);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => break,
        }
    }
}

async fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn reconnect(a: StormArgs) -> anyhow::Result<()> {
    let c = a.common.clone();
    let first = Target::new(&c.url, c.proto)?;
    let again = match &a.reconnect_url {
        Some(u) => Target::new(u, c.proto)?,
        None => first.clone(),
    };
    let pub_first = match &a.publish_url {
        Some(u) => Target::new(u, c.proto)?,
        None => Target { addrs: vec![first.addrs[0].clone()] },
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let origin = Instant::now();
    let ctx = Arc::new(Ctx {
        common: c.clone(),
        first,
        again,
        room: a.room.clone().unwrap_or_else(|| "storm".into()),
        rooms: a.rooms.max(1),
        backoff_min: Duration::from_millis(a.backoff_min_ms.max(1)),
        backoff_max: Duration::from_millis(a.backoff_max_ms.max(a.backoff_min_ms).max(1)),
        stop: stop_rx,
        subscribed: AtomicUsize::new(0),
        disconnected_once: AtomicUsize::new(0),
        down: AtomicUsize::new(0),
        first_down_us: AtomicU64::new(0),
        origin,
        attempts: AtomicU64::new(0),
        failed_attempts: AtomicU64::new(0),
        first_error: Mutex::new(None),
        fatal: AtomicBool::new(false),
        received: AtomicU64::new(0),
    });
    let n = a.conns;
    let expect = a.expect_disconnects.unwrap_or(n).min(n).max(1);

    // Clients, `concurrency` first handshakes at a time.
    let setup_start = Instant::now();
    let sem = Arc::new(Semaphore::new(c.concurrency.max(1)));
    let mut clients = Vec::with_capacity(n);
    for i in 0..n {
        let permit = sem.clone().acquire_owned().await?;
        clients.push(tokio::spawn(client(i, ctx.clone(), Some(permit))));
    }
    let setup_limit = Duration::from_secs(a.timeout_secs);
    let all_up = wait_until(setup_limit, || {
        ctx.subscribed.load(Ordering::Relaxed) >= n || ctx.fatal.load(Ordering::Relaxed)
    })
    .await;
    if !all_up || ctx.fatal.load(Ordering::Relaxed) {
        let _ = stop_tx.send(true);
        bail!(
            "{} of {n} clients subscribed (limit {setup_limit:?}); error: {}",
            ctx.subscribed.load(Ordering::Relaxed),
            ctx.first_error.lock().clone().unwrap_or_default()
        );
    }
    let setup = setup_start.elapsed();

    let acked = Arc::new(Mutex::new(vec![false]));
    let pub_up = Arc::new(AtomicBool::new(false));
    let pub_task = tokio::spawn(publisher(ctx.clone(), pub_first, a.rate, acked.clone(), pub_up.clone()));
    if !wait_until(Duration::from_secs(10), || pub_up.load(Ordering::Relaxed)).await {
        let _ = stop_tx.send(true);
        bail!("the publisher could not connect");
    }
    tokio::time::sleep(Duration::from_secs(a.warmup_secs)).await;
    if ctx.disconnected_once.load(Ordering::Relaxed) > 0 {
        let _ = stop_tx.send(true);
        bail!("clients were disconnected before READY: {:?}", ctx.first_error.lock());
    }
    say(&format!(
        "READY {n} clients subscribed to {}, publisher at {}/s: stop the node now",
        ctx.room, a.rate
    ));

    let storm = wait_until(Duration::from_secs(a.wait_disconnect_secs), || {
        ctx.first_down_us.load(Ordering::Relaxed) > 0
    })
    .await;
    let mut complete = false;
    let mut storm_secs = 0.0;
    if storm {
        complete = wait_until(Duration::from_secs(a.timeout_secs), || {
            ctx.disconnected_once.load(Ordering::Relaxed) >= expect && ctx.down.load(Ordering::Relaxed) == 0
        })
        .await;
        let first_down = Duration::from_micros(ctx.first_down_us.load(Ordering::Relaxed));
        storm_secs = (origin.elapsed().saturating_sub(first_down)).as_secs_f64();
        if complete {
            // Keep publishing a little: what comes after the storm must arrive too.
            let _ = wait_until(Duration::from_secs(10), || pub_up.load(Ordering::Relaxed)).await;
            tokio::time::sleep(Duration::from_secs(a.settle_secs)).await;
        }
    }

    // Stop publishing, let the last publications arrive, stop the clients.
    pub_task.abort();
    let _ = pub_task.await;
    let mut last = (ctx.received.load(Ordering::Relaxed), Instant::now());
    let drain_deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < drain_deadline && last.1.elapsed() < Duration::from_millis(300) {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = ctx.received.load(Ordering::Relaxed);
        if now != last.0 {
            last = (now, Instant::now());
        }
    }
    let _ = stop_tx.send(true);
    let mut stats = Vec::with_capacity(n);
    for h in clients {
        stats.push(h.await.unwrap_or_default());
    }

    // Count.
    let acked = acked.lock().clone();
    let published = acked.iter().filter(|a| **a).count() as u64;
    let (mut lost_recovered, mut lost_unrecoverable, mut dup, mut gaps) = (0u64, 0u64, 0u64, 0u64);
    let (mut rec_t, mut rec_f, mut disconnected, mut clients_unrecoverable) = (0u64, 0u64, 0usize, 0usize);
    let mut back: Histogram<u64> = common::new_hist()?;
    let mut codes = std::collections::BTreeMap::<u16, usize>::new();
    for (i, st) in stats.iter().enumerate() {
        let mut lost = 0;
        let room = ctx.room_of_client(i);
        for (s, ok) in acked.iter().enumerate() {
            let times = st.seen.get(s).copied().unwrap_or(0);
            if *ok && times == 0 && s > 0 && ctx.room_of_seq(s as u64) == room {
                lost += 1;
            }
            dup += times.saturating_sub(1) as u64;
        }
        if st.recovered_false > 0 {
            lost_unrecoverable += lost;
            clients_unrecoverable += 1;
        } else {
            lost_recovered += lost;
        }
        gaps += st.gaps as u64;
        rec_t += st.recovered_true as u64;
        rec_f += st.recovered_false as u64;
        if st.disconnects > 0 {
            disconnected += 1;
        }
        if let Some(us) = st.back_after_us {
            let _ = back.record(us.max(1));
        }
        for c in &st.close_codes {
            *codes.entry(*c).or_default() += 1;
        }
    }
    let still_down = ctx.down.load(Ordering::Relaxed);
    println!(
        "scenario            storm reconnect: {n} clients in {} room(s) {}, publisher at {}/s",
        ctx.rooms,
        ctx.room_name(0),
        a.rate
    );
    println!("setup               {n} subscribed in {:.2}s", setup.as_secs_f64());
    if !storm {
        println!("storm               no disconnect within {}s of READY", a.wait_disconnect_secs);
    } else {
        println!(
            "storm               {disconnected} clients disconnected; {} back{}",
            disconnected - still_down.min(disconnected),
            if complete {
                format!(", all within {storm_secs:.2}s of the first disconnect")
            } else {
                format!(", {still_down} still down after {}s", a.timeout_secs)
            }
        );
    }
    println!("close codes         {codes:?} (the others saw the connection end without one)");
    println!(
        "reconnect ms        {} (each client: its disconnect to its resubscription)",
        common::latency_line(&back)
    );
    println!(
        "attempts            {} ({} failed: refused, timed out or refused upgrade)",
        ctx.attempts.load(Ordering::Relaxed),
        ctx.failed_attempts.load(Ordering::Relaxed)
    );
    println!(
        "recovered           {rec_t} true, {rec_f} false ({clients_unrecoverable} clients got recovered:false)"
    );
    println!("published           {published} acknowledged");
    println!(
        "lost                {} ({lost_recovered} by clients that always recovered, {lost_unrecoverable} by clients told recovered:false)",
        lost_recovered + lost_unrecoverable
    );
    println!("duplicated          {dup}");
    println!("offset gaps         {gaps}");
    if let Some(e) = ctx.first_error.lock().as_ref() {
        println!("first error         {e}");
    }
    common::result(serde_json::json!({
        "scenario": "storm", "mode": "reconnect", "clients": n, "room": ctx.room, "rooms": ctx.rooms, "rate": a.rate,
        "setup_s": setup.as_secs_f64(), "storm": storm, "complete": complete, "disconnected": disconnected,
        "still_down": still_down, "all_back_s": if complete { Some(storm_secs) } else { None },
        "reconnect_ms": common::latency_json(&back),
        "attempts": ctx.attempts.load(Ordering::Relaxed), "failed_attempts": ctx.failed_attempts.load(Ordering::Relaxed),
        "recovered_true": rec_t, "recovered_false": rec_f, "clients_unrecoverable": clients_unrecoverable,
        "published": published, "lost": lost_recovered + lost_unrecoverable, "lost_recovered": lost_recovered,
        "lost_unrecoverable": lost_unrecoverable, "duplicated": dup, "offset_gaps": gaps,
        "close_codes": codes.iter().map(|(k, v)| (k.to_string(), serde_json::json!(v))).collect::<serde_json::Map<_, _>>(),
    }));
    if !storm {
        bail!("the node never went away: nothing to measure (stop it after the READY line)");
    }
    if !complete {
        bail!("not every client came back within {}s", a.timeout_secs);
    }
    Ok(())
}
