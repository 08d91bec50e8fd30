//! Typed configuration: a TOML file (`ROOMCAST_CONFIG`) plus environment overrides,
//! validated before any port is bound. Every default is written next to its field and
//! restated in `docs/configuration.md`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

use crate::client_ip::{Cidr, ClientIpResolver, ForwardedHeader};
use crate::limits::LimitsConfig;

/// Why a configuration was refused.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("invalid config file {path}: {source}")]
    Parse { path: String, source: Box<toml::de::Error> },
    #[error("environment variable {var}: {message}")]
    Env { var: &'static str, message: String },
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { field: field.into(), message: message.into() }
}

/// Who may publish into a namespace's rooms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PublishRule {
    /// Connections subscribed to the room.
    Subscribers,
    /// Any connection with a user (token `sub` not empty).
    Authenticated,
    /// Nobody but backends.
    None,
}

/// Who may subscribe to a namespace's rooms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubscribeRule {
    Public,
    Authenticated,
    /// A subscription token for the room, or the connection token's `rooms` claim.
    Token,
    /// `ns:ID` only for the connection whose user is `ID`.
    User,
}

/// Options of one namespace (spec section 3).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NamespaceConfig {
    /// Publications kept per room; 0 turns history (and recovery) off. Default 100.
    pub history_size: usize,
    /// How long each publication is kept, e.g. "300s", "5m". Default 300 s.
    #[serde(with = "duration")]
    pub history_ttl: Duration,
    /// Whether `presence`/`presence_stats` are served. Default true.
    pub presence: bool,
    /// Whether `join`/`leave` pushes are sent. Default true.
    pub join_leave: bool,
    /// Default "subscribers".
    pub publish: PublishRule,
    /// Default "public".
    pub subscribe: SubscribeRule,
    /// The most publications one recovery returns. Default 100.
    pub recover_max: usize,
}

impl Default for NamespaceConfig {
    fn default() -> Self {
        NamespaceConfig {
            history_size: 100,
            history_ttl: Duration::from_secs(300),
            presence: true,
            join_leave: true,
            publish: PublishRule::Subscribers,
            subscribe: SubscribeRule::Public,
            recover_max: 100,
        }
    }
}

impl NamespaceConfig {
    /// Whether rooms of this namespace keep history.
    pub fn history_enabled(&self) -> bool {
        self.history_size > 0 && !self.history_ttl.is_zero()
    }
}

