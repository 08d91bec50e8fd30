//! [`NatsPresence`]: presence in a NATS JetStream key-value bucket, shared by every node
//! (server 2.9 or newer).
//!
//! # Layout
//!
//! One bucket (default `ROOMCAST_PRESENCE`, i.e. stream `KV_ROOMCAST_PRESENCE` on subjects
//! `$KV.ROOMCAST_PRESENCE.>`, created with the usual key-value settings so the `nats kv`
//! tools can inspect it). One key per member: `<room>.<incarnation>.<client>`, each part
//! escaped into one key token (bytes other than `A-Z a-z 0-9 - / =` become `_XX` hex, so
//! `.` `:` `@` `,` `_` are safe and the mapping is one-to-one); the incarnation is the
//! node run that added it. The value is the member as JSON (`client`, `user`, `info`,
//! `room_info`).
//!
//! # Node registry and reaping
//!
//! Each node run writes `_nodes.<incarnation>` (`<connections> <rooms> <node id>`) at
//! every heartbeat (`_n` is never the start of an escaped token, so it cannot clash with a
//! room). Liveness compares the entries' server timestamps with this node's own latest
//! entry, so clocks of the nodes never matter. `reap(timeout)` lists the members of each
//! incarnation silent for longer (filter `$KV.<bucket>.*.<incarnation>.*`) and deletes
//! each with a compare-and-set on the revision it read: of several reapers exactly one
//! succeeds per member, and only it returns that member. The registry entry is then
//! deleted the same way (so a node that came back meanwhile stays).
//!
//! # Expiry
//!
//! Server 2.9 has no per-key TTL, so the bucket's `max_age` is the member TTL (default
//! 30 s) and each node re-writes its own members every TTL/3. A node that dies stops
//! refreshing and its members vanish within the TTL; the contract's "no ghost members".
//! A refresh is a compare-and-set on the revision this node last wrote
//! (`Nats-Expected-Last-Subject-Sequence`), so it can never bring back a member that a
//! concurrent `remove` deleted; a member that expired while its node was cut off (or whose
//! bucket was lost with a server restarted empty) is written again by the next refresh,
//! and a reconnect triggers one at once.
//!
//! # Reads
//!
//! `members` and `stats` list the room's keys with a short-lived ephemeral consumer
//! (`deliver_policy: last_per_subject`, filter `$KV.<bucket>.<room>.*`), skipping
//! delete markers. `add`/`remove` return after JetStream stored them, so any read started
//! later, on any node, sees them. Cost is proportional to the room's members.
//!
//! Refreshing costs one write per member per TTL/3 on each node (a server with per-key
//! TTLs, 2.11+, would not need it). Errors are [`NatsPresenceError`]; nothing panics.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_nats::header::{HeaderMap, NATS_EXPECTED_LAST_SUBJECT_SEQUENCE};
use async_nats::jetstream::consumer::{self, AckPolicy, DeliverPolicy, pull};
use async_nats::jetstream::context::{CreateStreamErrorKind, PublishErrorKind};
use async_nats::jetstream::stream::{self, DirectGetErrorKind, DiscardPolicy, StorageType};
use async_nats::jetstream::{self, ErrorCode};
use async_nats::{Client, ConnectOptions, Event, StatusCode};
use bytes::Bytes;
use futures_util::StreamExt;
use parking_lot::Mutex;
use roomcast_protocol::{Data, Member, Room};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::sync::Notify;

use crate::{NodeInfo, Presence, PresenceStats, Reaped};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const HEX: &[u8; 16] = b"0123456789ABCDEF";
/// Concurrent writes of one refresh round.
const REFRESH_CONCURRENCY: usize = 64;

/// One key token for any string (see the module doc).
pub fn key_token(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'/' | b'=') {
            out.push(b as char);
        } else {
            out.push('_');
            out.push(HEX[(b >> 4) as usize] as char);
            out.push(HEX[(b & 15) as usize] as char);
        }
    }
    if out.is_empty() {
        // An empty client id still needs a token; "_" alone is never an escape.
        out.push('_');
    }
    out
}

