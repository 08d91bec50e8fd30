//! [`RedisPresence`] against a real `redis-server` that each test starts on a free port (never
//! the machine's own Redis). `redis-server` must be on PATH: the tests fail, loudly, when it
//! is not.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../broker-adapter/tests/server/mod.rs"]
mod server;

use std::time::Duration;

use roomcast_presence::redis::{RedisPresence, RedisPresenceConfig};
use roomcast_presence::{Presence, PresenceStats};
use roomcast_protocol::{Data, Member, Room};
use server::RedisServer;

const WAIT: Duration = Duration::from_secs(15);

fn m(client: &str, user: &str) -> Member {
    Member { client: client.into(), user: user.into(), info: None, room_info: None }
}

fn room(n: &str) -> Room {
    Room::parse(n).unwrap()
}

async fn presence(url: &str) -> RedisPresence {
    RedisPresence::connect(RedisPresenceConfig::from_url(url).unwrap()).await.unwrap()
}

async fn clients(p: &RedisPresence, r: &Room) -> Vec<String> {
    p.members(r, 1000).await.unwrap().unwrap().into_iter().map(|m| m.client).collect()
}

/// Polls an async condition until it holds, failing after `deadline`.
async fn wait_for<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = tokio::time::Instant::now() + WAIT;
    while !f().await {
        assert!(tokio::time::Instant::now() < end, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_remove_members_and_stats_across_nodes() {
    let redis = RedisServer::start();
    let a = presence(&redis.url()).await;
    let b = presence(&redis.url()).await;
    let r = room("chat:lobby");
    assert_eq!(a.stats(&r).await.unwrap(), PresenceStats::default());
    assert_eq!(a.members(&r, 10).await.unwrap(), Some(vec![]));

    let rich = Member {
        client: "c1".into(),
        user: "u1".into(),
        info: Some(Data::from_json(&b"{\"name\":\"Ann\"}"[..]).unwrap()),
        room_info: Some(Data::from_msgpack(&[0x92, 0x01, 0xa1, b'x'][..]).unwrap()),
    };
    a.add(&r, &rich).await.unwrap();
    a.add(&r, &m("c2", "u1")).await.unwrap();
    b.add(&r, &m("c3", "u2")).await.unwrap();
    b.add(&r, &m("c3", "u2")).await.unwrap();
    b.add(&r, &m("c4", "")).await.unwrap();
    assert_eq!(b.stats(&r).await.unwrap(), PresenceStats { clients: 4, users: 3 });
    let all = b.members(&r, 4).await.unwrap().unwrap();
    assert_eq!(all.iter().map(|m| m.client.as_str()).collect::<Vec<_>>(), ["c1", "c2", "c3", "c4"]);
    assert_eq!(all[0], rich, "member data survives");
    assert_eq!(a.members(&r, 3).await.unwrap(), None, "more than the limit");

    // Adding a client again with another user moves its count.
    a.add(&r, &m("c2", "u3")).await.unwrap();
    assert_eq!(a.stats(&r).await.unwrap(), PresenceStats { clients: 4, users: 4 });
    b.remove(&r, "c1").await.unwrap();
    b.remove(&r, "nope").await.unwrap();
    assert_eq!(a.stats(&r).await.unwrap(), PresenceStats { clients: 3, users: 3 });
    for c in ["c2", "c3", "c4"] {
        a.remove(&r, c).await.unwrap();
    }
    assert_eq!(a.stats(&r).await.unwrap(), PresenceStats::default());
    assert_eq!(redis.command(&["EXISTS", "roomcast:{chat:lobby}:presence"]), "0");
    assert_eq!(redis.command(&["EXISTS", "roomcast:{chat:lobby}:presence:users"]), "0");
    assert_eq!(redis.command(&["EXISTS", "roomcast:{chat:lobby}:presence:expiry"]), "0");
    // Rooms are apart.
    a.add(&room("other"), &m("c1", "u1")).await.unwrap();
    assert_eq!(a.stats(&r).await.unwrap(), PresenceStats::default());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_of_a_dropped_presence_expire_and_live_ones_are_refreshed() {
    let redis = RedisServer::start();
    // Node `dying` goes away (its refresher stops); node `alive` refreshes by itself.
    let short = format!("{}?presence_ttl_ms=1000", redis.url());
    let dying = presence(&short).await;
    let alive = presence(&short).await;
    let long = presence(&redis.url()).await;
    assert_eq!(alive.refresh_every(), Duration::from_millis(1000) / 3);
    let r = room("ttl");
    dying.add(&r, &m("d1", "u1")).await.unwrap();
    dying.add(&r, &m("d2", "u2")).await.unwrap();
    alive.add(&r, &m("a1", "u1")).await.unwrap();
    long.add(&r, &m("l1", "u3")).await.unwrap();
    assert_eq!(long.stats(&r).await.unwrap(), PresenceStats { clients: 4, users: 3 });
    drop(dying);

    wait_for("the dead node's members expired", || async { clients(&long, &r).await == ["a1", "l1"] }).await;
    assert_eq!(long.stats(&r).await.unwrap(), PresenceStats { clients: 2, users: 2 });
    // Three TTLs later the refreshed member is still there.
    let until = tokio::time::Instant::now() + Duration::from_secs(3);
    while tokio::time::Instant::now() < until {
        assert_eq!(clients(&long, &r).await, ["a1", "l1"], "refreshed members stay");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(alive.local_member_count(), 1);
    // A removed member is not brought back by a later refresh.
    alive.remove(&r, "a1").await.unwrap();
    assert_eq!(alive.local_member_count(), 0);
    let until = tokio::time::Instant::now() + Duration::from_millis(800);
    while tokio::time::Instant::now() < until {
        assert_eq!(clients(&long, &r).await, ["l1"], "removed members stay removed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ttl: i64 = redis.command(&["PTTL", "roomcast:{ttl}:presence"]).parse().unwrap();
    assert!(ttl > 20_000, "short-lived members never shorten the keys' life: {ttl}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_lists_live_nodes_and_reapers_remove_a_dead_nodes_members_once() {
    use roomcast_presence::NodeInfo;
    let redis = RedisServer::start();
    let url = redis.url();
    let dead = presence(&url).await;
    let (a, b) = (presence(&url).await, presence(&url).await);
    let info = |id: &str, connections| NodeInfo { id: id.into(), connections, rooms: 1 };
    dead.heartbeat(&info("dead", 7)).await.unwrap();
    a.heartbeat(&info("a", 1)).await.unwrap();
    let ids = |v: Vec<NodeInfo>| v.into_iter().map(|n| n.id).collect::<Vec<_>>();
    assert_eq!(ids(b.nodes(Duration::from_secs(10)).await.unwrap()), ["a", "dead"]);
    assert_eq!(a.nodes(Duration::from_secs(10)).await.unwrap()[1], info("dead", 7));
    // 200 members of the dead node over 20 rooms, and live members of `a`.
    for i in 0..200 {
        dead.add(&room(&format!("r{}", i % 20)), &m(&format!("d{i}"), "u")).await.unwrap();
    }
    for i in 0..20 {
        a.add(&room(&format!("r{i}")), &m(&format!("a{i}"), "u")).await.unwrap();
    }
    // Nothing is dead yet.
    assert!(a.reap(Duration::from_secs(10)).await.unwrap().is_empty());
    drop(dead);
    let timeout = Duration::from_millis(200);
    wait_for("the dead node's heartbeat is older than the timeout", || async {
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
    let mut want: Vec<String> = (0..200).map(|i| format!("r{}/d{i}", i % 20)).collect();
    want.sort();
    assert_eq!(got, want);
    for i in 0..20 {
        assert_eq!(clients(&a, &room(&format!("r{i}"))).await, [format!("a{i}")]);
    }
    // The dead node left the registry; reaping again finds nothing.
    assert!(a.reap(timeout).await.unwrap().is_empty());
    b.deregister().await.unwrap();
    let live = a.nodes(Duration::from_secs(10)).await.unwrap();
    assert_eq!(ids(live), ["a"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_whose_members_all_expired_leaves_no_keys() {
    let redis = RedisServer::start();
    let p = presence(&format!("{}?presence_ttl_ms=300&prefix=pp", redis.url())).await;
    let r = room("gone");
    p.add(&r, &m("c1", "u1")).await.unwrap();
    assert_eq!(redis.command(&["EXISTS", "pp:{gone}:presence"]), "1");
    let ttl: i64 = redis.command(&["PTTL", "pp:{gone}:presence:users"]).parse().unwrap();
    assert!(ttl > 0 && ttl <= 300, "keys carry the TTL: {ttl}");
    // Its node goes away; Redis drops the keys by itself, nobody needs to read them.
    drop(p);
    let p = presence(&format!("{}?presence_ttl_ms=300&prefix=pp", redis.url())).await;
    wait_for("keys gone", || async {
        redis.command(&[
            "EXISTS",
            "pp:{gone}:presence",
            "pp:{gone}:presence:expiry",
            "pp:{gone}:presence:users",
        ]) == "0"
    })
    .await;
    assert_eq!(p.stats(&r).await.unwrap(), PresenceStats::default());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_by_itself_after_a_redis_restart() {
    let mut redis = RedisServer::start();
    let p = presence(&format!("{}?timeout_ms=500", redis.url())).await;
    let r = room("restart");
    p.add(&r, &m("c1", "u1")).await.unwrap();
    redis.kill();
    assert!(p.stats(&r).await.is_err(), "fails while Redis is down");
    redis.restart();
    // Redis came back empty; the node's periodic refresh puts its members back.
    wait_for("presence usable again", || async { p.add(&r, &m("c1", "u1")).await.is_ok() }).await;
    assert_eq!(p.stats(&r).await.unwrap(), PresenceStats { clients: 1, users: 1 });
    assert!(p.is_connected());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn works_on_redis_cluster() {
    let redis = RedisServer::start_cluster();
    let p = presence(&format!("redis://127.0.0.1:{}?cluster=true", redis.port())).await;
    for i in 0..20 {
        let r = room(&format!("cl:{i}"));
        p.add(&r, &m("c1", "u1")).await.unwrap();
        p.add(&r, &m("c2", "u1")).await.unwrap();
        assert_eq!(p.stats(&r).await.unwrap(), PresenceStats { clients: 2, users: 1 });
        assert_eq!(clients(&p, &r).await, ["c1", "c2"]);
        p.remove(&r, "c1").await.unwrap();
        assert_eq!(clients(&p, &r).await, ["c2"]);
    }
}
