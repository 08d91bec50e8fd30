//! Close codes (each preceded by a `disconnect` push with the same code), the upgrade
//! handshake's answers, and the node serving on after each.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use roomcast_tests::raw::{self, OP_TEXT};
use roomcast_tests::{
    Enc, Message, NodeOptions, NodeProc, TEST_CONFIG, TestClient, Value, assert_error, assert_node_serves,
    json, raw_binary, raw_text, start_test_node, u64_of, within,
};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data as OpData, OpCode};

/// Opens a connected client, sends `msg`, and asserts close `code` (with `reconnect`).
async fn expect_closed_by(url: &str, enc: Enc, msg: Message, code: u16, reconnect: bool) {
    let mut c = TestClient::connected(url, enc).await;
    let what = format!("{msg:?}");
    c.send_raw(msg).await;
    let (got, _reason) = c.expect_close().await;
    assert_eq!(got, code, "{enc:?} {}", &what[..what.len().min(200)]);
    assert_eq!(c.disconnect()["reconnect"], reconnect, "{}", c.disconnect());
}

fn mp(v: &Value) -> Message {
    Enc::Msgpack.frame(std::slice::from_ref(v))
}

#[tokio::test]
async fn c4002_protocol_violations() {
    let node = start_test_node(&[]);
    let url = node.ws_url();
    // Frame type against the encoding.
    expect_closed_by(&url, Enc::Json, raw_binary(b"\x81\xa4type\xa4pong".to_vec()), 4002, false).await;
    expect_closed_by(&url, Enc::Msgpack, raw_text("{\"type\":\"pong\"}"), 4002, false).await;
    // JSON that is not a valid message.
    for text in [
        "hello",
        "{\"type\":\"publish\"",
        "[1,2,3]",
        "\"connect\"",
        "42",
        "{\"id\":1,\"room\":\"chat\"}",
        "{\"type\":5,\"id\":1}",
        "{\"type\":\"presence_stats\",\"id\":0,\"room\":\"x\"}",
        "{\"type\":\"presence_stats\",\"id\":4294967296,\"room\":\"x\"}",
        "{\"type\":\"presence_stats\",\"id\":-1,\"room\":\"x\"}",
    ] {
        expect_closed_by(&url, Enc::Json, raw_text(text), 4002, false).await;
    }
    // Invalid UTF-8 in a text frame.
    let invalid = Frame::message(vec![b'{', 0xff, 0xfe, b'}'], OpCode::Data(OpData::Text), true);
    expect_closed_by(&url, Enc::Json, Message::Frame(invalid), 4002, false).await;
    // MessagePack that is not a valid message.
    for bytes in [
        vec![0xc1],                         // never used
        vec![0x93, 0x01, 0x02, 0x03],       // an array
        vec![0x81, 0xa2, b'i', b'd', 0x01], // no type
    ] {
        expect_closed_by(&url, Enc::Msgpack, raw_binary(bytes), 4002, false).await;
    }
    for bad in [
        json!({"type": 5}),
        json!({"type": "presence_stats", "id": 0, "room": "x"}),
        json!({"type": "presence_stats", "id": 4_294_967_296u64, "room": "x"}),
        json!({"type": "presence_stats", "id": -1, "room": "x"}),
    ] {
        expect_closed_by(&url, Enc::Msgpack, mp(&bad), 4002, false).await;
    }
    // id 2^32 - 1 is the largest legal id.
    for enc in Enc::BOTH {
        let mut c = TestClient::connected(&url, enc).await;
        let r = c.request(json!({"type": "presence_stats", "id": 4_294_967_295u64, "room": "x"})).await;
        assert_eq!(r["id"], 4_294_967_295u64);
    }
    // A violation before connect closes too.
    for enc in Enc::BOTH {
        let mut c = TestClient::open(&url, enc).await;
        c.send_raw(if enc.is_binary() { raw_text("x") } else { raw_binary(vec![1]) }).await;
        assert_eq!(c.expect_close().await.0, 4002);
    }
    // Messages before the violation in the same frame are handled, in order.
    for enc in Enc::BOTH {
        let mut c = TestClient::connected(&url, enc).await;
        let frame = if enc.is_binary() {
            let mut b = Vec::new();
            rmpv::encode::write_value(
                &mut b,
                &roomcast_tests::json_to_mp(&json!({"type": "subscribe", "id": 1, "room": "order"})),
            )
            .unwrap();
            b.push(0xc1);
            raw_binary(b)
        } else {
            raw_text("{\"type\":\"subscribe\",\"id\":1,\"room\":\"order\"}\nnot json")
        };
        c.send_raw(frame).await;
        assert_eq!(c.expect_close().await.0, 4002);
        let all = c.take_buffered();
        assert!(all.iter().any(|m| m["type"] == "subscribed" && m["id"] == 1), "{all:?}");
    }
    assert_node_serves(&url).await;
}

