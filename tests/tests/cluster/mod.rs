//! The cluster scenarios shared by `cluster_redis.rs` and `cluster_nats.rs` (issue 3): three
//! real nodes on one broker server. Each scenario checks every offset (exactly once, in
//! order), so a lost or duplicated delivery fails it, however rare.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use roomcast_client::{
    BackoffConfig, Client, ConnectionEvent, Encoding, Position, Subscription, SubscriptionEvent,
};
use roomcast_tests::services::{BrokerService, start_nodes, wait_readyz};
use roomcast_tests::{
    Enc, NodeProc, TestClient, Value, eventually, json, offsets, str_of, u64_of, unique, within,
};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// The nodes' configuration: history big enough that every recovery here succeeds.
pub const CONFIG: &str = r#"
heartbeat_ms = 250
node_timeout_ms = 2000

[default_namespace]
history_size = 10000
recover_max = 10000

[namespaces.nohist]
history_size = 0
presence = false
join_leave = false

[limits]
commands_per_second = 0
connection_rate_per_ip = 0
"#;

/// `node_timeout_ms` in [`CONFIG`].
pub const NODE_TIMEOUT: Duration = Duration::from_millis(2000);

/// How long a whole phase (many messages) may take.
const PHASE: Duration = Duration::from_secs(30);

/// A broker server and three nodes on it.
pub struct Cluster<S> {
    pub broker: S,
    pub nodes: Vec<NodeProc>,
}

impl<S: BrokerService> Cluster<S> {
    pub fn start(broker: S) -> Self {
        let nodes = start_nodes(3, CONFIG, &broker.url(), &[]);
        Cluster { broker, nodes }
    }

    pub fn url(&self, i: usize) -> String {
        self.nodes[i].ws_url()
    }
}

/// A room name unique in this process.
pub fn room(what: &str) -> String {
    format!("{what}-{}", unique())
}

/// Connects to `url` and subscribes to `rooms`; asserts every `subscribed`.
pub async fn subscriber(url: &str, enc: Enc, rooms: &[&str]) -> TestClient {
    let mut c = TestClient::connected(url, enc).await;
    for r in rooms {
        let s = c.request(json!({"type": "subscribe", "room": r})).await;
        assert_eq!(s["type"], "subscribed", "{s}");
    }
    c
}

/// Publishes from `c` (subscribed to `room`), without an echo; the reply.
pub async fn publish(c: &mut TestClient, room: &str, data: Value) -> Value {
    let r = c.request(json!({"type": "publish", "room": room, "data": data, "skip_self": true})).await;
    assert_eq!(r["type"], "published", "{r}");
    r
}

/// Reads `c` until it has `want[room]` publications of every room in `want` (other
/// messages skipped); fails after `PHASE` or when more arrive than wanted before that.
pub async fn read_publications(
    c: &mut TestClient,
    want: &BTreeMap<String, usize>,
) -> BTreeMap<String, Vec<Value>> {
    let mut got: BTreeMap<String, Vec<Value>> = want.keys().map(|r| (r.clone(), Vec::new())).collect();
    let deadline = Instant::now() + PHASE;
    while got.iter().any(|(r, v)| v.len() < want[r]) {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(m) = c.recv_within(left).await else {
            let counts: Vec<(&String, usize)> = got.iter().map(|(r, v)| (r, v.len())).collect();
            panic!(
                "{:?} client {}: publications missing after {PHASE:?}: got {counts:?} of {want:?}",
                c.enc, c.client_id
            );
        };
        if m["type"] != "publication" {
            continue;
        }
        let r = str_of(&m, "room").to_string();
        if let Some(v) = got.get_mut(&r) {
            v.push(m);
        }
    }
    got
}

fn offsets_of(pubs: &[Value]) -> Vec<u64> {
    pubs.iter().map(|p| u64_of(p, "offset")).collect()
}

fn one_to(n: u64) -> Vec<u64> {
    (1..=n).collect()
}

// -------------------------------------------------------------------------------------
// Publications from any node reach every node, in one order.

