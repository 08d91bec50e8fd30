//! Token verification for roomcast (spec section 6).
//!
//! - Connection token: `sub` (required; `""` is the anonymous user), `exp` (required),
//!   `nbf` (checked when present), `iat`, `aud`/`iss` (checked when configured), `info`
//!   (any JSON), `rooms` (room names, or prefixes ending in `*`, for `token` namespaces).
//!   A token with a `room` claim is a subscription token and cannot connect.
//! - Subscription token: `sub` (must equal the connection's), `room` (must equal the
//!   room), `exp`, `info` (shown as the member's `room_info`).
//!
//! Algorithms are pinned by configuration; each key verifies exactly one algorithm, and
//! a token is only ever checked against keys of the algorithm its header names, after
//! that algorithm was found in the allowed list. So `alg: none`, unconfigured algorithms
//! and the HS/RS confusion (an RSA public key used as an HMAC secret) are refused before
//! any signature is computed. Errors are typed ([`TokenError`]); only
//! [`TokenError::Expired`] maps to the protocol's 109, everything else to 101.

pub mod config;
pub mod jwks;
pub mod keys;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Validation};
use roomcast_protocol::Data;
use serde::Deserialize;
use serde_json::value::RawValue;
use thiserror::Error;

pub use config::{AuthConfig, KeyConfig, OneOrMany};
pub use jwks::{Jwks, JwksSource};
pub use keys::Key;

/// Longest token accepted, in bytes.
pub const MAX_TOKEN_LEN: usize = 32 * 1024;
/// Most keys one token is tried against (several keys of one algorithm without `kid`).
const MAX_CANDIDATES: usize = 8;

/// A configuration the verifier cannot work with.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
#[error("{field}: {message}")]
pub struct AuthConfigError {
    pub field: String,
    pub message: String,
}

/// Why a token was refused. Only [`TokenError::Expired`] is "expired" (109 / 4004);
/// every other reason is "unauthorized" (101 / 4001).
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("token expired")]
    Expired,
    #[error("token not valid yet (nbf)")]
    NotYetValid,
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("algorithm {0:?} is not allowed")]
    AlgorithmNotAllowed(String),
    #[error("unknown key id {0:?}")]
    UnknownKey(String),
    #[error("no key for algorithm {0}")]
    NoKey(&'static str),
    #[error("invalid signature")]
    BadSignature,
    #[error("wrong audience")]
    WrongAudience,
    #[error("wrong issuer")]
    WrongIssuer,
    #[error("invalid claims: {0}")]
    Claims(String),
    #[error("a subscription token cannot be used as a connection token")]
    NotAConnectionToken,
    #[error("the token is for another user")]
    WrongSubject,
    #[error("the token is for another room")]
    WrongRoom,
}

impl TokenError {
    /// Whether the token was fine but for its age (109 / 4004).
    pub fn is_expired(&self) -> bool {
        matches!(self, TokenError::Expired)
    }
}

/// What a connection token grants.
#[derive(Debug, Clone)]
pub struct ConnectionToken {
    /// `sub`: the user (`""` for anonymous).
    pub user: String,
    /// `exp`, in seconds since the Unix epoch.
    pub expires_at: u64,
    /// `info`.
    pub info: Option<Data>,
    /// `rooms`.
    pub rooms: RoomGrants,
}

/// What a subscription token grants.
#[derive(Debug, Clone)]
pub struct SubscriptionToken {
    /// `exp`, in seconds since the Unix epoch.
    pub expires_at: u64,
    /// `info`, shown as the member's `room_info`.
    pub room_info: Option<Data>,
}

/// The `rooms` claim: exact room names, and prefixes (entries ending in `*`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoomGrants(Vec<String>);

impl RoomGrants {
    pub fn new(entries: Vec<String>) -> Self {
        RoomGrants(entries)
    }

