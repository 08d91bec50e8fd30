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
//! | `P.control` | control messages (core NATS; every node subscribes at `start`, no queue group) |
//! | `P.idem.<window_ms>.T.K` | the claim of idempotency key `K` (escaped as `T`) in the room, in stream `S_IDEM_<window_ms>` |
//!
//! History size and TTL are per namespace and given with each call, and JetStream keeps
//! `max_msgs_per_subject` and `max_age` per stream, so there is one history stream per
//! distinct (size, TTL) pair, created on first use by whichever node needs it
//! (`max_msgs_per_subject = size`, `max_age = ttl` but at least 100 ms, `allow_direct`, file
//! or memory storage). Each history stream *republishes* (JetStream `RePublish`, server 2.9) every
//! stored message to `P.l.T`.
//!
//! # Control channel
//!
//! [`Broker::publish_control`] is a core publish on `P.control`, at most
//! [`crate::MAX_CONTROL_PAYLOAD`] bytes (and the server's `max_payload`); every node's
//! subscription (made at `start`, confirmed by a round trip, restored by the client after
//! a reconnect) hands each message to [`BrokerEventHandler::handle_control`]. One connection
//! per node keeps one sender's messages in order; nothing is stored.
//!
//! # Idempotent publish: a claim per (room, key)
//!
//! One claim stream per distinct window, created on first use: `S_IDEM_<window_ms>`,
//! subjects `P.idem.<window_ms>.>`, `max_msgs_per_subject = 1`, `max_age` = the window (at
//! least 100 ms). [`Broker::publish_idempotent`]:
//!
//! 1. **Claim**: publish a *pending* claim on the key's subject with
//!    `Nats-Expected-Last-Subject-Sequence: 0`. Only one caller, on any node, gets it stored
//!    while the subject holds a claim.
//! 2. The claimant **publishes** (as `publish`), then **records** the outcome (*published*,
//!    with the position when history is on) on the subject, compare-and-set on its claim's
//!    sequence. When the publish fails, it **releases** the claim (deletes its message), so
//!    a retry may publish.
//! 3. A caller whose claim was refused reads the subject: a *published* claim answers
//!    [`Idempotent::Duplicate`] with its position; a *pending* one is polled until it is
//!    recorded or released, at most one request timeout, after which the call fails
//!    ([`NatsError::IdempotencyPending`]); no claim any more (released or expired) means
//!    claiming again.
//!
//! The claim expires with `max_age` (the record restarts its age: the window may run one
//! publish round trip longer). A node that dies between claim and record leaves the key
//! pending until the window ends: calls with that key fail meanwhile rather than risk
//! publishing twice.
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
//! (and even when the compare-and-set rejects it). Instead the stream republishes each
//! message after storing it, so nodes receive only stored ones. The republish is *not*
//! always in stream order: nats-server 2.9 may hand over the messages of two publishing
//! connections swapped (measured: 18 swaps in 18,000 publications from 6 connections into
//! one subject). So each room's delivery task puts the order back: every republished
//! message names the subject's message before it (`Nats-Last-Sequence`); when one arrives
//! ahead of its predecessors, the task reads the missing ones (at most [`REPAIR_MAX`]) back
//! from the stream by sequence, hands them over first, and drops them when they arrive
//! late. Only a gap it cannot fill (trimmed, expired, too long) reaches the subscriber,
//! which closes its clients so they recover. Rooms without
//! history are plain core publishes on `P.l.T` (no offset); join/leave events too (a
//! different envelope kind), so one subscription per room carries everything.
//!
//! **Subscribe before read**: `subscribe` returns only after the server confirmed the
//! subscription: a request to an inbox nobody listens on, which the server answers "no
//! responders" only after it read the `SUB` sent before it (async-nats' `flush` only
//! empties the client's buffer, it waits for no answer). A publication stored after that
//! is republished to it;
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
//! random epoch. A publisher whose compare-and-set on the marker fails because another node
//! just took the marker's epoch waits (at most a request timeout) for that node's offset 1
//! and continues it, rather than taking the marker's next epoch and maybe storing first.
//!
//! A take writes its marker with the header `Roomcast-Taken: <the epoch it took>`, and the
//! taker clears the header (writes the marker again, compare-and-set) once its offset 1 is
//! stored, or once it knows its epoch will not be used. So a flagged marker means "a start
//! with this epoch is on its way":
//! - a reader that finds the history empty reports the flagged epoch (the one offset 1 will
//!   carry), else the marker's; then it looks at the history once more, and when a start
//!   was stored meanwhile it reads that instead. Readers racing a first publication are told
//!   the epoch the room then has (tested with readers and publishers on three nodes at
//!   once);
//! - a publisher that read the marker *between* another node's take and its offset 1
//!   succeeds in replacing it, but keeps the earlier take's flag (readers go on being told
//!   the epoch that start carries), compares the two markers' server timestamps (no clock
//!   skew), and when the earlier take is younger than the request timeout (or the history's
//!   TTL, when shorter) waits for that start and continues it, or, when it does not come,
//!   starts the room with that same announced epoch itself (concurrent starts with one
//!   epoch race on offset 1: one is stored, the others continue it). The epoch it would
//!   have taken is never used.
//!
//! An older flagged take (its taker died between take and offset 1) is replaced: the next
//! publisher flags and starts with a new epoch, since the dead take's epoch may have been
//! stored and lost since. A reader told the dead take's epoch gets `recovered: false` on its
//! next recovery (never a gap).
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
    Broker, BrokerEventHandler, BrokerPublication, HistoryOptions, HistoryPage, HistoryQuery, Idempotent,
    InvalidRequest, RoomEvent, check_control, check_idempotent,
};