/// The node's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address to listen on. Env `ROOMCAST_LISTEN`. Default "127.0.0.1:8000".
    pub listen: String,
    /// This node's id in the cluster. Env `ROOMCAST_NODE_ID`. Default: random.
    pub node_id: Option<String>,
    /// "memory" (default), or a `redis://` / `nats://` URL. Env `ROOMCAST_BROKER`.
    pub broker: String,
    /// Presence storage; defaults to the broker. Env `ROOMCAST_PRESENCE`.
    pub presence: Option<String>,
    /// WebSocket path. Default "/ws".
    pub ws_path: String,
    /// Negotiate permessage-deflate when clients offer it. Env `ROOMCAST_COMPRESSION`.
    /// Default true.
    pub compression: bool,
    /// Messages smaller than this many bytes are sent uncompressed. Default 256.
    pub compression_min_size: usize,
    /// Largest message accepted from a client, after reassembly and decompression
    /// (larger: close 4008). Default 131072 (128 KiB).
    pub max_message_size: usize,
    /// Largest `data` of a publication (larger: error 106). Default 65536 (64 KiB).
    pub max_data_size: usize,
    /// Bound of one connection's outbound queue in bytes; a client that lets it fill is
    /// closed with 4003. Env `ROOMCAST_MAX_QUEUE_BYTES`. Default 1048576 (1 MiB).
    pub max_queue_bytes: usize,
    /// Interval between node pings. Env `ROOMCAST_PING_MS`. Default 25000.
    pub ping_ms: u64,
    /// Time a client has to answer a ping (else 4006). Env `ROOMCAST_PONG_TIMEOUT_MS`.
    /// Default 10000.
    pub pong_timeout_ms: u64,
    /// Time a connection has to send `connect` (else 4005).
    /// Env `ROOMCAST_HANDSHAKE_TIMEOUT_MS`. Default 10000.
    pub handshake_timeout_ms: u64,
    /// On shutdown, how long connections get to close before the process exits.
    /// Env `ROOMCAST_SHUTDOWN_GRACE_MS`. Default 10000.
    pub shutdown_grace_ms: u64,
    /// How often this node tells the cluster it is alive (and its counts), and reaps the
    /// members of dead nodes. Env `ROOMCAST_HEARTBEAT_MS`. Default 1000.
    pub heartbeat_ms: u64,
    /// A node not heard of for this long is dead: its presence members are removed and a
    /// `leave` is pushed for each, once. At least 3 heartbeats. Env
    /// `ROOMCAST_NODE_TIMEOUT_MS`. Default 10000 (ghosts gone within about 11 s).
    pub node_timeout_ms: u64,
    /// Whether connections without a token are accepted (user ""). Env
    /// `ROOMCAST_ALLOW_ANONYMOUS`. Default: true when `[auth]` configures no key, false
    /// as soon as it does (then set it to true explicitly to keep anonymous access).
    pub allow_anonymous: Option<bool>,
    /// Most rooms one connection may subscribe to (more: error 106). Default 512.
    pub max_subscriptions: usize,
    /// Most members a `presence` reply lists (more: error 106). Default 1000.
    pub max_presence_members: usize,
    /// Options of rooms without a namespace.
    pub default_namespace: NamespaceConfig,
    /// Named namespaces: `[namespaces.chat]` configures rooms `chat:*`.
    pub namespaces: BTreeMap<String, NamespaceConfig>,
    /// Token verification (`[auth]`): algorithms, keys, JWKS, audience, issuer.
    pub auth: roomcast_auth::AuthConfig,
    /// Abuse limits (`[limits]`).
    pub limits: LimitsConfig,
    /// Networks of the load balancers in front of the node (CIDRs, e.g. "10.0.0.0/8").
    /// Only a TCP peer in one of them is believed about the client's address
    /// (`forwarded_header`); per-address limits then count the real client. Env
    /// `ROOMCAST_TRUSTED_PROXIES` (comma-separated). Default: none.
    pub trusted_proxies: Vec<Cidr>,
    /// The header trusted proxies set: "x-forwarded-for" (default) or "forwarded"
    /// (RFC 7239). The other one is ignored.
    pub forwarded_header: ForwardedHeader,
    /// The backend API (`[api]`): NATS subjects, HTTP key, client RPC.
    pub api: ApiConfig,
}

/// The backend API (spec section 5): `<prefix>.api.<method>` over NATS, `POST /api/<method>`
/// over HTTP, and client `rpc` forwarded to `<prefix>.rpc.<method>`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// NATS server of the API and of client RPC: a `nats://` (or `tls://`) URL, or "off".
    /// Env `ROOMCAST_API_NATS_URL`. Default: the broker's URL when the broker is NATS,
    /// else off (no NATS API; `rpc` gets error 114).
    pub nats_url: Option<String>,
    /// First subject token(s): requests on `<prefix>.api.<method>`, RPC on
    /// `<prefix>.rpc.<method>`. Env `ROOMCAST_API_PREFIX`. Default "roomcast".
    pub prefix: String,
    /// Key of the HTTP API (`Authorization: apikey <key>`), at least 16 bytes. Env
    /// `ROOMCAST_API_KEY`. Default: none, and then `/api/*` answers 404.
    pub key: Option<String>,
    /// How long a client `rpc` waits for its responder (then error 114). Default 5000.
    pub rpc_timeout_ms: u64,
    /// A `publish` repeating an `idempotency_key` seen within this window is not published
    /// again. Default 300000 (5 minutes).
    pub idempotency_window_ms: u64,
    /// NATS API requests handled at once by this node; more wait (backpressure on the
    /// subscription). Default 256.
    pub max_in_flight: usize,
    /// NATS API messages buffered by this node beyond those in flight. When the buffer is
    /// full the NATS client drops what arrives (counted as
    /// `roomcast_limit_trips_total{limit="api_requests_dropped"}`; a request then times out
    /// at its sender). Bounds the memory an API burst can take. Default 8192.
    pub max_queued: usize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            nats_url: None,
            prefix: "roomcast".into(),
            key: None,
            rpc_timeout_ms: 5_000,
            idempotency_window_ms: 300_000,
            max_in_flight: 256,
            max_queued: 8192,
        }
    }
}

