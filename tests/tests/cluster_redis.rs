//! Issue 3 with Redis: three real nodes sharing a real `redis-server` (and a local 3-master
//! Redis Cluster): fan-out in one order across nodes and encodings, concurrent publishers
//! on different nodes, recovery on another node, an SDK client surviving a SIGKILLed node,
//! Redis restarted empty (new epoch, `recovered: false`, `/readyz`), presence and
//! join/leave across nodes. The scenarios are in `cluster/mod.rs`, shared with NATS.
//!
//! `redis-server` and `redis-cli` must be on PATH (`.ci/run` installs them).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cluster;

use std::collections::BTreeMap;
use std::time::Duration;

use cluster::{Cluster, read_publications, subscriber};
use roomcast_tests::services::{RedisCluster, RedisServer, start_nodes, wait_readyz};
use roomcast_tests::{Enc, TestClient, json, str_of, u64_of};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_publications_reach_every_node_in_one_order() {
    let c = Cluster::start(RedisServer::start());
    cluster::fan_out_in_one_order(&c.nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_concurrent_publishers_on_different_nodes() {
    let c = Cluster::start(RedisServer::start());
    cluster::concurrent_publishers(&c.nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_recovery_on_another_node() {
    let c = Cluster::start(RedisServer::start());
    cluster::recovers_on_another_node(&c.nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_sdk_survives_a_node_sigkill() {
    let mut c = Cluster::start(RedisServer::start());
    cluster::sdk_survives_a_node_kill(&mut c.nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_empty() {
    let mut c = Cluster::start(RedisServer::start());
    cluster::broker_restarted_empty(&mut c.broker, &c.nodes).await;
}

/// Presence in its own Redis: while that Redis is down the node is not ready (`/readyz`
/// 503, though its broker is fine), and it is ready again once presence is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_presence_down_makes_the_node_not_ready() {
    let broker = RedisServer::start();
    let mut presence = RedisServer::start();
    let nodes =
        start_nodes(1, cluster::CONFIG, &broker.url(), &[("ROOMCAST_PRESENCE", presence.url().as_str())]);
    wait_readyz(&nodes, 200, Duration::from_secs(10)).await;
    presence.kill();
    wait_readyz(&nodes, 503, Duration::from_secs(10)).await;
    presence.restart_empty();
    wait_readyz(&nodes, 200, Duration::from_secs(15)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_presence_agrees_on_every_node() {
    let c = Cluster::start(RedisServer::start());
    cluster::presence_agrees_on_every_node(&c.nodes).await;
}

/// Rooms whose keys live on each shard of `rc`, `per_shard` of each.
fn rooms_on_every_shard(rc: &RedisCluster, per_shard: usize) -> Vec<Vec<String>> {
    let mut by_shard = vec![Vec::new(); rc.nodes.len()];
    let mut i = 0;
    while by_shard.iter().any(|v: &Vec<String>| v.len() < per_shard) {
        let name = format!("shard{i}-{}", roomcast_tests::unique());
        i += 1;
        let owner = rc.owner_of(&format!("roomcast:{{{name}}}:meta"));
        if by_shard[owner].len() < per_shard {
            by_shard[owner].push(name);
        }
        assert!(i < 10_000, "no spread of rooms over the shards");
    }
    by_shard
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_of_three_masters_carries_rooms_on_every_shard() {
    const K: u64 = 12;
    let rc = RedisCluster::start(3);
    let nodes = start_nodes(3, cluster::CONFIG, &rc.url(), &[]);
    let by_shard = rooms_on_every_shard(&rc, 2);
    let mut rooms: Vec<String> = by_shard.iter().flatten().cloned().collect();
    // And rooms without history (SPUBLISH only), also spread.
    rooms.extend(by_shard.iter().map(|v| format!("nohist:{}", v[0])));
    let names: Vec<&str> = rooms.iter().map(String::as_str).collect();
    let mut subs = Vec::new();
    for n in &nodes {
        for enc in Enc::BOTH {
            subs.push(subscriber(&n.ws_url(), enc, &names).await);
        }
    }
    let mut pubs = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        pubs.push(subscriber(&n.ws_url(), Enc::BOTH[i % 2], &names).await);
    }
    // Every room gets publications from every node in turn.
    for k in 1..=K {
        for (ri, r) in rooms.iter().enumerate() {
            let from = (k as usize + ri) % nodes.len();
            let reply = cluster::publish(&mut pubs[from], r, json!({"k": k, "room": r})).await;
            if r.starts_with("nohist:") {
                assert!(reply.get("offset").is_none(), "{reply}");
            } else {
                assert_eq!(reply["offset"], k, "{reply}");
            }
        }
    }
    let want: BTreeMap<String, usize> = rooms.iter().map(|r| (r.clone(), K as usize)).collect();
    for s in &mut subs {
        let got = read_publications(s, &want).await;
        for (r, pubs) in &got {
            let ks: Vec<u64> = pubs.iter().map(|p| u64_of(&p["data"], "k")).collect();
            assert_eq!(ks, (1..=K).collect::<Vec<_>>(), "{:?} subscriber, room {r}: in order", s.enc);
            for p in pubs {
                assert_eq!(p["data"]["room"], r.as_str());
                if !r.starts_with("nohist:") {
                    assert_eq!(p["offset"], p["data"]["k"], "{p}");
                }
            }
        }
    }
    // Every master holds history (two rooms' meta and stream keys at least).
    let keys = rc.keys_per_node();
    assert!(keys.iter().all(|k| *k >= 4), "every shard holds rooms' keys: {keys:?}");

    // Recovery on another node, in a room of every shard.
    for (shard, rs) in by_shard.iter().enumerate() {
        let r = &rs[0];
        let enc = Enc::BOTH[shard % 2];
        let mut x = TestClient::connected(&nodes[shard].ws_url(), enc).await;
        let s = x.request(json!({"type": "subscribe", "room": r})).await;
        assert_eq!(s["offset"], K, "{s}");
        let epoch = str_of(&s, "epoch").to_string();
        x.close().await;
        let from = (shard + 1) % nodes.len();
        for k in K + 1..=K + 3 {
            cluster::publish(&mut pubs[from], r, json!({"k": k, "room": r})).await;
        }
        let other = (shard + 2) % nodes.len();
        let mut y = TestClient::connected(&nodes[other].ws_url(), enc).await;
        let s = y
            .request(json!({"type": "subscribe", "room": r, "recover": {"offset": K, "epoch": epoch}}))
            .await;
        assert_eq!(s["recovered"], true, "shard {shard}: {s}");
        assert_eq!(roomcast_tests::offsets(&s), vec![K + 1, K + 2, K + 3], "{s}");
        cluster::publish(&mut pubs[from], r, json!({"k": K + 4, "room": r})).await;
        let p = y.recv_type("publication").await;
        assert_eq!(p["offset"], K + 4, "{p}");
    }

    // Presence on every shard agrees on every node.
    for rs in &by_shard {
        let r = &rs[1];
        for (i, a) in pubs.iter_mut().enumerate() {
            let s = a.request(json!({"type": "presence_stats", "room": r})).await;
            // Six subscribers and three publishers, all anonymous.
            assert_eq!((s["clients"].clone(), s["users"].clone()), (json!(9), json!(1)), "node {i}: {s}");
        }
    }
}

/// Members of a node must outlive the presence TTL while they stay subscribed: the node
/// has to add them again every `RedisPresence::refresh_every()` (TTL / 3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_presence_outlives_its_ttl() {
    let redis = RedisServer::start();
    let url = format!("{}?presence_ttl_ms=1000", redis.url());
    let nodes = start_nodes(2, cluster::CONFIG, &url, &[]);
    let r = cluster::room("ttl");
    let member = subscriber(&nodes[0].ws_url(), Enc::Json, &[&r]).await;
    let mut asker = TestClient::connected(&nodes[1].ws_url(), Enc::Json).await;
    // Watch it for three TTLs: it must be there every time.
    let until = tokio::time::Instant::now() + Duration::from_secs(3);
    while tokio::time::Instant::now() < until {
        let s = asker.request(json!({"type": "presence_stats", "room": r})).await;
        assert_eq!(s["clients"], 1, "the subscribed member is still present: {s}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(member);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_node_leaves_no_ghosts() {
    let mut c = Cluster::start(RedisServer::start());
    let ghost = cluster::ghosts_of_a_killed_node_leave_once(&mut c.nodes).await;
    eprintln!(
        "redis: ghost time (SIGKILL to the last leave) {ghost:?} with node_timeout {:?}",
        cluster::NODE_TIMEOUT
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_node_does_not_duplicate_members() {
    let broker = RedisServer::start();
    cluster::restarted_node_does_not_duplicate_members(&broker.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_user_connection_limit_is_cluster_wide() {
    let broker = RedisServer::start();
    cluster::user_connection_limit_is_cluster_wide(&broker.url()).await;
}
