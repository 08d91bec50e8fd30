//! A session: one connection's protocol state and the behaviour of every command
//! (spec section 2). It sees decoded messages in and queues encoded messages out; it knows
//! nothing of sockets or frames.

use std::collections::HashMap;
use std::sync::Arc;

use roomcast_broker::{BrokerPublication, HistoryQuery, RoomEvent};
use roomcast_protocol::{
    CloseCode, Command, Data, Encode, ErrorCode, Member, Position, Publication, PublisherInfo, Reply,
    Request, Room, ServerMessage, decode_requests,
};

use crate::config::{NamespaceConfig, PublishRule, SubscribeRule};
use crate::hub::{Hub, SessionHandle};
use crate::node::{Node, random_id};
use crate::outbound::{Encoded, Outbound};

/// What the connection does after a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// Send `disconnect` and close with this code.
    Close(CloseCode),
}

/// A failed command: its code and message.
#[derive(Debug)]
struct Failure(ErrorCode, String);

impl Failure {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Failure(code, message.into())
    }
}

type CmdResult = Result<Option<Reply>, Failure>;

/// One subscription of this session.
#[derive(Debug)]
struct Subscription {
    ns: Arc<NamespaceConfig>,
    /// The subscription token's `info`, shown as `room_info` in presence.
    room_info: Option<Data>,
}

/// A connection's protocol state.
pub struct Session {
    node: Arc<Node>,
    /// Shared with the hub, which queues publications to it.
    handle: Arc<SessionHandle>,
    connected: bool,
    /// The connection token's `info` claim.
    info: Option<Data>,
    subs: HashMap<Room, Subscription>,
    /// A `pong` arrived since the connection last looked.
    pong_seen: bool,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("client", &self.handle.client)
            .field("connected", &self.connected)
            .finish()
    }
}

impl Session {
    /// A session for a new connection.
    pub fn new(node: Arc<Node>, encoding: roomcast_protocol::Encoding) -> Self {
        let handle = Arc::new(SessionHandle {
            client: random_id().into(),
            user: "".into(),
            encoding,
            outbound: Outbound::new(node.config.max_queue_bytes),
        });
        node.hub.session_opened();
        Session { node, handle, connected: false, info: None, subs: HashMap::new(), pong_seen: false }
    }

    /// The client id.
    pub fn client(&self) -> &str {
        &self.handle.client
    }

    /// The outbound queue the connection drains.
    pub fn outbound(&self) -> &Outbound {
        &self.handle.outbound
    }

    /// Whether `connect` succeeded.
    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// Whether a `pong` arrived since the last call.
    pub fn take_pong(&mut self) -> bool {
        std::mem::take(&mut self.pong_seen)
    }

    /// Queues a message to the client.
    pub fn send(&self, msg: &ServerMessage) {
        match msg.encode(self.handle.encoding) {
            Ok(b) => {
                self.handle.outbound.push(Encoded::new(b));
            }
            Err(e) => tracing::error!(error = %e, "cannot encode a reply"),
        }
    }

    /// Handles one data message (a frame's payload) from the client.
    pub async fn handle_message(&mut self, payload: &[u8]) -> Flow {
        for item in decode_requests(self.handle.encoding, payload) {
            match item {
                Err(v) => {
                    tracing::debug!(reason = %v, "protocol violation");
                    return Flow::Close(CloseCode::ProtocolViolation);
                }
                Ok(Err(rejection)) => {
                    self.send(&ServerMessage::error(rejection.id, rejection.code, rejection.message));
                }
                Ok(Ok(req)) => {
                    let flow = self.handle_request(req).await;
                    if flow != Flow::Continue {
                        return flow;
                    }
                }
            }
        }
        Flow::Continue
    }

