//! The Rust client SDK (roomcast-client) and the `roomcast` CLI against real nodes:
//! basic calls, recovery after a network cut (through a TCP proxy), `recovered: false`
//! after a node restart, and `roomcast sub` / `roomcast pub`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use roomcast_client::{
    BackoffConfig, Client, ClientError, ConnectionEvent, Data, Encoding, HistoryOptions, Position,
    SubscribeOptions, Subscription, SubscriptionEvent,
};
use roomcast_tests::{
    Enc, NO_RATE_LIMITS, NodeOptions, NodeProc, TcpProxy, TestClient, Value, json, roomcast_bin,
    start_test_node, u64_of, within,
};
use tokio::sync::{mpsc, watch};

fn encodings() -> [(Enc, Encoding); 2] {
    [(Enc::Json, Encoding::Json), (Enc::Msgpack, Encoding::Msgpack)]
}

fn data(v: Value) -> Data {
    Data::from_json(v.to_string()).unwrap()
}

/// A client with quick reconnects, for tests.
async fn sdk_client(url: &str, encoding: Encoding) -> Client {
    let backoff =
        BackoffConfig { min: Duration::from_millis(10), max: Duration::from_millis(200), factor: 2.0 };
    within(
        Duration::from_secs(10),
        "the SDK to connect",
        Client::builder(vec![url.to_string()]).encoding(encoding).backoff(backoff).connect(),
    )
    .await
    .unwrap_or_else(|e| panic!("SDK connect to {url}: {e}"))
}

/// The next subscription event (10 s at most).
async fn next_event(sub: &mut Subscription) -> SubscriptionEvent {
    within(Duration::from_secs(10), "a subscription event", sub.next()).await.expect("subscription ended")
}

#[tokio::test]
async fn sdk_calls_against_a_real_node() {
    let node = start_test_node(&[]);
    let url = node.ws_url();
    for (enc, encoding) in encodings() {
        let room = format!("sdk-{enc:?}");
        let client = sdk_client(&url, encoding).await;
        let mut sub = client.subscribe(&room).await.unwrap();
        match next_event(&mut sub).await {
            SubscriptionEvent::Subscribed { recovered: None, position: Some(p), members: None } => {
                assert_eq!(p.offset, 0);
            }
            other => panic!("{other:?}"),
        }
        let pos = client.publish(&room, data(json!({"n": 1}))).await.unwrap().expect("a position");
        assert_eq!(pos.offset, 1);
        match next_event(&mut sub).await {
            SubscriptionEvent::Publication(p) => {
                assert_eq!((p.room.as_str(), p.offset), (room.as_str(), Some(1)));
                assert_eq!(p.data.decode::<Value>().unwrap(), json!({"n": 1}));
            }
            other => panic!("{other:?}"),
        }
        // skip_self: offset 2 is not pushed back, and counts as seen (no resync).
        let pos = client.publish_skip_self(&room, data(json!({"n": 2}))).await.unwrap().unwrap();
        assert_eq!(pos.offset, 2);
        let mut other = TestClient::connected(&url, enc).await;
        other.request(json!({"type": "subscribe", "room": room})).await;
        other.request(json!({"type": "publish", "room": room, "data": {"n": 3}})).await;
        loop {
            match next_event(&mut sub).await {
                SubscriptionEvent::Join(m) => assert_eq!(m.client, other.client_id),
                SubscriptionEvent::Publication(p) => {
                    assert_eq!(p.offset, Some(3), "the next publication after a skip_self one");
                    break;
                }
                ev => panic!("unexpected {ev:?}"),
            }
        }
        let h = client
            .history(&room, HistoryOptions { since: None, limit: Some(2), reverse: true })
            .await
            .unwrap();
        assert_eq!(h.position.offset, 3);
        let offs: Vec<Option<u64>> = h.publications.iter().map(|p| p.offset).collect();
        assert_eq!(offs, vec![Some(3), Some(2)]);
        let members = client.presence(&room).await.unwrap();
        assert_eq!(members.len(), 2);
        assert!(members.iter().any(|m| m.client == other.client_id));
        assert_eq!(client.presence_stats(&room).await.unwrap(), (2, 1));
        // Errors come back as server errors with the node's code.
        let e = client.publish("nope:x", data(json!(1))).await.unwrap_err();
        assert_eq!(e.server_code(), Some(102), "{e}");
        let e = client.rpc("m", data(json!({}))).await.unwrap_err();
        assert!(matches!(e, ClientError::Server { code: 114, temporary: true, .. }), "{e}");
        // Unsubscribe: the other client sees it leave.
        sub.unsubscribe().await.unwrap();
        let l = other.recv_type("leave").await;
        assert_eq!(l["room"], room.as_str());
        client.close().await;
        assert!(client.is_closed());
    }
}

