//! [`RedisPresence`]: room membership kept in Redis (feature `redis`, on by default), shared
//! by every node of a cluster.
//!
//! # Connection URL
//!
//! The broker's URL (parsed by `roomcast_redis_common::parse_url`, shared with the broker):
//! `redis://host:port[/db]`, several seed
//! hosts with `cluster=true` (or `redis-cluster://`) for Redis Cluster, `prefix` (default
//! `roomcast`) and `timeout_ms` (default 5000), plus `presence_ttl_ms` (default 30000): how
//! long a member lives without being added again.
//!
//! # Key layout
//!
//! A room's keys share the room as Redis Cluster hash tag (one shard per room):
//!
//! | key | type | content |
//! |---|---|---|
//! | `<prefix>:{<room>}:presence` | hash | client id → `<user length>:<user><member>` (member: MessagePack `[client, user, info, room_info]`, each info nil or `[0, JSON bytes]`) |
//! | `<prefix>:{<room>}:presence:expiry` | sorted set | client id, scored by its expiry (ms, Redis clock) |
//! | `<prefix>:{<room>}:presence:users` | hash | user → how many of the room's clients are that user's |
//!
//! # Script contracts
//!
//! Every operation is one Lua script over the three keys (Redis 7.0 has no per-field hash
//! expiry), and every script first removes the members whose expiry passed, decrementing
//! their users, so a dead node's members vanish at most one TTL after its last refresh.
//!
//! - **add**: replaces the client's entry (moving its user count when the user changed),
//!   sets its expiry to now + TTL, and makes the three keys expire with the longest-lived
//!   member (a room whose members all stopped being refreshed disappears whole, and a node
//!   with a short TTL never cuts another node's members short).
//! - **remove**: forgets the client, if present.
//! - **members**: the entries, or a "too many" flag when there are more than the limit.
//! - **stats**: `HLEN` of the members and of the users hash.
//!
//! `add` is idempotent and is the refresh: this module adds each of its node's members
//! again every TTL/3 ([`RedisPresence::refresh_every`]) by itself, until they are removed or
//! the presence is dropped (a refresh that raced a `remove` is undone at once).
//!
//! # Node registry and reaping
//!
//! | key | type | content |
//! |---|---|---|
//! | `<prefix>:{nodes}` | sorted set | node incarnation, scored by its last heartbeat (ms, Redis clock) |
//! | `<prefix>:{nodes}:info` | hash | node incarnation → `<connections> <rooms> <node id>` |
//! | `<prefix>:node:{<incarnation>}:members` | set | `<room>\n<client>` of every member that run added |
//!
//! `reap(timeout)` takes the incarnations whose score is older than `timeout`, pops their
//! member sets (`SPOP`, so concurrent reapers split the work) and removes each member with
//! a script that returns the entry only if it was still there: a member is returned to
//! exactly one reaper. Then the incarnation leaves the registry, unless it sent a
//! heartbeat meanwhile. The member sets expire after twice the TTL without refresh, so a
//! cluster that stopped whole leaves nothing behind.
//!
//! # Failures
//!
//! The client reconnects by itself; meanwhile commands fail with [`RedisError`] after the
//! timeout. Nothing is retried by this module. An entry that does not decode fails the
//! `members` call rather than being silently dropped.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use fred::clients::Client;
use fred::error::Error as FredError;
use fred::interfaces::{ClientLike, KeysInterface, SetsInterface};
use fred::types::Value;
use fred::types::config::{Config as FredConfig, ReconnectPolicy};
use roomcast_protocol::{DataError, Member, Room};
use roomcast_redis_common::Script;

use crate::{NodeInfo, Presence, PresenceStats, Reaped};

/// Default key prefix.
pub const DEFAULT_PREFIX: &str = roomcast_redis_common::DEFAULT_PREFIX;
/// Default bound of every Redis command.
pub const DEFAULT_TIMEOUT: Duration = roomcast_redis_common::DEFAULT_TIMEOUT;
/// Default life of a member not added again.
pub const DEFAULT_TTL: Duration = Duration::from_secs(30);

