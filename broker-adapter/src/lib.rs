//! The broker: what carries publications between nodes and keeps each room's history.
//!
//! Module map:
//! - this file: the [`Broker`] trait and its contract, the [`BrokerEventHandler`] through
//!   which a broker feeds events back to the node, and the types they share.
//! - [`dynamic`]: [`DynBroker`], the object-safe face of any [`Broker`], so a node can pick
//!   its broker at run time from configuration.
//! - [`memory`]: [`MemoryBroker`], the single-node broker (no external service).
//! - `nats` (feature `nats`, on by default): [`NatsBroker`], the cluster broker on NATS
//!   JetStream (server 2.9+).
//! - `redis` (feature `redis`, on by default): [`RedisBroker`], the cluster broker on Redis
//!   or Redis Cluster.
//!
//! Besides rooms, every broker carries a **control channel** ([`Broker::publish_control`],
//! [`BrokerEventHandler::handle_control`]): opaque commands from one node to every node
//! (itself included), for cluster-wide operations such as disconnecting a user. And
//! [`Broker::publish_idempotent`] publishes at most once per idempotency key and room within
//! a window, cluster-wide.
//!
//! Dependencies point one way: this crate knows the protocol's types, never the gateway.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use roomcast_protocol::{Data, Member, Position, PublisherInfo, Room};

pub mod dynamic;
pub mod memory;
#[cfg(feature = "nats")]
pub mod nats;
#[cfg(feature = "redis")]
pub mod redis;

pub use dynamic::{BrokerError, DynBroker};
pub use memory::MemoryBroker;
#[cfg(feature = "nats")]
pub use nats::NatsBroker;
#[cfg(feature = "redis")]
pub use redis::RedisBroker;

/// Largest control message [`Broker::publish_control`] carries (1 MiB).
pub const MAX_CONTROL_PAYLOAD: usize = 1 << 20;
/// Longest idempotency key of [`Broker::publish_idempotent`], in bytes (keys are 1 to 128
/// bytes).
pub const MAX_IDEMPOTENCY_KEY: usize = 128;

/// A call refused before it reached the backend: every broker's error converts from it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidRequest {
    #[error("idempotency key of {0} bytes: must be 1 to {MAX_IDEMPOTENCY_KEY} bytes")]
    IdempotencyKey(usize),
    #[error("idempotency window must be longer than zero")]
    IdempotencyWindow,
    #[error("control message of {0} bytes: at most {MAX_CONTROL_PAYLOAD} bytes")]
    ControlTooLarge(usize),
}

/// Checks the arguments of [`Broker::publish_idempotent`] (for implementations).
pub fn check_idempotent(key: &str, window: Duration) -> Result<(), InvalidRequest> {
    if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY {
        return Err(InvalidRequest::IdempotencyKey(key.len()));
    }
    if window.is_zero() {
        return Err(InvalidRequest::IdempotencyWindow);
    }
    Ok(())
}

/// Checks the payload of [`Broker::publish_control`] (for implementations).
pub fn check_control(payload: &[u8]) -> Result<(), InvalidRequest> {
    if payload.len() > MAX_CONTROL_PAYLOAD {
        return Err(InvalidRequest::ControlTooLarge(payload.len()));
    }
    Ok(())
}

/// What an idempotent publish did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Idempotent {
    /// Published now; the position when history is on.
    Published(Option<Position>),
    /// The key was used for this room within the window: nothing published; the first
    /// publication's position (when history is on and it is known).
    Duplicate(Option<Position>),
}

impl Idempotent {
    /// The position either way.
    pub fn position(&self) -> Option<&Position> {
        match self {
            Idempotent::Published(p) | Idempotent::Duplicate(p) => p.as_ref(),
        }
    }
}

/// A publication as it travels through a broker.
#[derive(Debug, Clone, PartialEq)]
pub struct BrokerPublication {
    pub room: Room,
    /// Assigned by the broker in rooms with history; `None` otherwise.
    pub offset: Option<u64>,
    /// The epoch `offset` belongs to; set together with `offset`.
    pub epoch: Option<String>,
    pub data: Data,
    /// The publishing connection, absent for backend publications.
    pub info: Option<PublisherInfo>,
    /// A client that must not receive this publication (the publisher's `skip_self`).
    /// Client ids are unique in the cluster, so every node may apply it.
    pub skip_client: Option<String>,
}

impl BrokerPublication {
    /// A publication not yet published (no position).
    pub fn new(room: Room, data: Data) -> Self {
        BrokerPublication { room, offset: None, epoch: None, data, info: None, skip_client: None }
    }

    /// The position this publication has, when its room keeps history.
    pub fn position(&self) -> Option<Position> {
        Some(Position { offset: self.offset?, epoch: self.epoch.clone()? })
    }
}

/// How a room's history is kept: from its namespace's configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryOptions {
    /// Most publications kept; 0 turns history off (no offsets).
    pub size: usize,
    /// How long each publication is kept; when every publication has expired the whole
    /// history is gone and the next publication starts a new epoch.
    pub ttl: Duration,
}

impl HistoryOptions {
    /// No history: publications carry no offset.
    pub const OFF: HistoryOptions = HistoryOptions { size: 0, ttl: Duration::ZERO };
    /// Whether history is on.
    pub fn enabled(&self) -> bool {
        self.size > 0 && !self.ttl.is_zero()
    }
}

/// What a history read asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HistoryQuery {
    /// Only publications after this position. When the position cannot be continued (other
    /// epoch, or publications after it no longer kept) the page says `continuable: false`
    /// and holds no publications.
    pub since: Option<Position>,
    /// At most this many publications; `Some(0)` reads only the position.
    pub limit: Option<usize>,
    /// Newest first.
    pub reverse: bool,
}

