//! [`MemoryBroker`]: the single-node broker. Rooms' histories live in this process; fan-out
//! is a direct call into the node's handler.
//!
//! Control messages are a direct call into the handler too. Idempotency keys live in one
//! map `(room, key) -> (position, expiry)`, locked across the check, the publication and
//! the insertion (so concurrent calls with one key publish once). Expired keys are dropped
//! by the periodic sweep and when met; the map holds at most [`IDEMPOTENCY_KEYS`] keys:
//! beyond that the key closest to its expiry is forgotten early.

use std::collections::hash_map::{DefaultHasher, Entry};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use rand::Rng;
use roomcast_protocol::{Position, Room};
use tokio::time::Instant;

use crate::{
    Broker, BrokerEventHandler, BrokerPublication, HistoryOptions, HistoryPage, HistoryQuery, Idempotent,
    InvalidRequest, RoomEvent, check_control, check_idempotent,
};

const SHARDS: usize = 64;
/// How long an empty room without history keeps its (tiny) log, so that publishing into
/// it does not allocate each time.
const IDLE_LOG_TTL: Duration = Duration::from_secs(60);
/// How often the background task drops expired logs.
const SWEEP_EVERY: Duration = Duration::from_secs(10);
/// Most idempotency keys remembered at once (all rooms together); beyond that the key
/// closest to its expiry is forgotten early.
pub const IDEMPOTENCY_KEYS: usize = 100_000;

/// The single-node broker. Cloning shares the same rooms.
#[derive(Clone, Default)]
pub struct MemoryBroker {
    inner: Arc<Inner>,
}

struct Inner {
    /// Room logs by room, sharded by the room's hash. A shard lock is held only to find,
    /// insert or sweep a log; each log has its own lock, held while publishing into it.
    shards: Box<[Mutex<Shard>]>,
    /// Where events go; set once by `start`.
    handler: OnceLock<Arc<dyn BrokerEventHandler>>,
    /// Idempotency keys. Locked across a whole idempotent publish; never taken while a
    /// room log's lock is held (order: keys, then log).
    keys: Mutex<IdempotencyKeys>,
}

impl Default for Inner {
    fn default() -> Self {
        Inner {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            handler: OnceLock::new(),
            keys: Mutex::new(IdempotencyKeys::default()),
        }
    }
}

/// Idempotency keys used within their window, with an index by expiry.
#[derive(Default)]
struct IdempotencyKeys {
    /// (room, key) -> (first publication's position, expiry, tie-breaker of the index).
    by_key: HashMap<(Room, String), (Option<Position>, Instant, u64)>,
    by_expiry: BTreeMap<(Instant, u64), (Room, String)>,
    next: u64,
}

impl IdempotencyKeys {
    /// The position of a live key.
    fn get(&mut self, room: &Room, key: &str, now: Instant) -> Option<Option<Position>> {
        let id = (room.clone(), key.to_string());
        let (position, expires, n) = self.by_key.get(&id)?.clone();
        if expires > now {
            return Some(position);
        }
        self.by_key.remove(&id);
        self.by_expiry.remove(&(expires, n));
        None
    }

    fn insert(&mut self, room: Room, key: String, position: Option<Position>, expires: Instant) {
        let n = self.next;
        self.next += 1;
        self.by_expiry.insert((expires, n), (room.clone(), key.clone()));
        if let Some((_, old_expiry, old_n)) = self.by_key.insert((room, key), (position, expires, n)) {
            self.by_expiry.remove(&(old_expiry, old_n));
        }
        while self.by_key.len() > IDEMPOTENCY_KEYS {
            let Some((_, id)) = self.by_expiry.pop_first() else { break };
            self.by_key.remove(&id);
        }
    }

    /// Drops expired keys.
    fn sweep(&mut self, now: Instant) {
        while let Some(entry) = self.by_expiry.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let id = entry.remove();
            self.by_key.remove(&id);
        }
    }

    fn len(&self) -> usize {
        self.by_key.len()
    }
}

/// One shard of the room logs.
type Shard = HashMap<Room, Arc<Mutex<RoomLog>>>;

struct RoomLog {
    epoch: String,
    /// Offset of the last publication of this epoch (0: none yet).
    top: u64,
    /// Kept publications, oldest first, with the time each was published.
    entries: VecDeque<(Instant, BrokerPublication)>,
    /// When the whole log has expired: last publication (or creation) + ttl.
    expires_at: Instant,
    /// Removed from its shard: whoever holds this log must look the room up again.
    dead: bool,
}