/// What can go wrong keeping presence in Redis.
#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    #[error("redis: {0}")]
    Redis(#[from] FredError),
    #[error("invalid redis configuration: {0}")]
    Config(String),
    #[error("unexpected reply from redis: {0}")]
    Reply(String),
    #[error("cannot encode member: {0}")]
    Encode(#[from] DataError),
    #[error("stored member does not decode: {0}")]
    Decode(&'static str),
}

/// Where and how to reach Redis; see the module documentation for the URL.
#[derive(Debug, Clone)]
pub struct RedisPresenceConfig {
    /// The client library's configuration.
    pub client: FredConfig,
    pub prefix: String,
    pub timeout: Duration,
    /// How long a member lives without being added again.
    pub ttl: Duration,
    /// This node run's incarnation (see [`crate::incarnation_of`]): members are recorded
    /// under it. `from_url` makes a random one; a node sets its own.
    pub node: String,
}

impl RedisPresenceConfig {
    /// Parses a connection URL (see the module documentation).
    pub fn from_url(url: &str) -> Result<Self, RedisError> {
        let u = roomcast_redis_common::parse_url(url).map_err(RedisError::Config)?;
        Ok(RedisPresenceConfig {
            client: u.client,
            prefix: u.prefix,
            timeout: u.timeout,
            ttl: u.presence_ttl.unwrap_or(DEFAULT_TTL),
            node: crate::incarnation_of(&crate::random_node_id()),
        })
    }
}

/// A script over a room's three keys (see `COMMON`).
fn room_script(body: &str) -> Script {
    Script::new(format!("{COMMON}{body}"))
}

/// KEYS of every script: members hash, expiry sorted set, users hash.
const COMMON: &str = r#"
local members, expiry, users = KEYS[1], KEYS[2], KEYS[3]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
-- The user of a stored entry `<len>:<user><member>`.
local function user_of(v)
  local sep = string.find(v, ':', 1, true)
  if not sep then return nil end
  local n = tonumber(string.sub(v, 1, sep - 1))
  if not n then return nil end
  return string.sub(v, sep + 1, sep + n)
end
local function forget(client)
  local old = redis.call('HGET', members, client)
  if old then
    redis.call('HDEL', members, client)
    local u = user_of(old)
    if u and redis.call('HINCRBY', users, u, -1) <= 0 then redis.call('HDEL', users, u) end
  end
  redis.call('ZREM', expiry, client)
end
local dead = redis.call('ZRANGEBYSCORE', expiry, '-inf', now)
for i = 1, #dead do forget(dead[i]) end
"#;

/// ARGV: client, entry, ttl ms.
const ADD: &str = r#"
local ttl = tonumber(ARGV[3])
forget(ARGV[1])
redis.call('HSET', members, ARGV[1], ARGV[2])
redis.call('HINCRBY', users, user_of(ARGV[2]) or '', 1)
redis.call('ZADD', expiry, now + ttl, ARGV[1])
-- The keys live as long as their longest-lived member (nodes may use other TTLs).
local last = redis.call('ZRANGE', expiry, -1, -1, 'WITHSCORES')
local at = math.max(now + ttl, tonumber(last[2]) or 0)
redis.call('PEXPIREAT', members, at)
redis.call('PEXPIREAT', expiry, at)
redis.call('PEXPIREAT', users, at)
return 1
"#;

/// ARGV: client.
const REMOVE: &str = r#"
forget(ARGV[1])
return 1
"#;

/// ARGV: limit. Returns {0} when there are more members, else {1, entry, entry, …}.
const MEMBERS: &str = r#"
if redis.call('HLEN', members) > tonumber(ARGV[1]) then return {0} end
local out = redis.call('HVALS', members)
table.insert(out, 1, 1)
return out
"#;

const STATS: &str = r#"
return {redis.call('HLEN', members), redis.call('HLEN', users)}
"#;

/// ARGV: client. The entry removed, or false when it was not there (any more).
const TAKE: &str = r#"
local old = redis.call('HGET', members, ARGV[1])
if not old then return false end
forget(ARGV[1])
return old
"#;

/// KEYS: registry sorted set, registry hash. ARGV: incarnation, info. Returns now (ms).
const HEARTBEAT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return now
"#;

/// KEYS: registry sorted set, registry hash. ARGV: timeout ms, 1 for the live nodes' infos
/// or 0 for every incarnation with its silence in ms (`{inc, ms, inc, ms, …}`).
const REGISTRY: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cutoff = now - tonumber(ARGV[1])
if ARGV[2] == '1' then
  local live = redis.call('ZRANGEBYSCORE', KEYS[1], cutoff, '+inf')
  if #live == 0 then return {} end
  return redis.call('HMGET', KEYS[2], unpack(live))
end
local all = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
for i = 2, #all, 2 do all[i] = now - tonumber(all[i]) end
return all
"#;

/// KEYS: registry sorted set, registry hash. ARGV: incarnation, timeout ms (0: always).
/// Forgets the incarnation unless it was heard of within the timeout.
const FORGET_NODE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local score = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]))
if score and tonumber(ARGV[2]) > 0 and score >= now - tonumber(ARGV[2]) then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
return 1
"#;

