//! Behaviour layer: the client state machine, with no socket and no timers of its own.
//!
//! The driver feeds it inputs (a connection opened, a frame, an application [`Op`], a
//! clock tick, the connection lost) and takes its outputs: encoded messages to send
//! ([`Machine::take_outbox`]) and what to do with the connection ([`Machine::take_action`]).
//! Replies to the application go out through the oneshot senders carried by the ops;
//! subscription events through each subscription's bounded channel (`try_send`, never
//! awaited: a full channel marks that subscription for recovery instead of blocking);
//! connection events through a broadcast channel.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use roomcast_protocol::{CloseCode, Command, Encoding, Position, Push, Reply, Request, Room, ServerMessage};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::time::Instant;

use crate::codec;
use crate::tracker::{Step, Tracker};
use crate::{ClientError, ConnectionEvent, SubscribeOptions, SubscriptionEvent};

/// Close code and reason reported when the application closes or drops the client.
pub(crate) const LOCAL_CLOSE_CODE: u16 = 1000;
pub(crate) const LOCAL_CLOSE_REASON: &str = "client closed";
/// Close code reported when the connection was lost before it said why.
const ABNORMAL_CLOSE_CODE: u16 = 1006;
/// Most calls waiting for a connection; more fail at once with `Disconnected`.
pub(crate) const MAX_QUEUED: usize = 1024;
/// Delay before retrying a resubscribe the node refused with a temporary error.
const RESUBSCRIBE_RETRY: Duration = Duration::from_secs(1);

/// Where a caller waits for its answer.
pub(crate) type ReplyTx<T> = oneshot::Sender<Result<T, ClientError>>;

/// What a [`crate::Client`] handle asks of the driver.
pub(crate) enum Op {
    /// A command with one reply (publish, history, presence, rpc, refresh, ...).
    Call { command: Command, reply: ReplyTx<Reply> },
    /// Start a subscription; the reply is its key once the first `subscribed` arrived.
    Subscribe {
        room: Room,
        opts: SubscribeOptions,
        events: mpsc::Sender<SubscriptionEvent>,
        reply: ReplyTx<u64>,
    },
    /// End a subscription. `key` set: only if it is still that subscription (a
    /// [`crate::Subscription`] handle); `reply` unset: nobody waits (a dropped handle).
    Unsubscribe { room: Room, key: Option<u64>, reply: Option<ReplyTx<()>> },
    /// Close the client; `done` fires when everything was answered.
    Close { done: oneshot::Sender<()> },
}

/// What the driver must do with the connection.
#[derive(Debug)]
pub(crate) enum Action {
    /// End this connection; then reconnect, or close the client for good.
    Drop { code: Option<u16>, reason: String, reconnect: bool },
    /// The application closed the client.
    Shutdown { done: Option<oneshot::Sender<()>> },
}

/// Settings the state machine needs.
#[derive(Debug, Clone)]
pub(crate) struct MachineConfig {
    pub encoding: Encoding,
    pub token: Option<String>,
    pub name: Option<String>,
    /// How long to wait for `connected` after the socket opened.
    pub handshake_timeout: Duration,
    /// Silence allowed past the node's `ping_ms` before the connection counts as dead.
    pub liveness_grace: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Conn {
    Down,
    Handshaking { since: Instant },
    Up { ping_ms: u64 },
}

enum Pending {
    Connect,
    Call {
        reply: ReplyTx<Reply>,
        /// A `skip_self` publish into a subscribed room: (room, subscription key).
        skip_self: Option<(String, u64)>,
    },
    Subscribe {
        room: String,
        key: u64,
    },
    Unsubscribe {
        reply: Option<ReplyTx<()>>,
    },
}

struct Queued {
    command: Command,
    reply: ReplyTx<Reply>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum SubState {
    /// Not subscribed on the current connection (or no connection); subscribe when up and
    /// `retry_at` (if any) has passed.
    Idle {
        retry_at: Option<Instant>,
    },
    /// `subscribe` sent with this id; pushes for the room are ignored until its reply.
    Subscribing(u32),
    Active,
}

struct Sub {
    key: u64,
    room: Room,
    presence: bool,
    token: Option<String>,
    /// Events to the application's [`crate::Subscription`]. Bounded; written with
    /// `try_send` only. Closed by the application dropping its handle; dropped here when
    /// the subscription ends, which ends the application's stream.
    events: mpsc::Sender<SubscriptionEvent>,
    state: SubState,
    /// The last `subscribed` said the room keeps history (assumed until the first one).
    recoverable: bool,
    tracker: Tracker,
    /// The channel was full: events are being dropped; resubscribe with `recover` once
    /// the application has drained half of it.
    lagged: bool,
    /// The `subscribe` call waiting for the first `subscribed`; taken then.
    waiter: Option<ReplyTx<u64>>,
}

impl Sub {
    fn on_server(&self) -> bool {
        matches!(self.state, SubState::Subscribing(_) | SubState::Active)
    }
}

/// The whole client state that outlives connections.
pub(crate) struct Machine {
    cfg: MachineConfig,
    conn: Conn,
    /// When the node last sent anything on this connection.
    last_rx: Instant,
    next_id: u32,
    next_key: u64,
    pending: HashMap<u32, Pending>,
    /// Calls made while no connection is up, sent once `connected` arrives.
    queued: VecDeque<Queued>,
    subs: BTreeMap<String, Sub>,
    outbox: Vec<Bytes>,
    action: Option<Action>,
    /// Connection events to the application. The driver owns the only sender: receivers
    /// see the channel closed when the driver ends.
    events: broadcast::Sender<ConnectionEvent>,
    /// Answers `ClientBuilder::connect`: taken at the first `connected`, or at the first
    /// failure (the initial connection is not retried past its attempts).
    ready: Option<ReplyTx<()>>,
    /// An `error` reply to `connect` on the current connection.
    connect_error: Option<ClientError>,
    /// Why the client ended, shared with the handles so calls after the end can say so.
    closed: Arc<OnceLock<(u16, String)>>,
}

impl Machine {
    pub(crate) fn new(
        cfg: MachineConfig,
        events: broadcast::Sender<ConnectionEvent>,
        ready: ReplyTx<()>,
        closed: Arc<OnceLock<(u16, String)>>,
        now: Instant,
    ) -> Self {
        Machine {
            cfg,
            conn: Conn::Down,
            last_rx: now,
            next_id: 1,
            next_key: 1,
            pending: HashMap::new(),
            queued: VecDeque::new(),
            subs: BTreeMap::new(),
            outbox: Vec::new(),
            action: None,
            events,
            ready: Some(ready),
            connect_error: None,
            closed,
        }
    }

