//! [`NatsBroker`]: the broker over NATS with JetStream, for nodes sharing rooms through a
//! NATS server or cluster (server 2.9 or newer: only 2.9 features are used).
//!
//! # Subjects and streams
//!
//! `P` is the subject prefix (default `roomcast`), `S` the stream-name prefix (default
//! `ROOMCAST`), `T` a room's token: the room name with `.` and `_` (and `:` `@` `,`)
//! escaped as `_XX` hex, so that every legal room is one unique, reversible subject token
//! ([`room_token`], [`room_from_token`]).
//!
//! | subject | what |
//! |---|---|
//! | `P.h.<size>_<ttl_ms>.T` | a room's history: one subject per room in stream `S_H_<size>_<ttl_ms>` |
//! | `P.l.T` | a room's live subject: what nodes subscribe to (core NATS) |
//! | `P.epoch.T` | the room's epoch marker, in stream `S_EPOCHS` |
//!
//! History size and TTL are per namespace and given with each call, and JetStream keeps
//! `max_msgs_per_subject` and `max_age` per stream, so there is one history stream per
//! distinct (size, TTL) pair, created on first use by whichever node needs it
//! (`max_msgs_per_subject = size`, `max_age = ttl` but at least 100 ms, `allow_direct`, file
//! or memory storage). Each history stream *republishes* (JetStream `RePublish`, server 2.9) every
//! stored message to `P.l.T`.
//!
//! # Offsets: compare-and-set on the room's subject
//!
//! A publication carries its offset and epoch inside its envelope (a small versioned binary
//! format, see `nats/codec.rs`; the data is kept as JSON). To publish,
//! a node takes the room's last stored message (its offset `n`, epoch `E`, stream sequence
//! `s`; from a local cache when it has one) and publishes offset `n + 1`, epoch `E` with
//! the header `Nats-Expected-Last-Subject-Sequence: s`. The server stores it only if `s`
//! is still the subject's last sequence; otherwise (another node got there first) the node
//! reads the new last message and tries again. So the room's stored messages have
//! offsets 1, 2, 3, … in stream order with no gap and no duplicate, whichever node
//! published them. Publications of one node into one room are serialised locally, so a
//! node never races itself.
//!
//! # Fan-out order
//!
//! Live delivery does **not** use a core subscription on the history subjects: a core
//! subscriber gets a JetStream publish as the server reads it, before the stream stores it
//! (and even when the compare-and-set rejects it), and two publishers' messages may reach
//! it in another order than the stream's. Instead the stream republishes each message
//! after storing it, from one internal sender, in stream order; so every node receives a
//! room's publications exactly in offset order, and only stored ones. Rooms without
//! history are plain core publishes on `P.l.T` (no offset); join/leave events too (a
//! different envelope kind), so one subscription per room carries everything.
//!
//! **Subscribe before read**: `subscribe` returns only after the server confirmed the
//! subscription (flush round trip). A publication stored after that is republished to it;
//! one stored before it is found by a history read started after it.
//!
//! # Epochs
//!
//! Every stored publication carries its epoch, and a publication into a non-empty subject
//! keeps the epoch of the message before it. The epoch changes exactly when the room's
//! subject is empty, which is how JetStream shows lost history: the whole history expired
//! (`max_age`), it was purged (`remove_history`), the stream was deleted, or the server
//! restarted with an empty store. Trimming by size never empties a subject.
//!
//! Which epoch a fresh start takes comes from the room's marker in `S_EPOCHS` (one message
//! per room, `max_age` = `epoch_marker_ttl`, default 24 h): the marker holds the *next*
//! epoch. A history read of an empty room reports the marker's epoch (creating the marker
//! when there is none), so "a room never published reports offset 0 and the epoch its
//! first publication will carry". A publisher that finds the subject empty first replaces
//! the marker by a fresh random epoch with a compare-and-set on the marker's sequence, and
//! only if that succeeded publishes offset 1 in the epoch it took (with
//! `Nats-Expected-Last-Subject-Sequence: 0`). Each marker value is thus used for at most one
//! fresh start, and an epoch is never reused after its history was lost, even when the
//! marker stream survives the history stream; a lost or expired marker only means a new
//! random epoch. (When a subscriber's read of an empty room races the room's very first
//! publication it may be told the marker's next value; its later recovery then fails
//! cleanly with `recovered: false`, never with a gap.)
//!
//! # Reading history
//!
//! By direct get (`allow_direct`; with `replicas > 1`, or `direct_get: false`, the
//! leader-only `STREAM.MSG.GET`, so reads are never behind writes). The last message gives
//! the position (one get for a `subscribe` without recovery). Ranges of up to 16
//! publications ending at the newest (recovery, small `reverse` reads) walk back through
//! the `Nats-Expected-Last-Subject-Sequence` header each message carries; longer ranges
//! locate their first message by a bounded binary search on stream sequences
//! (`next_by_subj`) and read forward with a short-lived ephemeral pull consumer filtered on
//! the room's subject. A read that sees the history change under it (trimmed between two
//! gets) starts again; `since` reads are all or nothing.
//!
//! # Failures
//!
//! async-nats reconnects by itself and restores subscriptions. While disconnected
//! [`Broker::is_ready`] is false. After a reconnect the broker forgets what it cached about
//! the server (streams, last positions), waits until the server confirmed the restored
//! subscriptions, calls [`BrokerEventHandler::handle_interruption`] (events may have been
//! lost) and is ready again; the same call follows a client-side slow-consumer drop.
//! Undecodable messages are logged and dropped; an undecodable *stored* message at the end
//! of a room's history (someone published garbage into `P.h.…`) is purged by the next
//! publisher, which starts a new epoch (an envelope of a *newer* version is left alone and
//! reported as an error instead, for rolling upgrades). Nothing here panics; errors are
//! [`NatsError`].
//!
//! Limits: the local cache of last positions is trusted only on the connection it was
//! made on; a compare-and-set against a stale cache could only succeed if the stream had
//! been deleted and recreated behind a connected node's back *and* the room's last
//! sequence happened to be the same. With a NATS cluster, interest in a new subscription
//! reaches other servers asynchronously, so subscribe-before-read is exact on one server
//! and best effort across routes.