/// Members popped from a dead node's set per round trip.
const REAP_BATCH: usize = 256;
/// Concurrent scripts of one refresh round.
const REFRESH_CONCURRENCY: usize = 64;

/// One of this node's members, kept to refresh it: its stored entry.
#[derive(Clone)]
struct Mine {
    entry: Bytes,
}

/// The scripts, shared with the refresher.
struct Scripts {
    add: Script,
    remove: Script,
    members: Script,
    stats: Script,
    take: Script,
    heartbeat: Script,
    registry: Script,
    forget_node: Script,
}

/// This node's members by (room, client), refreshed until removed.
type MineMap = HashMap<(Room, String), Mine>;
/// Presence in Redis. See the module documentation.
pub struct RedisPresence {
    client: Client,
    config: Arc<RedisPresenceConfig>,
    scripts: Arc<Scripts>,
    /// This node's members, refreshed every TTL/3 by a task that ends when this is
    /// dropped (it holds only a weak reference).
    mine: Arc<parking_lot::Mutex<MineMap>>,
}

impl std::fmt::Debug for RedisPresence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisPresence")
            .field("prefix", &self.config.prefix)
            .field("ttl", &self.config.ttl)
            .finish_non_exhaustive()
    }
}

impl RedisPresence {
    /// Connects. Fails when Redis cannot be reached.
    pub async fn connect(config: RedisPresenceConfig) -> Result<Self, RedisError> {
        let mut builder = fred::types::Builder::from_config(config.client.clone());
        builder
            .with_performance_config(|p| p.default_command_timeout = config.timeout)
            .with_connection_config(|c| {
                c.connection_timeout = config.timeout;
                c.internal_command_timeout = config.timeout;
                c.max_command_attempts = 1;
                // Small commands and replies: without this, Nagle and delayed ACKs add up to 40 ms.
                c.tcp.nodelay = Some(true);
            })
            .set_policy(ReconnectPolicy::new_exponential(0, 50, 2_000, 2));
        let client = builder.build()?;
        client.init().await?;
        let scripts = Arc::new(Scripts {
            add: room_script(ADD),
            remove: room_script(REMOVE),
            members: room_script(MEMBERS),
            stats: room_script(STATS),
            take: room_script(TAKE),
            heartbeat: Script::new(HEARTBEAT.to_string()),
            registry: Script::new(REGISTRY.to_string()),
            forget_node: Script::new(FORGET_NODE.to_string()),
        });
        let config = Arc::new(config);
        let mine = Arc::new(parking_lot::Mutex::new(HashMap::new()));
        tokio::spawn(refresher(client.clone(), config.clone(), scripts.clone(), Arc::downgrade(&mine)));
        Ok(RedisPresence { client, config, scripts, mine })
    }

    /// [`RedisPresence::connect`] with a URL.
    pub async fn connect_url(url: &str) -> Result<Self, RedisError> {
        Self::connect(RedisPresenceConfig::from_url(url)?).await
    }

    /// How long a member lives without being added again.
    pub fn ttl(&self) -> Duration {
        self.config.ttl
    }

    /// How often a node should add its members again: a third of the TTL.
    pub fn refresh_every(&self) -> Duration {
        self.config.ttl / 3
    }

    /// Whether the connection is up.
    pub fn is_connected(&self) -> bool {
        self.client.is_connected()
    }

