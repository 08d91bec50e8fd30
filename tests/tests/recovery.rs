//! History positions and recovery (spec section 4): recovered or not, all or nothing, and
//! no gap and no duplicate between a `subscribed` reply and the live publications after
//! it, also while other clients publish during the subscribe.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use roomcast_tests::{
    Enc, NO_RATE_LIMITS, NodeOptions, NodeProc, TestClient, Value, json, offsets, start_test_node, str_of,
    u64_of, within,
};

fn sfx(enc: Enc) -> &'static str {
    if enc.is_binary() { "mp" } else { "js" }
}

/// Publishes `data` from `p` (subscribed to `room`) and returns the offset.
async fn publish(p: &mut TestClient, room: &str, data: Value) -> u64 {
    let r = p.request(json!({"type": "publish", "room": room, "data": data, "skip_self": true})).await;
    assert_eq!(r["type"], "published", "{r}");
    u64_of(&r, "offset")
}

/// The next publication on `c` must have `offset`.
async fn expect_next_publication(c: &mut TestClient, offset: u64) -> Value {
    let p = c.recv_type("publication").await;
    assert_eq!(p["offset"], offset, "the first live publication continues the position: {p}");
    p
}

#[tokio::test]
async fn recovered_true_then_live_continues() {
    let node = start_test_node(&[]);
    let url = node.ws_url();
    for enc in Enc::BOTH {
        let room = format!("rec-{}", sfx(enc));
        let mut p = TestClient::connected(&url, enc).await;
        let mut x = TestClient::connected(&url, enc).await;
        // A room never published: offset 0 and the epoch the first publication carries.
        let s = x.request(json!({"type": "subscribe", "room": room})).await;
        assert_eq!((s["offset"].clone(), s["recoverable"].clone()), (json!(0), json!(true)), "{s}");
        let epoch = str_of(&s, "epoch").to_string();
        p.request(json!({"type": "subscribe", "room": room})).await;
        let first =
            p.request(json!({"type": "publish", "room": room, "data": {"n": 1}, "skip_self": true})).await;
        assert_eq!((first["offset"].clone(), first["epoch"].clone()), (json!(1), json!(epoch)));
        for n in 2..=3 {
            assert_eq!(publish(&mut p, &room, json!({"n": n})).await, n);
        }
        for n in 1..=3 {
            expect_next_publication(&mut x, n).await;
        }
        x.request(json!({"type": "unsubscribe", "room": room})).await;
        for n in 4..=7 {
            publish(&mut p, &room, json!({"n": n})).await;
        }
        let s = x
            .request(json!({"type": "subscribe", "room": room, "recover": {"offset": 3, "epoch": epoch}}))
            .await;
        assert_eq!(s["type"], "subscribed", "{s}");
        assert_eq!(s["recovered"], true, "{s}");
        assert_eq!((s["offset"].clone(), s["epoch"].clone()), (json!(7), json!(epoch)));
        assert_eq!(offsets(&s), vec![4, 5, 6, 7], "missed publications in offset order");
        for (i, pb) in s["publications"].as_array().unwrap().iter().enumerate() {
            assert_eq!(pb["data"], json!({"n": i + 4}));
            assert_eq!(pb["room"], room.as_str());
            assert_eq!(pb["info"]["client"], p.client_id.as_str());
        }
        publish(&mut p, &room, json!({"n": 8})).await;
        assert_eq!(expect_next_publication(&mut x, 8).await["data"], json!({"n": 8}));

        // Recovering at the current position: recovered, nothing to replay.
        x.request(json!({"type": "unsubscribe", "room": room})).await;
        let s = x
            .request(json!({"type": "subscribe", "room": room, "recover": {"offset": 8, "epoch": epoch}}))
            .await;
        assert_eq!(s["recovered"], true, "{s}");
        assert_eq!(s["offset"], 8);
        assert!(offsets(&s).is_empty(), "{s}");
        publish(&mut p, &room, json!({"n": 9})).await;
        expect_next_publication(&mut x, 9).await;

        // Recovering from 0 in the same epoch replays everything (9 <= recover_max 100).
        x.request(json!({"type": "unsubscribe", "room": room})).await;
        let s = x
            .request(json!({"type": "subscribe", "room": room, "recover": {"offset": 0, "epoch": epoch}}))
            .await;
        assert_eq!(s["recovered"], true, "{s}");
        assert_eq!(offsets(&s), (1..=9).collect::<Vec<_>>());
    }
}