mod codec;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use async_nats::connection::State;
use async_nats::header::{HeaderMap, NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, NATS_EXPECTED_STREAM};
use async_nats::jetstream::consumer::{self, AckPolicy, DeliverPolicy, pull};
use async_nats::jetstream::context::{CreateStreamErrorKind, PublishErrorKind};
use async_nats::jetstream::message::StreamMessage;
use async_nats::jetstream::stream::{
    self, DirectGetErrorKind, DiscardPolicy, RawMessageErrorKind, Republish, StorageType,
};
use async_nats::jetstream::{self, ErrorCode};
use async_nats::{Client, ConnectOptions, Event, StatusCode};
use bytes::Bytes;
use futures_util::StreamExt;
use parking_lot::Mutex;
use rand::Rng;
use roomcast_protocol::{Position, Room};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tokio::time::Instant;

pub use codec::{DecodeError, room_from_token, room_token};

use crate::{
    Broker, BrokerEventHandler, BrokerPublication, HistoryOptions, HistoryPage, HistoryQuery, RoomEvent,
};

/// Ranges of at most this many publications ending at the newest are read by walking back
/// with direct gets; longer ones through a consumer.
const WALK_MAX: u64 = 16;
/// Compare-and-set attempts of one publish before giving up.
const PUBLISH_ATTEMPTS: u32 = 200;
/// Attempts of one history read that keeps seeing the history change.
const READ_ATTEMPTS: u32 = 5;
/// How often idle cache entries and room locks are dropped.
const SWEEP_EVERY: Duration = Duration::from_secs(60);
/// A cached last position unused this long is dropped.
const CACHE_IDLE: Duration = Duration::from_secs(300);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Where JetStream keeps history and markers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NatsStorage {
    /// On disk: history survives a server restart (same epoch).
    #[default]
    File,
    /// In memory: a server restart loses history (new epochs).
    Memory,
}

/// How to reach NATS and lay out subjects and streams.
#[derive(Debug, Clone)]
pub struct NatsBrokerConfig {
    /// `nats://host:port` (or `tls://`); several servers separated by commas.
    pub url: String,
    /// Subject prefix: dot-separated tokens of `A-Z a-z 0-9 _ -`. Default `roomcast`.
    pub prefix: String,
    /// Stream-name prefix: `A-Z a-z 0-9 _ -`. Default `ROOMCAST`.
    pub stream_prefix: String,
    /// Default [`NatsStorage::File`].
    pub storage: NatsStorage,
    /// Stream replicas (1 to 5). Default 1.
    pub replicas: usize,
    /// How long an epoch marker is kept after it was written. Default 24 h.
    pub epoch_marker_ttl: Duration,
    /// Timeout of requests and JetStream acks. Default 5 s.
    pub request_timeout: Duration,
    /// Longest pause between reconnect attempts. Default 2 s.
    pub max_reconnect_delay: Duration,
    /// Connection name shown by the server.
    pub connection_name: Option<String>,
    /// Read history with direct gets (any replica answers). Used only with one replica;
    /// with more, or when false, reads go to the stream leader (`STREAM.MSG.GET`) so they
    /// are never behind writes. Default true.
    pub direct_get: bool,
}

impl NatsBrokerConfig {
    /// Defaults for `url`.
    pub fn new(url: impl Into<String>) -> Self {
        NatsBrokerConfig {
            url: url.into(),
            prefix: "roomcast".into(),
            stream_prefix: "ROOMCAST".into(),
            storage: NatsStorage::File,
            replicas: 1,
            epoch_marker_ttl: Duration::from_secs(24 * 3600),
            request_timeout: Duration::from_secs(5),
            max_reconnect_delay: Duration::from_secs(2),
            connection_name: None,
            direct_get: true,
        }
    }

    fn validate(&self) -> Result<(), NatsError> {
        let name_ok =
            |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !self.prefix.split('.').all(name_ok) {
            return Err(NatsError::Config(format!("invalid subject prefix {:?}", self.prefix)));
        }
        if !name_ok(&self.stream_prefix) {
            return Err(NatsError::Config(format!("invalid stream prefix {:?}", self.stream_prefix)));
        }
        if !(1..=5).contains(&self.replicas) {
            return Err(NatsError::Config("replicas must be 1 to 5".into()));
        }
        if self.request_timeout.is_zero() || self.epoch_marker_ttl.is_zero() {
            return Err(NatsError::Config("timeouts must be greater than 0".into()));
        }
        Ok(())
    }

    fn servers(&self) -> Vec<String> {
        self.url.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_string).collect()
    }
}

/// What can go wrong with the NATS broker.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    #[error("invalid NATS broker configuration: {0}")]
    Config(String),
    #[error("cannot connect to NATS: {0}")]
    Connect(#[source] async_nats::ConnectError),
    #[error("the NATS broker was not started")]
    NotStarted,
    #[error("NATS {op}: {source}")]
    Nats {
        op: &'static str,
        #[source]
        source: BoxError,
    },
    #[error("JetStream stream {0} does not exist")]
    StreamMissing(String),
    #[error("cannot encode the publication: {0}")]
    Encode(#[from] roomcast_protocol::DataError),
    #[error("publishing into {room}: gave up after {attempts} attempts (contention)")]
    Contention { room: Room, attempts: u32 },
    #[error("the history of {0} kept changing while it was read")]
    Unstable(Room),
}

fn nats(op: &'static str, e: impl Into<BoxError>) -> NatsError {
    NatsError::Nats { op, source: e.into() }
}

/// The broker over NATS JetStream. Cloning shares the connection and state.
#[derive(Clone)]
pub struct NatsBroker {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for NatsBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsBroker").field("url", &self.inner.config.url).finish_non_exhaustive()
    }
}

