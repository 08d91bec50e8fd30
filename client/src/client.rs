//! The application-facing handles: [`ClientBuilder`], [`Client`], [`Subscription`].

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use roomcast_protocol::{Command, Data, Encoding, Member, Position, Reply, Room};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::time::Instant;

use crate::backoff::BackoffConfig;
use crate::driver::{self, DriverConfig};
use crate::machine::{Machine, MachineConfig, Op};
use crate::{
    ClientError, ConnectionEvent, HistoryOptions, HistoryResult, SubscribeOptions, SubscriptionEvent,
};

/// Ops waiting for the driver; a full channel makes callers wait (within their timeout).
const OPS_CAPACITY: usize = 256;
/// Connection events kept for slow `events()` receivers (older ones are skipped: see
/// `broadcast::error::RecvError::Lagged`).
const EVENTS_CAPACITY: usize = 256;
/// Default bound of each subscription's event channel.
pub const DEFAULT_SUBSCRIPTION_BUFFER: usize = 1024;

/// Settings for a [`Client`]; [`ClientBuilder::connect`] starts it.
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    urls: Vec<String>,
    encoding: Encoding,
    token: Option<String>,
    name: Option<String>,
    backoff: BackoffConfig,
    request_timeout: Duration,
    liveness_grace: Duration,
    subscription_buffer: usize,
    connect_attempts: Option<usize>,
}

impl ClientBuilder {
    /// JSON; no token; backoff 100 ms .. 10 s, factor 2, full jitter; requests time out
    /// after 10 s; a connection silent for the node's `ping_ms` + 10 s is dead; 1024
    /// events per subscription; one attempt per URL for the first connection.
    pub fn new(urls: Vec<String>) -> Self {
        ClientBuilder {
            urls,
            encoding: Encoding::Json,
            token: None,
            name: None,
            backoff: BackoffConfig::default(),
            request_timeout: Duration::from_secs(10),
            liveness_grace: Duration::from_secs(10),
            subscription_buffer: DEFAULT_SUBSCRIPTION_BUFFER,
            connect_attempts: None,
        }
    }

    /// JSON text frames (default) or MessagePack binary frames.
    pub fn encoding(mut self, encoding: Encoding) -> Self {
        self.encoding = encoding;
        self
    }

    /// The connection token (JWT) sent in `connect`.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Sets or clears the connection token.
    pub fn maybe_token(mut self, token: Option<String>) -> Self {
        self.token = token;
        self
    }

    /// The client name sent in `connect`.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Reconnect delays.
    pub fn backoff(mut self, backoff: BackoffConfig) -> Self {
        self.backoff = backoff;
        self
    }

    /// How long a call waits for its reply (including waiting for a connection), and the
    /// limit on opening a socket and on getting `connected`.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Silence tolerated past the node's `ping_ms` before the connection counts as dead
    /// (spec section 7: the pong timeout, 10 s by default).
    pub fn liveness_grace(mut self, grace: Duration) -> Self {
        self.liveness_grace = grace;
        self
    }

    /// Bound of each subscription's event channel (at least 2). When the application
    /// falls that far behind, events are dropped and the subscription is recovered.
    pub fn subscription_buffer(mut self, n: usize) -> Self {
        self.subscription_buffer = n.max(2);
        self
    }

    /// How many failed attempts to open the first connection (rotating through the
    /// URLs, with backoff) before [`ClientBuilder::connect`] fails. Default: one per URL.
    pub fn connect_attempts(mut self, n: usize) -> Self {
        self.connect_attempts = Some(n.max(1));
        self
    }

    /// Starts the client and waits for the first `connected` (or the error that
    /// prevented it). Later connection losses are handled in the background.
    pub async fn connect(self) -> Result<Client, ClientError> {
        if self.urls.is_empty() {
            return Err(ClientError::NoUrls);
        }
        let (ops_tx, ops_rx) = mpsc::channel(OPS_CAPACITY);
        let (events_tx, events_rx) = broadcast::channel(EVENTS_CAPACITY);
        let (ready_tx, ready_rx) = oneshot::channel();
        let closed = Arc::new(OnceLock::new());
        let machine = Machine::new(
            MachineConfig {
                encoding: self.encoding,
                token: self.token,
                name: self.name,
                handshake_timeout: self.request_timeout,
                liveness_grace: self.liveness_grace,
            },
            events_tx,
            ready_tx,
            closed.clone(),
            Instant::now(),
        );
        let driver_cfg = DriverConfig {
            connect_attempts: self.connect_attempts.unwrap_or(self.urls.len()),
            urls: self.urls,
            io_timeout: self.request_timeout,
            backoff: self.backoff,
        };
        tokio::spawn(driver::run(machine, ops_rx, driver_cfg));
        let client = Client {
            inner: Arc::new(Inner {
                ops: ops_tx,
                events: events_rx,
                closed,
                request_timeout: self.request_timeout,
                subscription_buffer: self.subscription_buffer,
            }),
        };
        match ready_rx.await {
            Ok(Ok(())) => Ok(client),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(client.closed_error()),
        }
    }
}

