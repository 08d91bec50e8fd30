//! Issue 6: the backend API against three real nodes and a real `nats-server` (a real
//! `redis-server` as the broker where history is involved): every method in JSON and in
//! MessagePack over NATS, fire-and-forget publishing, idempotent publishing, `send` /
//! `disconnect` / `unsubscribe` reaching a user's connections on every node, client `rpc`
//! with and without a responder, and the HTTP API with the right, a wrong and no key.
//!
//! `nats-server` and `redis-server` must be on PATH (`.ci/run` installs them).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt as _;
use jsonwebtoken::{EncodingKey, Header};
use roomcast_tests::services::{NatsServer, RedisServer, start_nodes, wait_readyz};
use roomcast_tests::{
    Enc, NodeOptions, NodeProc, TestClient, Value, assert_error, eventually, json, json_to_mp, limit_trips,
    mp_to_json, unique, within,
};

const SECRET: &str = "roomcast-tests-hmac-secret-of-at-least-32-bytes";
const API_KEY: &str = "backend-api-key-for-the-tests";

/// Anonymous connections allowed (most tests), tokens for the user-addressed ones.
const CONFIG: &str = r#"
heartbeat_ms = 250
node_timeout_ms = 2000
allow_anonymous = true

[api]
rpc_timeout_ms = 1000

[namespaces.nohist]
history_size = 0
presence = false
join_leave = false

[namespaces.feed]
publish = "none"

[limits]
commands_per_second = 0
connection_rate_per_ip = 0
"#;

/// Three nodes on NATS (broker, presence and API), with the HTTP API key.
fn nats_cluster() -> (NatsServer, Vec<NodeProc>) {
    let nats = NatsServer::start();
    let nodes = start_nodes(
        3,
        CONFIG,
        &nats.url(),
        &[("ROOMCAST_JWT_HMAC_SECRET", SECRET), ("ROOMCAST_API_KEY", API_KEY)],
    );
    (nats, nodes)
}

fn room(what: &str) -> String {
    format!("{what}-{}", unique())
}

fn token(user: &str) -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let claims = json!({"sub": user, "exp": now + 3600, "iat": now});
    jsonwebtoken::encode(&Header::default(), &claims, &EncodingKey::from_secret(SECRET.as_bytes())).unwrap()
}

/// A connection of `user` (anonymous for "").
async fn connect_as(url: &str, enc: Enc, user: &str) -> TestClient {
    let mut c = TestClient::open(url, enc).await;
    let mut cmd = json!({"type": "connect"});
    if !user.is_empty() {
        cmd["token"] = json!(token(user));
    }
    let r = c.request(cmd).await;
    assert_eq!(r["type"], "connected", "{r}");
    c.client_id = r["client"].as_str().unwrap().to_string();
    c
}

async fn subscribe(c: &mut TestClient, room: &str) -> Value {
    let r = c.request(json!({"type": "subscribe", "room": room})).await;
    assert_eq!(r["type"], "subscribed", "{r}");
    r
}

// ------------------------------------------------------------------------------ backends

/// A backend on NATS.
struct Backend {
    nats: async_nats::Client,
}

impl Backend {
    async fn connect(url: &str) -> Backend {
        Backend { nats: async_nats::connect(url).await.expect("connecting to nats-server") }
    }

    /// Calls `method` with `body` in `enc`; the reply envelope (as JSON).
    async fn call(&self, enc: Enc, method: &str, body: Value) -> Value {
        let subject = format!("roomcast.api.{method}");
        let reply = match enc {
            Enc::Json | Enc::NoSubprotocol => within(
                Duration::from_secs(5),
                "an API reply",
                self.nats.request(subject, body.to_string().into()),
            )
            .await
            .unwrap(),
            Enc::Msgpack => {
                let mut bytes = Vec::new();
                rmpv::encode::write_value(&mut bytes, &json_to_mp(&body)).unwrap();
                let mut h = async_nats::HeaderMap::new();
                h.insert("content-type", "application/msgpack");
                let r = within(
                    Duration::from_secs(5),
                    "an API reply",
                    self.nats.request_with_headers(subject, h, bytes.into()),
                )
                .await
                .unwrap();
                let ct =
                    r.headers.as_ref().and_then(|h| h.get("content-type")).map(|v| v.as_str().to_string());
                assert_eq!(ct.as_deref(), Some("application/msgpack"), "a MessagePack reply is marked");
                return mp_to_json(
                    rmpv::decode::read_value(&mut &r.payload[..]).expect("a MessagePack reply"),
                );
            }
        };
        serde_json::from_slice(&reply.payload).expect("a JSON reply")
    }

