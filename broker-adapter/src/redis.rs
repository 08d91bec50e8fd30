//! [`RedisBroker`]: publish, history and fan-out through Redis (feature `redis`, on by
//! default), for a cluster of nodes sharing one Redis (or one Redis Cluster).
//!
//! # Connection URL
//!
//! ```text
//! redis://[user:password@]host[:port][/db][?prefix=roomcast&timeout_ms=5000]
//! redis://host:port,host:port?cluster=true          Redis Cluster (seed nodes)
//! redis-cluster://host:port[,host:port…][?node=host:port…]
//! ```
//!
//! - `cluster=true` (or a `redis-cluster://` / `valkey-cluster://` scheme) selects Redis
//!   Cluster mode: sharded pub/sub (`SSUBSCRIBE` / `SPUBLISH`), so each room's fan-out stays
//!   on the shard that holds its keys. Without it: `SUBSCRIBE` / `PUBLISH`. Several seed
//!   nodes may be listed separated by commas, or with `node=` parameters.
//! - `prefix` (default `roomcast`) starts every key and channel name; 1 to 64 bytes, no
//!   braces or white space.
//! - `timeout_ms` (default 5000) bounds every command, so nothing waits forever while
//!   Redis is unreachable.
//! - TLS (`rediss://`) is not built in and is refused with a clear error.
//!
//! The URL is parsed by `roomcast_redis_common::parse_url`, shared with the Redis presence
//! (which also reads `presence_ttl_ms`).
//!
//! # Key layout
//!
//! Every key of a room carries the room as its Redis Cluster hash tag, so they all live on
//! one shard (room names are `A-Za-z0-9._-:@=,/` only, so no escaping is needed):
//!
//! | key / channel | type | content |
//! |---|---|---|
//! | `<prefix>:{<room>}:meta` | hash | `epoch` (string), `offset` (last offset of the epoch) |
//! | `<prefix>:{<room>}:stream` | stream | one entry per kept publication: ID `<offset>-0`, fields `t` (publish time, ms, Redis clock) and `d` (the encoded publication) |
//! | `<prefix>:{<room>}` | pub/sub channel | every publication and join/leave of the room |
//! | `<prefix>:{<room>}:idem:<key>` | string, `PX` = the window | an idempotency key used in the room: `<offset>:<epoch>` of the first publication, or empty without history |
//! | `<prefix>:control` | pub/sub channel (sharded in cluster mode) | control messages, raw payload bytes; every node subscribes at `start` |
//!
//! # Script contracts
//!
//! - **publish** (one Lua script, so history order equals fan-out order): takes the room's
//!   epoch from `meta`, creating it (with the epoch the caller proposes, and deleting any
//!   stale stream) when missing; `HINCRBY offset 1`; drops kept publications older than the
//!   TTL; `XADD` with ID `<offset>-0` and exact `MAXLEN history_size`; `PEXPIRE` of both
//!   keys by the TTL; `PUBLISH`/`SPUBLISH` of the frame (carrying offset and epoch) on the
//!   room's channel. Returns `{offset, epoch}`. When `meta` expired or Redis restarted empty,
//!   a new epoch appears and offsets restart at 1.
//! - **history** (one Lua script, so position and publications are one snapshot): reads
//!   `meta`, creating it with the proposed epoch, offset 0 and the TTL when missing (a room
//!   never published reports offset 0 and the epoch its first publication will carry);
//!   drops expired publications; decides `continuable` exactly as the memory broker (same
//!   epoch, `since <= offset`, and everything after `since` still kept); returns
//!   `{offset, epoch, continuable, id, frame, id, frame, …}` read with `XRANGE`/`XREVRANGE`.
//! - **idempotent publish** (one Lua script, so claiming the key and publishing are one
//!   atomic step, on the room's slot): `GET` of the key; when present returns
//!   `{0, stored}` and publishes nothing. Otherwise publishes exactly as the publish script
//!   (or, without history, only `PUBLISH`es the frame), then
//!   `SET <key> "<offset>:<epoch>" PX <window>` (empty value without history) and returns
//!   `{1, stored}`. The key is written last: a script that fails before it leaves no key,
//!   so a retry may publish. A call whose reply was lost (timeout) may have published; its
//!   retry then answers `Duplicate` with the position.
//! - Scripts run with `EVALSHA`, falling back to `EVAL` on `NOSCRIPT` (after a restart or
//!   on a new cluster node).
//! - Without history ([`HistoryOptions::OFF`]) a publication is only `PUBLISH`ed, with no
//!   offset; joins and leaves are `PUBLISH`ed too and never stored.
//!
//! # Frames
//!
//! What travels on a channel is MessagePack values back to back: `kind` (uint), then for a
//! publication (kind 1) `offset` (uint, 0 = none), `epoch` (str, "" = none) and the body
//! `[room, [data_format, data], info, skip_client]` (`data_format` 0 = JSON text, 1 =
//! MessagePack; `info` nil or `[client, user]`; `skip_client` nil or str); for a join
//! (kind 2) or leave (kind 3) `room` and `[client, user, info, room_info]`. The stream keeps
//! the body only (offset from the entry ID, epoch from `meta`). Decoding never panics:
//! a frame that does not decode, or whose room is not its channel's, is logged and dropped.
//!
//! # Fan-out and failures
//!
//! A dedicated subscriber connection carries every subscription; one task reads it and
//! calls the handler in arrival order (so per room in offset order). `subscribe` returns
//! once Redis confirmed: `SSUBSCRIBE` answers itself; after `SUBSCRIBE` (which the client
//! library acknowledges on write) a `PING` on the same connection is awaited.
//!
//! The control channel is subscribed on the same connection at [`Broker::start`] (before
//! it returns), and its messages go to [`BrokerEventHandler::handle_control`] as they are;
//! Redis pub/sub keeps one publisher's messages in order and stores nothing. Payloads are
//! at most [`crate::MAX_CONTROL_PAYLOAD`] bytes.
//!
//! When the subscriber connection drops, [`Broker::is_ready`] turns false; the client
//! reconnects by itself (exponential back-off, forever); then every room this node wanted
//! is subscribed again (the control channel too), `is_ready` turns true and [`BrokerEventHandler::handle_interruption`]
//! is called, since publications may have been missed meanwhile. The same happens when
//! the subscriber falls too far behind (its buffer overflowed) or the cluster layout
//! changed. A heartbeat `PING` every few seconds forces a reconnection of a connection that
//! stopped answering. Commands fail with [`RedisError`] after `timeout_ms`; a command whose
//! connection dropped in flight is not retried (a publish may or may not have happened).

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use bytes::Bytes;
use fred::clients::Client;
use fred::error::Error as FredError;
use fred::interfaces::{ClientLike, EventInterface, PubsubInterface};
use fred::types::config::{Config as FredConfig, ReconnectPolicy, Server};
use fred::types::{ClusterHash, ClusterStateChange, CustomCommand, Message, Value};
use parking_lot::Mutex;
use roomcast_protocol::{DataError, Position, Room};
use tokio::sync::broadcast::{self, error::RecvError};
use tokio::task::JoinHandle;

