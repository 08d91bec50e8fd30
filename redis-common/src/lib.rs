//! What roomcast's Redis broker (`roomcast-broker`) and Redis presence
//! (`roomcast-presence`) share, so that both read one URL the same way:
//!
//! - [`parse_url`]: the connection URL (below) into the client library's configuration and
//!   roomcast's own parameters;
//! - [`Script`]: a Lua script run by SHA1 (`EVALSHA`), sent whole when Redis does not know
//!   it yet (`NOSCRIPT`, after a restart or on a new shard).
//!
//! # Connection URL
//!
//! ```text
//! redis://[user:password@]host[:port][/db][?prefix=roomcast&timeout_ms=5000&presence_ttl_ms=30000]
//! redis://host:port,host:port?cluster=true          Redis Cluster (seed nodes)
//! redis-cluster://host:port[,host:port…][?node=host:port…]
//! ```
//!
//! `valkey://` and `valkey-cluster://` are the same. `cluster=true` (or a `-cluster` scheme)
//! selects Redis Cluster mode; several seed nodes may be listed separated by commas or with
//! `node=` parameters. `prefix` (default `roomcast`): 1 to 64 printable bytes, no braces.
//! `timeout_ms` (default 5000) bounds every command. `presence_ttl_ms` is read by the
//! presence only. Other parameters go to the client library. TLS (`rediss://`) is not
//! built in and is refused with a clear error.

use std::time::Duration;

use fred::clients::Client;
use fred::error::Error as FredError;
use fred::interfaces::LuaInterface;
use fred::types::Value;
use fred::types::config::Config as FredConfig;
use sha1::{Digest, Sha1};

/// Default start of every key and channel name.
pub const DEFAULT_PREFIX: &str = "roomcast";
/// Default bound of every command.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// A parsed connection URL.
#[derive(Debug)]
pub struct RedisUrl {
    /// The client library's configuration: roomcast's parameters removed, extra seed hosts
    /// as `node=` parameters.
    pub client: FredConfig,
    /// The URL `client` was made from.
    pub client_url: String,
    /// Redis Cluster mode (sharded pub/sub).
    pub cluster: bool,
    pub prefix: String,
    pub timeout: Duration,
    /// `presence_ttl_ms`, when given.
    pub presence_ttl: Option<Duration>,
}

/// Whether `p` can start key names: 1 to 64 printable bytes, no braces (hash tags).
pub fn valid_prefix(p: &str) -> bool {
    !p.is_empty() && p.len() <= 64 && p.bytes().all(|b| b.is_ascii_graphic() && b != b'{' && b != b'}')
}

/// Parses a connection URL (see the crate documentation); the error says what is wrong.
pub fn parse_url(url: &str) -> Result<RedisUrl, String> {
    let url = url.trim();
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(format!("{url:?} is not a redis:// URL"));
    };
    let mut cluster = match scheme {
        "redis" | "valkey" => false,
        "redis-cluster" | "valkey-cluster" => true,
        "rediss" | "valkeys" | "rediss-cluster" | "valkeys-cluster" => {
            return Err("TLS (rediss://) is not supported by this build".into());
        }
        other => return Err(format!("unsupported scheme {other:?}: expected redis:// or redis-cluster://")),
    };
    let (location, query) = rest.split_once('?').unwrap_or((rest, ""));
    let mut prefix = DEFAULT_PREFIX.to_string();
    let mut timeout = DEFAULT_TIMEOUT;
    let mut presence_ttl = None;
    let mut passed: Vec<String> = Vec::new();
    let positive_ms = |k: &str, v: &str| match v.parse::<u64>() {
        Ok(ms) if ms > 0 => Ok(Duration::from_millis(ms)),
        _ => Err(format!("{k} {v:?}: expected a positive integer")),
    };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "prefix" => {
                if !valid_prefix(v) {
                    return Err(format!("prefix {v:?}: 1 to 64 printable bytes, no braces"));
                }
                prefix = v.to_string();
            }
            "timeout_ms" => timeout = positive_ms(k, v)?,
            "presence_ttl_ms" => presence_ttl = Some(positive_ms(k, v)?),
            "cluster" => match v {
                "true" | "1" | "yes" => cluster = true,
                "false" | "0" | "no" => {}
                _ => return Err(format!("cluster {v:?}: expected true or false")),
            },
            _ => passed.push(pair.to_string()),
        }
    }
    // Seeds listed with commas: `user:pw@a:1,b:2/0`. Commas after the credentials only.
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
        return Err("no host in the URL".into());
    };
    let extra: Vec<&str> = seeds.collect();
    if !extra.is_empty() && !cluster {
        return Err("several hosts need cluster mode (cluster=true or redis-cluster://)".into());
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
    .map_err(|e| e.to_string())?;
    Ok(RedisUrl { client, client_url, cluster, prefix, timeout, presence_ttl })
}

/// A Lua script, run by its SHA1 and sent whole when Redis does not have it.
pub struct Script {
    src: String,
    sha: String,
}

impl Script {
    pub fn new(src: String) -> Self {
        let sha = Sha1::digest(src.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
        Script { src, sha }
    }

    /// `EVALSHA`, then `EVAL` on `NOSCRIPT`.
    pub async fn run(
        &self,
        client: &Client,
        keys: Vec<String>,
        args: Vec<Value>,
    ) -> Result<Value, FredError> {
        match client.evalsha::<Value, _, _, _>(self.sha.as_str(), keys.clone(), args.clone()).await {
            Err(e) if e.details().starts_with("NOSCRIPT") => client.eval(self.src.as_str(), keys, args).await,
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn urls() {
        let c = parse_url("redis://localhost:6379/2").unwrap();
        assert_eq!(c.client_url, "redis://localhost:6379/2");
        assert!(!c.cluster);
        assert_eq!(c.prefix, "roomcast");
        let c = parse_url("redis://u:p,w@a:1,b:2?cluster=true&prefix=rc&timeout_ms=250&node=c:3").unwrap();
        assert!(c.cluster);
        assert_eq!(c.prefix, "rc");
        assert_eq!(c.timeout, Duration::from_millis(250));
        assert_eq!(c.client_url, "redis-cluster://u:p,w@a:1?node=c:3&node=b:2");
        let c = parse_url("redis-cluster://a:1,b:2").unwrap();
        assert_eq!(c.client_url, "redis-cluster://a:1?node=b:2");
        assert!(parse_url("valkey-cluster://a:1").unwrap().cluster);
        assert!(parse_url("rediss://a:1").unwrap_err().contains("TLS"));
        assert!(parse_url("redis://a:1,b:2").is_err());
        assert!(parse_url("redis://a:1?prefix=a{b}").is_err());
        assert!(parse_url("redis://a:1?timeout_ms=0").is_err());
        assert!(parse_url("redis://?x=1").is_err());
        assert!(parse_url("http://a:1").is_err());
        assert!(parse_url("a:1").is_err());
        let c = parse_url("redis://127.0.0.1:7000?presence_ttl_ms=900").unwrap();
        assert_eq!(c.presence_ttl, Some(Duration::from_millis(900)));
        assert!(parse_url("redis://127.0.0.1:7000?presence_ttl_ms=0").is_err());
    }
}