struct Inner {
    config: NatsBrokerConfig,
    client: Client,
    js: jetstream::Context,
    /// Connection count: cached positions are trusted only on the connection they came from.
    stats: Arc<async_nats::Statistics>,
    /// Direct gets where streams allow them (else leader gets).
    direct: bool,
    handler: OnceLock<Arc<dyn BrokerEventHandler>>,
    /// Connection events, taken by `start`.
    events: Mutex<Option<mpsc::UnboundedReceiver<Event>>>,
    /// Connected and resynchronised.
    ready: AtomicBool,
    subs: Mutex<HashMap<Room, AbortHandle>>,
    /// History streams known to exist, by (size, ttl ms).
    streams: Mutex<HashMap<(usize, u64), Arc<JsStream>>>,
    epochs: Mutex<Option<Arc<JsStream>>>,
    /// Last position of rooms' history subjects, by subject.
    cache: Arc<Mutex<HashMap<String, Cached>>>,
    /// Serialises this node's publications into one history subject.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// A stream known to exist. `tag` is `<size>_<ttl_ms>` for history streams.
struct JsStream {
    name: String,
    tag: String,
    /// Read with direct gets (else from the leader).
    direct: bool,
    stream: stream::Stream<()>,
}

#[derive(Clone)]
struct Cached {
    offset: u64,
    epoch: Arc<str>,
    seq: u64,
    connects: u64,
    used: Instant,
}

/// The end of a room's history subject.
enum Tail {
    Empty,
    At {
        offset: u64,
        epoch: Arc<str>,
        seq: u64,
    },
    /// The last stored message is not ours.
    Garbage,
}

/// What to get from a stream.
#[derive(Clone, Copy)]
enum Get<'a> {
    Last(&'a str),
    /// First message of the subject at or after the sequence.
    Next(&'a str, u64),
    Seq(u64),
}

/// A stored publication with its stream sequence.
struct Stored {
    seq: u64,
    prev: Option<u64>,
    publication: BrokerPublication,
}

impl Stored {
    fn offset(&self) -> u64 {
        self.publication.offset.unwrap_or(0)
    }
    fn epoch(&self) -> &str {
        self.publication.epoch.as_deref().unwrap_or("")
    }
}

/// A fresh random epoch: 12 characters of `A-Z a-z 0-9`.
fn new_epoch() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut rng = rand::rng();
    (0..12).map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char).collect()
}

fn header_u64(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get(name).and_then(|v| v.as_str().parse().ok())
}

impl NatsBroker {
    /// Connects to NATS. Streams are created on first use; call [`Broker::start`] next.
    pub async fn connect(config: NatsBrokerConfig) -> Result<Self, NatsError> {
        config.validate()?;
        let servers = config.servers();
        if servers.is_empty() {
            return Err(NatsError::Config("no NATS server URL".into()));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let max_delay = config.max_reconnect_delay;
        let mut options = ConnectOptions::new()
            .event_callback(move |event| {
                let tx = tx.clone();
                async move {
                    let _ = tx.send(event);
                }
            })
            .request_timeout(Some(config.request_timeout))
            .connection_timeout(config.request_timeout)
            .reconnect_delay_callback(move |attempts| {
                let ms = 50u64.saturating_mul(1 << attempts.min(10));
                Duration::from_millis(ms).min(max_delay)
            })
            .max_reconnects(None);
        if let Some(name) = &config.connection_name {
            options = options.name(name);
        }
        let client = options.connect(servers).await.map_err(NatsError::Connect)?;
        let js = jetstream::ContextBuilder::new()
            .timeout(config.request_timeout)
            .ack_timeout(config.request_timeout)
            .build(client.clone());
        let inner = Inner {
            direct: config.direct_get && config.replicas == 1,
            stats: client.statistics(),
            config,
            client,
            js,
            handler: OnceLock::new(),
            events: Mutex::new(Some(rx)),
            ready: AtomicBool::new(false),
            subs: Mutex::new(HashMap::new()),
            streams: Mutex::new(HashMap::new()),
            epochs: Mutex::new(None),
            cache: Arc::new(Mutex::new(HashMap::new())),
            locks: Mutex::new(HashMap::new()),
        };
        Ok(NatsBroker { inner: Arc::new(inner) })
    }

    /// The underlying client (for tests and diagnostics).
    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    /// The live subject of `room`: what this broker subscribes to.
    pub fn live_subject(&self, room: &str) -> String {
        format!("{}.l.{}", self.inner.config.prefix, room_token(room))
    }

    /// The history subject of `room` for the given options.
    pub fn history_subject(&self, room: &str, history: HistoryOptions) -> String {
        format!("{}.h.{}.{}", self.inner.config.prefix, tag_of(history), room_token(room))
    }

    /// The history stream's name for the given options.
    pub fn history_stream_name(&self, history: HistoryOptions) -> String {
        format!("{}_H_{}", self.inner.config.stream_prefix, tag_of(history))
    }

    fn epoch_subject(&self, room: &str) -> String {
        format!("{}.epoch.{}", self.inner.config.prefix, room_token(room))
    }
}

/// The history TTL in milliseconds, at least 100 (JetStream's smallest useful `max_age`).
fn ttl_ms(history: HistoryOptions) -> u64 {
    u64::try_from(history.ttl.as_millis()).unwrap_or(u64::MAX).max(100)
}

fn tag_of(history: HistoryOptions) -> String {
    format!("{}_{}", history.size, ttl_ms(history))
}

impl Inner {
    fn connects(&self) -> u64 {
        self.stats.connects.load(Ordering::Relaxed)
    }

    /// Drops everything cached about the server's state (after a reconnect).
    fn forget_server_state(&self) {
        self.streams.lock().clear();
        *self.epochs.lock() = None;
        self.cache.lock().clear();
    }

    /// Creates the stream, or takes it as it is when it exists with other settings.
    async fn create_stream(&self, config: stream::Config, tag: String) -> Result<Arc<JsStream>, NatsError> {
        let name = config.name.clone();
        let allow_direct = match self.js.create_stream(config).await {
            Ok(s) => s.cached_info().config.allow_direct,
            Err(e) => match e.kind() {
                CreateStreamErrorKind::JetStream(err) if err.error_code() == ErrorCode::STREAM_NAME_EXIST => {
                    // Created by another node or an operator with other settings (storage,
                    // replicas): use it.
                    tracing::warn!(stream = %name, "stream exists with another configuration; using it as it is");
                    let s = self.js.get_stream(&name).await.map_err(|e| nats("get stream", e))?;
                    s.cached_info().config.allow_direct
                }
                _ => return Err(nats("create stream", e)),
            },
        };
        let stream = self.js.get_stream_no_info(&name).await.map_err(|e| nats("get stream", e))?;
        Ok(Arc::new(JsStream { name, tag, direct: self.direct && allow_direct, stream }))
    }