    /// Calls and returns `result`, failing on `error`.
    async fn ok(&self, enc: Enc, method: &str, body: Value) -> Value {
        let r = self.call(enc, method, body.clone()).await;
        assert!(r.get("error").is_none(), "{method} {body} in {enc:?}: {r}");
        r["result"].clone()
    }

    /// Calls and asserts `{error: {code}}`.
    async fn err(&self, enc: Enc, method: &str, body: Value, code: u64) -> Value {
        let r = self.call(enc, method, body.clone()).await;
        assert_eq!(r["error"]["code"], code, "{method} {body} in {enc:?}: {r}");
        assert!(r["error"]["message"].is_string(), "{r}");
        r
    }
}

/// `POST /api/<method>` on `addr` with `auth` as the Authorization header; (status, body).
async fn http_post(addr: SocketAddr, method: &str, auth: Option<&str>, body: &[u8]) -> (u16, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!(
        "POST /api/{method} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(a) = auth {
        req.push_str(&format!("Authorization: {a}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    // The node may answer (413) and close before taking a body over its limit.
    let _ = s.write_all(body).await;
    let mut out = Vec::new();
    // A reset after the answer (unread body bytes) still leaves the answer read.
    let _ = within(Duration::from_secs(5), "an HTTP answer", s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out).to_string();
    let status: u16 = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).expect("a status line");
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    let value = serde_json::from_str(body).unwrap_or_else(|_| json!({"raw": body}));
    (status, value)
}

/// Reads `c` until a publication in `room`; other messages are skipped.
async fn next_publication(c: &mut TestClient, room: &str) -> Value {
    c.recv_until(|m| m["type"] == "publication" && m["room"] == room).await
}

/// Asserts that `c` receives no publication in `room` before the marker publication
/// `{"marker": true}` (published by the caller after the things that must not arrive).
async fn nothing_before_marker(c: &mut TestClient, room: &str) {
    let p = next_publication(c, room).await;
    assert_eq!(p["data"], json!({"marker": true}), "an unexpected publication: {p}");
}

// ------------------------------------------------------------------------------ tests

/// Every method in both encodings, with Redis as the broker (history, presence) and NATS
/// for the API only (`ROOMCAST_API_NATS_URL`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_method_in_both_encodings() {
    let nats = NatsServer::start();
    let redis = RedisServer::start();
    let nodes = start_nodes(
        3,
        CONFIG,
        &redis.url(),
        &[("ROOMCAST_API_NATS_URL", &nats.url()), ("ROOMCAST_JWT_HMAC_SECRET", SECRET)],
    );
    wait_readyz(&nodes, 200, Duration::from_secs(10)).await;
    let b = Backend::connect(&nats.url()).await;
    for enc in Enc::BOTH {
        let r = room(&format!("all-{enc:?}"));
        let r2 = room(&format!("all2-{enc:?}"));
        let feed = format!("feed:{}", room("news"));
        // A subscriber per node, each in its own encoding.
        let mut subs = Vec::new();
        for (i, n) in nodes.iter().enumerate() {
            let mut c = TestClient::connected(&n.ws_url(), Enc::BOTH[i % 2]).await;
            for x in [&r, &r2, &feed] {
                subscribe(&mut c, x).await;
            }
            subs.push(c);
        }

        // publish: a position in a room with history; backends publish where clients may not.
        let res = b.ok(enc, "publish", json!({"room": r, "data": {"n": 1, "bin": "x"}})).await;
        assert_eq!(res["offset"], 1, "{res}");
        let epoch = res["epoch"].as_str().expect("an epoch").to_string();
        let res = b.ok(enc, "publish", json!({"room": feed, "data": "from the backend"})).await;
        assert_eq!(res["offset"], 1, "{res}");
        for s in &mut subs {
            let p = next_publication(s, &r).await;
            assert_eq!(
                (p["offset"].clone(), p["data"].clone()),
                (json!(1), json!({"n": 1, "bin": "x"})),
                "{p}"
            );
            assert!(p.get("info").is_none(), "a backend publication has no publisher info: {p}");
            let p = next_publication(s, &feed).await;
            assert_eq!(p["data"], "from the backend");
        }

        // broadcast: one publication per room.
        let res = b.ok(enc, "broadcast", json!({"rooms": [r, r2], "data": {"all": true}})).await;
        assert_eq!(res["results"][0]["offset"], 2, "{res}");
        assert_eq!(res["results"][1]["offset"], 1, "{res}");
        for s in &mut subs {
            assert_eq!(next_publication(s, &r).await["data"], json!({"all": true}));
            assert_eq!(next_publication(s, &r2).await["data"], json!({"all": true}));
        }

        // presence and presence_stats: the three subscribers, cluster-wide.
        let res = b.ok(enc, "presence", json!({"room": r})).await;
        let clients: BTreeSet<String> = res["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["client"].as_str().unwrap().to_string())
            .collect();
        let expected: BTreeSet<String> = subs.iter().map(|s| s.client_id.clone()).collect();
        assert_eq!(clients, expected, "{res}");
        let res = b.ok(enc, "presence_stats", json!({"room": r})).await;
        assert_eq!((res["clients"].clone(), res["users"].clone()), (json!(3), json!(1)), "{res}");

        // history: oldest first, newest first, since, limit 0.
        let res = b.ok(enc, "history", json!({"room": r})).await;
        assert_eq!((res["offset"].clone(), res["epoch"].clone()), (json!(2), json!(epoch)), "{res}");
        let offsets: Vec<u64> =
            res["publications"].as_array().unwrap().iter().map(|p| p["offset"].as_u64().unwrap()).collect();
        assert_eq!(offsets, [1, 2]);
        assert_eq!(res["publications"][0]["data"], json!({"n": 1, "bin": "x"}));
        assert_eq!(res["publications"][0]["room"], r.as_str());
        let res = b.ok(enc, "history", json!({"room": r, "reverse": true, "limit": 1})).await;
        assert_eq!(res["publications"][0]["offset"], 2, "{res}");
        let res = b.ok(enc, "history", json!({"room": r, "since": {"offset": 1, "epoch": epoch}})).await;
        assert_eq!(res["publications"].as_array().unwrap().len(), 1, "{res}");
        let res = b.ok(enc, "history", json!({"room": r, "limit": 0})).await;
        assert_eq!(res["publications"], json!([]), "{res}");
        b.err(enc, "history", json!({"room": r, "since": {"offset": 1, "epoch": "other"}}), 112).await;

        // history_remove: the next publication starts a new epoch.
        b.ok(enc, "history_remove", json!({"room": r})).await;
        let res = b.ok(enc, "history", json!({"room": r})).await;
        assert_eq!(res["publications"], json!([]), "{res}");
        let res = b.ok(enc, "publish", json!({"room": r, "data": "after"})).await;
        assert_eq!(res["offset"], 1, "{res}");
        assert_ne!(res["epoch"], json!(epoch), "{res}");

        // info: the three live nodes, with their counts (as of their last heartbeat).
        let want: BTreeSet<String> = nodes.iter().map(|n| n.node_id.clone()).collect();
        eventually(Duration::from_secs(5), "info to list the three nodes with their counts", || async {
            let res = b.ok(enc, "info", json!({})).await;
            let list = res["nodes"].as_array()?;
            let ids: BTreeSet<String> =
                list.iter().filter_map(|n| Some(n["id"].as_str()?.to_string())).collect();
            let counted = list.iter().all(|n| {
                n["connections"].as_u64().is_some_and(|c| c >= 1)
                    && n["rooms"].as_u64().is_some_and(|r| r >= 3)
            });
            (ids == want && counted).then_some(())
        })
        .await;

        // send, disconnect, unsubscribe are accepted (their effect: user_addressed_* below).
        b.ok(enc, "send", json!({"user": "nobody", "data": 1})).await;
        b.ok(enc, "unsubscribe", json!({"user": "nobody", "room": r})).await;
        b.ok(enc, "disconnect", json!({"user": "nobody"})).await;

        // Errors.
        b.err(enc, "frobnicate", json!({}), 104).await;
        b.err(enc, "publish", json!({"room": r}), 107).await;
        b.err(enc, "publish", json!({"room": 5, "data": 1}), 107).await;
        b.err(enc, "publish", json!({"room": "bad room", "data": 1}), 107).await;
        b.err(enc, "publish", json!({"room": "nope:x", "data": 1}), 102).await;
        b.err(enc, "publish", json!({"room": r, "data": "x".repeat(70_000)}), 106).await;
        b.err(enc, "publish", json!({"room": r, "data": 1, "idempotency_key": ""}), 107).await;
        b.err(enc, "broadcast", json!({"rooms": [], "data": 1}), 107).await;
        b.err(enc, "broadcast", json!({"rooms": [r, "nope:x"], "data": 1}), 102).await;
        b.err(enc, "send", json!({"user": "", "data": 1}), 107).await;
        b.err(enc, "disconnect", json!({"user": "u", "code": 1000}), 107).await;
        b.err(enc, "disconnect", json!({"user": "u", "reason": "r".repeat(124)}), 107).await;
        b.err(enc, "presence", json!({"room": "nohist:x"}), 108).await;
        b.err(enc, "history", json!({"room": "nohist:x"}), 108).await;
        b.err(enc, "history_remove", json!({}), 107).await;
    }
    // Control messages through the Redis broker: `send` and `disconnect` reach a user's
    // connections on every node.
    let user = format!("dave-{}", unique());
    let mut daves = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        daves.push(connect_as(&n.ws_url(), Enc::BOTH[i % 2], &user).await);
    }
    for enc in Enc::BOTH {
        b.ok(enc, "send", json!({"user": user, "data": {"via": "redis"}})).await;
        for d in &mut daves {
            assert_eq!(d.recv_type("message").await["data"], json!({"via": "redis"}));
        }
    }
    b.ok(Enc::Msgpack, "disconnect", json!({"user": user})).await;
    for d in &mut daves {
        assert_eq!(d.expect_close().await.0, 4009);
    }
    // A body that is not a map, over NATS: 107.
    let reply = b.nats.request("roomcast.api.publish", "[1,2]".into()).await.unwrap();
    let v: Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(v["error"]["code"], 107, "{v}");
    let reply = b.nats.request("roomcast.api.publish", "{not json".into()).await.unwrap();
    let v: Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(v["error"]["code"], 107, "{v}");
}

/// A request is answered once (one queue group), and a message without a reply subject
/// is carried out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fire_and_forget_and_one_answer_per_request() {
    let (nats, nodes) = nats_cluster();
    let b = Backend::connect(&nats.url()).await;
    let r = room("fire");
    let mut sub = TestClient::connected(&nodes[1].ws_url(), Enc::Msgpack).await;
    subscribe(&mut sub, &r).await;

    for k in 0..20 {
        b.nats
            .publish("roomcast.api.publish", json!({"room": r, "data": {"k": k}}).to_string().into())
            .await
            .unwrap();
    }
    b.nats.flush().await.unwrap();
    // Published concurrently by different nodes: every one arrives, in some order.
    let mut got = BTreeSet::new();
    for _ in 0..20 {
        got.insert(next_publication(&mut sub, &r).await["data"]["k"].as_u64().unwrap());
    }
    assert_eq!(got, (0..20).collect());

    // One answer per request: count the replies on an inbox of our own.
    let inbox = b.nats.new_inbox();
    let mut replies = b.nats.subscribe(inbox.clone()).await.unwrap();
    for _ in 0..10 {
        b.nats.publish_with_reply("roomcast.api.info", inbox.clone(), "{}".into()).await.unwrap();
    }
    b.nats.flush().await.unwrap();
    for i in 0..10 {
        within(Duration::from_secs(10), &format!("reply {i} of 10"), replies.next()).await.unwrap();
    }
    // A second answer to any of them would follow its first closely.
    let extra = tokio::time::timeout(Duration::from_millis(500), replies.next()).await;
    assert!(extra.is_err(), "a request was answered twice: {extra:?}");
    nothing_more(&mut sub, &r, &b).await;
}