/// Shortest HTTP API key accepted.
pub const MIN_API_KEY_LEN: usize = 16;

impl ApiConfig {
    /// Checks every value.
    fn validate(&self) -> Result<(), ConfigError> {
        let token_ok =
            |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-".contains(&b));
        if self.prefix.len() > 64 || !self.prefix.split('.').all(token_ok) {
            return Err(invalid(
                "api.prefix",
                "1 to 64 characters: tokens of A-Z a-z 0-9 _ - separated by single dots",
            ));
        }
        if let Some(url) = &self.nats_url
            && url.trim() != "off"
            && !(url.starts_with("nats://") || url.starts_with("tls://"))
        {
            return Err(invalid(
                "api.nats_url",
                format!("expected nats://…, tls://… or \"off\", got {url:?}"),
            ));
        }
        if let Some(key) = &self.key
            && (key.len() < MIN_API_KEY_LEN
                || key.len() > 1024
                || key.bytes().any(|b| !(0x21..0x7f).contains(&b)))
        {
            return Err(invalid(
                "api.key",
                format!("{MIN_API_KEY_LEN} to 1024 visible ASCII characters (no spaces)"),
            ));
        }
        if self.rpc_timeout_ms == 0 || self.rpc_timeout_ms > 600_000 {
            return Err(invalid("api.rpc_timeout_ms", "must be 1..=600000"));
        }
        if self.idempotency_window_ms == 0 || self.idempotency_window_ms > 86_400_000 {
            return Err(invalid("api.idempotency_window_ms", "must be 1..=86400000 (a day)"));
        }
        if self.max_in_flight == 0 || self.max_in_flight > 65_536 {
            return Err(invalid("api.max_in_flight", "must be 1..=65536"));
        }
        if self.max_queued == 0 || self.max_queued > 1_048_576 {
            return Err(invalid("api.max_queued", "must be 1..=1048576"));
        }
        Ok(())
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:8000".into(),
            node_id: None,
            broker: "memory".into(),
            presence: None,
            ws_path: "/ws".into(),
            compression: true,
            compression_min_size: 256,
            max_message_size: 128 * 1024,
            max_data_size: 64 * 1024,
            max_queue_bytes: 1024 * 1024,
            ping_ms: 25_000,
            pong_timeout_ms: 10_000,
            handshake_timeout_ms: 10_000,
            shutdown_grace_ms: 10_000,
            heartbeat_ms: 1_000,
            node_timeout_ms: 10_000,
            allow_anonymous: None,
            max_subscriptions: 512,
            max_presence_members: 1000,
            default_namespace: NamespaceConfig::default(),
            namespaces: BTreeMap::new(),
            auth: roomcast_auth::AuthConfig::default(),
            limits: LimitsConfig::default(),
            trusted_proxies: Vec::new(),
            forwarded_header: ForwardedHeader::default(),
            api: ApiConfig::default(),
        }
    }
}

/// A source of environment variables (the process environment, or a map in tests).
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
}

/// The process environment.
#[derive(Debug, Clone, Copy)]
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl Env for BTreeMap<&str, &str> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).map(|s| s.to_string())
    }
}