    fn storage(&self) -> StorageType {
        match self.config.storage {
            NatsStorage::File => StorageType::File,
            NatsStorage::Memory => StorageType::Memory,
        }
    }

    async fn history_stream(&self, history: HistoryOptions) -> Result<Arc<JsStream>, NatsError> {
        let key = (history.size, ttl_ms(history));
        if let Some(s) = self.streams.lock().get(&key) {
            return Ok(s.clone());
        }
        let tag = tag_of(history);
        let name = format!("{}_H_{}", self.config.stream_prefix, tag);
        let p = &self.config.prefix;
        let subjects = format!("{p}.h.{tag}.*");
        let config = stream::Config {
            name: name.clone(),
            description: Some(format!(
                "roomcast history: {} publications per room for {:?}",
                history.size, history.ttl
            )),
            subjects: vec![subjects.clone()],
            max_messages_per_subject: i64::try_from(history.size).unwrap_or(i64::MAX),
            max_age: Duration::from_millis(key.1),
            discard: DiscardPolicy::Old,
            storage: self.storage(),
            num_replicas: self.config.replicas,
            allow_direct: true,
            republish: Some(Republish {
                source: subjects,
                destination: format!("{p}.l.{{{{wildcard(1)}}}}"),
                headers_only: false,
            }),
            ..Default::default()
        };
        let hs = self.create_stream(config, tag).await?;
        self.streams.lock().insert(key, hs.clone());
        Ok(hs)
    }

    fn forget_history_stream(&self, history: HistoryOptions) {
        self.streams.lock().remove(&(history.size, ttl_ms(history)));
    }

    async fn epoch_stream(&self) -> Result<Arc<JsStream>, NatsError> {
        if let Some(s) = self.epochs.lock().clone() {
            return Ok(s);
        }
        let config = stream::Config {
            name: format!("{}_EPOCHS", self.config.stream_prefix),
            description: Some("roomcast: the epoch each room's next fresh history starts with".into()),
            subjects: vec![format!("{}.epoch.*", self.config.prefix)],
            max_messages_per_subject: 1,
            max_age: self.config.epoch_marker_ttl,
            discard: DiscardPolicy::Old,
            storage: self.storage(),
            num_replicas: self.config.replicas,
            allow_direct: true,
            ..Default::default()
        };
        let s = self.create_stream(config, String::new()).await?;
        *self.epochs.lock() = Some(s.clone());
        Ok(s)
    }

    /// One message from `stream`, `None` when there is none.
    async fn get(&self, js: &JsStream, what: Get<'_>) -> Result<Option<StreamMessage>, NatsError> {
        let missing = || NatsError::StreamMissing(js.name.clone());
        let stream = &js.stream;
        if js.direct {
            let b = stream.direct_get_builder();
            let b = match what {
                Get::Last(s) => b.last_by_subject(s),
                Get::Next(s, seq) => b.next_by_subject(s).sequence(seq),
                Get::Seq(seq) => b.sequence(seq),
            };
            match b.send().await {
                Ok(m) => Ok(Some(m)),
                Err(e) => match e.kind() {
                    DirectGetErrorKind::NotFound => Ok(None),
                    DirectGetErrorKind::ErrorResponse(code, _) if code == StatusCode::NO_RESPONDERS => {
                        Err(missing())
                    }
                    _ => Err(nats("direct get", e)),
                },
            }
        } else {
            let b = stream.raw_message_builder();
            let b = match what {
                Get::Last(s) => b.last_by_subject(s),
                Get::Next(s, seq) => b.next_by_subject(s).sequence(seq),
                Get::Seq(seq) => b.sequence(seq),
            };
            match b.send().await {
                Ok(m) => Ok(Some(m)),
                Err(e) => match e.kind() {
                    RawMessageErrorKind::NoMessageFound => Ok(None),
                    RawMessageErrorKind::JetStream(err)
                        if err.error_code() == ErrorCode::STREAM_NOT_FOUND =>
                    {
                        Err(missing())
                    }
                    _ => Err(nats("get message", e)),
                },
            }
        }
    }

    /// Publishes with `Nats-Expected-Last-Subject-Sequence: expected`. `Ok(None)`: another
    /// message came first.
    async fn publish_cas(
        &self,
        stream: &str,
        subject: String,
        body: Bytes,
        expected: u64,
    ) -> Result<Option<u64>, NatsError> {
        let mut headers = HeaderMap::new();
        headers.insert(NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, expected.to_string().as_str());
        headers.insert(NATS_EXPECTED_STREAM, stream);
        let result = match self.js.publish_with_headers(subject, headers, body).await {
            Ok(ack) => ack.await,
            Err(e) => Err(e),
        };
        match result {
            Ok(ack) => Ok(Some(ack.sequence)),
            Err(e) => match e.kind() {
                PublishErrorKind::WrongLastSequence => Ok(None),
                PublishErrorKind::StreamNotFound => Err(NatsError::StreamMissing(stream.to_string())),
                _ => Err(nats("publish", e)),
            },
        }
    }

    /// The end of `subject`'s history.
    async fn tail(&self, hs: &JsStream, subject: &str) -> Result<Tail, NatsError> {
        Ok(match self.get(hs, Get::Last(subject)).await? {
            None => Tail::Empty,
            Some(m) => match codec::decode_position(&m.payload) {
                Ok((offset, epoch)) => Tail::At { offset, epoch: epoch.into(), seq: m.sequence },
                // Written by a newer roomcast: leave it alone.
                Err(e @ codec::DecodeError::Version(_)) => return Err(nats("read history", e)),
                Err(e) => {
                    tracing::warn!(%subject, seq = m.sequence, error = %e, "undecodable message at the end of a history");
                    Tail::Garbage
                }
            },
        })
    }

    /// The room's marker: its sequence (0: none) and epoch (`None`: none or unreadable).
    async fn marker(&self, subject: &str) -> Result<(u64, Option<String>), NatsError> {
        let es = self.epoch_stream().await?;
        Ok(match self.get(&es, Get::Last(subject)).await? {
            None => (0, None),
            Some(m) => (m.sequence, codec::decode_epoch(&m.payload)),
        })
    }

