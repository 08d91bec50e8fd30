//! The hub: this node's sessions by room, sharded, and the fan-out of broker events to
//! them; also this node's connected sessions by user (the backend API's `send`,
//! `disconnect`, `unsubscribe` find a user's connections there), and each session's
//! bounded queue of server-side actions ([`SessionAction`]).
//!
//! Subscribing without a gap: a new subscriber is added *pending* before its node-level
//! broker subscription is confirmed and before history is read; events for it are
//! buffered meanwhile. [`Hub::activate`] then queues the `subscribed` reply followed by
//! the buffered events newer than the position the reply reports, under the room's lock,
//! so no live event can slip between them.
//!
//! Losing nothing: each room remembers the position of the last publication fanned out
//! here. A publication at or below it is a duplicate and is dropped; one that skips
//! offsets (or changes epoch) means this node missed publications (a broker connection
//! dropped them): the room's live subscribers are closed with 4000 so that they reconnect
//! and recover from history, rather than silently see a hole. After a broker
//! interruption, [`Hub::missed`] compares the broker's position of each room with the
//! last one fanned out, to catch a lost tail that no later publication would reveal.

use std::collections::HashMap;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::{Mutex, RwLock};
use roomcast_broker::{BrokerPublication, RoomEvent};
use roomcast_protocol::{Encode, Encoding, Publication, Push, Room, ServerMessage};
use tokio::sync::{mpsc, watch};

use crate::outbound::{Encoded, Outbound, Pushed};

const SHARDS: usize = 64;

/// What the hub knows of a session: enough to deliver to it.
#[derive(Debug)]
pub struct SessionHandle {
    pub client: Arc<str>,
    pub user: Arc<str>,
    pub encoding: Encoding,
    pub outbound: Outbound,
    /// Server-side actions the session must carry out itself (they change its state),
    /// drained by its connection task; bounded by [`ACTION_QUEUE`].
    pub actions: mpsc::Sender<SessionAction>,
}

/// Bound of a session's action queue; a session that lets it fill is closed with 4003.
pub const ACTION_QUEUE: usize = 256;

/// A server-side action on one session (from the backend API, through a control message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionAction {
    /// End the subscription to `room` as if the client had unsubscribed, then push
    /// `unsubscribe {room, code, reason}`.
    Unsubscribe { room: Room, code: u16, reason: String },
}

impl SessionHandle {
    /// A handle and the receiving end of its action queue.
    pub fn new(
        client: Arc<str>,
        user: Arc<str>,
        encoding: Encoding,
        outbound: Outbound,
    ) -> (SessionHandle, mpsc::Receiver<SessionAction>) {
        let (actions, rx) = mpsc::channel(ACTION_QUEUE);
        (SessionHandle { client, user, encoding, outbound, actions }, rx)
    }

    /// Queues an action; a session whose queue is full cannot keep up and is closed
    /// with 4003 (as for a full outbound queue).
    pub fn act(&self, action: SessionAction) {
        match self.actions.try_send(action) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::debug!(client = %self.client, "action queue full; closing with 4003");
                self.outbound.close(roomcast_protocol::CloseCode::SlowConsumer);
            }
            // The connection is gone.
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }
}

/// State of this node's broker subscription for one room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerState {
    Pending,
    Ready,
    Failed(String),
}

/// A request to the task that keeps broker subscriptions in step with the hub
/// (`Node::run_broker_control`). Processed strictly in order.
#[derive(Debug)]
pub enum ControlOp {
    Subscribe(Arc<RoomSubscribers>),
    /// Unsubscribe unless the room has local subscribers again by then.
    Unsubscribe(Room),
}

/// The local subscribers of one room.
#[derive(Debug)]
pub struct RoomSubscribers {
    pub room: Room,
    /// Subscribers in subscription order. Held while fanning an event out to them.
    subs: Mutex<Vec<Subscriber>>,
    /// The broker subscription's state, published by the control task.
    pub broker: watch::Sender<BrokerState>,
    /// The position of the last publication fanned out to this room here (or, before the
    /// first, the position the first subscriber was told). Only taken briefly, never
    /// across an await.
    last: Mutex<Option<StreamPos>>,
}