/// Publishers on every node take turns in a room with history and in one without; two
/// subscribers per node (JSON and MessagePack) see offsets 1..N with the right data, and
/// the same order in the room without history.
pub async fn fan_out_in_one_order(nodes: &[NodeProc]) {
    const N: u64 = 30;
    let hist = room("fan");
    let plain = format!("nohist:{}", room("fan"));
    let rooms = [hist.as_str(), plain.as_str()];
    let mut subs = Vec::new();
    for n in nodes {
        for enc in Enc::BOTH {
            subs.push(subscriber(&n.ws_url(), enc, &rooms).await);
        }
    }
    let mut pubs = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        pubs.push(subscriber(&n.ws_url(), Enc::BOTH[i % 2], &rooms).await);
    }
    for k in 1..=N {
        let from = (k as usize) % nodes.len();
        let r = publish(&mut pubs[from], &hist, json!({"k": k, "from": from})).await;
        assert_eq!(r["offset"], k, "offsets count publications from every node: {r}");
        let r = publish(&mut pubs[from], &plain, json!({"k": k, "from": from})).await;
        assert!(r.get("offset").is_none(), "no offset without history: {r}");
    }
    let want: BTreeMap<String, usize> = rooms.iter().map(|r| (r.to_string(), N as usize)).collect();
    let mut plain_orders = Vec::new();
    for s in &mut subs {
        let got = read_publications(s, &want).await;
        let h = &got[&hist];
        assert_eq!(offsets_of(h), one_to(N), "{:?} subscriber: every offset once, in order", s.enc);
        for (k, p) in (1..=N).zip(h) {
            assert_eq!(p["data"], json!({"k": k, "from": k as usize % nodes.len()}), "{p}");
            assert_eq!(p["room"], hist.as_str());
        }
        let order: Vec<Value> = got[&plain].iter().map(|p| p["data"].clone()).collect();
        let distinct: BTreeSet<String> = order.iter().map(Value::to_string).collect();
        assert_eq!(distinct.len(), N as usize, "every publication once: {order:?}");
        plain_orders.push(order);
    }
    for o in &plain_orders[1..] {
        assert_eq!(o, &plain_orders[0], "one order on every node, in every encoding");
    }
}

// -------------------------------------------------------------------------------------
// Concurrent publishers on different nodes.

/// Two publishers per node publish into one room at the same time (pipelined, so they
/// really overlap); their replies hold offsets 1..N once each, each publisher's in its own
/// order; every subscriber on every node sees 1..N in order with each offset's data.
pub async fn concurrent_publishers(nodes: &[NodeProc]) {
    const PER_PUBLISHER: u64 = 100;
    const BATCH: u64 = 25;
    let r = room("concurrent");
    let mut subs = Vec::new();
    for n in nodes {
        for enc in Enc::BOTH {
            subs.push(subscriber(&n.ws_url(), enc, &[&r]).await);
        }
    }
    let mut tasks = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        for j in 0..2usize {
            let mut p = subscriber(&n.ws_url(), Enc::BOTH[j], &[&r]).await;
            let r = r.clone();
            tasks.push(tokio::spawn(async move {
                let mut got = Vec::new();
                for b in 0..PER_PUBLISHER / BATCH {
                    let mut batch = Vec::new();
                    let mut ids = Vec::new();
                    for k in b * BATCH..(b + 1) * BATCH {
                        let id = p.next_id();
                        ids.push((json!(id), json!({"p": format!("{i}.{j}"), "k": k})));
                        batch.push(json!({"type": "publish", "id": id, "room": r, "skip_self": true,
                                          "data": {"p": format!("{i}.{j}"), "k": k}}));
                    }
                    p.send_batch(&batch).await;
                    for (id, data) in ids {
                        let reply = p.wait_reply(&id).await;
                        assert_eq!(reply["type"], "published", "{reply}");
                        got.push((u64_of(&reply, "offset"), data));
                    }
                }
                got
            }));
        }
    }
    let mut data_at = BTreeMap::new();
    for t in tasks {
        let got = within(PHASE, "the publishers", t).await.unwrap();
        let offs: Vec<u64> = got.iter().map(|(o, _)| *o).collect();
        assert!(
            offs.windows(2).all(|w| w[0] < w[1]),
            "one publisher's publications keep its order: {offs:?}"
        );
        for (o, d) in got {
            assert!(data_at.insert(o, d).is_none(), "offset {o} given twice");
        }
    }
    let n = data_at.len() as u64;
    assert_eq!(n, PER_PUBLISHER * 2 * nodes.len() as u64);
    assert_eq!(data_at.keys().copied().collect::<Vec<_>>(), one_to(n), "contiguous offsets");
    let want: BTreeMap<String, usize> = [(r.clone(), n as usize)].into();
    for s in &mut subs {
        let got = read_publications(s, &want).await;
        let pubs = &got[&r];
        assert_eq!(offsets_of(pubs), one_to(n), "{:?} subscriber: 1..{n} exactly once, in order", s.enc);
        for p in pubs {
            assert_eq!(p["data"], data_at[&u64_of(p, "offset")], "the data published at that offset: {p}");
        }
    }
}

// -------------------------------------------------------------------------------------
// Recovery on another node.