    /// The epoch a fresh start of the room would take now (creating the marker if needed).
    async fn peek_epoch(&self, marker_subject: &str) -> Result<String, NatsError> {
        for _ in 0..PUBLISH_ATTEMPTS {
            let (seq, epoch) = self.marker(marker_subject).await?;
            if let Some(e) = epoch {
                return Ok(e);
            }
            let fresh = new_epoch();
            let es = self.epoch_stream().await?;
            let body = Bytes::from(fresh.clone().into_bytes());
            if self.publish_cas(&es.name, marker_subject.to_string(), body, seq).await?.is_some() {
                return Ok(fresh);
            }
        }
        Err(nats("epoch marker", "too much contention on an epoch marker"))
    }

    /// Takes the marker's epoch for a fresh start, replacing it by a new one. `None`: another
    /// node changed the marker first.
    async fn take_epoch(&self, marker_subject: &str) -> Result<Option<String>, NatsError> {
        let (seq, epoch) = self.marker(marker_subject).await?;
        let epoch = epoch.unwrap_or_else(new_epoch);
        let es = self.epoch_stream().await?;
        let next = Bytes::from(new_epoch().into_bytes());
        Ok(self.publish_cas(&es.name, marker_subject.to_string(), next, seq).await?.map(|_| epoch))
    }

    fn room_lock(&self, subject: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks.lock().entry(subject.to_string()).or_default().clone()
    }

    fn cached(&self, subject: &str) -> Option<Cached> {
        let connects = self.connects();
        let mut cache = self.cache.lock();
        let c = cache.get_mut(subject)?;
        if c.connects != connects {
            cache.remove(subject);
            return None;
        }
        c.used = Instant::now();
        Some(c.clone())
    }

    fn uncache(&self, subject: &str) {
        self.cache.lock().remove(subject);
    }

    fn sweep(&self) {
        let connects = self.connects();
        let now = Instant::now();
        self.cache.lock().retain(|_, c| c.connects == connects && now.duration_since(c.used) < CACHE_IDLE);
        self.locks.lock().retain(|_, l| Arc::strong_count(l) > 1);
    }

    async fn purge(&self, stream: &stream::Stream<()>, filter: String) -> Result<(), NatsError> {
        match stream.purge().filter(filter).await {
            Ok(_) => Ok(()),
            Err(e) => match e.kind() {
                stream::PurgeErrorKind::JetStream(err) if err.error_code() == ErrorCode::STREAM_NOT_FOUND => {
                    Ok(())
                }
                _ => Err(nats("purge", e)),
            },
        }
    }