impl Config {
    /// Parses TOML text.
    pub fn from_toml(text: &str, origin: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse { path: origin.into(), source: Box::new(e) })
    }

    /// Reads a TOML file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// Loads the configuration: the file named by `ROOMCAST_CONFIG` (or `file`), then
    /// environment overrides, then validation.
    pub fn load(file: Option<&Path>, env: &dyn Env) -> Result<Config, ConfigError> {
        let from_env = env.var("ROOMCAST_CONFIG");
        let path = file.map(Path::to_path_buf).or(from_env.map(Into::into));
        let mut cfg = match path {
            Some(p) => Self::from_file(&p)?,
            None => Config::default(),
        };
        cfg.apply_env(env)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Applies the `ROOMCAST_*` environment overrides.
    pub fn apply_env(&mut self, env: &dyn Env) -> Result<(), ConfigError> {
        fn num<T: std::str::FromStr>(
            env: &dyn Env,
            var: &'static str,
            into: &mut T,
        ) -> Result<(), ConfigError> {
            if let Some(v) = env.var(var) {
                *into = v
                    .trim()
                    .parse()
                    .map_err(|_| ConfigError::Env { var, message: format!("not a number: {v:?}") })?;
            }
            Ok(())
        }
        if let Some(v) = env.var("ROOMCAST_LISTEN") {
            self.listen = v;
        }
        if let Some(v) = env.var("ROOMCAST_NODE_ID") {
            self.node_id = Some(v);
        }
        if let Some(v) = env.var("ROOMCAST_BROKER") {
            self.broker = v;
        }
        if let Some(v) = env.var("ROOMCAST_PRESENCE") {
            self.presence = Some(v);
        }
        if let Some(v) = env.var("ROOMCAST_COMPRESSION") {
            self.compression = match v.trim() {
                "1" | "true" | "on" | "yes" => true,
                "0" | "false" | "off" | "no" => false,
                _ => {
                    return Err(ConfigError::Env {
                        var: "ROOMCAST_COMPRESSION",
                        message: format!("expected true or false, got {v:?}"),
                    });
                }
            };
        }
        num(env, "ROOMCAST_MAX_QUEUE_BYTES", &mut self.max_queue_bytes)?;
        num(env, "ROOMCAST_PING_MS", &mut self.ping_ms)?;
        num(env, "ROOMCAST_PONG_TIMEOUT_MS", &mut self.pong_timeout_ms)?;
        num(env, "ROOMCAST_HANDSHAKE_TIMEOUT_MS", &mut self.handshake_timeout_ms)?;
        num(env, "ROOMCAST_SHUTDOWN_GRACE_MS", &mut self.shutdown_grace_ms)?;
        num(env, "ROOMCAST_HEARTBEAT_MS", &mut self.heartbeat_ms)?;
        num(env, "ROOMCAST_NODE_TIMEOUT_MS", &mut self.node_timeout_ms)?;
        num(env, "ROOMCAST_MAX_CONNECTIONS", &mut self.limits.max_connections)?;
        if let Some(v) = env.var("ROOMCAST_JWT_HMAC_SECRET") {
            self.auth.hmac_secret = Some(v);
        }
        if let Some(v) = env.var("ROOMCAST_JWKS_URL") {
            self.auth.jwks_url = Some(v);
        }
        if let Some(v) = env.var("ROOMCAST_ALLOW_ANONYMOUS") {
            self.allow_anonymous = Some(parse_bool(&v).ok_or_else(|| ConfigError::Env {
                var: "ROOMCAST_ALLOW_ANONYMOUS",
                message: format!("expected true or false, got {v:?}"),
            })?);
        }
        if let Some(v) = env.var("ROOMCAST_API_NATS_URL") {
            self.api.nats_url = Some(v);
        }
        if let Some(v) = env.var("ROOMCAST_API_PREFIX") {
            self.api.prefix = v;
        }
        if let Some(v) = env.var("ROOMCAST_API_KEY") {
            // An empty variable is no key (the HTTP API stays off).
            self.api.key = Some(v).filter(|k| !k.is_empty());
        }
        if let Some(v) = env.var("ROOMCAST_TRUSTED_PROXIES") {
            self.trusted_proxies = v
                .split(',')
                .filter(|s| !s.trim().is_empty())
                .map(str::parse)
                .collect::<Result<_, _>>()
                .map_err(|message| ConfigError::Env { var: "ROOMCAST_TRUSTED_PROXIES", message })?;
        }
        Ok(())
    }

    /// Checks every value; run before binding.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.listen_addr()?;
        if let Some(id) = &self.node_id
            && (id.is_empty()
                || id.len() > 64
                || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)))
        {
            return Err(invalid("node_id", "1 to 64 characters of A-Z a-z 0-9 - _ ."));
        }
        BackendUrl::parse("broker", &self.broker)?;
        if let Some(p) = &self.presence {
            BackendUrl::parse("presence", p)?;
        }
        if !self.ws_path.starts_with('/') || self.ws_path.contains(' ') {
            return Err(invalid("ws_path", "must start with '/'"));
        }
        if self.ws_path.starts_with("/api")
            || ["/healthz", "/readyz", "/metrics"].contains(&self.ws_path.as_str())
        {
            return Err(invalid("ws_path", "collides with a built-in route"));
        }
        let positive = [
            ("max_message_size", self.max_message_size as u64),
            ("max_data_size", self.max_data_size as u64),
            ("max_queue_bytes", self.max_queue_bytes as u64),
            ("ping_ms", self.ping_ms),
            ("pong_timeout_ms", self.pong_timeout_ms),
            ("handshake_timeout_ms", self.handshake_timeout_ms),
            ("heartbeat_ms", self.heartbeat_ms),
            ("max_subscriptions", self.max_subscriptions as u64),
            ("max_presence_members", self.max_presence_members as u64),
        ];
        for (field, v) in positive {
            if v == 0 {
                return Err(invalid(field, "must be greater than 0"));
            }
        }
        if self.max_message_size > 64 * 1024 * 1024 {
            return Err(invalid("max_message_size", "must be at most 64 MiB"));
        }
        if self.max_data_size > self.max_message_size {
            return Err(invalid("max_data_size", "must not exceed max_message_size"));
        }
        if self.max_queue_bytes < self.max_message_size {
            return Err(invalid("max_queue_bytes", "must be at least max_message_size"));
        }
        if self.node_timeout_ms < self.heartbeat_ms.saturating_mul(3) {
            return Err(invalid("node_timeout_ms", "must be at least 3 heartbeats (3 x heartbeat_ms)"));
        }
        validate_namespace("default_namespace", &self.default_namespace)?;
        for (name, ns) in &self.namespaces {
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-@=,/".contains(&b))
            {
                return Err(invalid(
                    format!("namespaces.{name}"),
                    "a namespace name is 1 or more of A-Z a-z 0-9 . _ - @ = , / (no ':')",
                ));
            }
            if name.starts_with("__") {
                return Err(invalid(
                    format!("namespaces.{name}"),
                    "names starting with \"__\" are reserved for the node's own use",
                ));
            }
            validate_namespace(&format!("namespaces.{name}"), ns)?;
        }
        self.limits.check().map_err(|(field, message)| invalid(field, message))?;
        self.api.validate()?;
        self.verifier()?;
        Ok(())
    }

    /// The NATS server of the backend API and client RPC: `api.nats_url`, else the
    /// broker's when the broker is NATS; `None` when off.
    pub fn api_nats_url(&self) -> Option<String> {
        match self.api.nats_url.as_deref().map(str::trim) {
            Some("off") => None,
            Some(url) => Some(url.to_string()),
            None => match self.broker_url() {
                Ok(BackendUrl::Nats(url)) => Some(url),
                _ => None,
            },
        }
    }

    /// Whether connections without a token are accepted: `allow_anonymous`, or by default
    /// only when no key is configured.
    pub fn anonymous_allowed(&self) -> bool {
        self.allow_anonymous.unwrap_or(!self.auth.has_keys())
    }

    /// The token verifier of `[auth]` (`None` without keys); key files and a JWKS file
    /// are read and checked here.
    pub fn verifier(&self) -> Result<Option<roomcast_auth::Verifier>, ConfigError> {
        roomcast_auth::Verifier::new(&self.auth).map_err(|e| invalid(e.field, e.message))
    }

    /// How client addresses are found (trusted proxies).
    pub fn client_ip_resolver(&self) -> ClientIpResolver {
        ClientIpResolver { trusted: self.trusted_proxies.clone(), header: self.forwarded_header }
    }

    /// The listen address.
    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.listen
            .parse()
            .map_err(|_| invalid("listen", format!("not a host:port address: {:?}", self.listen)))
    }

    /// The broker to use.
    pub fn broker_url(&self) -> Result<BackendUrl, ConfigError> {
        BackendUrl::parse("broker", &self.broker)
    }

    /// The presence storage to use (the broker's unless set).
    pub fn presence_url(&self) -> Result<BackendUrl, ConfigError> {
        BackendUrl::parse("presence", self.presence.as_deref().unwrap_or(&self.broker))
    }

    /// The options of a room's namespace, or `None` when the namespace is not configured.
    pub fn namespace(&self, ns: Option<&str>) -> Option<&NamespaceConfig> {
        match ns {
            None => Some(&self.default_namespace),
            Some(n) => self.namespaces.get(n),
        }
    }
}