    /// Closes the connection.
    pub async fn close(&self) {
        let _ = self.client.quit().await;
    }

    /// This node run's incarnation.
    pub fn incarnation(&self) -> &str {
        &self.config.node
    }

    /// Members this node keeps alive.
    pub fn local_member_count(&self) -> usize {
        self.mine.lock().len()
    }

    fn keys(&self, room: &Room) -> Vec<String> {
        room_keys(&self.config.prefix, room)
    }

    fn registry_keys(&self) -> Vec<String> {
        let base = format!("{}:{{nodes}}", self.config.prefix);
        let info = format!("{base}:info");
        vec![base, info]
    }

    /// Removes `client` from `room` if it is there; its entry when this call removed it.
    async fn take(&self, room: &Room, client: &str) -> Result<Option<Member>, RedisError> {
        let reply = self.scripts.take.run(&self.client, self.keys(room), vec![Value::from(client)]).await?;
        match reply {
            Value::Null => Ok(None),
            v => {
                let b =
                    value_bytes(v).ok_or_else(|| RedisError::Reply("taken entry is not a string".into()))?;
                entry::decode(&b).map(Some).map_err(RedisError::Decode)
            }
        }
    }
}

fn room_keys(prefix: &str, room: &Room) -> Vec<String> {
    let base = format!("{prefix}:{{{}}}:presence", room.as_str());
    let (expiry, users) = (format!("{base}:expiry"), format!("{base}:users"));
    vec![base, expiry, users]
}

/// The member set of a node run.
fn index_key(prefix: &str, incarnation: &str) -> String {
    format!("{prefix}:node:{{{incarnation}}}:members")
}

fn index_entry(room: &Room, client: &str) -> String {
    format!("{}\n{client}", room.as_str())
}

/// Adds this node's members again every TTL/3 until the presence is dropped.
async fn refresher(
    client: Client,
    config: Arc<RedisPresenceConfig>,
    scripts: Arc<Scripts>,
    mine: Weak<parking_lot::Mutex<MineMap>>,
) {
    use futures_util::StreamExt;
    let every = config.ttl / 3;
    let index = index_key(&config.prefix, &config.node);
    let ttl = ttl_ms(config.ttl);
    loop {
        tokio::time::sleep(every).await;
        let Some(strong) = mine.upgrade() else {
            return;
        };
        let batch: Vec<((Room, String), Mine)> =
            strong.lock().iter().map(|(k, m)| (k.clone(), m.clone())).collect();
        drop(strong);
        if batch.is_empty() {
            continue;
        }
        let entries: Vec<String> = batch.iter().map(|((r, c), _)| index_entry(r, c)).collect();
        for chunk in entries.chunks(1024) {
            if let Err(e) = client.sadd::<Value, _, _>(index.as_str(), chunk.to_vec()).await {
                tracing::warn!(error = %e, "presence refresh failed");
            }
        }
        let _ = client.pexpire::<Value, _>(index.as_str(), ttl.saturating_mul(2), None).await;
        let failed = futures_util::stream::iter(batch)
            .map(|((room, c), m)| {
                let (client, scripts, mine, prefix) = (&client, &scripts, &mine, &config.prefix);
                async move {
                    let keys = room_keys(prefix, &room);
                    let args =
                        vec![Value::from(c.as_str()), Value::Bytes(m.entry.clone()), Value::Integer(ttl)];
                    let r = scripts.add.run(client, keys.clone(), args).await;
                    // Removed while this refresh ran: undo the refresh. (Replaced by a newer
                    // `add`: the next round writes the newer entry.)
                    let removed =
                        mine.upgrade().is_none_or(|mine| !mine.lock().contains_key(&(room, c.clone())));
                    if removed {
                        let _ = scripts.remove.run(client, keys, vec![Value::from(c.as_str())]).await;
                    }
                    r.is_err()
                }
            })
            .buffer_unordered(REFRESH_CONCURRENCY)
            .filter(|failed| std::future::ready(*failed))
            .count()
            .await;
        if failed > 0 {
            tracing::warn!(failed, "presence refresh failed for some members");
        }
    }
}

