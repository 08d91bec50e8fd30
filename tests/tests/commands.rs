//! Every client command and its reply, and every push reachable without the server API,
//! against a real node, in both encodings.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use roomcast_tests::{Enc, TestClient, Value, assert_error, json, offsets, start_test_node, str_of, u64_of};

/// A room name unique per encoding, so both encodings can share one node.
fn room(base: &str, enc: Enc) -> String {
    format!("{base}-{}", if enc.is_binary() { "mp" } else { "js" })
}

/// Asserts that nothing matching `pred` is buffered or arrives while a round trip on `c`
/// completes (the node answers in order, so anything queued before the reply came first).
async fn assert_none_before_round_trip(c: &mut TestClient, pred: impl Fn(&Value) -> bool, what: &str) {
    let r = c.request(json!({"type": "presence_stats", "room": "roundtrip"})).await;
    assert_eq!(r["type"], "presence_stats", "{r}");
    let seen: Vec<Value> = c.take_buffered();
    assert!(!seen.iter().any(&pred), "unexpected {what}: {seen:?}");
}

#[tokio::test]
async fn connect_reply_and_subprotocol_headers() {
    let node = start_test_node(&[]);
    let url = node.ws_url();
    for (enc, header) in [
        (Enc::Json, Some("roomcast.v1.json")),
        (Enc::Msgpack, Some("roomcast.v1.msgpack")),
        (Enc::NoSubprotocol, None),
    ] {
        let mut c = TestClient::open(&url, enc).await;
        assert_eq!(
            c.headers.get("sec-websocket-protocol").map(|v| v.to_str().unwrap()),
            header,
            "{enc:?}: Sec-WebSocket-Protocol of the response"
        );
        let r = c
            .request(json!({"type": "connect", "id": 7, "name": "t", "version": "0.1", "data": {"x": 1}}))
            .await;
        assert_eq!(r["type"], "connected", "{r}");
        assert_eq!(r["id"], 7);
        assert_eq!(r["node"], node.node_id.as_str(), "connected.node is the node's id");
        assert_eq!(r["ping_ms"], 25_000, "default ping_ms");
        assert!(!str_of(&r, "client").is_empty());
        assert!(r.get("expires_in").is_none(), "no token, no expires_in: {r}");
        // A second connect is a bad request (roomcast's choice) and the connection stays.
        let r2 = c.request(json!({"type": "connect"})).await;
        assert_error(&r2, 107);
        let again = c.request(json!({"type": "presence_stats", "room": "chat"})).await;
        assert_eq!(again["type"], "presence_stats");
        c.close().await;
    }
    // Client ids are unique.
    let a = TestClient::connected(&url, Enc::Json).await;
    let b = TestClient::connected(&url, Enc::Msgpack).await;
    assert_ne!(a.client_id, b.client_id);
}