/// Publishes `{"k": k}` into `room` from a client on `url` every `every` until `stop`
/// (the room's only publisher, so offset k carries k); reports the last offset.
fn background_publisher(
    url: String,
    enc: Enc,
    room: String,
    every: Duration,
    stop: Arc<AtomicBool>,
) -> (watch::Receiver<u64>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(0u64);
    let task = tokio::spawn(async move {
        let mut c = subscriber(&url, enc, &[&room]).await;
        let mut tick = tokio::time::interval(every);
        let mut k = 0u64;
        while !stop.load(Ordering::Relaxed) {
            tick.tick().await;
            k += 1;
            let r = publish(&mut c, &room, json!({"k": k})).await;
            assert_eq!(r["offset"], k, "{r}");
            tx.send_replace(k);
        }
    });
    (rx, task)
}

async fn wait_published(published: &watch::Receiver<u64>, at_least: u64) {
    let mut p = published.clone();
    within(PHASE, &format!("offset {at_least} to be published"), p.wait_for(|o| *o >= at_least))
        .await
        .unwrap();
}

/// Reads live publications of `room` until offset `until`; asserts they continue `after`
/// contiguously, each with its data.
async fn expect_live(c: &mut TestClient, room: &str, after: u64, until: u64) {
    let want: BTreeMap<String, usize> = [(room.to_string(), (until - after) as usize)].into();
    let got = read_publications(c, &want).await;
    let pubs = &got[room];
    assert_eq!(offsets_of(pubs), (after + 1..=until).collect::<Vec<_>>(), "live publications after {after}");
    for p in pubs {
        assert_eq!(p["data"], json!({"k": u64_of(p, "offset")}), "{p}");
    }
}

/// A client leaves node 0 and comes back with `recover` on node 2, twice per encoding,
/// while a client on node 1 keeps publishing: `recovered: true` with exactly the missed
/// publications, then live ones with no gap and no duplicate.
pub async fn recovers_on_another_node(nodes: &[NodeProc]) {
    for enc in Enc::BOTH {
        let r = room("recover");
        let stop = Arc::new(AtomicBool::new(false));
        let (published, publisher) =
            background_publisher(nodes[1].ws_url(), enc, r.clone(), Duration::from_millis(4), stop.clone());
        let mut x = TestClient::connected(&nodes[0].ws_url(), enc).await;
        let s = x.request(json!({"type": "subscribe", "room": r})).await;
        assert_eq!(s["type"], "subscribed", "{s}");
        let epoch = str_of(&s, "epoch").to_string();
        let mut last = u64_of(&s, "offset");
        expect_live(&mut x, &r, last, last + 10).await;
        last += 10;
        for round in 0..2 {
            x.close().await;
            // Publications go on while the client is away.
            wait_published(&published, last + 15).await;
            let node = &nodes[2 - round * 2];
            x = TestClient::connected(&node.ws_url(), enc).await;
            let s = x
                .request(json!({"type": "subscribe", "room": r, "recover": {"offset": last, "epoch": epoch}}))
                .await;
            assert_eq!(s["type"], "subscribed", "{s}");
            assert_eq!(
                s["recovered"], true,
                "recovered on node {} (from {last} in {epoch}): {s}",
                node.node_id
            );
            assert_eq!(s["epoch"], epoch.as_str());
            let top = u64_of(&s, "offset");
            assert!(top >= last + 15, "{s}");
            assert_eq!(offsets(&s), (last + 1..=top).collect::<Vec<_>>(), "exactly the missed publications");
            for p in s["publications"].as_array().unwrap() {
                assert_eq!(p["data"], json!({"k": u64_of(p, "offset")}), "{p}");
            }
            expect_live(&mut x, &r, top, top + 10).await;
            last = top + 10;
        }
        stop.store(true, Ordering::Relaxed);
        within(PHASE, "the publisher to stop", publisher).await.expect("the publisher did not fail");
        x.close().await;
    }
}

// -------------------------------------------------------------------------------------
// The Rust SDK.

/// An SDK client of these URLs (tried in turn, rotating on reconnect), with quick
/// reconnects.
pub async fn sdk_client(urls: Vec<String>, encoding: Encoding) -> Client {
    let backoff =
        BackoffConfig { min: Duration::from_millis(10), max: Duration::from_millis(200), factor: 2.0 };
    within(
        Duration::from_secs(10),
        "the SDK to connect",
        Client::builder(urls.clone()).encoding(encoding).backoff(backoff).connect(),
    )
    .await
    .unwrap_or_else(|e| panic!("SDK connect to {urls:?}: {e}"))
}