/// The string a [`key_token`] was made of; `None` when it is not one.
pub fn key_untoken(t: &str) -> Option<String> {
    if t == "_" {
        return Some(String::new());
    }
    let b = t.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'_' {
            let hex = t.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The registry entry's key prefix (see the module doc).
const NODES: &str = "_nodes";

/// One stored key-value entry read by a scan.
struct Entry {
    /// The key (subject without `$KV.<bucket>.`).
    key: String,
    revision: u64,
    /// Server time it was stored.
    time: async_nats::datetime::DateTime,
    payload: Bytes,
}

/// Where the bucket is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PresenceStorage {
    #[default]
    Memory,
    File,
}

/// How to reach NATS and keep presence.
#[derive(Debug, Clone)]
pub struct NatsPresenceConfig {
    /// `nats://host:port` (or `tls://`); several servers separated by commas.
    pub url: String,
    /// Bucket name (`A-Z a-z 0-9 _ -`). Default `ROOMCAST_PRESENCE`.
    pub bucket: String,
    /// How long a member stays without being refreshed. Default 30 s.
    pub ttl: Duration,
    /// Default memory (presence is rebuilt by refreshes anyway).
    pub storage: PresenceStorage,
    /// Stream replicas (1 to 5). Default 1.
    pub replicas: usize,
    /// Timeout of requests and JetStream acks. Default 5 s.
    pub request_timeout: Duration,
    /// Longest pause between reconnect attempts. Default 2 s.
    pub max_reconnect_delay: Duration,
    /// This node run's incarnation (see [`crate::incarnation_of`]). Default: a random one.
    pub node: String,
}

impl NatsPresenceConfig {
    pub fn new(url: impl Into<String>) -> Self {
        NatsPresenceConfig {
            url: url.into(),
            bucket: "ROOMCAST_PRESENCE".into(),
            ttl: Duration::from_secs(30),
            storage: PresenceStorage::Memory,
            replicas: 1,
            request_timeout: Duration::from_secs(5),
            max_reconnect_delay: Duration::from_secs(2),
            node: crate::incarnation_of(&crate::random_node_id()),
        }
    }
}

/// What can go wrong with NATS presence.
#[derive(Debug, thiserror::Error)]
pub enum NatsPresenceError {
    #[error("invalid NATS presence configuration: {0}")]
    Config(String),
    #[error("cannot connect to NATS: {0}")]
    Connect(#[source] async_nats::ConnectError),
    #[error("NATS {op}: {source}")]
    Nats {
        op: &'static str,
        #[source]
        source: BoxError,
    },
    #[error("the presence bucket does not exist")]
    BucketMissing,
    #[error("cannot encode the member: {0}")]
    Encode(String),
}

fn nats(op: &'static str, e: impl Into<BoxError>) -> NatsPresenceError {
    NatsPresenceError::Nats { op, source: e.into() }
}

/// Presence in a JetStream key-value bucket. Cloning shares the connection; the refresher
/// stops when the last clone is dropped (its members then expire after the TTL).
#[derive(Clone)]
pub struct NatsPresence {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for NatsPresence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsPresence").field("bucket", &self.inner.config.bucket).finish_non_exhaustive()
    }
}

struct Inner {
    config: NatsPresenceConfig,
    client: Client,
    js: jetstream::Context,
    stream_name: String,
    /// The bucket's stream, once known to exist.
    stream: Mutex<Option<stream::Stream<()>>>,
    /// This node's members by key, refreshed until removed.
    mine: Mutex<HashMap<String, Mine>>,
    next_id: AtomicU64,
    /// Asks the refresher for a round now (after a reconnect).
    refresh_now: Arc<Notify>,
}

#[derive(Clone)]
struct Mine {
    /// Changes with every `add`, so a refresh of an older `add` knows it is stale.
    id: u64,
    value: Bytes,
    /// The revision this node last wrote.
    revision: u64,
}

#[derive(Serialize)]
struct MemberOut<'a> {
    client: &'a str,
    user: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    info: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    room_info: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct MemberIn {
    client: String,
    user: String,
    #[serde(default)]
    info: Option<Box<RawValue>>,
    #[serde(default)]
    room_info: Option<Box<RawValue>>,
}

fn raw(d: &Data) -> Result<&RawValue, NatsPresenceError> {
    let json = d.json().map_err(|e| NatsPresenceError::Encode(e.to_string()))?;
    let text = std::str::from_utf8(json).map_err(|e| NatsPresenceError::Encode(e.to_string()))?;
    serde_json::from_str::<&RawValue>(text).map_err(|e| NatsPresenceError::Encode(e.to_string()))
}

fn encode_member(m: &Member) -> Result<Bytes, NatsPresenceError> {
    let out = MemberOut {
        client: &m.client,
        user: &m.user,
        info: m.info.as_ref().map(raw).transpose()?,
        room_info: m.room_info.as_ref().map(raw).transpose()?,
    };
    serde_json::to_vec(&out).map(Bytes::from).map_err(|e| NatsPresenceError::Encode(e.to_string()))
}

fn decode_member(payload: &[u8]) -> Option<Member> {
    let m: MemberIn = serde_json::from_slice(payload).ok()?;
    let data = |r: Option<Box<RawValue>>| match r {
        None => Ok(None),
        Some(r) => Data::from_json(Bytes::from(r.get().to_string())).map(Some),
    };
    Some(Member {
        client: m.client,
        user: m.user,
        info: data(m.info).ok()?,
        room_info: data(m.room_info).ok()?,
    })
}

/// Whether a stored key-value message is a delete or purge marker.
fn is_delete(headers: Option<&HeaderMap>) -> bool {
    headers.and_then(|h| h.get("KV-Operation")).is_some_and(|v| matches!(v.as_str(), "DEL" | "PURGE"))
}

impl NatsPresence {
    /// Connects, creates the bucket when missing and starts refreshing.
    pub async fn connect(config: NatsPresenceConfig) -> Result<Self, NatsPresenceError> {
        let name_ok = !config.bucket.is_empty()
            && config.bucket.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !name_ok {
            return Err(NatsPresenceError::Config(format!("invalid bucket name {:?}", config.bucket)));
        }
        if config.ttl < Duration::from_millis(300) {
            return Err(NatsPresenceError::Config("ttl must be at least 300 ms".into()));
        }
        if !(1..=5).contains(&config.replicas) || config.request_timeout.is_zero() {
            return Err(NatsPresenceError::Config("replicas must be 1 to 5 and timeouts positive".into()));
        }
        let servers: Vec<String> =
            config.url.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_string).collect();
        if servers.is_empty() {
            return Err(NatsPresenceError::Config("no NATS server URL".into()));
        }
        let weak_slot: Arc<Mutex<Weak<Inner>>> = Arc::new(Mutex::new(Weak::new()));
        let slot = weak_slot.clone();
        let max_delay = config.max_reconnect_delay;
        let client = ConnectOptions::new()
            .event_callback(move |event| {
                let slot = slot.clone();
                async move {
                    if matches!(event, Event::Connected)
                        && let Some(inner) = slot.lock().upgrade()
                    {
                        // The bucket may be gone (server restarted empty): look again
                        // and write our members back.
                        *inner.stream.lock() = None;
                        inner.refresh_now.notify_one();
                    }
                }
            })
            .request_timeout(Some(config.request_timeout))
            .connection_timeout(config.request_timeout)
            .reconnect_delay_callback(move |attempts| {
                Duration::from_millis(50u64.saturating_mul(1 << attempts.min(10))).min(max_delay)
            })
            .max_reconnects(None)
            .connect(servers)
            .await
            .map_err(NatsPresenceError::Connect)?;
        let js = jetstream::ContextBuilder::new()
            .timeout(config.request_timeout)
            .ack_timeout(config.request_timeout)
            .build(client.clone());
        let inner = Arc::new(Inner {
            stream_name: format!("KV_{}", config.bucket),
            config,
            client,
            js,
            stream: Mutex::new(None),
            mine: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            refresh_now: Arc::new(Notify::new()),
        });
        *weak_slot.lock() = Arc::downgrade(&inner);
        inner.bucket().await?;
        tokio::spawn(refresher(Arc::downgrade(&inner), inner.refresh_now.clone(), inner.config.ttl / 3));
        Ok(NatsPresence { inner })
    }

    /// The underlying client (for tests and diagnostics).
    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    /// Members this node keeps alive.
    pub fn local_member_count(&self) -> usize {
        self.inner.mine.lock().len()
    }
}

