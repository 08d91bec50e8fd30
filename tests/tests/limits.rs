//! Abuse limits against a real node: connection flood from one address (HTTP 429),
//! connections over the node's limit (HTTP 503), command flood (error 111, then close
//! 4007), connections per user (close 4010), and `X-Forwarded-For` believed only from
//! trusted proxies. Other clients keep being served throughout.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use roomcast_tests::{
    Enc, NodeOptions, NodeProc, RECV_TIMEOUT, TestClient, assert_error, eventually, http_get, json, within,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const SECRET: &str = "roomcast-tests-hmac-secret-of-at-least-32-bytes";

fn token(sub: &str) -> String {
    let exp = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() + 600;
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": sub, "exp": exp}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// An upgrade request to `addr` from local address `src`, with extra headers. Returns
/// the status and, when upgraded (101), the open stream (dropping it closes it).
async fn upgrade_from(
    src: IpAddr,
    addr: SocketAddr,
    headers: &[(&str, &str)],
) -> (u16, String, Option<TcpStream>) {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(src, 0)).unwrap();
    let mut stream = within(RECV_TIMEOUT, "TCP connect", socket.connect(addr)).await.unwrap();
    let mut req = format!(
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let mut b = [0u8; 1024];
        let n = within(RECV_TIMEOUT, "the HTTP response", stream.read(&mut b)).await.unwrap();
        assert!(n > 0, "closed before the response: {:?}", String::from_utf8_lossy(&head));
        head.extend_from_slice(&b[..n]);
    }
    let text = String::from_utf8_lossy(&head).to_string();
    let status: u16 = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap();
    (status, text.to_ascii_lowercase(), (status == 101).then_some(stream))
}

