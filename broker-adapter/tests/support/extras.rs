//! Behaviour every broker shares for the control channel and idempotent publishes, written
//! once over [`Broker`] and run by each broker's test file against its own nodes (two broker
//! instances on one server stand for two nodes).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use roomcast_broker::{
    Broker, BrokerPublication, HistoryOptions, HistoryQuery, Idempotent, MAX_CONTROL_PAYLOAD,
    MAX_IDEMPOTENCY_KEY,
};
use roomcast_protocol::{Data, Position, Room};

const WAIT: Duration = Duration::from_secs(20);

/// What a test's event collector saw.
pub trait Seen: Send + Sync + 'static {
    /// Control payloads, in arrival order.
    fn controls(&self) -> Vec<Vec<u8>>;
    /// Publications received in `room`.
    fn publications_in(&self, room: &Room) -> Vec<BrokerPublication>;
}

/// Polls `f` until it holds, failing after `deadline`.
pub async fn wait_for(what: &str, deadline: Duration, f: impl Fn() -> bool) {
    let end = tokio::time::Instant::now() + deadline;
    while !f() {
        assert!(tokio::time::Instant::now() < end, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn data(i: u64) -> Data {
    Data::from_serialize(&i).unwrap()
}

fn publication(room: &Room, i: u64) -> BrokerPublication {
    BrokerPublication::new(room.clone(), data(i))
}

fn control(sender: u8, i: u8) -> Vec<u8> {
    vec![b'c', sender, i, 0xff, 0x00]
}

/// Control messages of nodes `a` and `b` reach both handlers (the sender's included), each
/// sender's in the order sent; a too large payload is refused.
pub async fn control_reaches_every_node<B: Broker>(a: &B, seen_a: &dyn Seen, b: &B, seen_b: &dyn Seen) {
    let before_a = seen_a.controls().len();
    let before_b = seen_b.controls().len();
    for i in 0..20u8 {
        a.publish_control(Bytes::from(control(b'a', i))).await.unwrap();
        b.publish_control(Bytes::from(control(b'b', i))).await.unwrap();
    }
    for (name, seen, before) in [("a", seen_a, before_a), ("b", seen_b, before_b)] {
        let end = tokio::time::Instant::now() + WAIT;
        while seen.controls().len() < before + 40 {
            assert!(
                tokio::time::Instant::now() < end,
                "node {name} received {} of 40 control messages: {:?}",
                seen.controls().len() - before,
                seen.controls()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let got = seen.controls()[before..].to_vec();
        assert_eq!(got.len(), 40, "node {name}: exactly once");
        for sender in [b'a', b'b'] {
            let from: Vec<Vec<u8>> = got.iter().filter(|c| c[1] == sender).cloned().collect();
            let want: Vec<Vec<u8>> = (0..20u8).map(|i| control(sender, i)).collect();
            assert_eq!(from, want, "node {name}: one sender's messages in order");
        }
    }
    // An empty message is a message too.
    a.publish_control(Bytes::new()).await.unwrap();
    wait_for("the empty control message", WAIT, || seen_b.controls().len() == before_b + 41).await;
    assert!(seen_b.controls().last().unwrap().is_empty());
    let err = a.publish_control(Bytes::from(vec![0u8; MAX_CONTROL_PAYLOAD + 1])).await.unwrap_err();
    assert!(err.to_string().contains("control message"), "{err}");
}

/// The same key twice publishes once: the second call answers `Duplicate` with the first's
/// position, whichever node makes it; another room with the same key is independent; so are
/// rooms without history.
pub async fn same_key_twice_publishes_once<B: Broker>(
    a: &B,
    b: &B,
    seen_b: &dyn Seen,
    history: HistoryOptions,
    prefix: &str,
) {
    let window = Duration::from_secs(60);
    let r = Room::parse(&format!("{prefix}idem:twice")).unwrap();
    let other = Room::parse(&format!("{prefix}idem:other")).unwrap();
    let off = Room::parse(&format!("{prefix}idem:off")).unwrap();
    for room in [&r, &other, &off] {
        b.subscribe(room).await.unwrap();
    }
    let key = "order-42/é:{x}.*>";
    let first = a.publish_idempotent(publication(&r, 1), history, key, window).await.unwrap();
    let Idempotent::Published(Some(p1)) = first.clone() else { panic!("first call: {first:?}") };
    assert_eq!(p1.offset, 1);
    let second = a.publish_idempotent(publication(&r, 2), history, key, window).await.unwrap();
    assert_eq!(second, Idempotent::Duplicate(Some(p1.clone())));
    let third = b.publish_idempotent(publication(&r, 3), history, key, window).await.unwrap();
    assert_eq!(third, Idempotent::Duplicate(Some(p1.clone())), "another node sees the key too");
    // Another key publishes.
    let k2 = b.publish_idempotent(publication(&r, 4), history, "k2", window).await.unwrap();
    assert_eq!(k2, Idempotent::Published(Some(Position { offset: 2, epoch: p1.epoch.clone() })));
    // Same key, another room: independent.
    let o = a.publish_idempotent(publication(&other, 5), history, key, window).await.unwrap();
    assert!(matches!(&o, Idempotent::Published(Some(p)) if p.offset == 1), "{o:?}");
    // Without history: no positions, still once.
    let n1 = a.publish_idempotent(publication(&off, 6), HistoryOptions::OFF, key, window).await.unwrap();
    assert_eq!(n1, Idempotent::Published(None));
    let n2 = b.publish_idempotent(publication(&off, 7), HistoryOptions::OFF, key, window).await.unwrap();
    assert_eq!(n2, Idempotent::Duplicate(None));

    wait_for("the publications reached node b", WAIT, || {
        seen_b.publications_in(&r).len() == 2
            && seen_b.publications_in(&other).len() == 1
            && seen_b.publications_in(&off).len() == 1
    })
    .await;
    let page = a.history(&r, HistoryQuery::default(), history).await.unwrap();
    let got: Vec<(u64, Data)> =
        page.publications.iter().map(|p| (p.offset.unwrap(), p.data.clone())).collect();
    assert_eq!(got, vec![(1, data(1)), (2, data(4))], "the duplicates published nothing");
    // Nothing more arrives (a room published after them on the same connection came in).
    let fence = Room::parse(&format!("{prefix}idem:fence")).unwrap();
    b.subscribe(&fence).await.unwrap();
    a.publish(publication(&fence, 0), history).await.unwrap();
    a.publish(publication(&off, 8), HistoryOptions::OFF).await.unwrap();
    wait_for("the fences", WAIT, || {
        seen_b.publications_in(&fence).len() == 1 && seen_b.publications_in(&off).len() == 2
    })
    .await;
    assert_eq!(seen_b.publications_in(&r).len(), 2);
    let off_data: Vec<Data> = seen_b.publications_in(&off).iter().map(|p| p.data.clone()).collect();
    assert_eq!(off_data, vec![data(6), data(8)]);
}

/// Eight concurrent calls with one key, on two nodes: exactly one publishes; every call
/// answers the same position; history holds one publication.
pub async fn concurrent_calls_publish_once<B: Broker>(
    a: Arc<B>,
    b: Arc<B>,
    seen_a: &dyn Seen,
    history: HistoryOptions,
    prefix: &str,
) {
    let r = Room::parse(&format!("{prefix}idem:race")).unwrap();
    a.subscribe(&r).await.unwrap();
    let start = Arc::new(tokio::sync::Barrier::new(8));
    let mut tasks = Vec::new();
    for i in 0..8u64 {
        let node = if i % 2 == 0 { a.clone() } else { b.clone() };
        let (r, start) = (r.clone(), start.clone());
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            node.publish_idempotent(publication(&r, i), history, "the-key", Duration::from_secs(60)).await
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap().unwrap());
    }
    let published: Vec<&Idempotent> =
        results.iter().filter(|r| matches!(r, Idempotent::Published(_))).collect();
    assert_eq!(published.len(), 1, "exactly one published: {results:?}");
    let position = published[0].position().cloned().expect("a position");
    assert_eq!(position.offset, 1);
    for r in &results {
        assert_eq!(r.position(), Some(&position), "{results:?}");
    }
    let page = a.history(&r, HistoryQuery::default(), history).await.unwrap();
    assert_eq!(page.publications.len(), 1);
    assert_eq!(page.position, position);
    wait_for("the one publication delivered", WAIT, || seen_a.publications_in(&r).len() == 1).await;
}

/// Once the window passed, the key publishes again.
pub async fn the_key_publishes_again_after_the_window<B: Broker>(
    b: &B,
    history: HistoryOptions,
    prefix: &str,
) {
    let window = Duration::from_millis(300);
    let r = Room::parse(&format!("{prefix}idem:window")).unwrap();
    let first = b.publish_idempotent(publication(&r, 1), history, "w", window).await.unwrap();
    let Idempotent::Published(Some(p1)) = first else { panic!("{first:?}") };
    let dup = b.publish_idempotent(publication(&r, 2), history, "w", window).await.unwrap();
    assert_eq!(dup, Idempotent::Duplicate(Some(p1.clone())));
    let end = tokio::time::Instant::now() + WAIT;
    let mut i = 3;
    let again = loop {
        match b.publish_idempotent(publication(&r, i), history, "w", window).await.unwrap() {
            Idempotent::Duplicate(p) => assert_eq!(p, Some(p1.clone())),
            published => break published,
        }
        assert!(tokio::time::Instant::now() < end, "the key never expired");
        i += 1;
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert_eq!(again, Idempotent::Published(Some(Position { offset: 2, epoch: p1.epoch.clone() })));
    let page = b.history(&r, HistoryQuery::default(), history).await.unwrap();
    assert_eq!(page.publications.len(), 2, "the duplicates within the window published nothing");
}

/// A key of 129 bytes (or none) is an error, and publishes nothing.
pub async fn bad_keys_are_refused<B: Broker>(b: &B, history: HistoryOptions, prefix: &str) {
    let r = Room::parse(&format!("{prefix}idem:bad")).unwrap();
    let window = Duration::from_secs(60);
    let long = "k".repeat(MAX_IDEMPOTENCY_KEY + 1);
    let err = b.publish_idempotent(publication(&r, 1), history, &long, window).await.unwrap_err();
    assert!(err.to_string().contains("129 bytes"), "{err}");
    assert!(b.publish_idempotent(publication(&r, 1), history, "", window).await.is_err());
    assert!(b.publish_idempotent(publication(&r, 1), history, "k", Duration::ZERO).await.is_err());
    let page = b.history(&r, HistoryQuery::default(), history).await.unwrap();
    assert!(page.publications.is_empty());
    // 128 bytes is fine.
    let max = "k".repeat(MAX_IDEMPOTENCY_KEY);
    let ok = b.publish_idempotent(publication(&r, 1), history, &max, window).await.unwrap();
    assert!(matches!(ok, Idempotent::Published(Some(_))), "{ok:?}");
}