/// Reads a subscription into a channel, so the test can go on while it is read.
pub fn forward(mut sub: Subscription) -> mpsc::UnboundedReceiver<SubscriptionEvent> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(ev) = sub.next().await {
            if tx.send(ev).is_err() {
                return;
            }
        }
    });
    rx
}

/// What one SDK subscription delivered: publication offsets in order (with their data's
/// `k`), and every `subscribed`.
#[derive(Debug, Default)]
pub struct Seen {
    pub offsets: Vec<u64>,
    pub subscribed: Vec<(Option<bool>, Option<Position>)>,
}

impl Seen {
    fn take(&mut self, ev: SubscriptionEvent) {
        match ev {
            SubscriptionEvent::Publication(p) => {
                let offset = p.offset.expect("an offset");
                let data: Value = p.data.decode().expect("JSON data");
                if let Some(k) = data.get("k") {
                    assert_eq!(k, offset, "the data published at offset {offset}");
                }
                self.offsets.push(offset);
            }
            SubscriptionEvent::Subscribed { recovered, position, .. } => {
                self.subscribed.push((recovered, position))
            }
            SubscriptionEvent::Unsubscribed { code, reason } => panic!("unsubscribed: {code} {reason}"),
            SubscriptionEvent::Join(_) | SubscriptionEvent::Leave(_) => {}
        }
    }

    /// Reads events until `done(self)`, `PHASE` at most.
    pub async fn until(
        &mut self,
        rx: &mut mpsc::UnboundedReceiver<SubscriptionEvent>,
        what: &str,
        done: impl Fn(&Seen) -> bool,
    ) {
        let deadline = Instant::now() + PHASE;
        while !done(self) {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(ev)) => self.take(ev),
                Ok(None) => panic!("subscription ended while waiting for {what}: {self:?}"),
                Err(_) => panic!("timed out waiting for {what}: {self:?}"),
            }
        }
    }
}

/// Waits for a connection event matching `pred`.
pub async fn wait_connection_event(
    events: &mut tokio::sync::broadcast::Receiver<ConnectionEvent>,
    what: &str,
    pred: impl Fn(&ConnectionEvent) -> bool,
) -> ConnectionEvent {
    within(PHASE, what, async {
        loop {
            match events.recv().await {
                Ok(ev) if pred(&ev) => return ev,
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(e) => panic!("connection events ended: {e}"),
            }
        }
    })
    .await
}

/// Two SDK clients (JSON, MessagePack) given the three node URLs, both on node 0 first;
/// publishers on nodes 1 and 2 keep publishing; node 0 is SIGKILLed. Both clients move to
/// other nodes (1 and 2), resubscribe with `recovered: true`, and end with every offset
/// exactly once, in order.
pub async fn sdk_survives_a_node_kill(nodes: &mut [NodeProc]) {
    let r = room("kill");
    let urls: Vec<String> = nodes.iter().map(NodeProc::ws_url).collect();
    let orders = [
        vec![urls[0].clone(), urls[1].clone(), urls[2].clone()],
        vec![urls[0].clone(), urls[2].clone(), urls[1].clone()],
    ];
    let mut clients = Vec::new();
    for (order, encoding) in orders.into_iter().zip([Encoding::Json, Encoding::Msgpack]) {
        let client = sdk_client(order, encoding).await;
        let events = client.events();
        let mut rx = forward(client.subscribe(&r).await.unwrap());
        let mut seen = Seen::default();
        seen.until(&mut rx, "subscribed", |s| !s.subscribed.is_empty()).await;
        assert_eq!(seen.subscribed[0].0, None);
        // Connected to node 0, the first URL (the first `connected` came before `events()`).
        clients.push((client, events, rx, seen));
    }
    // Publishers on nodes 1 and 2, concurrently: the room's order is the broker's, and the
    // offsets of the replies say which publication is which.
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, mut replies) = mpsc::unbounded_channel::<(u64, Value)>();
    let mut tasks = Vec::new();
    for (i, n) in nodes.iter().enumerate().skip(1) {
        let (url, r, stop, tx) = (n.ws_url(), r.clone(), stop.clone(), tx.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = subscriber(&url, Enc::BOTH[i % 2], &[&r]).await;
            let mut tick = tokio::time::interval(Duration::from_millis(5));
            let mut k = 0u64;
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                k += 1;
                let data = json!({"from": i, "n": k});
                let reply = publish(&mut c, &r, data.clone()).await;
                let _ = tx.send((u64_of(&reply, "offset"), data));
            }
        }));
    }
    drop(tx);
    for (_, _, rx, seen) in &mut clients {
        seen.until(rx, "20 live publications", |s| s.offsets.len() >= 20).await;
    }
    let victim = nodes[0].node_id.clone();
    nodes[0].kill();
    let expect_nodes = [nodes[1].node_id.clone(), nodes[2].node_id.clone()];
    for ((_, events, rx, seen), expect) in clients.iter_mut().zip(&expect_nodes) {
        wait_connection_event(events, "the SDK to notice the kill", |e| {
            matches!(e, ConnectionEvent::Disconnected { .. })
        })
        .await;
        let ev = wait_connection_event(events, "the SDK to reconnect", |e| {
            matches!(e, ConnectionEvent::Connected { .. })
        })
        .await;
        let ConnectionEvent::Connected { node, .. } = ev else { unreachable!() };
        assert_ne!(node, victim, "reconnected to another node");
        assert_eq!(&node, expect, "the next URL in the client's list");
        seen.until(rx, "the resubscribe", |s| s.subscribed.len() >= 2).await;
        assert_eq!(seen.subscribed[1].0, Some(true), "recovered on {node}: {:?}", seen.subscribed);
    }
    // Publishing goes on a little after both came back, then stops.
    let mut data_at = BTreeMap::new();
    let resumed = clients.iter().map(|c| c.3.offsets.last().copied().unwrap_or(0)).max().unwrap_or(0);
    while data_at.keys().next_back().copied().unwrap_or(0) < resumed + 20 {
        let (o, d) = within(PHASE, "more publications", replies.recv()).await.expect("publishers run");
        data_at.insert(o, d);
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        within(PHASE, "the publishers to stop", t).await.unwrap();
    }
    while let Some((o, d)) = replies.recv().await {
        data_at.insert(o, d);
    }
    let top = *data_at.keys().next_back().unwrap();
    assert_eq!(data_at.keys().copied().collect::<Vec<_>>(), one_to(top), "the publishers' replies");
    for (client, _, rx, seen) in &mut clients {
        seen.until(rx, "every publication", |s| s.offsets.last() == Some(&top)).await;
        assert_eq!(seen.offsets, one_to(top), "every offset exactly once, in order");
        assert!(seen.subscribed.iter().skip(1).all(|s| s.0 == Some(true)), "{:?}", seen.subscribed);
        client.close().await;
    }
}