    pub(crate) fn encoding(&self) -> Encoding {
        self.cfg.encoding
    }

    /// Still waiting for the first `connected`.
    pub(crate) fn is_initial(&self) -> bool {
        self.ready.is_some()
    }

    /// Messages to send, in order.
    pub(crate) fn take_outbox(&mut self) -> Vec<Bytes> {
        std::mem::take(&mut self.outbox)
    }

    /// Every handle is gone: close the client.
    pub(crate) fn request_shutdown(&mut self) {
        self.action = Some(Action::Shutdown { done: None });
    }

    pub(crate) fn take_action(&mut self) -> Option<Action> {
        self.action.take()
    }

    /// Whether a close code (from a close frame, without a `disconnect` push) means
    /// reconnect: the close table says so, and unknown codes and lost transports do.
    pub(crate) fn close_reconnects(code: Option<u16>) -> bool {
        code.and_then(CloseCode::from_number).is_none_or(|c| c.reconnect())
    }

    // ------------------------------------------------------------------ inputs

    /// A socket to a node is open: send `connect`.
    pub(crate) fn on_open(&mut self, now: Instant) {
        self.conn = Conn::Handshaking { since: now };
        self.last_rx = now;
        self.connect_error = None;
        let command = Command::Connect {
            token: self.cfg.token.clone(),
            name: self.cfg.name.clone(),
            version: Some(env!("CARGO_PKG_VERSION").to_string()),
            data: None,
        };
        if let Err((e, _)) = self.send(command, Pending::Connect) {
            tracing::error!(error = %e, "cannot encode connect");
        }
    }

    /// A data frame from the node.
    pub(crate) fn on_frame(&mut self, now: Instant, binary: bool, frame: &[u8]) {
        self.last_rx = now;
        match codec::decode(self.cfg.encoding, binary, frame) {
            Ok(msgs) => {
                for m in msgs {
                    self.on_message(now, m);
                    if self.action.is_some() {
                        break;
                    }
                }
            }
            Err(v) => {
                tracing::warn!(error = %v, "undecodable frame from the node; reconnecting");
                self.action = Some(Action::Drop { code: None, reason: v.to_string(), reconnect: true });
            }
        }
    }

    /// Anything else from the node (a WebSocket ping or pong): it is alive.
    pub(crate) fn touch(&mut self, now: Instant) {
        self.last_rx = now;
    }

    /// One message from the node.
    pub(crate) fn on_message(&mut self, now: Instant, msg: ServerMessage) {
        match msg {
            ServerMessage::Reply { id: Some(id), reply } => self.on_reply(now, id, Ok(reply)),
            ServerMessage::Error { id: Some(id), code, message, temporary } => {
                self.on_reply(now, id, Err(ClientError::Server { code, message, temporary }))
            }
            ServerMessage::Error { id: None, code, message, .. } => {
                tracing::warn!(code, %message, "error from the node without an id");
            }
            ServerMessage::Reply { id: None, .. } => tracing::warn!("reply from the node without an id"),
            ServerMessage::Push(p) => self.on_push(p),
        }
    }