/// The answer to a history read.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryPage {
    /// The room's current position (the last publication's, or offset 0 and the epoch the
    /// first publication will carry).
    pub position: Position,
    pub publications: Vec<BrokerPublication>,
    /// With `since`: whether every publication after it is still kept in the same epoch.
    pub continuable: bool,
}

/// A presence change to fan out to a room's subscribers on every node.
#[derive(Debug, Clone, PartialEq)]
pub enum RoomEvent {
    Join(Member),
    Leave(Member),
}

/// Receives what a broker delivers. Implemented by the node, which hands each event to its
/// local subscribers.
///
/// Contract: for one room, calls are made one at a time and in the room's order (history
/// order for publications); control messages of one sender arrive in the order sent.
/// Implementations must not block: they enqueue and return.
pub trait BrokerEventHandler: Send + Sync + 'static {
    /// A publication in a room this node subscribed to.
    fn handle_publication(&self, publication: &BrokerPublication);
    /// A join or leave in a room this node subscribed to.
    fn handle_room_event(&self, room: &Room, event: &RoomEvent);
    /// Delivery was interrupted (for example the broker connection dropped) and events may
    /// have been lost for every room: subscribers must resynchronise from history.
    fn handle_interruption(&self) {}
    /// A control message some node (this one included) sent with `Broker::publish_control`.
    /// Must not block (enqueue and return).
    fn handle_control(&self, payload: &[u8]);
}

/// Publish, history and fan-out of publications between nodes.
///
/// Contract every implementation keeps:
/// - **Atomic per room**: `publish` assigns the next offset, appends to history and fans
///   out in one step, so for every room the order publications reach handlers equals
///   offset order, on every node.
/// - **Contiguous offsets**: the n-th publication of an epoch has offset n.
/// - **Epochs**: a room's epoch changes when its history is lost (storage restarted empty
///   or the whole history expired); offsets then restart at 1.
/// - **Subscribe before read**: once `subscribe(room)` returned `Ok`, every publication
///   published afterwards reaches the handler; a history read started after that returns
///   every publication published before it. Together these let a node recover a client
///   with no gap and no duplicate.
/// - `subscribe`/`unsubscribe` are reference-free: the node calls `subscribe` once when a
///   room gets its first local subscriber and `unsubscribe` when it has none left.
/// - **Control channel**: `publish_control` reaches the handler of every started node
///   that is connected at the time (the sender's included), at most once, never stored;
///   messages of one sender arrive in the order sent. Payloads are at most
///   [`MAX_CONTROL_PAYLOAD`] bytes ([`InvalidRequest::ControlTooLarge`] beyond).
/// - **Idempotent publish**: `publish_idempotent` claims `(room, key)` and publishes in one
///   step as seen by every node: of the calls with one key for one room within the window
///   (concurrent ones included, on any node) exactly one publishes; the others publish
///   nothing and answer [`Idempotent::Duplicate`] with the first one's position. A failed
///   publish releases its claim. Keys are 1 to [`MAX_IDEMPOTENCY_KEY`] bytes, the window
///   longer than zero ([`InvalidRequest`] otherwise). The window starts when the claim is
///   made (and may run up to one publish round trip longer). Limits, documented by each
///   implementation: the memory broker remembers at most [`memory::IDEMPOTENCY_KEYS`]
///   keys (those closest to expiring are forgotten first); NATS rounds windows up to
///   100 ms, and while the claim of a node that died mid-publish lasts (until the window
///   ends) calls with that key fail with `NatsError::IdempotencyPending` rather than risk
///   publishing twice; Redis answers a call whose reply was lost (timeout) with
///   `Duplicate` on retry, since the script may have run.
pub trait Broker: Send + Sync + 'static {
    /// The implementation's error.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Starts delivering events to `handler`. Called once, before anything else.
    fn start(
        &self,
        handler: Arc<dyn BrokerEventHandler>,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Starts delivery of `room`'s events to this node.
    fn subscribe(&self, room: &Room) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Stops delivery of `room`'s events to this node.
    fn unsubscribe(&self, room: &Room) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Publishes: assigns a position when `history` is enabled (returned), appends to
    /// history and fans out. `publication.offset` and `.epoch` are ignored on input.
    fn publish(
        &self,
        publication: BrokerPublication,
        history: HistoryOptions,
    ) -> impl Future<Output = Result<Option<Position>, Self::Error>> + Send;

    /// `publish`, unless `key` was used for `publication.room` within `window` (cluster-wide):
    /// then nothing is published and the first publication's position is returned. Concurrent
    /// calls with one key publish once. When the publish fails, the key is released (a retry may publish).
    fn publish_idempotent(
        &self,
        publication: BrokerPublication,
        history: HistoryOptions,
        key: &str,
        window: Duration,
    ) -> impl Future<Output = Result<Idempotent, Self::Error>> + Send;

    /// Sends `payload` to every node's handler, this node's included, while they are connected.
    /// Not stored; at most once; messages from one sender arrive in the order sent.
    fn publish_control(&self, payload: bytes::Bytes) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Fans a presence event out to the room's subscribers on every node (not kept).
    fn publish_event(
        &self,
        room: &Room,
        event: RoomEvent,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Reads a room's history and position.
    fn history(
        &self,
        room: &Room,
        query: HistoryQuery,
        history: HistoryOptions,
    ) -> impl Future<Output = Result<HistoryPage, Self::Error>> + Send;

    /// Drops a room's history; its next publication starts a new epoch.
    fn remove_history(&self, room: &Room) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Whether the broker can serve now (for readiness).
    fn is_ready(&self) -> bool {
        true
    }
}