// -------------------------------------------------------------------------------------
// The broker restarted empty.

/// The broker dies: `/readyz` answers 503 on every node; it comes back empty: 200 again,
/// without restarting any node. The room starts a new epoch at offset 1; an SDK client
/// on node 0 (publications from node 1) is told `recovered: false` with the new epoch and
/// then gets the new publications; a raw subscriber on node 2 sees the new epoch's offsets
/// from 1; a new subscriber on node 2 recovering from the old epoch gets
/// `recovered: false`.
pub async fn broker_restarted_empty<S: BrokerService>(broker: &mut S, nodes: &[NodeProc]) {
    wait_readyz(nodes, 200, PHASE).await;
    let r = room("restart");
    let client = sdk_client(vec![nodes[0].ws_url()], Encoding::Json).await;
    let mut rx = forward(client.subscribe(&r).await.unwrap());
    let mut seen = Seen::default();
    seen.until(&mut rx, "subscribed", |s| !s.subscribed.is_empty()).await;
    let mut p = subscriber(&nodes[1].ws_url(), Enc::Json, &[&r]).await;
    let mut raw = subscriber(&nodes[2].ws_url(), Enc::Msgpack, &[&r]).await;
    let mut epoch1 = String::new();
    for k in 1..=5 {
        epoch1 = str_of(&publish(&mut p, &r, json!({"k": k})).await, "epoch").to_string();
    }
    seen.until(&mut rx, "5 publications", |s| s.offsets.len() == 5).await;
    expect_live(&mut raw, &r, 0, 5).await;

    broker.kill();
    wait_readyz(nodes, 503, PHASE).await;
    broker.restart_empty();
    wait_readyz(nodes, 200, PHASE).await;

    // Traffic resumes on the same nodes: a new epoch from offset 1.
    let first = publish(&mut p, &r, json!({"k": 1})).await;
    assert_eq!(first["offset"], 1, "{first}");
    let epoch2 = str_of(&first, "epoch").to_string();
    assert_ne!(epoch2, epoch1, "a new epoch after the broker lost everything");
    seen.until(&mut rx, "the resubscribe after the new epoch", |s| s.subscribed.len() >= 2).await;
    let (recovered, position) = seen.subscribed[1].clone();
    assert_eq!(recovered, Some(false), "the SDK is told recovered: false: {:?}", seen.subscribed);
    let position = position.expect("a position");
    assert_eq!((position.offset, position.epoch.as_str()), (1, epoch2.as_str()), "the new epoch's position");
    for k in 2..=5 {
        let r2 = publish(&mut p, &r, json!({"k": k})).await;
        assert_eq!((r2["offset"].clone(), r2["epoch"].clone()), (json!(k), json!(epoch2)), "{r2}");
    }
    seen.until(&mut rx, "the new epoch's publications", |s| {
        s.offsets.last() == Some(&5) && s.offsets.len() > 5
    })
    .await;
    let after: Vec<u64> = seen.offsets[5..].to_vec();
    assert_eq!(after, (position.offset + 1..=5).collect::<Vec<_>>(), "{seen:?}");
    expect_live(&mut raw, &r, 0, 5).await;
    // A new subscription from the old epoch on another node: not recoverable.
    let mut late = TestClient::connected(&nodes[2].ws_url(), Enc::Json).await;
    let s = late
        .request(json!({"type": "subscribe", "room": r, "recover": {"offset": 5, "epoch": epoch1}}))
        .await;
    assert_eq!(s["type"], "subscribed", "{s}");
    assert_eq!(
        (s["recovered"].clone(), s["offset"].clone(), s["epoch"].clone()),
        (json!(false), json!(5), json!(epoch2))
    );
    publish(&mut p, &r, json!({"k": 6})).await;
    expect_live(&mut late, &r, 5, 6).await;
    client.close().await;
}