fn validate_namespace(field: &str, ns: &NamespaceConfig) -> Result<(), ConfigError> {
    if ns.history_size > 1_000_000 {
        return Err(invalid(format!("{field}.history_size"), "must be at most 1000000"));
    }
    if ns.history_size > 0 && ns.history_ttl.is_zero() {
        return Err(invalid(
            format!("{field}.history_ttl"),
            "must be greater than 0 when history_size is set",
        ));
    }
    if ns.history_size > 0 && ns.recover_max == 0 {
        return Err(invalid(format!("{field}.recover_max"), "must be greater than 0 when history is on"));
    }
    if !ns.presence && ns.join_leave {
        // join/leave without presence is allowed: pushes do not need the member list.
    }
    Ok(())
}

fn parse_bool(v: &str) -> Option<bool> {
    match v.trim() {
        "1" | "true" | "on" | "yes" => Some(true),
        "0" | "false" | "off" | "no" => Some(false),
        _ => None,
    }
}

/// Where a broker or presence lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendUrl {
    Memory,
    Redis(String),
    Nats(String),
}

impl BackendUrl {
    fn parse(field: &str, s: &str) -> Result<Self, ConfigError> {
        let s = s.trim();
        if s == "memory" {
            Ok(BackendUrl::Memory)
        } else if ["redis://", "rediss://", "redis-cluster://", "valkey://", "valkey-cluster://"]
            .iter()
            .any(|p| s.starts_with(p))
        {
            Ok(BackendUrl::Redis(s.to_string()))
        } else if s.starts_with("nats://") || s.starts_with("tls://") {
            Ok(BackendUrl::Nats(s.to_string()))
        } else {
            Err(invalid(
                field,
                format!("expected \"memory\", redis://… (redis-cluster://…) or nats://…, got {s:?}"),
            ))
        }
    }
}