/// Where a publication stands relative to the last one fanned out in its room.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    /// The next one (or the first, or a room without history).
    Next,
    /// Already fanned out.
    Duplicate,
    /// Publications between the last one (given) and this one never arrived here.
    Gap(Option<StreamPos>),
}

impl RoomSubscribers {
    /// Records `pos` as the room's last position; says how it follows the previous one.
    fn advance(&self, pos: &Option<StreamPos>) -> Step {
        let Some((epoch, offset)) = pos else {
            return Step::Next;
        };
        let mut last = self.last.lock();
        let step = match &*last {
            None => Step::Next,
            Some((e, o)) if e == epoch => {
                if offset <= o {
                    return Step::Duplicate;
                }
                if *offset == o + 1 { Step::Next } else { Step::Gap(last.clone()) }
            }
            // A new epoch (the history expired or was lost) starts at 1; starting later,
            // its first publications were missed here.
            Some(_) => {
                if *offset == 1 {
                    Step::Next
                } else {
                    Step::Gap(last.clone())
                }
            }
        };
        *last = Some((epoch.clone(), *offset));
        step
    }

    /// The last position fanned out here.
    pub fn last_position(&self) -> Option<(Arc<str>, u64)> {
        self.last.lock().clone()
    }

    /// Closes every live subscriber (pending ones are set up from history anyway) with
    /// 4000: they reconnect and recover what this node missed. Returns how many.
    pub fn close_live(&self) -> usize {
        let subs = self.subs.lock();
        let mut n = 0;
        for s in subs.iter().filter(|s| s.pending.is_none()) {
            s.session.outbound.close(roomcast_protocol::CloseCode::Shutdown);
            n += 1;
        }
        n
    }
}

#[derive(Debug)]
struct Subscriber {
    session: Arc<SessionHandle>,
    /// Events held back while the subscription is being set up; `None` once live.
    pending: Option<PendingEvents>,
    /// The position the `subscribed` reply reported: publications of that epoch at or
    /// below it were in the reply (or before it) and must not be delivered again, even if
    /// a broker delivers them late. Cleared by the first newer publication.
    seen: Option<StreamPos>,
}

#[derive(Debug, Default)]
struct PendingEvents {
    /// Each event with its position (publications in rooms with history).
    events: Vec<(Option<StreamPos>, Arc<Encoded>)>,
    bytes: usize,
}

/// A publication's position: its epoch and offset.
type StreamPos = (Arc<str>, u64);

/// Whether a publication at `pos` is covered by `seen` (same epoch, offset not above).
fn covered(seen: &Option<StreamPos>, pos: &Option<StreamPos>) -> bool {
    match (seen, pos) {
        (Some((se, so)), Some((pe, po))) => se == pe && po <= so,
        _ => false,
    }
}

type Shard = HashMap<Room, Arc<RoomSubscribers>>;

/// This node's subscriptions.
#[derive(Debug)]
pub struct Hub {
    /// Rooms with local subscribers, sharded by room hash. Write-locked to add or remove a
    /// room, read-locked to find one.
    shards: Box<[RwLock<Shard>]>,
    /// Requests to the broker control task; it ends when the hub is dropped.
    control: mpsc::Sender<ControlOp>,
    /// Bound of a pending subscriber's buffered events, in bytes.
    pending_limit: usize,
    sessions: AtomicUsize,
    /// Connected sessions per user on this node (anonymous ones are not counted).
    users: Mutex<HashMap<Arc<str>, usize>>,
    /// Connected sessions by user (anonymous ones are not indexed), sharded by user hash:
    /// how the backend API finds a user's connections on this node.
    by_user: Box<[RwLock<UserShard>]>,
}

type UserShard = HashMap<Arc<str>, Vec<Arc<SessionHandle>>>;