    async fn publish_history(
        &self,
        publication: &BrokerPublication,
        history: HistoryOptions,
    ) -> Result<Position, NatsError> {
        let room = &publication.room;
        let mut hs = self.history_stream(history).await?;
        let subject = format!("{}.h.{}.{}", self.config.prefix, hs.tag, room_token(room));
        let marker_subject = format!("{}.epoch.{}", self.config.prefix, room_token(room));
        let lock = self.room_lock(&subject);
        let _serialised = lock.lock().await;
        for attempt in 0..PUBLISH_ATTEMPTS {
            if attempt >= 2 {
                // Other nodes keep winning: back off a little, with jitter.
                let ms = rand::rng().random_range(0..=(1u64 << attempt.min(5)));
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            let connects = self.connects();
            let tail = match self.cached(&subject) {
                Some(c) => Tail::At { offset: c.offset, epoch: c.epoch, seq: c.seq },
                None => match self.tail(&hs, &subject).await {
                    Ok(t) => t,
                    Err(NatsError::StreamMissing(_)) => {
                        self.forget_history_stream(history);
                        hs = self.history_stream(history).await?;
                        continue;
                    }
                    Err(e) => return Err(e),
                },
            };
            let (offset, epoch, expected) = match tail {
                Tail::At { offset, epoch, seq } => (offset + 1, epoch, seq),
                Tail::Empty => match self.take_epoch(&marker_subject).await {
                    Ok(Some(epoch)) => (1, Arc::from(epoch), 0),
                    Ok(None) => continue,
                    Err(NatsError::StreamMissing(_)) => {
                        *self.epochs.lock() = None;
                        continue;
                    }
                    Err(e) => return Err(e),
                },
                Tail::Garbage => {
                    // Not ours: the room's history cannot be continued. Drop it; the next
                    // attempt starts a new epoch.
                    tracing::warn!(%subject, "purging a history that ends with a foreign message");
                    self.purge(&hs.stream, subject.clone()).await?;
                    continue;
                }
            };
            let body = codec::encode_publication(publication, Some((offset, &epoch)))?;
            match self.publish_cas(&hs.name, subject.clone(), body, expected).await {
                Ok(Some(seq)) => {
                    let c = Cached { offset, epoch: epoch.clone(), seq, connects, used: Instant::now() };
                    self.cache.lock().insert(subject, c);
                    return Ok(Position { offset, epoch: epoch.to_string() });
                }
                Ok(None) => self.uncache(&subject),
                Err(NatsError::StreamMissing(_)) => {
                    self.uncache(&subject);
                    self.forget_history_stream(history);
                    hs = self.history_stream(history).await?;
                }
                Err(e) => {
                    self.uncache(&subject);
                    return Err(e);
                }
            }
        }
        Err(NatsError::Contention { room: room.clone(), attempts: PUBLISH_ATTEMPTS })
    }

    /// Decodes a stored message of `room`'s `subject`; `None` when it is not one.
    fn stored(room: &Room, subject: &str, m: &StreamMessage) -> Option<Stored> {
        if m.subject.as_str() != subject {
            return None;
        }
        let publication = match codec::decode_publication(room, &m.payload) {
            Ok(p) if p.offset.is_some() => p,
            _ => return None,
        };
        Some(Stored {
            seq: m.sequence,
            prev: header_u64(&m.headers, NATS_EXPECTED_LAST_SUBJECT_SEQUENCE.as_ref()),
            publication,
        })
    }

    /// Reads one page; `Ok(Err(position))` when the history changed while it was read.
    async fn read_page(
        &self,
        hs: &JsStream,
        room: &Room,
        query: &HistoryQuery,
    ) -> Result<Result<HistoryPage, Position>, NatsError> {
        let subject = format!("{}.h.{}.{}", self.config.prefix, hs.tag, room_token(room));
        let last = match self.get(hs, Get::Last(&subject)).await? {
            Some(m) => {
                if let Err(e @ codec::DecodeError::Version(_)) = codec::decode_position(&m.payload) {
                    return Err(nats("read history", e));
                }
                Self::stored(room, &subject, &m)
            }
            None => None,
        };
        let Some(last) = last else {
            // Nothing kept (or only a foreign message, which the next publisher drops).
            let marker_subject = format!("{}.epoch.{}", self.config.prefix, room_token(room));
            let epoch = match self.peek_epoch(&marker_subject).await {
                Err(NatsError::StreamMissing(_)) => {
                    *self.epochs.lock() = None;
                    self.peek_epoch(&marker_subject).await?
                }
                other => other?,
            };
            let continuable = match &query.since {
                None => true,
                Some(s) => s.offset == 0 && s.epoch == epoch,
            };
            return Ok(Ok(HistoryPage {
                position: Position { offset: 0, epoch },
                publications: Vec::new(),
                continuable,
            }));
        };
        let top = last.offset();
        let position = Position { offset: top, epoch: last.epoch().to_string() };
        let page = |publications: Vec<BrokerPublication>, continuable: bool| {
            Ok(Ok(HistoryPage { position: position.clone(), publications, continuable }))
        };
        // Offsets after `after` are wanted (all kept ones when `None`).
        let after = match &query.since {
            None => None,
            Some(s) => {
                if s.epoch != position.epoch || s.offset > top {
                    return page(Vec::new(), false);
                }
                if s.offset == top {
                    return page(Vec::new(), true);
                }
                Some(s.offset)
            }
        };
        let limit = query.limit.map_or(u64::MAX, |l| l as u64);
        // `since` is continuable when every offset after it is still kept: the oldest kept
        // one is at most `after + 1`.
        if limit == 0 {
            let Some(after) = after else {
                return page(Vec::new(), true);
            };
            if after + 1 == top {
                return page(Vec::new(), true);
            }
            return match self.first(hs, room, &subject, &position).await? {
                Some(f) => page(Vec::new(), f.offset() <= after + 1),
                None => Ok(Err(position)),
            };
        }
        // The wanted range lo..=hi of offsets.
        let mut first = None;
        let (lo, hi) = match (query.reverse, after) {
            (true, _) => (top.saturating_sub(limit - 1).max(after.map_or(1, |a| a + 1)), top),
            (false, Some(a)) => (a + 1, top.min((a + 1).saturating_add(limit - 1))),
            (false, None) => {
                let Some(f) = self.first(hs, room, &subject, &position).await? else {
                    return Ok(Err(position));
                };
                let lo = f.offset();
                first = Some(f);
                (lo, top.min(lo.saturating_add(limit - 1)))
            }
        };
        if lo > hi {
            return page(Vec::new(), true);
        }
        let mut out;
        if hi == top && top - lo < WALK_MAX {
            // Short and ending at the newest: walk back from it.
            if let Some(a) = after.filter(|a| lo > a + 1) {
                // Reverse and limited: check the start of what `since` wants separately.
                match self.first(hs, room, &subject, &position).await? {
                    Some(f) if f.offset() <= a + 1 => {}
                    Some(_) => return page(Vec::new(), false),
                    None => return Ok(Err(position)),
                }
            }
            out = Vec::with_capacity((hi - lo + 1) as usize);
            let mut cur = last;
            loop {
                let (offset, prev) = (cur.offset(), cur.prev);
                out.push(cur);
                if offset <= lo {
                    break;
                }
                let older = match prev {
                    Some(p) if p > 0 => self.get(hs, Get::Seq(p)).await?,
                    _ => None,
                };
                match older.as_ref().and_then(|m| Self::stored(room, &subject, m)) {
                    Some(s) if s.offset() + 1 == offset && s.epoch() == position.epoch => cur = s,
                    // Older ones are gone (trimmed meanwhile): `since` cannot be continued, a
                    // plain read just starts later.
                    _ if after.is_some() => return page(Vec::new(), false),
                    _ => break,
                }
            }
            out.reverse();
        } else {
            let first = match first {
                Some(f) => f,
                None => match self.first(hs, room, &subject, &position).await? {
                    Some(f) => f,
                    None => return Ok(Err(position)),
                },
            };
            let first_offset = first.offset();
            if after.is_some_and(|a| first_offset > a + 1) {
                return page(Vec::new(), false);
            }
            let lo = lo.max(first_offset);
            if lo > hi {
                return page(Vec::new(), true);
            }
            let start = if lo == first_offset {
                Some(first.seq)
            } else {
                self.locate(hs, &subject, lo, (first.seq, first_offset), (last.seq, top)).await?
            };
            let Some(start) = start else {
                return Ok(Err(position));
            };
            match self.read_forward(hs, room, &subject, start, hi - lo + 1, last.seq).await? {
                Some(v) => out = v,
                None => return Ok(Err(position)),
            }
            if out.first().is_none_or(|s| s.offset() != lo) {
                return Ok(Err(position));
            }
        }
        // Exactly lo..=hi (a plain read may start later when older ones were trimmed).
        let expected_first = if after.is_some() { Some(lo) } else { None };
        let contiguous = out.windows(2).all(|w| w[0].offset() + 1 == w[1].offset())
            && out.iter().all(|s| s.epoch() == position.epoch)
            && out.last().is_some_and(|s| s.offset() == hi)
            && expected_first.is_none_or(|f| out.first().is_some_and(|s| s.offset() == f));
        if !contiguous {
            return Ok(Err(position));
        }
        let mut publications: Vec<BrokerPublication> = out.into_iter().map(|s| s.publication).collect();
        if query.reverse {
            publications.reverse();
        }
        page(publications, true)
    }

    /// The oldest kept message of the subject, when it belongs to `position`'s epoch.
    async fn first(
        &self,
        hs: &JsStream,
        room: &Room,
        subject: &str,
        position: &Position,
    ) -> Result<Option<Stored>, NatsError> {
        let m = self.get(hs, Get::Next(subject, 1)).await?;
        Ok(m.and_then(|m| Self::stored(room, subject, &m)).filter(|s| s.epoch() == position.epoch))
    }

    /// The stream sequence of offset `want`, given two known (sequence, offset) points
    /// around it, by binary search on `next_by_subj` gets. `None`: the history changed.
    async fn locate(
        &self,
        hs: &JsStream,
        subject: &str,
        want: u64,
        (first_seq, first_offset): (u64, u64),
        (last_seq, last_offset): (u64, u64),
    ) -> Result<Option<u64>, NatsError> {
        // Offsets are contiguous and sequences increase: each offset step takes at least one
        // sequence, which bounds where `want` can be.
        let mut lo = first_seq + (want - first_offset);
        let mut hi = last_seq.saturating_sub(last_offset - want);
        let mut probe = lo;
        for _ in 0..128 {
            if lo > hi {
                return Ok(None);
            }
            let Some(m) = self.get(hs, Get::Next(subject, probe)).await? else {
                return Ok(None);
            };
            let Ok((offset, _)) = codec::decode_position(&m.payload) else {
                return Ok(None);
            };
            if offset == want {
                return Ok(Some(m.sequence));
            }
            if offset < want {
                lo = m.sequence + (want - offset);
            } else {
                // The first message at or after `probe` is already past `want`.
                hi = hi.min(probe.saturating_sub(1)).min(m.sequence.saturating_sub(offset - want));
            }
            probe = lo + (hi.saturating_sub(lo)) / 2;
        }
        Ok(None)
    }

    /// Reads `count` messages of `subject` from stream sequence `start` (none after `end`)
    /// through an ephemeral consumer. `None`: the history changed.
    async fn read_forward(
        &self,
        hs: &JsStream,
        room: &Room,
        subject: &str,
        start: u64,
        count: u64,
        end: u64,
    ) -> Result<Option<Vec<Stored>>, NatsError> {
        let config = pull::Config {
            filter_subject: subject.to_string(),
            deliver_policy: DeliverPolicy::ByStartSequence { start_sequence: start },
            ack_policy: AckPolicy::None,
            inactive_threshold: Duration::from_secs(30),
            memory_storage: true,
            num_replicas: 1,
            ..Default::default()
        };
        let consumer: consumer::PullConsumer = match hs.stream.create_consumer(config).await {
            Ok(c) => c,
            Err(e) => match e.kind() {
                stream::ConsumerErrorKind::JetStream(err)
                    if err.error_code() == ErrorCode::STREAM_NOT_FOUND =>
                {
                    return Err(NatsError::StreamMissing(hs.name.clone()));
                }
                _ => return Err(nats("create consumer", e)),
            },
        };
        let name = consumer.cached_info().name.clone();
        let result = self.drain(&consumer, room, subject, count, end).await;
        let stream = hs.stream.clone();
        tokio::spawn(async move {
            // Best effort: the server drops it after `inactive_threshold` anyway.
            let _ = stream.delete_consumer(&name).await;
        });
        result
    }

    async fn drain(
        &self,
        consumer: &consumer::PullConsumer,
        room: &Room,
        subject: &str,
        count: u64,
        end: u64,
    ) -> Result<Option<Vec<Stored>>, NatsError> {
        let mut out: Vec<Stored> = Vec::with_capacity(count.min(4096) as usize);
        while (out.len() as u64) < count {
            let want = (count - out.len() as u64).min(1024) as usize;
            let mut batch = consumer
                .fetch()
                .max_messages(want)
                .expires(self.config.request_timeout)
                .messages()
                .await
                .map_err(|e| nats("fetch", e))?;
            let mut got = 0;
            while let Some(m) = batch.next().await {
                let m = m.map_err(|e| nats("fetch", e))?;
                got += 1;
                let seq = match m.info() {
                    Ok(i) => i.stream_sequence,
                    Err(_) => return Ok(None),
                };
                if seq > end {
                    return Ok(Some(out));
                }
                if m.subject.as_str() != subject {
                    return Ok(None);
                }
                let Ok(publication) = codec::decode_publication(room, &m.payload) else {
                    return Ok(None);
                };
                if publication.offset.is_none() {
                    return Ok(None);
                }
                let prev = m
                    .headers
                    .as_ref()
                    .and_then(|h| header_u64(h, NATS_EXPECTED_LAST_SUBJECT_SEQUENCE.as_ref()));
                out.push(Stored { seq, prev, publication });
                if out.len() as u64 >= count {
                    break;
                }
            }
            if got == 0 {
                break;
            }
        }
        Ok(Some(out))
    }

    async fn history(
        &self,
        room: &Room,
        query: HistoryQuery,
        history: HistoryOptions,
    ) -> Result<HistoryPage, NatsError> {
        let mut position = None;
        for _ in 0..READ_ATTEMPTS {
            let hs = self.history_stream(history).await?;
            match self.read_page(&hs, room, &query).await {
                Ok(Ok(page)) => return Ok(page),
                Ok(Err(p)) => position = Some(p),
                Err(NatsError::StreamMissing(_)) => self.forget_history_stream(history),
                Err(e) => return Err(e),
            }
        }
        match (position, query.since.is_some()) {
            // Trimmed faster than it can be read: what `since` wants is not kept.
            (Some(position), true) => {
                Ok(HistoryPage { position, publications: Vec::new(), continuable: false })
            }
            _ => Err(NatsError::Unstable(room.clone())),
        }
    }

    async fn remove_history(&self, room: &Room) -> Result<(), NatsError> {
        let prefix = format!("{}_H_", self.config.stream_prefix);
        let names: Vec<String> = self
            .js
            .stream_names()
            .filter_map(|r| async move { r.ok() })
            .filter(|n| std::future::ready(n.starts_with(&prefix)))
            .collect()
            .await;
        let token = room_token(room);
        let filter = format!("{}.h.*.{}", self.config.prefix, token);
        for name in names {
            let stream = self.js.get_stream_no_info(&name).await.map_err(|e| nats("get stream", e))?;
            self.purge(&stream, filter.clone()).await?;
        }
        let suffix = format!(".{token}");
        self.cache.lock().retain(|subject, _| !subject.ends_with(&suffix));
        Ok(())
    }
}

/// Delivers one room's live subject to the handler, in order.
async fn deliver(
    room: Room,
    mut sub: async_nats::Subscriber,
    handler: Arc<dyn BrokerEventHandler>,
    cache: Weak<Mutex<HashMap<String, Cached>>>,
    stats: Arc<async_nats::Statistics>,
) {
    while let Some(msg) = sub.next().await {
        match codec::decode_live(&room, &msg.payload) {
            Ok(codec::Live::Publication(p)) => {
                if let (Some(offset), Some(epoch), Some(headers)) = (p.offset, &p.epoch, &msg.headers) {
                    // A republished stored message: remember it as the room's last one.
                    let seq = header_u64(headers, "Nats-Sequence");
                    let subject = headers.get("Nats-Subject").map(|v| v.as_str().to_string());
                    if let (Some(seq), Some(subject), Some(cache)) = (seq, subject, cache.upgrade()) {
                        let connects = stats.connects.load(Ordering::Relaxed);
                        let mut cache = cache.lock();
                        let newer = cache.get(&subject).is_none_or(|c| c.connects != connects || c.seq < seq);
                        if newer {
                            let epoch: Arc<str> = Arc::from(epoch.as_str());
                            cache.insert(
                                subject,
                                Cached { offset, epoch, seq, connects, used: Instant::now() },
                            );
                        }
                    }
                }
                handler.handle_publication(&p);
            }
            Ok(codec::Live::Event(e)) => handler.handle_room_event(&room, &e),
            Err(e) => {
                tracing::warn!(room = %room, subject = %msg.subject, error = %e, "dropped an undecodable message");
            }
        }
    }
}

/// Follows connection events: readiness, and resynchronisation after a reconnect.
async fn watch_connection(inner: Weak<Inner>, mut events: mpsc::UnboundedReceiver<Event>) {
    let mut connected_once = false;
    while let Some(event) = events.recv().await {
        let Some(inner) = inner.upgrade() else {
            return;
        };
        match event {
            Event::Connected => {
                inner.forget_server_state();
                if !connected_once {
                    connected_once = true;
                    inner.ready.store(true, Ordering::SeqCst);
                    continue;
                }
                tracing::info!("NATS connection is back");
                // Subscriptions were re-sent before this event's effects: once the server
                // answered a ping, they are all in place again.
                let flushed = tokio::time::timeout(inner.config.request_timeout, inner.client.flush()).await;
                if !matches!(flushed, Ok(Ok(()))) {
                    continue;
                }
                if let Some(h) = inner.handler.get() {
                    h.handle_interruption();
                }
                inner.ready.store(true, Ordering::SeqCst);
            }
            Event::Disconnected => {
                tracing::warn!("NATS connection lost");
                inner.ready.store(false, Ordering::SeqCst);
                inner.forget_server_state();
            }
            Event::Closed => inner.ready.store(false, Ordering::SeqCst),
            Event::SlowConsumer(sid) => {
                tracing::warn!(sid, "NATS subscription dropped messages (slow consumer)");
                if let Some(h) = inner.handler.get() {
                    h.handle_interruption();
                }
            }
            other => tracing::warn!(event = %other, "NATS event"),
        }
    }
}

impl Broker for NatsBroker {
    type Error = NatsError;