/// A short random epoch.
pub fn new_epoch() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut rng = rand::rng();
    (0..8).map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char).collect()
}

impl RoomLog {
    fn new(now: Instant, ttl: Duration) -> Self {
        RoomLog {
            epoch: new_epoch(),
            top: 0,
            entries: VecDeque::new(),
            expires_at: now + ttl.max(IDLE_LOG_TTL),
            dead: false,
        }
    }

    /// Drops expired and surplus publications; starts a new epoch when everything expired.
    fn prune(&mut self, now: Instant, opts: HistoryOptions) {
        if now >= self.expires_at {
            self.epoch = new_epoch();
            self.top = 0;
            self.entries.clear();
            self.expires_at = now + opts.ttl.max(IDLE_LOG_TTL);
            return;
        }
        while let Some((at, _)) = self.entries.front() {
            if *at + opts.ttl <= now || self.entries.len() > opts.size {
                self.entries.pop_front();
            } else {
                break;
            }
        }
    }

    fn position(&self) -> Position {
        Position { offset: self.top, epoch: self.epoch.clone() }
    }

    /// Offset of the oldest kept publication, or `top + 1` when none is kept.
    fn first_kept(&self) -> u64 {
        self.top + 1 - self.entries.len() as u64
    }
}

fn shard_of(room: &Room) -> usize {
    let mut h = DefaultHasher::new();
    room.hash(&mut h);
    (h.finish() as usize) % SHARDS
}

impl MemoryBroker {
    /// A broker with no rooms.
    pub fn new() -> Self {
        Self::default()
    }

    /// The log of `room`, created when absent.
    fn log(&self, room: &Room, ttl: Duration) -> Arc<Mutex<RoomLog>> {
        let mut shard = self.inner.shards[shard_of(room)].lock();
        match shard.entry(room.clone()) {
            Entry::Occupied(e) => e.get().clone(),
            Entry::Vacant(e) => e.insert(Arc::new(Mutex::new(RoomLog::new(Instant::now(), ttl)))).clone(),
        }
    }

    /// Runs `f` on the live log of `room` with its lock held.
    fn with_log<T>(&self, room: &Room, opts: HistoryOptions, f: impl Fn(&mut RoomLog) -> T) -> T {
        loop {
            let log = self.log(room, opts.ttl);
            let mut guard = log.lock();
            if guard.dead {
                continue;
            }
            guard.prune(Instant::now(), opts);
            return f(&mut guard);
        }
    }

    /// Number of rooms with a log (for tests and metrics).
    pub fn room_count(&self) -> usize {
        self.inner.shards.iter().map(|s| s.lock().len()).sum()
    }

    /// Drops every log whose whole history has expired, and expired idempotency keys.
    pub fn sweep(&self) {
        sweep(&self.inner);
    }

    /// Number of idempotency keys remembered (for tests and metrics).
    pub fn idempotency_key_count(&self) -> usize {
        self.inner.keys.lock().len()
    }

    /// Publishes now: assigns the position, appends and fans out with the room's lock held.
    fn publish_now(&self, publication: &BrokerPublication, opts: HistoryOptions) -> Option<Position> {
        let handler = self.inner.handler.get().cloned();
        self.with_log(&publication.room, opts, |log| {
            let now = Instant::now();
            let mut p = publication.clone();
            let position = if opts.enabled() {
                log.top += 1;
                p.offset = Some(log.top);
                p.epoch = Some(log.epoch.clone());
                log.entries.push_back((now, p.clone()));
                if log.entries.len() > opts.size {
                    log.entries.pop_front();
                }
                log.expires_at = now + opts.ttl;
                Some(log.position())
            } else {
                p.offset = None;
                p.epoch = None;
                None
            };
            // Fan out with the room's lock held: delivery order equals offset order.
            if let Some(h) = &handler {
                h.handle_publication(&p);
            }
            position
        })
    }
}

fn sweep(inner: &Inner) {
    let now = Instant::now();
    inner.keys.lock().sweep(now);
    for shard in inner.shards.iter() {
        shard.lock().retain(|_, log| {
            let mut l = log.lock();
            if now >= l.expires_at {
                l.dead = true;
                false
            } else {
                true
            }
        });
    }
}