/// A connection to a roomcast cluster that reconnects and resubscribes by itself.
///
/// Cheap to clone: every clone talks to the same background driver task. The driver ends
/// when [`Client::close`] is called, when the node closes for good, or when the last
/// clone is dropped ([`Subscription`]s do not keep it alive).
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("closed", &self.is_closed()).finish()
    }
}

struct Inner {
    /// Ops to the driver task. Bounded. These are the only strong senders: when the last
    /// `Inner` is dropped the driver sees the channel closed and shuts down.
    ops: mpsc::Sender<Op>,
    /// Never read: kept only to make new receivers for [`Client::events`]. The driver
    /// owns the sender, so receivers see the channel closed when the driver ends.
    events: broadcast::Receiver<ConnectionEvent>,
    /// Why the client ended, set by the driver once; read to answer calls made after.
    closed: Arc<OnceLock<(u16, String)>>,
    request_timeout: Duration,
    subscription_buffer: usize,
}

fn unexpected(reply: Reply) -> ClientError {
    ClientError::Protocol(format!("unexpected reply: {reply:?}"))
}

impl Client {
    /// A builder for a client of these node URLs (`ws://host:port/ws`), tried in turn.
    pub fn builder(urls: Vec<String>) -> ClientBuilder {
        ClientBuilder::new(urls)
    }

    /// Connection events from now on: connected, disconnected, `message` pushes.
    pub fn events(&self) -> broadcast::Receiver<ConnectionEvent> {
        self.inner.events.resubscribe()
    }

    /// Whether the client has ended (the driver is gone).
    pub fn is_closed(&self) -> bool {
        self.inner.ops.is_closed()
    }

    /// Publishes into a room. Returns the publication's position in rooms with history.
    /// Never retried: on [`ClientError::Disconnected`] the caller decides.
    pub async fn publish(&self, room: &str, data: Data) -> Result<Option<Position>, ClientError> {
        self.publish_inner(room, data, false).await
    }

    /// Publishes without getting the publication pushed back to this connection; its
    /// offset counts as seen by this client's subscription to the room.
    pub async fn publish_skip_self(&self, room: &str, data: Data) -> Result<Option<Position>, ClientError> {
        self.publish_inner(room, data, true).await
    }

    async fn publish_inner(
        &self,
        room: &str,
        data: Data,
        skip_self: bool,
    ) -> Result<Option<Position>, ClientError> {
        let room = Room::parse(room)?;
        match self.call(Command::Publish { room, data, skip_self }).await? {
            Reply::Published { position, .. } => Ok(position),
            other => Err(unexpected(other)),
        }
    }

    /// A room's history.
    pub async fn history(&self, room: &str, opts: HistoryOptions) -> Result<HistoryResult, ClientError> {
        let room = Room::parse(room)?;
        let command = Command::History { room, since: opts.since, limit: opts.limit, reverse: opts.reverse };
        match self.call(command).await? {
            Reply::History { position, publications, .. } => Ok(HistoryResult { position, publications }),
            other => Err(unexpected(other)),
        }
    }

    /// The members of a room.
    pub async fn presence(&self, room: &str) -> Result<Vec<Member>, ClientError> {
        let room = Room::parse(room)?;
        match self.call(Command::Presence { room }).await? {
            Reply::Presence { members, .. } => Ok(members),
            other => Err(unexpected(other)),
        }
    }

    /// How many connections and distinct users are in a room: `(clients, users)`.
    pub async fn presence_stats(&self, room: &str) -> Result<(u64, u64), ClientError> {
        let room = Room::parse(room)?;
        match self.call(Command::PresenceStats { room }).await? {
            Reply::PresenceStats { clients, users, .. } => Ok((clients, users)),
            other => Err(unexpected(other)),
        }
    }

    /// Calls a backend method through the node; returns the backend's answer.
    pub async fn rpc(&self, method: &str, data: Data) -> Result<Data, ClientError> {
        let command = Command::Rpc { method: method.to_string(), data };
        match self.call(command).await? {
            Reply::Rpc { data } => Ok(data),
            other => Err(unexpected(other)),
        }
    }

    /// Replaces the connection token (before it expires); later reconnects use it too.
    /// Returns the new `expires_in` (seconds).
    pub async fn refresh(&self, token: impl Into<String>) -> Result<Option<u64>, ClientError> {
        match self.call(Command::Refresh { token: token.into() }).await? {
            Reply::Refreshed { expires_in } => Ok(expires_in),
            other => Err(unexpected(other)),
        }
    }

    /// Subscribes to a room. Returns once the node confirmed; the first event is
    /// [`SubscriptionEvent::Subscribed`].
    pub async fn subscribe(&self, room: &str) -> Result<Subscription, ClientError> {
        self.subscribe_with(room, SubscribeOptions::default()).await
    }

