//! `NatsBroker` against a real `nats-server` (JetStream), one server per test. Several
//! broker instances on one server stand for several nodes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/nats_server.rs"]
mod nats_server;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use nats_server::{NatsServer, wait_until};
use parking_lot::Mutex;
use roomcast_broker::nats::{NatsBroker, NatsBrokerConfig, room_token};
use roomcast_broker::{
    Broker, BrokerEventHandler, BrokerPublication, HistoryOptions, HistoryPage, HistoryQuery, RoomEvent,
};
use roomcast_protocol::{Data, Member, Position, PublisherInfo, Room};

const WAIT: Duration = Duration::from_secs(20);

#[derive(Default)]
struct Collect {
    pubs: Mutex<Vec<BrokerPublication>>,
    events: Mutex<Vec<(Room, RoomEvent)>>,
    interruptions: AtomicUsize,
}

impl BrokerEventHandler for Collect {
    fn handle_publication(&self, p: &BrokerPublication) {
        self.pubs.lock().push(p.clone());
    }
    fn handle_room_event(&self, room: &Room, event: &RoomEvent) {
        self.events.lock().push((room.clone(), event.clone()));
    }
    fn handle_interruption(&self) {
        self.interruptions.fetch_add(1, Ordering::SeqCst);
    }
}

impl Collect {
    fn offsets(&self, room: &Room) -> Vec<Option<u64>> {
        self.pubs.lock().iter().filter(|p| &p.room == room).map(|p| p.offset).collect()
    }
    fn count(&self, room: &Room) -> usize {
        self.pubs.lock().iter().filter(|p| &p.room == room).count()
    }
}

struct Node {
    broker: NatsBroker,
    seen: Arc<Collect>,
}

async fn node(server: &NatsServer) -> Node {
    let broker = NatsBroker::connect(NatsBrokerConfig::new(server.url())).await.unwrap();
    let seen = Arc::new(Collect::default());
    broker.start(seen.clone()).await.unwrap();
    Node { broker, seen }
}

fn room(name: &str) -> Room {
    Room::parse(name).unwrap()
}

fn data(v: impl Into<serde_json::Value>) -> Data {
    Data::from_serialize(&v.into()).unwrap()
}

fn opts(size: usize, ttl: Duration) -> HistoryOptions {
    HistoryOptions { size, ttl }
}

const H: HistoryOptions = HistoryOptions { size: 1000, ttl: Duration::from_secs(600) };

async fn publish(
    b: &NatsBroker,
    r: &Room,
    v: impl Into<serde_json::Value>,
    h: HistoryOptions,
) -> Option<Position> {
    b.publish(BrokerPublication::new(r.clone(), data(v)), h).await.unwrap()
}

fn offsets(page: &HistoryPage) -> Vec<u64> {
    page.publications.iter().map(|p| p.offset.unwrap()).collect()
}

fn since(offset: u64, epoch: &str, limit: Option<usize>, reverse: bool) -> HistoryQuery {
    HistoryQuery { since: Some(Position { offset, epoch: epoch.into() }), limit, reverse }
}