impl Inner {
    fn subject(&self, key: &str) -> String {
        format!("$KV.{}.{}", self.config.bucket, key)
    }

    fn key(&self, room: &Room, client: &str) -> String {
        format!("{}.{}.{}", key_token(room), key_token(&self.config.node), key_token(client))
    }

    async fn bucket(&self) -> Result<stream::Stream<()>, NatsPresenceError> {
        if let Some(s) = self.stream.lock().clone() {
            return Ok(s);
        }
        let config = stream::Config {
            name: self.stream_name.clone(),
            description: Some("roomcast presence: one key per (room, client)".into()),
            subjects: vec![format!("$KV.{}.>", self.config.bucket)],
            max_messages_per_subject: 1,
            max_age: self.config.ttl,
            discard: DiscardPolicy::New,
            storage: match self.config.storage {
                PresenceStorage::Memory => StorageType::Memory,
                PresenceStorage::File => StorageType::File,
            },
            num_replicas: self.config.replicas,
            allow_rollup: true,
            deny_delete: true,
            allow_direct: true,
            duplicate_window: self.config.ttl.min(Duration::from_secs(120)),
            ..Default::default()
        };
        match self.js.create_stream(config).await {
            Ok(_) => {}
            Err(e) => match e.kind() {
                CreateStreamErrorKind::JetStream(err) if err.error_code() == ErrorCode::STREAM_NAME_EXIST => {
                    tracing::warn!(stream = %self.stream_name, "presence bucket exists with another configuration (TTL?); using it as it is");
                }
                // Another node created the bucket at the same moment: the server (2.9) checks
                // the name before that create registered it and the subjects after. The
                // bucket is read below; when it does not exist, report this error.
                CreateStreamErrorKind::JetStream(err)
                    if err.error_code() == ErrorCode::STREAM_SUBJECT_OVERLAP =>
                {
                    if self.js.get_stream(&self.stream_name).await.is_err() {
                        return Err(nats("create bucket", e));
                    }
                }
                _ => return Err(nats("create bucket", e)),
            },
        }
        let s = self.js.get_stream_no_info(&self.stream_name).await.map_err(|e| nats("get bucket", e))?;
        *self.stream.lock() = Some(s.clone());
        Ok(s)
    }

