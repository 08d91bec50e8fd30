//! Presence: who is subscribed to a room, cluster-wide.
//!
//! Module map:
//! - this file: the [`Presence`] trait and its contract.
//! - [`dynamic`]: [`DynPresence`], the object-safe face of any [`Presence`].
//! - [`memory`]: [`MemoryPresence`], the single-node implementation.
//! - `nats` (feature `nats`, on by default): [`NatsPresence`], presence in a NATS JetStream
//!   key-value bucket shared by every node.
//! - `redis` (feature `redis`, on by default): [`RedisPresence`], shared by a cluster's nodes.

use std::future::Future;

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

/// Room membership.
///
/// Contract:
/// - one entry per (room, client): `add` of a client already present replaces its member
///   data and refreshes it; `remove` of an absent client is not an error;
/// - `members` and `stats` reflect every `add`/`remove` that returned before they were
///   called, on any node;
/// - implementations shared by several nodes expire entries that their node stopped
///   refreshing, so a dead node leaves no ghost members.
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
}
