//! A JWKS (JSON Web Key Set) from a file or a URL: cached, refreshed periodically, and
//! refreshed on demand when a token names an unknown `kid` — at most once per
//! `min_refresh`, one fetch at a time, so that tokens with random `kid`s cannot make the
//! node hammer the key server.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use jsonwebtoken::Algorithm;
use parking_lot::RwLock;
use tokio::time::Instant;

use crate::keys::{self, Key};

/// Largest JWKS document accepted.
pub const MAX_JWKS_BYTES: usize = 1024 * 1024;
/// Time one fetch may take.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// Where the key set comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksSource {
    File(std::path::PathBuf),
    Url(http::Uri),
}

impl std::fmt::Display for JwksSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JwksSource::File(p) => write!(f, "{}", p.display()),
            JwksSource::Url(u) => write!(f, "{u}"),
        }
    }
}

/// Checks a JWKS URL: `https://`, or `http://` to a loopback host only.
pub fn parse_url(url: &str) -> Result<http::Uri, String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("not a URL: {e}"))?;
    let host = uri.host().ok_or("no host")?;
    match uri.scheme_str() {
        Some("https") => Ok(uri),
        Some("http") => {
            let h = host.trim_start_matches('[').trim_end_matches(']');
            let loopback = h == "localhost" || h.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
            if loopback {
                Ok(uri)
            } else {
                Err("plain http:// is accepted only for loopback hosts; use https://".into())
            }
        }
        _ => Err("expected an https:// URL".into()),
    }
}

/// A cached key set.
pub struct Jwks {
    pub source: JwksSource,
    allowed: Vec<Algorithm>,
    keys: RwLock<Arc<Vec<Key>>>,
    /// Bumped by every successful load.
    generation: AtomicU64,
    /// One fetch at a time; holds when the last fetch was attempted.
    fetch: tokio::sync::Mutex<Option<Instant>>,
    min_refresh: Duration,
    pub refresh_every: Duration,
    client: Option<HttpsClient>,
}

impl std::fmt::Debug for Jwks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jwks").field("source", &self.source).field("keys", &self.keys.read().len()).finish()
    }
}

impl Jwks {
    /// A key set (empty until loaded).
    pub fn new(
        source: JwksSource,
        allowed: Vec<Algorithm>,
        refresh_every: Duration,
        min_refresh: Duration,
    ) -> Result<Jwks, String> {
        let client = match &source {
            JwksSource::File(_) => None,
            JwksSource::Url(_) => Some(https_client()?),
        };
        Ok(Jwks {
            source,
            allowed,
            keys: RwLock::new(Arc::new(Vec::new())),
            generation: AtomicU64::new(0),
            fetch: tokio::sync::Mutex::new(None),
            min_refresh,
            refresh_every,
            client,
        })
    }

    /// The current keys.
    pub fn keys(&self) -> Arc<Vec<Key>> {
        self.keys.read().clone()
    }

    /// Loads a file source now, synchronously (at startup, so that a broken file is a
    /// configuration error).
    pub fn load_file_now(&self) -> Result<usize, String> {
        let JwksSource::File(path) = &self.source else {
            return Ok(0);
        };
        let body = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        self.install(&body)
    }

    fn install(&self, body: &[u8]) -> Result<usize, String> {
        let keys = keys::parse_jwks(&self.source.to_string(), body, &self.allowed)?;
        let n = keys.len();
        *self.keys.write() = Arc::new(keys);
        self.generation.fetch_add(1, Ordering::AcqRel);
        Ok(n)
    }

    async fn read_source(&self) -> Result<Vec<u8>, String> {
        match (&self.source, &self.client) {
            (JwksSource::File(path), _) => {
                tokio::fs::read(path).await.map_err(|e| format!("cannot read {}: {e}", path.display()))
            }
            (JwksSource::Url(uri), Some(client)) => {
                let fetch = async {
                    let resp = client.get(uri.clone()).await.map_err(|e| format!("fetch failed: {e}"))?;
                    if resp.status() != http::StatusCode::OK {
                        return Err(format!("HTTP status {}", resp.status()));
                    }
                    let body = Limited::new(resp.into_body(), MAX_JWKS_BYTES)
                        .collect()
                        .await
                        .map_err(|e| format!("reading the body: {e}"))?;
                    Ok(body.to_bytes().to_vec())
                };
                tokio::time::timeout(FETCH_TIMEOUT, fetch).await.map_err(|_| "fetch timed out".to_string())?
            }
            (JwksSource::Url(_), None) => Err("no HTTP client".into()),
        }
    }

    /// Fetches now, unconditionally (periodic refresh). Keeps the old keys on failure.
    pub async fn refresh(&self) -> Result<usize, String> {
        let mut last = self.fetch.lock().await;
        *last = Some(Instant::now());
        let body = self.read_source().await?;
        self.install(&body)
    }

    /// Refreshes because a token named a `kid` not in the set, unless another refresh
    /// happened since `seen_generation` was read or the last attempt is more recent than
    /// the minimum interval. Returns whether the keys may have changed.
    pub async fn refresh_for_unknown_kid(&self, seen_generation: u64) -> bool {
        let mut last = self.fetch.lock().await;
        if self.generation() != seen_generation {
            return true;
        }
        if last.is_some_and(|t| t.elapsed() < self.min_refresh) {
            return false;
        }
        *last = Some(Instant::now());
        match self.read_source().await {
            Ok(body) => match self.install(&body) {
                Ok(n) => {
                    tracing::info!(source = %self.source, keys = n, "JWKS refreshed for an unknown kid");
                    true
                }
                Err(e) => {
                    tracing::warn!(source = %self.source, error = %e, "JWKS refresh failed; keeping the old keys");
                    false
                }
            },
            Err(e) => {
                tracing::warn!(source = %self.source, error = %e, "JWKS refresh failed; keeping the old keys");
                false
            }
        }
    }

    /// How many times keys were loaded.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
}

fn https_client() -> Result<HttpsClient, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(provider)
        .map_err(|e| format!("TLS setup: {e}"))?
        .https_or_http()
        .enable_http1()
        .build();
    Ok(Client::builder(TokioExecutor::new()).build(https))
}

/// Keeps `jwks` fresh until the returned handle is dropped (or the weak reference dies):
/// fetches at once, then every `refresh_every` (every `min_refresh` while it has never
/// succeeded).
pub fn spawn_refresher(jwks: &Arc<Jwks>) -> tokio::task::JoinHandle<()> {
    let weak = Arc::downgrade(jwks);
    let (every, retry) = (jwks.refresh_every, jwks.min_refresh.max(Duration::from_secs(1)));
    tokio::spawn(async move {
        let mut ok_once = false;
        let mut first = true;
        loop {
            if !first {
                tokio::time::sleep(if ok_once { every } else { retry }).await;
            }
            first = false;
            let Some(jwks) = weak.upgrade() else {
                return;
            };
            match jwks.refresh().await {
                Ok(n) => {
                    if !ok_once || n == 0 {
                        tracing::info!(source = %jwks.source, keys = n, "JWKS loaded");
                    }
                    ok_once = true;
                }
                Err(e) => {
                    tracing::warn!(source = %jwks.source, error = %e, "JWKS refresh failed; keeping the old keys")
                }
            }
        }
    })
}