    /// Writes `value` at `key`, with a compare-and-set on `expected` when given. `Ok(None)`:
    /// the key's revision was not `expected`.
    async fn write(
        &self,
        key: &str,
        value: Bytes,
        headers: HeaderMap,
        expected: Option<u64>,
    ) -> Result<Option<u64>, NatsPresenceError> {
        let mut headers = headers;
        if let Some(e) = expected {
            headers.insert(NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, e.to_string().as_str());
        }
        let result = match self.js.publish_with_headers(self.subject(key), headers, value).await {
            Ok(ack) => ack.await,
            Err(e) => Err(e),
        };
        match result {
            Ok(ack) => Ok(Some(ack.sequence)),
            Err(e) => match e.kind() {
                PublishErrorKind::WrongLastSequence => Ok(None),
                PublishErrorKind::StreamNotFound => {
                    *self.stream.lock() = None;
                    Err(NatsPresenceError::BucketMissing)
                }
                _ => Err(nats("write", e)),
            },
        }
    }

    /// Writes, creating the bucket again when it was lost.
    async fn write_retrying(
        &self,
        key: &str,
        value: Bytes,
        headers: HeaderMap,
        expected: Option<u64>,
    ) -> Result<Option<u64>, NatsPresenceError> {
        match self.write(key, value.clone(), headers.clone(), expected).await {
            Err(NatsPresenceError::BucketMissing) => {
                self.bucket().await?;
                self.write(key, value, headers, expected).await
            }
            other => other,
        }
    }

    /// The key's last stored message: its revision and whether it is a delete marker.
    async fn last(&self, key: &str) -> Result<Option<(u64, bool)>, NatsPresenceError> {
        let s = self.bucket().await?;
        match s.direct_get_builder().last_by_subject(self.subject(key)).send().await {
            Ok(m) => Ok(Some((m.sequence, is_delete(Some(&m.headers))))),
            Err(e) => match e.kind() {
                DirectGetErrorKind::NotFound => Ok(None),
                DirectGetErrorKind::ErrorResponse(code, _) if code == StatusCode::NO_RESPONDERS => {
                    *self.stream.lock() = None;
                    Err(NatsPresenceError::BucketMissing)
                }
                _ => Err(nats("get", e)),
            },
        }
    }

