//! Harness for the integration tests that run real `roomcast` processes and talk to them
//! with real WebSocket clients.
//!
//! - [`NodeProc`]: a node process on `127.0.0.1:0` with its own TOML config and env.
//! - [`TestClient`]: a WebSocket client on tokio-tungstenite that works in
//!   `serde_json::Value`, independent of the project's protocol crate (conformance style),
//!   in JSON or MessagePack.
//! - [`TcpProxy`]: a TCP proxy between a client and a node, to cut connections.
//! - [`raw`]: a hand-rolled WebSocket client for what tungstenite does not expose (RSV1,
//!   raw HTTP answers).
//! - [`services`]: real `redis-server` (standalone or a 3-master Redis Cluster) and
//!   `nats-server` processes for the cluster tests, and nodes sharing them.
//!
//! Nothing here waits with a fixed sleep: every wait is on a condition with a deadline.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod client;
mod node;
mod proxy;
pub mod raw;
pub mod services;

use std::future::Future;
use std::time::Duration;

pub use client::{Enc, TestClient, json_to_mp, mp_to_json};
pub use node::{NodeOptions, NodeProc, roomcast_bin};
pub use proxy::TcpProxy;
pub use serde_json::{Value, json};
pub use tokio_tungstenite::tungstenite::Message;

/// A binary WebSocket message with these bytes.
pub fn raw_binary(bytes: Vec<u8>) -> Message {
    Message::Binary(bytes.into())
}

/// A text WebSocket message.
pub fn raw_text(text: &str) -> Message {
    Message::Text(text.to_string().into())
}

/// How long one expected message may take to arrive.
pub const RECV_TIMEOUT: Duration = Duration::from_secs(5);

/// The configuration most behaviour tests run with (see the namespaces' names).
pub const TEST_CONFIG: &str = r#"
max_subscriptions = 5
max_presence_members = 3

[namespaces.small]
history_size = 3
recover_max = 2

[namespaces.nohist]
history_size = 0
presence = false
join_leave = false

[namespaces.backend]
publish = "none"

[namespaces.auth]
subscribe = "authenticated"
publish = "authenticated"

[namespaces.user]
subscribe = "user"

[namespaces.tok]
subscribe = "token"

[limits]
commands_per_second = 0
connection_rate_per_ip = 0
"#;

/// Turns off the per-connection command rate and the per-address connection rate, for
/// tests that send many commands or open many connections from 127.0.0.1 (append it to
/// a config: it is a TOML table).
pub const NO_RATE_LIMITS: &str = "\n[limits]\ncommands_per_second = 0\nconnection_rate_per_ip = 0\n";

/// Starts a node with [`TEST_CONFIG`] and extra environment variables.
pub fn start_test_node(env: &[(&str, &str)]) -> NodeProc {
    NodeProc::start(NodeOptions::with_config(TEST_CONFIG).envs(env))
}

/// Waits for `fut` at most `limit`, panicking with `what` when it does not finish.
pub async fn within<F: Future>(limit: Duration, what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {limit:?} waiting for {what}"),
    }
}

/// Polls `check` until it returns `Some`, for at most `limit`. Used for conditions that
/// have no event to wait on (another process's state); polls every 10 ms.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("condition not met within {limit:?}: {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Checks that the node at `url` still serves a fresh client: connect, subscribe,
/// publish, receive the publication (in JSON).
pub async fn assert_node_serves(url: &str) {
    let mut c = TestClient::connected(url, Enc::Json).await;
    let room = format!("alive-{}", unique());
    let r = c.request(json!({"type": "subscribe", "room": room})).await;
    assert_eq!(r["type"], "subscribed", "{r}");
    let r = c.request(json!({"type": "publish", "room": room, "data": {"alive": true}})).await;
    assert_eq!(r["type"], "published", "{r}");
    let p = c.recv_type("publication").await;
    assert_eq!(p["data"], json!({"alive": true}));
    c.close().await;
}

/// The body of a plain HTTP/1.1 GET that must answer 200 (the node closes after
/// `Connection: close`).
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream =
        within(RECV_TIMEOUT, "TCP connect", tokio::net::TcpStream::connect(addr)).await.expect("TCP connect");
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).await.expect("sending the request");
    let mut raw = Vec::new();
    within(RECV_TIMEOUT, "the HTTP response", stream.read_to_end(&mut raw))
        .await
        .expect("reading the response");
    let text = String::from_utf8_lossy(&raw).to_string();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    text.split_once("\r\n\r\n").map(|(_, body)| body.to_string()).unwrap_or_default()
}

/// The value of `roomcast_limit_trips_total{limit="<limit>"}` at the node's `/metrics`.
pub async fn limit_trips(addr: std::net::SocketAddr, limit: &str) -> u64 {
    let metrics = http_get(addr, "/metrics").await;
    let prefix = format!("roomcast_limit_trips_total{{limit=\"{limit}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .unwrap_or_else(|| panic!("no counter {limit:?} in {metrics}"))
        .parse()
        .expect("a counter value")
}

/// A number unique in this process.
pub fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(1);
    N.fetch_add(1, Ordering::Relaxed)
}

/// `v[key]` as u64, panicking with the whole message when it is not one.
pub fn u64_of(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("`{key}` is not an unsigned integer in {v}"))
}

/// `v[key]` as a string, panicking with the whole message when it is not one.
pub fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or_else(|| panic!("`{key}` is not a string in {v}"))
}

/// Asserts that `v` is an `error` with `code`.
#[track_caller]
pub fn assert_error(v: &Value, code: u64) {
    assert_eq!(v["type"], "error", "expected error {code}, got {v}");
    assert_eq!(v["code"], code, "expected error {code}, got {v}");
    assert!(v["message"].is_string(), "error without a message: {v}");
}

/// Offsets of a `publications` array (empty when the field is absent).
pub fn offsets(v: &Value) -> Vec<u64> {
    v["publications"].as_array().map(|a| a.iter().map(|p| u64_of(p, "offset")).collect()).unwrap_or_default()
}