impl Drop for RedisPresence {
    fn drop(&mut self) {
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let client = self.client.clone();
            rt.spawn(async move {
                let _ = client.quit().await;
            });
        }
    }
}

/// Stored entries: `<user length>:<user>` then the member as MessagePack.
mod entry {
    use bytes::Bytes;
    use roomcast_protocol::mp::{Reader, Token, write};
    use roomcast_protocol::{Data, DataError, Member};

    pub fn encode(m: &Member) -> Result<Vec<u8>, DataError> {
        let mut out = format!("{}:{}", m.user.len(), m.user).into_bytes();
        write::array_len(&mut out, 4);
        write::str(&mut out, &m.client);
        write::str(&mut out, &m.user);
        for d in [&m.info, &m.room_info] {
            match d {
                None => write::nil(&mut out),
                Some(d) => {
                    let json = d.json()?;
                    write::array_len(&mut out, 2);
                    write::uint(&mut out, 0);
                    write::bin(&mut out, json);
                }
            }
        }
        Ok(out)
    }

    pub fn decode(buf: &Bytes) -> Result<Member, &'static str> {
        let sep = buf.iter().position(|&b| b == b':').ok_or("no user length")?;
        let len: usize =
            std::str::from_utf8(&buf[..sep]).ok().and_then(|s| s.parse().ok()).ok_or("bad user length")?;
        let start = sep.checked_add(1).and_then(|s| s.checked_add(len)).ok_or("bad user length")?;
        if start > buf.len() {
            return Err("entry too short");
        }
        let body = buf.slice(start..);
        let mut r = Reader::new(&body);
        let str = |r: &mut Reader<'_>| -> Result<String, &'static str> {
            match r.token().map_err(|_| "truncated")? {
                Token::Str(b) | Token::Bin(b) => {
                    std::str::from_utf8(b).map(str::to_string).map_err(|_| "string is not UTF-8")
                }
                _ => Err("expected a string"),
            }
        };
        let n = match r.token().map_err(|_| "truncated")? {
            Token::Array(n) if n >= 4 => n,
            _ => return Err("expected a member"),
        };
        let client = str(&mut r)?;
        let user = str(&mut r)?;
        let mut infos = [None, None];
        for slot in &mut infos {
            *slot = match r.token().map_err(|_| "truncated")? {
                Token::Nil => None,
                Token::Array(k) if k >= 2 => {
                    let format = match r.token().map_err(|_| "truncated")? {
                        Token::Uint(f) => f,
                        _ => return Err("expected a data format"),
                    };
                    let bytes = match r.token().map_err(|_| "truncated")? {
                        Token::Bin(b) | Token::Str(b) => Bytes::copy_from_slice(b),
                        _ => return Err("expected data bytes"),
                    };
                    for _ in 2..k {
                        r.value(1).map_err(|_| "truncated")?;
                    }
                    let d = match format {
                        0 => Data::from_json(bytes),
                        1 => Data::from_msgpack(bytes),
                        _ => return Err("unknown data format"),
                    };
                    Some(d.map_err(|_| "invalid data")?)
                }
                _ => return Err("expected nil or data"),
            };
        }
        for _ in 4..n {
            r.value(1).map_err(|_| "truncated")?;
        }
        if !r.is_empty() {
            return Err("trailing bytes");
        }
        let [info, room_info] = infos;
        Ok(Member { client, user, info, room_info })
    }
}

fn value_bytes(v: Value) -> Option<Bytes> {
    match v {
        Value::Bytes(b) => Some(b),
        Value::String(s) => Some(s.into_inner()),
        _ => None,
    }
}

fn value_u64(v: &Value) -> Option<u64> {
    match v {
        Value::Integer(i) => u64::try_from(*i).ok(),
        _ => None,
    }
}

/// A TTL in ms for Lua: at least 1, and small enough that Lua never prints it in exponent
/// notation (which Redis refuses as an integer).
fn ttl_ms(ttl: Duration) -> i64 {
    const LUA_MAX: i64 = 99_999_999_999;
    i64::try_from(ttl.as_millis()).unwrap_or(LUA_MAX).clamp(1, LUA_MAX)
}

impl Presence for RedisPresence {
    type Error = RedisError;