/// Reads a subscription into a channel, so the test can go on while it is read.
fn forward(mut sub: Subscription) -> mpsc::UnboundedReceiver<SubscriptionEvent> {
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

/// Publishes one message every `every` into `room` until `stop`; reports the last
/// offset published.
fn publisher(
    mut c: TestClient,
    room: String,
    every: Duration,
    stop: Arc<AtomicBool>,
) -> watch::Receiver<u64> {
    let (tx, rx) = watch::channel(0u64);
    tokio::spawn(async move {
        c.request(json!({"type": "subscribe", "room": room})).await;
        let mut tick = tokio::time::interval(every);
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            tick.tick().await;
            n += 1;
            let r = c
                .request(json!({"type": "publish", "room": room, "data": {"n": n}, "skip_self": true}))
                .await;
            assert_eq!(r["type"], "published", "{r}");
            tx.send_replace(u64_of(&r, "offset"));
        }
    });
    rx
}

/// Everything the test learns from one subscription: publication offsets in order, and
/// the `recovered` of every `subscribed`.
#[derive(Debug, Default)]
struct Seen {
    offsets: Vec<u64>,
    subscribed: Vec<(Option<bool>, Option<Position>)>,
}

impl Seen {
    fn take(&mut self, ev: SubscriptionEvent) {
        match ev {
            SubscriptionEvent::Publication(p) => self.offsets.push(p.offset.expect("offset")),
            SubscriptionEvent::Subscribed { recovered, position, .. } => {
                self.subscribed.push((recovered, position))
            }
            SubscriptionEvent::Unsubscribed { code, reason } => panic!("unsubscribed: {code} {reason}"),
            SubscriptionEvent::Join(_) | SubscriptionEvent::Leave(_) => {}
        }
    }