    async fn handle_request(&mut self, req: Request) -> Flow {
        let id = req.id;
        if !self.connected && !matches!(req.command, Command::Connect { .. }) {
            self.send(&ServerMessage::error(id, ErrorCode::NotConnected, "send connect first"));
            return Flow::Continue;
        }
        let result = match req.command {
            Command::Connect { token, .. } => return self.connect(id, token),
            Command::Subscribe { room, token, recover, presence } => {
                // Replies itself (through the hub) on success.
                match self.subscribe(id, room, token, recover, presence).await {
                    Ok(()) => return Flow::Continue,
                    Err(f) => Err(f),
                }
            }
            Command::Unsubscribe { room } => self.unsubscribe(room).await,
            Command::Publish { room, data, skip_self } => self.publish(room, data, skip_self).await,
            Command::Presence { room } => self.presence(room).await,
            Command::PresenceStats { room } => self.presence_stats(room).await,
            Command::History { room, since, limit, reverse } => {
                self.history(room, since, limit, reverse).await
            }
            Command::Rpc { .. } => {
                Err(Failure::new(ErrorCode::BackendUnavailable, "no RPC backend is configured on this node"))
            }
            Command::Refresh { .. } => {
                Err(Failure::new(ErrorCode::NotAvailable, "tokens are not configured on this node"))
            }
            Command::Pong => {
                self.pong_seen = true;
                Ok(None)
            }
        };
        match result {
            Ok(Some(reply)) => self.send(&ServerMessage::Reply { id, reply }),
            Ok(None) => {}
            Err(Failure(code, message)) => self.send(&ServerMessage::error(id, code, message)),
        }
        Flow::Continue
    }

    fn connect(&mut self, id: Option<u32>, token: Option<String>) -> Flow {
        if self.connected {
            self.send(&ServerMessage::error(id, ErrorCode::BadRequest, "already connected"));
            return Flow::Continue;
        }
        if token.is_some() {
            // The seam for tokens: no key is configured, so no token can be verified.
            self.send(&ServerMessage::error(
                id,
                ErrorCode::Unauthorized,
                "tokens are not configured on this node",
            ));
            return Flow::Close(CloseCode::Unauthorized);
        }
        if !self.node.config.allow_anonymous {
            self.send(&ServerMessage::error(id, ErrorCode::Unauthorized, "a token is required"));
            return Flow::Close(CloseCode::Unauthorized);
        }
        self.connected = true;
        self.send(&ServerMessage::Reply {
            id,
            reply: Reply::Connected {
                client: self.handle.client.to_string(),
                node: self.node.id.clone(),
                ping_ms: self.node.config.ping_ms,
                expires_in: None,
            },
        });
        Flow::Continue
    }

    fn namespace(&self, room: &Room) -> Result<Arc<NamespaceConfig>, Failure> {
        self.node.namespace(room).cloned().ok_or_else(|| {
            Failure::new(
                ErrorCode::UnknownNamespace,
                format!("namespace {:?} is not configured", room.namespace().unwrap_or("")),
            )
        })
    }

    /// Whether the subscribe rule lets this connection into `room` (without a token).
    fn may_subscribe(&self, ns: &NamespaceConfig, room: &Room, token: Option<&str>) -> Result<(), Failure> {
        let denied = |m: &str| Err(Failure::new(ErrorCode::PermissionDenied, m));
        match ns.subscribe {
            SubscribeRule::Public => Ok(()),
            SubscribeRule::Authenticated if self.handle.user.is_empty() => denied("subscribing needs a user"),
            SubscribeRule::Authenticated => Ok(()),
            SubscribeRule::User
                if room.local_name() == &*self.handle.user && !self.handle.user.is_empty() =>
            {
                Ok(())
            }
            SubscribeRule::User => denied("this room belongs to another user"),
            SubscribeRule::Token => match token {
                None => denied("a subscription token is required"),
                Some(_) => {
                    Err(Failure::new(ErrorCode::Unauthorized, "tokens are not configured on this node"))
                }
            },
        }
    }

    /// Whether this connection may read `room` (presence, history): it is subscribed, or
    /// could subscribe without a token.
    fn may_read(&self, ns: &NamespaceConfig, room: &Room) -> Result<(), Failure> {
        if self.subs.contains_key(room) {
            return Ok(());
        }
        self.may_subscribe(ns, room, None)
    }

    fn member(&self, room_info: Option<Data>) -> Member {
        Member {
            client: self.handle.client.to_string(),
            user: self.handle.user.to_string(),
            info: self.info.clone(),
            room_info,
        }
    }