fn user_shard_of(user: &str) -> usize {
    let mut h = DefaultHasher::new();
    user.hash(&mut h);
    (h.finish() as usize) % SHARDS
}

fn shard_of(room: &Room) -> usize {
    let mut h = DefaultHasher::new();
    room.hash(&mut h);
    (h.finish() as usize) % SHARDS
}

/// Encodes a message once per encoding, on first use.
struct Lazy<'a> {
    msg: &'a ServerMessage,
    json: Option<Arc<Encoded>>,
    msgpack: Option<Arc<Encoded>>,
}

impl<'a> Lazy<'a> {
    fn new(msg: &'a ServerMessage) -> Self {
        Lazy { msg, json: None, msgpack: None }
    }
    fn get(&mut self, enc: Encoding) -> Option<Arc<Encoded>> {
        let slot = match enc {
            Encoding::Json => &mut self.json,
            Encoding::Msgpack => &mut self.msgpack,
        };
        if slot.is_none() {
            match self.msg.encode(enc) {
                Ok(b) => *slot = Some(Encoded::new(b)),
                Err(e) => {
                    tracing::error!(error = %e, "cannot encode an event; dropped");
                    return None;
                }
            }
        }
        slot.clone()
    }
}

impl Hub {
    /// A hub and the receiving end of its control requests.
    pub fn new(pending_limit: usize) -> (Hub, mpsc::Receiver<ControlOp>) {
        let (tx, rx) = mpsc::channel(4096);
        let hub = Hub {
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            control: tx,
            pending_limit,
            sessions: AtomicUsize::new(0),
            users: Mutex::new(HashMap::new()),
            by_user: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
        };
        (hub, rx)
    }

    /// Adds `session` to `room` as a pending subscriber; asks the control task to
    /// subscribe the node when the room is new here (or its broker subscription failed).
    pub async fn add(&self, room: &Room, session: &Arc<SessionHandle>) -> Arc<RoomSubscribers> {
        let (rs, request) = {
            let mut shard = self.shards[shard_of(room)].write();
            let rs = shard
                .entry(room.clone())
                .or_insert_with(|| {
                    Arc::new(RoomSubscribers {
                        room: room.clone(),
                        subs: Mutex::new(Vec::new()),
                        broker: watch::Sender::new(BrokerState::Pending),
                        last: Mutex::new(None),
                    })
                })
                .clone();
            let new = {
                let mut subs = rs.subs.lock();
                subs.push(Subscriber {
                    session: session.clone(),
                    pending: Some(PendingEvents::default()),
                    seen: None,
                });
                subs.len() == 1
            };
            let failed = matches!(*rs.broker.borrow(), BrokerState::Failed(_));
            if failed {
                rs.broker.send_replace(BrokerState::Pending);
            }
            (rs, new || failed)
        };
        if request {
            // The control task only ends with the hub, so this cannot fail while we run.
            let _ = self.control.send(ControlOp::Subscribe(rs.clone())).await;
        }
        rs
    }

    /// Waits for the node's broker subscription of this room.
    pub async fn wait_ready(rs: &RoomSubscribers) -> Result<(), String> {
        let mut rx = rs.broker.subscribe();
        let state = rx.wait_for(|s| *s != BrokerState::Pending).await.map_err(|e| e.to_string())?.clone();
        match state {
            BrokerState::Failed(e) => Err(e),
            _ => Ok(()),
        }
    }