#[tokio::test]
async fn subscribe_publish_unsubscribe() {
    let node = start_test_node(&[]);
    let url = node.ws_url();
    for enc in Enc::BOTH {
        let r = room("chat", enc);
        let mut a = TestClient::connected(&url, enc).await;
        // The other client uses the other encoding: each gets data in its own.
        let other = if enc == Enc::Json { Enc::Msgpack } else { Enc::Json };
        let mut b = TestClient::connected(&url, other).await;

        let s = a.request(json!({"type": "subscribe", "room": r, "presence": true})).await;
        assert_eq!(s["type"], "subscribed", "{s}");
        assert_eq!(s["room"], r.as_str());
        assert_eq!(s["recoverable"], true);
        assert_eq!(s["offset"], 0, "a room never published reports offset 0: {s}");
        let epoch = str_of(&s, "epoch").to_string();
        assert!(s.get("recovered").is_none() && s.get("publications").is_none(), "{s}");
        let members = s["members"].as_array().expect("members");
        assert_eq!(members.len(), 1, "{s}");
        assert_eq!(members[0]["client"], a.client_id.as_str());
        assert_eq!(members[0]["user"], "");

        let s = b.request(json!({"type": "subscribe", "room": r, "presence": true})).await;
        let mut clients: Vec<&str> =
            s["members"].as_array().unwrap().iter().map(|m| m["client"].as_str().unwrap()).collect();
        clients.sort_unstable();
        let mut expected = vec![a.client_id.as_str(), b.client_id.as_str()];
        expected.sort_unstable();
        assert_eq!(clients, expected, "members include the subscriber itself: {s}");

        let data = json!({"text": "hello", "n": [1, 2.5, -3, null, true], "nested": {"k": "v"}});
        let p = a.request(json!({"type": "publish", "room": r, "data": data})).await;
        assert_eq!(p["type"], "published", "{p}");
        assert_eq!(p["room"], r.as_str());
        assert_eq!(p["offset"], 1);
        assert_eq!(p["epoch"], epoch.as_str(), "the first publication carries the announced epoch");
        let a_id = a.client_id.clone();
        for c in [&mut a, &mut b] {
            let pubm = c.recv_type("publication").await;
            assert_eq!(pubm["room"], r.as_str());
            assert_eq!(pubm["offset"], 1);
            assert_eq!(pubm["data"], data);
            assert!(pubm.get("id").is_none(), "a push has no id: {pubm}");
            assert_eq!(pubm["info"], json!({"client": a_id, "user": ""}), "{pubm}");
        }

        let u = a.request(json!({"type": "unsubscribe", "room": r})).await;
        assert_eq!(u["type"], "unsubscribed", "{u}");
        assert_eq!(u["room"], r.as_str());
        // Unsubscribing again is idempotent (roomcast's choice).
        let u = a.request(json!({"type": "unsubscribe", "room": r})).await;
        assert_eq!(u["type"], "unsubscribed", "{u}");
        // No longer a subscriber: cannot publish, gets nothing.
        assert_error(&a.request(json!({"type": "publish", "room": r, "data": 1})).await, 103);
        let p = b.request(json!({"type": "publish", "room": r, "data": 2})).await;
        assert_eq!(p["offset"], 2);
        assert_none_before_round_trip(
            &mut a,
            |v| v["type"] == "publication",
            "publication after unsubscribe",
        )
        .await;
        assert_eq!(b.recv_type("publication").await["offset"], 2);
    }
}

#[tokio::test]
async fn skip_self() {
    let node = start_test_node(&[]);
    let url = node.ws_url();
    for enc in Enc::BOTH {
        let r = room("skip", enc);
        let mut a = TestClient::connected(&url, enc).await;
        let mut b = TestClient::connected(&url, enc).await;
        for c in [&mut a, &mut b] {
            c.request(json!({"type": "subscribe", "room": r})).await;
        }
        let p = a.request(json!({"type": "publish", "room": r, "data": "quiet", "skip_self": true})).await;
        assert_eq!(p["type"], "published");
        assert_eq!(p["offset"], 1);
        let got = b.recv_type("publication").await;
        assert_eq!((got["offset"].clone(), got["data"].clone()), (json!(1), json!("quiet")));
        assert_none_before_round_trip(
            &mut a,
            |v| v["type"] == "publication",
            "own publication with skip_self",
        )
        .await;
        // skip_self: false is the default behaviour.
        a.request(json!({"type": "publish", "room": r, "data": "loud", "skip_self": false})).await;
        assert_eq!(a.recv_type("publication").await["offset"], 2);
        assert_eq!(b.recv_type("publication").await["offset"], 2);
    }
}