/// Durations as "250ms", "30s", "5m", "2h", or a plain number of seconds.
mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Secs(u64),
        Text(String),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        match Raw::deserialize(d)? {
            Raw::Secs(s) => Ok(Duration::from_secs(s)),
            Raw::Text(t) => parse(&t).map_err(serde::de::Error::custom),
        }
    }

    pub fn parse(t: &str) -> Result<Duration, String> {
        let t = t.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num.parse().map_err(|_| format!("invalid duration {t:?}"))?;
        let ms = match unit.trim() {
            "ms" => n,
            "" | "s" => n.saturating_mul(1000),
            "m" => n.saturating_mul(60_000),
            "h" => n.saturating_mul(3_600_000),
            "d" => n.saturating_mul(86_400_000),
            _ => return Err(format!("invalid duration unit in {t:?} (use ms, s, m, h or d)")),
        };
        Ok(Duration::from_millis(ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let c = Config::load(None, &BTreeMap::new()).unwrap();
        assert_eq!(c.listen, "127.0.0.1:8000");
        assert_eq!(c.broker_url().unwrap(), BackendUrl::Memory);
        assert_eq!(c.presence_url().unwrap(), BackendUrl::Memory);
        assert!(c.default_namespace.history_enabled());
    }

    #[test]
    fn toml_and_env() {
        let c = Config::from_toml(
            r#"
            listen = "0.0.0.0:9000"
            ping_ms = 5000
            [default_namespace]
            history_size = 0
            [namespaces.chat]
            history_ttl = "2m"
            publish = "authenticated"
            subscribe = "token"
            [namespaces.feed]
            presence = false
            join_leave = false
            "#,
            "test",
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.namespaces["chat"].history_ttl, Duration::from_secs(120));
        assert_eq!(c.namespaces["chat"].publish, PublishRule::Authenticated);
        assert_eq!(c.namespaces["chat"].history_size, 100);
        assert!(!c.default_namespace.history_enabled());
        assert!(c.namespace(Some("nope")).is_none());

        let mut c = c;
        let env: BTreeMap<&str, &str> = [
            ("ROOMCAST_LISTEN", "127.0.0.1:0"),
            ("ROOMCAST_PING_MS", "100"),
            ("ROOMCAST_BROKER", "redis://x:6379"),
        ]
        .into();
        c.apply_env(&env).unwrap();
        assert_eq!((c.listen.as_str(), c.ping_ms), ("127.0.0.1:0", 100));
        assert_eq!(c.presence_url().unwrap(), BackendUrl::Redis("redis://x:6379".into()));
    }

    #[test]
    fn example_config_is_valid() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/roomcast.example.toml");
        let c = Config::from_file(Path::new(path)).unwrap();
        c.validate().unwrap();
        assert_eq!(c.namespaces["chat"].history_ttl, Duration::from_secs(3600));
        assert_eq!(c.namespaces["feed"].publish, PublishRule::None);
        // The example states the defaults: the parts it does not mark as examples agree.
        let d = Config::default();
        assert_eq!(
            (c.max_message_size, c.max_queue_bytes, c.ping_ms),
            (d.max_message_size, d.max_queue_bytes, d.ping_ms)
        );
        assert_eq!(c.default_namespace, d.default_namespace);
    }

    #[test]
    fn api_section() {
        let c = Config::load(None, &BTreeMap::new()).unwrap();
        assert_eq!(c.api, ApiConfig::default());
        assert_eq!(c.api_nats_url(), None, "no NATS API with a memory broker");
        let env: BTreeMap<&str, &str> = [("ROOMCAST_BROKER", "nats://n:4222")].into();
        assert_eq!(Config::load(None, &env).unwrap().api_nats_url().as_deref(), Some("nats://n:4222"));
        let env: BTreeMap<&str, &str> = [
            ("ROOMCAST_BROKER", "nats://n:4222"),
            ("ROOMCAST_API_NATS_URL", "off"),
            ("ROOMCAST_API_KEY", "0123456789abcdef"),
            ("ROOMCAST_API_PREFIX", "acme.rc"),
        ]
        .into();
        let c = Config::load(None, &env).unwrap();
        assert_eq!(c.api_nats_url(), None);
        assert_eq!((c.api.key.as_deref(), c.api.prefix.as_str()), (Some("0123456789abcdef"), "acme.rc"));
        let c = Config::from_toml("[api]\nnats_url = \"nats://a:1\"\nrpc_timeout_ms = 100", "t").unwrap();
        c.validate().unwrap();
        assert_eq!(c.api_nats_url().as_deref(), Some("nats://a:1"));
        let err = |t: &str| Config::from_toml(t, "t").and_then(|c| c.validate()).unwrap_err().to_string();
        assert!(err("[api]\nkey = \"short\"").contains("api.key"));
        assert!(err("[api]\nprefix = \"a..b\"").contains("api.prefix"));
        assert!(err("[api]\nprefix = \"a.*\"").contains("api.prefix"));
        assert!(err("[api]\nnats_url = \"http://x\"").contains("api.nats_url"));
        assert!(err("[api]\nrpc_timeout_ms = 0").contains("api.rpc_timeout_ms"));
        assert!(err("[api]\nidempotency_window_ms = 0").contains("api.idempotency_window_ms"));
        assert!(err("[api]\nnope = 1").contains("unknown"));
    }

    #[test]
    fn bad_values_are_named() {
        let err = |t: &str| {
            let r = Config::from_toml(t, "t").and_then(|c| c.validate());
            r.unwrap_err().to_string()
        };
        assert!(err("listen = \"nowhere\"").contains("listen"));
        assert!(err("broker = \"kafka://x\"").contains("broker"));
        assert!(err("unknown_key = 1").contains("unknown"));
        assert!(err("[namespaces.\"a:b\"]").contains("namespaces.a:b"));
        assert!(err("[namespaces.x]\nhistory_ttl = \"5 parsecs\"").contains("duration"));
        assert!(err("[namespaces.x]\npublish = \"everyone\"").contains("publish"));
        assert!(err("max_data_size = 999999999").contains("max_data_size"));
        assert!(err("ping_ms = 0").contains("ping_ms"));
        assert!(err("[namespaces.__conn]").contains("reserved"));
        assert!(err("heartbeat_ms = 1000\nnode_timeout_ms = 2000").contains("node_timeout_ms"));
        for ok in ["redis-cluster://a:1,b:2", "redis://a:1,b:2?cluster=true", "valkey://a:1", "nats://n:4222"]
        {
            let c = Config::from_toml(&format!("broker = \"{ok}\""), "t").unwrap();
            c.validate().unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        let env: BTreeMap<&str, &str> = [("ROOMCAST_PING_MS", "soon")].into();
        assert!(Config::default().apply_env(&env).unwrap_err().to_string().contains("ROOMCAST_PING_MS"));
    }

    #[test]
    fn auth_limits_and_proxies() {
        // Anonymous access: on without keys; off once a key is configured, unless set.
        let c = Config::load(None, &BTreeMap::new()).unwrap();
        assert!(c.anonymous_allowed() && c.verifier().unwrap().is_none());
        let secret = "0123456789abcdef0123456789abcdef";
        let env: BTreeMap<&str, &str> = [("ROOMCAST_JWT_HMAC_SECRET", secret)].into();
        let c = Config::load(None, &env).unwrap();
        assert!(!c.anonymous_allowed() && c.verifier().unwrap().is_some());
        let env: BTreeMap<&str, &str> =
            [("ROOMCAST_JWT_HMAC_SECRET", secret), ("ROOMCAST_ALLOW_ANONYMOUS", "true")].into();
        assert!(Config::load(None, &env).unwrap().anonymous_allowed());
        let env: BTreeMap<&str, &str> = [("ROOMCAST_ALLOW_ANONYMOUS", "maybe")].into();
        assert!(Config::load(None, &env).unwrap_err().to_string().contains("ROOMCAST_ALLOW_ANONYMOUS"));
        let env: BTreeMap<&str, &str> = [("ROOMCAST_JWT_HMAC_SECRET", "short")].into();
        assert!(Config::load(None, &env).unwrap_err().to_string().contains("auth.hmac_secret"));

        let keys = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/keys");
        let c = Config::from_toml(
            &format!(
                r#"
                trusted_proxies = ["10.0.0.0/8", "::1"]
                forwarded_header = "forwarded"
                [auth]
                algorithms = ["HS256", "RS256"]
                hmac_secret = "{secret}"
                audience = "roomcast"
                issuer = ["a", "b"]
                [[auth.keys]]
                algorithm = "RS256"
                kid = "k1"
                file = "{keys}/rsa_public.pem"
                [limits]
                connection_rate_per_ip = 5
                max_connections = 10
                "#
            ),
            "t",
        )
        .unwrap();
        c.validate().unwrap();
        assert!(!c.anonymous_allowed());
        assert_eq!(c.limits.connection_rate_per_ip, 5.0);
        assert_eq!((c.limits.max_connections, c.limits.max_connections_per_user), (10, 100));
        let r = c.client_ip_resolver();
        assert_eq!((r.trusted.len(), r.header), (2, ForwardedHeader::Forwarded));
        let env: BTreeMap<&str, &str> = [("ROOMCAST_TRUSTED_PROXIES", "192.168.0.0/16, 127.0.0.1")].into();
        let mut c2 = c.clone();
        c2.apply_env(&env).unwrap();
        assert_eq!(c2.trusted_proxies.len(), 2);
        let env: BTreeMap<&str, &str> = [("ROOMCAST_TRUSTED_PROXIES", "everyone")].into();
        assert!(c2.apply_env(&env).unwrap_err().to_string().contains("ROOMCAST_TRUSTED_PROXIES"));

        let err = |t: &str| {
            let r = Config::from_toml(t, "t").and_then(|c| c.validate());
            r.unwrap_err().to_string()
        };
        let pem = "[[auth.keys]]\nalgorithm = \"RS256\"\npem = \"-----BEGIN PUBLIC KEY-----\\nAAAA\\n-----END PUBLIC KEY-----\"";
        assert!(err(pem).contains("auth.keys[0].pem"), "{}", err(pem));
        let none = format!("[auth]\nhmac_secret = \"{secret}\"\nalgorithms = [\"HS256\", \"none\"]");
        assert!(err(&none).contains("auth.algorithms"));
        let ps256 = format!("[[auth.keys]]\nalgorithm = \"PS256\"\nfile = \"{keys}/rsa_public.pem\"");
        assert!(err(&ps256).contains("PS256"));
        assert!(err("[auth]\njwks_url = \"http://idp.example/jwks\"").contains("auth.jwks_url"));
        assert!(err("[auth]\nunknown = 1").contains("unknown"));
        assert!(err("trusted_proxies = [\"10.0.0.0/40\"]").contains("prefix"));
        assert!(err("[limits]\ncommands_per_second = -1").contains("limits.commands_per_second"));
        assert!(err("[limits]\nconnection_burst_per_ip = 0").contains("limits.connection_burst_per_ip"));
    }
}