    /// Whether `room` is granted: equal to an entry, or starting with an entry's text
    /// before its final `*`.
    pub fn allows(&self, room: &str) -> bool {
        self.0.iter().any(|g| match g.strip_suffix('*') {
            Some(prefix) => room.starts_with(prefix),
            None => g == room,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Time until `exp` (seconds since the epoch), from now.
pub fn time_until(exp: u64) -> Duration {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    Duration::from_secs(exp).saturating_sub(now)
}

/// A JWT NumericDate: integer or fractional seconds.
#[derive(Debug, Clone, Copy)]
struct NumericDate(u64);

impl<'de> Deserialize<'de> for NumericDate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = serde_json::Number::deserialize(d)?;
        if let Some(u) = n.as_u64() {
            return Ok(NumericDate(u));
        }
        match n.as_f64() {
            Some(f) if f.is_finite() && f >= 0.0 => Ok(NumericDate(f.floor() as u64)),
            _ => Err(serde::de::Error::custom("a NumericDate must be a non-negative number")),
        }
    }
}

#[derive(Deserialize)]
struct ConnectionClaims {
    sub: String,
    exp: NumericDate,
    #[serde(default)]
    info: Option<Box<RawValue>>,
    #[serde(default)]
    rooms: Option<Vec<String>>,
    #[serde(default)]
    room: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct SubscriptionClaims {
    sub: String,
    room: String,
    exp: NumericDate,
    #[serde(default)]
    info: Option<Box<RawValue>>,
}

/// The parts of a JOSE header roomcast looks at.
#[derive(Deserialize)]
struct RawHeader {
    alg: Option<serde_json::Value>,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    crit: Option<serde_json::Value>,
}

/// Verifies tokens with the configured keys.
pub struct Verifier {
    allowed: Vec<Algorithm>,
    static_keys: Vec<Key>,
    jwks: Option<Arc<Jwks>>,
    /// A validation per allowed algorithm.
    validations: Vec<(Algorithm, Validation)>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("allowed", &self.allowed)
            .field("static_keys", &self.static_keys)
            .field("jwks", &self.jwks)
            .finish()
    }
}

fn cfg_err(field: &str, message: impl Into<String>) -> AuthConfigError {
    AuthConfigError { field: field.into(), message: message.into() }
}

impl Verifier {
    /// A verifier for `cfg`, or `None` when it configures no key. Reads key files and a
    /// JWKS file now; a JWKS URL is only checked here and fetched by
    /// [`Verifier::start_background`].
    pub fn new(cfg: &AuthConfig) -> Result<Option<Verifier>, AuthConfigError> {
        if !cfg.has_keys() {
            if !cfg.algorithms.is_empty() || cfg.audience.is_some() || cfg.issuer.is_some() {
                return Err(cfg_err("auth", "algorithms, audience or issuer set, but no key is configured"));
            }
            return Ok(None);
        }
        let mut static_keys = Vec::new();
        if let Some(secret) = &cfg.hmac_secret {
            static_keys.push(keys::hmac_key("auth.hmac_secret", Algorithm::HS256, secret.as_bytes())?);
        }
        for (i, kc) in cfg.keys.iter().enumerate() {
            static_keys.push(keys::load_key(i, kc)?);
        }
        let allowed: Vec<Algorithm> = if cfg.algorithms.is_empty() {
            let mut a: Vec<Algorithm> = static_keys.iter().map(|k| k.alg).collect();
            if cfg.jwks_file.is_some() || cfg.jwks_url.is_some() {
                a.extend([Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA]);
            }
            a
        } else {
            let mut a = Vec::new();
            for name in &cfg.algorithms {
                a.push(keys::parse_alg(name).ok_or_else(|| {
                    cfg_err(
                        "auth.algorithms",
                        format!(
                            "unsupported algorithm {name:?} (use HS256, HS384, HS512, RS256, ES256 or EdDSA)"
                        ),
                    )
                })?);
            }
            a
        };
        let mut allowed_dedup: Vec<Algorithm> = Vec::new();
        for a in allowed {
            if !allowed_dedup.contains(&a) {
                allowed_dedup.push(a);
            }
        }
        let allowed = allowed_dedup;
        for (i, k) in static_keys.iter().enumerate() {
            if !allowed.contains(&k.alg) {
                return Err(cfg_err(
                    "auth.algorithms",
                    format!("key {i} is for {}, which is not in the list", keys::alg_name(k.alg)),
                ));
            }
        }
        let source = match (&cfg.jwks_file, &cfg.jwks_url) {
            (Some(_), Some(_)) => return Err(cfg_err("auth", "set jwks_file or jwks_url, not both")),
            (Some(p), None) => Some(JwksSource::File(p.clone())),
            (None, Some(u)) => {
                Some(JwksSource::Url(jwks::parse_url(u).map_err(|e| cfg_err("auth.jwks_url", e))?))
            }
            (None, None) => None,
        };
        let jwks = match source {
            Some(source) => {
                if cfg.jwks_refresh_ms == 0 {
                    return Err(cfg_err("auth.jwks_refresh_ms", "must be greater than 0"));
                }
                let is_file = matches!(source, JwksSource::File(_));
                let j = Jwks::new(
                    source,
                    allowed
                        .iter()
                        .copied()
                        .filter(|a| !matches!(a, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512))
                        .collect(),
                    Duration::from_millis(cfg.jwks_refresh_ms),
                    Duration::from_millis(cfg.jwks_min_refresh_ms),
                )
                .map_err(|e| cfg_err("auth.jwks_url", e))?;
                if is_file {
                    j.load_file_now().map_err(|e| cfg_err("auth.jwks_file", e))?;
                }
                Some(Arc::new(j))
            }
            None => None,
        };
        let aud = cfg.audience.as_ref().map(OneOrMany::to_vec);
        let iss = cfg.issuer.as_ref().map(OneOrMany::to_vec);
        if aud.as_ref().is_some_and(|a| a.is_empty() || a.iter().any(String::is_empty)) {
            return Err(cfg_err("auth.audience", "must not be empty"));
        }
        if iss.as_ref().is_some_and(|a| a.is_empty() || a.iter().any(String::is_empty)) {
            return Err(cfg_err("auth.issuer", "must not be empty"));
        }
        let validations = allowed
            .iter()
            .map(|&alg| {
                let mut v = Validation::new(alg);
                v.leeway = cfg.leeway_secs;
                v.validate_exp = true;
                v.validate_nbf = true;
                let mut required = vec!["exp"];
                v.validate_aud = aud.is_some();
                if let Some(a) = &aud {
                    v.set_audience(a);
                    required.push("aud");
                }
                if let Some(i) = &iss {
                    v.set_issuer(i);
                    required.push("iss");
                }
                v.set_required_spec_claims(&required);
                (alg, v)
            })
            .collect();
        Ok(Some(Verifier { allowed, static_keys, jwks, validations }))
    }

    /// Starts what runs in the background (the JWKS refresher), on the current tokio
    /// runtime. The task ends when the verifier is dropped.
    pub fn start_background(&self) -> Option<tokio::task::JoinHandle<()>> {
        self.jwks.as_ref().map(jwks::spawn_refresher)
    }

    /// The allowed algorithms.
    pub fn algorithms(&self) -> &[Algorithm] {
        &self.allowed
    }

    /// The JWKS, when one is configured.
    pub fn jwks(&self) -> Option<&Arc<Jwks>> {
        self.jwks.as_ref()
    }

    /// Verifies a connection token.
    pub async fn verify_connection(&self, token: &str) -> Result<ConnectionToken, TokenError> {
        let claims: ConnectionClaims = self.verify(token).await?;
        if claims.room.is_some() {
            return Err(TokenError::NotAConnectionToken);
        }
        let rooms = claims.rooms.unwrap_or_default();
        if rooms.iter().any(String::is_empty) {
            return Err(TokenError::Claims("empty entry in rooms".into()));
        }
        Ok(ConnectionToken {
            user: claims.sub,
            expires_at: claims.exp.0,
            info: info_data(claims.info)?,
            rooms: RoomGrants(rooms),
        })
    }

    /// Verifies a subscription token for `room`, for the connection of user `sub`.
    pub async fn verify_subscription(
        &self,
        token: &str,
        sub: &str,
        room: &str,
    ) -> Result<SubscriptionToken, TokenError> {
        let claims: SubscriptionClaims = self.verify(token).await?;
        if claims.sub != sub {
            return Err(TokenError::WrongSubject);
        }
        if claims.room != room {
            return Err(TokenError::WrongRoom);
        }
        Ok(SubscriptionToken { expires_at: claims.exp.0, room_info: info_data(claims.info)? })
    }

    /// Checks the header, picks the keys of its algorithm, verifies signature and claims.
    async fn verify<T: serde::de::DeserializeOwned>(&self, token: &str) -> Result<T, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed(format!("longer than {MAX_TOKEN_LEN} bytes")));
        }
        let mut parts = token.split('.');
        let (Some(h), Some(_), Some(_), None) = (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed("not three dot-separated parts".into()));
        };
        let header_json =
            URL_SAFE_NO_PAD.decode(h).map_err(|_| TokenError::Malformed("header is not base64url".into()))?;
        let header: RawHeader = serde_json::from_slice(&header_json)
            .map_err(|_| TokenError::Malformed("header is not a JSON object".into()))?;
        let alg_name = match &header.alg {
            Some(serde_json::Value::String(s)) => s.as_str(),
            Some(_) => return Err(TokenError::Malformed("alg is not a string".into())),
            None => return Err(TokenError::Malformed("no alg in the header".into())),
        };
        let Some(alg) = keys::parse_alg(alg_name).filter(|a| self.allowed.contains(a)) else {
            return Err(TokenError::AlgorithmNotAllowed(alg_name.chars().take(32).collect()));
        };
        if header.crit.is_some() {
            return Err(TokenError::Malformed("critical header extensions are not supported".into()));
        }
        let Some(validation) = self.validations.iter().find(|(a, _)| *a == alg).map(|(_, v)| v) else {
            return Err(TokenError::AlgorithmNotAllowed(alg_name.into()));
        };
        let kid = header.kid.as_deref();
        let mut candidates = self.candidates(alg, kid);
        if candidates.is_empty()
            && let (Some(jwks), Some(_)) = (&self.jwks, kid)
        {
            let seen = jwks.generation();
            if jwks.refresh_for_unknown_kid(seen).await {
                candidates = self.candidates(alg, kid);
            }
        }
        if candidates.is_empty() {
            return Err(match kid {
                Some(k) => TokenError::UnknownKey(k.chars().take(64).collect()),
                None => TokenError::NoKey(keys::alg_name(alg)),
            });
        }
        for key in candidates.iter().take(MAX_CANDIDATES) {
            match jsonwebtoken::decode::<T>(token, &key.key, validation) {
                Ok(data) => return Ok(data.claims),
                Err(e) => match e.kind() {
                    ErrorKind::InvalidSignature => continue,
                    _ => return Err(map_error(e.into_kind())),
                },
            }
        }
        Err(TokenError::BadSignature)
    }

    /// Keys of algorithm `alg` that may have signed a token with `kid`: static keys
    /// without a kid or with that kid, JWKS keys with that kid (all JWKS keys of the
    /// algorithm when the token has no kid).
    fn candidates(&self, alg: Algorithm, kid: Option<&str>) -> Vec<Key> {
        let fits = |k: &Key, from_jwks: bool| {
            k.alg == alg
                && match (kid, k.kid.as_deref()) {
                    (Some(t), Some(kk)) => t == kk,
                    (Some(_), None) => !from_jwks,
                    (None, _) => true,
                }
        };
        let mut out: Vec<Key> = self.static_keys.iter().filter(|k| fits(k, false)).cloned().collect();
        if let Some(j) = &self.jwks {
            out.extend(j.keys().iter().filter(|k| fits(k, true)).cloned());
        }
        out
    }
}