    /// A request from a handle.
    pub(crate) fn on_op(&mut self, op: Op) {
        match op {
            Op::Call { command, reply } => {
                if let Command::Refresh { token } = &command {
                    // Later reconnects use the new token too.
                    self.cfg.token = Some(token.clone());
                }
                if matches!(self.conn, Conn::Up { .. }) {
                    self.send_call(command, reply);
                } else if self.queued.len() >= MAX_QUEUED {
                    let _ = reply.send(Err(ClientError::Disconnected));
                } else {
                    self.queued.push_back(Queued { command, reply });
                }
            }
            Op::Subscribe { room, opts, events, reply } => {
                if self.subs.get(room.as_str()).is_some_and(|s| s.events.is_closed()) {
                    // A dropped subscription not swept yet.
                    self.remove_sub(room.as_str());
                }
                if self.subs.contains_key(room.as_str()) {
                    let code = roomcast_protocol::ErrorCode::AlreadySubscribed;
                    let _ = reply.send(Err(ClientError::Server {
                        code: code.number(),
                        message: code.message().to_string(),
                        temporary: false,
                    }));
                    return;
                }
                let key = self.next_key;
                self.next_key += 1;
                let name = room.as_str().to_string();
                self.subs.insert(
                    name.clone(),
                    Sub {
                        key,
                        room,
                        presence: opts.presence,
                        token: opts.token,
                        events,
                        state: SubState::Idle { retry_at: None },
                        recoverable: true,
                        tracker: Tracker::new(opts.recover),
                        lagged: false,
                        waiter: Some(reply),
                    },
                );
                if matches!(self.conn, Conn::Up { .. }) {
                    self.send_subscribe(&name);
                }
            }
            Op::Unsubscribe { room, key, reply } => {
                let name = room.as_str();
                let ours = self.subs.get(name).is_some_and(|s| key.is_none_or(|k| s.key == k));
                let removed = if ours { self.subs.remove(name) } else { None };
                match removed {
                    Some(sub) if sub.on_server() && matches!(self.conn, Conn::Up { .. }) => {
                        let command = Command::Unsubscribe { room: sub.room.clone() };
                        if let Err((e, Pending::Unsubscribe { reply: Some(r) })) =
                            self.send(command, Pending::Unsubscribe { reply })
                        {
                            let _ = r.send(Err(e));
                        }
                    }
                    _ => {
                        if let Some(r) = reply {
                            let _ = r.send(Ok(()));
                        }
                    }
                }
            }
            Op::Close { done } => self.action = Some(Action::Shutdown { done: Some(done) }),
        }
    }

    /// Periodic housekeeping: handshake and liveness deadlines, callers that gave up,
    /// subscriptions to (re)make.
    pub(crate) fn on_tick(&mut self, now: Instant) {
        match self.conn {
            Conn::Handshaking { since } if now.duration_since(since) > self.cfg.handshake_timeout => {
                self.drop_connection(format!("no connected reply within {:?}", self.cfg.handshake_timeout));
            }
            Conn::Up { ping_ms } if ping_ms > 0 => {
                let limit = Duration::from_millis(ping_ms) + self.cfg.liveness_grace;
                if now.duration_since(self.last_rx) > limit {
                    self.drop_connection(format!("no message from the node for {limit:?}"));
                }
            }
            _ => {}
        }

        self.queued.retain(|q| !q.reply.is_closed());
        let abandoned: Vec<u32> = self
            .pending
            .iter()
            .filter(|(_, p)| matches!(p, Pending::Call { reply, .. } if reply.is_closed()))
            .map(|(id, _)| *id)
            .collect();
        for id in abandoned {
            if let Some(Pending::Call { skip_self: Some((room, key)), .. }) = self.pending.remove(&id) {
                self.self_publish_done(&room, key, None);
            }
        }

        // Subscriptions whose application side is gone (handle dropped, or the
        // `subscribe` call gave up waiting).
        let gone: Vec<String> =
            self.subs.iter().filter(|(_, s)| s.events.is_closed()).map(|(r, _)| r.clone()).collect();
        for room in gone {
            self.remove_sub(&room);
        }

        if !matches!(self.conn, Conn::Up { .. }) {
            return;
        }
        let mut subscribe = Vec::new();
        let mut resync = Vec::new();
        for (room, s) in &self.subs {
            match s.state {
                SubState::Idle { retry_at } if retry_at.is_none_or(|t| t <= now) => {
                    subscribe.push(room.clone())
                }
                SubState::Active if s.lagged && s.events.capacity() * 2 >= s.events.max_capacity() => {
                    resync.push(room.clone())
                }
                _ => {}
            }
        }
        for room in subscribe {
            self.send_subscribe(&room);
        }
        for room in resync {
            self.resync(&room);
        }
    }

    /// The connection is gone. Calls in flight fail with `Disconnected` (nothing is
    /// resent: the caller decides); subscriptions will be re-made. Returns whether to
    /// reconnect; if not, everything was answered with `Closed`.
    pub(crate) fn on_disconnect(&mut self, code: Option<u16>, reason: String, reconnect: bool) -> bool {
        let was_up = matches!(self.conn, Conn::Up { .. });
        self.conn = Conn::Down;
        self.outbox.clear();
        if was_up {
            let _ = self.events.send(ConnectionEvent::Disconnected { code, reason: reason.clone() });
        }
        let final_code = code.unwrap_or(ABNORMAL_CLOSE_CODE);
        if let Some(ready) = self.ready.take() {
            // The first connection never came up: `connect` fails, nothing is retried.
            let err = self
                .connect_error
                .take()
                .unwrap_or_else(|| ClientError::Closed { code: final_code, reason: reason.clone() });
            let _ = ready.send(Err(err));
            self.close_all(final_code, reason);
            return false;
        }
        if !reconnect {
            self.close_all(final_code, reason);
            return false;
        }
        for (_, p) in std::mem::take(&mut self.pending) {
            match p {
                Pending::Call { reply, skip_self } => {
                    if let Some((room, key)) = skip_self {
                        self.self_publish_done(&room, key, None);
                    }
                    let _ = reply.send(Err(ClientError::Disconnected));
                }
                // The subscription is gone from the node with the connection.
                Pending::Unsubscribe { reply: Some(r) } => {
                    let _ = r.send(Ok(()));
                }
                Pending::Unsubscribe { reply: None } | Pending::Connect | Pending::Subscribe { .. } => {}
            }
        }
        for s in self.subs.values_mut() {
            s.state = SubState::Idle { retry_at: None };
            s.tracker.drop_held();
        }
        true
    }