    async fn subscribe(
        &mut self,
        id: Option<u32>,
        room: Room,
        token: Option<String>,
        recover: Option<Position>,
        with_presence: bool,
    ) -> Result<(), Failure> {
        let ns = self.namespace(&room)?;
        self.may_subscribe(&ns, &room, token.as_deref())?;
        if self.subs.contains_key(&room) {
            return Err(Failure::new(ErrorCode::AlreadySubscribed, format!("already subscribed to {room}")));
        }
        if self.subs.len() >= self.node.config.max_subscriptions {
            return Err(Failure::new(ErrorCode::LimitExceeded, "too many subscriptions on this connection"));
        }
        if with_presence && !ns.presence {
            return Err(Failure::new(ErrorCode::NotAvailable, "presence is off in this namespace"));
        }
        let node = self.node.clone();
        let rs = node.hub.add(&room, &self.handle).await;
        let result = self.set_up_subscription(&ns, &room, recover, with_presence, &rs).await;
        let (reply, after) = match result {
            Ok(r) => r,
            Err(f) => {
                node.hub.remove(&room, &self.handle.client).await;
                if ns.presence {
                    let _ = node.presence.remove(&room, &self.handle.client).await;
                }
                return Err(f);
            }
        };
        let msg = ServerMessage::Reply { id, reply };
        let encoded =
            msg.encode(self.handle.encoding).map_err(|e| Failure::new(ErrorCode::Internal, e.to_string()))?;
        self.subs.insert(room.clone(), Subscription { ns: ns.clone(), room_info: None });
        node.hub.activate(&rs, &self.handle.client, Encoded::new(encoded), after);
        if ns.join_leave {
            if let Err(e) = node.broker.publish_event(&room, RoomEvent::Join(self.member(None))).await {
                tracing::warn!(room = %room, error = %e, "join event not published");
            }
        }
        Ok(())
    }

    /// Reads the position (and the publications to recover), registers presence; returns
    /// the reply and the offset after which buffered live publications follow it.
    async fn set_up_subscription(
        &self,
        ns: &NamespaceConfig,
        room: &Room,
        recover: Option<Position>,
        with_presence: bool,
        rs: &crate::hub::RoomSubscribers,
    ) -> Result<(Reply, Option<u64>), Failure> {
        let node = &self.node;
        Hub::wait_ready(rs)
            .await
            .map_err(|e| Failure::new(ErrorCode::Internal, format!("broker unavailable: {e}")))?;
        let recoverable = ns.history_enabled();
        let mut reply_position = None;
        let mut recovered = recover.as_ref().map(|_| false);
        let mut publications = None;
        let mut after = None;
        if recoverable {
            let opts = Node::history_options(ns);
            let query = match &recover {
                Some(since) => HistoryQuery {
                    since: Some(since.clone()),
                    limit: Some(ns.recover_max + 1),
                    reverse: false,
                },
                None => HistoryQuery { since: None, limit: Some(0), reverse: false },
            };
            let page = node.broker.history(room, query, opts).await.map_err(internal)?;
            if recover.is_some() {
                let ok = page.continuable && page.publications.len() <= ns.recover_max;
                recovered = Some(ok);
                publications =
                    Some(if ok { page.publications.iter().map(to_wire).collect() } else { Vec::new() });
            }
            after = Some(page.position.offset);
            reply_position = Some(page.position);
        }
        if ns.presence {
            node.presence.add(room, &self.member(None)).await.map_err(internal)?;
        }
        let members = if with_presence {
            match node.presence.members(room, node.config.max_presence_members).await.map_err(internal)? {
                Some(m) => Some(m),
                None => return Err(Failure::new(ErrorCode::LimitExceeded, "too many members to list")),
            }
        } else {
            None
        };
        Ok((
            Reply::Subscribed {
                room: room.to_string(),
                recoverable,
                position: reply_position,
                recovered,
                publications: if recovered == Some(true) { publications } else { None },
                members,
            },
            after,
        ))
    }

    async fn unsubscribe(&mut self, room: Room) -> CmdResult {
        self.leave(&room).await;
        Ok(Some(Reply::Unsubscribed { room: room.to_string() }))
    }

    /// Ends a subscription here, in presence and for the other members.
    async fn leave(&mut self, room: &Room) {
        let Some(sub) = self.subs.remove(room) else {
            return;
        };
        let node = self.node.clone();
        node.hub.remove(room, &self.handle.client).await;
        if sub.ns.presence {
            if let Err(e) = node.presence.remove(room, &self.handle.client).await {
                tracing::warn!(room = %room, error = %e, "presence remove failed");
            }
        }
        if sub.ns.join_leave {
            let member = self.member(sub.room_info);
            if let Err(e) = node.broker.publish_event(room, RoomEvent::Leave(member)).await {
                tracing::warn!(room = %room, error = %e, "leave event not published");
            }
        }
    }

