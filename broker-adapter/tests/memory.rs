//! [`MemoryBroker`] against the behaviour every broker shares for the control channel and
//! idempotent publishes. Two handles of one memory broker (clones share its rooms and
//! handler) stand for two callers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/extras.rs"]
mod extras;

use std::sync::Arc;
use std::time::Duration;

use extras::Seen;
use parking_lot::Mutex;
use roomcast_broker::{
    Broker, BrokerEventHandler, BrokerPublication, HistoryOptions, MemoryBroker, RoomEvent,
};
use roomcast_protocol::Room;

const H: HistoryOptions = HistoryOptions { size: 100, ttl: Duration::from_secs(60) };

#[derive(Default)]
struct Collect {
    pubs: Mutex<Vec<BrokerPublication>>,
    controls: Mutex<Vec<Vec<u8>>>,
}

impl BrokerEventHandler for Collect {
    fn handle_publication(&self, p: &BrokerPublication) {
        self.pubs.lock().push(p.clone());
    }
    fn handle_room_event(&self, _: &Room, _: &RoomEvent) {}
    fn handle_control(&self, payload: &[u8]) {
        self.controls.lock().push(payload.to_vec());
    }
}

impl Seen for Collect {
    fn controls(&self) -> Vec<Vec<u8>> {
        self.controls.lock().clone()
    }
    fn publications_in(&self, room: &Room) -> Vec<BrokerPublication> {
        self.pubs.lock().iter().filter(|p| &p.room == room).cloned().collect()
    }
}

async fn broker() -> (MemoryBroker, Arc<Collect>) {
    let b = MemoryBroker::new();
    let seen = Arc::new(Collect::default());
    b.start(seen.clone()).await.unwrap();
    (b, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_messages_reach_the_handler_in_order() {
    // One process, one handler: both handles' messages reach it once each, in order.
    let (a, seen) = broker().await;
    let b = a.clone();
    extras::control_reaches_every_node(&a, &*seen, &b, &*seen).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_same_key_twice_publishes_once() {
    let (a, seen) = broker().await;
    extras::same_key_twice_publishes_once(&a, &a.clone(), &*seen, H, "").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_concurrent_calls_on_two_handles_publish_once() {
    let (a, seen) = broker().await;
    extras::concurrent_calls_publish_once(Arc::new(a.clone()), Arc::new(a), &*seen, H, "").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_key_publishes_again_after_the_window() {
    let (a, _) = broker().await;
    extras::the_key_publishes_again_after_the_window(&a, H, "").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_bad_keys_are_refused() {
    let (a, _) = broker().await;
    extras::bad_keys_are_refused(&a, H, "").await;
}