impl Broker for MemoryBroker {
    type Error = InvalidRequest;

    async fn start(&self, handler: Arc<dyn BrokerEventHandler>) -> Result<(), InvalidRequest> {
        let _ = self.inner.handler.set(handler);
        // The sweeper ends when the broker is dropped.
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        if tokio::runtime::Handle::try_current().is_ok() {
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(SWEEP_EVERY).await;
                    match weak.upgrade() {
                        Some(inner) => sweep(&inner),
                        None => return,
                    }
                }
            });
        }
        Ok(())
    }

    async fn subscribe(&self, _room: &Room) -> Result<(), InvalidRequest> {
        // Every publication of this process reaches the handler: nothing to set up.
        Ok(())
    }

    async fn unsubscribe(&self, _room: &Room) -> Result<(), InvalidRequest> {
        Ok(())
    }

    async fn publish(
        &self,
        publication: BrokerPublication,
        opts: HistoryOptions,
    ) -> Result<Option<Position>, InvalidRequest> {
        Ok(self.publish_now(&publication, opts))
    }

    async fn publish_idempotent(
        &self,
        publication: BrokerPublication,
        opts: HistoryOptions,
        key: &str,
        window: Duration,
    ) -> Result<Idempotent, InvalidRequest> {
        check_idempotent(key, window)?;
        let mut keys = self.inner.keys.lock();
        let now = Instant::now();
        if let Some(position) = keys.get(&publication.room, key, now) {
            return Ok(Idempotent::Duplicate(position));
        }
        // Publishing here cannot fail: the key is taken only once published.
        let position = self.publish_now(&publication, opts);
        keys.insert(publication.room, key.to_string(), position.clone(), now + window);
        Ok(Idempotent::Published(position))
    }

    async fn publish_control(&self, payload: Bytes) -> Result<(), InvalidRequest> {
        check_control(&payload)?;
        if let Some(h) = self.inner.handler.get() {
            h.handle_control(&payload);
        }
        Ok(())
    }

    async fn publish_event(&self, room: &Room, event: RoomEvent) -> Result<(), InvalidRequest> {
        if let Some(h) = self.inner.handler.get() {
            h.handle_room_event(room, &event);
        }
        Ok(())
    }

    async fn history(
        &self,
        room: &Room,
        query: HistoryQuery,
        opts: HistoryOptions,
    ) -> Result<HistoryPage, InvalidRequest> {
        Ok(self.with_log(room, opts, |log| {
            let position = log.position();
            let (after, continuable) = match &query.since {
                None => (0, true),
                Some(since) => {
                    let ok = since.epoch == log.epoch
                        && since.offset <= log.top
                        && since.offset + 1 >= log.first_kept();
                    (since.offset, ok)
                }
            };
            let publications = if !continuable {
                Vec::new()
            } else {
                let selected =
                    log.entries.iter().map(|(_, p)| p).filter(|p| p.offset.is_some_and(|o| o > after));
                let limit = query.limit.unwrap_or(usize::MAX);
                if query.reverse {
                    let all: Vec<_> = selected.collect();
                    all.into_iter().rev().take(limit).cloned().collect()
                } else {
                    selected.take(limit).cloned().collect()
                }
            };
            HistoryPage { position, publications, continuable }
        }))
    }

    async fn remove_history(&self, room: &Room) -> Result<(), InvalidRequest> {
        let removed = self.inner.shards[shard_of(room)].lock().remove(room);
        if let Some(log) = removed {
            log.lock().dead = true;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use roomcast_protocol::Data;

    fn room(n: &str) -> Room {
        Room::parse(n).unwrap()
    }
    fn data(i: u64) -> Data {
        Data::from_serialize(&i).unwrap()
    }
    const H: HistoryOptions = HistoryOptions { size: 3, ttl: Duration::from_secs(60) };

    #[derive(Default)]
    struct Collect(Mutex<Vec<BrokerPublication>>, Mutex<Vec<Vec<u8>>>);
    impl BrokerEventHandler for Collect {
        fn handle_publication(&self, p: &BrokerPublication) {
            self.0.lock().push(p.clone());
        }
        fn handle_room_event(&self, _: &Room, _: &RoomEvent) {}
        fn handle_control(&self, payload: &[u8]) {
            self.1.lock().push(payload.to_vec());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn offsets_are_contiguous_and_history_is_bounded() {
        let b = MemoryBroker::new();
        let h = Arc::new(Collect::default());
        Broker::start(&b, h.clone()).await.unwrap();
        let r = room("a");
        let empty = Broker::history(&b, &r, HistoryQuery::default(), H).await.unwrap();
        assert_eq!(empty.position.offset, 0);
        for i in 1..=5 {
            let p =
                Broker::publish(&b, BrokerPublication::new(r.clone(), data(i)), H).await.unwrap().unwrap();
            assert_eq!(p.offset, i);
            // The epoch seen before the first publication is the one it carries.
            assert_eq!(p.epoch, empty.position.epoch);
        }
        let delivered: Vec<_> = h.0.lock().iter().map(|p| p.offset.unwrap()).collect();
        assert_eq!(delivered, vec![1, 2, 3, 4, 5]);
        let page = Broker::history(&b, &r, HistoryQuery::default(), H).await.unwrap();
        let offs: Vec<_> = page.publications.iter().map(|p| p.offset.unwrap()).collect();
        assert_eq!(offs, vec![3, 4, 5]);
        let rev = HistoryQuery { reverse: true, limit: Some(2), ..Default::default() };
        let page = Broker::history(&b, &r, rev, H).await.unwrap();
        let offs: Vec<_> = page.publications.iter().map(|p| p.offset.unwrap()).collect();
        assert_eq!(offs, vec![5, 4]);
    }

    #[tokio::test(start_paused = true)]
    async fn since_is_all_or_nothing() {
        let b = MemoryBroker::new();
        let r = room("a");
        for i in 1..=5 {
            Broker::publish(&b, BrokerPublication::new(r.clone(), data(i)), H).await.unwrap();
        }
        let epoch = Broker::history(&b, &r, HistoryQuery::default(), H).await.unwrap().position.epoch;
        let since = |offset: u64, epoch: &str| HistoryQuery {
            since: Some(Position { offset, epoch: epoch.to_string() }),
            ..Default::default()
        };
        let ok = Broker::history(&b, &r, since(2, &epoch), H).await.unwrap();
        assert!(ok.continuable);
        assert_eq!(ok.publications.len(), 3);
        let top = Broker::history(&b, &r, since(5, &epoch), H).await.unwrap();
        assert!(top.continuable && top.publications.is_empty());
        let gone = Broker::history(&b, &r, since(1, &epoch), H).await.unwrap();
        assert!(!gone.continuable && gone.publications.is_empty());
        let other = Broker::history(&b, &r, since(4, "other"), H).await.unwrap();
        assert!(!other.continuable);
        let future = Broker::history(&b, &r, since(9, &epoch), H).await.unwrap();
        assert!(!future.continuable);
    }

    #[tokio::test(start_paused = true)]
    async fn expiry_starts_a_new_epoch() {
        let b = MemoryBroker::new();
        let r = room("a");
        let p1 = Broker::publish(&b, BrokerPublication::new(r.clone(), data(1)), H).await.unwrap().unwrap();
        tokio::time::advance(Duration::from_secs(30)).await;
        let p2 = Broker::publish(&b, BrokerPublication::new(r.clone(), data(2)), H).await.unwrap().unwrap();
        assert_eq!((p2.offset, &p2.epoch), (2, &p1.epoch));
        tokio::time::advance(Duration::from_secs(61)).await;
        let p3 = Broker::publish(&b, BrokerPublication::new(r.clone(), data(3)), H).await.unwrap().unwrap();
        assert_eq!(p3.offset, 1);
        assert_ne!(p3.epoch, p1.epoch);
        tokio::time::advance(Duration::from_secs(61)).await;
        b.sweep();
        assert_eq!(b.room_count(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn without_history_there_are_no_offsets() {
        let b = MemoryBroker::new();
        let h = Arc::new(Collect::default());
        Broker::start(&b, h.clone()).await.unwrap();
        let p = Broker::publish(&b, BrokerPublication::new(room("x"), data(1)), HistoryOptions::OFF)
            .await
            .unwrap();
        assert!(p.is_none());
        assert_eq!(h.0.lock()[0].offset, None);
    }

    #[tokio::test(start_paused = true)]
    async fn remove_history_resets_the_epoch() {
        let b = MemoryBroker::new();
        let r = room("a");
        let p1 = Broker::publish(&b, BrokerPublication::new(r.clone(), data(1)), H).await.unwrap().unwrap();
        Broker::remove_history(&b, &r).await.unwrap();
        let p2 = Broker::publish(&b, BrokerPublication::new(r.clone(), data(2)), H).await.unwrap().unwrap();
        assert_eq!(p2.offset, 1);
        assert_ne!(p1.epoch, p2.epoch);
    }

    #[tokio::test(start_paused = true)]
    async fn control_messages_reach_the_handler_in_order() {
        let b = MemoryBroker::new();
        // Before `start` there is nobody to deliver to: dropped, not an error.
        Broker::publish_control(&b, Bytes::from_static(b"early")).await.unwrap();
        let h = Arc::new(Collect::default());
        Broker::start(&b, h.clone()).await.unwrap();
        for i in 0..10u8 {
            Broker::publish_control(&b, Bytes::from(vec![i; 3])).await.unwrap();
        }
        let got = h.1.lock().clone();
        assert_eq!(got, (0..10u8).map(|i| vec![i; 3]).collect::<Vec<_>>());
        let max = Bytes::from(vec![7; crate::MAX_CONTROL_PAYLOAD]);
        Broker::publish_control(&b, max).await.unwrap();
        let too_big = Bytes::from(vec![7; crate::MAX_CONTROL_PAYLOAD + 1]);
        let err = Broker::publish_control(&b, too_big).await.unwrap_err();
        assert_eq!(err, InvalidRequest::ControlTooLarge(crate::MAX_CONTROL_PAYLOAD + 1));
        assert_eq!(h.1.lock().len(), 11);
    }

    const WINDOW: Duration = Duration::from_millis(300);

    #[tokio::test(start_paused = true)]
    async fn idempotent_publish_publishes_once_per_key_room_and_window() {
        let b = MemoryBroker::new();
        let h = Arc::new(Collect::default());
        Broker::start(&b, h.clone()).await.unwrap();
        let (r, other) = (room("idem"), room("idem2"));
        let pub_ = |r: &Room, i| BrokerPublication::new(r.clone(), data(i));
        let first = Broker::publish_idempotent(&b, pub_(&r, 1), H, "k1", WINDOW).await.unwrap();
        let Idempotent::Published(Some(p1)) = first.clone() else { panic!("{first:?}") };
        assert_eq!(p1.offset, 1);
        let again = Broker::publish_idempotent(&b, pub_(&r, 2), H, "k1", WINDOW).await.unwrap();
        assert_eq!(again, Idempotent::Duplicate(Some(p1.clone())));
        // Another room, same key: independent.
        let o = Broker::publish_idempotent(&b, pub_(&other, 3), H, "k1", WINDOW).await.unwrap();
        assert_eq!(o, Idempotent::Published(Some(Position { offset: 1, ..o.position().unwrap().clone() })));
        // Without history: no position either way.
        let off = room("idem-off");
        let a =
            Broker::publish_idempotent(&b, pub_(&off, 4), HistoryOptions::OFF, "k", WINDOW).await.unwrap();
        assert_eq!(a, Idempotent::Published(None));
        let d =
            Broker::publish_idempotent(&b, pub_(&off, 5), HistoryOptions::OFF, "k", WINDOW).await.unwrap();
        assert_eq!(d, Idempotent::Duplicate(None));
        assert_eq!(h.0.lock().iter().filter(|p| p.room == r).count(), 1);
        assert_eq!(h.0.lock().iter().filter(|p| p.room == off).count(), 1);
        let page = Broker::history(&b, &r, HistoryQuery::default(), H).await.unwrap();
        assert_eq!(page.publications.len(), 1);
        assert_eq!(page.publications[0].data, data(1));

        // Once the window passed the key publishes again.
        tokio::time::advance(WINDOW - Duration::from_millis(1)).await;
        let still = Broker::publish_idempotent(&b, pub_(&r, 6), H, "k1", WINDOW).await.unwrap();
        assert_eq!(still, Idempotent::Duplicate(Some(p1.clone())));
        tokio::time::advance(Duration::from_millis(1)).await;
        let later = Broker::publish_idempotent(&b, pub_(&r, 7), H, "k1", WINDOW).await.unwrap();
        assert_eq!(later, Idempotent::Published(Some(Position { offset: 2, epoch: p1.epoch.clone() })));

        // Expired keys are swept.
        assert_eq!(b.idempotency_key_count(), 3);
        tokio::time::advance(WINDOW).await;
        b.sweep();
        assert_eq!(b.idempotency_key_count(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn idempotency_keys_are_validated() {
        let b = MemoryBroker::new();
        let r = room("v");
        let long = "k".repeat(crate::MAX_IDEMPOTENCY_KEY + 1);
        let err =
            Broker::publish_idempotent(&b, BrokerPublication::new(r.clone(), data(1)), H, &long, WINDOW)
                .await
                .unwrap_err();
        assert_eq!(err, InvalidRequest::IdempotencyKey(129));
        let err = Broker::publish_idempotent(&b, BrokerPublication::new(r.clone(), data(1)), H, "", WINDOW)
            .await
            .unwrap_err();
        assert_eq!(err, InvalidRequest::IdempotencyKey(0));
        let err = Broker::publish_idempotent(
            &b,
            BrokerPublication::new(r.clone(), data(1)),
            H,
            "k",
            Duration::ZERO,
        )
        .await
        .unwrap_err();
        assert_eq!(err, InvalidRequest::IdempotencyWindow);
        let max = "é".repeat(64);
        let ok = Broker::publish_idempotent(&b, BrokerPublication::new(r.clone(), data(1)), H, &max, WINDOW)
            .await
            .unwrap();
        assert!(matches!(ok, Idempotent::Published(Some(_))));
        let page = Broker::history(&b, &r, HistoryQuery::default(), H).await.unwrap();
        assert_eq!(page.publications.len(), 1, "refused calls published nothing");
        // Through the dynamic face the reason is still visible.
        let dynb: Arc<dyn crate::DynBroker> = Arc::new(b.clone());
        let err =
            dynb.publish_idempotent(BrokerPublication::new(r, data(1)), H, &long, WINDOW).await.unwrap_err();
        assert_eq!(err.invalid_request(), Some(&InvalidRequest::IdempotencyKey(129)));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_idempotent_publishes_on_two_handles_publish_once() {
        let a = MemoryBroker::new();
        let b = a.clone();
        let h = Arc::new(Collect::default());
        Broker::start(&a, h.clone()).await.unwrap();
        let r = room("race");
        let mut tasks = Vec::new();
        for i in 0..8u64 {
            let broker = if i % 2 == 0 { a.clone() } else { b.clone() };
            let r = r.clone();
            tasks.push(tokio::spawn(async move {
                let p = BrokerPublication::new(r, data(i));
                Broker::publish_idempotent(&broker, p, H, "same", Duration::from_secs(60)).await.unwrap()
            }));
        }
        let mut results = Vec::new();
        for t in tasks {
            results.push(t.await.unwrap());
        }
        let published: Vec<_> = results.iter().filter(|r| matches!(r, Idempotent::Published(_))).collect();
        assert_eq!(published.len(), 1, "{results:?}");
        let first = published[0].position().cloned();
        assert!(first.is_some());
        for r in &results {
            assert_eq!(r.position().cloned(), first);
        }
        let page = Broker::history(&a, &r, HistoryQuery::default(), H).await.unwrap();
        assert_eq!(page.publications.len(), 1);
        assert_eq!(h.0.lock().len(), 1);
    }

    #[test]
    fn idempotency_keys_are_bounded() {
        let mut keys = IdempotencyKeys::default();
        let now = Instant::now();
        let r = room("b");
        for i in 0..IDEMPOTENCY_KEYS + 10 {
            // Later keys expire later, except key 5, which expires first of all.
            let expires = if i == 5 { now } else { now + Duration::from_secs(1 + i as u64) };
            keys.insert(r.clone(), i.to_string(), None, expires);
        }
        assert_eq!(keys.len(), IDEMPOTENCY_KEYS);
        assert_eq!(keys.by_expiry.len(), IDEMPOTENCY_KEYS);
        // Those closest to expiring went first.
        for gone in ["5", "0", "1", "2", "8", "9"] {
            assert!(keys.get(&r, gone, now).is_none(), "{gone}");
        }
        assert!(keys.get(&r, "10", now).is_some());
        assert!(keys.get(&r, &(IDEMPOTENCY_KEYS + 9).to_string(), now).is_some());
    }
}