    async fn publish(&mut self, room: Room, data: Data, skip_self: bool) -> CmdResult {
        let ns = self.namespace(&room)?;
        if data.wire_len() > self.node.config.max_data_size {
            return Err(Failure::new(
                ErrorCode::LimitExceeded,
                format!("data is larger than {} bytes", self.node.config.max_data_size),
            ));
        }
        match ns.publish {
            PublishRule::Subscribers if !self.subs.contains_key(&room) => {
                return Err(Failure::new(ErrorCode::PermissionDenied, "subscribe to the room to publish"));
            }
            PublishRule::Authenticated if self.handle.user.is_empty() => {
                return Err(Failure::new(ErrorCode::PermissionDenied, "publishing needs a user"));
            }
            PublishRule::None => {
                return Err(Failure::new(
                    ErrorCode::PermissionDenied,
                    "only backends publish in this namespace",
                ));
            }
            _ => {}
        }
        let mut p = BrokerPublication::new(room.clone(), data);
        p.info = Some(PublisherInfo {
            client: self.handle.client.to_string(),
            user: self.handle.user.to_string(),
        });
        if skip_self {
            p.skip_client = Some(self.handle.client.to_string());
        }
        let position = self.node.broker.publish(p, Node::history_options(&ns)).await.map_err(internal)?;
        Ok(Some(Reply::Published { room: room.to_string(), position }))
    }

    async fn presence(&mut self, room: Room) -> CmdResult {
        let ns = self.namespace(&room)?;
        if !ns.presence {
            return Err(Failure::new(ErrorCode::NotAvailable, "presence is off in this namespace"));
        }
        self.may_read(&ns, &room)?;
        match self
            .node
            .presence
            .members(&room, self.node.config.max_presence_members)
            .await
            .map_err(internal)?
        {
            Some(members) => Ok(Some(Reply::Presence { room: room.to_string(), members })),
            None => {
                Err(Failure::new(ErrorCode::LimitExceeded, "too many members to list; use presence_stats"))
            }
        }
    }

    async fn presence_stats(&mut self, room: Room) -> CmdResult {
        let ns = self.namespace(&room)?;
        if !ns.presence {
            return Err(Failure::new(ErrorCode::NotAvailable, "presence is off in this namespace"));
        }
        self.may_read(&ns, &room)?;
        let s = self.node.presence.stats(&room).await.map_err(internal)?;
        Ok(Some(Reply::PresenceStats { room: room.to_string(), clients: s.clients, users: s.users }))
    }

    async fn history(
        &mut self,
        room: Room,
        since: Option<Position>,
        limit: Option<u64>,
        reverse: bool,
    ) -> CmdResult {
        let ns = self.namespace(&room)?;
        if !ns.history_enabled() {
            return Err(Failure::new(ErrorCode::NotAvailable, "history is off in this namespace"));
        }
        self.may_read(&ns, &room)?;
        let limit = limit.map_or(ns.history_size, |l| (l.min(ns.history_size as u64)) as usize);
        let query = HistoryQuery { since, limit: Some(limit), reverse };
        let page =
            self.node.broker.history(&room, query, Node::history_options(&ns)).await.map_err(internal)?;
        if !page.continuable {
            return Err(Failure::new(ErrorCode::UnrecoverablePosition, "that position cannot be continued"));
        }
        Ok(Some(Reply::History {
            room: room.to_string(),
            position: page.position,
            publications: page.publications.iter().map(to_wire).collect(),
        }))
    }

    /// Cleans up when the connection ends: leaves every room.
    pub async fn close(&mut self) {
        let rooms: Vec<Room> = self.subs.keys().cloned().collect();
        for room in rooms {
            self.leave(&room).await;
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.node.hub.session_closed();
    }
}

fn internal(e: impl std::fmt::Display) -> Failure {
    tracing::warn!(error = %e, "backend error");
    Failure::new(ErrorCode::Internal, "internal error, try again")
}

fn to_wire(p: &BrokerPublication) -> Publication {
    Publication { room: p.room.to_string(), offset: p.offset, data: p.data.clone(), info: p.info.clone() }
}