#[tokio::test]
async fn recovered_false_cases() {
    let node = start_test_node(&[]);
    let url = node.ws_url();
    for enc in Enc::BOTH {
        let mut p = TestClient::connected(&url, enc).await;
        let mut x = TestClient::connected(&url, enc).await;

        // Wrong epoch.
        let room = format!("epoch-{}", sfx(enc));
        p.request(json!({"type": "subscribe", "room": room})).await;
        for n in 1..=4 {
            publish(&mut p, &room, json!(n)).await;
        }
        let s = x
            .request(json!({"type": "subscribe", "room": room, "recover": {"offset": 2, "epoch": "not-it"}}))
            .await;
        assert_eq!(s["type"], "subscribed", "{s}");
        assert_eq!(s["recovered"], false, "{s}");
        assert!(s.get("publications").is_none(), "never a partial replay: {s}");
        assert_eq!(s["offset"], 4, "the current position: {s}");
        assert!(s["epoch"].is_string() && s["epoch"] != "not-it");
        publish(&mut p, &room, json!(5)).await;
        expect_next_publication(&mut x, 5).await;

        // Namespace `small`: history_size 3, recover_max 2.
        let small = format!("small:{}", sfx(enc));
        p.request(json!({"type": "subscribe", "room": small})).await;
        let mut epoch = String::new();
        for n in 1..=10 {
            let r = p.request(json!({"type": "publish", "room": small, "data": n, "skip_self": true})).await;
            epoch = str_of(&r, "epoch").to_string();
        }
        let mut top = 10;
        // (how far behind the current position, recovered?): history keeps the last 3,
        // recovery returns at most 2.
        for (behind, recovered) in [(8u64, false), (3, false), (2, true), (0, true), (1, true)] {
            let from = top - behind;
            let s = x
                .request(
                    json!({"type": "subscribe", "room": small, "recover": {"offset": from, "epoch": epoch}}),
                )
                .await;
            assert_eq!(s["recovered"], recovered, "recover from {from} at {top}: {s}");
            assert_eq!(s["offset"], top, "{s}");
            assert_eq!(s["epoch"], epoch.as_str());
            if recovered {
                assert_eq!(offsets(&s), ((from + 1)..=top).collect::<Vec<_>>(), "{s}");
            } else {
                assert!(s.get("publications").is_none(), "never a partial replay: {s}");
            }
            // The first live publication after any subscribed is offset + 1.
            top += 1;
            assert_eq!(publish(&mut p, &small, json!(top)).await, top);
            expect_next_publication(&mut x, top).await;
            x.request(json!({"type": "unsubscribe", "room": small})).await;
        }
        // A position ahead of the room (a client confused about the room): not
        // recoverable, since no such position exists in this epoch.
        let s = x
            .request(
                json!({"type": "subscribe", "room": small, "recover": {"offset": top + 50, "epoch": epoch}}),
            )
            .await;
        assert_eq!(s["recovered"], false, "{s}");
        assert_eq!(s["offset"], top);
        x.request(json!({"type": "unsubscribe", "room": small})).await;
        // A room without history ignores recover: not recoverable, not recovered.
        let live = format!("nohist:{}", sfx(enc));
        let s = x
            .request(json!({"type": "subscribe", "room": live, "recover": {"offset": 1, "epoch": "e"}}))
            .await;
        assert_eq!(s["recoverable"], false, "{s}");
        assert!(s["recovered"] != true, "{s}");
        assert!(offsets(&s).is_empty());
    }
}