    /// The first connection could not even be opened: `connect` fails with `err`.
    pub(crate) fn fail_initial(&mut self, err: ClientError) {
        if let Some(ready) = self.ready.take() {
            let _ = ready.send(Err(err.clone()));
        }
        let reason = err.to_string();
        self.close_all(ABNORMAL_CLOSE_CODE, reason);
    }

    /// The client ends: every waiting caller gets `Closed`, every subscription an
    /// `Unsubscribed` with the same code, and later calls find the reason in `closed`.
    pub(crate) fn close_all(&mut self, code: u16, reason: String) {
        let _ = self.closed.set((code, reason.clone()));
        let err = ClientError::Closed { code, reason: reason.clone() };
        self.conn = Conn::Down;
        self.outbox.clear();
        if let Some(ready) = self.ready.take() {
            let _ = ready.send(Err(err.clone()));
        }
        for (_, p) in std::mem::take(&mut self.pending) {
            match p {
                Pending::Call { reply, .. } => {
                    let _ = reply.send(Err(err.clone()));
                }
                Pending::Unsubscribe { reply: Some(r) } => {
                    let _ = r.send(Ok(()));
                }
                _ => {}
            }
        }
        for q in std::mem::take(&mut self.queued) {
            let _ = q.reply.send(Err(err.clone()));
        }
        for (_, mut s) in std::mem::take(&mut self.subs) {
            match s.waiter.take() {
                Some(w) => {
                    let _ = w.send(Err(err.clone()));
                }
                None => {
                    let _ =
                        s.events.try_send(SubscriptionEvent::Unsubscribed { code, reason: reason.clone() });
                }
            }
        }
    }

    // ------------------------------------------------------------------ replies

    fn on_reply(&mut self, now: Instant, id: u32, res: Result<Reply, ClientError>) {
        let Some(p) = self.pending.remove(&id) else {
            tracing::debug!(id, "reply to no pending request (timed out?)");
            return;
        };
        match p {
            Pending::Connect => match res {
                Ok(Reply::Connected { client, node, ping_ms, .. }) => {
                    self.on_connected(client, node, ping_ms)
                }
                Ok(other) => self.drop_connection(format!("unexpected reply to connect: {other:?}")),
                Err(e) => self.on_connect_error(e),
            },
            Pending::Call { reply, skip_self } => {
                if let Some((room, key)) = skip_self {
                    let pos = match &res {
                        Ok(Reply::Published { position, .. }) => position.clone(),
                        _ => None,
                    };
                    self.self_publish_done(&room, key, pos);
                }
                let _ = reply.send(res);
            }
            Pending::Subscribe { room, key } => self.on_subscribe_reply(now, id, &room, key, res),
            Pending::Unsubscribe { reply } => {
                if let Some(r) = reply {
                    let _ = r.send(res.map(|_| ()));
                }
            }
        }
    }

    fn on_connected(&mut self, client: String, node: String, ping_ms: u64) {
        self.conn = Conn::Up { ping_ms };
        tracing::debug!(%client, %node, ping_ms, "connected");
        let _ = self.events.send(ConnectionEvent::Connected { client_id: client, node });
        if let Some(ready) = self.ready.take() {
            let _ = ready.send(Ok(()));
        }
        let rooms: Vec<String> = self
            .subs
            .iter()
            .filter(|(_, s)| matches!(s.state, SubState::Idle { .. }))
            .map(|(r, _)| r.clone())
            .collect();
        for room in rooms {
            self.send_subscribe(&room);
        }
        while let Some(q) = self.queued.pop_front() {
            if !q.reply.is_closed() {
                self.send_call(q.command, q.reply);
            }
        }
    }

    fn on_connect_error(&mut self, e: ClientError) {
        let temporary = matches!(e, ClientError::Server { temporary: true, .. });
        let reason = format!("connect refused: {e}");
        if self.ready.is_some() {
            // The first connection: report this error from `connect`.
            self.connect_error = Some(e);
            self.action = Some(Action::Drop { code: None, reason, reconnect: false });
        } else if temporary {
            self.drop_connection(reason);
        } else {
            // The node closes with a code saying whether to come back (spec 2.1); the
            // handshake timeout covers a node that does not.
            tracing::warn!(%reason, "waiting for the node's disconnect");
        }
    }

