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

use roomcast_auth::{RoomGrants, TokenError};
use tokio::time::Instant;

use crate::api::rpc::{Refused, RpcCalls};
use crate::config::{NamespaceConfig, PublishRule, SubscribeRule};
use crate::hub::{Hub, SessionAction, SessionHandle};
use crate::limits::{CommandLimiter, CommandVerdict, LimitCounters};
use crate::node::{Node, PublishFailure, random_id};
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
    /// The connection token's `rooms` claim.
    rooms: RoomGrants,
    /// When the connection token expires (the connection is closed with 4004 unless it
    /// is refreshed before).
    expires_at: Option<Instant>,
    /// Whether this session is counted in the hub's per-user connections.
    user_counted: bool,
    /// The presence room counting this user's connections cluster-wide, when this session
    /// is in it (shared presence and a per-user limit).
    user_room: Option<Room>,
    /// The command rate (`None` when off).
    commands: Option<CommandLimiter>,
    /// The receiving end of the handle's action queue, until the connection takes it.
    actions: Option<tokio::sync::mpsc::Receiver<SessionAction>>,
    /// Whether the hub's user index holds this session (connected with a user).
    indexed: bool,
    /// `rpc` calls in flight.
    rpc: RpcCalls,
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
        let (handle, actions) = SessionHandle::new(
            random_id().into(),
            "".into(),
            encoding,
            Outbound::new(node.config.max_queue_bytes),
        );
        let handle = Arc::new(handle);
        node.hub.session_opened();
        let commands = CommandLimiter::new(&node.limits.config, Instant::now());
        Session {
            node,
            handle,
            connected: false,
            info: None,
            subs: HashMap::new(),
            pong_seen: false,
            rooms: RoomGrants::default(),
            expires_at: None,
            user_counted: false,
            user_room: None,
            commands,
            actions: Some(actions),
            indexed: false,
            rpc: RpcCalls::default(),
        }
    }

    /// The server-side actions queued to this session, to be passed to
    /// [`Session::handle_action`]; `None` after the first call.
    pub fn take_actions(&mut self) -> Option<tokio::sync::mpsc::Receiver<SessionAction>> {
        self.actions.take()
    }

    /// Carries out a server-side action (from the backend API).
    pub async fn handle_action(&mut self, action: SessionAction) {
        match action {
            SessionAction::Unsubscribe { room, code, reason } => {
                if !self.subs.contains_key(&room) {
                    return;
                }
                self.leave(&room).await;
                self.send(&ServerMessage::Push(roomcast_protocol::Push::Unsubscribe {
                    room: room.to_string(),
                    code,
                    reason,
                }));
            }
        }
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

    /// Turns the command rate off for this connection (a loopback client).
    pub fn exempt_from_command_rate(&mut self) {
        self.commands = None;
    }

    /// When the connection token expires, if it does.
    pub fn expires_at(&self) -> Option<Instant> {
        self.expires_at
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
                    // Spec 2.1: before `connect`, anything else gets 113, even when malformed.
                    if !self.connected && !rejection.is_connect {
                        self.send(&ServerMessage::error(
                            rejection.id,
                            ErrorCode::NotConnected,
                            "send connect first",
                        ));
                    } else {
                        self.send(&ServerMessage::error(rejection.id, rejection.code, rejection.message));
                    }
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
        if !matches!(req.command, Command::Pong)
            && let Some(limiter) = &mut self.commands
        {
            match limiter.check(Instant::now()) {
                CommandVerdict::Allow => {}
                CommandVerdict::Limited => {
                    LimitCounters::inc(&self.node.limits.counters.commands_rate_limited);
                    self.send(&ServerMessage::error(
                        id,
                        ErrorCode::TooManyRequests,
                        "too many requests, slow down",
                    ));
                    return Flow::Continue;
                }
                CommandVerdict::Close => {
                    LimitCounters::inc(&self.node.limits.counters.commands_rate_limited);
                    LimitCounters::inc(&self.node.limits.counters.closed_too_many_requests);
                    return Flow::Close(CloseCode::TooManyRequests);
                }
            }
        }
        if !self.connected && !matches!(req.command, Command::Connect { .. }) {
            self.send(&ServerMessage::error(id, ErrorCode::NotConnected, "send connect first"));
            return Flow::Continue;
        }
        // A publisher's `published` reply goes before its own copy of the publication
        // (which the memory broker delivers while the publish runs).
        let held = matches!(req.command, Command::Publish { .. });
        if held {
            self.handle.outbound.hold();
        }
        let result = match req.command {
            Command::Connect { token, .. } => return self.connect(id, token).await,
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
            Command::Rpc { method, data } => {
                match self.rpc.start(self.node.rpc.as_ref(), &self.handle, id, &method, data) {
                    // Answered when the backend is.
                    Ok(()) => Ok(None),
                    Err(Refused(code, message)) => Err(Failure(code, message)),
                }
            }
            Command::Refresh { token } => return self.refresh(id, token).await,
            Command::Pong => {
                self.pong_seen = true;
                Ok(None)
            }
        };
        let msg = match result {
            Ok(Some(reply)) => Some(ServerMessage::Reply { id, reply }),
            Ok(None) => None,
            Err(Failure(code, message)) => Some(ServerMessage::error(id, code, message)),
        };
        if held {
            let encoded = msg.and_then(|m| match m.encode(self.handle.encoding) {
                Ok(b) => Some(Encoded::new(b)),
                Err(e) => {
                    tracing::error!(error = %e, "cannot encode a reply");
                    None
                }
            });
            self.handle.outbound.release(encoded);
        } else if let Some(m) = msg {
            self.send(&m);
        }
        Flow::Continue
    }

    /// Counts a refused token and picks its error code.
    fn token_failure(&self, e: &TokenError) -> ErrorCode {
        let c = &self.node.limits.counters;
        if e.is_expired() {
            LimitCounters::inc(&c.tokens_expired);
            ErrorCode::TokenExpired
        } else {
            LimitCounters::inc(&c.tokens_refused);
            ErrorCode::Unauthorized
        }
    }

    /// The deadline of a token expiring at `exp` (Unix seconds), leeway included.
    fn deadline(&self, exp: u64) -> Instant {
        Instant::now()
            + roomcast_auth::time_until(exp)
            + std::time::Duration::from_secs(self.node.config.auth.leeway_secs)
    }

    async fn connect(&mut self, id: Option<u32>, token: Option<String>) -> Flow {
        if self.connected {
            self.send(&ServerMessage::error(id, ErrorCode::BadRequest, "already connected"));
            return Flow::Continue;
        }
        // An empty token is no token.
        let token = token.filter(|t| !t.is_empty());
        let (user, info, rooms, expires) = match token {
            Some(token) => {
                let Some(verifier) = self.node.verifier.clone() else {
                    LimitCounters::inc(&self.node.limits.counters.tokens_refused);
                    self.send(&ServerMessage::error(
                        id,
                        ErrorCode::Unauthorized,
                        "tokens are not configured on this node",
                    ));
                    return Flow::Close(CloseCode::Unauthorized);
                };
                match verifier.verify_connection(&token).await {
                    Ok(t) => (t.user, t.info, t.rooms, Some(t.expires_at)),
                    Err(e) => {
                        tracing::debug!(error = %e, "connection token refused");
                        let code = self.token_failure(&e);
                        self.send(&ServerMessage::error(id, code, e.to_string()));
                        return Flow::Close(if e.is_expired() {
                            CloseCode::TokenExpired
                        } else {
                            CloseCode::Unauthorized
                        });
                    }
                }
            }
            None if !self.node.config.anonymous_allowed() => {
                LimitCounters::inc(&self.node.limits.counters.tokens_refused);
                self.send(&ServerMessage::error(id, ErrorCode::Unauthorized, "a token is required"));
                return Flow::Close(CloseCode::Unauthorized);
            }
            None => (String::new(), None, RoomGrants::default(), None),
        };
        let user: Arc<str> = user.into();
        if !user.is_empty() {
            if !self.node.hub.try_add_user(&user, self.node.limits.config.max_connections_per_user) {
                LimitCounters::inc(&self.node.limits.counters.connections_over_user_limit);
                tracing::debug!(user = %user, "connection limit per user reached");
                return Flow::Close(CloseCode::ConnectionLimit);
            }
            self.user_counted = true;
            if let Flow::Close(code) = self.count_user_in_cluster(&user).await {
                self.node.hub.remove_user(&user);
                self.user_counted = false;
                return Flow::Close(code);
            }
        }
        // Nothing else holds the handle before `connect` (no subscription yet).
        match Arc::get_mut(&mut self.handle) {
            Some(h) => h.user = user,
            None => {
                if self.user_counted {
                    self.node.hub.remove_user(&user);
                    self.user_counted = false;
                }
                self.send(&ServerMessage::error(id, ErrorCode::Internal, "internal error, try again"));
                return Flow::Continue;
            }
        }
        self.info = info;
        self.rooms = rooms;
        self.expires_at = expires.map(|exp| self.deadline(exp));
        self.connected = true;
        if !self.handle.user.is_empty() {
            self.node.hub.index_user(&self.handle);
            self.indexed = true;
        }
        self.send(&ServerMessage::Reply {
            id,
            reply: Reply::Connected {
                client: self.handle.client.to_string(),
                node: self.node.id.clone(),
                ping_ms: self.node.config.ping_ms,
                expires_in: expires.map(|exp| roomcast_auth::time_until(exp).as_secs()),
            },
        });
        Flow::Continue
    }

    /// Counts this connection in its user's cluster-wide count (a member of the reserved
    /// presence room `__conn:<user>`, so that dead nodes' connections are reaped like any
    /// member); closes with 4010 when the user has too many. Two connections racing for
    /// the last place may both be refused, never both accepted. Nothing to do with
    /// single-node presence (the node's own count is the cluster's) or without a limit.
    async fn count_user_in_cluster(&mut self, user: &str) -> Flow {
        let max = self.node.limits.config.max_connections_per_user;
        if max == 0 || !self.node.shared_presence() {
            return Flow::Continue;
        }
        let Some(room) = user_room(user) else {
            return Flow::Continue;
        };
        let member = Member {
            client: self.handle.client.to_string(),
            user: user.to_string(),
            info: None,
            room_info: None,
        };
        let counted = async {
            self.node.presence.add(&room, &member).await?;
            self.node.presence.stats(&room).await
        };
        match counted.await {
            Ok(stats) if stats.clients as usize > max => {
                let _ = self.node.presence.remove(&room, &self.handle.client).await;
                LimitCounters::inc(&self.node.limits.counters.connections_over_user_limit);
                tracing::debug!(
                    user,
                    connections = stats.clients,
                    "connection limit per user reached (cluster)"
                );
                Flow::Close(CloseCode::ConnectionLimit)
            }
            Ok(_) => {
                self.user_room = Some(room);
                Flow::Continue
            }
            Err(e) => {
                // Presence is down: the per-node limit still holds; do not refuse users.
                tracing::warn!(error = %e, "cannot count the user's connections in the cluster");
                Flow::Continue
            }
        }
    }

    /// `refresh`: a new connection token for the same user moves the expiry.
    async fn refresh(&mut self, id: Option<u32>, token: String) -> Flow {
        let Some(verifier) = self.node.verifier.clone() else {
            self.send(&ServerMessage::error(
                id,
                ErrorCode::NotAvailable,
                "tokens are not configured on this node",
            ));
            return Flow::Continue;
        };
        match verifier.verify_connection(&token).await {
            Ok(t) if *t.user != *self.handle.user => {
                LimitCounters::inc(&self.node.limits.counters.tokens_refused);
                self.send(&ServerMessage::error(
                    id,
                    ErrorCode::Unauthorized,
                    "the token is for another user",
                ));
                Flow::Close(CloseCode::Unauthorized)
            }
            Ok(t) => {
                self.expires_at = Some(self.deadline(t.expires_at));
                self.rooms = t.rooms;
                self.send(&ServerMessage::Reply {
                    id,
                    reply: Reply::Refreshed {
                        expires_in: Some(roomcast_auth::time_until(t.expires_at).as_secs()),
                    },
                });
                Flow::Continue
            }
            // An expired refresh token: the connection keeps its current expiry and may
            // try again before it.
            Err(e) if e.is_expired() => {
                let code = self.token_failure(&e);
                self.send(&ServerMessage::error(id, code, e.to_string()));
                Flow::Continue
            }
            Err(e) => {
                tracing::debug!(error = %e, "refresh token refused");
                let code = self.token_failure(&e);
                self.send(&ServerMessage::error(id, code, e.to_string()));
                Flow::Close(CloseCode::Unauthorized)
            }
        }
    }

    fn namespace(&self, room: &Room) -> Result<Arc<NamespaceConfig>, Failure> {
        self.node.namespace(room).cloned().ok_or_else(|| {
            Failure::new(
                ErrorCode::UnknownNamespace,
                format!("namespace {:?} is not configured", room.namespace().unwrap_or("")),
            )
        })
    }

    /// Whether the subscribe rule lets this connection into `room` without a subscription
    /// token (in a `token` namespace: the connection token's `rooms` claim grants it).
    fn may_subscribe(&self, ns: &NamespaceConfig, room: &Room) -> Result<(), Failure> {
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
            SubscribeRule::Token if self.rooms.allows(room.as_str()) => Ok(()),
            SubscribeRule::Token => denied("a subscription token is required"),
        }
    }

    /// Checks the rule for a `subscribe`, with its token in a `token` namespace; returns
    /// the subscription token's `info` (the member's `room_info`).
    async fn check_subscribe(
        &self,
        ns: &NamespaceConfig,
        room: &Room,
        token: Option<String>,
    ) -> Result<Option<Data>, Failure> {
        let token = token.filter(|t| !t.is_empty());
        let (SubscribeRule::Token, Some(token)) = (ns.subscribe, token) else {
            return self.may_subscribe(ns, room).map(|()| None);
        };
        let Some(verifier) = self.node.verifier.clone() else {
            LimitCounters::inc(&self.node.limits.counters.tokens_refused);
            return Err(Failure::new(ErrorCode::Unauthorized, "tokens are not configured on this node"));
        };
        match verifier.verify_subscription(&token, &self.handle.user, room.as_str()).await {
            Ok(t) => Ok(t.room_info),
            Err(e) => {
                tracing::debug!(room = %room, error = %e, "subscription token refused");
                Err(Failure::new(self.token_failure(&e), e.to_string()))
            }
        }
    }

    /// Whether this connection may read `room` (presence, history): it is subscribed, or
    /// could subscribe without a token.
    fn may_read(&self, ns: &NamespaceConfig, room: &Room) -> Result<(), Failure> {
        if self.subs.contains_key(room) {
            return Ok(());
        }
        self.may_subscribe(ns, room)
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
        let room_info = self.check_subscribe(&ns, &room, token).await?;
        if self.subs.contains_key(&room) {
            return Err(Failure::new(ErrorCode::AlreadySubscribed, format!("already subscribed to {room}")));
        }
        if self.subs.len() >= self.node.config.max_subscriptions {
            LimitCounters::inc(&self.node.limits.counters.subscriptions_over_limit);
            return Err(Failure::new(ErrorCode::LimitExceeded, "too many subscriptions on this connection"));
        }
        if with_presence && !ns.presence {
            return Err(Failure::new(ErrorCode::NotAvailable, "presence is off in this namespace"));
        }
        let node = self.node.clone();
        let rs = node.hub.add(&room, &self.handle).await;
        let result =
            self.set_up_subscription(&ns, &room, recover, with_presence, &rs, room_info.as_ref()).await;
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
        self.subs.insert(room.clone(), Subscription { ns: ns.clone(), room_info: room_info.clone() });
        node.hub.activate(
            &rs,
            &self.handle.client,
            Encoded::new(encoded),
            after.as_ref().map(|p| (p.epoch.as_str(), p.offset)),
        );
        if ns.join_leave
            && let Err(e) = node.broker.publish_event(&room, RoomEvent::Join(self.member(room_info))).await
        {
            tracing::warn!(room = %room, error = %e, "join event not published");
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
        room_info: Option<&Data>,
    ) -> Result<(Reply, Option<Position>), Failure> {
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
            after = Some(page.position.clone());
            reply_position = Some(page.position);
        }
        if ns.presence {
            node.presence.add(room, &self.member(room_info.cloned())).await.map_err(internal)?;
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
        // Spec 3: a namespace not configured gets 102, for every command naming a room.
        self.namespace(&room)?;
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
        if sub.ns.presence
            && let Err(e) = node.presence.remove(room, &self.handle.client).await
        {
            tracing::warn!(room = %room, error = %e, "presence remove failed");
        }
        if sub.ns.join_leave {
            let member = self.member(sub.room_info);
            if let Err(e) = node.broker.publish_event(room, RoomEvent::Leave(member)).await {
                tracing::warn!(room = %room, error = %e, "leave event not published");
            }
        }
    }

    async fn publish(&mut self, room: Room, data: Data, skip_self: bool) -> CmdResult {
        let ns = self.node.publication_namespace(&room, &data).map_err(publish_failure)?;
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
        let position = self.node.publish(p, &ns, None).await.map_err(publish_failure)?;
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
        if let Some(room) = self.user_room.take()
            && let Err(e) = self.node.presence.remove(&room, &self.handle.client).await
        {
            tracing::warn!(error = %e, "cannot uncount the user's connection in the cluster");
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if self.indexed {
            self.node.hub.unindex_user(&self.handle.user, &self.handle.client);
        }
        if self.user_counted {
            self.node.hub.remove_user(&self.handle.user);
        }
        self.node.hub.session_closed();
    }
}

/// The reserved presence room counting `user`'s connections (namespace `__conn`, which
/// configuration cannot define, so no client can read it). A user id that is not a valid
/// room name is hashed (FNV-1a, 128 bits over two seeds: the same on every node and
/// version).
fn user_room(user: &str) -> Option<Room> {
    let plain =
        user.len() <= 180 && user.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-:@=,/".contains(&b));
    let name = if plain {
        format!("__conn:{user}")
    } else {
        let fnv = |seed: u64| {
            user.bytes().fold(seed, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
        };
        format!("__conn:={:016x}{:016x}", fnv(0xcbf2_9ce4_8422_2325), fnv(0x6c62_272e_07bb_0142))
    };
    Room::parse(&name).ok()
}

fn publish_failure(f: PublishFailure) -> Failure {
    match f {
        PublishFailure::Refused(code, message) => Failure(code, message),
        PublishFailure::Broker(e) => internal(e),
    }
}

fn internal(e: impl std::fmt::Display) -> Failure {
    tracing::warn!(error = %e, "backend error");
    Failure::new(ErrorCode::Internal, "internal error, try again")
}

fn to_wire(p: &BrokerPublication) -> Publication {
    Publication { room: p.room.to_string(), offset: p.offset, data: p.data.clone(), info: p.info.clone() }
}