    /// Subscribes with options (presence list, subscription token, recover position).
    pub async fn subscribe_with(
        &self,
        room: &str,
        opts: SubscribeOptions,
    ) -> Result<Subscription, ClientError> {
        let room = Room::parse(room)?;
        let (events_tx, events_rx) = mpsc::channel(self.inner.subscription_buffer);
        let (tx, rx) = oneshot::channel();
        let op = Op::Subscribe { room: room.clone(), opts, events: events_tx, reply: tx };
        let key = self.request(op, rx).await?;
        Ok(Subscription {
            room,
            key,
            events: events_rx,
            ops: self.inner.ops.downgrade(),
            request_timeout: self.inner.request_timeout,
            unsubscribed: false,
        })
    }

    /// Ends this client's subscription to a room (its [`Subscription`] stream ends).
    pub async fn unsubscribe(&self, room: &str) -> Result<(), ClientError> {
        let room = Room::parse(room)?;
        let (tx, rx) = oneshot::channel();
        self.request(Op::Unsubscribe { room, key: None, reply: Some(tx) }, rx).await
    }

    /// Closes the client: the socket is closed, waiting calls get
    /// [`ClientError::Closed`], subscriptions end. Returns when done.
    pub async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.inner.ops.send(Op::Close { done: tx }).await.is_ok() {
            let _ = rx.await;
        }
    }

    async fn call(&self, command: Command) -> Result<Reply, ClientError> {
        let (tx, rx) = oneshot::channel();
        self.request(Op::Call { command, reply: tx }, rx).await
    }

    /// Sends an op and waits for its answer, all within the request timeout.
    async fn request<T>(
        &self,
        op: Op,
        rx: oneshot::Receiver<Result<T, ClientError>>,
    ) -> Result<T, ClientError> {
        let fut = async {
            self.inner.ops.send(op).await.map_err(|_| self.closed_error())?;
            rx.await.map_err(|_| self.closed_error())?
        };
        tokio::time::timeout(self.inner.request_timeout, fut).await.map_err(|_| ClientError::Timeout)?
    }

    fn closed_error(&self) -> ClientError {
        match self.inner.closed.get() {
            Some((code, reason)) => ClientError::Closed { code: *code, reason: reason.clone() },
            None => ClientError::closed_locally(),
        }
    }
}

/// One room's events, in order: publications exactly once per offset, presence changes,
/// and (re)subscription notices. Read it with [`Subscription::next`] (or as a
/// `futures::Stream`). It ends (`None`) when the subscription ends.
///
/// Dropping it unsubscribes. It does not keep the [`Client`] alive.
pub struct Subscription {
    room: Room,
    /// Identifies this subscription in the driver (a later one to the same room differs).
    key: u64,
    /// Events from the driver, bounded by [`ClientBuilder::subscription_buffer`]. The
    /// driver drops its sender when the subscription ends, ending this stream.
    events: mpsc::Receiver<SubscriptionEvent>,
    /// A weak sender to the driver, to unsubscribe (also on drop) without keeping the
    /// driver alive.
    ops: mpsc::WeakSender<Op>,
    request_timeout: Duration,
    /// `unsubscribe` was already sent: nothing to do on drop.
    unsubscribed: bool,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription").field("room", &self.room.as_str()).finish()
    }
}

impl Subscription {
    /// The room.
    pub fn room(&self) -> &str {
        self.room.as_str()
    }

    /// The next event; `None` once the subscription has ended.
    pub async fn next(&mut self) -> Option<SubscriptionEvent> {
        self.events.recv().await
    }

    /// The next event if one is ready.
    pub fn try_next(&mut self) -> Option<SubscriptionEvent> {
        self.events.try_recv().ok()
    }

    /// Unsubscribes and waits for the node to confirm.
    pub async fn unsubscribe(mut self) -> Result<(), ClientError> {
        self.unsubscribed = true;
        let Some(ops) = self.ops.upgrade() else {
            return Ok(());
        };
        let (tx, rx) = oneshot::channel();
        let op = Op::Unsubscribe { room: self.room.clone(), key: Some(self.key), reply: Some(tx) };
        let fut = async move {
            ops.send(op).await.map_err(|_| ClientError::closed_locally())?;
            rx.await.unwrap_or(Ok(()))
        };
        tokio::time::timeout(self.request_timeout, fut).await.map_err(|_| ClientError::Timeout)?
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if self.unsubscribed {
            return;
        }
        // Best effort: if the op channel is full, the driver notices the closed event
        // channel on its next tick instead.
        if let Some(ops) = self.ops.upgrade() {
            let _ =
                ops.try_send(Op::Unsubscribe { room: self.room.clone(), key: Some(self.key), reply: None });
        }
    }
}

impl futures_util::Stream for Subscription {
    type Item = SubscriptionEvent;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().events.poll_recv(cx)
    }
}
