//! [`RedisBroker`] against a real `redis-server` that each test starts on a free port (never
//! the machine's own Redis). `redis-server` must be on PATH: the tests fail, loudly, when it
//! is not.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/extras.rs"]
mod extras;
mod server;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use roomcast_broker::redis::{RedisBroker, RedisConfig};
use roomcast_broker::{
    Broker, BrokerEventHandler, BrokerPublication, HistoryOptions, HistoryQuery, Idempotent, RoomEvent,
};
use roomcast_protocol::{Data, Member, Position, PublisherInfo, Room};
use server::{RedisServer, wait_until};

const H: HistoryOptions = HistoryOptions { size: 3, ttl: Duration::from_secs(60) };
const BIG: HistoryOptions = HistoryOptions { size: 10_000, ttl: Duration::from_secs(60) };
const WAIT: Duration = Duration::from_secs(15);

#[derive(Default)]
struct Collect {
    publications: Mutex<Vec<BrokerPublication>>,
    events: Mutex<Vec<(Room, RoomEvent)>>,
    interruptions: AtomicUsize,
    controls: Mutex<Vec<Vec<u8>>>,
}

impl BrokerEventHandler for Collect {
    fn handle_publication(&self, p: &BrokerPublication) {
        self.publications.lock().push(p.clone());
    }
    fn handle_room_event(&self, room: &Room, event: &RoomEvent) {
        self.events.lock().push((room.clone(), event.clone()));
    }
    fn handle_interruption(&self) {
        self.interruptions.fetch_add(1, Ordering::SeqCst);
    }
    fn handle_control(&self, payload: &[u8]) {
        self.controls.lock().push(payload.to_vec());
    }
}

impl extras::Seen for Collect {
    fn controls(&self) -> Vec<Vec<u8>> {
        self.controls.lock().clone()
    }
    fn publications_in(&self, room: &Room) -> Vec<BrokerPublication> {
        self.publications.lock().iter().filter(|p| &p.room == room).cloned().collect()
    }
}

impl Collect {
    fn count(&self, room: &Room) -> usize {
        self.publications.lock().iter().filter(|p| &p.room == room).count()
    }
    fn offsets(&self, room: &Room) -> Vec<u64> {
        self.publications.lock().iter().filter(|p| &p.room == room).map(|p| p.offset.unwrap()).collect()
    }
}

fn room(n: &str) -> Room {
    Room::parse(n).unwrap()
}

fn data(i: u64) -> Data {
    Data::from_serialize(&i).unwrap()
}

fn publication(r: &Room, i: u64) -> BrokerPublication {
    BrokerPublication::new(r.clone(), data(i))
}

/// A started broker (one "node") and what its handler received.
async fn node(url: &str) -> (RedisBroker, Arc<Collect>) {
    let b = RedisBroker::connect(RedisConfig::from_url(url).unwrap()).await.unwrap();
    let h = Arc::new(Collect::default());
    Broker::start(&b, h.clone()).await.unwrap();
    assert!(b.is_ready());
    (b, h)
}

fn offsets(page: &roomcast_broker::HistoryPage) -> Vec<u64> {
    page.publications.iter().map(|p| p.offset.unwrap()).collect()
}