/// Ranges of at most this many publications ending at the newest are read by walking back
/// with direct gets; longer ones through a consumer.
const WALK_MAX: u64 = 16;
/// Compare-and-set attempts of one publish before giving up.
const PUBLISH_ATTEMPTS: u32 = 200;
/// Attempts of one history read that keeps seeing the history change.
const READ_ATTEMPTS: u32 = 5;
/// Attempts of one direct get that is not answered (each within a share of the request
/// timeout).
const DIRECT_GET_ATTEMPTS: u32 = 4;
/// Publications missing from a room's live stream that a node reads back from the history
/// to put them in order; a longer gap is left to the subscribers (they recover).
const REPAIR_MAX: u64 = 64;
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
    #[error("{0}")]
    Invalid(#[from] InvalidRequest),
    #[error("idempotency key {key:?} in {room}: its first publish has not finished; try again later")]
    IdempotencyPending { room: Room, key: String },
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
    /// Idempotency claim streams known to exist, by window in ms.
    claims: Mutex<HashMap<u64, Arc<JsStream>>>,
    /// The task delivering control messages, once `start` subscribed.
    control: Mutex<Option<AbortHandle>>,
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

/// What taking a room's marker epoch for a fresh start gave.
enum Take {
    /// This epoch, for offset 1. `recent_take`: the marker we replaced had itself been
    /// written by a take shortly before (see [`Inner::take_epoch`]), whose offset 1 may still
    /// be on its way: wait for it that long, then start with `epoch` (that take's).
    Took { epoch: String, recent_take: Option<Duration>, marker: TookMarker },
    /// Another node took the marker's epoch first: it is starting the room with it.
    TakenByOther,
    /// The marker changed meanwhile (created by a reader): try again.
    Changed,
}

/// The marker a take wrote: its sequence and the next epoch it holds (to clear the take's
/// flag once the start is stored, or found unneeded).
struct TookMarker {
    seq: u64,
    next: String,
}

/// A room's epoch marker as read.
struct Marker {
    /// Its stream sequence; 0 when there is none.
    seq: u64,
    /// The epoch the room's next fresh start takes; `None`: no marker, or unreadable.
    epoch: Option<String>,
    /// When written by a take: its server timestamp, ns since the Unix epoch.
    taken_at: Option<i128>,
    /// When written by a take: the epoch that take started the room with (its offset 1
    /// may still be on its way). `None` for a take by an older roomcast (header value `1`).
    taken: Option<String>,
}

/// Header on a marker written by a take; its value is the epoch the take started the room
/// with. A take's publisher clears it (writes the marker again without it) once its offset 1
/// is stored, or when it did not need its epoch after all.
const TAKEN_HEADER: &str = "Roomcast-Taken";

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
            claims: Mutex::new(HashMap::new()),
            control: Mutex::new(None),
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

    /// The control subject: every node subscribes to it.
    pub fn control_subject(&self) -> String {
        format!("{}.control", self.inner.config.prefix)
    }

    /// The subject of the claim of idempotency key `key` in `room` for `window`.
    pub fn idempotency_subject(&self, room: &str, key: &str, window: Duration) -> String {
        format!(
            "{}.idem.{}.{}.{}",
            self.inner.config.prefix,
            window_ms(window),
            room_token(room),
            room_token(key)
        )
    }

    /// The claim stream's name for `window`.
    pub fn idempotency_stream_name(&self, window: Duration) -> String {
        format!("{}_IDEM_{}", self.inner.config.stream_prefix, window_ms(window))
    }
}

