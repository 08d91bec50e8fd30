//! `NatsPresence` against a real `nats-server` (JetStream), one server per test. Several
//! presence instances on one server stand for several nodes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../broker-adapter/tests/support/nats_server.rs"]
mod nats_server;

use std::time::Duration;

use nats_server::NatsServer;
use roomcast_presence::nats::{NatsPresence, NatsPresenceConfig};
use roomcast_presence::{Presence, PresenceStats};
use roomcast_protocol::{Data, Member, Room};

const WAIT: Duration = Duration::from_secs(20);

fn m(client: &str, user: &str) -> Member {
    Member { client: client.into(), user: user.into(), info: None, room_info: None }
}

fn room(n: &str) -> Room {
    Room::parse(n).unwrap()
}

async fn presence(server: &NatsServer, ttl: Duration) -> NatsPresence {
    let mut c = NatsPresenceConfig::new(server.url());
    c.ttl = ttl;
    NatsPresence::connect(c).await.unwrap()
}

fn clients(members: &[Member]) -> Vec<&str> {
    members.iter().map(|m| m.client.as_str()).collect()
}

/// Polls an async condition every 20 ms until it holds.
async fn eventually<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_remove_members_and_stats_are_cluster_wide() {
    let server = NatsServer::start();
    let a = presence(&server, Duration::from_secs(30)).await;
    let b = presence(&server, Duration::from_secs(30)).await;
    let r = room("chat:lobby.1");
    let empty = a.members(&r, 10).await.unwrap().unwrap();
    assert!(empty.is_empty());
    assert_eq!(a.stats(&r).await.unwrap(), PresenceStats::default());

    let rich = Member {
        client: "c1".into(),
        user: "u1".into(),
        info: Some(Data::from_json("{\"name\":\"Ann\"}").unwrap()),
        room_info: Some(Data::from_json("[1,2]").unwrap()),
    };
    a.add(&r, &rich).await.unwrap();
    b.add(&r, &m("c2", "u1")).await.unwrap();
    b.add(&r, &m("c3", "u2")).await.unwrap();
    a.add(&r, &m("c4", "")).await.unwrap();
    // Adding again replaces.
    b.add(&r, &m("c3", "u3")).await.unwrap();
    for p in [&a, &b] {
        let got = p.members(&r, 10).await.unwrap().unwrap();
        assert_eq!(clients(&got), vec!["c1", "c2", "c3", "c4"]);
        assert_eq!(got[0], rich);
        assert_eq!(got[2].user, "u3");
        assert_eq!(p.stats(&r).await.unwrap(), PresenceStats { clients: 4, users: 3 });
        assert_eq!(p.members(&r, 3).await.unwrap(), None, "over the limit");
        assert_eq!(p.members(&r, 4).await.unwrap().unwrap().len(), 4);
    }
    // Other rooms are separate, including ones whose names extend this one.
    let other = room("chat:lobby.1.x");
    a.add(&other, &m("c9", "u9")).await.unwrap();
    assert_eq!(a.stats(&r).await.unwrap().clients, 4);
    assert_eq!(clients(&b.members(&other, 10).await.unwrap().unwrap()), vec!["c9"]);

    // Removing, from the node that added or (after its session moved) another one.
    a.remove(&r, "c1").await.unwrap();
    a.remove(&r, "c3").await.unwrap();
    b.remove(&r, "absent").await.unwrap();
    assert_eq!(clients(&b.members(&r, 10).await.unwrap().unwrap()), vec!["c2", "c4"]);
    assert_eq!(b.stats(&r).await.unwrap(), PresenceStats { clients: 2, users: 2 });
    // A removed member is not brought back by a refresh.
    a.add(&r, &m("c5", "u5")).await.unwrap();
    a.remove(&r, "c5").await.unwrap();
    assert_eq!(a.local_member_count(), 2, "c4 and c9 stay refreshed");
    b.remove(&r, "c2").await.unwrap();
    a.remove(&r, "c4").await.unwrap();
    assert!(a.members(&r, 10).await.unwrap().unwrap().is_empty());
    assert_eq!(a.stats(&r).await.unwrap(), PresenceStats::default());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_not_refreshed_expire_and_refreshed_ones_stay() {
    let server = NatsServer::start();
    let ttl = Duration::from_millis(1500);
    let alive = presence(&server, ttl).await;
    let dying = presence(&server, ttl).await;
    let r = room("ttl:r");
    alive.add(&r, &m("keep", "u1")).await.unwrap();
    dying.add(&r, &m("gone", "u2")).await.unwrap();
    let started = tokio::time::Instant::now();
    assert_eq!(alive.stats(&r).await.unwrap().clients, 2);
    // The dying node stops refreshing (as if it crashed).
    drop(dying);
    eventually("the member of the dead node expired", || async {
        clients(&alive.members(&r, 10).await.unwrap().unwrap()) == vec!["keep"]
    })
    .await;
    assert!(started.elapsed() >= ttl / 2, "expired by age, not removed");
    // The refreshed member outlives several TTLs.
    let until = tokio::time::Instant::now() + ttl * 3;
    while tokio::time::Instant::now() < until {
        assert_eq!(clients(&alive.members(&r, 10).await.unwrap().unwrap()), vec!["keep"]);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_legal_room_character_works() {
    let server = NatsServer::start();
    let p = presence(&server, Duration::from_secs(30)).await;
    let all = "ABCXYZabcxyz0189._-:@=,/";
    let mut long = String::from("ns:");
    while long.len() < 200 {
        long.push_str(all);
    }
    long.truncate(200);
    let names =
        ["a.b", ".", "ns:x.y", "a/b", "a@b", "a=b", "a,b", "_", "a_2E", "a.", "a:b:c", "x.y_z-1@h=,/", &long];
    for (i, n) in names.iter().enumerate() {
        p.add(&room(n), &m(&format!("c.{i}:@,_"), &format!("u{i}"))).await.unwrap();
    }
    for (i, n) in names.iter().enumerate() {
        let got = p.members(&room(n), 10).await.unwrap().unwrap();
        assert_eq!(clients(&got), vec![format!("c.{i}:@,_").as_str()], "{n}");
        p.remove(&room(n), &format!("c.{i}:@,_")).await.unwrap();
        assert!(p.members(&room(n), 10).await.unwrap().unwrap().is_empty(), "{n}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_come_back_after_the_server_restarts_empty() {
    let mut server = NatsServer::start();
    let p = presence(&server, Duration::from_secs(3)).await;
    let r = room("restart:r");
    p.add(&r, &m("c1", "u1")).await.unwrap();
    p.add(&r, &m("c2", "u2")).await.unwrap();
    server.stop();
    server.wipe_store();
    server.spawn();
    eventually("the node wrote its members back", || async {
        matches!(p.members(&r, 10).await, Ok(Some(v)) if v.len() == 2)
    })
    .await;
    assert_eq!(p.stats(&r).await.unwrap(), PresenceStats { clients: 2, users: 2 });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_lists_live_nodes_and_reapers_remove_a_dead_nodes_members_once() {
    use roomcast_presence::NodeInfo;
    let server = NatsServer::start();
    let ttl = Duration::from_secs(30);
    let dead = presence(&server, ttl).await;
    let (a, b) = (presence(&server, ttl).await, presence(&server, ttl).await);
    let info = |id: &str, connections| NodeInfo { id: id.into(), connections, rooms: 1 };
    dead.heartbeat(&info("dead", 7)).await.unwrap();
    a.heartbeat(&info("a", 1)).await.unwrap();
    let ids = |v: Vec<NodeInfo>| v.into_iter().map(|n| n.id).collect::<Vec<_>>();
    assert_eq!(ids(b.nodes(Duration::from_secs(10)).await.unwrap()), ["a", "dead"]);
    assert_eq!(a.nodes(Duration::from_secs(10)).await.unwrap()[1], info("dead", 7));
    // 100 members of the dead node over 10 rooms (names needing escapes), and live ones.
    for i in 0..100 {
        dead.add(&room(&format!("ns:r.{}_x", i % 10)), &m(&format!("d{i}"), "u")).await.unwrap();
    }
    for i in 0..10 {
        a.add(&room(&format!("ns:r.{i}_x")), &m(&format!("a{i}"), "u")).await.unwrap();
    }
    assert!(a.reap(Duration::from_secs(10)).await.unwrap().is_empty(), "nothing is dead yet");
    drop(dead);
    let timeout = Duration::from_millis(300);
    eventually("the dead node's heartbeat is older than the timeout", || async {
        a.heartbeat(&info("a", 1)).await.unwrap();
        b.heartbeat(&info("b", 0)).await.unwrap();
        ids(a.nodes(timeout).await.unwrap()) == ["a", "b"]
    })
    .await;
    // Two reapers at once: every dead member is returned exactly once.
    let (ra, rb) = tokio::join!(a.reap(timeout), b.reap(timeout));
    let mut got: Vec<String> = ra
        .unwrap()
        .into_iter()
        .chain(rb.unwrap())
        .map(|r| format!("{}/{}", r.room, r.member.client))
        .collect();
    got.sort();
    let mut want: Vec<String> = (0..100).map(|i| format!("ns:r.{}_x/d{i}", i % 10)).collect();
    want.sort();
    assert_eq!(got, want);
    for i in 0..10 {
        let members = a.members(&room(&format!("ns:r.{i}_x")), 100).await.unwrap().unwrap();
        assert_eq!(clients(&members), [format!("a{i}")]);
    }
    assert!(a.reap(timeout).await.unwrap().is_empty(), "reaped once");
    b.deregister().await.unwrap();
    assert_eq!(ids(a.nodes(Duration::from_secs(10)).await.unwrap()), ["a"]);
}