/// A fire-and-forget burst beyond what a node buffers (`api.max_queued` beyond
/// `api.max_in_flight`) is dropped by the node's NATS client rather than held without
/// bound, counted at `/metrics`, and the node keeps serving requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_overload_is_bounded_and_counted() {
    const BURST: u64 = 3000;
    let nats = NatsServer::start();
    let node = NodeProc::start(
        NodeOptions::with_config("allow_anonymous = true\n[api]\nmax_in_flight = 1\nmax_queued = 8\n")
            .env("ROOMCAST_API_NATS_URL", nats.url()),
    );
    let b = Backend::connect(&nats.url()).await;
    assert_eq!(limit_trips(node.addr, "api_requests_dropped").await, 0);
    let r = room("burst");
    for k in 0..BURST {
        b.nats
            .publish("roomcast.api.publish", json!({"room": r, "data": {"k": k}}).to_string().into())
            .await
            .unwrap();
    }
    b.nats.flush().await.unwrap();
    let dropped = eventually(Duration::from_secs(10), "dropped API messages counted", || async {
        let n = limit_trips(node.addr, "api_requests_dropped").await;
        (n > 0).then_some(n)
    })
    .await;
    // Still served, once the burst has drained (a request arriving while the buffer is
    // still full is dropped too, like any message: retried, as a backend would); what was
    // published and what was counted as dropped add up to at most the burst (the count is
    // a lower bound).
    let body = json!({"room": r, "limit": 0}).to_string();
    let reply = eventually(Duration::from_secs(20), "an answer once the burst drained", || {
        let (nats, body) = (b.nats.clone(), body.clone());
        async move {
            let ask = nats.request("roomcast.api.history", body.into());
            tokio::time::timeout(Duration::from_secs(1), ask).await.ok()?.ok()
        }
    })
    .await;
    let reply: Value = serde_json::from_slice(&reply.payload).unwrap();
    let page = reply["result"].clone();
    let published = page["offset"].as_u64().unwrap_or_else(|| panic!("{page}"));
    assert!(published > 0 && published < BURST, "published {published} of {BURST}");
    assert!(published + dropped <= BURST, "published {published} + dropped {dropped} > {BURST}");
}