// -------------------------------------------------------------------------------------
// Presence.

fn member_ids(v: &Value) -> BTreeSet<String> {
    v["members"]
        .as_array()
        .unwrap_or_else(|| panic!("no members in {v}"))
        .iter()
        .map(|m| str_of(m, "client").to_string())
        .collect()
}

/// Every node answers `presence` with exactly `want` and `presence_stats` with its size.
async fn presence_everywhere(askers: &mut [TestClient], room: &str, want: &BTreeSet<String>) {
    for a in askers.iter_mut() {
        let p = a.request(json!({"type": "presence", "room": room})).await;
        assert_eq!(p["type"], "presence", "{p}");
        assert_eq!(&member_ids(&p), want, "presence on the node of {}", a.client_id);
        let s = a.request(json!({"type": "presence_stats", "room": room})).await;
        assert_eq!((s["clients"].clone(), s["users"].clone()), (json!(want.len()), json!(1)), "{s}");
    }
}

/// Waits for a `join` or `leave` push (`kind`) of `client` in `room` on `c`.
async fn expect_member_push(c: &mut TestClient, kind: &str, room: &str, client: &str) {
    let m = c.recv_until(|v| v["type"] == kind && v["member"]["client"] == client).await;
    assert_eq!(m["room"], room, "{m}");
}

/// Members on every node agree, and join/leave pushes cross nodes: a watcher on node 0
/// sees members join on nodes 1 and 2 and leave there (unsubscribe, disconnect).
pub async fn presence_agrees_on_every_node(nodes: &[NodeProc]) {
    let r = room("presence");
    let mut watcher = subscriber(&nodes[0].ws_url(), Enc::Json, &[&r]).await;
    let mut members = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        let enc = Enc::BOTH[i % 2];
        let mut c = TestClient::connected(&n.ws_url(), enc).await;
        let s = c.request(json!({"type": "subscribe", "room": r, "presence": true})).await;
        assert_eq!(s["type"], "subscribed", "{s}");
        // The member list in the reply holds everyone so far, this client included.
        let mut want: BTreeSet<String> = members.iter().map(|m: &TestClient| m.client_id.clone()).collect();
        want.insert(watcher.client_id.clone());
        want.insert(c.client_id.clone());
        assert_eq!(member_ids(&s), want, "{s}");
        expect_member_push(&mut watcher, "join", &r, &c.client_id).await;
        members.push(c);
    }
    // One asker per node that is not a member (presence is readable without subscribing).
    let mut askers = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        askers.push(TestClient::connected(&n.ws_url(), Enc::BOTH[(i + 1) % 2]).await);
    }
    let mut want: BTreeSet<String> = members.iter().map(|m| m.client_id.clone()).collect();
    want.insert(watcher.client_id.clone());
    presence_everywhere(&mut askers, &r, &want).await;
    // The member on node 1 saw node 2's member join too.
    let id2 = members[2].client_id.clone();
    expect_member_push(&mut members[1], "join", &r, &id2).await;

    // Node 2's member unsubscribes, node 1's disconnects: leaves reach node 0.
    let c2 = members.pop().unwrap();
    let c1 = members.pop().unwrap();
    let (id1, id2) = (c1.client_id.clone(), c2.client_id.clone());
    let mut c2 = c2;
    let u = c2.request(json!({"type": "unsubscribe", "room": r})).await;
    assert_eq!(u["type"], "unsubscribed", "{u}");
    expect_member_push(&mut watcher, "leave", &r, &id2).await;
    c1.close().await;
    expect_member_push(&mut watcher, "leave", &r, &id1).await;
    want.remove(&id1);
    want.remove(&id2);
    presence_everywhere(&mut askers, &r, &want).await;
}