/// An idempotency window in milliseconds, at least 100 (as history TTLs).
fn window_ms(window: Duration) -> u64 {
    u64::try_from(window.as_millis()).unwrap_or(u64::MAX).max(100)
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

    /// Returns once the server processed everything this connection sent before (so a
    /// subscription made before is in place). A flush is not enough: async-nats' `flush`
    /// only empties the client's write buffer. A request to a fresh inbox nobody listens on
    /// is answered "no responders" by the server itself, after it read what came before.
    async fn round_trip(&self) -> Result<(), NatsError> {
        let probe = self.client.request(self.client.new_inbox(), Bytes::new());
        match tokio::time::timeout(self.config.request_timeout, probe).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => Ok(()),
            Ok(Err(e)) => Err(nats("round trip", e)),
            Err(_) => Err(nats("round trip", "timed out")),
        }
    }

    /// Drops everything cached about the server's state (after a reconnect).
    fn forget_server_state(&self) {
        self.streams.lock().clear();
        self.claims.lock().clear();
        *self.epochs.lock() = None;
        self.cache.lock().clear();
    }

    /// Creates the stream, or takes it as it is when it exists (with other settings, or just
    /// created by another node).
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
                // Another node created the same stream at the same moment: the server (2.9)
                // checks the name before that create registered it and the subjects after,
                // so it reports overlapping subjects. Use it if that is what happened.
                CreateStreamErrorKind::JetStream(err)
                    if err.error_code() == ErrorCode::STREAM_SUBJECT_OVERLAP =>
                {
                    match self.js.get_stream(&name).await {
                        Ok(s) => s.cached_info().config.allow_direct,
                        // Another stream holds these subjects: a real conflict.
                        Err(_) => return Err(nats("create stream", e)),
                    }
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
        let config = self.one_per_subject(
            format!("{}_EPOCHS", self.config.stream_prefix),
            "roomcast: the epoch each room's next fresh history starts with".into(),
            format!("{}.epoch.*", self.config.prefix),
            self.config.epoch_marker_ttl,
        );
        let s = self.create_stream(config, String::new()).await?;
        *self.epochs.lock() = Some(s.clone());
        Ok(s)
    }

    /// A stream keeping the last message of each subject for `max_age` (markers, claims).
    fn one_per_subject(
        &self,
        name: String,
        description: String,
        subject: String,
        max_age: Duration,
    ) -> stream::Config {
        stream::Config {
            name,
            description: Some(description),
            subjects: vec![subject],
            max_messages_per_subject: 1,
            max_age,
            discard: DiscardPolicy::Old,
            storage: self.storage(),
            num_replicas: self.config.replicas,
            allow_direct: true,
            ..Default::default()
        }
    }

    /// The claim stream of a window (in ms).
    async fn claim_stream(&self, window_ms: u64) -> Result<Arc<JsStream>, NatsError> {
        if let Some(s) = self.claims.lock().get(&window_ms) {
            return Ok(s.clone());
        }
        let config = self.one_per_subject(
            format!("{}_IDEM_{window_ms}", self.config.stream_prefix),
            format!("roomcast: idempotency keys used in the last {window_ms} ms"),
            format!("{}.idem.{window_ms}.>", self.config.prefix),
            Duration::from_millis(window_ms),
        );
        let s = self.create_stream(config, String::new()).await?;
        self.claims.lock().insert(window_ms, s.clone());
        Ok(s)
    }

    /// Claims `subject` for this call: `Ok(Ok(seq))` with the claim's sequence, or
    /// `Ok(Err(answer))` when the key was used. See the module documentation.
    async fn claim(
        &self,
        room: &Room,
        key: &str,
        window_ms: u64,
        subject: &str,
    ) -> Result<Result<(Arc<JsStream>, u64), Idempotent>, NatsError> {
        let deadline = Instant::now() + self.config.request_timeout;
        let mut pause = Duration::from_millis(2);
        let pending = codec::encode_claim(&codec::Claim::Pending);
        loop {
            let cs = self.claim_stream(window_ms).await?;
            match self.publish_cas(&cs.name, subject.to_string(), pending.clone(), 0, None).await {
                Ok(Some(seq)) => return Ok(Ok((cs, seq))),
                Ok(None) => {}
                Err(NatsError::StreamMissing(_)) => {
                    self.claims.lock().remove(&window_ms);
                    if Instant::now() >= deadline {
                        return Err(NatsError::StreamMissing(cs.name.clone()));
                    }
                    continue;
                }
                Err(e) => return Err(e),
            }
            // Someone holds the key.
            match self.get(&cs, Get::Last(subject)).await {
                Ok(Some(m)) => match codec::decode_claim(&m.payload) {
                    Ok(codec::Claim::Done(position)) => {
                        let position = position.map(|(offset, epoch)| Position { offset, epoch });
                        return Ok(Err(Idempotent::Duplicate(position)));
                    }
                    Ok(codec::Claim::Pending) => {}
                    Err(e) => {
                        // Not written by this version: the key is taken all the same.
                        tracing::warn!(%subject, error = %e, "undecodable idempotency claim");
                        return Ok(Err(Idempotent::Duplicate(None)));
                    }
                },
                // Released or expired meanwhile: claim again.
                Ok(None) => {}
                Err(NatsError::StreamMissing(_)) => {
                    self.claims.lock().remove(&window_ms);
                }
                Err(e) => return Err(e),
            }
            if Instant::now() >= deadline {
                return Err(NatsError::IdempotencyPending { room: room.clone(), key: key.to_string() });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    /// Records what the claimant's publish gave on its claim.
    async fn record_claim(&self, cs: &JsStream, subject: &str, seq: u64, position: Option<&Position>) {
        let claim = codec::Claim::Done(position.map(|p| (p.offset, p.epoch.clone())));
        let body = codec::encode_claim(&claim);
        for attempt in 1..=3 {
            match self.publish_cas(&cs.name, subject.to_string(), body.clone(), seq, None).await {
                Ok(Some(_)) => return,
                Ok(None) => {
                    // The claim expired and someone claimed the key again: theirs now.
                    tracing::debug!(%subject, "idempotency claim replaced before it was recorded");
                    return;
                }
                Err(e) => {
                    tracing::warn!(%subject, attempt, error = %e, "cannot record an idempotency claim");
                }
            }
        }
    }

    /// Releases the claimant's claim after its publish failed.
    async fn release_claim(&self, cs: &JsStream, subject: &str, seq: u64) {
        if let Err(e) = cs.stream.delete_message(seq).await {
            tracing::warn!(%subject, error = %e, "cannot release an idempotency claim; the key stays used until the window ends");
        }
    }

    /// One message from `stream`, `None` when there is none.
    async fn get(&self, js: &JsStream, what: Get<'_>) -> Result<Option<StreamMessage>, NatsError> {
        let missing = || NatsError::StreamMissing(js.name.clone());
        let stream = &js.stream;
        if js.direct {
            // A 2.9 server sometimes leaves a direct get unanswered when the stream was just
            // created by several nodes at once: ask again (a read), each attempt bounded by
            // a share of the request timeout.
            let per_attempt =
                (self.config.request_timeout / DIRECT_GET_ATTEMPTS).max(Duration::from_millis(100));
            let mut attempt = 0;
            loop {
                attempt += 1;
                let b = stream.direct_get_builder();
                let b = match what {
                    Get::Last(s) => b.last_by_subject(s),
                    Get::Next(s, seq) => b.next_by_subject(s).sequence(seq),
                    Get::Seq(seq) => b.sequence(seq),
                };
                let result = match tokio::time::timeout(per_attempt, b.send()).await {
                    Ok(r) => r,
                    Err(_) if attempt < DIRECT_GET_ATTEMPTS => {
                        tracing::debug!(stream = %js.name, attempt, "direct get unanswered; asking again");
                        continue;
                    }
                    Err(_) => return Err(nats("direct get", "timed out")),
                };
                return match result {
                    Ok(m) => Ok(Some(m)),
                    Err(e) => match e.kind() {
                        DirectGetErrorKind::NotFound => Ok(None),
                        DirectGetErrorKind::ErrorResponse(code, _) if code == StatusCode::NO_RESPONDERS => {
                            Err(missing())
                        }
                        DirectGetErrorKind::TimedOut if attempt < DIRECT_GET_ATTEMPTS => continue,
                        _ => Err(nats("direct get", e)),
                    },
                };
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

    /// Publishes with `Nats-Expected-Last-Subject-Sequence: expected` (and the header `flag`
    /// `(name, value)`, when given). `Ok(None)`: another message came first.
    async fn publish_cas(
        &self,
        stream: &str,
        subject: String,
        body: Bytes,
        expected: u64,
        flag: Option<(&'static str, &str)>,
    ) -> Result<Option<u64>, NatsError> {
        let mut headers = HeaderMap::new();
        headers.insert(NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, expected.to_string().as_str());
        headers.insert(NATS_EXPECTED_STREAM, stream);
        if let Some((name, value)) = flag {
            headers.insert(name, value);
        }
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

    /// The room's marker: its sequence (0: none), epoch (`None`: none or unreadable), and
    /// when it was written by a take, the server time it was stored (ns since the epoch).
    async fn marker(&self, subject: &str) -> Result<Marker, NatsError> {
        let es = self.epoch_stream().await?;
        Ok(match self.get(&es, Get::Last(subject)).await? {
            None => Marker { seq: 0, epoch: None, taken_at: None, taken: None },
            Some(m) => Marker {
                seq: m.sequence,
                epoch: codec::decode_epoch(&m.payload),
                taken_at: m.headers.get(TAKEN_HEADER).map(|_| m.time.unix_timestamp_nanos()),
                taken: m
                    .headers
                    .get(TAKEN_HEADER)
                    .and_then(|v| codec::decode_epoch(v.as_str().as_bytes()))
                    // An older roomcast wrote `1`: no epoch.
                    .filter(|e| e.len() > 1),
            },
        })
    }

    /// The epoch the room's first publication will carry, for a reader that found its
    /// history empty (creating the marker if needed): the epoch of a take whose offset 1 is
    /// on its way, else the one the next fresh start takes.
    async fn peek_epoch(&self, marker_subject: &str) -> Result<String, NatsError> {
        for _ in 0..PUBLISH_ATTEMPTS {
            let m = self.marker(marker_subject).await?;
            if let Some(e) = m.taken.or(m.epoch) {
                return Ok(e);
            }
            let fresh = new_epoch();
            let es = self.epoch_stream().await?;
            let body = Bytes::from(fresh.clone().into_bytes());
            if self.publish_cas(&es.name, marker_subject.to_string(), body, m.seq, None).await?.is_some() {
                return Ok(fresh);
            }
        }
        Err(nats("epoch marker", "too much contention on an epoch marker"))
    }

    /// Takes an epoch for a fresh start, replacing the marker by a new one flagged as
    /// written by a take, and says which epoch offset 1 must carry.
    ///
    /// A publisher that read the marker *after* another node's take but before that node
    /// stored its offset 1 still succeeds in replacing it. Its marker then keeps the earlier
    /// take's flag (readers go on being told the epoch that start carries), and when that take
    /// was stored less than `window` before ours (both server timestamps: no clock skew) the
    /// caller is told to wait (at most `window`) for that start and continue it, or, when it
    /// does not come, to start the room with that same epoch itself (two such starts race on
    /// offset 1 with the same epoch: one is stored, the other continues it). An older take is
    /// presumed dead: the flag is rewritten to the epoch this take starts with. `window` is
    /// the request timeout, or the history's TTL when shorter (an older take's start may have
    /// expired).
    async fn take_epoch(&self, marker_subject: &str, window: Duration) -> Result<Take, NatsError> {
        let m = self.marker(marker_subject).await?;
        let had_epoch = m.epoch.is_some();
        let own = m.epoch.unwrap_or_else(new_epoch);
        // The epoch readers are told while this take is pending.
        let flagged = m.taken.clone().unwrap_or_else(|| own.clone());
        let es = self.epoch_stream().await?;
        let next = new_epoch();
        let body = Bytes::from(next.clone().into_bytes());
        let cas = self
            .publish_cas(
                &es.name,
                marker_subject.to_string(),
                body.clone(),
                m.seq,
                Some((TAKEN_HEADER, &flagged)),
            )
            .await?;
        let Some(seq) = cas else {
            // Only a take replaces an epoch a marker holds: another node took it for this
            // very fresh start.
            return Ok(if had_epoch { Take::TakenByOther } else { Take::Changed });
        };
        let Some(before) = m.taken_at else {
            return Ok(Take::Took { epoch: own, recent_take: None, marker: TookMarker { seq, next } });
        };
        let age = match self.get(&es, Get::Seq(seq)).await? {
            Some(ours) => {
                let ns = ours.time.unix_timestamp_nanos().saturating_sub(before).max(0);
                Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
            }
            // Already replaced again: assume the worst, it was recent.
            None => Duration::ZERO,
        };
        if age < window {
            // The earlier take's start may be on its way: wait for it, else start with the
            // epoch it announced (an older roomcast's flag names none: then ours).
            return Ok(Take::Took {
                epoch: flagged,
                recent_take: Some(window - age),
                marker: TookMarker { seq, next },
            });
        }
        if flagged == own {
            return Ok(Take::Took { epoch: own, recent_take: None, marker: TookMarker { seq, next } });
        }
        // A dead take: announce ours instead (its epoch may have been stored and lost since,
        // so it is never reused).
        let reflag = self
            .publish_cas(&es.name, marker_subject.to_string(), body, seq, Some((TAKEN_HEADER, &own)))
            .await?;
        Ok(match reflag {
            Some(seq) => Take::Took { epoch: own, recent_take: None, marker: TookMarker { seq, next } },
            None => Take::Changed,
        })
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
        let take_window = self.config.request_timeout.min(history.ttl.max(Duration::from_millis(100)));
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
            // The marker this attempt's take wrote, when it took one.
            let mut took = None;
            let (offset, epoch, expected) = match tail {
                Tail::At { offset, epoch, seq } => (offset + 1, epoch, seq),
                Tail::Empty => match self.take_epoch(&marker_subject, take_window).await {
                    Ok(Take::Took { epoch, recent_take, marker }) => {
                        tracing::debug!(%subject, %epoch, ?recent_take, attempt, "fresh start: took an epoch");
                        if let Some(wait) = recent_take
                            && self.wait_for_start(&hs, &subject, wait).await
                        {
                            // The earlier take's offset 1 arrived: continue its epoch (the
                            // one readers were told); ours is never used.
                            self.clear_take(&marker_subject, marker).await;
                            continue;
                        }
                        took = Some(marker);
                        (1, Arc::from(epoch), 0)
                    }
                    Ok(Take::TakenByOther) => {
                        tracing::debug!(%subject, attempt, "fresh start taken by another node: waiting for it");
                        // That node is about to store offset 1 with the epoch readers were
                        // told. Taking the marker's next epoch instead could store first, and
                        // the room would start with an epoch nobody was told: wait for it
                        // (when it does not come, that node failed: take the next one).
                        self.wait_for_start(&hs, &subject, self.config.request_timeout).await;
                        continue;
                    }
                    Ok(Take::Changed) => continue,
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
            match self.publish_cas(&hs.name, subject.clone(), body, expected, None).await {
                Ok(Some(seq)) => {
                    let c = Cached { offset, epoch: epoch.clone(), seq, connects, used: Instant::now() };
                    self.cache.lock().insert(subject, c);
                    if let Some(marker) = took {
                        // Started: readers now find offset 1 in the history itself.
                        self.clear_take(&marker_subject, marker).await;
                    }
                    return Ok(Position { offset, epoch: epoch.to_string() });
                }
                Ok(None) => {
                    tracing::debug!(%subject, offset, %epoch, expected, attempt, "another publication came first");
                    self.uncache(&subject);
                    if let Some(marker) = took {
                        // Another start came first: the epoch we took is never used.
                        self.clear_take(&marker_subject, marker).await;
                    }
                }
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

    /// Clears the flag of the marker our take wrote (when it is still the room's marker): the
    /// start it announced is stored, or will never be.
    async fn clear_take(&self, marker_subject: &str, marker: TookMarker) {
        let cleared = match self.epoch_stream().await {
            Ok(es) => {
                let body = Bytes::from(marker.next.into_bytes());
                self.publish_cas(&es.name, marker_subject.to_string(), body, marker.seq, None).await
            }
            Err(e) => Err(e),
        };
        match cleared {
            Ok(Some(_)) => {}
            // Replaced by another take meanwhile: that one is the room's news now.
            Ok(None) => tracing::debug!(%marker_subject, "epoch marker replaced before its take was cleared"),
            // Readers keep reporting the taken epoch, which is right when the start is stored.
            Err(e) => tracing::debug!(%marker_subject, error = %e, "cannot clear a take of an epoch marker"),
        }
    }

    /// Waits, at most `limit`, until `subject`'s history is not empty; whether it is not.
    async fn wait_for_start(&self, hs: &JsStream, subject: &str, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            match self.tail(hs, subject).await {
                Ok(Tail::Empty) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Ok(Tail::Empty) => return false,
                _ => return true,
            }
        }
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
            // A start stored after the history looked empty (and its take cleared before the
            // marker was read) shows in the history now: read again.
            if matches!(self.tail(hs, &subject).await?, Tail::At { .. }) {
                return Ok(Err(Position { offset: 0, epoch }));
            }
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
                    tracing::debug!(room = %room, since = ?s, ?position, "not continuable: another epoch or a future offset");
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
                    other if after.is_some() => {
                        tracing::debug!(room = %room, offset, ?prev, older = ?other.map(|s| (s.seq, s.offset())), "not continuable: the walk back broke");
                        return page(Vec::new(), false);
                    }
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

    /// Remembers a republished stored message as its room's last one (for publishing).
    fn remember(&self, r: &Republished) {
        let connects = self.connects();
        let mut cache = self.cache.lock();
        let newer = cache.get(&r.subject).is_none_or(|c| c.connects != connects || c.seq < r.seq);
        if newer {
            let c = Cached {
                offset: r.offset,
                epoch: Arc::from(r.epoch.as_str()),
                seq: r.seq,
                connects,
                used: Instant::now(),
            };
            cache.insert(r.subject.clone(), c);
        }
    }

    /// The stored publications of `r`'s room from offset `from` to the one before `r`, in
    /// order, read back along the chain of subject sequences (each message names the one
    /// before it). `None` when they are not all there (trimmed, expired, another epoch),
    /// when there are more than [`REPAIR_MAX`], or when the server does not answer within
    /// the request timeout.
    async fn repair(&self, room: &Room, r: &Republished, from: u64) -> Option<Vec<BrokerPublication>> {
        let count = r.offset.checked_sub(from)?;
        if count == 0 || count > REPAIR_MAX {
            return None;
        }
        let known = self.streams.lock().values().find(|s| s.name == r.stream).cloned();
        let js = match known {
            Some(js) => js,
            None => {
                let stream = self.js.get_stream_no_info(&r.stream).await.ok()?;
                Arc::new(JsStream { name: r.stream.clone(), tag: String::new(), direct: self.direct, stream })
            }
        };
        let walk = async {
            let mut out = Vec::with_capacity(count as usize);
            let mut prev = r.prev;
            for want in (from..r.offset).rev() {
                if prev == 0 {
                    return None;
                }
                let m = self.get(&js, Get::Seq(prev)).await.ok()??;
                let s = Self::stored(room, &r.subject, &m)?;
                if s.offset() != want || s.epoch() != r.epoch {
                    return None;
                }
                prev = s.prev.unwrap_or(0);
                out.push(s.publication);
            }
            out.reverse();
            Some(out)
        };
        tokio::time::timeout(self.config.request_timeout, walk).await.ok().flatten()
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
                Ok(Err(p)) => {
                    tracing::debug!(room = %room, position = ?p, "the history changed while it was read; reading again");
                    position = Some(p);
                }
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
    inner: Weak<Inner>,
) {
    // The last publication handed to the handler: (epoch, offset).
    let mut last: Option<(String, u64)> = None;
    while let Some(msg) = sub.next().await {
        match codec::decode_live(&room, &msg.payload) {
            Ok(codec::Live::Publication(p)) => {
                let republished = match (p.offset, p.epoch.as_deref(), msg.headers.as_ref()) {
                    (Some(offset), Some(epoch), Some(headers)) => Republished::of(offset, epoch, headers),
                    _ => None,
                };
                if let Some(r) = &republished {
                    if let Some(inner) = inner.upgrade() {
                        inner.remember(r);
                    }
                    // The server may hand two publishers' messages over in another order than
                    // it stored them (nats-server 2.9 does): put the room's order back.
                    let missing = match &last {
                        Some((e, o)) if *e == r.epoch && r.offset <= *o => {
                            tracing::debug!(room = %room, offset = r.offset, "dropped a publication delivered late (already repaired)");
                            continue;
                        }
                        Some((e, o)) if *e == r.epoch => (r.offset > o + 1).then_some(o + 1),
                        Some(_) => (r.offset > 1).then_some(1),
                        None => None,
                    };
                    if let (Some(from), Some(inner)) = (missing, inner.upgrade()) {
                        match inner.repair(&room, r, from).await {
                            Some(earlier) => {
                                tracing::debug!(room = %room, from, to = r.offset - 1, "repaired the order of publications from the stream");
                                for e in &earlier {
                                    handler.handle_publication(e);
                                }
                            }
                            // The subscriber sees the gap and acts on it.
                            None => {
                                tracing::debug!(room = %room, from, to = r.offset - 1, "cannot repair a gap from the stream")
                            }
                        }
                    }
                    last = Some((r.epoch.clone(), r.offset));
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

/// What the stream's republish headers say about a stored publication.
struct Republished {
    offset: u64,
    epoch: String,
    /// The history stream and subject it was stored in, and its sequence there.
    stream: String,
    subject: String,
    seq: u64,
    /// The sequence of the subject's message before it (0: none).
    prev: u64,
}

impl Republished {
    fn of(offset: u64, epoch: &str, headers: &HeaderMap) -> Option<Self> {
        Some(Self {
            offset,
            epoch: epoch.to_string(),
            stream: headers.get("Nats-Stream")?.as_str().to_string(),
            subject: headers.get("Nats-Subject")?.as_str().to_string(),
            seq: header_u64(headers, "Nats-Sequence")?,
            prev: header_u64(headers, "Nats-Last-Sequence")
                .or_else(|| header_u64(headers, NATS_EXPECTED_LAST_SUBJECT_SEQUENCE.as_ref()))?,
        })
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
                // answered a request, they are all in place again.
                if inner.round_trip().await.is_err() {
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
        let subscribed = inner.control.lock().as_ref().is_some_and(|t| !t.is_finished());
        if !subscribed {
            let handler = inner.handler.get().ok_or(NatsError::NotStarted)?.clone();
            let mut sub =
                inner.client.subscribe(self.control_subject()).await.map_err(|e| nats("subscribe", e))?;
            let task = tokio::spawn(async move {
                while let Some(msg) = sub.next().await {
                    handler.handle_control(&msg.payload);
                }
            });
            if let Some(old) = inner.control.lock().replace(task.abort_handle()) {
                old.abort();
            }
            // Once the server answered, the subscription is in place.
            inner.round_trip().await?;
        }
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
            let task = tokio::spawn(deliver(room.clone(), sub, handler, Arc::downgrade(inner)));
            if let Some(old) = inner.subs.lock().insert(room.clone(), task.abort_handle()) {
                old.abort();
            }
        }
        // Once the server answered, the subscription is in place.
        inner.round_trip().await
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

    async fn publish_idempotent(
        &self,
        publication: BrokerPublication,
        history: HistoryOptions,
        key: &str,
        window: Duration,
    ) -> Result<Idempotent, NatsError> {
        check_idempotent(key, window)?;
        let inner = &self.inner;
        let subject = self.idempotency_subject(&publication.room, key, window);
        let (cs, seq) = match inner.claim(&publication.room, key, window_ms(window), &subject).await? {
            Ok(claimed) => claimed,
            Err(answer) => return Ok(answer),
        };
        match Broker::publish(self, publication, history).await {
            Ok(position) => {
                inner.record_claim(&cs, &subject, seq, position.as_ref()).await;
                Ok(Idempotent::Published(position))
            }
            Err(e) => {
                inner.release_claim(&cs, &subject, seq).await;
                Err(e)
            }
        }
    }

    async fn publish_control(&self, payload: Bytes) -> Result<(), NatsError> {
        check_control(&payload)?;
        self.inner.client.publish(self.control_subject(), payload).await.map_err(|e| nats("publish", e))
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
