//! [`DynPresence`]: the object-safe face of every [`Presence`], with one error type.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use roomcast_protocol::{Member, Room};

use crate::{NodeInfo, Presence, PresenceStats, Reaped};

/// A boxed future returning a presence result.
pub type PresenceFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, PresenceError>> + Send + 'a>>;

/// Any presence implementation's error, kept as its source.
#[derive(Debug, thiserror::Error)]
#[error("presence: {0}")]
pub struct PresenceError(#[source] pub Box<dyn std::error::Error + Send + Sync>);

/// Object-safe [`Presence`]; every `Presence` is one.
pub trait DynPresence: Send + Sync + 'static {
    fn add<'a>(&'a self, room: &'a Room, member: &'a Member) -> PresenceFuture<'a, ()>;
    fn remove<'a>(&'a self, room: &'a Room, client: &'a str) -> PresenceFuture<'a, ()>;
    fn members<'a>(&'a self, room: &'a Room, limit: usize) -> PresenceFuture<'a, Option<Vec<Member>>>;
    fn stats<'a>(&'a self, room: &'a Room) -> PresenceFuture<'a, PresenceStats>;
    fn heartbeat<'a>(&'a self, node: &'a NodeInfo) -> PresenceFuture<'a, ()>;
    fn nodes(&self, timeout: Duration) -> PresenceFuture<'_, Vec<NodeInfo>>;
    fn reap(&self, timeout: Duration) -> PresenceFuture<'_, Vec<Reaped>>;
    fn deregister(&self) -> PresenceFuture<'_, ()>;
}

fn boxed<'a, T, E, F>(f: F) -> PresenceFuture<'a, T>
where
    F: Future<Output = Result<T, E>> + Send + 'a,
    E: std::error::Error + Send + Sync + 'static,
{
    Box::pin(async move { f.await.map_err(|e| PresenceError(Box::new(e))) })
}

impl<P: Presence> DynPresence for P {
    fn add<'a>(&'a self, room: &'a Room, member: &'a Member) -> PresenceFuture<'a, ()> {
        boxed(Presence::add(self, room, member))
    }
    fn remove<'a>(&'a self, room: &'a Room, client: &'a str) -> PresenceFuture<'a, ()> {
        boxed(Presence::remove(self, room, client))
    }
    fn members<'a>(&'a self, room: &'a Room, limit: usize) -> PresenceFuture<'a, Option<Vec<Member>>> {
        boxed(Presence::members(self, room, limit))
    }
    fn stats<'a>(&'a self, room: &'a Room) -> PresenceFuture<'a, PresenceStats> {
        boxed(Presence::stats(self, room))
    }
    fn heartbeat<'a>(&'a self, node: &'a NodeInfo) -> PresenceFuture<'a, ()> {
        boxed(Presence::heartbeat(self, node))
    }
    fn nodes(&self, timeout: Duration) -> PresenceFuture<'_, Vec<NodeInfo>> {
        boxed(Presence::nodes(self, timeout))
    }
    fn reap(&self, timeout: Duration) -> PresenceFuture<'_, Vec<Reaped>> {
        boxed(Presence::reap(self, timeout))
    }
    fn deregister(&self) -> PresenceFuture<'_, ()> {
        boxed(Presence::deregister(self))
    }
}
