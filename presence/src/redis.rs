//! [`RedisPresence`]: room membership kept in Redis (feature `redis`, on by default), shared
//! by every node of a cluster.
//!
//! # Connection URL
//!
//! The broker's URL (see `roomcast_broker::redis`): `redis://host:port[/db]`, several seed
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
//! `add` is idempotent and is the refresh: a node must add each of its members again at
//! least every TTL (every TTL/3 is the recommendation, see [`RedisPresence::refresh_every`]),
//! or they expire.
//!
//! # Failures
//!
//! The client reconnects by itself; meanwhile commands fail with [`RedisError`] after the
//! timeout. Nothing is retried by this module. An entry that does not decode fails the
//! `members` call rather than being silently dropped.

use std::time::Duration;

use bytes::Bytes;
use fred::clients::Client;
use fred::error::Error as FredError;
use fred::interfaces::{ClientLike, LuaInterface};
use fred::types::Value;
use fred::types::config::{Config as FredConfig, ReconnectPolicy};
use roomcast_protocol::{DataError, Member, Room};
use sha1::{Digest, Sha1};

use crate::{Presence, PresenceStats};

/// Default key prefix.
pub const DEFAULT_PREFIX: &str = "roomcast";
/// Default bound of every Redis command.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
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
}

impl RedisPresenceConfig {
    /// Parses a connection URL (see the module documentation).
    pub fn from_url(url: &str) -> Result<Self, RedisError> {
        let url = url.trim();
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(RedisError::Config(format!("{url:?} is not a redis:// URL")));
        };
        let mut cluster = match scheme {
            "redis" | "valkey" => false,
            "redis-cluster" | "valkey-cluster" => true,
            "rediss" | "valkeys" | "rediss-cluster" | "valkeys-cluster" => {
                return Err(RedisError::Config("TLS (rediss://) is not supported by this build".into()));
            }
            other => return Err(RedisError::Config(format!("unsupported scheme {other:?}"))),
        };
        let (location, query) = rest.split_once('?').unwrap_or((rest, ""));
        let mut prefix = DEFAULT_PREFIX.to_string();
        let mut timeout = DEFAULT_TIMEOUT;
        let mut ttl = DEFAULT_TTL;
        let mut passed: Vec<String> = Vec::new();
        let positive_ms = |k: &str, v: &str| match v.parse::<u64>() {
            Ok(ms) if ms > 0 => Ok(Duration::from_millis(ms)),
            _ => Err(RedisError::Config(format!("{k} {v:?}: expected a positive integer"))),
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "prefix" => {
                    let ok = !v.is_empty()
                        && v.len() <= 64
                        && v.bytes().all(|b| b.is_ascii_graphic() && b != b'{' && b != b'}');
                    if !ok {
                        return Err(RedisError::Config(format!(
                            "prefix {v:?}: 1 to 64 printable bytes, no braces"
                        )));
                    }
                    prefix = v.to_string();
                }
                "timeout_ms" => timeout = positive_ms(k, v)?,
                "presence_ttl_ms" => ttl = positive_ms(k, v)?,
                "cluster" => match v {
                    "true" | "1" | "yes" => cluster = true,
                    "false" | "0" | "no" => {}
                    _ => return Err(RedisError::Config(format!("cluster {v:?}: expected true or false"))),
                },
                _ => passed.push(pair.to_string()),
            }
        }
        let (authority, path) = match location.find('/') {
            Some(i) => location.split_at(i),
            None => (location, ""),
        };
        let (creds, hosts) = match authority.rfind('@') {
            Some(i) => authority.split_at(i + 1),
            None => ("", authority),
        };
        let mut seeds = hosts.split(',').map(str::trim).filter(|h| !h.is_empty());
        let Some(first) = seeds.next() else {
            return Err(RedisError::Config("no host in the URL".into()));
        };
        let extra: Vec<&str> = seeds.collect();
        if !extra.is_empty() && !cluster {
            return Err(RedisError::Config(
                "several hosts need cluster mode (cluster=true or redis-cluster://)".into(),
            ));
        }
        passed.extend(extra.iter().map(|h| format!("node={h}")));
        let scheme = if cluster { "redis-cluster" } else { "redis" };
        let mut client_url = format!("{scheme}://{creds}{first}{path}");
        if !passed.is_empty() {
            client_url.push('?');
            client_url.push_str(&passed.join("&"));
        }
        let client = if cluster {
            FredConfig::from_url_clustered(&client_url)
        } else {
            FredConfig::from_url_centralized(&client_url)
        }
        .map_err(|e| RedisError::Config(e.to_string()))?;
        Ok(RedisPresenceConfig { client, prefix, timeout, ttl })
    }
}

struct Script {
    src: String,
    sha: String,
}

impl Script {
    fn new(body: &str) -> Self {
        let src = format!("{COMMON}{body}");
        let sha = Sha1::digest(src.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
        Script { src, sha }
    }

    async fn run(&self, client: &Client, keys: Vec<String>, args: Vec<Value>) -> Result<Value, FredError> {
        match client.evalsha::<Value, _, _, _>(self.sha.as_str(), keys.clone(), args.clone()).await {
            Err(e) if e.details().starts_with("NOSCRIPT") => client.eval(self.src.as_str(), keys, args).await,
            other => other,
        }
    }
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

/// Presence in Redis. See the module documentation.
pub struct RedisPresence {
    client: Client,
    config: RedisPresenceConfig,
    add: Script,
    remove: Script,
    members: Script,
    stats: Script,
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
            })
            .set_policy(ReconnectPolicy::new_exponential(0, 50, 2_000, 2));
        let client = builder.build()?;
        client.init().await?;
        Ok(RedisPresence {
            client,
            config,
            add: Script::new(ADD),
            remove: Script::new(REMOVE),
            members: Script::new(MEMBERS),
            stats: Script::new(STATS),
        })
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

    fn keys(&self, room: &Room) -> Vec<String> {
        let base = format!("{}:{{{}}}:presence", self.config.prefix, room.as_str());
        let (expiry, users) = (format!("{base}:expiry"), format!("{base}:users"));
        vec![base, expiry, users]
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
            Value::Bytes(e),
            Value::Integer(ttl_ms(self.config.ttl)),
        ];
        self.add.run(&self.client, self.keys(room), args).await?;
        Ok(())
    }

    async fn remove(&self, room: &Room, client: &str) -> Result<(), RedisError> {
        self.remove.run(&self.client, self.keys(room), vec![Value::from(client)]).await?;
        Ok(())
    }

    async fn members(&self, room: &Room, limit: usize) -> Result<Option<Vec<Member>>, RedisError> {
        let limit = Value::Integer(i64::try_from(limit).unwrap_or(i64::MAX));
        let reply = self.members.run(&self.client, self.keys(room), vec![limit]).await?;
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
        let reply = self.stats.run(&self.client, self.keys(room), Vec::new()).await?;
        match reply {
            Value::Array(v) if v.len() == 2 => match (value_u64(&v[0]), value_u64(&v[1])) {
                (Some(clients), Some(users)) => Ok(PresenceStats { clients, users }),
                other => Err(RedisError::Reply(format!("stats script returned {other:?}"))),
            },
            other => Err(RedisError::Reply(format!("stats script returned {other:?}"))),
        }
    }
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
