//! Error replies reachable without tokens, in both encodings; after each, the connection
//! (where the spec says so) and the node keep working.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use roomcast_tests::{
    Enc, TestClient, Value, assert_error, assert_node_serves, json, offsets, raw_binary, start_test_node,
    str_of,
};

fn sfx(enc: Enc) -> &'static str {
    if enc.is_binary() { "mp" } else { "js" }
}

/// Sends `cmd` and asserts error `code` with the request's id.
async fn expect_error(c: &mut TestClient, cmd: Value, code: u64) -> Value {
    let r = c.request(cmd.clone()).await;
    assert_error(&r, code);
    assert!(r["id"].is_u64(), "the error carries the command's id: {r}");
    assert!(r.get("temporary").is_none() || r["temporary"].is_boolean(), "{r}");
    r
}

/// The connection still answers.
async fn assert_alive(c: &mut TestClient) {
    let r = c.request(json!({"type": "presence_stats", "room": "alive"})).await;
    assert_eq!(r["type"], "presence_stats", "connection no longer answers: {r}");
}

#[tokio::test]
async fn e101_connect_with_token_then_close_4001() {
    let node = start_test_node(&[]);
    let url = node.ws_url();
    for enc in Enc::BOTH {
        let mut c = TestClient::open(&url, enc).await;
        let r =
            c.request(json!({"type": "connect", "token": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhIn0.sig"})).await;
        assert_error(&r, 101);
        let (code, _) = c.expect_close().await;
        assert_eq!(code, 4001);
        assert_eq!(c.disconnect()["reconnect"], false, "{}", c.disconnect());
    }
    assert_node_serves(&url).await;
}

#[tokio::test]
async fn e113_before_connect_keeps_the_connection() {
    let node = start_test_node(&[]);
    let url = node.ws_url();
    for enc in Enc::BOTH {
        let mut c = TestClient::open(&url, enc).await;
        for cmd in [
            json!({"type": "subscribe", "room": "chat"}),
            json!({"type": "publish", "room": "chat", "data": 1}),
            json!({"type": "history", "room": "chat"}),
            json!({"type": "presence", "room": "chat"}),
            // Malformed or unknown: still 113 before connect (spec 2.1).
            json!({"type": "subscribe", "room": "a b"}),
            json!({"type": "publish", "room": "chat"}),
            json!({"type": "frobnicate"}),
        ] {
            expect_error(&mut c, cmd, 113).await;
        }
        c.connect().await;
        let s = c.request(json!({"type": "subscribe", "room": "chat"})).await;
        assert_eq!(s["type"], "subscribed", "{s}");
    }
    assert_node_serves(&url).await;
}

#[tokio::test]
async fn e102_e103_e104_e105_namespaces_permissions_types() {
    let node = start_test_node(&[]);
    let url = node.ws_url();
    for enc in Enc::BOTH {
        let s = sfx(enc);
        let mut c = TestClient::connected(&url, enc).await;
        // 102: unknown namespace, for every room command.
        for cmd in [
            json!({"type": "subscribe", "room": format!("nope:{s}")}),
            json!({"type": "publish", "room": format!("nope:{s}"), "data": 1}),
            json!({"type": "history", "room": format!("nope:{s}")}),
            json!({"type": "presence", "room": format!("nope:{s}")}),
            json!({"type": "presence_stats", "room": format!("nope:{s}")}),
            json!({"type": "unsubscribe", "room": format!("nope:{s}")}),
        ] {
            expect_error(&mut c, cmd, 102).await;
        }
        // 103: publish without subscribing (publish = subscribers).
        expect_error(&mut c, json!({"type": "publish", "room": format!("chat-{s}"), "data": 1}), 103).await;
        // 103: publish = "none", even when subscribed.
        let backend = format!("backend:{s}");
        let r = c.request(json!({"type": "subscribe", "room": backend})).await;
        assert_eq!(r["type"], "subscribed", "{r}");
        expect_error(&mut c, json!({"type": "publish", "room": backend, "data": 1}), 103).await;
        // 103: subscribe rules an anonymous connection does not meet.
        for room in [format!("auth:{s}"), "user:someone".to_string(), format!("tok:{s}")] {
            expect_error(&mut c, json!({"type": "subscribe", "room": room}), 103).await;
        }
        expect_error(&mut c, json!({"type": "publish", "room": format!("auth:{s}"), "data": 1}), 103).await;
        // Reading a room one may not subscribe to is refused the same way.
        expect_error(&mut c, json!({"type": "history", "room": format!("auth:{s}")}), 103).await;
        expect_error(&mut c, json!({"type": "presence", "room": "user:someone"}), 103).await;
        // An (unverifiable) subscription token in a token namespace: 101, connection stays.
        expect_error(
            &mut c,
            json!({"type": "subscribe", "room": format!("tok:{s}"), "token": "eyJ.x.y"}),
            101,
        )
        .await;
        assert_alive(&mut c).await;
        // 104: unknown command type.
        let r = expect_error(&mut c, json!({"type": "frobnicate"}), 104).await;
        assert!(str_of(&r, "message").contains("frobnicate") || !str_of(&r, "message").is_empty());
        // 105: already subscribed.
        let room = format!("dup-{s}");
        c.request(json!({"type": "subscribe", "room": room})).await;
        expect_error(&mut c, json!({"type": "subscribe", "room": room}), 105).await;
        assert_alive(&mut c).await;
    }
    assert_node_serves(&url).await;
}

#[tokio::test]
async fn e106_limits() {
    let node = start_test_node(&[]);
    let url = node.ws_url();
    for enc in Enc::BOTH {
        let s = sfx(enc);
        let mut c = TestClient::connected(&url, enc).await;
        // data over 64 KiB inside a message under 128 KiB: 106, nothing published.
        let room = format!("big-{s}");
        c.request(json!({"type": "subscribe", "room": room})).await;
        let big = "x".repeat(70_000);
        expect_error(&mut c, json!({"type": "publish", "room": room, "data": big}), 106).await;
        let h = c.request(json!({"type": "history", "room": room})).await;
        assert_eq!(h["offset"], 0, "an over-limit publication is not published: {h}");
        // Just under the limit is fine.
        let ok = c.request(json!({"type": "publish", "room": room, "data": "y".repeat(60_000)})).await;
        assert_eq!(ok["type"], "published", "{ok}");
        assert_eq!(c.recv_type("publication").await["data"].as_str().map(str::len), Some(60_000));

        // The 6th subscription (max_subscriptions = 5; `big-*` is the 1st).
        for i in 2..=5 {
            let r = c.request(json!({"type": "subscribe", "room": format!("r{i}-{s}")})).await;
            assert_eq!(r["type"], "subscribed", "{r}");
        }
        expect_error(&mut c, json!({"type": "subscribe", "room": format!("r6-{s}")}), 106).await;
        // After an unsubscribe there is room again.
        c.request(json!({"type": "unsubscribe", "room": format!("r5-{s}")})).await;
        let r = c.request(json!({"type": "subscribe", "room": format!("r6-{s}")})).await;
        assert_eq!(r["type"], "subscribed", "{r}");

        // Presence of more than max_presence_members (3).
        let room = format!("crowd-{s}");
        let mut members = Vec::new();
        for _ in 0..4 {
            let mut m = TestClient::connected(&url, enc).await;
            m.request(json!({"type": "subscribe", "room": room})).await;
            members.push(m);
        }
        expect_error(&mut members[0], json!({"type": "presence", "room": room}), 106).await;
        let st = members[0].request(json!({"type": "presence_stats", "room": room})).await;
        assert_eq!(st["clients"], 4, "presence_stats still works: {st}");
        // Subscribing with presence: true into that crowd: 106, and not subscribed.
        let mut late = TestClient::connected(&url, enc).await;
        expect_error(&mut late, json!({"type": "subscribe", "room": room, "presence": true}), 106).await;
        let st = late.request(json!({"type": "presence_stats", "room": room})).await;
        assert_eq!(st["clients"], 4, "the refused subscriber is not a member: {st}");
        let r = late.request(json!({"type": "subscribe", "room": room})).await;
        assert_eq!(r["type"], "subscribed", "the refused subscribe left nothing behind: {r}");
    }
    assert_node_serves(&url).await;
}

#[tokio::test]
async fn e107_bad_requests() {
    let node = start_test_node(&[]);
    let url = node.ws_url();
    for enc in Enc::BOTH {
        let s = sfx(enc);
        let mut c = TestClient::connected(&url, enc).await;
        let room = format!("ok-{s}");
        let bad = [
            json!({"type": "subscribe"}),
            json!({"type": "subscribe", "room": 5}),
            json!({"type": "subscribe", "room": ""}),
            json!({"type": "subscribe", "room": "chat room"}),
            json!({"type": "subscribe", "room": "chat:"}),
            json!({"type": "subscribe", "room": ":x"}),
            json!({"type": "subscribe", "room": "café"}),
            json!({"type": "subscribe", "room": "a".repeat(201)}),
            json!({"type": "subscribe", "room": room, "recover": "x"}),
            json!({"type": "subscribe", "room": room, "recover": {"offset": "1", "epoch": "e"}}),
            json!({"type": "subscribe", "room": room, "recover": {"offset": 1}}),
            json!({"type": "subscribe", "room": room, "presence": "yes"}),
            json!({"type": "publish", "room": room}),
            json!({"type": "publish", "data": 1}),
            json!({"type": "history", "room": room, "limit": -1}),
            json!({"type": "history", "room": room, "limit": "3"}),
            json!({"type": "history", "room": room, "since": {"epoch": 1}}),
            json!({"type": "unsubscribe"}),
            json!({"type": "rpc", "data": 1}),
        ];
        for cmd in bad {
            let r = c.request(cmd.clone()).await;
            assert_eq!(r["code"], 107, "{cmd} -> {r}");
            assert_error(&r, 107);
        }
        // 200 bytes is still legal; every legal character works.
        let long = "a".repeat(200);
        let r = c.request(json!({"type": "subscribe", "room": long})).await;
        assert_eq!(r["type"], "subscribed", "{r}");
        let odd = format!("small:Az09._-@=,/:x-{s}");
        let r = c.request(json!({"type": "subscribe", "room": odd})).await;
        assert_eq!(r["type"], "subscribed", "{r}");
        let r = c.request(json!({"type": "publish", "room": odd, "data": 1})).await;
        assert_eq!(r["type"], "published", "{r}");
        // data nested deeper than 64 levels (inside a decodable message): 107.
        c.request(json!({"type": "subscribe", "room": room})).await;
        let mut deep = json!(1);
        for _ in 0..100 {
            deep = json!([deep]);
        }
        let r = c.request(json!({"type": "publish", "room": room, "data": deep})).await;
        assert_eq!(r["code"], 107, "{r}");
        assert_alive(&mut c).await;
    }

    // MessagePack ext in data: 107.
    let mut c = TestClient::connected(&url, Enc::Msgpack).await;
    c.request(json!({"type": "subscribe", "room": "ext"})).await;
    let msg = rmpv::Value::Map(vec![
        ("type".into(), "publish".into()),
        ("id".into(), 500.into()),
        ("room".into(), "ext".into()),
        ("data".into(), rmpv::Value::Map(vec![("e".into(), rmpv::Value::Ext(5, vec![1, 2, 3, 4]))])),
    ]);
    let mut bytes = Vec::new();
    rmpv::encode::write_value(&mut bytes, &msg).unwrap();
    c.send_raw(raw_binary(bytes)).await;
    assert_error(&c.wait_reply(&json!(500)).await, 107);
    let h = c.request(json!({"type": "history", "room": "ext"})).await;
    assert_eq!(h["offset"], 0, "nothing was published: {h}");
    assert_alive(&mut c).await;
    assert_node_serves(&url).await;
}

#[tokio::test]
async fn e108_not_available() {
    let node = start_test_node(&[]);
    let url = node.ws_url();
    for enc in Enc::BOTH {
        let room = format!("nohist:{}", sfx(enc));
        let mut c = TestClient::connected(&url, enc).await;
        expect_error(&mut c, json!({"type": "presence", "room": room}), 108).await;
        expect_error(&mut c, json!({"type": "presence_stats", "room": room}), 108).await;
        expect_error(&mut c, json!({"type": "history", "room": room}), 108).await;
        expect_error(&mut c, json!({"type": "subscribe", "room": room, "presence": true}), 108).await;
        // Without presence the subscribe works (and it was not left half-done).
        let r = c.request(json!({"type": "subscribe", "room": room})).await;
        assert_eq!(r["type"], "subscribed", "{r}");
        expect_error(&mut c, json!({"type": "refresh", "token": "t"}), 108).await;
        assert_alive(&mut c).await;
    }
    assert_node_serves(&url).await;
}

#[tokio::test]
async fn e112_unrecoverable_history_position() {
    let node = start_test_node(&[]);
    let url = node.ws_url();
    for enc in Enc::BOTH {
        let s = sfx(enc);
        let mut c = TestClient::connected(&url, enc).await;
        let room = format!("h-{s}");
        c.request(json!({"type": "subscribe", "room": room})).await;
        let p = c.request(json!({"type": "publish", "room": room, "data": 1})).await;
        let epoch = str_of(&p, "epoch").to_string();
        expect_error(
            &mut c,
            json!({"type": "history", "room": room, "since": {"offset": 0, "epoch": "other"}}),
            112,
        )
        .await;
        let h =
            c.request(json!({"type": "history", "room": room, "since": {"offset": 0, "epoch": epoch}})).await;
        assert_eq!(offsets(&h), vec![1]);
        // Older than what is kept (namespace `small` keeps 3).
        let small = format!("small:{s}");
        c.request(json!({"type": "subscribe", "room": small})).await;
        let mut epoch = String::new();
        for i in 0..10 {
            epoch = str_of(&c.request(json!({"type": "publish", "room": small, "data": i})).await, "epoch")
                .to_string();
        }
        expect_error(
            &mut c,
            json!({"type": "history", "room": small, "since": {"offset": 2, "epoch": epoch}}),
            112,
        )
        .await;
        let h = c
            .request(json!({"type": "history", "room": small, "since": {"offset": 7, "epoch": epoch}}))
            .await;
        assert_eq!(offsets(&h), vec![8, 9, 10]);
        assert_alive(&mut c).await;
    }
    assert_node_serves(&url).await;
}

#[tokio::test]
async fn e114_rpc_without_backend() {
    let node = start_test_node(&[]);
    let url = node.ws_url();
    for enc in Enc::BOTH {
        let mut c = TestClient::connected(&url, enc).await;
        let r = expect_error(&mut c, json!({"type": "rpc", "method": "m", "data": {"a": 1}}), 114).await;
        assert_eq!(r["temporary"], true, "{r}");
        assert_alive(&mut c).await;
    }
    assert_node_serves(&url).await;
}