    fn on_subscribe_reply(
        &mut self,
        now: Instant,
        id: u32,
        room: &str,
        key: u64,
        res: Result<Reply, ClientError>,
    ) {
        let Some(sub) = self.subs.get_mut(room) else {
            return;
        };
        if sub.key != key || sub.state != SubState::Subscribing(id) {
            return;
        }
        match res {
            Ok(Reply::Subscribed { recoverable, position, recovered, publications, members, .. }) => {
                sub.state = SubState::Active;
                sub.lagged = false;
                sub.recoverable = recoverable;
                let pubs = publications.unwrap_or_default();
                let step = if recovered == Some(true) {
                    sub.tracker.on_recovered(pubs, position.clone())
                } else {
                    if !pubs.is_empty() {
                        tracing::warn!(
                            room,
                            "publications in a subscribed reply that did not recover; ignored"
                        );
                    }
                    sub.tracker.reset(position.clone());
                    Step::default()
                };
                let ev = SubscriptionEvent::Subscribed { recovered, position, members };
                let mut gone = deliver(sub, ev);
                if !gone {
                    gone = deliver_step(sub, step.deliver);
                }
                if let Some(w) = sub.waiter.take() {
                    let _ = w.send(Ok(key));
                }
                if gone {
                    self.remove_sub(room);
                } else if step.resync {
                    self.resync(room);
                }
            }
            Ok(other) => {
                tracing::warn!(room, reply = ?other, "unexpected reply to subscribe; retrying");
                sub.state = SubState::Idle { retry_at: Some(now + RESUBSCRIBE_RETRY) };
            }
            Err(e) => {
                if let Some(w) = sub.waiter.take() {
                    let _ = w.send(Err(e));
                    self.subs.remove(room);
                    return;
                }
                match e {
                    ClientError::Server { temporary: true, .. } => {
                        sub.state = SubState::Idle { retry_at: Some(now + RESUBSCRIBE_RETRY) };
                    }
                    e => {
                        let (code, reason) = match e {
                            ClientError::Server { code, message, .. } => (code, message),
                            e => (0, e.to_string()),
                        };
                        tracing::warn!(room, code, %reason, "resubscribe refused; subscription ended");
                        let _ = sub.events.try_send(SubscriptionEvent::Unsubscribed { code, reason });
                        self.subs.remove(room);
                    }
                }
            }
        }
    }

    // ------------------------------------------------------------------ pushes

    fn on_push(&mut self, push: Push) {
        match push {
            Push::Publication(p) => {
                let room = p.room.clone();
                let Some(sub) = self.subs.get_mut(&room) else {
                    return;
                };
                if sub.state != SubState::Active || sub.lagged {
                    // Before `subscribed` these belong to a subscription being replaced;
                    // while lagged, recovery will bring them.
                    return;
                }
                let step = sub.tracker.on_publication(p);
                let gone = deliver_step(sub, step.deliver);
                let lagged = sub.lagged;
                if gone {
                    self.remove_sub(&room);
                } else if step.resync && !lagged {
                    self.resync(&room);
                }
            }
            Push::Join { room, member } => self.presence_event(&room, SubscriptionEvent::Join(member)),
            Push::Leave { room, member } => self.presence_event(&room, SubscriptionEvent::Leave(member)),
            Push::Unsubscribe { room, code, reason } => {
                if let Some(mut sub) = self.subs.remove(&room) {
                    match sub.waiter.take() {
                        Some(w) => {
                            let _ =
                                w.send(Err(ClientError::Server { code, message: reason, temporary: false }));
                        }
                        None => {
                            let _ = sub.events.try_send(SubscriptionEvent::Unsubscribed { code, reason });
                        }
                    }
                }
            }
            Push::Message { data } => {
                let _ = self.events.send(ConnectionEvent::Message(data));
            }
            Push::Ping => {
                if let Err((e, _)) = self.send_no_reply(Command::Pong) {
                    tracing::error!(error = %e, "cannot encode pong");
                }
            }
            Push::Disconnect { code, reason, reconnect } => {
                tracing::debug!(code, %reason, reconnect, "disconnect from the node");
                self.action = Some(Action::Drop { code: Some(code), reason, reconnect });
            }
        }
    }

    fn presence_event(&mut self, room: &str, ev: SubscriptionEvent) {
        let Some(sub) = self.subs.get_mut(room) else {
            return;
        };
        if sub.state != SubState::Active || sub.lagged {
            return;
        }
        if deliver(sub, ev) {
            self.remove_sub(room);
        }
    }

    // ------------------------------------------------------------------ helpers

    fn drop_connection(&mut self, reason: String) {
        tracing::info!(%reason, "dropping the connection");
        self.action = Some(Action::Drop { code: None, reason, reconnect: true });
    }

    /// The next request id: 1..=u32::MAX, wrapping, never 0, never one still in flight.
    fn alloc_id(&mut self) -> u32 {
        loop {
            let id = self.next_id;
            self.next_id = self.next_id.wrapping_add(1).max(1);
            if id != 0 && !self.pending.contains_key(&id) {
                return id;
            }
        }
    }