    /// Reads events until `done(self)`, 20 s at most.
    async fn until(
        &mut self,
        rx: &mut mpsc::UnboundedReceiver<SubscriptionEvent>,
        what: &str,
        done: impl Fn(&Seen) -> bool,
    ) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
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
async fn wait_connection_event(
    events: &mut tokio::sync::broadcast::Receiver<ConnectionEvent>,
    what: &str,
    pred: impl Fn(&ConnectionEvent) -> bool,
) -> ConnectionEvent {
    within(Duration::from_secs(20), what, async {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_recovers_every_offset_after_a_network_cut() {
    let config = format!("[default_namespace]\nhistory_size = 2000\nrecover_max = 2000\n{NO_RATE_LIMITS}");
    let node = NodeProc::start(NodeOptions::with_config(&config));
    for (enc, encoding) in encodings() {
        let room = format!("cut-{enc:?}");
        let proxy = TcpProxy::start(node.addr).await;
        let client = sdk_client(&proxy.ws_url(), encoding).await;
        let mut events = client.events();
        let mut rx = forward(client.subscribe(&room).await.unwrap());
        let mut seen = Seen::default();
        seen.until(&mut rx, "subscribed", |s| !s.subscribed.is_empty()).await;

        let stop = Arc::new(AtomicBool::new(false));
        let published = publisher(
            TestClient::connected(&node.ws_url(), enc).await,
            room.clone(),
            Duration::from_millis(3),
            stop.clone(),
        );
        seen.until(&mut rx, "30 live publications", |s| s.offsets.len() >= 30).await;

        // The network goes down: connections cut, new ones refused for a while.
        proxy.set_paused(true);
        assert!(proxy.cut_all() >= 1, "the SDK's connection went through the proxy");
        let cut_at = *published.borrow();
        wait_connection_event(&mut events, "the SDK to notice the cut", |e| {
            matches!(e, ConnectionEvent::Disconnected { .. })
        })
        .await;
        // Publications go on while the SDK is away.
        let mut p = published.clone();
        within(Duration::from_secs(20), "publications during the outage", p.wait_for(|o| *o >= cut_at + 30))
            .await
            .unwrap();
        proxy.set_paused(false);
        wait_connection_event(&mut events, "the SDK to reconnect", |e| {
            matches!(e, ConnectionEvent::Connected { .. })
        })
        .await;
        seen.until(&mut rx, "the resubscribe", |s| s.subscribed.len() >= 2).await;
        assert_eq!(seen.subscribed[1].0, Some(true), "resubscribed with recovery: {:?}", seen.subscribed);
        let after = *published.borrow();
        seen.until(&mut rx, "live publications after the recovery", |s| {
            s.offsets.last().is_some_and(|o| *o > after + 10)
        })
        .await;

        stop.store(true, Ordering::Relaxed);
        let mut probe = TestClient::connected(&node.ws_url(), enc).await;
        // The publisher may finish one last publish after `stop`: wait for its position
        // to settle by asking the node.
        let top = loop {
            let t1 =
                u64_of(&probe.request(json!({"type": "history", "room": room, "limit": 0})).await, "offset");
            let mut p = published.clone();
            if within(Duration::from_secs(5), "the publisher's last publish", p.wait_for(|o| *o >= t1))
                .await
                .is_ok()
            {
                let t2 = u64_of(
                    &probe.request(json!({"type": "history", "room": room, "limit": 0})).await,
                    "offset",
                );
                if t1 == t2 && *published.borrow() == t2 {
                    break t2;
                }
            }
        };
        seen.until(&mut rx, "every publication", |s| s.offsets.last() == Some(&top)).await;
        assert_eq!(seen.offsets, (1..=top).collect::<Vec<_>>(), "every offset exactly once, in order");
        assert!(seen.offsets.len() as u64 > cut_at + 30);
        assert!(seen.subscribed.iter().skip(1).all(|s| s.0 == Some(true)), "{:?}", seen.subscribed);
        client.close().await;
    }
}

#[tokio::test]
async fn sdk_reports_not_recovered_after_a_node_restart() {
    for (enc, encoding) in encodings() {
        let mut node1 = start_test_node(&[]);
        let proxy = TcpProxy::start(node1.addr).await;
        let client = sdk_client(&proxy.ws_url(), encoding).await;
        let mut events = client.events();
        let mut rx = forward(client.subscribe("restart").await.unwrap());
        let mut seen = Seen::default();
        seen.until(&mut rx, "subscribed", |s| !s.subscribed.is_empty()).await;
        let mut p = TestClient::connected(&node1.ws_url(), enc).await;
        p.request(json!({"type": "subscribe", "room": "restart"})).await;
        let mut epoch1 = String::new();
        for n in 1..=5 {
            let r =
                p.request(json!({"type": "publish", "room": "restart", "data": n, "skip_self": true})).await;
            epoch1 = r["epoch"].as_str().unwrap().to_string();
        }
        seen.until(&mut rx, "5 publications", |s| s.offsets.len() == 5).await;
        drop(p);

        // The node dies (its memory broker loses the history); another takes its place.
        node1.kill();
        wait_connection_event(&mut events, "the SDK to notice", |e| {
            matches!(e, ConnectionEvent::Disconnected { .. })
        })
        .await;
        let node2 = start_test_node(&[]);
        proxy.set_upstream(node2.addr);
        wait_connection_event(
            &mut events,
            "the SDK to reconnect",
            |e| matches!(e, ConnectionEvent::Connected { node, .. } if *node == node2.node_id),
        )
        .await;
        seen.until(&mut rx, "the resubscribe", |s| s.subscribed.len() >= 2).await;
        let (recovered, position) = seen.subscribed[1].clone();
        assert_eq!(recovered, Some(false), "the SDK surfaces recovered: false: {:?}", seen.subscribed);
        let position = position.expect("a position");
        assert_eq!(position.offset, 0);
        assert_ne!(position.epoch, epoch1, "a new epoch");
        // Publications of the new epoch are delivered from offset 1.
        let mut p = TestClient::connected(&node2.ws_url(), enc).await;
        p.request(json!({"type": "subscribe", "room": "restart"})).await;
        p.request(json!({"type": "publish", "room": "restart", "data": "new", "skip_self": true})).await;
        seen.until(&mut rx, "the first publication of the new epoch", |s| s.offsets.len() == 6).await;
        assert_eq!(seen.offsets, vec![1, 2, 3, 4, 5, 1]);
        client.close().await;
    }
}

/// Waits until `room` has `clients` members (polling the node's presence_stats).
async fn wait_presence(url: &str, room: &str, clients: u64) {
    let mut c = TestClient::connected(url, Enc::Json).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let s = c.request(json!({"type": "presence_stats", "room": room})).await;
        if s["clients"] == clients {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{room} never had {clients} members: {s}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn cli_sub_and_pub() {
    let node = start_test_node(&[]);
    let url = node.ws_url();
    for msgpack in [false, true] {
        let room = format!("cli-{msgpack}");
        let mut args =
            vec!["sub".to_string(), room.clone(), "--count".into(), "3".into(), "--url".into(), url.clone()];
        if msgpack {
            args.push("--msgpack".into());
        }
        let sub = tokio::process::Command::new(roomcast_bin())
            .args(&args)
            .env("ROOMCAST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("roomcast sub");
        wait_presence(&url, &room, 1).await;
        // Publish with the CLI too: `roomcast pub ROOM DATA` prints the position.
        for n in 1..=3 {
            let mut cmd = tokio::process::Command::new(roomcast_bin());
            cmd.args(["pub", &room, &format!("{{\"n\":{n}}}"), "--url", &url]).env("ROOMCAST_LOG", "warn");
            if msgpack {
                cmd.arg("--msgpack");
            }
            let out = within(Duration::from_secs(20), "roomcast pub", cmd.output()).await.unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "roomcast pub failed: {stdout} {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let pos: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"));
            assert_eq!(pos["offset"], n, "{pos}");
            assert!(pos["epoch"].is_string(), "{pos}");
        }
        let out =
            within(Duration::from_secs(20), "roomcast sub --count 3", sub.wait_with_output()).await.unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "roomcast sub failed: {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let lines: Vec<Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(
            lines,
            (1..=3).map(|n| json!({"room": room, "offset": n, "data": {"n": n}})).collect::<Vec<_>>(),
            "{stdout}"
        );
        // `roomcast history` prints the same publications.
        let out = within(
            Duration::from_secs(20),
            "roomcast history",
            tokio::process::Command::new(roomcast_bin()).args(["history", &room, "--url", &url]).output(),
        )
        .await
        .unwrap();
        assert!(out.status.success());
        assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 3);
    }
    // A failing call exits non-zero with the node's error.
    let out = tokio::process::Command::new(roomcast_bin())
        .args(["pub", "nope:x", "1", "--url", &url])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("102"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test]
async fn sdk_subscribe_with_presence_and_recover_position() {
    let node = start_test_node(&[]);
    let url = node.ws_url();
    for (enc, encoding) in encodings() {
        let room = format!("opts-{enc:?}");
        let mut p = TestClient::connected(&url, enc).await;
        p.request(json!({"type": "subscribe", "room": room})).await;
        let mut epoch = String::new();
        for n in 1..=4 {
            epoch = p.request(json!({"type": "publish", "room": room, "data": n})).await["epoch"]
                .as_str()
                .unwrap()
                .into();
        }
        let client = sdk_client(&url, encoding).await;
        let opts = SubscribeOptions {
            presence: true,
            token: None,
            recover: Some(Position { offset: 2, epoch: epoch.clone() }),
        };
        let mut sub = client.subscribe_with(&room, opts).await.unwrap();
        match next_event(&mut sub).await {
            SubscriptionEvent::Subscribed {
                recovered: Some(true),
                position: Some(pos),
                members: Some(m),
            } => {
                assert_eq!(pos, Position { offset: 4, epoch });
                assert_eq!(m.len(), 2, "members include the subscriber: {m:?}");
            }
            other => panic!("{other:?}"),
        }
        for want in [3, 4] {
            match next_event(&mut sub).await {
                SubscriptionEvent::Publication(pb) => assert_eq!(pb.offset, Some(want)),
                other => panic!("{other:?}"),
            }
        }
        client.close().await;
    }
}