    /// Re-writes one of this node's members unless it was replaced or removed meanwhile.
    async fn refresh_one(&self, key: &str, id: u64) -> Result<(), NatsPresenceError> {
        for _ in 0..4 {
            let Some(m) = self.mine.lock().get(key).filter(|m| m.id == id).cloned() else {
                return Ok(());
            };
            match self.write_retrying(key, m.value.clone(), HeaderMap::new(), Some(m.revision)).await? {
                Some(revision) => {
                    if let Some(m) = self.mine.lock().get_mut(key).filter(|m| m.id == id) {
                        m.revision = m.revision.max(revision);
                    }
                    return Ok(());
                }
                None => {
                    // Expired (nothing stored: write it again) or deleted by a concurrent
                    // remove (a delete marker: leave it).
                    let expected = match self.last(key).await? {
                        None => 0,
                        Some((_, true)) => {
                            // Removed (possibly through another node): stop refreshing it.
                            let mut mine = self.mine.lock();
                            if mine.get(key).is_some_and(|m| m.id == id) {
                                mine.remove(key);
                            }
                            return Ok(());
                        }
                        Some((revision, false)) => revision,
                    };
                    match self.mine.lock().get_mut(key).filter(|m| m.id == id) {
                        Some(m) => m.revision = expected,
                        None => return Ok(()),
                    }
                }
            }
        }
        Ok(())
    }

    async fn refresh_all(self: &Arc<Self>) {
        let keys: Vec<(String, u64)> = self.mine.lock().iter().map(|(k, m)| (k.clone(), m.id)).collect();
        let mut failed = 0usize;
        let mut results = futures_util::stream::iter(keys)
            .map(|(key, id)| {
                let inner = self.clone();
                async move { inner.refresh_one(&key, id).await }
            })
            .buffer_unordered(REFRESH_CONCURRENCY);
        while let Some(r) = results.next().await {
            if let Err(e) = r {
                failed += 1;
                if failed == 1 {
                    tracing::warn!(error = %e, "presence refresh failed");
                }
            }
        }
    }

    /// The room's live members.
    async fn list(&self, room: &Room, stop_after: usize) -> Result<Vec<Member>, NatsPresenceError> {
        let filter = format!("$KV.{}.{}.*.*", self.config.bucket, key_token(room));
        let entries = self.scan(filter, stop_after).await?;
        let mut members = Vec::with_capacity(entries.len());
        for e in entries {
            match decode_member(&e.payload) {
                Some(member) => members.push(member),
                None => tracing::warn!(key = %e.key, "undecodable presence entry ignored"),
            }
        }
        Ok(members)
    }

    /// The live entries (not delete markers) of the keys matching `filter`, at most
    /// `stop_after + 1` of them.
    async fn scan(&self, filter: String, stop_after: usize) -> Result<Vec<Entry>, NatsPresenceError> {
        let s = self.bucket().await?;
        let config = pull::Config {
            filter_subject: filter,
            deliver_policy: DeliverPolicy::LastPerSubject,
            ack_policy: AckPolicy::None,
            inactive_threshold: Duration::from_secs(30),
            memory_storage: true,
            num_replicas: 1,
            ..Default::default()
        };
        let consumer: consumer::PullConsumer = match s.create_consumer(config).await {
            Ok(c) => c,
            Err(e) => {
                *self.stream.lock() = None;
                return Err(nats("scan", e));
            }
        };
        let name = consumer.cached_info().name.clone();
        let pending = consumer.cached_info().num_pending;
        let result = self.drain(&consumer, pending, stop_after).await;
        tokio::spawn(async move {
            // Best effort: the server drops it after `inactive_threshold` anyway.
            let _ = s.delete_consumer(&name).await;
        });
        result
    }

    async fn drain(
        &self,
        consumer: &consumer::PullConsumer,
        pending: u64,
        stop_after: usize,
    ) -> Result<Vec<Entry>, NatsPresenceError> {
        let prefix_len = format!("$KV.{}.", self.config.bucket).len();
        let mut entries = Vec::new();
        let mut seen = 0u64;
        while seen < pending {
            let want = (pending - seen).min(1024) as usize;
            let mut batch = consumer
                .fetch()
                .max_messages(want)
                .expires(self.config.request_timeout)
                .messages()
                .await
                .map_err(|e| nats("scan", e))?;
            let mut got = 0;
            while let Some(m) = batch.next().await {
                let m = m.map_err(|e| nats("scan", e))?;
                got += 1;
                seen += 1;
                if is_delete(m.headers.as_ref()) {
                    continue;
                }
                let info = m.info().map_err(|e| nats("scan", e))?;
                entries.push(Entry {
                    key: m.subject.get(prefix_len..).unwrap_or_default().to_string(),
                    revision: info.stream_sequence,
                    time: info.published,
                    payload: m.payload.clone(),
                });
                if entries.len() > stop_after {
                    return Ok(entries);
                }
            }
            if got == 0 {
                break;
            }
        }
        Ok(entries)
    }

