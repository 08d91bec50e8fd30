//! [`MemoryBroker`]: the single-node broker. Rooms' histories live in this process; fan-out
//! is a direct call into the node's handler.

use std::collections::hash_map::{DefaultHasher, Entry};
use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use rand::Rng;
use roomcast_protocol::{Position, Room};
use tokio::time::Instant;

use crate::{
    Broker, BrokerEventHandler, BrokerPublication, HistoryOptions, HistoryPage, HistoryQuery, RoomEvent,
};

const SHARDS: usize = 64;
/// How long an empty room without history keeps its (tiny) log, so that publishing into
/// it does not allocate each time.
const IDLE_LOG_TTL: Duration = Duration::from_secs(60);
/// How often the background task drops expired logs.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

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
}

impl Default for Inner {
    fn default() -> Self {
        Inner { shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(), handler: OnceLock::new() }
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

    /// Drops every log whose whole history has expired.
    pub fn sweep(&self) {
        sweep(&self.inner);
    }
}

fn sweep(inner: &Inner) {
    let now = Instant::now();
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
    type Error = Infallible;

    async fn start(&self, handler: Arc<dyn BrokerEventHandler>) -> Result<(), Infallible> {
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

    async fn subscribe(&self, _room: &Room) -> Result<(), Infallible> {
        // Every publication of this process reaches the handler: nothing to set up.
        Ok(())
    }

    async fn unsubscribe(&self, _room: &Room) -> Result<(), Infallible> {
        Ok(())
    }

    async fn publish(
        &self,
        mut publication: BrokerPublication,
        opts: HistoryOptions,
    ) -> Result<Option<Position>, Infallible> {
        let handler = self.inner.handler.get().cloned();
        let room = publication.room.clone();
        let position = self.with_log(&room, opts, |log| {
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
        });
        publication.offset = position.as_ref().map(|p| p.offset);
        Ok(position)
    }

    async fn publish_event(&self, room: &Room, event: RoomEvent) -> Result<(), Infallible> {
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
    ) -> Result<HistoryPage, Infallible> {
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

    async fn remove_history(&self, room: &Room) -> Result<(), Infallible> {
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
    struct Collect(Mutex<Vec<BrokerPublication>>);
    impl BrokerEventHandler for Collect {
        fn handle_publication(&self, p: &BrokerPublication) {
            self.0.lock().push(p.clone());
        }
        fn handle_room_event(&self, _: &Room, _: &RoomEvent) {}
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
}