/// Publishes a marker and checks it is the next publication in `room`.
async fn nothing_more(sub: &mut TestClient, r: &str, b: &Backend) {
    b.ok(Enc::Json, "publish", json!({"room": r, "data": {"marker": true}})).await;
    nothing_before_marker(sub, r).await;
}

/// The same `idempotency_key`, retried (through whichever nodes the queue group picks),
/// publishes once and answers the first position every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_publish_publishes_once() {
    let (nats, nodes) = nats_cluster();
    let b = Backend::connect(&nats.url()).await;
    let r = room("idem");
    let mut subs = Vec::new();
    for n in &nodes {
        let mut c = TestClient::connected(&n.ws_url(), Enc::Json).await;
        subscribe(&mut c, &r).await;
        subs.push(c);
    }
    let mut positions = BTreeSet::new();
    for (i, enc) in Enc::BOTH.iter().cycle().take(6).enumerate() {
        let res = b
            .ok(*enc, "publish", json!({"room": r, "data": {"try": i}, "idempotency_key": "deploy-42"}))
            .await;
        positions.insert(res.to_string());
    }
    // Concurrent retries too.
    let retries = (0..6).map(|_| {
        b.call(Enc::Json, "publish", json!({"room": r, "data": {"try": "c"}, "idempotency_key": "deploy-42"}))
    });
    for res in futures_util::future::join_all(retries).await {
        positions.insert(res["result"].to_string());
    }
    assert_eq!(positions.len(), 1, "every retry answers the first position: {positions:?}");
    let first: Value = serde_json::from_str(positions.iter().next().unwrap()).unwrap();
    assert_eq!(first["offset"], 1, "{first}");
    // Another key publishes.
    let res = b
        .ok(
            Enc::Json,
            "publish",
            json!({"room": r, "data": {"try": "other"}, "idempotency_key": "deploy-43"}),
        )
        .await;
    assert_eq!(res["offset"], 2, "{res}");
    for s in &mut subs {
        let p = next_publication(s, &r).await;
        assert_eq!((p["offset"].clone(), p["data"].clone()), (json!(1), json!({"try": 0})), "{p}");
        let p = next_publication(s, &r).await;
        assert_eq!((p["offset"].clone(), p["data"].clone()), (json!(2), json!({"try": "other"})), "{p}");
    }
    let res = b.ok(Enc::Json, "history", json!({"room": r})).await;
    assert_eq!(res["publications"].as_array().unwrap().len(), 2, "one publication per key: {res}");
}

