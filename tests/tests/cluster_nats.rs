//! Issue 3 with NATS: three real nodes sharing a real `nats-server` with JetStream: fan-out
//! in one order across nodes and encodings, concurrent publishers on different nodes,
//! recovery on another node, an SDK client surviving a SIGKILLed node, NATS restarted
//! with an empty store (new epoch, `recovered: false`, `/readyz`), presence and join/leave
//! across nodes. The scenarios are in `cluster/mod.rs`, shared with Redis.
//!
//! `nats-server` must be on PATH (`.ci/run` installs it).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cluster;

use cluster::Cluster;
use roomcast_tests::services::NatsServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_publications_reach_every_node_in_one_order() {
    let c = Cluster::start(NatsServer::start());
    cluster::fan_out_in_one_order(&c.nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_concurrent_publishers_on_different_nodes() {
    let c = Cluster::start(NatsServer::start());
    cluster::concurrent_publishers(&c.nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_recovery_on_another_node() {
    let c = Cluster::start(NatsServer::start());
    cluster::recovers_on_another_node(&c.nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_sdk_survives_a_node_sigkill() {
    let mut c = Cluster::start(NatsServer::start());
    cluster::sdk_survives_a_node_kill(&mut c.nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restarted_empty() {
    let mut c = Cluster::start(NatsServer::start());
    cluster::broker_restarted_empty(&mut c.broker, &c.nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_presence_agrees_on_every_node() {
    let c = Cluster::start(NatsServer::start());
    cluster::presence_agrees_on_every_node(&c.nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_killed_node_leaves_no_ghosts() {
    let mut c = Cluster::start(NatsServer::start());
    let ghost = cluster::ghosts_of_a_killed_node_leave_once(&mut c.nodes).await;
    eprintln!(
        "nats: ghost time (SIGKILL to the last leave) {ghost:?} with node_timeout {:?}",
        cluster::NODE_TIMEOUT
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restarted_node_does_not_duplicate_members() {
    let broker = NatsServer::start();
    cluster::restarted_node_does_not_duplicate_members(&broker.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_user_connection_limit_is_cluster_wide() {
    let broker = NatsServer::start();
    cluster::user_connection_limit_is_cluster_wide(&broker.url()).await;
}