fn since(offset: u64, epoch: &str) -> HistoryQuery {
    HistoryQuery { since: Some(Position { offset, epoch: epoch.into() }), ..Default::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishers_on_several_nodes_get_contiguous_offsets_and_one_order() {
    let redis = RedisServer::start();
    let r = room("chat:contended");
    let mut nodes = Vec::new();
    for _ in 0..3 {
        let (b, h) = node(&redis.url()).await;
        b.subscribe(&r).await.unwrap();
        nodes.push((Arc::new(b), h));
    }
    const PER_TASK: u64 = 40;
    let mut tasks = Vec::new();
    for (n, (b, _)) in nodes.iter().enumerate() {
        for t in 0..3u64 {
            let (b, r) = (b.clone(), r.clone());
            let base = (n as u64 * 3 + t) * 1000;
            tasks.push(tokio::spawn(async move {
                let mut got = Vec::new();
                for i in 0..PER_TASK {
                    got.push(b.publish(publication(&r, base + i), BIG).await.unwrap().unwrap());
                }
                got
            }));
        }
    }
    let mut positions = Vec::new();
    for t in tasks {
        positions.extend(t.await.unwrap());
    }
    let total = 9 * PER_TASK as usize;
    let epochs: HashSet<_> = positions.iter().map(|p| p.epoch.clone()).collect();
    assert_eq!(epochs.len(), 1, "one epoch");
    let mut offs: Vec<u64> = positions.iter().map(|p| p.offset).collect();
    offs.sort_unstable();
    assert_eq!(offs, (1..=total as u64).collect::<Vec<_>>(), "contiguous, no offset twice");

    for (_, h) in &nodes {
        wait_until("every publication delivered", WAIT, || h.count(&r) == total).await;
    }
    let first: Vec<(u64, Data)> =
        nodes[0].1.publications.lock().iter().map(|p| (p.offset.unwrap(), p.data.clone())).collect();
    assert_eq!(first.iter().map(|(o, _)| *o).collect::<Vec<_>>(), (1..=total as u64).collect::<Vec<_>>());
    for (_, h) in &nodes[1..] {
        let other: Vec<(u64, Data)> =
            h.publications.lock().iter().map(|p| (p.offset.unwrap(), p.data.clone())).collect();
        assert_eq!(other, first, "every node sees the same order");
    }
    // History order is delivery order.
    let page = nodes[0].0.history(&r, HistoryQuery::default(), BIG).await.unwrap();
    let hist: Vec<(u64, Data)> =
        page.publications.iter().map(|p| (p.offset.unwrap(), p.data.clone())).collect();
    assert_eq!(hist, first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publication_right_after_subscribe_returns_is_delivered() {
    let redis = RedisServer::start();
    let (publisher, _) = node(&redis.url()).await;
    let (subscriber, h) = node(&redis.url()).await;
    for i in 0..100 {
        let r = room(&format!("race:{i}"));
        subscriber.subscribe(&r).await.unwrap();
        let opts = if i % 2 == 0 { H } else { HistoryOptions::OFF };
        publisher.publish(publication(&r, i), opts).await.unwrap();
        wait_until("the publication after subscribe", WAIT, || h.count(&r) == 1).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_since_limit_reverse_and_continuable() {
    let redis = RedisServer::start();
    let (b, _) = node(&redis.url()).await;
    let r = room("h");
    let empty = b.history(&r, HistoryQuery::default(), H).await.unwrap();
    assert_eq!(empty.position.offset, 0);
    assert!(empty.publications.is_empty() && empty.continuable);
    for i in 1..=5 {
        let p = b.publish(publication(&r, i), H).await.unwrap().unwrap();
        assert_eq!(p.offset, i);
        // The epoch reported before the first publication is the one it carries.
        assert_eq!(p.epoch, empty.position.epoch);
    }
    let epoch = empty.position.epoch.clone();
    let all = b.history(&r, HistoryQuery::default(), H).await.unwrap();
    assert_eq!(offsets(&all), vec![3, 4, 5], "history_size is exact");
    assert_eq!(all.position, Position { offset: 5, epoch: epoch.clone() });
    assert_eq!(all.publications[0].data, data(3));
    assert_eq!(all.publications[0].epoch.as_deref(), Some(epoch.as_str()));
    let rev =
        b.history(&r, HistoryQuery { reverse: true, limit: Some(2), ..Default::default() }, H).await.unwrap();
    assert_eq!(offsets(&rev), vec![5, 4]);
    let fwd = b.history(&r, HistoryQuery { limit: Some(2), ..Default::default() }, H).await.unwrap();
    assert_eq!(offsets(&fwd), vec![3, 4]);
    let huge =
        b.history(&r, HistoryQuery { limit: Some(usize::MAX), ..Default::default() }, H).await.unwrap();
    assert_eq!(offsets(&huge), vec![3, 4, 5]);
    let forever = HistoryOptions { size: 1_000_000, ttl: Duration::from_secs(u64::MAX / 4) };
    let p = b.publish(publication(&room("forever"), 1), forever).await.unwrap().unwrap();
    assert_eq!(p.offset, 1);
    let pos = b.history(&r, HistoryQuery { limit: Some(0), ..Default::default() }, H).await.unwrap();
    assert!(pos.publications.is_empty());
    assert_eq!(pos.position.offset, 5);

    let ok = b.history(&r, since(2, &epoch), H).await.unwrap();
    assert!(ok.continuable);
    assert_eq!(offsets(&ok), vec![3, 4, 5]);
    let ok = b.history(&r, HistoryQuery { limit: Some(1), ..since(3, &epoch) }, H).await.unwrap();
    assert_eq!(offsets(&ok), vec![4]);
    let ok = b.history(&r, HistoryQuery { reverse: true, ..since(3, &epoch) }, H).await.unwrap();
    assert_eq!(offsets(&ok), vec![5, 4]);
    let top = b.history(&r, since(5, &epoch), H).await.unwrap();
    assert!(top.continuable && top.publications.is_empty());
    let gone = b.history(&r, since(1, &epoch), H).await.unwrap();
    assert!(!gone.continuable && gone.publications.is_empty(), "offset 2 is no longer kept");
    let other = b.history(&r, since(4, "other"), H).await.unwrap();
    assert!(!other.continuable && other.publications.is_empty());
    let future = b.history(&r, since(9, &epoch), H).await.unwrap();
    assert!(!future.continuable);

    b.remove_history(&r).await.unwrap();
    let p = b.publish(publication(&r, 6), H).await.unwrap().unwrap();
    assert_eq!(p.offset, 1);
    assert_ne!(p.epoch, epoch, "removing the history starts a new epoch");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_field_crosses_the_wire_and_events_are_fanned_out() {
    let redis = RedisServer::start();
    let (a, _) = node(&redis.url()).await;
    let (b, h) = node(&redis.url()).await;
    let r = room("ns:x.y_z-1@a=b,c/d");
    b.subscribe(&r).await.unwrap();
    let mut p = BrokerPublication::new(
        r.clone(),
        Data::from_json(&br#"{"text":"hi","n":[1,2.5,null]}"#[..]).unwrap(),
    );
    p.info = Some(PublisherInfo { client: "c1".into(), user: "u1".into() });
    p.skip_client = Some("c1".into());
    let pos = a.publish(p.clone(), H).await.unwrap().unwrap();
    // MessagePack data arrives with the same meaning.
    let mp = BrokerPublication::new(r.clone(), Data::from_msgpack(&[0x81, 0xa1, b'k', 0xc3][..]).unwrap());
    a.publish(mp.clone(), HistoryOptions::OFF).await.unwrap();
    let m = Member {
        client: "c2".into(),
        user: "".into(),
        info: Some(Data::from_json(&b"{\"name\":\"n\"}"[..]).unwrap()),
        room_info: Some(Data::from_json(&b"7"[..]).unwrap()),
    };
    a.publish_event(&r, RoomEvent::Join(m.clone())).await.unwrap();
    a.publish_event(&r, RoomEvent::Leave(m.clone())).await.unwrap();
    wait_until("publications and events", WAIT, || h.count(&r) == 2 && h.events.lock().len() == 2).await;
    let got = h.publications.lock().clone();
    let mut want = p.clone();
    want.offset = Some(pos.offset);
    want.epoch = Some(pos.epoch.clone());
    assert_eq!(got[0], want);
    assert_eq!(got[1], mp, "no history: no offset");
    assert_eq!(
        *h.events.lock(),
        vec![(r.clone(), RoomEvent::Join(m.clone())), (r.clone(), RoomEvent::Leave(m))]
    );
    let page = b.history(&r, HistoryQuery::default(), H).await.unwrap();
    assert_eq!(page.publications, vec![want], "the room without history kept nothing more");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribe_stops_delivery() {
    let redis = RedisServer::start();
    let (b, h) = node(&redis.url()).await;
    let (r1, r2) = (room("u1"), room("u2"));
    b.subscribe(&r1).await.unwrap();
    b.subscribe(&r2).await.unwrap();
    b.unsubscribe(&r1).await.unwrap();
    b.unsubscribe(&r1).await.unwrap();
    b.publish(publication(&r1, 1), H).await.unwrap();
    b.publish(publication(&r2, 2), H).await.unwrap();
    // r2's publication went out after r1's on the same connection: once it is here, r1's
    // would have been too.
    wait_until("r2", WAIT, || h.count(&r2) == 1).await;
    assert_eq!(h.count(&r1), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushall_starts_a_new_epoch() {
    let redis = RedisServer::start();
    let (b, _) = node(&redis.url()).await;
    let r = room("f");
    let p1 = b.publish(publication(&r, 1), H).await.unwrap().unwrap();
    b.publish(publication(&r, 2), H).await.unwrap();
    redis.command(&["FLUSHALL"]);
    let page = b.history(&r, since(2, &p1.epoch), H).await.unwrap();
    assert!(!page.continuable);
    assert_eq!(page.position.offset, 0);
    assert_ne!(page.position.epoch, p1.epoch);
    let p3 = b.publish(publication(&r, 3), H).await.unwrap().unwrap();
    assert_eq!(p3, Position { offset: 1, epoch: page.position.epoch });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_reconnects_resubscribes_and_reports_the_interruption() {
    let mut redis = RedisServer::start();
    let url = format!("{}?timeout_ms=1000", redis.url());
    let (a, ha) = node(&url).await;
    let (b, hb) = node(&url).await;
    let r = room("restart");
    a.subscribe(&r).await.unwrap();
    b.subscribe(&r).await.unwrap();
    let p1 = b.publish(publication(&r, 1), H).await.unwrap().unwrap();
    wait_until("first publication", WAIT, || ha.count(&r) == 1).await;

    redis.kill();
    wait_until("not ready while Redis is down", WAIT, || !a.is_ready() && !b.is_ready()).await;
    assert!(b.publish(publication(&r, 2), H).await.is_err(), "publishing fails while Redis is down");
    redis.restart();
    wait_until("ready again", WAIT, || a.is_ready() && b.is_ready()).await;
    assert!(ha.interruptions.load(Ordering::SeqCst) >= 1);
    assert!(hb.interruptions.load(Ordering::SeqCst) >= 1);

    // Redis came back empty: a new epoch, offsets from 1, delivered through the restored
    // subscriptions of both nodes.
    let p2 = b.publish(publication(&r, 3), H).await.unwrap().unwrap();
    assert_eq!(p2.offset, 1);
    assert_ne!(p2.epoch, p1.epoch);
    wait_until("delivery after the restart", WAIT, || {
        ha.offsets(&r) == vec![1, 1] && hb.offsets(&r) == vec![1, 1]
    })
    .await;
    let page = a.history(&r, since(1, &p1.epoch), H).await.unwrap();
    assert!(!page.continuable);
    // The control channel was subscribed again too.
    b.publish_control(Bytes::from_static(b"after restart")).await.unwrap();
    wait_until("control after the restart", WAIT, || {
        [&ha, &hb].iter().all(|h| h.controls.lock().last().is_some_and(|c| c == b"after restart"))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_publications_and_expired_histories() {
    let redis = RedisServer::start();
    let (b, _) = node(&redis.url()).await;
    let opts = HistoryOptions { size: 10, ttl: Duration::from_millis(1500) };
    let r = room("ttl");
    let p1 = b.publish(publication(&r, 1), opts).await.unwrap().unwrap();
    // Not a wait for a condition: the two publications must be apart in time.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let p2 = b.publish(publication(&r, 2), opts).await.unwrap().unwrap();
    assert_eq!((p2.offset, &p2.epoch), (2, &p1.epoch));
    // The first publication expires on its own; the history (and its epoch) lives on.
    wait_until_async("the first publication expired", WAIT, || async {
        let page = b.history(&r, HistoryQuery::default(), opts).await.unwrap();
        offsets(&page) == vec![2]
    })
    .await;
    let page = b.history(&r, since(0, &p1.epoch), opts).await.unwrap();
    assert!(!page.continuable, "offset 1 is gone");
    let page = b.history(&r, since(1, &p1.epoch), opts).await.unwrap();
    assert!(page.continuable);
    assert_eq!(offsets(&page), vec![2]);
    // Then the whole history expires: a new epoch, offsets from 1.
    wait_until_async("the whole history expired", WAIT, || async {
        b.history(&r, HistoryQuery { limit: Some(0), ..Default::default() }, opts)
            .await
            .unwrap()
            .position
            .epoch
            != p1.epoch
    })
    .await;
    let p3 = b.publish(publication(&r, 3), opts).await.unwrap().unwrap();
    assert_eq!(p3.offset, 1);
    assert_ne!(p3.epoch, p1.epoch);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_trims_every_expired_publication() {
    // More expired publications than one trimming batch (64) reads: the publish script
    // must drop them all, and keep the history (and epoch) alive.
    let redis = RedisServer::start();
    let (b, _) = node(&redis.url()).await;
    let opts = HistoryOptions { size: 1000, ttl: Duration::from_millis(1500) };
    let r = room("trim");
    let mut epoch = String::new();
    for i in 1..=150 {
        epoch = b.publish(publication(&r, i), opts).await.unwrap().unwrap().epoch;
    }
    // Not a wait for a condition: the next publication must be younger than the first 150.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let p = b.publish(publication(&r, 151), opts).await.unwrap().unwrap();
    assert_eq!((p.offset, &p.epoch), (151, &epoch));
    // Once the first 150 expired, one publish drops them all (no history read meanwhile).
    wait_until("the first 150 expired", WAIT, || {
        let t = redis.command(&["TIME"]);
        let last = redis.command(&["XRANGE", "roomcast:{trim}:stream", "150-0", "150-0"]);
        // "[[150-0 [t <ms> d …]]]": expired when its time is more than the TTL ago.
        let parts: Vec<&str> = t.trim_matches(['[', ']']).split(' ').collect();
        let now_ms = parts[0].parse::<u64>().unwrap() * 1000 + parts[1].parse::<u64>().unwrap() / 1000;
        let at: u64 = last.split(' ').nth(2).unwrap().parse().unwrap();
        now_ms > at + 1500
    })
    .await;
    let p = b.publish(publication(&r, 152), opts).await.unwrap().unwrap();
    assert_eq!((p.offset, &p.epoch), (152, &epoch));
    assert_eq!(redis.command(&["XLEN", "roomcast:{trim}:stream"]), "2");
    let page = b.history(&r, HistoryQuery::default(), opts).await.unwrap();
    assert_eq!(offsets(&page), vec![151, 152]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_a_channel_is_dropped() {
    let redis = RedisServer::start();
    let (b, h) = node(&redis.url()).await;
    let r = room("g");
    b.subscribe(&r).await.unwrap();
    let channel = "roomcast:{g}";
    let garbage: Vec<Vec<u8>> = vec![
        vec![],
        b"hello".to_vec(),
        vec![0x01],
        vec![0x01, 0x05],
        vec![0x01, 0x05, 0xa1, b'e'],
        vec![0x01, 0x05, 0xa1, b'e', 0x94, 0xa1, b'g'],
        vec![0x01, 0x05, 0xa1, b'e', 0xdd, 0xff, 0xff, 0xff, 0xff],
        vec![0x01, 0x00, 0xa0, 0x94, 0xa1, b'g', 0x92, 0x07, 0xc4, 0x01, b'1', 0xc0, 0xc0],
        vec![0x01, 0x00, 0xa0, 0x94, 0xa1, b'g', 0x92, 0x00, 0xc4, 0x01, b'{', 0xc0, 0xc0],
        vec![
            0x01, 0x00, 0xa0, 0x94, 0xa5, b'o', b't', b'h', b'e', b'r', 0x92, 0x00, 0xc4, 0x01, b'1', 0xc0,
            0xc0,
        ],
        vec![0x02, 0xa1, b'g', 0x90],
        vec![0x09, 0xc0],
        vec![0xc1; 64],
        vec![0xff; 1000],
    ];
    for g in &garbage {
        redis.command_bytes(&[b"PUBLISH", channel.as_bytes(), g]);
    }
    // A well-formed frame written by hand (kind 1, offset 0, no epoch, body) goes through.
    let by_hand = vec![0x01, 0x00, 0xa0, 0x94, 0xa1, b'g', 0x92, 0x00, 0xc4, 0x01, b'1', 0xc0, 0xc0];
    redis.command_bytes(&[b"PUBLISH", channel.as_bytes(), &by_hand]);
    b.publish(publication(&r, 2), H).await.unwrap();
    wait_until("the two good publications", WAIT, || h.count(&r) == 2).await;
    let got = h.publications.lock().clone();
    assert_eq!(got.len(), 2, "garbage was dropped: {got:?}");
    assert_eq!(got[0].data, data(1));
    assert_eq!(got[0].offset, None);
    assert_eq!(got[1].data, data(2));
    assert!(h.events.lock().is_empty());
    assert!(b.is_ready());
    assert_eq!(h.interruptions.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_mode_uses_sharded_pubsub() {
    let redis = RedisServer::start_cluster();
    let url = format!("redis://127.0.0.1:{}?cluster=true&prefix=rc", redis.port());
    let (a, ha) = node(&url).await;
    let (b, hb) = node(&url).await;
    let rooms: Vec<Room> = (0..20).map(|i| room(&format!("cl:{i}"))).collect();
    for r in &rooms {
        a.subscribe(r).await.unwrap();
        b.subscribe(r).await.unwrap();
    }
    let numsub = redis.command(&["PUBSUB", "SHARDNUMSUB", "rc:{cl:0}"]);
    assert!(numsub.contains("2"), "both nodes hold a sharded subscription: {numsub}");
    for (i, r) in rooms.iter().enumerate() {
        let p = a.publish(publication(r, i as u64), H).await.unwrap().unwrap();
        assert_eq!(p.offset, 1);
        b.publish(publication(r, 100 + i as u64), HistoryOptions::OFF).await.unwrap();
        b.publish_event(
            r,
            RoomEvent::Join(Member { client: "c".into(), user: "u".into(), info: None, room_info: None }),
        )
        .await
        .unwrap();
    }
    for h in [&ha, &hb] {
        wait_until("cluster delivery", WAIT, || {
            rooms.iter().all(|r| h.count(r) == 2) && h.events.lock().len() == rooms.len()
        })
        .await;
    }
    let page = b.history(&rooms[3], HistoryQuery::default(), H).await.unwrap();
    assert_eq!(offsets(&page), vec![1]);
    assert_eq!(page.publications[0].data, data(3));
    a.unsubscribe(&rooms[0]).await.unwrap();
    b.remove_history(&rooms[3]).await.unwrap();
    let p = a.publish(publication(&rooms[3], 1), H).await.unwrap().unwrap();
    assert_eq!(p.offset, 1);
    assert_ne!(Some(p.epoch), page.publications[0].epoch);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_messages_reach_every_node() {
    let redis = RedisServer::start();
    let (a, ha) = node(&redis.url()).await;
    let (b, hb) = node(&redis.url()).await;
    extras::control_reaches_every_node(&a, &*ha, &b, &*hb).await;
    // Not a room's channel: a room called "control" is unaffected.
    let r = room("control");
    b.subscribe(&r).await.unwrap();
    a.publish(publication(&r, 1), H).await.unwrap();
    a.publish_control(Bytes::from_static(b"x")).await.unwrap();
    wait_until("room and control", WAIT, || hb.count(&r) == 1 && hb.controls.lock().len() == 42).await;
    assert_eq!(ha.controls.lock().len(), 42);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_same_key_twice_publishes_once() {
    let redis = RedisServer::start();
    let (a, _) = node(&redis.url()).await;
    let (b, hb) = node(&redis.url()).await;
    extras::same_key_twice_publishes_once(&a, &b, &*hb, H, "").await;
    // The key layout the module documents.
    let stored = redis.command(&["GET", "roomcast:{idem:twice}:idem:k2"]);
    assert_eq!(stored.split_once(':').map(|(o, _)| o), Some("2"), "{stored}");
    let ttl: i64 = redis.command(&["PTTL", "roomcast:{idem:twice}:idem:k2"]).parse().unwrap();
    assert!(ttl > 0 && ttl <= 60_000, "{ttl}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_concurrent_calls_on_two_nodes_publish_once() {
    let redis = RedisServer::start();
    let (a, ha) = node(&redis.url()).await;
    let (b, _) = node(&redis.url()).await;
    extras::concurrent_calls_publish_once(Arc::new(a), Arc::new(b), &*ha, H, "").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_key_publishes_again_after_the_window() {
    let redis = RedisServer::start();
    let (a, _) = node(&redis.url()).await;
    extras::the_key_publishes_again_after_the_window(&a, H, "").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_bad_keys_are_refused() {
    let redis = RedisServer::start();
    let (a, _) = node(&redis.url()).await;
    extras::bad_keys_are_refused(&a, H, "").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_failed_publish_releases_the_key() {
    // A publish that fails inside the script (here: the room's meta key is not a hash)
    // leaves the key free, so a retry publishes once the cause is gone.
    let redis = RedisServer::start();
    let (a, _) = node(&redis.url()).await;
    let r = room("broken");
    redis.command(&["SET", "roomcast:{broken}:meta", "not a hash"]);
    let window = Duration::from_secs(60);
    assert!(a.publish_idempotent(publication(&r, 1), H, "k", window).await.is_err());
    assert_eq!(redis.command(&["EXISTS", "roomcast:{broken}:idem:k"]), "0");
    redis.command(&["DEL", "roomcast:{broken}:meta"]);
    let ok = a.publish_idempotent(publication(&r, 2), H, "k", window).await.unwrap();
    assert!(matches!(ok, Idempotent::Published(Some(ref p)) if p.offset == 1), "{ok:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_mode_control_and_idempotency() {
    let redis = RedisServer::start_cluster();
    let url = format!("redis://127.0.0.1:{}?cluster=true&prefix=rc", redis.port());
    let (a, ha) = node(&url).await;
    let (b, hb) = node(&url).await;
    let numsub = redis.command(&["PUBSUB", "SHARDNUMSUB", "rc:control"]);
    assert!(numsub.contains("2"), "both nodes hold a sharded control subscription: {numsub}");
    extras::control_reaches_every_node(&a, &*ha, &b, &*hb).await;
    extras::same_key_twice_publishes_once(&a, &b, &*hb, H, "cl").await;
    extras::concurrent_calls_publish_once(Arc::new(a), Arc::new(b), &*ha, H, "cl").await;
}

/// Polls an async condition until it holds, failing after `deadline`.
async fn wait_until_async<F, Fut>(what: &str, deadline: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = tokio::time::Instant::now() + deadline;
    loop {
        if f().await {
            return;
        }
        assert!(tokio::time::Instant::now() < end, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