/// `send`, `unsubscribe` and `disconnect` reach the user's connections on every node (in
/// both encodings), and no one else's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_addressed_methods_reach_every_node() {
    let (nats, nodes) = nats_cluster();
    let b = Backend::connect(&nats.url()).await;
    let user = format!("alice-{}", unique());
    let r = room("unsub");
    let other_room = room("kept");
    let mut alice = Vec::new();
    let mut bob = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        for (j, enc) in Enc::BOTH.iter().enumerate() {
            let mut a = connect_as(&n.ws_url(), *enc, &user).await;
            subscribe(&mut a, &r).await;
            subscribe(&mut a, &other_room).await;
            alice.push(a);
            if j == i % 2 {
                let mut o = connect_as(&n.ws_url(), *enc, "bob").await;
                subscribe(&mut o, &r).await;
                bob.push(o);
            }
        }
    }
    let anon_mp = TestClient::connected(&nodes[0].ws_url(), Enc::Msgpack).await;

    // send: a `message` push to each of alice's six connections.
    for (i, enc) in Enc::BOTH.iter().enumerate() {
        b.ok(*enc, "send", json!({"user": user, "data": {"note": i}})).await;
        for a in &mut alice {
            let m = a.recv_type("message").await;
            assert_eq!(m["data"], json!({"note": i}), "{m}");
            assert!(m.get("id").is_none(), "{m}");
        }
    }

    // unsubscribe: alice's connections get an `unsubscribe` push and no more publications
    // in that room; bob keeps his subscription.
    b.ok(Enc::Msgpack, "unsubscribe", json!({"user": user, "room": r})).await;
    for a in &mut alice {
        let m = a.recv_type("unsubscribe").await;
        assert_eq!((m["room"].clone(), m["code"].clone()), (json!(r), json!(4009)), "{m}");
        assert!(m["reason"].is_string(), "{m}");
    }
    b.ok(Enc::Json, "publish", json!({"room": r, "data": "after unsubscribe"})).await;
    b.ok(Enc::Json, "publish", json!({"room": other_room, "data": {"marker": true}})).await;
    for a in &mut alice {
        let p = a.recv_type("publication").await;
        assert_eq!(p["room"], other_room.as_str(), "no publication in the room left: {p}");
        let pr = a.request(json!({"type": "unsubscribe", "room": r})).await;
        assert_eq!(pr["type"], "unsubscribed", "{pr}");
    }
    for o in &mut bob {
        assert_eq!(next_publication(o, &r).await["data"], "after unsubscribe");
    }
    // The room's presence no longer lists alice.
    let res = b.ok(Enc::Json, "presence_stats", json!({"room": r})).await;
    assert_eq!(res["clients"], bob.len(), "{res}");

    // disconnect one client: only that connection closes, with the given code and advice.
    let target = alice.remove(3);
    let target_id = target.client_id.clone();
    let mut target = target;
    b.ok(
        Enc::Json,
        "disconnect",
        json!({"user": user, "client": target_id, "code": 4321, "reason": "moved", "reconnect": true}),
    )
    .await;
    let (code, reason) = target.expect_close().await;
    assert_eq!((code, reason.as_str()), (4321, "moved"));
    assert_eq!(target.disconnect()["reconnect"], true);

    // disconnect the user: 4009 everywhere, reconnect false by default; bob stays.
    b.ok(Enc::Msgpack, "disconnect", json!({"user": user, "reason": "account suspended"})).await;
    for a in &mut alice {
        let (code, reason) = a.expect_close().await;
        assert_eq!((code, reason.as_str()), (4009, "account suspended"));
        assert_eq!(a.disconnect()["reconnect"], false);
    }
    for o in &mut bob {
        let r2 = o.request(json!({"type": "presence_stats", "room": r})).await;
        assert_eq!(r2["type"], "presence_stats", "bob is still connected: {r2}");
    }
    // Every node eventually counts only bob's and the anonymous connections.
    eventually(Duration::from_secs(5), "alice's connections gone from info", || async {
        let res = b.ok(Enc::Json, "info", json!({})).await;
        let total: u64 = res["nodes"].as_array()?.iter().filter_map(|n| n["connections"].as_u64()).sum();
        (total == bob.len() as u64 + 1).then_some(())
    })
    .await;
    drop(anon_mp);
}