    /// Makes a pending subscriber live: queues `reply`, then the buffered events that
    /// `after` (the reply's position) does not cover. Returns `false` when the subscriber
    /// is no longer there.
    pub fn activate(
        &self,
        rs: &RoomSubscribers,
        client: &str,
        reply: Arc<Encoded>,
        after: Option<(&str, u64)>,
    ) -> bool {
        let mut subs = rs.subs.lock();
        let Some(sub) = subs.iter_mut().find(|s| &*s.session.client == client) else {
            return false;
        };
        let pending = sub.pending.take().unwrap_or_default();
        sub.seen = after.map(|(e, o)| (Arc::from(e), o));
        {
            // Before any publication, the room continues from what this subscriber was told.
            let mut last = rs.last.lock();
            if last.is_none() {
                last.clone_from(&sub.seen);
            }
        }
        let out = &sub.session.outbound;
        if out.push(reply) != Pushed::Queued {
            return true;
        }
        for (pos, event) in pending.events {
            if covered(&sub.seen, &pos) {
                continue;
            }
            if pos.is_some() {
                sub.seen = None;
            }
            if out.push(event) != Pushed::Queued {
                break;
            }
        }
        true
    }

    /// Removes `client` from `room`; asks the control task to unsubscribe the node when
    /// the room has no local subscriber left.
    pub async fn remove(&self, room: &Room, client: &str) {
        let emptied = {
            let mut shard = self.shards[shard_of(room)].write();
            let Some(rs) = shard.get(room) else {
                return;
            };
            let empty = {
                let mut subs = rs.subs.lock();
                subs.retain(|s| &*s.session.client != client);
                subs.is_empty()
            };
            if empty {
                shard.remove(room);
            }
            empty
        };
        if emptied {
            let _ = self.control.send(ControlOp::Unsubscribe(room.clone())).await;
        }
    }

    /// Whether the room has local subscribers.
    pub fn has_room(&self, room: &Room) -> bool {
        self.shards[shard_of(room)].read().contains_key(room)
    }

    /// The local subscribers of `room`.
    pub fn room(&self, room: &Room) -> Option<Arc<RoomSubscribers>> {
        self.shards[shard_of(room)].read().get(room).cloned()
    }

    /// Rooms with local subscribers.
    pub fn room_count(&self) -> usize {
        self.shards.iter().map(|s| s.read().len()).sum()
    }

    /// Every room with local subscribers.
    pub fn rooms(&self) -> Vec<Room> {
        self.shards.iter().flat_map(|s| s.read().keys().cloned().collect::<Vec<_>>()).collect()
    }

    /// Counts a session in or out (for metrics and `info`).
    pub fn session_opened(&self) {
        self.sessions.fetch_add(1, Ordering::Relaxed);
    }
    pub fn session_closed(&self) {
        self.sessions.fetch_sub(1, Ordering::Relaxed);
    }
    pub fn session_count(&self) -> usize {
        self.sessions.load(Ordering::Relaxed)
    }

    /// Counts a connection of `user` in, unless the user has `max` already (0: no
    /// limit). Per node; the cluster-wide count needs the cluster's presence of nodes.
    pub fn try_add_user(&self, user: &Arc<str>, max: usize) -> bool {
        let mut users = self.users.lock();
        let n = users.entry(user.clone()).or_insert(0);
        if max != 0 && *n >= max {
            if *n == 0 {
                users.remove(user);
            }
            return false;
        }
        *n += 1;
        true
    }