    /// Encodes a command with a fresh id and remembers who waits for its reply.
    fn send(&mut self, command: Command, pending: Pending) -> Result<u32, (ClientError, Pending)> {
        let id = self.alloc_id();
        match codec::encode(self.cfg.encoding, &Request { id: Some(id), command }) {
            Ok(b) => {
                self.outbox.push(b);
                self.pending.insert(id, pending);
                Ok(id)
            }
            Err(e) => Err((ClientError::Data(e.0), pending)),
        }
    }

    fn send_no_reply(&mut self, command: Command) -> Result<(), (ClientError, ())> {
        match codec::encode(self.cfg.encoding, &Request { id: None, command }) {
            Ok(b) => {
                self.outbox.push(b);
                Ok(())
            }
            Err(e) => Err((ClientError::Data(e.0), ())),
        }
    }

    fn send_call(&mut self, command: Command, reply: ReplyTx<Reply>) {
        let skip_self = match &command {
            Command::Publish { room, skip_self: true, .. } => self.subs.get_mut(room.as_str()).map(|s| {
                s.tracker.self_publish_started();
                (room.as_str().to_string(), s.key)
            }),
            _ => None,
        };
        if let Err((e, Pending::Call { reply, skip_self })) =
            self.send(command, Pending::Call { reply, skip_self })
        {
            if let Some((room, key)) = skip_self {
                self.self_publish_done(&room, key, None);
            }
            let _ = reply.send(Err(e));
        }
    }

    fn send_subscribe(&mut self, room: &str) {
        let Some(sub) = self.subs.get(room) else {
            return;
        };
        let recover = if sub.recoverable { sub.tracker.position().cloned() } else { None };
        let command = Command::Subscribe {
            room: sub.room.clone(),
            token: sub.token.clone(),
            recover,
            presence: sub.presence,
        };
        let key = sub.key;
        match self.send(command, Pending::Subscribe { room: room.to_string(), key }) {
            Ok(id) => {
                if let Some(sub) = self.subs.get_mut(room) {
                    sub.state = SubState::Subscribing(id);
                }
            }
            Err((e, _)) => tracing::error!(error = %e, "cannot encode subscribe"),
        }
    }

    /// Re-makes an active subscription with `recover` from the last delivered position:
    /// `unsubscribe` then `subscribe`, back to back; pushes in between are ignored.
    fn resync(&mut self, room: &str) {
        let Some(sub) = self.subs.get_mut(room) else {
            return;
        };
        if sub.state != SubState::Active || !matches!(self.conn, Conn::Up { .. }) {
            return;
        }
        tracing::debug!(room, last = ?sub.tracker.position(), "resubscribing to recover");
        sub.tracker.drop_held();
        let command = Command::Unsubscribe { room: sub.room.clone() };
        if let Err((e, _)) = self.send(command, Pending::Unsubscribe { reply: None }) {
            tracing::error!(error = %e, "cannot encode unsubscribe");
            return;
        }
        self.send_subscribe(room);
    }

    /// Forgets a subscription whose application side is gone, telling the node.
    fn remove_sub(&mut self, room: &str) {
        let Some(sub) = self.subs.remove(room) else {
            return;
        };
        if sub.on_server() && matches!(self.conn, Conn::Up { .. }) {
            let command = Command::Unsubscribe { room: sub.room };
            if let Err((e, _)) = self.send(command, Pending::Unsubscribe { reply: None }) {
                tracing::error!(error = %e, "cannot encode unsubscribe");
            }
        }
    }

    fn self_publish_done(&mut self, room: &str, key: u64, published: Option<Position>) {
        let Some(sub) = self.subs.get_mut(room) else {
            return;
        };
        if sub.key != key {
            return;
        }
        let step = sub.tracker.self_publish_done(published);
        if sub.state != SubState::Active || sub.lagged {
            return;
        }
        let gone = deliver_step(sub, step.deliver);
        let lagged = sub.lagged;
        if gone {
            self.remove_sub(room);
        } else if step.resync && !lagged {
            self.resync(room);
        }
    }
}

/// Hands one event to the application without waiting. A full channel marks the
/// subscription lagged; returns whether the application side is gone.
fn deliver(sub: &mut Sub, ev: SubscriptionEvent) -> bool {
    match sub.events.try_send(ev) {
        Ok(()) => false,
        Err(TrySendError::Full(_)) => {
            sub.lagged = true;
            false
        }
        Err(TrySendError::Closed(_)) => true,
    }
}

/// Hands publications over in order until the channel is full (the rest are dropped and
/// the tracker rewound to the last one handed over). Returns whether the application side
/// is gone.
fn deliver_step(sub: &mut Sub, pubs: Vec<roomcast_protocol::Publication>) -> bool {
    for p in pubs {
        let offset = p.offset;
        match sub.events.try_send(SubscriptionEvent::Publication(p)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                sub.lagged = true;
                if let Some(o) = offset {
                    sub.tracker.undelivered(o);
                }
                tracing::debug!(room = sub.room.as_str(), "subscription channel full; will recover");
                return false;
            }
            Err(TrySendError::Closed(_)) => return true,
        }
    }
    false
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use roomcast_protocol::{Data, Publication, decode_requests};