fn info_data(raw: Option<Box<RawValue>>) -> Result<Option<Data>, TokenError> {
    match raw {
        None => Ok(None),
        Some(r) if r.get() == "null" => Ok(None),
        Some(r) => Data::from_json(bytes::Bytes::from(r.get().to_owned()))
            .map(Some)
            .map_err(|e| TokenError::Claims(format!("info: {e}"))),
    }
}

fn map_error(kind: ErrorKind) -> TokenError {
    match kind {
        ErrorKind::ExpiredSignature => TokenError::Expired,
        ErrorKind::ImmatureSignature => TokenError::NotYetValid,
        ErrorKind::InvalidAudience => TokenError::WrongAudience,
        ErrorKind::InvalidIssuer => TokenError::WrongIssuer,
        ErrorKind::InvalidSignature => TokenError::BadSignature,
        ErrorKind::InvalidAlgorithm | ErrorKind::MissingAlgorithm => {
            TokenError::AlgorithmNotAllowed("algorithm does not match the key".into())
        }
        ErrorKind::MissingRequiredClaim(c) => TokenError::Claims(format!("missing claim {c}")),
        ErrorKind::InvalidClaimFormat(c) => TokenError::Claims(format!("invalid claim {c}")),
        ErrorKind::Json(e) => TokenError::Claims(e.to_string()),
        ErrorKind::Base64(_) | ErrorKind::Utf8(_) | ErrorKind::InvalidToken => {
            TokenError::Malformed("undecodable token".into())
        }
        other => TokenError::Malformed(format!("{other:?}")),
    }
}

#[cfg(test)]
mod tests;