#[tokio::test]
async fn presence_and_presence_stats() {
    let node = start_test_node(&[]);
    let url = node.ws_url();
    for enc in Enc::BOTH {
        let r = room("pres", enc);
        let mut cs = Vec::new();
        for _ in 0..3 {
            let mut c = TestClient::connected(&url, enc).await;
            c.request(json!({"type": "subscribe", "room": r})).await;
            cs.push(c);
        }
        let p = cs[0].request(json!({"type": "presence", "room": r})).await;
        assert_eq!(p["type"], "presence", "{p}");
        assert_eq!(p["room"], r.as_str());
        let mut got: Vec<String> =
            p["members"].as_array().unwrap().iter().map(|m| str_of(m, "client").to_string()).collect();
        got.sort();
        let mut want: Vec<String> = cs.iter().map(|c| c.client_id.clone()).collect();
        want.sort();
        assert_eq!(got, want);
        for m in p["members"].as_array().unwrap() {
            assert_eq!(m["user"], "", "anonymous members have user \"\": {m}");
        }
        let s = cs[1].request(json!({"type": "presence_stats", "room": r})).await;
        assert_eq!(s["type"], "presence_stats", "{s}");
        assert_eq!(s["room"], r.as_str());
        assert_eq!(s["clients"], 3);
        assert_eq!(s["users"], 1, "three anonymous connections are one user (\"\")");

        // A non-subscriber may read presence of a public room (roomcast's choice).
        let mut outsider = TestClient::connected(&url, enc).await;
        let s = outsider.request(json!({"type": "presence_stats", "room": r})).await;
        assert_eq!(s["clients"], 3);
        // Leaving (by unsubscribe, and by a connection that just drops: no close frame,
        // only the TCP connection ending) updates presence.
        cs[0].request(json!({"type": "unsubscribe", "room": r})).await;
        drop(cs.pop());
        // The dropped connection's cleanup runs on the node once it sees the TCP end:
        // poll (with a deadline) until presence shows it.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let s = loop {
            let s = outsider.request(json!({"type": "presence_stats", "room": r})).await;
            if s["clients"] == 1 {
                break s;
            }
            assert!(tokio::time::Instant::now() < deadline, "presence did not drop to 1: {s}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert_eq!(s["users"], 1);
        let p = outsider.request(json!({"type": "presence", "room": r})).await;
        assert_eq!(p["members"].as_array().unwrap().len(), 1);
        assert_eq!(p["members"][0]["client"], cs[1].client_id.as_str());
        // An empty room.
        let s = outsider.request(json!({"type": "presence_stats", "room": room("empty", enc)})).await;
        assert_eq!((s["clients"].clone(), s["users"].clone()), (json!(0), json!(0)));
    }
}

#[tokio::test]
async fn history_orders_limits_and_since() {
    let node = start_test_node(&[]);
    let url = node.ws_url();
    for enc in Enc::BOTH {
        let r = room("hist", enc);
        let mut c = TestClient::connected(&url, enc).await;
        c.request(json!({"type": "subscribe", "room": r})).await;
        let mut epoch = String::new();
        for i in 1..=5u64 {
            let p = c.request(json!({"type": "publish", "room": r, "data": {"i": i}})).await;
            assert_eq!(p["offset"], i);
            epoch = str_of(&p, "epoch").to_string();
        }
        let h = c.request(json!({"type": "history", "room": r})).await;
        assert_eq!(h["type"], "history", "{h}");
        assert_eq!(h["room"], r.as_str());
        assert_eq!(h["offset"], 5);
        assert_eq!(h["epoch"], epoch.as_str());
        assert_eq!(offsets(&h), vec![1, 2, 3, 4, 5], "oldest first by default");
        for (i, p) in h["publications"].as_array().unwrap().iter().enumerate() {
            assert_eq!(p["room"], r.as_str());
            assert_eq!(p["data"], json!({"i": i + 1}));
            assert_eq!(p["info"], json!({"client": c.client_id, "user": ""}));
            assert!(p.get("type").is_none(), "history entries have no type: {p}");
        }
        let h = c.request(json!({"type": "history", "room": r, "reverse": true})).await;
        assert_eq!(offsets(&h), vec![5, 4, 3, 2, 1], "newest first with reverse");
        let h = c.request(json!({"type": "history", "room": r, "limit": 2})).await;
        assert_eq!(offsets(&h), vec![1, 2]);
        let h = c.request(json!({"type": "history", "room": r, "limit": 2, "reverse": true})).await;
        assert_eq!(offsets(&h), vec![5, 4]);
        let h = c.request(json!({"type": "history", "room": r, "limit": 0})).await;
        assert_eq!(h["type"], "history");
        assert_eq!((h["offset"].clone(), h["epoch"].clone()), (json!(5), json!(epoch)));
        assert!(offsets(&h).is_empty(), "limit 0 returns only the position: {h}");
        let h =
            c.request(json!({"type": "history", "room": r, "since": {"offset": 3, "epoch": epoch}})).await;
        assert_eq!(offsets(&h), vec![4, 5]);
        let h =
            c.request(json!({"type": "history", "room": r, "since": {"offset": 5, "epoch": epoch}})).await;
        assert_eq!(h["type"], "history");
        assert!(offsets(&h).is_empty());
        // A limit above history_size is clamped (roomcast's choice): namespace `small`
        // keeps 3.
        let small = format!("small:{r}");
        c.request(json!({"type": "subscribe", "room": small})).await;
        for i in 1..=5 {
            c.request(json!({"type": "publish", "room": small, "data": i})).await;
        }
        let h = c.request(json!({"type": "history", "room": small, "limit": 1000})).await;
        assert_eq!(offsets(&h), vec![3, 4, 5]);
        // A room never published: offset 0, and the epoch its first publication gets.
        let fresh = room("fresh", enc);
        let h = c.request(json!({"type": "history", "room": fresh})).await;
        assert_eq!(h["offset"], 0);
        assert!(offsets(&h).is_empty());
        let fresh_epoch = str_of(&h, "epoch").to_string();
        c.request(json!({"type": "subscribe", "room": fresh})).await;
        let p = c.request(json!({"type": "publish", "room": fresh, "data": 0})).await;
        assert_eq!((p["offset"].clone(), p["epoch"].clone()), (json!(1), json!(fresh_epoch)));
    }
}

#[tokio::test]
async fn rpc_refresh_and_pong() {
    let node = start_test_node(&[]);
    let url = node.ws_url();
    for enc in Enc::BOTH {
        let mut c = TestClient::connected(&url, enc).await;
        let r = c.request(json!({"type": "rpc", "method": "get_profile", "data": {"user": "bob"}})).await;
        assert_error(&r, 114);
        assert_eq!(r["temporary"], true, "114 is temporary: {r}");
        let r = c.request(json!({"type": "refresh", "token": "eyJhbGciOiJIUzI1NiJ9.e30.x"})).await;
        assert_error(&r, 108);
        // An unsolicited pong gets no reply and breaks nothing.
        c.send(json!({"type": "pong"})).await;
        let id = c.next_id();
        c.send(json!({"type": "presence_stats", "id": id, "room": "x"})).await;
        let next = c.recv().await;
        assert_eq!(next["type"], "presence_stats", "pong has no reply: {next}");
        assert_eq!(next["id"], id);
    }
}

#[tokio::test]
async fn commands_without_id_and_batches() {
    let node = start_test_node(&[]);
    let url = node.ws_url();
    for enc in Enc::BOTH {
        let r = room("batch", enc);
        let mut c = TestClient::open(&url, enc).await;
        // connect without id: connected without id.
        c.send(json!({"type": "connect"})).await;
        let m = c.recv().await;
        assert_eq!(m["type"], "connected", "{m}");
        assert!(m.get("id").is_none(), "reply to a command without id has no id: {m}");
        // Several commands in one frame, answered in order.
        c.send_batch(&[
            json!({"type": "subscribe", "id": 1, "room": r}),
            json!({"type": "publish", "id": 2, "room": r, "data": "one"}),
            json!({"type": "presence_stats", "id": 3, "room": r}),
            json!({"type": "frobnicate", "id": 4}),
            json!({"type": "history", "id": 5, "room": r}),
        ])
        .await;
        let mut replies = Vec::new();
        while replies.len() < 5 {
            let m = c.recv().await;
            if m["type"] == "publication" {
                assert_eq!(m["offset"], 1);
                continue;
            }
            replies.push(m);
        }
        let ids: Vec<u64> = replies.iter().map(|m| u64_of(m, "id")).collect();
        assert_eq!(ids, vec![1, 2, 3, 4, 5], "{replies:?}");
        let types: Vec<&str> = replies.iter().map(|m| str_of(m, "type")).collect();
        assert_eq!(types, vec!["subscribed", "published", "presence_stats", "error", "history"]);
        assert_error(&replies[3], 104);
        assert_eq!(offsets(&replies[4]), vec![1]);
        // publish and an unknown type without id: replies without id.
        c.send(json!({"type": "publish", "room": r, "data": "two"})).await;
        let m = c.recv_type("published").await;
        assert!(m.get("id").is_none(), "{m}");
        assert_eq!(m["offset"], 2);
        c.send(json!({"type": "frobnicate"})).await;
        let m = c.recv_type("error").await;
        assert_eq!(m["code"], 104);
        assert!(m.get("id").is_none(), "{m}");
        // Unknown keys are ignored.
        let m = c.request(json!({"type": "presence_stats", "room": r, "zzz_unknown": {"a": [1]}})).await;
        assert_eq!(m["type"], "presence_stats", "{m}");
    }
}

#[tokio::test]
async fn join_and_leave_pushes() {
    let node = start_test_node(&[]);
    let url = node.ws_url();
    for enc in Enc::BOTH {
        let r = room("jl", enc);
        let mut a = TestClient::connected(&url, enc).await;
        let mut b = TestClient::connected(&url, enc).await;
        a.request(json!({"type": "subscribe", "room": r})).await;
        b.request(json!({"type": "subscribe", "room": r})).await;
        let j = a.recv_type("join").await;
        assert_eq!(j["room"], r.as_str());
        assert_eq!(j["member"]["client"], b.client_id.as_str(), "{j}");
        assert_eq!(j["member"]["user"], "");
        assert!(j.get("id").is_none());
        let own = |me: String| {
            move |v: &Value| {
                (v["type"] == "join" || v["type"] == "leave") && v["member"]["client"] == me.as_str()
            }
        };
        let bid = b.client_id.clone();
        assert_none_before_round_trip(&mut b, own(bid.clone()), "join for itself").await;

        b.request(json!({"type": "unsubscribe", "room": r})).await;
        let l = a.recv_type("leave").await;
        assert_eq!(l["member"]["client"], b.client_id.as_str(), "{l}");
        assert_none_before_round_trip(&mut b, own(bid.clone()), "leave for itself").await;

        // A connection that goes away leaves too.
        let mut c = TestClient::connected(&url, enc).await;
        c.request(json!({"type": "subscribe", "room": r})).await;
        let cid = c.client_id.clone();
        assert_eq!(a.recv_type("join").await["member"]["client"], cid.as_str());
        c.close().await;
        assert_eq!(a.recv_type("leave").await["member"]["client"], cid.as_str());

        // No join/leave in a namespace with join_leave off.
        let quiet = format!("nohist:{r}");
        a.request(json!({"type": "subscribe", "room": quiet})).await;
        b.request(json!({"type": "subscribe", "room": quiet})).await;
        b.request(json!({"type": "unsubscribe", "room": quiet})).await;
        assert_none_before_round_trip(
            &mut a,
            |v| v["type"] == "join" || v["type"] == "leave",
            "join/leave in nohist",
        )
        .await;
    }
}

#[tokio::test]
async fn namespace_without_history() {
    let node = start_test_node(&[]);
    let url = node.ws_url();
    for enc in Enc::BOTH {
        let r = format!("nohist:{}", room("live", enc));
        let mut a = TestClient::connected(&url, enc).await;
        let s = a.request(json!({"type": "subscribe", "room": r})).await;
        assert_eq!(s["type"], "subscribed", "{s}");
        assert_eq!(s["recoverable"], false);
        assert!(s.get("offset").is_none() && s.get("epoch").is_none(), "{s}");
        let p = a.request(json!({"type": "publish", "room": r, "data": {"home": 2}})).await;
        assert_eq!(p["type"], "published");
        assert!(p.get("offset").is_none() && p.get("epoch").is_none(), "{p}");
        let pubm = a.recv_type("publication").await;
        assert_eq!(pubm["data"], json!({"home": 2}));
        assert!(pubm.get("offset").is_none(), "no offset without history: {pubm}");
    }
}

#[tokio::test]
async fn ping_push_and_pong() {
    let node = start_test_node(&[("ROOMCAST_PING_MS", "150"), ("ROOMCAST_PONG_TIMEOUT_MS", "2000")]);
    let url = node.ws_url();
    for enc in Enc::BOTH {
        let mut c = TestClient::connected(&url, enc).await;
        assert_eq!(c.connected["ping_ms"], 150);
        for _ in 0..3 {
            let p = c.recv_type("ping").await;
            assert_eq!(p, json!({"type": "ping"}), "a ping has only its type");
            c.send(json!({"type": "pong"})).await;
        }
        let r = c.request(json!({"type": "presence_stats", "room": "x"})).await;
        assert_eq!(r["type"], "presence_stats");
    }
}

#[tokio::test]
async fn msgpack_bin_data_reaches_json_as_base64() {
    let node = start_test_node(&[]);
    let url = node.ws_url();
    let mut mp = TestClient::connected(&url, Enc::Msgpack).await;
    let mut js = TestClient::connected(&url, Enc::Json).await;
    mp.request(json!({"type": "subscribe", "room": "bin"})).await;
    js.request(json!({"type": "subscribe", "room": "bin"})).await;
    // A publish whose data is bin 01 02 03, written by hand.
    let mut frame = Vec::new();
    let msg = rmpv::Value::Map(vec![
        ("type".into(), "publish".into()),
        ("id".into(), 77.into()),
        ("room".into(), "bin".into()),
        ("data".into(), rmpv::Value::Binary(vec![1, 2, 3])),
    ]);
    rmpv::encode::write_value(&mut frame, &msg).unwrap();
    mp.send_raw(roomcast_tests::raw_binary(frame)).await;
    let r = mp.wait_reply(&json!(77)).await;
    assert_eq!(r["type"], "published", "{r}");
    assert_eq!(js.recv_type("publication").await["data"], "AQID");
    assert_eq!(mp.recv_type("publication").await["data"], json!({"$bin": [1, 2, 3]}), "bin stays bin");
    let h = js.request(json!({"type": "history", "room": "bin"})).await;
    assert_eq!(h["publications"][0]["data"], "AQID");
}

/// A subscribed publisher gets its `published` reply before its own copy of the
/// publication (a client waiting for the reply to its id never has to set a push aside).
#[tokio::test]
async fn published_reply_comes_before_the_publishers_copy() {
    let node = start_test_node(&[]);
    for enc in Enc::BOTH {
        let mut c = TestClient::connected(&node.ws_url(), enc).await;
        let room = format!("order-{enc:?}").to_lowercase();
        let r = c.request(json!({"type": "subscribe", "room": room})).await;
        assert_eq!(r["type"], "subscribed", "{r}");
        for i in 0..20 {
            c.send(json!({"type": "publish", "id": 1000 + i, "room": room, "data": {"i": i}})).await;
            let first = c.recv().await;
            assert_eq!(
                (first["type"].clone(), first["id"].clone()),
                (json!("published"), json!(1000 + i)),
                "{enc:?}: {first}"
            );
            let second = c.recv().await;
            assert_eq!(second["type"], "publication", "{enc:?}: {second}");
            assert_eq!(second["data"], json!({"i": i}), "{enc:?}: {second}");
        }
    }
}