#[tokio::test]
async fn c4002_deeply_nested_messages() {
    let node = start_test_node(&[]);
    let url = node.ws_url();
    expect_closed_by(&url, Enc::Json, raw_text(&"[".repeat(100_000)), 4002, false).await;
    let deep_json = format!(
        "{{\"type\":\"publish\",\"room\":\"r\",\"x\":{}1{}}}",
        "[".repeat(50_000),
        "]".repeat(50_000)
    );
    expect_closed_by(&url, Enc::Json, raw_text(&deep_json), 4002, false).await;
    expect_closed_by(&url, Enc::Msgpack, raw_binary(vec![0x91; 100_000]), 4002, false).await;
    assert_node_serves(&url).await;
}

#[tokio::test]
async fn c4008_message_too_large() {
    let node = start_test_node(&[]);
    let url = node.ws_url();
    for enc in Enc::BOTH {
        let mut c = TestClient::connected(&url, enc).await;
        c.request(json!({"type": "subscribe", "room": "big"})).await;
        c.send(json!({"type": "publish", "id": 9, "room": "big", "data": "z".repeat(200_000)})).await;
        let (code, _) = c.expect_close().await;
        assert_eq!(code, 4008);
        assert_eq!(c.disconnect()["reconnect"], false);
        assert!(
            !c.take_buffered().iter().any(|m| m["type"] == "published" || m["type"] == "publication"),
            "nothing was published"
        );
    }
    let mut h = TestClient::connected(&url, Enc::Json).await;
    assert_eq!(h.request(json!({"type": "history", "room": "big"})).await["offset"], 0);
    assert_node_serves(&url).await;
}

#[tokio::test]
async fn c4005_handshake_timeout() {
    let node = start_test_node(&[("ROOMCAST_HANDSHAKE_TIMEOUT_MS", "300")]);
    let url = node.ws_url();
    for enc in Enc::BOTH {
        // No message at all.
        let mut silent = TestClient::open(&url, enc).await;
        // Only commands other than connect (113): the timeout keeps running.
        let mut early = TestClient::open(&url, enc).await;
        assert_error(&early.request(json!({"type": "presence_stats", "room": "x"})).await, 113);
        // Connected in time: not closed.
        let mut ok = TestClient::connected(&url, enc).await;
        for c in [&mut silent, &mut early] {
            let (code, _) = c.expect_close().await;
            assert_eq!(code, 4005);
            assert_eq!(c.disconnect()["reconnect"], true);
        }
        // By now the handshake deadline of `ok` has long passed too.
        let r = ok.request(json!({"type": "presence_stats", "room": "x"})).await;
        assert_eq!(r["type"], "presence_stats");
        assert!(ok.take_buffered().iter().all(|m| m["type"] != "disconnect"));
    }
    assert_node_serves(&url).await;
}