// -------------------------------------------------------------------------------------
// No ghosts (issue 4): a killed node's members leave, once, on every surviving node.

/// Reads `c` until it got one `leave` for each of `want` (room, client); a second `leave`
/// for the same member fails. Other messages are skipped.
async fn collect_leaves(c: &mut TestClient, want: &BTreeSet<(String, String)>, limit: Duration) {
    collect_member_pushes(c, "leave", want, limit).await;
}

/// Reads `c` until it got one `kind` push (join or leave) for each of `want` (room,
/// client), in any order; a second one for the same member fails. Other messages are
/// skipped.
async fn collect_member_pushes(
    c: &mut TestClient,
    kind: &str,
    want: &BTreeSet<(String, String)>,
    limit: Duration,
) {
    let deadline = Instant::now() + limit;
    let mut got = BTreeSet::new();
    while got.len() < want.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(m) = c.recv_within(left).await else {
            panic!("client {}: leaves missing after {limit:?}: got {got:?} of {want:?}", c.client_id);
        };
        if m["type"] != kind {
            continue;
        }
        let key = (str_of(&m, "room").to_string(), str_of(&m["member"], "client").to_string());
        if !want.contains(&key) {
            // Another member's (the other watcher's join).
            continue;
        }
        assert!(got.insert(key), "a second {kind} for one member: {m}");
    }
}

/// After a quiet period of `quiet`, no further `leave` arrived on `c`.
async fn no_more_leaves(c: &mut TestClient, quiet: Duration) {
    let until = Instant::now() + quiet;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        if let Some(m) = c.recv_within(left).await {
            assert_ne!(m["type"], "leave", "a leave arrived twice or late: {m}");
        }
    }
}

/// SIGKILL of a node with members in two rooms: watchers on both other nodes (JSON and
/// MessagePack) get exactly one `leave` per member within the node timeout plus a few
/// heartbeats, and presence agrees everywhere afterwards. Returns the ghost time (kill to
/// the last leave seen).
pub async fn ghosts_of_a_killed_node_leave_once(nodes: &mut [NodeProc]) -> Duration {
    let (r, r2) = (room("ghosts"), room("ghosts2"));
    let mut watchers = vec![
        subscriber(&nodes[0].ws_url(), Enc::Json, &[&r, &r2]).await,
        subscriber(&nodes[1].ws_url(), Enc::Msgpack, &[&r, &r2]).await,
    ];
    let mut victims = Vec::new();
    let mut memberships = BTreeSet::new();
    for i in 0..3 {
        let rooms: Vec<&str> = if i == 0 { vec![&r, &r2] } else { vec![&r] };
        let v = subscriber(&nodes[2].ws_url(), Enc::BOTH[i % 2], &rooms).await;
        for room in rooms {
            memberships.insert((room.to_string(), v.client_id.clone()));
        }
        victims.push(v);
    }
    for w in &mut watchers {
        collect_member_pushes(w, "join", &memberships, PHASE).await;
    }
    let killed = Instant::now();
    nodes[2].kill();
    let limit = NODE_TIMEOUT * 2 + Duration::from_secs(5);
    let mut ghost = Duration::ZERO;
    for w in &mut watchers {
        collect_leaves(w, &memberships, limit).await;
        ghost = ghost.max(killed.elapsed());
    }
    assert!(ghost >= NODE_TIMEOUT / 2, "leaves came from the node timeout, not before: {ghost:?}");
    // Several more heartbeats (reaping rounds) bring no second leave.
    for w in &mut watchers {
        no_more_leaves(w, Duration::from_millis(1500)).await;
    }
    let want: BTreeSet<String> = watchers.iter().map(|w| w.client_id.clone()).collect();
    for room in [&r, &r2] {
        presence_everywhere(&mut watchers, room, &want).await;
    }
    drop(victims);
    ghost
}