    /// Counts a connection of `user` out.
    pub fn remove_user(&self, user: &str) {
        let mut users = self.users.lock();
        if let Some(n) = users.get_mut(user) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                users.remove(user);
            }
        }
    }

    /// Indexes a connected session under its user (nothing for anonymous sessions).
    pub fn index_user(&self, session: &Arc<SessionHandle>) {
        if session.user.is_empty() {
            return;
        }
        let mut shard = self.by_user[user_shard_of(&session.user)].write();
        shard.entry(session.user.clone()).or_default().push(session.clone());
    }

    /// Removes a session from the user index.
    pub fn unindex_user(&self, user: &str, client: &str) {
        if user.is_empty() {
            return;
        }
        let mut shard = self.by_user[user_shard_of(user)].write();
        if let Some(list) = shard.get_mut(user) {
            list.retain(|s| &*s.client != client);
            if list.is_empty() {
                shard.remove(user);
            }
        }
    }

    /// This node's connected sessions of `user`.
    pub fn sessions_of(&self, user: &str) -> Vec<Arc<SessionHandle>> {
        self.by_user[user_shard_of(user)].read().get(user).cloned().unwrap_or_default()
    }

    /// Connections of `user` on this node.
    pub fn user_connections(&self, user: &str) -> usize {
        self.users.lock().get(user).copied().unwrap_or(0)
    }

    /// Delivers one event to the room's local subscribers except `skip`, encoding it at
    /// most once per encoding.
    fn fan_out(&self, room: &Room, msg: &ServerMessage, pos: Option<StreamPos>, skip: Option<&str>) -> usize {
        let Some(rs) = self.room(room) else {
            return 0;
        };
        let mut lazy = Lazy::new(msg);
        let mut delivered = 0;
        let mut subs = rs.subs.lock();
        for sub in subs.iter_mut() {
            if skip.is_some_and(|c| c == &*sub.session.client) {
                continue;
            }
            let Some(enc) = lazy.get(sub.session.encoding) else {
                return delivered;
            };
            match &mut sub.pending {
                Some(p) => {
                    p.bytes += enc.raw().len();
                    if p.bytes > self.pending_limit {
                        // It cannot keep up even before it is live: same as a full queue.
                        sub.session.outbound.close(roomcast_protocol::CloseCode::SlowConsumer);
                        p.events = Vec::new();
                    } else {
                        p.events.push((pos.clone(), enc));
                    }
                }
                None => {
                    if sub.seen.is_some() && pos.is_some() {
                        if covered(&sub.seen, &pos) {
                            continue;
                        }
                        sub.seen = None;
                    }
                    if sub.session.outbound.push(enc) == Pushed::Queued {
                        delivered += 1;
                    }
                }
            }
        }
        delivered
    }

    /// Fans a publication out. Returns how many live subscribers it was queued to.
    pub fn deliver_publication(&self, p: &BrokerPublication) -> usize {
        let Some(rs) = self.room(&p.room) else {
            return 0;
        };
        let msg = ServerMessage::Push(Push::Publication(Publication {
            room: p.room.to_string(),
            offset: p.offset,
            data: p.data.clone(),
            info: p.info.clone(),
        }));
        let pos = match (&p.epoch, p.offset) {
            (Some(e), Some(o)) => Some((Arc::from(e.as_str()), o)),
            _ => None,
        };
        match rs.advance(&pos) {
            Step::Next => {}
            Step::Duplicate => return 0,
            Step::Gap(last) => {
                let closed = rs.close_live();
                let (last_epoch, last_offset) = last.unwrap_or_else(|| (Arc::from(""), 0));
                tracing::warn!(
                    room = %p.room,
                    closed,
                    %last_epoch,
                    last_offset,
                    epoch = p.epoch.as_deref().unwrap_or(""),
                    offset = p.offset.unwrap_or(0),
                    "publications of this room were missed here; its subscribers reconnect and recover"
                );
            }
        }
        self.fan_out(&p.room, &msg, pos, p.skip_client.as_deref())
    }

    /// Fans a join or leave out, to everyone but the member itself.
    pub fn deliver_room_event(&self, room: &Room, event: &RoomEvent) -> usize {
        if !self.has_room(room) {
            return 0;
        }
        let (msg, member) = match event {
            RoomEvent::Join(m) => (Push::Join { room: room.to_string(), member: m.clone() }, m),
            RoomEvent::Leave(m) => (Push::Leave { room: room.to_string(), member: m.clone() }, m),
        };
        self.fan_out(room, &ServerMessage::Push(msg), None, Some(&member.client))
    }

    /// Queues a message to every local subscriber of every room (used on broker
    /// interruption to make clients resynchronise).
    pub fn for_each_subscriber(&self, mut f: impl FnMut(&Room, &Arc<SessionHandle>)) {
        for shard in self.shards.iter() {
            let rooms: Vec<Arc<RoomSubscribers>> = shard.read().values().cloned().collect();
            for rs in rooms {
                for s in rs.subs.lock().iter() {
                    f(&rs.room, &s.session);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use roomcast_protocol::{Data, decode_server_messages};

    fn handle(client: &str, enc: Encoding) -> Arc<SessionHandle> {
        Arc::new(SessionHandle::new(client.into(), "".into(), enc, Outbound::new(1 << 20)).0)
    }

    #[test]
    fn user_index_and_action_queue() {
        let (hub, _rx) = Hub::new(1 << 20);
        let mk = |c: &str, u: &str| {
            let (h, rx) = SessionHandle::new(c.into(), u.into(), Encoding::Json, Outbound::new(1 << 20));
            (Arc::new(h), rx)
        };
        let (a, mut arx) = mk("a", "alice");
        let (b, _brx) = mk("b", "alice");
        let (anon, _) = mk("c", "");
        for h in [&a, &b, &anon] {
            hub.index_user(h);
        }
        assert_eq!(hub.sessions_of("alice").len(), 2);
        assert!(hub.sessions_of("").is_empty(), "anonymous sessions are not addressable");
        hub.unindex_user("alice", "a");
        assert_eq!(hub.sessions_of("alice").iter().map(|s| s.client.to_string()).collect::<Vec<_>>(), ["b"]);
        hub.unindex_user("alice", "b");
        assert!(hub.sessions_of("alice").is_empty());
        let room = Room::parse("r").unwrap();
        for _ in 0..ACTION_QUEUE {
            a.act(SessionAction::Unsubscribe { room: room.clone(), code: 4009, reason: "x".into() });
        }
        assert_eq!(a.outbound.close_requested(), None);
        a.act(SessionAction::Unsubscribe { room: room.clone(), code: 4009, reason: "x".into() });
        assert_eq!(a.outbound.close_requested(), Some(roomcast_protocol::CloseCode::SlowConsumer));
        assert!(matches!(arx.try_recv(), Ok(SessionAction::Unsubscribe { .. })));
    }

    fn publication(room: &Room, offset: u64) -> BrokerPublication {
        let mut p = BrokerPublication::new(room.clone(), Data::from_serialize(&offset).unwrap());
        p.offset = Some(offset);
        p.epoch = Some("e".into());
        p
    }

    fn offsets(h: &SessionHandle) -> Vec<Option<u64>> {
        let (q, _) = h.outbound.take();
        q.iter()
            .flat_map(|e| decode_server_messages(h.encoding, e.raw()).unwrap())
            .map(|m| match m.unwrap() {
                ServerMessage::Push(Push::Publication(p)) => p.offset,
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn pending_subscribers_get_only_newer_events_after_their_reply() {
        let (hub, mut rx) = Hub::new(1 << 20);
        let room = Room::parse("r").unwrap();
        let a = handle("a", Encoding::Json);
        let rs = hub.add(&room, &a).await;
        assert!(matches!(rx.recv().await, Some(ControlOp::Subscribe(_))));
        for o in 1..=5 {
            hub.deliver_publication(&publication(&room, o));
        }
        assert!(a.outbound.is_empty());
        // History said the position is 3: 4 and 5 follow the reply, 1..3 were in it.
        let reply = Encoded::new(bytes::Bytes::from_static(b"{\"type\":\"ping\"}"));
        assert!(hub.activate(&rs, "a", reply, Some(("e", 3))));
        hub.deliver_publication(&publication(&room, 6));
        assert_eq!(offsets(&a), vec![None, Some(4), Some(5), Some(6)]);
    }

    #[tokio::test]
    async fn late_deliveries_covered_by_the_reply_are_dropped() {
        let (hub, _rx) = Hub::new(1 << 20);
        let room = Room::parse("r").unwrap();
        let a = handle("a", Encoding::Msgpack);
        let rs = hub.add(&room, &a).await;
        let reply = Encoded::new(bytes::Bytes::from_static(&[
            0x81, 0xa4, b't', b'y', b'p', b'e', 0xa4, b'p', b'i', b'n', b'g',
        ]));
        // The history read saw offsets up to 5; 4 and 5 reach the node only afterwards.
        assert!(hub.activate(&rs, "a", reply, Some(("e", 5))));
        for o in [4, 5, 6, 7] {
            hub.deliver_publication(&publication(&room, o));
        }
        // A new epoch restarts at 1 and is delivered.
        let mut p = publication(&room, 1);
        p.epoch = Some("f".into());
        hub.deliver_publication(&p);
        assert_eq!(offsets(&a), vec![None, Some(6), Some(7), Some(1)]);
    }

    #[tokio::test]
    async fn duplicates_are_dropped_and_a_gap_closes_live_subscribers() {
        let (hub, _rx) = Hub::new(1 << 20);
        let room = Room::parse("r").unwrap();
        let (a, b) = (handle("a", Encoding::Json), handle("b", Encoding::Json));
        let rs = hub.add(&room, &a).await;
        let reply = Encoded::new(bytes::Bytes::from_static(b"{\"type\":\"ping\"}"));
        hub.activate(&rs, "a", reply, Some(("e", 2)));
        assert_eq!(rs.last_position(), Some((Arc::from("e"), 2)), "starts from what the first was told");
        for o in [3, 4, 3, 4] {
            hub.deliver_publication(&publication(&room, o));
        }
        // `b` is still being set up (pending) when the gap comes: it reads history anyway.
        hub.add(&room, &b).await;
        assert_eq!(hub.deliver_publication(&publication(&room, 7)), 0, "5 and 6 never came");
        assert_eq!(offsets(&a), vec![None, Some(3), Some(4)]);
        assert_eq!(a.outbound.close_requested(), Some(roomcast_protocol::CloseCode::Shutdown));
        assert_eq!(b.outbound.close_requested(), None);
        assert_eq!(rs.last_position(), Some((Arc::from("e"), 7)));
        // A new epoch starting at 1 is no gap.
        let mut p = publication(&room, 1);
        p.epoch = Some("f".into());
        hub.deliver_publication(&p);
        assert_eq!(rs.last_position(), Some((Arc::from("f"), 1)));
    }

    #[tokio::test]
    async fn encodes_once_per_encoding_and_skips() {
        let (hub, _rx) = Hub::new(1 << 20);
        let room = Room::parse("r").unwrap();
        let subs: Vec<_> = (0..4)
            .map(|i| handle(&format!("c{i}"), if i % 2 == 0 { Encoding::Json } else { Encoding::Msgpack }))
            .collect();
        for s in &subs {
            let rs = hub.add(&room, s).await;
            hub.activate(&rs, &s.client, Encoded::new(bytes::Bytes::from_static(b"{}")), None);
            s.outbound.take();
        }
        let mut p = publication(&room, 1);
        p.skip_client = Some("c0".into());
        assert_eq!(hub.deliver_publication(&p), 3);
        let q1 = subs[1].outbound.take().0;
        let q3 = subs[3].outbound.take().0;
        assert!(Arc::ptr_eq(&q1[0], &q3[0]), "one encoding shared by all msgpack subscribers");
        assert!(subs[0].outbound.is_empty());
    }

    #[tokio::test]
    async fn last_leaver_unsubscribes_the_node() {
        let (hub, mut rx) = Hub::new(1 << 20);
        let room = Room::parse("r").unwrap();
        let a = handle("a", Encoding::Json);
        let b = handle("b", Encoding::Json);
        hub.add(&room, &a).await;
        hub.add(&room, &b).await;
        assert!(matches!(rx.recv().await, Some(ControlOp::Subscribe(_))));
        hub.remove(&room, "a").await;
        assert!(rx.try_recv().is_err());
        hub.remove(&room, "b").await;
        assert!(matches!(rx.recv().await, Some(ControlOp::Unsubscribe(r)) if r == room));
        assert_eq!(hub.room_count(), 0);
    }
}