    /// The registry: each incarnation's entry, and the reference time (this node's own
    /// latest heartbeat, else the newest entry).
    async fn registry(
        &self,
    ) -> Result<(Vec<(String, Entry)>, Option<async_nats::datetime::DateTime>), NatsPresenceError> {
        let entries = self.scan(format!("$KV.{}.{NODES}.*", self.config.bucket), usize::MAX - 1).await?;
        let mine = key_token(&self.config.node);
        let mut reference = None;
        let mut newest = None;
        let mut out = Vec::with_capacity(entries.len());
        for e in entries {
            let Some(token) = e.key.strip_prefix(NODES).and_then(|k| k.strip_prefix('.')) else {
                continue;
            };
            if token == mine {
                reference = Some(e.time);
            }
            newest = newest.max(Some(e.time));
            out.push((token.to_string(), e));
        }
        Ok((out, reference.or(newest)))
    }

    /// Deletes `key` if its revision is still `revision`; whether this call deleted it.
    async fn delete_if(&self, key: &str, revision: u64) -> Result<bool, NatsPresenceError> {
        let mut headers = HeaderMap::new();
        headers.insert("KV-Operation", "DEL");
        Ok(self.write_retrying(key, Bytes::new(), headers, Some(revision)).await?.is_some())
    }
}

fn parse_node_info(b: &[u8]) -> Option<NodeInfo> {
    let text = std::str::from_utf8(b).ok()?;
    let mut parts = text.splitn(3, ' ');
    let connections = parts.next()?.parse().ok()?;
    let rooms = parts.next()?.parse().ok()?;
    let id = parts.next()?.to_string();
    Some(NodeInfo { id, connections, rooms })
}

fn older_than(
    reference: async_nats::datetime::DateTime,
    t: async_nats::datetime::DateTime,
    timeout: Duration,
) -> bool {
    reference.unix_timestamp_nanos() - t.unix_timestamp_nanos() > timeout.as_nanos() as i128
}

/// Refreshes this node's members every TTL/3 (and at once after a reconnect) until the
/// presence is dropped. Holds no strong reference while it waits.
async fn refresher(inner: Weak<Inner>, now: Arc<Notify>, every: Duration) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = now.notified() => {}
        }
        match inner.upgrade() {
            Some(inner) => inner.refresh_all().await,
            None => return,
        }
    }
}

impl Presence for NatsPresence {
    type Error = NatsPresenceError;

    async fn add(&self, room: &Room, member: &Member) -> Result<(), NatsPresenceError> {
        let inner = &self.inner;
        let key = inner.key(room, &member.client);
        let value = encode_member(member)?;
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let revision = inner
            .write_retrying(&key, value.clone(), HeaderMap::new(), None)
            .await?
            .ok_or_else(|| nats("add", "unexpected compare-and-set failure"))?;
        inner.mine.lock().insert(key, Mine { id, value, revision });
        Ok(())
    }

    async fn remove(&self, room: &Room, client: &str) -> Result<(), NatsPresenceError> {
        let inner = &self.inner;
        let key = inner.key(room, client);
        // Forget it first: a refresh from now on cannot write it back.
        let keys = if inner.mine.lock().remove(&key).is_some() {
            vec![key]
        } else {
            // Not this node's (its session moved, or a backend removes it): find it
            // under whichever node added it.
            let filter = format!("$KV.{}.{}.*.{}", inner.config.bucket, key_token(room), key_token(client));
            inner.scan(filter, usize::MAX - 1).await?.into_iter().map(|e| e.key).collect()
        };
        for key in keys {
            let mut headers = HeaderMap::new();
            headers.insert("KV-Operation", "DEL");
            inner.write_retrying(&key, Bytes::new(), headers, None).await?;
        }
        Ok(())
    }

    async fn members(&self, room: &Room, limit: usize) -> Result<Option<Vec<Member>>, NatsPresenceError> {
        let mut members = self.inner.list(room, limit).await?;
        if members.len() > limit {
            return Ok(None);
        }
        members.sort_by(|a, b| a.client.cmp(&b.client));
        Ok(Some(members))
    }