/// A node restarted with the same id (as a StatefulSet pod is): its previous run's members
/// are removed (and leave) as soon as the new run is up, long before the node timeout (a
/// minute here), so the room never counts them twice.
pub async fn restarted_node_does_not_duplicate_members(broker_url: &str) {
    let id = format!("fixed-{}", unique());
    let start = |id: Option<&str>| {
        let mut opts = roomcast_tests::NodeOptions::with_config(CONFIG)
            .env("ROOMCAST_BROKER", broker_url)
            .env("ROOMCAST_NODE_TIMEOUT_MS", 60_000);
        opts = match id {
            Some(id) => opts.env("ROOMCAST_NODE_ID", id),
            None => opts.env("ROOMCAST_NODE_ID", format!("other-{}", unique())),
        };
        NodeProc::start(opts)
    };
    let mut fixed = start(Some(&id));
    let other = start(None);
    let r = room("restart");
    let mut watcher = subscriber(&other.ws_url(), Enc::Json, &[&r]).await;
    let mut before = Vec::new();
    let mut memberships = BTreeSet::new();
    for enc in Enc::BOTH {
        let c = subscriber(&fixed.ws_url(), enc, &[&r]).await;
        expect_member_push(&mut watcher, "join", &r, &c.client_id).await;
        memberships.insert((r.clone(), c.client_id.clone()));
        before.push(c);
    }
    fixed.kill();
    let restarted = Instant::now();
    let fixed = start(Some(&id));
    assert_eq!(fixed.node_id, id);
    let mut after = Vec::new();
    for enc in Enc::BOTH {
        after.push(subscriber(&fixed.ws_url(), enc, &[&r]).await);
    }
    collect_leaves(&mut watcher, &memberships, Duration::from_secs(15)).await;
    assert!(restarted.elapsed() < Duration::from_secs(30), "removed before the node timeout");
    let mut want: BTreeSet<String> = after.iter().map(|c| c.client_id.clone()).collect();
    want.insert(watcher.client_id.clone());
    let mut askers = vec![watcher];
    presence_everywhere(&mut askers, &r, &want).await;
    drop((before, other, fixed));
}

// -------------------------------------------------------------------------------------
// Connections per user across the cluster (issue 5).

const SECRET: &str = "roomcast-cluster-tests-hmac-secret-32-bytes-long";

fn token(sub: &str) -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    let exp = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() + 600;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": sub, "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// Connects as `sub`; the `connected` reply, or the close code.
async fn connect_as(url: &str, enc: Enc, sub: &str) -> Result<TestClient, u16> {
    let mut c = TestClient::open(url, enc).await;
    c.send(json!({"type": "connect", "id": 1, "token": token(sub)})).await;
    let m = c.recv_until(|m| m["type"] == "connected" || m["type"] == "disconnect").await;
    if m["type"] == "connected" {
        c.client_id = str_of(&m, "client").to_string();
        return Ok(c);
    }
    let (code, _) = c.expect_close().await;
    Err(code)
}

/// `max_connections_per_user = 2` holds across three nodes: a third connection of the
/// same user on any node is closed with 4010; a closed one frees its place, and so do the
/// connections of a killed node once it is reaped.
pub async fn user_connection_limit_is_cluster_wide(broker_url: &str) {
    let config = format!("{CONFIG}\n");
    let config = config.replace("[limits]\n", "[limits]\nmax_connections_per_user = 2\n");
    let config = format!("allow_anonymous = true\n{config}");
    let mut nodes = start_nodes(3, &config, broker_url, &[("ROOMCAST_JWT_HMAC_SECRET", SECRET)]);
    let user = format!("alice-{}", unique());
    let a0 = connect_as(&nodes[0].ws_url(), Enc::Json, &user).await.expect("first connection");
    let a1 = connect_as(&nodes[1].ws_url(), Enc::Msgpack, &user).await.expect("second connection");
    for (i, n) in nodes.iter().enumerate() {
        let r = connect_as(&n.ws_url(), Enc::BOTH[i % 2], &user).await;
        assert_eq!(r.err(), Some(4010), "a third connection on node {i}");
    }
    // Other users are not affected.
    let _bob = connect_as(&nodes[2].ws_url(), Enc::Json, "bob").await.expect("bob connects");
    // A closed connection frees its place (on another node).
    a0.close().await;
    let url = nodes[2].ws_url();
    let again = eventually(PHASE, "a place to be free again", || async {
        connect_as(&url, Enc::Json, &user).await.ok()
    })
    .await;
    // Node 1 dies with one of alice's connections: once reaped, its place is free.
    nodes[1].kill();
    drop(a1);
    let url = nodes[0].ws_url();
    let _third = eventually(NODE_TIMEOUT * 3 + PHASE, "the dead node's connection to be reaped", || async {
        connect_as(&url, Enc::Msgpack, &user).await.ok()
    })
    .await;
    assert_eq!(connect_as(&url, Enc::Json, &user).await.err(), Some(4010), "two again");
    drop(again);
}