#[tokio::test]
async fn c4006_pong_timeout() {
    let node = start_test_node(&[("ROOMCAST_PING_MS", "200"), ("ROOMCAST_PONG_TIMEOUT_MS", "200")]);
    let url = node.ws_url();
    for enc in Enc::BOTH {
        // Answering every ping keeps a connection open across many pings (well past
        // ping_ms + pong timeout).
        let mut polite = TestClient::connected(&url, enc).await;
        let polite_task = tokio::spawn(async move {
            for _ in 0..6 {
                polite.recv_type("ping").await;
                polite.send(json!({"type": "pong"})).await;
            }
            let r = polite.request(json!({"type": "presence_stats", "room": "x"})).await;
            assert_eq!(r["type"], "presence_stats");
            assert!(polite.take_buffered().iter().all(|m| m["type"] != "disconnect"));
        });
        let mut mute = TestClient::connected(&url, enc).await;
        assert_eq!(mute.recv_type("ping").await["type"], "ping");
        let (code, _) = mute.expect_close().await;
        assert_eq!(code, 4006);
        assert_eq!(mute.disconnect()["reconnect"], true);
        within(Duration::from_secs(10), "the polite client", polite_task).await.unwrap();
    }
    assert_node_serves(&url).await;
}

/// A client that keeps sending after what closes its connection still gets the
/// `disconnect` push and the close code: the node reads (and discards) what follows until
/// the client closes, instead of dropping the socket with unread input (the kernel would
/// answer the next bytes with a reset, which destroys the close frame the client has not
/// read yet).
#[tokio::test]
async fn close_survives_a_client_that_keeps_sending() {
    let node = start_test_node(&[]);
    for round in 0..3 {
        let (_, ws) = raw::upgrade(node.addr, &[]).await;
        let mut ws = ws.expect("upgraded");
        ws.send_frame(raw::OP_BINARY, false, &[0]).await; // binary on a JSON connection: 4002
        // A client busy sending for a while before it reads. Many client libraries give up
        // on the connection at the first failed write, before they read the close frame
        // that arrived: the node must not reset the connection meanwhile.
        let mut pace = tokio::time::interval(Duration::from_millis(10));
        for i in 0..30 {
            pace.tick().await;
            let sent = ws.try_send_text(&format!(r#"{{"type":"ping","id":{}}}"#, 100 + i)).await;
            assert!(sent, "round {round}: write {i} after the close failed (connection reset)");
        }
        let (msgs, code) = ws.read_json_until_close().await;
        assert_eq!(code, Some(4002), "round {round}: {msgs:?}");
        assert_eq!(msgs.last().map(|m| m["code"].clone()), Some(json!(4002)), "round {round}: {msgs:?}");
    }
    assert_node_serves(&node.ws_url()).await;
}

/// SIGTERM the moment the node says it listens (what an orchestrator may do to a pod that
/// just started): a graceful exit, not death by the signal's default action.
#[tokio::test]
async fn sigterm_right_after_start_is_a_graceful_exit() {
    for _ in 0..5 {
        let mut node = start_test_node(&[]);
        node.terminate();
        let status = node.wait_exit(Duration::from_secs(15)).await.expect("the node exits after SIGTERM");
        assert!(status.success(), "graceful exit: {status}\n{}", node.stderr());
    }
}

#[tokio::test]
async fn c4000_sigterm_disconnects_everyone() {
    let mut node = start_test_node(&[]);
    let url = node.ws_url();
    let mut clients = Vec::new();
    for enc in [Enc::Json, Enc::Msgpack, Enc::NoSubprotocol] {
        let mut c = TestClient::connected(&url, enc).await;
        c.request(json!({"type": "subscribe", "room": "chat"})).await;
        clients.push(c);
    }
    clients.push(TestClient::open(&url, Enc::Json).await); // not even connected yet
    node.terminate();
    for c in &mut clients {
        let (code, _) = c.expect_close().await;
        assert_eq!(code, 4000);
        assert_eq!(c.disconnect()["reconnect"], true, "{}", c.disconnect());
    }
    let status = node.wait_exit(Duration::from_secs(15)).await.expect("the node exits after SIGTERM");
    assert!(status.success(), "graceful exit: {status}");
}

/// The slow consumer: its socket has a tiny receive buffer and it reads nothing while
/// ~60 KB publications pour in, well past what the kernel buffers hold; then it reads
/// and must find a contiguous prefix of the publications, `disconnect` 4003 and close
/// 4003. A third client keeps working in another room meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c4003_slow_consumer() {
    let node =
        NodeProc::start(NodeOptions::with_config(TEST_CONFIG).env("ROOMCAST_MAX_QUEUE_BYTES", 131_072));
    let url = node.ws_url();
    // Enough bytes to fill the node's socket send buffer (at most tcp_wmem's max), the
    // slow client's receive buffer, the node's write buffer and its 128 KiB queue, twice.
    let wmem_max: usize = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
        .ok()
        .and_then(|s| s.split_whitespace().nth(2).and_then(|v| v.parse().ok()))
        .unwrap_or(4 << 20);
    const DATA: usize = 60_000;
    let count = ((2 * (wmem_max + (1 << 20))) / DATA).max(150) as u64;

    for enc in Enc::BOTH {
        let room = format!("flood-{enc:?}");
        let mut slow = TestClient::open_with_rcvbuf(&url, enc, 4096).await;
        slow.connect().await;
        slow.request(json!({"type": "subscribe", "room": room})).await;

        // A third client keeps working in another room meanwhile.
        let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
        let mut other = TestClient::connected(&url, enc).await;
        let other_room = format!("calm-{enc:?}");
        other.request(json!({"type": "subscribe", "room": other_room})).await;
        let other_task = tokio::spawn(async move {
            let mut n = 0u64;
            loop {
                n += 1;
                let r = other.request(json!({"type": "publish", "room": other_room, "data": n})).await;
                assert_eq!(r["offset"], n, "{r}");
                assert_eq!(other.recv_type("publication").await["data"], n);
                if stop_rx.try_recv().is_ok() {
                    return (other, n);
                }
            }
        });

        let mut publisher = TestClient::connected(&url, enc).await;
        publisher.request(json!({"type": "subscribe", "room": room})).await;
        let data = "d".repeat(DATA);
        let started = std::time::Instant::now();
        for i in 1..=count {
            let r = publisher
                .request(json!({"type": "publish", "room": room, "data": data, "skip_self": true}))
                .await;
            assert_eq!(r["offset"], i, "{r:?}");
        }
        // Read right away: the node gives a stuck writer 2 s to drain before giving up.
        let (code, _) = slow.expect_close().await;
        assert_eq!(code, 4003);
        assert_eq!(slow.disconnect()["reconnect"], true);
        let got: Vec<u64> = slow
            .take_buffered()
            .iter()
            .filter(|m| m["type"] == "publication")
            .map(|m| u64_of(m, "offset"))
            .collect();
        eprintln!(
            "{enc:?}: published {count} x {DATA} B in {:?}; the slow consumer got {} before 4003",
            started.elapsed(),
            got.len()
        );
        assert!((got.len() as u64) < count, "the slow consumer cannot have got everything");
        assert_eq!(got, (1..=got.len() as u64).collect::<Vec<_>>(), "what it got is a contiguous prefix");

        stop_tx.send(()).unwrap();
        let (mut other, rounds) =
            within(Duration::from_secs(10), "the third client", other_task).await.unwrap();
        eprintln!("{enc:?}: the third client made {rounds} round trips meanwhile");
        assert!(rounds >= 2, "the third client worked during the flood ({rounds} round trips)");
        let r = other.request(json!({"type": "presence_stats", "room": room})).await;
        assert_eq!(r["clients"], 1, "only the publisher is left in the flooded room: {r}");
        // The flooded room is intact: a new subscriber reads it.
        let mut late = TestClient::connected(&url, enc).await;
        let h = late.request(json!({"type": "history", "room": room, "limit": 0})).await;
        assert_eq!(h["offset"], count);
        late.request(json!({"type": "subscribe", "room": room})).await;
        let r = publisher.request(json!({"type": "publish", "room": room, "data": "after"})).await;
        assert_eq!(r["type"], "published");
        assert_eq!(late.recv_type("publication").await["data"], "after");
    }
    assert_node_serves(&url).await;
}

#[tokio::test]
async fn upgrade_answers() {
    let node = start_test_node(&[]);
    let url = node.ws_url();
    // Only unknown subprotocols: HTTP 400 with a plain-text reason.
    for offered in ["chat.v2", "chat.v2, roomcast.v2.json"] {
        let (resp, ws) = raw::upgrade(node.addr, &[("Sec-WebSocket-Protocol", offered)]).await;
        assert!(ws.is_none());
        assert_eq!(resp.status, 400, "{resp:?}");
        assert!(resp.header("content-type").unwrap_or_default().starts_with("text/plain"), "{resp:?}");
        assert!(!String::from_utf8_lossy(&resp.body).trim().is_empty(), "a reason in the body: {resp:?}");
    }
    // No subprotocol: 101, no Sec-WebSocket-Protocol, JSON.
    let (resp, ws) = raw::upgrade(node.addr, &[]).await;
    assert_eq!(resp.status, 101);
    assert_eq!(resp.header("sec-websocket-accept"), Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="));
    assert!(resp.header("sec-websocket-protocol").is_none(), "{resp:?}");
    let mut ws = ws.unwrap();
    ws.send_text("{\"type\":\"connect\",\"id\":1}").await;
    let f = ws.read_frame().await;
    assert_eq!(f.opcode, OP_TEXT);
    let v: Value = serde_json::from_slice(&f.payload).unwrap();
    assert_eq!(v["type"], "connected");
    // Unknown plus known: the known one is selected and named.
    for (offered, chosen) in [
        ("chat.v2, roomcast.v1.msgpack", "roomcast.v1.msgpack"),
        ("roomcast.v1.json, roomcast.v1.msgpack", "roomcast.v1.json"),
        ("roomcast.v1.msgpack, roomcast.v1.json", "roomcast.v1.msgpack"),
    ] {
        let (resp, _) = raw::upgrade(node.addr, &[("Sec-WebSocket-Protocol", offered)]).await;
        assert_eq!(resp.status, 101, "{offered}: {resp:?}");
        assert_eq!(resp.header("sec-websocket-protocol"), Some(chosen), "{offered}");
    }
    // An unsupported WebSocket version: 426 naming the one spoken (RFC 6455 4.4).
    let (resp, ws) = raw::upgrade(node.addr, &[("Sec-WebSocket-Version", "8")]).await;
    assert!(ws.is_none());
    assert_eq!(resp.status, 426, "{resp:?}");
    assert_eq!(resp.header("sec-websocket-version"), Some("13"), "{resp:?}");
    // A deflate offer naming server_max_window_bits gets it back (RFC 7692 7.1.2.1).
    let (resp, _) = raw::upgrade(
        node.addr,
        &[("Sec-WebSocket-Extensions", "permessage-deflate; server_max_window_bits=15")],
    )
    .await;
    assert_eq!(resp.status, 101, "{resp:?}");
    let ext = resp.header("sec-websocket-extensions").unwrap_or_default();
    assert!(ext.starts_with("permessage-deflate") && ext.contains("server_max_window_bits=15"), "{ext}");
    // tungstenite agrees (it fails a handshake whose answer names no offered protocol).
    for enc in [Enc::Json, Enc::Msgpack, Enc::NoSubprotocol] {
        TestClient::connected(&url, enc).await;
    }
    assert_node_serves(&url).await;
}
