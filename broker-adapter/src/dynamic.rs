//! [`DynBroker`]: the object-safe face of every [`Broker`], with one error type.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use roomcast_protocol::{Position, Room};

use crate::{
    Broker, BrokerEventHandler, BrokerPublication, HistoryOptions, HistoryPage, HistoryQuery, Idempotent,
    InvalidRequest, RoomEvent,
};

/// A boxed future returning a broker result.
pub type BrokerFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, BrokerError>> + Send + 'a>>;

/// Any broker's error, kept as its source.
#[derive(Debug, thiserror::Error)]
#[error("broker: {0}")]
pub struct BrokerError(#[source] pub Box<dyn std::error::Error + Send + Sync>);

impl BrokerError {
    /// The reason when the call was refused for its arguments (an idempotency key of a bad
    /// length, a too large control message), as opposed to a backend failure.
    pub fn invalid_request(&self) -> Option<&InvalidRequest> {
        let first: &(dyn std::error::Error + 'static) = &*self.0;
        std::iter::successors(Some(first), |e| e.source()).find_map(|e| e.downcast_ref::<InvalidRequest>())
    }
}

/// Object-safe [`Broker`]; every `Broker` is one.
pub trait DynBroker: Send + Sync + 'static {
    fn start(&self, handler: Arc<dyn BrokerEventHandler>) -> BrokerFuture<'_, ()>;
    fn subscribe<'a>(&'a self, room: &'a Room) -> BrokerFuture<'a, ()>;
    fn unsubscribe<'a>(&'a self, room: &'a Room) -> BrokerFuture<'a, ()>;
    fn publish(
        &self,
        publication: BrokerPublication,
        history: HistoryOptions,
    ) -> BrokerFuture<'_, Option<Position>>;
    fn publish_idempotent<'a>(
        &'a self,
        publication: BrokerPublication,
        history: HistoryOptions,
        key: &'a str,
        window: Duration,
    ) -> BrokerFuture<'a, Idempotent>;
    fn publish_control(&self, payload: Bytes) -> BrokerFuture<'_, ()>;
    fn publish_event<'a>(&'a self, room: &'a Room, event: RoomEvent) -> BrokerFuture<'a, ()>;
    fn history<'a>(
        &'a self,
        room: &'a Room,
        query: HistoryQuery,
        history: HistoryOptions,
    ) -> BrokerFuture<'a, HistoryPage>;
    fn remove_history<'a>(&'a self, room: &'a Room) -> BrokerFuture<'a, ()>;
    fn is_ready(&self) -> bool;
}

fn boxed<'a, T, E, F>(f: F) -> BrokerFuture<'a, T>
where
    F: Future<Output = Result<T, E>> + Send + 'a,
    E: std::error::Error + Send + Sync + 'static,
{
    Box::pin(async move { f.await.map_err(|e| BrokerError(Box::new(e))) })
}

impl<B: Broker> DynBroker for B {
    fn start(&self, handler: Arc<dyn BrokerEventHandler>) -> BrokerFuture<'_, ()> {
        boxed(Broker::start(self, handler))
    }
    fn subscribe<'a>(&'a self, room: &'a Room) -> BrokerFuture<'a, ()> {
        boxed(Broker::subscribe(self, room))
    }
    fn unsubscribe<'a>(&'a self, room: &'a Room) -> BrokerFuture<'a, ()> {
        boxed(Broker::unsubscribe(self, room))
    }
    fn publish(
        &self,
        publication: BrokerPublication,
        history: HistoryOptions,
    ) -> BrokerFuture<'_, Option<Position>> {
        boxed(Broker::publish(self, publication, history))
    }
    fn publish_idempotent<'a>(
        &'a self,
        publication: BrokerPublication,
        history: HistoryOptions,
        key: &'a str,
        window: Duration,
    ) -> BrokerFuture<'a, Idempotent> {
        boxed(Broker::publish_idempotent(self, publication, history, key, window))
    }
    fn publish_control(&self, payload: Bytes) -> BrokerFuture<'_, ()> {
        boxed(Broker::publish_control(self, payload))
    }
    fn publish_event<'a>(&'a self, room: &'a Room, event: RoomEvent) -> BrokerFuture<'a, ()> {
        boxed(Broker::publish_event(self, room, event))
    }
    fn history<'a>(
        &'a self,
        room: &'a Room,
        query: HistoryQuery,
        history: HistoryOptions,
    ) -> BrokerFuture<'a, HistoryPage> {
        boxed(Broker::history(self, room, query, history))
    }
    fn remove_history<'a>(&'a self, room: &'a Room) -> BrokerFuture<'a, ()> {
        boxed(Broker::remove_history(self, room))
    }
    fn is_ready(&self) -> bool {
        Broker::is_ready(self)
    }
}