use crate::memory::new_epoch;
use crate::{
    Broker, BrokerEventHandler, BrokerPublication, HistoryOptions, HistoryPage, HistoryQuery, Idempotent,
    InvalidRequest, RoomEvent, check_control, check_idempotent,
};

/// Default key and channel prefix.
pub const DEFAULT_PREFIX: &str = roomcast_redis_common::DEFAULT_PREFIX;
/// Default bound of every Redis command.
pub const DEFAULT_TIMEOUT: Duration = roomcast_redis_common::DEFAULT_TIMEOUT;
/// How many pub/sub messages may wait for the reader before it counts as interrupted.
const SUBSCRIBER_BUFFER: usize = 1 << 16;
/// How often a pending resubscription is retried and the subscriber connection checked.
const WATCH_EVERY: Duration = Duration::from_millis(250);
/// How often the subscriber connection is pinged.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(5);
/// Channels per `SUBSCRIBE` when resubscribing.
const SUBSCRIBE_BATCH: usize = 256;

/// What can go wrong talking to Redis.
#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    #[error("redis: {0}")]
    Redis(#[from] FredError),
    #[error("invalid redis configuration: {0}")]
    Config(String),
    #[error("unexpected reply from redis: {0}")]
    Reply(String),
    #[error("cannot encode publication: {0}")]
    Encode(#[from] DataError),
    #[error("stored publication does not decode: {0}")]
    Decode(#[from] wire::WireError),
    #[error("the broker was not started")]
    NotStarted,
    #[error("{0}")]
    Invalid(#[from] InvalidRequest),
}

/// Where and how to reach Redis; see the module documentation for the URL.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// The client library's configuration (server or cluster seeds, credentials, db).
    pub client: FredConfig,
    /// Redis Cluster: sharded pub/sub.
    pub cluster: bool,
    /// Start of every key and channel name.
    pub prefix: String,
    /// Bound of every command.
    pub timeout: Duration,
}

impl RedisConfig {
    /// Parses a connection URL (see the module documentation).
    pub fn from_url(url: &str) -> Result<Self, RedisError> {
        let u = roomcast_redis_common::parse_url(url).map_err(RedisError::Config)?;
        Ok(RedisConfig { client: u.client, cluster: u.cluster, prefix: u.prefix, timeout: u.timeout })
    }
}

/// The Lua scripts, loaded by SHA1 and sent whole when Redis does not know them.
mod scripts {
    pub use roomcast_redis_common::Script;

    /// Shared helpers, prepended to both scripts.
    const COMMON: &str = r#"
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- Drops the publications kept since `cutoff` ms or longer: always a prefix of the stream.
-- Looks at the oldest one first, and reads further (64 at a time) only when it expired:
-- every publish calls this, and reading 64 entries each time cost more than all the rest
-- of the publish script together.
local function trim_expired(stream, cutoff)
  local count = 1
  while true do
    local batch = redis.call('XRANGE', stream, '-', '+', 'COUNT', count)
    local dead = {}
    for i = 1, #batch do
      local t = tonumber(batch[i][2][2]) or 0
      if t > cutoff then break end
      dead[#dead + 1] = batch[i][1]
    end
    if #dead > 0 then redis.call('XDEL', stream, unpack(dead)) end
    if #dead < count then return end
    count = 64
  end
end
"#;

    /// Publishing into a room with history, shared by the publish scripts.
    /// KEYS: meta, stream. ARGV: channel, body, size, ttl ms, proposed epoch, publish command.
    const PUBLISH_FN: &str = r#"
local function publish_history()
  local meta, stream = KEYS[1], KEYS[2]
  local size, ttl = tonumber(ARGV[3]), tonumber(ARGV[4])
  local now = now_ms()
  local epoch = redis.call('HGET', meta, 'epoch')
  if not epoch then
    epoch = ARGV[5]
    redis.call('DEL', stream)
    redis.call('HSET', meta, 'epoch', epoch, 'offset', 0)
  end
  local offset = redis.call('HINCRBY', meta, 'offset', 1)
  trim_expired(stream, now - ttl)
  redis.call('XADD', stream, 'MAXLEN', size, string.format('%d-0', offset), 't', now, 'd', ARGV[2])
  redis.call('PEXPIRE', stream, ttl)
  redis.call('PEXPIRE', meta, ttl)
  redis.call(ARGV[6], ARGV[1], '\1' .. cmsgpack.pack(offset) .. cmsgpack.pack(epoch) .. ARGV[2])
  return offset, epoch
end
"#;

    /// KEYS: meta, stream. ARGV: as `publish_history`.
    const PUBLISH_BODY: &str = r#"
local offset, epoch = publish_history()
return {offset, epoch}
"#;

    /// KEYS: meta, stream, idempotency key. ARGV: 1-6 as `publish_history` (with history
    /// off: channel and the whole frame, then ignored ones and the publish command),
    /// window ms, history on ("1" / "0").
    const IDEMPOTENT_BODY: &str = r#"
local seen = redis.call('GET', KEYS[3])
if seen then return {0, seen} end
local stored = ''
if ARGV[8] == '1' then
  local offset, epoch = publish_history()
  stored = string.format('%d:%s', offset, epoch)
else
  redis.call(ARGV[6], ARGV[1], ARGV[2])
end
-- Last: a failure above leaves the key free.
redis.call('SET', KEYS[3], stored, 'PX', ARGV[7])
return {1, stored}
"#;

    /// KEYS: meta, stream. ARGV: ttl ms, proposed epoch, since offset ("" = none), since
    /// epoch, limit (-1 = none), reverse ("1" / "0").
    const HISTORY_BODY: &str = r#"
local meta, stream = KEYS[1], KEYS[2]
local ttl = tonumber(ARGV[1])
local now = now_ms()
local pos = redis.call('HMGET', meta, 'epoch', 'offset')
local epoch, top = pos[1], tonumber(pos[2]) or 0
if not epoch then
  epoch, top = ARGV[2], 0
  redis.call('DEL', stream)
  redis.call('HSET', meta, 'epoch', epoch, 'offset', 0)
  redis.call('PEXPIRE', meta, ttl)
end
trim_expired(stream, now - ttl)
local first_kept = top + 1
local first = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)
if #first > 0 then first_kept = tonumber(string.match(first[1][1], '^(%d+)')) or first_kept end
local after, continuable = 0, 1
if ARGV[3] ~= '' then
  after = tonumber(ARGV[3]) or -1
  if ARGV[4] ~= epoch or after < 0 or after > top or after + 1 < first_kept then continuable = 0 end
end
local out = {top, epoch, continuable}
local limit = tonumber(ARGV[5]) or -1
if continuable == 1 and limit ~= 0 then
  local from = string.format('%d-0', after + 1)
  local entries
  if ARGV[6] == '1' then
    if limit > 0 then
      entries = redis.call('XREVRANGE', stream, '+', from, 'COUNT', limit)
    else
      entries = redis.call('XREVRANGE', stream, '+', from)
    end
  else
    if limit > 0 then
      entries = redis.call('XRANGE', stream, from, '+', 'COUNT', limit)
    else
      entries = redis.call('XRANGE', stream, from, '+')
    end
  end
  for i = 1, #entries do
    local fields = entries[i][2]
    out[#out + 1] = entries[i][1]
    out[#out + 1] = fields[4] or ''
  end
end
return out
"#;

    pub fn publish() -> Script {
        Script::new(format!("{COMMON}{PUBLISH_FN}{PUBLISH_BODY}"))
    }

    pub fn publish_idempotent() -> Script {
        Script::new(format!("{COMMON}{PUBLISH_FN}{IDEMPOTENT_BODY}"))
    }

    pub fn history() -> Script {
        Script::new(format!("{COMMON}{HISTORY_BODY}"))
    }
}

/// The binary frames carried on channels and kept in streams.
pub(crate) mod wire {
    use bytes::Bytes;
    use roomcast_protocol::mp::{MpError, Reader, Token, write};
    use roomcast_protocol::{Data, DataError, Member, PublisherInfo, Room};

    use crate::{BrokerPublication, RoomEvent};

    pub const KIND_PUBLICATION: u64 = 1;
    pub const KIND_JOIN: u64 = 2;
    pub const KIND_LEAVE: u64 = 3;
    const DATA_JSON: u64 = 0;
    const DATA_MSGPACK: u64 = 1;

    /// Why a frame was refused.
    #[derive(Debug, thiserror::Error)]
    pub enum WireError {
        #[error("{0}")]
        MessagePack(#[from] MpError),
        #[error("bad data: {0}")]
        Data(#[from] DataError),
        #[error("{0}")]
        Malformed(&'static str),
    }

    /// A decoded frame.
    #[derive(Debug)]
    pub enum Frame {
        Publication(BrokerPublication),
        Event(Room, RoomEvent),
    }

    /// The body of a publication: what the stream keeps.
    pub fn encode_body(p: &BrokerPublication) -> Result<Vec<u8>, DataError> {
        let data = p.data.json()?;
        let mut out = Vec::with_capacity(data.len() + p.room.len() + 48);
        write::array_len(&mut out, 4);
        write::str(&mut out, p.room.as_str());
        write_data(&mut out, DATA_JSON, data);
        match &p.info {
            None => write::nil(&mut out),
            Some(i) => {
                write::array_len(&mut out, 2);
                write::str(&mut out, &i.client);
                write::str(&mut out, &i.user);
            }
        }
        match &p.skip_client {
            None => write::nil(&mut out),
            Some(c) => write::str(&mut out, c),
        }
        Ok(out)
    }

    /// A whole publication frame without a position (rooms without history).
    pub fn encode_publication(p: &BrokerPublication) -> Result<Vec<u8>, DataError> {
        let body = encode_body(p)?;
        let mut out = Vec::with_capacity(body.len() + 3);
        write::uint(&mut out, KIND_PUBLICATION);
        write::uint(&mut out, 0);
        write::str(&mut out, "");
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// A join or leave frame.
    pub fn encode_event(room: &Room, event: &RoomEvent) -> Result<Vec<u8>, DataError> {
        let (kind, m) = match event {
            RoomEvent::Join(m) => (KIND_JOIN, m),
            RoomEvent::Leave(m) => (KIND_LEAVE, m),
        };
        let mut out = Vec::with_capacity(room.len() + m.client.len() + m.user.len() + 16);
        write::uint(&mut out, kind);
        write::str(&mut out, room.as_str());
        write::array_len(&mut out, 4);
        write::str(&mut out, &m.client);
        write::str(&mut out, &m.user);
        write_opt_data(&mut out, m.info.as_ref())?;
        write_opt_data(&mut out, m.room_info.as_ref())?;
        Ok(out)
    }

    fn write_data(out: &mut Vec<u8>, format: u64, bytes: &[u8]) {
        write::array_len(out, 2);
        write::uint(out, format);
        write::bin(out, bytes);
    }

    fn write_opt_data(out: &mut Vec<u8>, d: Option<&Data>) -> Result<(), DataError> {
        match d {
            None => write::nil(out),
            Some(d) => write_data(out, DATA_JSON, d.json()?),
        }
        Ok(())
    }

    /// Reads values out of one buffer, handing out byte ranges of it without copying.
    struct Cursor<'a> {
        buf: &'a Bytes,
        r: Reader<'a>,
    }

    impl<'a> Cursor<'a> {
        fn new(buf: &'a Bytes) -> Self {
            Cursor { buf, r: Reader::new(buf) }
        }
        fn token(&mut self) -> Result<Token<'a>, WireError> {
            Ok(self.r.token()?)
        }
        fn uint(&mut self) -> Result<u64, WireError> {
            match self.token()? {
                Token::Uint(v) => Ok(v),
                _ => Err(WireError::Malformed("expected an unsigned integer")),
            }
        }
        fn string(&mut self) -> Result<&'a str, WireError> {
            match self.token()? {
                Token::Str(b) | Token::Bin(b) => {
                    std::str::from_utf8(b).map_err(|_| WireError::Malformed("string is not UTF-8"))
                }
                _ => Err(WireError::Malformed("expected a string")),
            }
        }
        fn array(&mut self) -> Result<u32, WireError> {
            match self.token()? {
                Token::Array(n) => Ok(n),
                _ => Err(WireError::Malformed("expected an array")),
            }
        }
        /// `nil` (false) or an array of at least `min` values (true, its length consumed).
        fn opt_array(&mut self, min: u32) -> Result<Option<u32>, WireError> {
            match self.token()? {
                Token::Nil => Ok(None),
                Token::Array(n) if n >= min => Ok(Some(n)),
                _ => Err(WireError::Malformed("expected nil or an array")),
            }
        }
        /// Skips `n` values (fields a newer writer added).
        fn skip(&mut self, n: u32) -> Result<(), WireError> {
            for _ in 0..n {
                self.r.value(1)?;
            }
            Ok(())
        }
        /// `[format, bytes]` as a payload, sharing the buffer.
        fn data_after_header(&mut self, len: u32) -> Result<Data, WireError> {
            if len < 2 {
                return Err(WireError::Malformed("data needs a format and bytes"));
            }
            let format = self.uint()?;
            let bytes = match self.token()? {
                Token::Bin(b) | Token::Str(b) => b.len(),
                _ => return Err(WireError::Malformed("expected data bytes")),
            };
            let end = self.r.position();
            let start = end.checked_sub(bytes).ok_or(WireError::Malformed("data out of range"))?;
            if end > self.buf.len() {
                return Err(WireError::Malformed("data out of range"));
            }
            let bytes = self.buf.slice(start..end);
            self.skip(len - 2)?;
            Ok(match format {
                DATA_JSON => Data::from_json(bytes)?,
                DATA_MSGPACK => Data::from_msgpack(bytes)?,
                _ => return Err(WireError::Malformed("unknown data format")),
            })
        }
        fn opt_data(&mut self) -> Result<Option<Data>, WireError> {
            match self.opt_array(2)? {
                None => Ok(None),
                Some(n) => self.data_after_header(n).map(Some),
            }
        }
        fn room(&mut self) -> Result<Room, WireError> {
            Room::parse(self.string()?).map_err(|_| WireError::Malformed("invalid room name"))
        }
        fn done(&self) -> Result<(), WireError> {
            if self.r.is_empty() { Ok(()) } else { Err(WireError::Malformed("trailing bytes")) }
        }
    }

    /// Decodes a publication body (as kept in a stream); position left empty.
    pub fn decode_body(buf: &Bytes) -> Result<BrokerPublication, WireError> {
        let mut c = Cursor::new(buf);
        let p = body(&mut c)?;
        c.done()?;
        Ok(p)
    }

    fn body(c: &mut Cursor<'_>) -> Result<BrokerPublication, WireError> {
        let n = c.array()?;
        if n < 4 {
            return Err(WireError::Malformed("publication body too short"));
        }
        let room = c.room()?;
        let dn = c.array()?;
        let data = c.data_after_header(dn)?;
        let info = match c.opt_array(2)? {
            None => None,
            Some(len) => {
                let client = c.string()?.to_string();
                let user = c.string()?.to_string();
                c.skip(len - 2)?;
                Some(PublisherInfo { client, user })
            }
        };
        let skip_client = match c.token()? {
            Token::Nil => None,
            Token::Str(b) | Token::Bin(b) => Some(
                std::str::from_utf8(b).map_err(|_| WireError::Malformed("string is not UTF-8"))?.to_string(),
            ),
            _ => return Err(WireError::Malformed("expected nil or a client id")),
        };
        c.skip(n - 4)?;
        Ok(BrokerPublication { room, offset: None, epoch: None, data, info, skip_client })
    }

    /// Decodes a frame received on a channel.
    pub fn decode_frame(buf: &Bytes) -> Result<Frame, WireError> {
        let mut c = Cursor::new(buf);
        let frame = match c.uint()? {
            KIND_PUBLICATION => {
                let offset = c.uint()?;
                let epoch = c.string()?.to_string();
                let mut p = body(&mut c)?;
                if offset > 0 {
                    if epoch.is_empty() {
                        return Err(WireError::Malformed("offset without epoch"));
                    }
                    p.offset = Some(offset);
                    p.epoch = Some(epoch);
                }
                Frame::Publication(p)
            }
            kind @ (KIND_JOIN | KIND_LEAVE) => {
                let room = c.room()?;
                let n = c.array()?;
                if n < 4 {
                    return Err(WireError::Malformed("member too short"));
                }
                let client = c.string()?.to_string();
                let user = c.string()?.to_string();
                let info = c.opt_data()?;
                let room_info = c.opt_data()?;
                c.skip(n - 4)?;
                let m = Member { client, user, info, room_info };
                Frame::Event(room, if kind == KIND_JOIN { RoomEvent::Join(m) } else { RoomEvent::Leave(m) })
            }
            _ => return Err(WireError::Malformed("unknown frame kind")),
        };
        c.done()?;
        Ok(frame)
    }
}

/// The Redis broker. See the module documentation.
pub struct RedisBroker {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RedisBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBroker")
            .field("prefix", &self.inner.config.prefix)
            .field("cluster", &self.inner.config.cluster)
            .finish_non_exhaustive()
    }
}

struct Inner {
    config: RedisConfig,
    /// Scripts, publishes and history reads.
    cmd: Client,
    /// Subscriptions only.
    sub: Client,
    publish: scripts::Script,
    publish_idempotent: scripts::Script,
    history: scripts::Script,
    handler: OnceLock<Arc<dyn BrokerEventHandler>>,
    /// Rooms this node wants delivered. Locked across every SUBSCRIBE / UNSUBSCRIBE and
    /// resubscription, so they never overtake each other.
    rooms: tokio::sync::Mutex<HashSet<Room>>,
    /// The subscriber connection is up and every wanted room is subscribed on it.
    synced: AtomicBool,
    /// Receivers created at connection time, taken by `start`.
    receivers: Mutex<Option<Receivers>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

struct Receivers {
    messages: broadcast::Receiver<Message>,
    connection: ConnectionEvents,
}

/// What the subscriber connection reports about itself.
struct ConnectionEvents {
    reconnects: broadcast::Receiver<Server>,
    errors: broadcast::Receiver<(FredError, Option<Server>)>,
    cluster_changes: broadcast::Receiver<Vec<ClusterStateChange>>,
}

fn build_client(config: &RedisConfig, buffer: usize) -> Result<Client, FredError> {
    let mut builder = fred::types::Builder::from_config(config.client.clone());
    builder
        .with_performance_config(|p| {
            p.default_command_timeout = config.timeout;
            p.broadcast_channel_capacity = buffer;
        })
        .with_connection_config(|c| {
            c.connection_timeout = config.timeout;
            c.internal_command_timeout = config.timeout;
            // A command whose connection dropped in flight may have run: never resend it.
            c.max_command_attempts = 1;
            // Small commands and replies: without this, Nagle and delayed ACKs add up to 40 ms.
            c.tcp.nodelay = Some(true);
        })
        .set_policy(ReconnectPolicy::new_exponential(0, 50, 2_000, 2));
    builder.build()
}

impl RedisBroker {
    /// Connects the command and subscriber connections. Fails when Redis cannot be reached.
    pub async fn connect(config: RedisConfig) -> Result<Self, RedisError> {
        let cmd = build_client(&config, 32)?;
        let sub = build_client(&config, SUBSCRIBER_BUFFER)?;
        cmd.init().await?;
        if let Err(e) = sub.init().await {
            let _ = cmd.quit().await;
            return Err(e.into());
        }
        // Created after the first connection, so they report only what happens later.
        let receivers = Receivers {
            messages: sub.message_rx(),
            connection: ConnectionEvents {
                reconnects: sub.reconnect_rx(),
                errors: sub.error_rx(),
                cluster_changes: sub.cluster_change_rx(),
            },
        };
        Ok(RedisBroker {
            inner: Arc::new(Inner {
                config,
                cmd,
                sub,
                publish: scripts::publish(),
                publish_idempotent: scripts::publish_idempotent(),
                history: scripts::history(),
                handler: OnceLock::new(),
                rooms: tokio::sync::Mutex::new(HashSet::new()),
                synced: AtomicBool::new(true),
                receivers: Mutex::new(Some(receivers)),
                tasks: Mutex::new(Vec::new()),
            }),
        })
    }

    /// [`RedisBroker::connect`] with a URL.
    pub async fn connect_url(url: &str) -> Result<Self, RedisError> {
        Self::connect(RedisConfig::from_url(url)?).await
    }

    /// The configuration in use.
    pub fn config(&self) -> &RedisConfig {
        &self.inner.config
    }

    /// Closes both connections and stops delivery.
    pub async fn close(&self) {
        for t in self.inner.tasks.lock().drain(..) {
            t.abort();
        }
        let _ = self.inner.sub.quit().await;
        let _ = self.inner.cmd.quit().await;
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        for t in self.tasks.get_mut().drain(..) {
            t.abort();
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let (cmd, sub) = (self.cmd.clone(), self.sub.clone());
            rt.spawn(async move {
                let _ = sub.quit().await;
                let _ = cmd.quit().await;
            });
        }
    }
}

impl Inner {
    fn meta_key(&self, room: &Room) -> String {
        format!("{}:{{{}}}:meta", self.config.prefix, room.as_str())
    }
    fn stream_key(&self, room: &Room) -> String {
        format!("{}:{{{}}}:stream", self.config.prefix, room.as_str())
    }
    fn channel(&self, room: &Room) -> String {
        channel_name(&self.config.prefix, room)
    }
    fn idempotency_key(&self, room: &Room, key: &str) -> String {
        format!("{}:{{{}}}:idem:{key}", self.config.prefix, room.as_str())
    }

    /// Subscribes the subscriber connection to the control channel; returns once Redis
    /// confirmed.
    async fn subscribe_control(&self) -> Result<(), RedisError> {
        let channel = control_channel(&self.config.prefix);
        if self.config.cluster {
            self.sub.ssubscribe(channel).await?;
        } else {
            self.sub.subscribe(channel).await?;
            // As for rooms: this PING's answer means Redis handled the SUBSCRIBE.
            self.sub.ping::<Value>(None).await?;
        }
        Ok(())
    }
    fn publish_command(&self) -> &'static str {
        if self.config.cluster { "SPUBLISH" } else { "PUBLISH" }
    }

    /// Subscribes the subscriber connection to `rooms` and returns once Redis confirmed.
    async fn subscribe_rooms(&self, rooms: &[Room]) -> Result<(), RedisError> {
        if rooms.is_empty() {
            return Ok(());
        }
        if self.config.cluster {
            // SSUBSCRIBE answers once Redis subscribed; one at a time (each room may live on
            // another shard, and the client library follows redirections one by one).
            for room in rooms {
                self.sub.ssubscribe(self.channel(room)).await?;
            }
        } else {
            for chunk in rooms.chunks(SUBSCRIBE_BATCH) {
                let channels: Vec<String> = chunk.iter().map(|r| self.channel(r)).collect();
                self.sub.subscribe(channels).await?;
            }
            // The client library answers SUBSCRIBE when it is written; Redis answers this
            // PING after it handled everything sent before on the connection.
            self.sub.ping::<Value>(None).await?;
        }
        Ok(())
    }

    /// Subscribes every wanted room again, then reports the interruption.
    async fn resync(&self) -> Result<(), RedisError> {
        let rooms = self.rooms.lock().await;
        self.synced.store(false, Ordering::SeqCst);
        let list: Vec<Room> = rooms.iter().cloned().collect();
        if self.handler.get().is_some() {
            self.subscribe_control().await?;
        }
        self.subscribe_rooms(&list).await?;
        self.synced.store(true, Ordering::SeqCst);
        drop(rooms);
        tracing::info!(rooms = list.len(), "redis broker: subscriptions restored after an interruption");
        if let Some(h) = self.handler.get() {
            h.handle_interruption();
        }
        Ok(())
    }
}

/// The pub/sub channel of a room.
fn channel_name(prefix: &str, room: &Room) -> String {
    format!("{prefix}:{{{}}}", room.as_str())
}

/// The control channel. Never a room's channel: those hold braces.
fn control_channel(prefix: &str) -> String {
    format!("{prefix}:control")
}

/// The bytes of a reply value that should be a string.
fn value_bytes(v: Value) -> Option<Bytes> {
    match v {
        Value::Bytes(b) => Some(b),
        Value::String(s) => Some(s.into_inner()),
        _ => None,
    }
}

fn value_string(v: Value) -> Option<String> {
    value_bytes(v).and_then(|b| String::from_utf8(b.to_vec()).ok())
}

fn value_u64(v: &Value) -> Option<u64> {
    match v {
        Value::Integer(i) => u64::try_from(*i).ok(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

/// Reads the subscriber connection, one message at a time, into the handler.
async fn read_messages(
    handler: Arc<dyn BrokerEventHandler>,
    prefix: String,
    mut rx: broadcast::Receiver<Message>,
) {
    let control = control_channel(&prefix);
    loop {
        match rx.recv().await {
            Ok(msg) => dispatch(&*handler, &prefix, &control, msg),
            Err(RecvError::Lagged(n)) => {
                tracing::warn!(missed = n, "redis broker: subscriber fell behind; reporting an interruption");
                handler.handle_interruption();
            }
            Err(RecvError::Closed) => return,
        }
    }
}

fn dispatch(handler: &dyn BrokerEventHandler, prefix: &str, control: &str, msg: Message) {
    let channel = msg.channel;
    let Some(payload) = value_bytes(msg.value) else {
        tracing::warn!(channel = &*channel, "redis broker: non-binary message dropped");
        return;
    };
    if &*channel == control {
        handler.handle_control(&payload);
        return;
    }
    let frame = match wire::decode_frame(&payload) {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(channel = &*channel, error = %e, len = payload.len(), "redis broker: undecodable message dropped");
            return;
        }
    };
    let room = match &frame {
        wire::Frame::Publication(p) => &p.room,
        wire::Frame::Event(room, _) => room,
    };
    if channel_name(prefix, room) != *channel {
        tracing::warn!(channel = &*channel, room = %room, "redis broker: message for another room dropped");
        return;
    }
    match frame {
        wire::Frame::Publication(p) => handler.handle_publication(&p),
        wire::Frame::Event(room, event) => handler.handle_room_event(&room, &event),
    }
}

/// Follows the subscriber connection: marks it down on errors, and subscribes every wanted
/// room again once it is back (or the cluster changed). Ends with the broker.
async fn watch_connection(weak: Weak<Inner>, mut r: ConnectionEvents) {
    let mut tick = tokio::time::interval(WATCH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pending = false;
    let mut since_heartbeat = Duration::ZERO;
    loop {
        let mut reconnected = false;
        tokio::select! {
            ev = r.reconnects.recv() => match ev {
                Err(RecvError::Closed) => return,
                _ => { pending = true; reconnected = true; }
            },
            ev = r.cluster_changes.recv() => match ev {
                Err(RecvError::Closed) => return,
                _ => { pending = true; reconnected = true; }
            },
            ev = r.errors.recv() => match ev {
                Err(RecvError::Closed) => return,
                Ok((e, server)) => {
                    tracing::warn!(error = %e, server = ?server, "redis broker: subscriber connection error");
                    pending = true;
                }
                Err(RecvError::Lagged(_)) => pending = true,
            },
            _ = tick.tick() => { since_heartbeat += WATCH_EVERY; }
        }
        let Some(inner) = weak.upgrade() else {
            return;
        };
        if pending {
            inner.synced.store(false, Ordering::SeqCst);
            if reconnected || inner.sub.is_connected() {
                match inner.resync().await {
                    Ok(()) => pending = false,
                    Err(e) => tracing::warn!(error = %e, "redis broker: resubscription failed; will retry"),
                }
            }
        } else if since_heartbeat >= HEARTBEAT_EVERY {
            since_heartbeat = Duration::ZERO;
            if let Err(e) = inner.sub.ping::<Value>(None).await {
                tracing::warn!(error = %e, "redis broker: subscriber heartbeat failed; reconnecting");
                let _ = inner.sub.force_reconnection().await;
            }
        }
    }
}

impl Broker for RedisBroker {
    type Error = RedisError;

    async fn start(&self, handler: Arc<dyn BrokerEventHandler>) -> Result<(), RedisError> {
        if self.inner.receivers.lock().is_none() {
            return Ok(()); // already started
        }
        // Messages arriving meanwhile wait in the receiver created at connection time.
        self.inner.subscribe_control().await?;
        let Some(receivers) = self.inner.receivers.lock().take() else {
            return Ok(()); // started concurrently
        };
        let _ = self.inner.handler.set(handler.clone());
        let Receivers { messages, connection } = receivers;
        let reader = tokio::spawn(read_messages(handler, self.inner.config.prefix.clone(), messages));
        let watcher = tokio::spawn(watch_connection(Arc::downgrade(&self.inner), connection));
        self.inner.tasks.lock().extend([reader, watcher]);
        Ok(())
    }

    async fn subscribe(&self, room: &Room) -> Result<(), RedisError> {
        if self.inner.handler.get().is_none() {
            return Err(RedisError::NotStarted);
        }
        let mut rooms = self.inner.rooms.lock().await;
        rooms.insert(room.clone());
        // On failure the room stays wanted: the next resubscription includes it.
        self.inner.subscribe_rooms(std::slice::from_ref(room)).await
    }

    async fn unsubscribe(&self, room: &Room) -> Result<(), RedisError> {
        let mut rooms = self.inner.rooms.lock().await;
        if !rooms.remove(room) {
            return Ok(());
        }
        let channel = self.inner.channel(room);
        if self.inner.config.cluster {
            self.inner.sub.sunsubscribe(channel).await?;
        } else {
            self.inner.sub.unsubscribe(channel).await?;
            // As for SUBSCRIBE: the client library answers on write; this PING's answer
            // means Redis handled the UNSUBSCRIBE, so nothing published later arrives.
            self.inner.sub.ping::<Value>(None).await?;
        }
        Ok(())
    }

    async fn publish(
        &self,
        publication: BrokerPublication,
        history: HistoryOptions,
    ) -> Result<Option<Position>, RedisError> {
        let inner = &self.inner;
        let room = &publication.room;
        if !history.enabled() {
            let frame = wire::encode_publication(&publication)?;
            self.publish_frame(room, frame).await?;
            return Ok(None);
        }
        let body = wire::encode_body(&publication)?;
        let keys = vec![inner.meta_key(room), inner.stream_key(room)];
        let args = vec![
            Value::from(inner.channel(room)),
            Value::Bytes(Bytes::from(body)),
            Value::Integer(lua_count(history.size)),
            Value::Integer(ttl_ms(history.ttl)),
            Value::from(new_epoch()),
            Value::from(inner.publish_command()),
        ];
        let reply = inner.publish.run(&inner.cmd, keys, args).await?;
        let Value::Array(mut items) = reply else {
            return Err(RedisError::Reply(format!("publish script returned {reply:?}")));
        };
        if items.len() != 2 {
            return Err(RedisError::Reply(format!("publish script returned {} values", items.len())));
        }
        let epoch = items.pop().and_then(value_string);
        let offset = items.pop().as_ref().and_then(value_u64);
        match (offset, epoch) {
            (Some(offset), Some(epoch)) if offset > 0 => Ok(Some(Position { offset, epoch })),
            other => Err(RedisError::Reply(format!("publish script returned {other:?}"))),
        }
    }

    async fn publish_idempotent(
        &self,
        publication: BrokerPublication,
        history: HistoryOptions,
        key: &str,
        window: Duration,
    ) -> Result<Idempotent, RedisError> {
        check_idempotent(key, window)?;
        let inner = &self.inner;
        let room = &publication.room;
        let on = history.enabled();
        let payload =
            if on { wire::encode_body(&publication)? } else { wire::encode_publication(&publication)? };
        let keys = vec![inner.meta_key(room), inner.stream_key(room), inner.idempotency_key(room, key)];
        let args = vec![
            Value::from(inner.channel(room)),
            Value::Bytes(Bytes::from(payload)),
            Value::Integer(lua_count(history.size)),
            Value::Integer(ttl_ms(history.ttl)),
            Value::from(new_epoch()),
            Value::from(inner.publish_command()),
            Value::Integer(ttl_ms(window)),
            Value::from(if on { "1" } else { "0" }),
        ];
        let reply = inner.publish_idempotent.run(&inner.cmd, keys, args).await?;
        let bad = || RedisError::Reply(format!("idempotent publish script returned {reply:?}"));
        let Value::Array(items) = &reply else {
            return Err(bad());
        };
        let [flag, stored] = items.as_slice() else {
            return Err(bad());
        };
        let stored = value_string(stored.clone()).ok_or_else(bad)?;
        let position = if stored.is_empty() {
            None
        } else {
            let (offset, epoch) = stored.split_once(':').ok_or_else(bad)?;
            let offset = offset.parse::<u64>().map_err(|_| bad())?;
            Some(Position { offset, epoch: epoch.to_string() })
        };
        match value_u64(flag) {
            Some(1) => Ok(Idempotent::Published(position)),
            Some(0) => Ok(Idempotent::Duplicate(position)),
            _ => Err(bad()),
        }
    }

    async fn publish_control(&self, payload: Bytes) -> Result<(), RedisError> {
        check_control(&payload)?;
        let inner = &self.inner;
        let channel = control_channel(&inner.config.prefix);
        if inner.config.cluster {
            inner.cmd.spublish::<Value, _, _>(channel, payload).await?;
        } else {
            inner.cmd.publish::<Value, _, _>(channel, payload).await?;
        }
        Ok(())
    }

    async fn publish_event(&self, room: &Room, event: RoomEvent) -> Result<(), RedisError> {
        let frame = wire::encode_event(room, &event)?;
        self.publish_frame(room, frame).await
    }

    async fn history(
        &self,
        room: &Room,
        query: HistoryQuery,
        history: HistoryOptions,
    ) -> Result<HistoryPage, RedisError> {
        let inner = &self.inner;
        if !history.enabled() {
            // Nothing is kept in such a room: no position either.
            return Ok(HistoryPage {
                position: Position { offset: 0, epoch: String::new() },
                publications: Vec::new(),
                continuable: query.since.is_none(),
            });
        }
        let keys = vec![inner.meta_key(room), inner.stream_key(room)];
        let (since_offset, since_epoch) = match &query.since {
            Some(p) => (p.offset.to_string(), p.epoch.clone()),
            None => (String::new(), String::new()),
        };
        // No page holds more than the history keeps.
        let limit = query.limit.map_or(-1, |l| lua_count(l.min(history.size)));
        let args = vec![
            Value::Integer(ttl_ms(history.ttl)),
            Value::from(new_epoch()),
            Value::from(since_offset),
            Value::from(since_epoch),
            Value::Integer(limit),
            Value::from(if query.reverse { "1" } else { "0" }),
        ];
        let reply = inner.history.run(&inner.cmd, keys, args).await?;
        let Value::Array(items) = reply else {
            return Err(RedisError::Reply(format!("history script returned {reply:?}")));
        };
        if items.len() < 3 || items.len() % 2 == 0 {
            return Err(RedisError::Reply(format!("history script returned {} values", items.len())));
        }
        let mut it = items.into_iter();
        let bad = |what: &str| RedisError::Reply(format!("history script: bad {what}"));
        let offset = it.next().as_ref().and_then(value_u64).ok_or_else(|| bad("offset"))?;
        let epoch = it.next().and_then(value_string).ok_or_else(|| bad("epoch"))?;
        let continuable = it.next().as_ref().and_then(value_u64).ok_or_else(|| bad("flag"))? == 1;
        let mut publications = Vec::with_capacity(it.len() / 2);
        while let (Some(id), Some(body)) = (it.next(), it.next()) {
            let id = value_string(id).ok_or_else(|| bad("entry id"))?;
            let pub_offset =
                id.split_once('-').and_then(|(n, _)| n.parse::<u64>().ok()).ok_or_else(|| bad("entry id"))?;
            let body = value_bytes(body).ok_or_else(|| bad("entry"))?;
            let mut p = wire::decode_body(&body)?;
            p.offset = Some(pub_offset);
            p.epoch = Some(epoch.clone());
            publications.push(p);
        }
        Ok(HistoryPage { position: Position { offset, epoch }, publications, continuable })
    }

    async fn remove_history(&self, room: &Room) -> Result<(), RedisError> {
        let inner = &self.inner;
        let del = CustomCommand::new_static("DEL", ClusterHash::FirstKey, false);
        inner.cmd.custom::<Value, _>(del, vec![inner.meta_key(room), inner.stream_key(room)]).await?;
        Ok(())
    }

    fn is_ready(&self) -> bool {
        let inner = &self.inner;
        inner.handler.get().is_some()
            && inner.synced.load(Ordering::SeqCst)
            && inner.sub.is_connected()
            && inner.cmd.is_connected()
    }
}

impl RedisBroker {
    async fn publish_frame(&self, room: &Room, frame: Vec<u8>) -> Result<(), RedisError> {
        let inner = &self.inner;
        let channel = inner.channel(room);
        let frame = Bytes::from(frame);
        if inner.config.cluster {
            inner.cmd.spublish::<Value, _, _>(channel, frame).await?;
        } else {
            inner.cmd.publish::<Value, _, _>(channel, frame).await?;
        }
        Ok(())
    }
}

/// Largest number handed to Lua: Lua prints larger numbers in exponent notation, which
/// Redis refuses as an integer argument.
const LUA_MAX: i64 = 99_999_999_999_999;

/// A TTL in ms, at least 1 and at most [`LUA_MAX`] (three thousand years).
fn ttl_ms(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_millis()).unwrap_or(LUA_MAX).clamp(1, LUA_MAX)
}

/// A count for Lua, at most [`LUA_MAX`].
fn lua_count(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(LUA_MAX).min(LUA_MAX)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use roomcast_protocol::{Data, Member, PublisherInfo};

    #[test]
    fn urls() {
        let cfg = RedisConfig::from_url("redis://127.0.0.1:7000,127.0.0.1:7001?cluster=1").unwrap();
        assert!(cfg.cluster);
        assert!(RedisConfig::from_url("redis://127.0.0.1:7000?presence_ttl_ms=10").is_ok());
        assert!(
            matches!(RedisConfig::from_url("rediss://a:1"), Err(RedisError::Config(e)) if e.contains("TLS"))
        );
    }

    fn publication() -> BrokerPublication {
        let mut p = BrokerPublication::new(
            Room::parse("chat:a/b@c=d,e").unwrap(),
            Data::from_json(&b"{\"x\":[1,2]}"[..]).unwrap(),
        );
        p.info = Some(PublisherInfo { client: "c1".into(), user: "u1".into() });
        p.skip_client = Some("c1".into());
        p
    }

    #[test]
    fn frames_round_trip() {
        let p = publication();
        let frame = Bytes::from(wire::encode_publication(&p).unwrap());
        match wire::decode_frame(&frame).unwrap() {
            wire::Frame::Publication(q) => assert_eq!(q, p),
            other => panic!("{other:?}"),
        }
        let body = Bytes::from(wire::encode_body(&p).unwrap());
        assert_eq!(wire::decode_body(&body).unwrap(), p);
        let m = Member {
            client: "c".into(),
            user: "".into(),
            info: Some(Data::from_json(&b"\"i\""[..]).unwrap()),
            room_info: None,
        };
        let frame = Bytes::from(wire::encode_event(&p.room, &RoomEvent::Leave(m.clone())).unwrap());
        match wire::decode_frame(&frame).unwrap() {
            wire::Frame::Event(r, RoomEvent::Leave(got)) => {
                assert_eq!(r, p.room);
                assert_eq!(got, m);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn garbage_never_panics() {
        let p = publication();
        let good = wire::encode_publication(&p).unwrap();
        // Every truncation and every single-byte corruption decodes to an error or a frame.
        for n in 0..good.len() {
            let _ = wire::decode_frame(&Bytes::copy_from_slice(&good[..n]));
            for b in [0x00, 0x7f, 0xc1, 0xdc, 0xdd, 0xdf, 0xff] {
                let mut bad = good.clone();
                bad[n] = b;
                let _ = wire::decode_frame(&Bytes::from(bad));
            }
        }
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        for len in 0..400 {
            let buf: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            let _ = wire::decode_frame(&Bytes::from(buf));
        }
        assert!(wire::decode_frame(&Bytes::from_static(b"")).is_err());
        assert!(wire::decode_frame(&Bytes::from_static(&[0x09])).is_err());
    }
}