/// One subscriber's rounds: subscribe (fresh, or recovering from its last position),
/// read a few live publications, unsubscribe. Checks that every reply's publications
/// followed by the live ones are exactly the next offsets. Returns what it saw (offset →
/// data) and how many recoveries succeeded.
async fn subscriber_rounds(
    url: String,
    enc: Enc,
    room: String,
    rounds: usize,
    live_per_round: usize,
) -> (BTreeMap<u64, Value>, usize, usize) {
    let mut c = TestClient::connected(&url, enc).await;
    let mut seen: BTreeMap<u64, Value> = BTreeMap::new();
    let mut last: Option<(u64, String)> = None;
    let (mut recovered_n, mut not_recovered_n) = (0, 0);
    for round in 0..rounds {
        // Rounds alternate: fresh, recover from the last position, fresh, recover with a
        // wrong epoch (must not recover), …
        let recover = match round % 4 {
            1 => last.clone(),
            3 => last.clone().map(|(o, _)| (o, "wrong-epoch".to_string())),
            _ => None,
        };
        let cmd = match &recover {
            Some((o, e)) => json!({"type": "subscribe", "room": room, "recover": {"offset": o, "epoch": e}}),
            None => json!({"type": "subscribe", "room": room}),
        };
        let s = c.request(cmd).await;
        assert_eq!(s["type"], "subscribed", "round {round}: {s}");
        let epoch = str_of(&s, "epoch").to_string();
        let top = u64_of(&s, "offset");
        // `next`: the offset the next publication must have.
        let mut next = match (&recover, s["recovered"].as_bool()) {
            (Some((o, e)), Some(true)) => {
                recovered_n += 1;
                assert_eq!(&epoch, e, "round {round}");
                let pubs = s["publications"].as_array().cloned().unwrap_or_default();
                let mut expect = o + 1;
                for p in &pubs {
                    assert_eq!(
                        u64_of(p, "offset"),
                        expect,
                        "round {round}: gap or duplicate in the replay: {s}"
                    );
                    seen.insert(expect, p["data"].clone());
                    expect += 1;
                }
                assert_eq!(expect, top + 1, "round {round}: the replay ends at the reported offset: {s}");
                expect
            }
            (Some(_), other) => {
                // Always for the wrong epoch; with the right one only if more than
                // recover_max were missed meanwhile.
                assert_eq!(other, Some(false), "round {round}: `recovered` must be present: {s}");
                assert!(s.get("publications").is_none(), "round {round}: {s}");
                not_recovered_n += 1;
                top + 1
            }
            (None, _) => {
                assert!(s.get("recovered").is_none() && s.get("publications").is_none(), "{s}");
                top + 1
            }
        };
        for _ in 0..live_per_round {
            let p = c.recv_type("publication").await;
            assert_eq!(
                u64_of(&p, "offset"),
                next,
                "round {round} ({enc:?}, recover {recover:?}): gap or duplicate"
            );
            seen.insert(next, p["data"].clone());
            next += 1;
        }
        let u = c.request(json!({"type": "unsubscribe", "room": room})).await;
        assert_eq!(u["type"], "unsubscribed");
        // Publications queued before the unsubscribe reply continue the sequence too.
        for p in c.take_buffered() {
            if p["type"] == "publication" {
                assert_eq!(u64_of(&p, "offset"), next, "round {round}: before unsubscribed");
                seen.insert(next, p["data"].clone());
                next += 1;
            }
        }
        last = Some((next - 1, epoch));
    }
    // After the last unsubscribe, nothing more arrives for the room.
    let r = c.request(json!({"type": "presence_stats", "room": room})).await;
    assert_eq!(r["type"], "presence_stats");
    assert!(c.take_buffered().iter().all(|m| m["type"] != "publication"), "publication after unsubscribe");
    (seen, recovered_n, not_recovered_n)
}

/// Publication pushes among `c`'s buffered messages, appended to `seen`.
fn record(c: &mut TestClient, seen: &mut Vec<(u64, Value)>) {
    for m in c.take_buffered() {
        if m["type"] == "publication" {
            seen.push((u64_of(&m, "offset"), m["data"].clone()));
        }
    }
}

/// A client that stays subscribed and publishes continuously (its `p` tag in the data)
/// until `stop`, recording every publication it sees, its own included, in arrival order.
async fn publisher_loop(
    url: String,
    enc: Enc,
    room: String,
    tag: u64,
    stop: Arc<AtomicBool>,
) -> (TestClient, Vec<(u64, Value)>) {
    let mut c = TestClient::connected(&url, enc).await;
    c.request(json!({"type": "subscribe", "room": room})).await;
    let mut seen: Vec<(u64, Value)> = Vec::new();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        // Several publishes per frame, pipelined, so that many land during each
        // subscribe of the other clients.
        let batch: Vec<Value> = (0..8)
            .map(|_| {
                n += 1;
                json!({"type": "publish", "id": n, "room": room, "data": {"p": tag, "n": n}})
            })
            .collect();
        c.send_batch(&batch).await;
        for cmd in &batch {
            let r = c.wait_reply(&cmd["id"]).await;
            assert_eq!(r["type"], "published", "{r}");
        }
        record(&mut c, &mut seen);
    }
    (c, seen)
}