    async fn start(&self, handler: Arc<dyn BrokerEventHandler>) -> Result<(), NatsError> {
        let inner = &self.inner;
        let _ = inner.handler.set(handler);
        inner.epoch_stream().await?;
        if let Some(events) = inner.events.lock().take() {
            if inner.client.connection_state() == State::Connected {
                inner.ready.store(true, Ordering::SeqCst);
            }
            tokio::spawn(watch_connection(Arc::downgrade(inner), events));
            let weak = Arc::downgrade(inner);
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(SWEEP_EVERY).await;
                    match weak.upgrade() {
                        Some(inner) => inner.sweep(),
                        None => return,
                    }
                }
            });
        }
        Ok(())
    }

    async fn subscribe(&self, room: &Room) -> Result<(), NatsError> {
        let inner = &self.inner;
        let handler = inner.handler.get().ok_or(NatsError::NotStarted)?.clone();
        let live = inner.subs.lock().get(room).is_some_and(|t| !t.is_finished());
        if !live {
            let sub =
                inner.client.subscribe(self.live_subject(room)).await.map_err(|e| nats("subscribe", e))?;
            let task = tokio::spawn(deliver(
                room.clone(),
                sub,
                handler,
                Arc::downgrade(&inner.cache),
                inner.stats.clone(),
            ));
            if let Some(old) = inner.subs.lock().insert(room.clone(), task.abort_handle()) {
                old.abort();
            }
        }
        // Once the server answered, the subscription is in place.
        match tokio::time::timeout(inner.config.request_timeout, inner.client.flush()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(nats("flush", e)),
            Err(_) => Err(nats("flush", "timed out")),
        }
    }

    async fn unsubscribe(&self, room: &Room) -> Result<(), NatsError> {
        if let Some(task) = self.inner.subs.lock().remove(room) {
            // Dropping the subscriber unsubscribes.
            task.abort();
        }
        Ok(())
    }

    async fn publish(
        &self,
        publication: BrokerPublication,
        history: HistoryOptions,
    ) -> Result<Option<Position>, NatsError> {
        if !history.enabled() {
            let body = codec::encode_publication(&publication, None)?;
            let subject = self.live_subject(&publication.room);
            self.inner.client.publish(subject, body).await.map_err(|e| nats("publish", e))?;
            return Ok(None);
        }
        self.inner.publish_history(&publication, history).await.map(Some)
    }

    async fn publish_event(&self, room: &Room, event: RoomEvent) -> Result<(), NatsError> {
        let body = codec::encode_event(&event)?;
        self.inner.client.publish(self.live_subject(room), body).await.map_err(|e| nats("publish", e))
    }

    async fn history(
        &self,
        room: &Room,
        query: HistoryQuery,
        history: HistoryOptions,
    ) -> Result<HistoryPage, NatsError> {
        if !history.enabled() {
            return Ok(HistoryPage {
                position: Position { offset: 0, epoch: String::new() },
                publications: Vec::new(),
                continuable: query.since.is_none(),
            });
        }
        self.inner.history(room, query, history).await
    }

    async fn remove_history(&self, room: &Room) -> Result<(), NatsError> {
        self.inner.remove_history(room).await
    }

    fn is_ready(&self) -> bool {
        self.inner.ready.load(Ordering::SeqCst) && self.inner.client.connection_state() == State::Connected
    }
}

impl NatsBroker {
    /// The epoch marker subject of a room (for tests and diagnostics).
    pub fn epoch_marker_subject(&self, room: &str) -> String {
        self.epoch_subject(room)
    }
}