    async fn add(&self, room: &Room, member: &Member) -> Result<(), RedisError> {
        let e = Bytes::from(entry::encode(member)?);
        let args = vec![
            Value::from(member.client.as_str()),
            Value::Bytes(e.clone()),
            Value::Integer(ttl_ms(self.config.ttl)),
        ];
        // Recorded first: a refresh from now on keeps it, a remove from now on undoes it.
        self.mine.lock().insert((room.clone(), member.client.clone()), Mine { entry: e });
        let index = index_key(&self.config.prefix, &self.config.node);
        let (added, indexed) = tokio::join!(
            self.scripts.add.run(&self.client, self.keys(room), args),
            self.client.sadd::<Value, _, _>(index.as_str(), index_entry(room, &member.client)),
        );
        added?;
        indexed?;
        Ok(())
    }

    async fn remove(&self, room: &Room, client: &str) -> Result<(), RedisError> {
        self.mine.lock().remove(&(room.clone(), client.to_string()));
        let index = index_key(&self.config.prefix, &self.config.node);
        let (removed, unindexed) = tokio::join!(
            self.scripts.remove.run(&self.client, self.keys(room), vec![Value::from(client)]),
            self.client.srem::<Value, _, _>(index.as_str(), index_entry(room, client)),
        );
        removed?;
        unindexed?;
        Ok(())
    }

    async fn members(&self, room: &Room, limit: usize) -> Result<Option<Vec<Member>>, RedisError> {
        let limit = Value::Integer(i64::try_from(limit).unwrap_or(i64::MAX));
        let reply = self.scripts.members.run(&self.client, self.keys(room), vec![limit]).await?;
        let Value::Array(items) = reply else {
            return Err(RedisError::Reply(format!("members script returned {reply:?}")));
        };
        let mut it = items.into_iter();
        match it.next().as_ref().and_then(value_u64) {
            Some(0) => return Ok(None),
            Some(1) => {}
            other => return Err(RedisError::Reply(format!("members script returned flag {other:?}"))),
        }
        let mut out = Vec::with_capacity(it.len());
        for v in it {
            let b = value_bytes(v).ok_or_else(|| RedisError::Reply("member entry is not a string".into()))?;
            out.push(entry::decode(&b).map_err(RedisError::Decode)?);
        }
        out.sort_by(|a, b| a.client.cmp(&b.client));
        Ok(Some(out))
    }

    async fn stats(&self, room: &Room) -> Result<PresenceStats, RedisError> {
        let reply = self.scripts.stats.run(&self.client, self.keys(room), Vec::new()).await?;
        match reply {
            Value::Array(v) if v.len() == 2 => match (value_u64(&v[0]), value_u64(&v[1])) {
                (Some(clients), Some(users)) => Ok(PresenceStats { clients, users }),
                other => Err(RedisError::Reply(format!("stats script returned {other:?}"))),
            },
            other => Err(RedisError::Reply(format!("stats script returned {other:?}"))),
        }
    }

    async fn heartbeat(&self, node: &NodeInfo) -> Result<(), RedisError> {
        let info = format!("{} {} {}", node.connections, node.rooms, node.id);
        let args = vec![Value::from(self.config.node.as_str()), Value::from(info)];
        self.scripts.heartbeat.run(&self.client, self.registry_keys(), args).await?;
        Ok(())
    }