/// The hard one: while two clients publish continuously into a room, subscribers
/// subscribe again and again (fresh, and recovering from their last position), each
/// round checking offsets O+1, O+2, … with no gap and no duplicate; and every subscriber
/// sees the same publication at each offset, in the same order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishing_during_subscribe() {
    const ROUNDS_PER_SUBSCRIBER: usize = 100;
    let node = NodeProc::start(NodeOptions::with_config(NO_RATE_LIMITS));
    let url = node.ws_url();
    let room = "hot".to_string();
    let stop = Arc::new(AtomicBool::new(false));

    let publishers: Vec<_> = [(Enc::Json, 1), (Enc::Msgpack, 2)]
        .into_iter()
        .map(|(enc, tag)| tokio::spawn(publisher_loop(url.clone(), enc, room.clone(), tag, stop.clone())))
        .collect();
    // Wait until both publish (the room has publications from each) before the rounds.
    let mut probe = TestClient::connected(&url, Enc::Json).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let h = probe.request(json!({"type": "history", "room": room, "limit": 100})).await;
        let tags: std::collections::HashSet<u64> =
            h["publications"].as_array().unwrap().iter().filter_map(|p| p["data"]["p"].as_u64()).collect();
        if tags.len() == 2 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the publishers did not start");
    }

    let subscribers: Vec<_> = Enc::BOTH
        .into_iter()
        .map(|enc| tokio::spawn(subscriber_rounds(url.clone(), enc, room.clone(), ROUNDS_PER_SUBSCRIBER, 5)))
        .collect();
    let mut views = Vec::new();
    let (mut recovered, mut not_recovered) = (0, 0);
    for s in subscribers {
        let (seen, r, nr) = within(Duration::from_secs(90), "the subscriber rounds", s).await.unwrap();
        recovered += r;
        not_recovered += nr;
        views.push(seen);
    }
    stop.store(true, Ordering::Relaxed);
    let mut stopped = Vec::new();
    for p in publishers {
        stopped.push(within(Duration::from_secs(30), "the publishers", p).await.unwrap());
    }
    // Every publisher has stopped: read each one's view up to the final position.
    let top = u64_of(&probe.request(json!({"type": "history", "room": room, "limit": 0})).await, "offset");
    let mut full = Vec::new();
    for (mut c, mut seen) in stopped {
        while seen.last().map(|s| s.0) != Some(top) {
            let m = c.recv_type("publication").await;
            seen.push((u64_of(&m, "offset"), m["data"].clone()));
        }
        full.push(seen);
    }
    eprintln!(
        "{} rounds; recoveries: {recovered} recovered, {not_recovered} not; {} publications",
        2 * ROUNDS_PER_SUBSCRIBER,
        full[0].len()
    );
    assert!(recovered > 0, "no round recovered: the test did not exercise recovery");

    // Each publisher saw every publication of the room, in offset order, exactly once,
    // and both saw the same publication at each offset.
    for seen in &full {
        let offs: Vec<u64> = seen.iter().map(|s| s.0).collect();
        let first = offs[0];
        assert_eq!(offs, (first..=top).collect::<Vec<_>>(), "a publisher saw a gap, duplicate or reordering");
    }
    let by_offset: BTreeMap<u64, Value> = full[0].iter().cloned().collect();
    for (o, d) in &full[1] {
        if let Some(d0) = by_offset.get(o) {
            assert_eq!(d0, d, "two subscribers disagree on offset {o}");
        }
    }
    // Each publisher's own publications appear in the order it made them.
    for tag in [1u64, 2] {
        let ns: Vec<u64> =
            full[0].iter().filter(|(_, d)| d["p"] == tag).map(|(_, d)| d["n"].as_u64().unwrap()).collect();
        assert!(ns.windows(2).all(|w| w[0] < w[1]), "publisher {tag}'s publications out of order");
    }
    // The round subscribers saw the same publication at every offset.
    for view in &views {
        assert!(!view.is_empty());
        for (o, d) in view {
            if let Some(d0) = by_offset.get(o) {
                assert_eq!(d0, d, "a round subscriber disagrees on offset {o}");
            }
        }
    }
}