/// Client `rpc`: answered by a NATS responder (which sees the client and user headers and
/// the body in the client's encoding); no responder or no answer in time: 114.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_with_and_without_a_responder() {
    let (nats, nodes) = nats_cluster();
    let responder = async_nats::connect(nats.url()).await.unwrap();
    let mut requests = responder.subscribe("roomcast.rpc.profile.get").await.unwrap();
    let _silent = responder.subscribe("roomcast.rpc.silent").await.unwrap();
    responder.flush().await.unwrap();
    let serve = {
        let responder = responder.clone();
        tokio::spawn(async move {
            while let Some(m) = requests.next().await {
                let h = m.headers.clone().unwrap_or_default();
                let header = |k: &str| h.get(k).map(|v| v.as_str().to_string()).unwrap_or_default();
                let msgpack = header("content-type") == "application/msgpack";
                let body: Value = if msgpack {
                    mp_to_json(rmpv::decode::read_value(&mut &m.payload[..]).unwrap())
                } else {
                    serde_json::from_slice(&m.payload).unwrap()
                };
                let answer = json!({"client": header("roomcast-client"), "user": header("roomcast-user"),
                                    "asked": body, "msgpack": msgpack});
                // Answer in JSON either way: the node transcodes for MessagePack clients.
                responder.publish(m.reply.unwrap(), answer.to_string().into()).await.unwrap();
            }
        })
    };
    let user = format!("carol-{}", unique());
    for (i, n) in nodes.iter().enumerate() {
        for enc in Enc::BOTH {
            let mut c = connect_as(&n.ws_url(), enc, if i == 0 { "" } else { &user }).await;
            let r = c.request(json!({"type": "rpc", "method": "profile.get", "data": {"who": "bob"}})).await;
            assert_eq!(r["type"], "rpc", "{r}");
            let expected_user = if i == 0 { "" } else { user.as_str() };
            assert_eq!(
                r["data"],
                json!({"client": c.client_id, "user": expected_user, "asked": {"who": "bob"}, "msgpack": enc == Enc::Msgpack}),
                "{r}"
            );
            // Several in flight at once, each answered under its id.
            let ids: Vec<u64> = (0..5).map(|_| c.next_id()).collect();
            let batch: Vec<Value> = ids
                .iter()
                .map(|id| json!({"type": "rpc", "id": id, "method": "profile.get", "data": id}))
                .collect();
            c.send_batch(&batch).await;
            for id in &ids {
                let r = c.wait_reply(&json!(id)).await;
                assert_eq!(r["data"]["asked"], json!(id), "{r}");
            }
            // No responder: 114 right away; a responder that never answers: 114 after the timeout.
            let r = c.request(json!({"type": "rpc", "method": "nobody.home", "data": 1})).await;
            assert_error(&r, 114);
            assert_eq!(r["temporary"], true, "{r}");
            let r = c.request(json!({"type": "rpc", "method": "silent", "data": 1})).await;
            assert_error(&r, 114);
            let r = c.request(json!({"type": "rpc", "method": "bad method", "data": 1})).await;
            assert_error(&r, 107);
        }
    }
    serve.abort();
}