    const ENC: Encoding = Encoding::Json;

    struct Harness {
        m: Machine,
        now: Instant,
        ready: oneshot::Receiver<Result<(), ClientError>>,
        events: broadcast::Receiver<ConnectionEvent>,
    }

    fn harness() -> Harness {
        let (etx, erx) = broadcast::channel(16);
        let (rtx, rrx) = oneshot::channel();
        let now = Instant::now();
        let cfg = MachineConfig {
            encoding: ENC,
            token: Some("tok".into()),
            name: None,
            handshake_timeout: Duration::from_secs(5),
            liveness_grace: Duration::from_secs(1),
        };
        Harness {
            m: Machine::new(cfg, etx, rtx, Arc::new(OnceLock::new()), now),
            now,
            ready: rrx,
            events: erx,
        }
    }

    impl Harness {
        /// The requests sent since the last call.
        fn sent(&mut self) -> Vec<Request> {
            self.m.take_outbox().iter().map(|b| decode_requests(ENC, b).remove(0).unwrap().unwrap()).collect()
        }
        fn reply(&mut self, id: u32, reply: Reply) {
            self.m.on_message(self.now, ServerMessage::Reply { id: Some(id), reply });
        }
        fn push(&mut self, p: Push) {
            self.m.on_message(self.now, ServerMessage::Push(p));
        }
        fn connect(&mut self) {
            self.m.on_open(self.now);
            let sent = self.sent();
            assert_eq!(sent.len(), 1);
            assert!(matches!(&sent[0].command, Command::Connect { token: Some(t), .. } if t == "tok"));
            self.reply(
                sent[0].id.unwrap(),
                Reply::Connected { client: "c1".into(), node: "n1".into(), ping_ms: 1000, expires_in: None },
            );
        }
        fn subscribe(
            &mut self,
            room: &str,
            cap: usize,
        ) -> (mpsc::Receiver<SubscriptionEvent>, oneshot::Receiver<Result<u64, ClientError>>) {
            let (tx, rx) = mpsc::channel(cap);
            let (rtx, rrx) = oneshot::channel();
            self.m.on_op(Op::Subscribe {
                room: Room::parse(room).unwrap(),
                opts: SubscribeOptions::default(),
                events: tx,
                reply: rtx,
            });
            (rx, rrx)
        }
    }

    fn publication(offset: u64) -> Publication {
        Publication {
            room: "chat".into(),
            offset: Some(offset),
            data: Data::from_json(format!("{{\"n\":{offset}}}")).unwrap(),
            info: None,
        }
    }

    fn subscribed(offset: u64, recovered: Option<bool>, pubs: Vec<u64>) -> Reply {
        Reply::Subscribed {
            room: "chat".into(),
            recoverable: true,
            position: Some(Position { offset, epoch: "e".into() }),
            recovered,
            publications: (!pubs.is_empty()).then(|| pubs.into_iter().map(publication).collect()),
            members: None,
        }
    }

    fn drain_offsets(rx: &mut mpsc::Receiver<SubscriptionEvent>) -> Vec<u64> {
        let mut out = Vec::new();
        while let Ok(ev) = rx.try_recv() {
            if let SubscriptionEvent::Publication(p) = ev {
                out.push(p.offset.unwrap());
            }
        }
        out
    }

    #[test]
    fn ids_start_at_one_wrap_and_skip_zero_and_in_flight() {
        let mut h = harness();
        assert_eq!(h.m.alloc_id(), 1);
        assert_eq!(h.m.alloc_id(), 2);
        h.m.next_id = u32::MAX;
        h.m.pending.insert(1, Pending::Connect);
        assert_eq!(h.m.alloc_id(), u32::MAX);
        assert_eq!(h.m.alloc_id(), 2);
    }

