//! Presence: who is subscribed to a room, cluster-wide.
//!
//! Module map:
//! - this file: the [`Presence`] trait and its contract, including the cluster's registry of
//!   live nodes (heartbeats) and the reaping of dead nodes' members.
//! - [`dynamic`]: [`DynPresence`], the object-safe face of any [`Presence`].
//! - [`memory`]: [`MemoryPresence`], the single-node implementation.
//! - `nats` (feature `nats`, on by default): [`NatsPresence`], presence in a NATS JetStream
//!   key-value bucket shared by every node.
//! - `redis` (feature `redis`, on by default): [`RedisPresence`], shared by a cluster's nodes.

use std::future::Future;
use std::time::Duration;

use roomcast_protocol::{Member, Room};

pub mod dynamic;
pub mod memory;
#[cfg(feature = "nats")]
pub mod nats;
#[cfg(feature = "redis")]
pub mod redis;

pub use dynamic::{DynPresence, PresenceError};
pub use memory::MemoryPresence;
#[cfg(feature = "nats")]
pub use nats::NatsPresence;
#[cfg(feature = "redis")]
pub use redis::RedisPresence;

/// Counts of a room's members.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PresenceStats {
    /// Distinct connections.
    pub clients: u64,
    /// Distinct users (anonymous connections, user `""`, count as one user).
    pub users: u64,
}

/// A node of the cluster as its last heartbeat described it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// The node's id (as in `connected.node`).
    pub id: String,
    /// Open connections on the node.
    pub connections: u64,
    /// Rooms with subscribers on the node.
    pub rooms: u64,
}

/// A member removed because the node that added it died.
#[derive(Debug, Clone, PartialEq)]
pub struct Reaped {
    pub room: Room,
    pub member: Member,
}

/// A unique id for one run of a node: its configured id and a random part, so a node that
/// restarts with the same id is a new incarnation and its previous run's members are
/// reaped rather than adopted.
pub fn incarnation_of(node_id: &str) -> String {
    format!("{node_id}.{:016x}", rand::random::<u64>())
}

/// A random node id, for a presence whose node did not name itself.
pub fn random_node_id() -> String {
    format!("node-{:016x}", rand::random::<u64>())
}

/// Whether the node run `incarnation`, silent for `silent`, is dead as seen from the run
/// `mine`: silent for longer than `timeout`, or an earlier run of the same node id (two
/// live nodes never share an id, so a node that restarted reaps its previous run at once).
pub fn is_dead(incarnation: &str, silent: Duration, timeout: Duration, mine: &str) -> bool {
    if incarnation == mine {
        return false;
    }
    let id = |inc: &str| inc.rsplit_once('.').map_or(inc.to_string(), |(id, _)| id.to_string());
    silent > timeout || id(incarnation) == id(mine)
}

/// Room membership.
///
/// Contract:
/// - one entry per (room, client): `add` of a client already present replaces its member
///   data and refreshes it; `remove` of an absent client is not an error;
/// - `members` and `stats` reflect every `add`/`remove` that returned before they were
///   called, on any node;
/// - implementations shared by several nodes expire entries that their node stopped
///   refreshing (a backstop: after the TTL, silently);
/// - **node registry**: each node calls [`Presence::heartbeat`] periodically; a node not
///   heard of for a timeout is dead, and [`Presence::reap`] removes every member it added
///   and returns each removed member to exactly one caller in the cluster, however many
///   nodes reap at once, so exactly one `leave` is announced per member. Members are
///   recorded under this run's incarnation (see [`incarnation_of`]): a node restarted with
///   the same id does not adopt its previous run's members, they are reaped.
pub trait Presence: Send + Sync + 'static {
    /// The implementation's error.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Adds or refreshes `member` in `room`.
    fn add(&self, room: &Room, member: &Member) -> impl Future<Output = Result<(), Self::Error>> + Send;
    /// Removes `client` from `room`.
    fn remove(&self, room: &Room, client: &str) -> impl Future<Output = Result<(), Self::Error>> + Send;
    /// The members of `room`, at most `limit` of them (`None` when there are more).
    fn members(
        &self,
        room: &Room,
        limit: usize,
    ) -> impl Future<Output = Result<Option<Vec<Member>>, Self::Error>> + Send;
    /// Counts of `room`'s members.
    fn stats(&self, room: &Room) -> impl Future<Output = Result<PresenceStats, Self::Error>> + Send;

    /// Records that this node is alive, with its counts.
    fn heartbeat(&self, node: &NodeInfo) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// The nodes heard of within `timeout`, this one included once it sent a heartbeat.
    fn nodes(&self, timeout: Duration) -> impl Future<Output = Result<Vec<NodeInfo>, Self::Error>> + Send;

    /// Removes the members of nodes not heard of for `timeout` (and forgets those nodes);
    /// returns the members this call removed (each to exactly one caller cluster-wide).
    fn reap(&self, timeout: Duration) -> impl Future<Output = Result<Vec<Reaped>, Self::Error>> + Send;

    /// Takes this node out of the registry (graceful shutdown, after its members left).
    fn deregister(&self) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_when_silent_too_long_or_an_earlier_run_of_this_node() {
        let s = Duration::from_secs;
        let mine = incarnation_of("pod-1");
        assert!(!is_dead(&mine, s(60), s(10), &mine), "never itself");
        assert!(!is_dead(&incarnation_of("pod-2"), s(9), s(10), &mine));
        assert!(is_dead(&incarnation_of("pod-2"), s(11), s(10), &mine));
        assert!(is_dead(&incarnation_of("pod-1"), s(0), s(10), &mine), "an earlier run of pod-1");
        assert!(!is_dead(&incarnation_of("pod-1.x"), s(0), s(10), &mine), "ids with dots are compared whole");
        assert_ne!(random_node_id(), random_node_id());
    }
}