/// A WebSocket from local address `src` that sends `connect` and a command and checks
/// the replies (the node serves that client).
async fn assert_served_from(src: IpAddr, addr: SocketAddr) {
    use futures_util::{SinkExt, StreamExt};
    use roomcast_tests::Message;
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(src, 0)).unwrap();
    let stream = within(RECV_TIMEOUT, "TCP connect", socket.connect(addr)).await.unwrap();
    let (mut ws, _) = within(
        RECV_TIMEOUT,
        "the handshake",
        tokio_tungstenite::client_async(format!("ws://{addr}/ws"), stream),
    )
    .await
    .unwrap();
    ws.send(Message::Text(r#"{"type":"connect","id":1}"#.into())).await.unwrap();
    ws.send(Message::Text(r#"{"type":"presence_stats","id":2,"room":"x"}"#.into())).await.unwrap();
    let mut types = Vec::new();
    while types.len() < 2 {
        let m = within(RECV_TIMEOUT, "a reply", ws.next()).await.unwrap().unwrap();
        if let Message::Text(t) = m {
            for line in t.as_str().lines() {
                let v: serde_json::Value = serde_json::from_str(line).unwrap();
                types.push(v["type"].as_str().unwrap().to_string());
            }
        }
    }
    assert_eq!(types, vec!["connected", "presence_stats"]);
}

fn localhost() -> IpAddr {
    "127.0.0.1".parse().unwrap()
}

/// Another loopback address (a different client as far as the node can tell).
fn other_local() -> IpAddr {
    "127.0.0.2".parse().unwrap()
}

#[tokio::test]
async fn connection_flood_from_one_address_gets_429() {
    let node = NodeProc::start(NodeOptions::with_config(
        "[limits]\nexempt_loopback = false\nconnection_rate_per_ip = 0.01\nconnection_burst_per_ip = 5\n",
    ));
    let mut open = Vec::new();
    for i in 0..5 {
        let (status, _, s) = upgrade_from(localhost(), node.addr, &[]).await;
        assert_eq!(status, 101, "connection {i} is within the burst");
        open.push(s);
    }
    for _ in 0..3 {
        let (status, head, _) = upgrade_from(localhost(), node.addr, &[]).await;
        assert_eq!(status, 429, "{head}");
        assert!(head.contains("retry-after:"), "{head}");
    }
    // Another address is not affected, and connections already open work.
    let (status, _, _) = upgrade_from(other_local(), node.addr, &[]).await;
    assert_eq!(status, 101);
    assert_served_from(other_local(), node.addr).await;
    drop(open);
    // Each refusal is counted, and `/metrics` exports the counter.
    let metrics = http_get(node.addr, "/metrics").await;
    assert!(metrics.contains("# TYPE roomcast_limit_trips_total counter"), "{metrics}");
    assert!(
        metrics.lines().any(|l| l == "roomcast_limit_trips_total{limit=\"connections_rate_limited\"} 3"),
        "{metrics}"
    );
    assert!(metrics.lines().any(|l| l == "roomcast_ready 1"), "{metrics}");
}

#[tokio::test]
async fn connections_over_the_node_limit_get_503() {
    let node = NodeProc::start(NodeOptions::with_config("[limits]\nmax_connections = 3\n"));
    let url = node.ws_url();
    let a = TestClient::connected(&url, Enc::Json).await;
    let mut b = TestClient::connected(&url, Enc::Msgpack).await;
    let _c = TestClient::connected(&url, Enc::Json).await;
    let (status, head, _) = upgrade_from(localhost(), node.addr, &[]).await;
    assert_eq!(status, 503, "{head}");
    assert!(TestClient::try_open(&url, Enc::Json).await.is_err());
    // Open connections are served; a closed one frees its slot.
    assert_eq!(b.request(json!({"type": "presence_stats", "room": "x"})).await["type"], "presence_stats");
    a.close().await;
    let addr = node.addr;
    let mut s = eventually(Duration::from_secs(5), "a slot is freed", || async move {
        let (status, _, s) = upgrade_from(localhost(), addr, &[]).await;
        (status == 101).then_some(s)
    })
    .await;
    drop(s.take());
}

#[tokio::test]
async fn command_flood_gets_111_then_4007() {
    let node = NodeProc::start(NodeOptions::with_config(
        "[limits]\nexempt_loopback = false\ncommands_per_second = 5\ncommand_burst = 10\ncommand_violations_to_close = 5\n",
    ));
    let url = node.ws_url();
    for enc in Enc::BOTH {
        let mut bystander = TestClient::connected(&url, enc).await;
        // Over the burst once: a few 111s (temporary), and the connection stays.
        let mut c = TestClient::connected(&url, enc).await; // connect took one token
        let ids: Vec<u64> = (0..11).map(|_| c.next_id()).collect();
        let batch: Vec<_> =
            ids.iter().map(|id| json!({"type": "presence_stats", "id": id, "room": "flood"})).collect();
        c.send_batch(&batch).await;
        let mut limited = 0;
        for id in &ids {
            let r = c.wait_reply(&json!(id)).await;
            if r["type"] == "error" {
                assert_error(&r, 111);
                assert_eq!(r["temporary"], true, "{r}");
                limited += 1;
            }
        }
        assert!((1..=2).contains(&limited), "burst 10, one used by connect: {limited} limited");
        // After a pause at 5/s the connection may send again (a fixed wait: the limit is
        // about time).
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(c.request(json!({"type": "presence_stats", "room": "x"})).await["type"], "presence_stats");

        // A flood that persists: 111s, then close 4007 (reconnect after backoff).
        let batch: Vec<_> =
            (0..40).map(|_| json!({"type": "presence_stats", "id": c.next_id(), "room": "flood"})).collect();
        c.send_batch(&batch).await;
        let (code, _) = c.expect_close().await;
        assert_eq!(code, 4007);
        assert_eq!(c.disconnect()["reconnect"], true);
        // The bystander is served.
        assert_eq!(
            bystander.request(json!({"type": "presence_stats", "room": "x"})).await["type"],
            "presence_stats"
        );
    }
}

#[tokio::test]
async fn per_user_connection_limit_closes_4010() {
    let node = NodeProc::start(
        NodeOptions::with_config("allow_anonymous = true\n[limits]\nmax_connections_per_user = 2\n")
            .env("ROOMCAST_JWT_HMAC_SECRET", SECRET),
    );
    let url = node.ws_url();
    let connect = |enc: Enc, sub: &'static str| {
        let url = url.clone();
        async move {
            let mut c = TestClient::open(&url, enc).await;
            let r = c.request(json!({"type": "connect", "token": token(sub)})).await;
            (c, r)
        }
    };
    let (a1, r) = connect(Enc::Json, "alice").await;
    assert_eq!(r["type"], "connected", "{r}");
    let (_a2, r) = connect(Enc::Msgpack, "alice").await;
    assert_eq!(r["type"], "connected", "{r}");
    for enc in Enc::BOTH {
        let mut a3 = TestClient::open(&url, enc).await;
        a3.send(json!({"type": "connect", "id": 1, "token": token("alice")})).await;
        let (code, _) = a3.expect_close().await;
        assert_eq!(code, 4010);
        assert_eq!(a3.disconnect()["reconnect"], true);
    }
    // Other users, and anonymous connections, are not affected.
    let (_b, r) = connect(Enc::Json, "bob").await;
    assert_eq!(r["type"], "connected", "{r}");
    let mut anon = Vec::new();
    for _ in 0..3 {
        anon.push(TestClient::connected(&url, Enc::Json).await);
    }
    // A closed connection frees its place.
    a1.close().await;
    let url2 = url.clone();
    eventually(Duration::from_secs(5), "alice may connect again", || {
        let url = url2.clone();
        async move {
            let mut c = TestClient::open(&url, Enc::Json).await;
            c.send(json!({"type": "connect", "id": 1, "token": token("alice")})).await;
            let m = c.recv_within(Duration::from_secs(2)).await?;
            (m["type"] == "connected").then_some(())
        }
    })
    .await;
}

#[tokio::test]
async fn x_forwarded_for_only_from_trusted_proxies() {
    let node = NodeProc::start(NodeOptions::with_config(
        "trusted_proxies = [\"127.0.0.1/32\"]\n[limits]\nexempt_loopback = false\nconnection_rate_per_ip = 0.01\nconnection_burst_per_ip = 2\n",
    ));
    let addr = node.addr;
    // From the trusted proxy (127.0.0.1): the header names the client.
    let xff = |v: &'static str| [("X-Forwarded-For", v)];
    let mut keep = Vec::new();
    for _ in 0..2 {
        let (status, _, s) = upgrade_from(localhost(), addr, &xff("203.0.113.1")).await;
        assert_eq!(status, 101);
        keep.push(s);
    }
    assert_eq!(upgrade_from(localhost(), addr, &xff("203.0.113.1")).await.0, 429);
    // A spoofed entry on the left does not help: the proxy appended the real address.
    assert_eq!(upgrade_from(localhost(), addr, &xff("198.51.100.7, 203.0.113.1")).await.0, 429);
    // Another client behind the same proxy has its own budget; so has the proxy itself.
    assert_eq!(upgrade_from(localhost(), addr, &xff("203.0.113.2")).await.0, 101);
    assert_eq!(upgrade_from(localhost(), addr, &[]).await.0, 101);
    // From an untrusted peer (127.0.0.2) the header is ignored: changing it every time
    // does not escape the limit.
    let mut statuses = Vec::new();
    for i in 0..4 {
        let spoof = format!("192.0.2.{i}");
        statuses.push(upgrade_from(other_local(), addr, &[("X-Forwarded-For", spoof.as_str())]).await.0);
    }
    assert_eq!(statuses, vec![101, 101, 429, 429]);
    // RFC 7239 `Forwarded` is not read when the node is set to X-Forwarded-For.
    assert_eq!(
        upgrade_from(
            localhost(),
            addr,
            &[("Forwarded", "for=192.0.2.99"), ("X-Forwarded-For", "203.0.113.1")]
        )
        .await
        .0,
        429
    );
    drop(keep);
    // The node serves a normal client from an address with budget left.
    assert_served_from("127.0.0.3".parse().unwrap(), addr).await;
}

#[tokio::test]
async fn forwarded_header_when_configured() {
    let node = NodeProc::start(NodeOptions::with_config(
        "trusted_proxies = [\"127.0.0.0/8\"]\nforwarded_header = \"forwarded\"\n[limits]\nexempt_loopback = false\nconnection_rate_per_ip = 0.01\nconnection_burst_per_ip = 1\n",
    ));
    let addr = node.addr;
    let fwd = |v: &'static str| [("Forwarded", v)];
    assert_eq!(upgrade_from(localhost(), addr, &fwd("for=203.0.113.5;proto=https")).await.0, 101);
    assert_eq!(upgrade_from(other_local(), addr, &fwd("for=203.0.113.5")).await.0, 429);
    assert_eq!(upgrade_from(localhost(), addr, &fwd("for=\"[2001:db8::1]:4711\"")).await.0, 101);
    // The same IPv6 /64 shares a budget.
    assert_eq!(upgrade_from(localhost(), addr, &fwd("for=\"[2001:db8::2]\"")).await.0, 429);
    // X-Forwarded-For is not read in this mode: the proxy's own address counts.
    assert_eq!(upgrade_from(localhost(), addr, &[("X-Forwarded-For", "203.0.113.77")]).await.0, 101);
    assert_eq!(upgrade_from(localhost(), addr, &[("X-Forwarded-For", "203.0.113.78")]).await.0, 429);
}

#[tokio::test]
async fn limits_refuse_with_error_codes_not_closes_for_data_and_subscriptions() {
    // The limits that existed before (106 for subscriptions and data) keep working.
    let node = NodeProc::start(NodeOptions::with_config(
        "max_subscriptions = 2\nmax_data_size = 16\nmax_message_size = 4096\nmax_queue_bytes = 1048576\n",
    ));
    let mut c = TestClient::connected(&node.ws_url(), Enc::Json).await;
    for r in ["a", "b"] {
        assert_eq!(c.request(json!({"type": "subscribe", "room": r})).await["type"], "subscribed");
    }
    assert_error(&c.request(json!({"type": "subscribe", "room": "c"})).await, 106);
    assert_error(&c.request(json!({"type": "publish", "room": "a", "data": "x".repeat(64)})).await, 106);
    assert_eq!(c.request(json!({"type": "publish", "room": "a", "data": 1})).await["type"], "published");
}

#[tokio::test]
async fn loopback_clients_are_exempt_by_default() {
    // Local tools and load generators are not rate limited (exempt_loopback = true);
    // a remote client behind a trusted proxy on loopback still is.
    let node = NodeProc::start(NodeOptions::with_config(
        "trusted_proxies = [\"127.0.0.1/32\"]\n[limits]\nconnection_rate_per_ip = 0.01\nconnection_burst_per_ip = 1\n\
         commands_per_second = 1\ncommand_burst = 1\n",
    ));
    for _ in 0..5 {
        assert_eq!(upgrade_from(localhost(), node.addr, &[]).await.0, 101);
    }
    let mut c = TestClient::connected(&node.ws_url(), Enc::Json).await;
    for _ in 0..20 {
        assert_eq!(c.request(json!({"type": "presence_stats", "room": "x"})).await["type"], "presence_stats");
    }
    let xff = [("X-Forwarded-For", "203.0.113.9")];
    assert_eq!(upgrade_from(localhost(), node.addr, &xff).await.0, 101);
    assert_eq!(upgrade_from(localhost(), node.addr, &xff).await.0, 429);
}