    #[test]
    fn calls_wait_for_connected_then_go_in_order() {
        let mut h = harness();
        let (tx, mut rx) = oneshot::channel();
        h.m.on_op(Op::Call {
            command: Command::PresenceStats { room: Room::parse("a").unwrap() },
            reply: tx,
        });
        assert!(h.sent().is_empty());
        h.connect();
        assert_eq!(h.ready.try_recv().unwrap(), Ok(()));
        assert!(matches!(h.events.try_recv().unwrap(), ConnectionEvent::Connected { .. }));
        let sent = h.sent();
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].command.type_name(), "presence_stats");
        h.m.on_message(
            h.now,
            ServerMessage::Error {
                id: sent[0].id,
                code: 108,
                message: "not available".into(),
                temporary: false,
            },
        );
        assert_eq!(rx.try_recv().unwrap().unwrap_err().server_code(), Some(108));
    }

    #[test]
    fn gap_resubscribes_with_recover_and_fills_in_order() {
        let mut h = harness();
        h.connect();
        let (mut rx, mut ready) = h.subscribe("chat", 64);
        let sub = h.sent();
        h.reply(sub[0].id.unwrap(), subscribed(10, None, vec![]));
        assert!(ready.try_recv().unwrap().is_ok());
        h.push(Push::Publication(publication(11)));
        h.push(Push::Publication(publication(13)));
        let sent = h.sent();
        assert_eq!(sent.len(), 2, "{sent:?}");
        assert_eq!(sent[0].command.type_name(), "unsubscribe");
        match &sent[1].command {
            Command::Subscribe { recover: Some(p), .. } => assert_eq!(p.offset, 11),
            other => panic!("{other:?}"),
        }
        // Pushes before the new `subscribed` are ignored; the reply fills the gap.
        h.push(Push::Publication(publication(14)));
        h.reply(sent[0].id.unwrap(), Reply::Unsubscribed { room: "chat".into() });
        h.reply(sent[1].id.unwrap(), subscribed(14, Some(true), vec![12, 13, 14]));
        h.push(Push::Publication(publication(14)));
        h.push(Push::Publication(publication(15)));
        let mut events = Vec::new();
        while let Ok(ev) = rx.try_recv() {
            events.push(ev);
        }
        let offsets: Vec<u64> = events
            .iter()
            .filter_map(|e| match e {
                SubscriptionEvent::Publication(p) => p.offset,
                _ => None,
            })
            .collect();
        assert_eq!(offsets, [11, 12, 13, 14, 15]);
        assert!(matches!(events[0], SubscriptionEvent::Subscribed { recovered: None, .. }));
        assert!(matches!(events[2], SubscriptionEvent::Subscribed { recovered: Some(true), .. }));
    }

    #[test]
    fn full_channel_drops_then_recovers_from_last_delivered() {
        let mut h = harness();
        h.connect();
        let (mut rx, _ready) = h.subscribe("chat", 4);
        let sub = h.sent();
        h.reply(sub[0].id.unwrap(), subscribed(0, None, vec![]));
        for o in 1..=10 {
            h.push(Push::Publication(publication(o)));
        }
        // Subscribed + 3 publications fit.
        assert!(h.sent().is_empty());
        h.m.on_tick(h.now);
        assert!(h.sent().is_empty(), "no resync while the channel is still full");
        let mut got = drain_offsets(&mut rx);
        assert_eq!(got, [1, 2, 3]);
        h.m.on_tick(h.now);
        let sent = h.sent();
        match &sent[1].command {
            Command::Subscribe { recover: Some(p), .. } => assert_eq!(p.offset, 3),
            other => panic!("{other:?}"),
        }
        h.reply(sent[1].id.unwrap(), subscribed(10, Some(true), vec![4, 5, 6]));
        got.extend(drain_offsets(&mut rx));
        assert_eq!(got, [1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn in_flight_calls_fail_on_disconnect_and_subscriptions_come_back() {
        let mut h = harness();
        h.connect();
        let (_rx, _ready) = h.subscribe("chat", 8);
        let sub = h.sent();
        h.reply(sub[0].id.unwrap(), subscribed(5, None, vec![]));
        let (tx, mut call) = oneshot::channel();
        h.m.on_op(Op::Call {
            command: Command::Publish {
                room: Room::parse("chat").unwrap(),
                data: Data::from_json("1").unwrap(),
                skip_self: false,
            },
            reply: tx,
        });
        assert_eq!(h.sent().len(), 1);
        assert!(h.m.on_disconnect(Some(4000), "shutdown".into(), true));
        assert_eq!(call.try_recv().unwrap(), Err(ClientError::Disconnected));
        let _ = h.events.try_recv();
        assert!(matches!(
            h.events.try_recv().unwrap(),
            ConnectionEvent::Disconnected { code: Some(4000), .. }
        ));
        h.connect();
        let sent = h.sent();
        assert_eq!(sent.len(), 1, "the publish is not resent: {sent:?}");
        assert!(matches!(&sent[0].command, Command::Subscribe { recover: Some(p), .. } if p.offset == 5));
    }

    #[test]
    fn liveness_and_handshake_deadlines() {
        let mut h = harness();
        h.m.on_open(h.now);
        h.m.on_tick(h.now + Duration::from_secs(4));
        assert!(h.m.take_action().is_none());
        h.m.on_tick(h.now + Duration::from_secs(6));
        assert!(matches!(h.m.take_action(), Some(Action::Drop { reconnect: true, .. })));
        let mut h = harness();
        h.connect();
        // ping_ms 1000 + grace 1 s
        h.m.on_tick(h.now + Duration::from_millis(1900));
        assert!(h.m.take_action().is_none());
        h.m.on_tick(h.now + Duration::from_millis(2100));
        assert!(matches!(h.m.take_action(), Some(Action::Drop { code: None, .. })));
    }

    #[test]
    fn ping_gets_pong_and_disconnect_push_decides() {
        let mut h = harness();
        h.connect();
        h.push(Push::Ping);
        let sent = h.sent();
        assert_eq!(sent, vec![Request { id: None, command: Command::Pong }]);
        h.push(Push::Disconnect { code: 4009, reason: "bye".into(), reconnect: true });
        assert!(matches!(h.m.take_action(), Some(Action::Drop { code: Some(4009), reconnect: true, .. })));
        assert!(!Machine::close_reconnects(Some(4001)));
        assert!(Machine::close_reconnects(Some(4003)));
        assert!(Machine::close_reconnects(None));
        assert!(Machine::close_reconnects(Some(1001)));
    }
}