/// More than 16 rpc calls in flight on one connection: the 17th gets 106, and the
/// connection keeps working meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_in_flight_bound() {
    let (nats, nodes) = nats_cluster();
    let responder = async_nats::connect(nats.url()).await.unwrap();
    let _silent = responder.subscribe("roomcast.rpc.slow").await.unwrap();
    responder.flush().await.unwrap();
    let mut c = TestClient::connected(&nodes[0].ws_url(), Enc::Json).await;
    let ids: Vec<u64> = (0..17).map(|_| c.next_id()).collect();
    let batch: Vec<Value> =
        ids.iter().map(|id| json!({"type": "rpc", "id": id, "method": "slow", "data": null})).collect();
    c.send_batch(&batch).await;
    let over = c.wait_reply(&json!(ids[16])).await;
    assert_error(&over, 106);
    // Not blocked by the calls waiting for their backend.
    let r = c.request(json!({"type": "presence_stats", "room": "x"})).await;
    assert_eq!(r["type"], "presence_stats", "{r}");
    for id in &ids[..16] {
        assert_error(&c.wait_reply(&json!(id)).await, 114);
    }
}

/// The HTTP API: the right key works; a wrong or missing key gets 401 and nothing
/// happens; an unknown method 404; an undecodable body 400; a node without a key 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_api_with_right_wrong_and_missing_keys() {
    let (nats, nodes) = nats_cluster();
    let b = Backend::connect(&nats.url()).await;
    let r = room("http");
    let mut sub = TestClient::connected(&nodes[2].ws_url(), Enc::Json).await;
    subscribe(&mut sub, &r).await;
    let key = format!("apikey {API_KEY}");
    let body = json!({"room": r, "data": {"via": "http"}}).to_string();

    let (status, v) = http_post(nodes[0].addr, "publish", Some(&key), body.as_bytes()).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["result"]["offset"], 1, "{v}");
    assert_eq!(next_publication(&mut sub, &r).await["data"], json!({"via": "http"}));

    let bearer = format!("Bearer {API_KEY}");
    for auth in [None, Some("apikey wrong-key-wrong-key-wrong"), Some(bearer.as_str()), Some("apikey")] {
        let (status, v) = http_post(nodes[1].addr, "publish", auth, body.as_bytes()).await;
        assert_eq!(status, 401, "{auth:?}: {v}");
        assert_eq!(v["error"]["code"], 101, "{v}");
        let (status, _) = http_post(nodes[1].addr, "disconnect", auth, br#"{"user":"x"}"#).await;
        assert_eq!(status, 401);
    }
    // Nothing was published by those.
    let res = b.ok(Enc::Json, "history", json!({"room": r, "limit": 0})).await;
    assert_eq!(res["offset"], 1, "refused calls published nothing: {res}");
    nothing_more(&mut sub, &r, &b).await;

    let (status, v) = http_post(nodes[0].addr, "frobnicate", Some(&key), b"{}").await;
    assert_eq!((status, v["error"]["code"].clone()), (404, json!(104)), "{v}");
    for bad in [&b"[1,2]"[..], b"{nope", b"\"text\""] {
        let (status, v) = http_post(nodes[0].addr, "publish", Some(&key), bad).await;
        assert_eq!(status, 400, "{v}");
    }
    // A well-formed body with a bad field: 200 with error 107.
    let (status, v) =
        http_post(nodes[0].addr, "publish", Some(&key), br#"{"room":"bad room","data":1}"#).await;
    assert_eq!((status, v["error"]["code"].clone()), (200, json!(107)), "{v}");
    let big = json!({"room": r, "data": "x".repeat(200_000)}).to_string();
    let (status, v) = http_post(nodes[0].addr, "publish", Some(&key), big.as_bytes()).await;
    assert_eq!((status, v["error"]["code"].clone()), (413, json!(106)), "{v}");
    let (status, v) = http_post(nodes[0].addr, "info", Some(&key), b"").await;
    assert_eq!(status, 200, "{v}");
    assert!(v["result"]["nodes"].is_array(), "{v}");

    // A node without a key: the HTTP API is off.
    let plain = start_nodes(1, CONFIG, "memory", &[("ROOMCAST_API_KEY", "")]);
    let (status, _) = http_post(plain[0].addr, "publish", Some(&key), body.as_bytes()).await;
    assert_eq!(status, 404);
}
