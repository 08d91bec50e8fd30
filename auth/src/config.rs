//! The `[auth]` table of the node's configuration: which algorithms are accepted and
//! where the keys come from. Parsed by serde (TOML), checked by [`crate::Verifier::new`].

use std::path::PathBuf;

use serde::Deserialize;

/// Token verification settings (`[auth]`). With no key configured the node verifies no
/// token at all.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Accepted `alg` values, out of HS256, HS384, HS512, RS256, ES256, EdDSA. Empty
    /// (the default): the algorithms of the configured keys, plus RS256, ES256 and EdDSA
    /// when a JWKS is configured. A token with any other `alg` (`none` included) is
    /// refused.
    pub algorithms: Vec<String>,
    /// An HS256 secret (at least 32 bytes). Env `ROOMCAST_JWT_HMAC_SECRET`.
    pub hmac_secret: Option<String>,
    /// Keys, each pinned to one algorithm.
    pub keys: Vec<KeyConfig>,
    /// A JWKS document on disk (re-read every `jwks_refresh_ms`).
    pub jwks_file: Option<PathBuf>,
    /// A JWKS URL: `https://…` (plain `http://` only for loopback hosts). Fetched at
    /// start, every `jwks_refresh_ms`, and when a token names an unknown `kid` (at most
    /// once per `jwks_min_refresh_ms`).
    pub jwks_url: Option<String>,
    /// Default 300000 (5 min).
    pub jwks_refresh_ms: u64,
    /// Least time between two refreshes caused by unknown `kid`s. Default 10000.
    pub jwks_min_refresh_ms: u64,
    /// Accepted `aud` values; when set, a token must carry one of them.
    pub audience: Option<OneOrMany>,
    /// Accepted `iss` values; when set, a token must carry one of them.
    pub issuer: Option<OneOrMany>,
    /// Clock skew allowed on `exp` and `nbf`, in seconds. Default 0.
    pub leeway_secs: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            algorithms: Vec::new(),
            hmac_secret: None,
            keys: Vec::new(),
            jwks_file: None,
            jwks_url: None,
            jwks_refresh_ms: 300_000,
            jwks_min_refresh_ms: 10_000,
            audience: None,
            issuer: None,
            leeway_secs: 0,
        }
    }
}

impl AuthConfig {
    /// Whether any key source is configured (tokens can be verified).
    pub fn has_keys(&self) -> bool {
        self.hmac_secret.is_some()
            || !self.keys.is_empty()
            || self.jwks_file.is_some()
            || self.jwks_url.is_some()
    }
}

/// One configured key (`[[auth.keys]]`). Exactly one of `secret`, `secret_base64`, `pem`
/// and `file` is given.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// The one algorithm this key verifies.
    pub algorithm: String,
    /// When set, the key is used only for tokens with this `kid` (or without a `kid`).
    pub kid: Option<String>,
    /// HMAC secret, as text (HS*).
    pub secret: Option<String>,
    /// HMAC secret, base64 (HS*).
    pub secret_base64: Option<String>,
    /// Public key in PEM (RS256: RSA `PUBLIC KEY`/`RSA PUBLIC KEY`; ES256 and EdDSA:
    /// `PUBLIC KEY`).
    pub pem: Option<String>,
    /// A file holding the PEM (RS256, ES256, EdDSA) or the secret (HS*; surrounding
    /// whitespace is trimmed).
    pub file: Option<PathBuf>,
}

/// A string or a list of strings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    /// The values.
    pub fn to_vec(&self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s.clone()],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}