fn plain(limit: Option<usize>, reverse: bool) -> HistoryQuery {
    HistoryQuery { since: None, limit, reverse }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishers_on_several_nodes_get_contiguous_offsets_and_one_order() {
    let server = NatsServer::start();
    let nodes = [node(&server).await, node(&server).await, node(&server).await];
    let r = room("chat:lobby.1");
    for n in &nodes {
        n.broker.subscribe(&r).await.unwrap();
    }
    // 3 nodes x 4 concurrent tasks x 10 publications.
    let mut tasks = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        for t in 0..4 {
            let b = n.broker.clone();
            let r = r.clone();
            tasks.push(tokio::spawn(async move {
                let mut got = Vec::new();
                for k in 0..10 {
                    let label = format!("n{i}t{t}k{k}");
                    let mut p = BrokerPublication::new(r.clone(), data(label.as_str()));
                    p.info = Some(PublisherInfo { client: format!("c{i}"), user: "u".into() });
                    got.push((b.publish(p, H).await.unwrap().unwrap(), label));
                }
                got
            }));
        }
    }
    let mut published = Vec::new();
    for t in tasks {
        published.extend(t.await.unwrap());
    }
    let total = published.len() as u64;
    assert_eq!(total, 120);
    let epoch = published[0].0.epoch.clone();
    assert!(published.iter().all(|(p, _)| p.epoch == epoch), "one epoch");
    let mut offs: Vec<u64> = published.iter().map(|(p, _)| p.offset).collect();
    offs.sort_unstable();
    assert_eq!(offs, (1..=total).collect::<Vec<_>>(), "every offset once, no gap");

    // Every node received all of them, in offset order, in the same order.
    for n in &nodes {
        wait_until("every node received everything", WAIT, || n.seen.count(&r) == total as usize).await;
    }
    let order = |n: &Node| -> Vec<(u64, Data)> {
        n.seen.pubs.lock().iter().map(|p| (p.offset.unwrap(), p.data.clone())).collect()
    };
    let first = order(&nodes[0]);
    assert_eq!(first.iter().map(|(o, _)| *o).collect::<Vec<_>>(), (1..=total).collect::<Vec<_>>());
    for n in &nodes[1..] {
        assert_eq!(order(n), first, "same order on every node");
    }
    // The offsets the publishers got are those the subscribers saw with their data.
    for (pos, label) in &published {
        assert_eq!(first[(pos.offset - 1) as usize].1, data(label.as_str()));
    }
    assert!(
        nodes[0]
            .seen
            .pubs
            .lock()
            .iter()
            .all(|p| p.epoch.as_deref() == Some(epoch.as_str()) && p.info.is_some())
    );
    // History order is fan-out order.
    let page = nodes[2].broker.history(&r, plain(None, false), H).await.unwrap();
    assert_eq!(page.position, Position { offset: total, epoch });
    let hist: Vec<(u64, Data)> =
        page.publications.iter().map(|p| (p.offset.unwrap(), p.data.clone())).collect();
    assert_eq!(hist, first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_before_read_never_opens_a_gap() {
    let server = NatsServer::start();
    let a = node(&server).await;
    let b = node(&server).await;
    for round in 0..3 {
        let r = room(&format!("feed:r{round}"));
        const N: u64 = 150;
        let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let publisher = {
            let (pa, r, sent) = (a.broker.clone(), r.clone(), sent.clone());
            tokio::spawn(async move {
                for i in 1..=N {
                    publish(&pa, &r, i, H).await;
                    sent.store(i, Ordering::SeqCst);
                }
            })
        };
        // Subscribe while the other node keeps publishing, then read the position.
        let start_at = 10 + round * 40;
        wait_until("the publisher got going", WAIT, || sent.load(Ordering::SeqCst) >= start_at).await;
        b.broker.subscribe(&r).await.unwrap();
        let page = b.broker.history(&r, plain(Some(0), false), H).await.unwrap();
        let at = page.position.offset;
        publisher.await.unwrap();
        wait_until("the live tail arrived", WAIT, || b.seen.offsets(&r).last() == Some(&Some(N))).await;
        let live: Vec<u64> = b.seen.offsets(&r).into_iter().map(Option::unwrap).collect();
        let after: Vec<u64> = live.iter().copied().filter(|o| *o > at).collect();
        assert_eq!(after, (at + 1..=N).collect::<Vec<_>>(), "round {round}: gap after position {at}");
        // Recovering from a little before that position is continuable and exact.
        let from = at.saturating_sub(5);
        let rec = b.broker.history(&r, since(from, &page.position.epoch, Some(100), false), H).await.unwrap();
        if at > 0 {
            assert!(rec.continuable);
            assert_eq!(offsets(&rec), (from + 1..=(from + 100).min(N)).collect::<Vec<_>>());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_since_limit_reverse_and_continuable() {
    history_reads(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_reads_from_the_stream_leader_too() {
    history_reads(false).await;
}

async fn history_reads(direct_get: bool) {
    let server = NatsServer::start();
    let mut config = NatsBrokerConfig::new(server.url());
    config.direct_get = direct_get;
    let broker = NatsBroker::connect(config).await.unwrap();
    broker.start(Arc::new(Collect::default())).await.unwrap();
    let b = &broker;
    let h5 = opts(5, Duration::from_secs(600));

    // An empty room: offset 0 and the epoch its first publication will carry.
    let r = room("hist:small");
    let empty = b.history(&r, plain(None, false), h5).await.unwrap();
    assert_eq!(empty.position.offset, 0);
    assert!(empty.publications.is_empty() && empty.continuable);
    let again = b.history(&r, plain(Some(0), false), h5).await.unwrap();
    assert_eq!(again.position, empty.position, "stable until published");
    let zero = b.history(&r, since(0, &empty.position.epoch, None, false), h5).await.unwrap();
    assert!(zero.continuable);
    let first = publish(b, &r, 1, h5).await.unwrap();
    assert_eq!(first, Position { offset: 1, epoch: empty.position.epoch.clone() });
    for i in 2..=12 {
        assert_eq!(publish(b, &r, i, h5).await.unwrap().offset, i);
    }
    let e = first.epoch.as_str();
    // Kept: 8..=12.
    let rr = &r;
    let q = |q: HistoryQuery| async move { b.history(rr, q, h5).await.unwrap() };
    assert_eq!(offsets(&q(plain(None, false)).await), vec![8, 9, 10, 11, 12]);
    assert_eq!(offsets(&q(plain(Some(2), false)).await), vec![8, 9]);
    assert_eq!(offsets(&q(plain(Some(2), true)).await), vec![12, 11]);
    assert_eq!(offsets(&q(plain(None, true)).await), vec![12, 11, 10, 9, 8]);
    let p = q(plain(Some(0), false)).await;
    assert!(p.publications.is_empty());
    assert_eq!(p.position, Position { offset: 12, epoch: e.into() });
    let page = q(since(9, e, None, false)).await;
    assert!(page.continuable);
    assert_eq!(offsets(&page), vec![10, 11, 12]);
    assert_eq!(page.publications[0].data, data(10));
    let top = q(since(12, e, None, false)).await;
    assert!(top.continuable && top.publications.is_empty());
    let edge = q(since(7, e, None, false)).await;
    assert!(edge.continuable);
    assert_eq!(offsets(&edge), vec![8, 9, 10, 11, 12]);
    for gone in [
        since(6, e, None, false),
        since(13, e, None, false),
        since(10, "other", None, false),
        since(6, e, Some(0), false),
        since(6, e, Some(2), true),
    ] {
        let page = q(gone.clone()).await;
        assert!(!page.continuable && page.publications.is_empty(), "{gone:?}");
        assert_eq!(page.position.offset, 12);
    }
    assert!(q(since(9, e, Some(0), false)).await.continuable);
    assert_eq!(offsets(&q(since(7, e, Some(2), true)).await), vec![12, 11]);
    assert_eq!(offsets(&q(since(7, e, Some(2), false)).await), vec![8, 9]);

    // Longer ranges (read through a consumer), with two rooms interleaved in the stream.
    let h = opts(200, Duration::from_secs(600));
    let (ra, rb) = (room("hist:a"), room("hist:b"));
    for i in 1..=100u64 {
        publish(b, &ra, i, h).await;
        publish(b, &rb, 1000 + i, h).await;
        if i % 3 == 0 {
            publish(b, &rb, 2000 + i, h).await;
        }
    }
    let ea = b.history(&ra, plain(Some(0), false), h).await.unwrap().position.epoch;
    let ra_ = &ra;
    let qa = |q: HistoryQuery| async move { b.history(ra_, q, h).await.unwrap() };
    let range = |a: u64, z: u64| (a..=z).collect::<Vec<_>>();
    let rev = |a: u64, z: u64| (a..=z).rev().collect::<Vec<_>>();
    let all = qa(plain(None, false)).await;
    assert_eq!(offsets(&all), range(1, 100));
    assert!(all.publications.iter().enumerate().all(|(i, p)| p.data == data(i as u64 + 1)));
    assert_eq!(offsets(&qa(plain(Some(30), false)).await), range(1, 30));
    assert_eq!(offsets(&qa(since(10, &ea, Some(50), false)).await), range(11, 60));
    assert_eq!(offsets(&qa(since(30, &ea, None, false)).await), range(31, 100));
    assert_eq!(offsets(&qa(since(90, &ea, None, false)).await), range(91, 100));
    assert_eq!(offsets(&qa(plain(Some(40), true)).await), rev(61, 100));
    assert_eq!(offsets(&qa(since(50, &ea, Some(30), true)).await), rev(71, 100));
    assert_eq!(offsets(&qa(since(0, &ea, None, true)).await), rev(1, 100));
    let pb = b.history(&rb, plain(None, false), h).await.unwrap();
    assert_eq!(offsets(&pb), range(1, 133));

    // Trimmed by size: kept 31..=50.
    let h20 = opts(20, Duration::from_secs(600));
    let rc = room("hist:c");
    for i in 1..=50u64 {
        publish(b, &rc, i, h20).await;
    }
    let ec = b.history(&rc, plain(Some(0), false), h20).await.unwrap().position.epoch;
    let rc_ = &rc;
    let qc = |q: HistoryQuery| async move { b.history(rc_, q, h20).await.unwrap() };
    let p = qc(since(30, &ec, Some(5), false)).await;
    assert!(p.continuable);
    assert_eq!(offsets(&p), range(31, 35));
    assert!(!qc(since(29, &ec, Some(5), false)).await.continuable);
    assert!(!qc(since(29, &ec, None, false)).await.continuable);
    assert!(!qc(since(29, &ec, Some(3), true)).await.continuable);
    assert_eq!(offsets(&qc(plain(Some(3), false)).await), range(31, 33));
    assert_eq!(offsets(&qc(plain(None, true)).await), rev(31, 50));
    assert_eq!(offsets(&qc(since(40, &ec, Some(100), false)).await), range(41, 50));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_legal_room_character_works() {
    let server = NatsServer::start();
    let a = node(&server).await;
    let b = node(&server).await;
    let all = "ABCXYZabcxyz0189._-:@=,/";
    let mut long = String::from("ns:");
    while long.len() < 200 {
        long.push_str(all);
    }
    long.truncate(200);
    let names = [
        "a.b",
        "a..b",
        ".",
        "..",
        "ns:x.y",
        "a/b",
        "a@b",
        "a=b",
        "a,b",
        "_",
        "a_2E",
        "a.",
        "a_5F",
        "a:b:c",
        "-",
        "/",
        "=",
        ",",
        "@",
        "x.y_z-1@host=,/",
        &long,
    ];
    let rooms: Vec<Room> = names.iter().map(|n| room(n)).collect();
    let tokens: HashSet<String> = rooms.iter().map(|r| room_token(r)).collect();
    assert_eq!(tokens.len(), rooms.len(), "unique tokens");
    for r in &rooms {
        b.broker.subscribe(r).await.unwrap();
    }
    for (i, r) in rooms.iter().enumerate() {
        let p = publish(&a.broker, r, i, H).await.unwrap();
        assert_eq!(p.offset, 1, "{r}");
        assert!(publish(&a.broker, r, "plain", HistoryOptions::OFF).await.is_none());
        let m = Member { client: format!("c{i}"), user: "u".into(), info: None, room_info: None };
        a.broker.publish_event(r, RoomEvent::Join(m)).await.unwrap();
    }
    for (i, r) in rooms.iter().enumerate() {
        wait_until("each room's publications arrive", WAIT, || b.seen.count(r) == 2).await;
        assert_eq!(b.seen.offsets(r), vec![Some(1), None], "{r}");
        let page = b.broker.history(r, plain(None, false), H).await.unwrap();
        assert_eq!(page.publications.len(), 1, "{r}");
        assert_eq!(page.publications[0].data, data(i));
        assert_eq!(&page.publications[0].room, r);
    }
    wait_until("join events arrive", WAIT, || b.seen.events.lock().len() == rooms.len()).await;
    for (r, ev) in b.seen.events.lock().iter() {
        let i = rooms.iter().position(|x| x == r).unwrap();
        assert!(matches!(ev, RoomEvent::Join(m) if m.client == format!("c{i}")), "{r}");
    }
    // remove_history works on every name too.
    for r in &rooms {
        a.broker.remove_history(r).await.unwrap();
        assert_eq!(a.broker.history(r, plain(None, false), H).await.unwrap().position.offset, 0, "{r}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_history_no_offsets_and_events_fan_out() {
    let server = NatsServer::start();
    let a = node(&server).await;
    let b = node(&server).await;
    let r = room("nohist:x");
    b.broker.subscribe(&r).await.unwrap();
    a.broker.subscribe(&r).await.unwrap();
    for i in 0..5 {
        assert!(publish(&a.broker, &r, i, HistoryOptions::OFF).await.is_none());
    }
    let m = Member {
        client: "c1".into(),
        user: "u1".into(),
        info: Some(data(serde_json::json!({"name": "x"}))),
        room_info: Some(data(7)),
    };
    a.broker.publish_event(&r, RoomEvent::Join(m.clone())).await.unwrap();
    a.broker.publish_event(&r, RoomEvent::Leave(m.clone())).await.unwrap();
    for n in [&a, &b] {
        wait_until("publications and events arrive", WAIT, || {
            n.seen.count(&r) == 5 && n.seen.events.lock().len() == 2
        })
        .await;
        assert_eq!(n.seen.offsets(&r), vec![None; 5]);
        let got: Vec<Data> = n.seen.pubs.lock().iter().map(|p| p.data.clone()).collect();
        assert_eq!(got, (0..5).map(data).collect::<Vec<_>>());
        let evs = n.seen.events.lock().clone();
        assert_eq!(
            evs,
            vec![(r.clone(), RoomEvent::Join(m.clone())), (r.clone(), RoomEvent::Leave(m.clone()))]
        );
    }
    // Unsubscribed: nothing more for that room.
    b.broker.unsubscribe(&r).await.unwrap();
    let other = room("nohist:y");
    b.broker.subscribe(&other).await.unwrap();
    publish(&a.broker, &r, "late", HistoryOptions::OFF).await;
    publish(&a.broker, &other, "marker", HistoryOptions::OFF).await;
    wait_until("the other room's publication arrives", WAIT, || b.seen.count(&other) == 1).await;
    wait_until("a still gets it", WAIT, || a.seen.count(&r) == 6).await;
    assert_eq!(b.seen.count(&r), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_and_remove_history_start_new_epochs() {
    let server = NatsServer::start();
    let n = node(&server).await;
    let b = &n.broker;
    let r = room("ttl:r");
    let short = opts(10, Duration::from_millis(1500));
    let p1 = publish(b, &r, 1, short).await.unwrap();
    let p2 = publish(b, &r, 2, short).await.unwrap();
    assert_eq!((p2.offset, &p2.epoch), (2, &p1.epoch));
    // Wait until everything expired: offset 0 and a new epoch.
    let mut page = None;
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio::time::Instant::now() < deadline {
        let p = b.history(&r, plain(None, false), short).await.unwrap();
        if p.position.offset == 0 {
            page = Some(p);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let page = page.expect("history expired");
    assert_ne!(page.position.epoch, p1.epoch);
    let stale = b.history(&r, since(2, &p1.epoch, None, false), short).await.unwrap();
    assert!(!stale.continuable);
    let p3 = publish(b, &r, 3, short).await.unwrap();
    assert_eq!(p3, Position { offset: 1, epoch: page.position.epoch.clone() });

    // remove_history: the next publication starts a new epoch at 1.
    let r2 = room("rm:r");
    for i in 1..=3 {
        publish(b, &r2, i, H).await;
    }
    let before = b.history(&r2, plain(Some(0), false), H).await.unwrap().position;
    assert_eq!(before.offset, 3);
    b.remove_history(&r2).await.unwrap();
    let after = b.history(&r2, plain(None, false), H).await.unwrap();
    assert_eq!(after.position.offset, 0);
    assert_ne!(after.position.epoch, before.epoch);
    // Another node, with no cache of the room, continues correctly.
    let other = node(&server).await;
    let p = publish(&other.broker, &r2, 4, H).await.unwrap();
    assert_eq!(p, Position { offset: 1, epoch: after.position.epoch.clone() });
    // And the first node, whose cache said offset 3, does not reuse the old epoch.
    let p = publish(b, &r2, 5, H).await.unwrap();
    assert_eq!(p, Position { offset: 2, epoch: after.position.epoch });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restarted_empty_means_a_new_epoch_and_an_interruption() {
    let mut server = NatsServer::start();
    let a = node(&server).await;
    let b = node(&server).await;
    let r = room("restart:r");
    a.broker.subscribe(&r).await.unwrap();
    b.broker.subscribe(&r).await.unwrap();
    let mut last = None;
    for i in 1..=3 {
        last = publish(&b.broker, &r, i, H).await;
    }
    let before = last.unwrap();
    assert_eq!(before.offset, 3);
    wait_until("a got the first three", WAIT, || a.seen.count(&r) == 3).await;
    assert!(a.broker.is_ready() && b.broker.is_ready());

    server.stop();
    wait_until("the brokers notice", WAIT, || !a.broker.is_ready() && !b.broker.is_ready()).await;
    assert!(b.broker.publish(BrokerPublication::new(r.clone(), data("lost")), H).await.is_err());
    server.wipe_store();
    server.spawn();
    wait_until("the brokers reconnect and resynchronise", WAIT, || {
        a.broker.is_ready()
            && b.broker.is_ready()
            && a.seen.interruptions.load(Ordering::SeqCst) >= 1
            && b.seen.interruptions.load(Ordering::SeqCst) >= 1
    })
    .await;

    let after = publish(&b.broker, &r, 4, H).await.unwrap();
    assert_eq!(after.offset, 1);
    assert_ne!(after.epoch, before.epoch);
    // Subscriptions are back: the new publication is delivered.
    wait_until("a gets the publication after the restart", WAIT, || a.seen.count(&r) == 4).await;
    assert_eq!(a.seen.offsets(&r), vec![Some(1), Some(2), Some(3), Some(1)]);
    let page = a.broker.history(&r, since(3, &before.epoch, None, false), H).await.unwrap();
    assert!(!page.continuable);
    assert_eq!(page.position, after);
    // Publishing from the other node continues the new epoch.
    let next = publish(&a.broker, &r, 5, H).await.unwrap();
    assert_eq!(next, Position { offset: 2, epoch: after.epoch });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_messages_are_dropped_without_panic() {
    let server = NatsServer::start();
    let a = node(&server).await;
    let b = node(&server).await;
    let r = room("junk:r.1");
    b.broker.subscribe(&r).await.unwrap();
    let p1 = publish(&a.broker, &r, 1, H).await.unwrap();
    let raw = async_nats::connect(server.url()).await.unwrap();
    let live = a.broker.live_subject(&r);
    let junk: [&[u8]; 6] =
        [b"", b"hello", b"rc", b"rc\x01P\x01\x00\x00", b"rc\x01J\x00\xff\xff\xff\xff", b"{\"a\":1}"];
    for j in junk {
        raw.publish(live.clone(), Bytes::copy_from_slice(j)).await.unwrap();
    }
    // Junk stored in the history subject itself (and republished).
    let js = async_nats::jetstream::new(raw.clone());
    js.publish(a.broker.history_subject(&r, H), Bytes::from_static(b"not an envelope"))
        .await
        .unwrap()
        .await
        .unwrap();
    raw.flush().await.unwrap();
    // The room goes on: a history ending in garbage is dropped, a new epoch starts.
    let p2 = publish(&a.broker, &r, 2, H).await.unwrap();
    assert_eq!(p2.offset, 1);
    assert_ne!(p2.epoch, p1.epoch);
    let p3 = publish(&a.broker, &r, 3, H).await.unwrap();
    assert_eq!(p3, Position { offset: 2, epoch: p2.epoch.clone() });
    wait_until("valid publications keep arriving", WAIT, || b.seen.count(&r) == 3).await;
    assert_eq!(b.seen.offsets(&r), vec![Some(1), Some(1), Some(2)]);
    assert!(b.seen.events.lock().is_empty());
    let page = b.broker.history(&r, plain(None, false), H).await.unwrap();
    assert_eq!(offsets(&page), vec![1, 2]);
    assert_eq!(page.position, p3);
}