    async fn stats(&self, room: &Room) -> Result<PresenceStats, NatsPresenceError> {
        let members = self.inner.list(room, usize::MAX).await?;
        let users: HashSet<&str> = members.iter().map(|m| m.user.as_str()).collect();
        Ok(PresenceStats { clients: members.len() as u64, users: users.len() as u64 })
    }

    async fn heartbeat(&self, node: &NodeInfo) -> Result<(), NatsPresenceError> {
        let inner = &self.inner;
        let key = format!("{NODES}.{}", key_token(&inner.config.node));
        let value = Bytes::from(format!("{} {} {}", node.connections, node.rooms, node.id));
        inner.write_retrying(&key, value, HeaderMap::new(), None).await?;
        Ok(())
    }

    async fn nodes(&self, timeout: Duration) -> Result<Vec<NodeInfo>, NatsPresenceError> {
        let (entries, reference) = self.inner.registry().await?;
        let Some(reference) = reference else {
            return Ok(Vec::new());
        };
        let mut out: Vec<NodeInfo> = entries
            .iter()
            .filter(|(_, e)| !older_than(reference, e.time, timeout))
            .filter_map(|(_, e)| parse_node_info(&e.payload))
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    async fn reap(&self, timeout: Duration) -> Result<Vec<Reaped>, NatsPresenceError> {
        let inner = &self.inner;
        let (entries, reference) = inner.registry().await?;
        let Some(reference) = reference else {
            return Ok(Vec::new());
        };
        let mine = key_token(&inner.config.node);
        let mut reaped = Vec::new();
        for (token, e) in entries {
            let Some(inc) = key_untoken(&token) else { continue };
            let silent = Duration::from_nanos(
                u64::try_from(reference.unix_timestamp_nanos() - e.time.unix_timestamp_nanos()).unwrap_or(0),
            );
            if token == mine || !crate::is_dead(&inc, silent, timeout, &inner.config.node) {
                continue;
            }
            let filter = format!("$KV.{}.*.{token}.*", inner.config.bucket);
            for m in inner.scan(filter, usize::MAX - 1).await? {
                let Some(room) = m.key.split('.').next().and_then(key_untoken) else { continue };
                let Ok(room) = Room::parse(&room) else {
                    tracing::warn!(key = %m.key, "presence entry with an invalid room ignored");
                    continue;
                };
                let Some(member) = decode_member(&m.payload) else {
                    tracing::warn!(key = %m.key, "undecodable presence entry ignored");
                    continue;
                };
                if inner.delete_if(&m.key, m.revision).await? {
                    reaped.push(Reaped { room, member });
                }
            }
            inner.delete_if(&e.key, e.revision).await?;
        }
        Ok(reaped)
    }

    async fn deregister(&self) -> Result<(), NatsPresenceError> {
        let inner = &self.inner;
        let key = format!("{NODES}.{}", key_token(&inner.config.node));
        let mut headers = HeaderMap::new();
        headers.insert("KV-Operation", "DEL");
        inner.write_retrying(&key, Bytes::new(), headers, None).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn key_tokens_are_valid_and_unique() {
        let names = ["a", "a.b", "ns:x.y/z@h=1,2", "_", "a_2E", "a.", "a_5F", "é", ""];
        let mut seen = HashSet::new();
        for n in names {
            let t = key_token(n);
            assert!(!t.is_empty());
            assert!(t.bytes().all(|b| b.is_ascii_alphanumeric() || b"-/=_".contains(&b)), "{t}");
            assert!(seen.insert(t), "{n}");
        }
    }

    #[test]
    fn members_round_trip_and_garbage_is_ignored() {
        let m = Member {
            client: "c\"1".into(),
            user: "ü".into(),
            info: Some(Data::from_json("{\"a\":[1,{\"b\":null}]}").unwrap()),
            room_info: Some(Data::from_msgpack(vec![0x2a]).unwrap()),
        };
        let b = encode_member(&m).unwrap();
        assert_eq!(decode_member(&b), Some(m));
        let bare = Member { client: "c".into(), user: "".into(), info: None, room_info: None };
        assert_eq!(decode_member(&encode_member(&bare).unwrap()), Some(bare));
        for junk in [&b""[..], b"{}", b"[1]", b"{\"client\":1,\"user\":\"u\"}", b"\xff"] {
            assert_eq!(decode_member(junk), None);
        }
    }
}