    async fn nodes(&self, timeout: Duration) -> Result<Vec<NodeInfo>, RedisError> {
        let args = vec![Value::Integer(ttl_ms(timeout)), Value::from("1")];
        let reply = self.scripts.registry.run(&self.client, self.registry_keys(), args).await?;
        let Value::Array(items) = reply else {
            return Err(RedisError::Reply(format!("registry script returned {reply:?}")));
        };
        let mut out = Vec::with_capacity(items.len());
        for v in items {
            // A node between its heartbeat's two writes has no info yet: skip it.
            let Some(b) = value_bytes(v) else { continue };
            out.push(parse_node_info(&b).ok_or(RedisError::Decode("node info"))?);
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    async fn reap(&self, timeout: Duration) -> Result<Vec<Reaped>, RedisError> {
        let args = vec![Value::Integer(ttl_ms(timeout)), Value::from("0")];
        let reply = self.scripts.registry.run(&self.client, self.registry_keys(), args).await?;
        let Value::Array(all) = reply else {
            return Err(RedisError::Reply(format!("registry script returned {reply:?}")));
        };
        let mut reaped = Vec::new();
        let mut it = all.into_iter();
        while let (Some(inc), Some(silent)) = (it.next(), it.next()) {
            let Some(inc) = value_bytes(inc).and_then(|b| String::from_utf8(b.to_vec()).ok()) else {
                continue;
            };
            let silent = Duration::from_millis(value_u64(&silent).unwrap_or(0));
            if !crate::is_dead(&inc, silent, timeout, &self.config.node) {
                continue;
            }
            let index = index_key(&self.config.prefix, &inc);
            loop {
                let batch: Vec<Bytes> = self.client.spop(index.as_str(), Some(REAP_BATCH)).await?;
                if batch.is_empty() {
                    break;
                }
                for e in batch {
                    let text = String::from_utf8_lossy(&e);
                    let Some((room, client)) = text.split_once('\n') else { continue };
                    let Ok(room) = Room::parse(room) else {
                        tracing::warn!(entry = %text, "presence index entry with an invalid room ignored");
                        continue;
                    };
                    if let Some(member) = self.take(&room, client).await? {
                        reaped.push(Reaped { room, member });
                    }
                }
            }
            let args = vec![Value::from(inc.as_str()), Value::Integer(ttl_ms(timeout))];
            self.scripts.forget_node.run(&self.client, self.registry_keys(), args).await?;
        }
        Ok(reaped)
    }

    async fn deregister(&self) -> Result<(), RedisError> {
        let args = vec![Value::from(self.config.node.as_str()), Value::Integer(0)];
        self.scripts.forget_node.run(&self.client, self.registry_keys(), args).await?;
        Ok(())
    }
}

/// Parses `<connections> <rooms> <node id>`.
fn parse_node_info(b: &[u8]) -> Option<NodeInfo> {
    let text = std::str::from_utf8(b).ok()?;
    let mut parts = text.splitn(3, ' ');
    let connections = parts.next()?.parse().ok()?;
    let rooms = parts.next()?.parse().ok()?;
    let id = parts.next()?.to_string();
    Some(NodeInfo { id, connections, rooms })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use roomcast_protocol::Data;

    #[test]
    fn urls() {
        let c =
            RedisPresenceConfig::from_url("redis://127.0.0.1:1/3?prefix=p&presence_ttl_ms=900&timeout_ms=7")
                .unwrap();
        assert_eq!(
            (c.prefix.as_str(), c.ttl, c.timeout),
            ("p", Duration::from_millis(900), Duration::from_millis(7))
        );
        let c = RedisPresenceConfig::from_url("redis://127.0.0.1:1").unwrap();
        assert_eq!((c.prefix.as_str(), c.ttl), (DEFAULT_PREFIX, DEFAULT_TTL));
        assert!(RedisPresenceConfig::from_url("redis://a:1,b:2?cluster=true").is_ok());
        assert!(RedisPresenceConfig::from_url("redis://a:1,b:2").is_err());
        assert!(RedisPresenceConfig::from_url("rediss://a:1").is_err());
        assert!(RedisPresenceConfig::from_url("redis://a:1?presence_ttl_ms=0").is_err());
    }

    #[test]
    fn entries_round_trip_and_garbage_is_refused() {
        let m = Member {
            client: "c:1".into(),
            user: "ü:ser".into(),
            info: Some(Data::from_json(&b"{\"a\":1}"[..]).unwrap()),
            room_info: None,
        };
        let e = entry::encode(&m).unwrap();
        assert!(e.starts_with("6:ü:ser".as_bytes()));
        assert_eq!(entry::decode(&Bytes::from(e.clone())).unwrap(), m);
        for n in 0..e.len() {
            assert!(entry::decode(&Bytes::copy_from_slice(&e[..n])).is_err());
        }
        assert!(entry::decode(&Bytes::from_static(b"99999999999999999999999:x")).is_err());
        assert!(entry::decode(&Bytes::from_static(b"18446744073709551615:x")).is_err());
    }
}
