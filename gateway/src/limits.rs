//! Abuse limits and their counters: connection rate per client address (HTTP 429 before
//! the upgrade), connections per node (HTTP 503), commands per connection (error 111,
//! then close 4007), connections per user (close 4010, counted in the hub). Every map
//! keyed by address is bounded.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use serde::Deserialize;
use tokio::time::Instant;

use crate::client_ip::{self, ClientIpResolver};

/// `[limits]`: every limit with its default; 0 turns a limit off.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// New connections per second from one client address (an IPv4 address or an IPv6
    /// /64), sustained; over it the upgrade is refused with HTTP 429. Default 20.
    pub connection_rate_per_ip: f64,
    /// Connections one address may open at once before the rate applies. Default 100.
    pub connection_burst_per_ip: u32,
    /// Most client addresses the rate limiter tracks; idle ones are evicted first, then
    /// the least recently seen. Default 65536.
    pub max_tracked_ips: usize,
    /// Most connections open on this node; more: HTTP 503. Env `ROOMCAST_MAX_CONNECTIONS`.
    /// Default 100000.
    pub max_connections: usize,
    /// Most connections of one user (token `sub`, not anonymous) on this node; more:
    /// close 4010. Default 100.
    pub max_connections_per_user: usize,
    /// Commands per second per connection, sustained (`pong` is not counted); over it a
    /// command gets error 111. Default 100.
    pub commands_per_second: f64,
    /// Commands a connection may send at once before the rate applies. Default 200.
    pub command_burst: u32,
    /// This many 111 errors within `command_violation_window_ms` close the connection
    /// with 4007. Default 50.
    pub command_violations_to_close: u32,
    /// Default 10000.
    pub command_violation_window_ms: u64,
    /// Clients on loopback (127.0.0.0/8, ::1; after `trusted_proxies` resolution) are
    /// exempt from the connection rate and the command rate: they are local processes
    /// (tools, load generators, a sidecar). Behind a proxy on the same host, list it in
    /// `trusted_proxies`, or every client looks local. Default true.
    pub exempt_loopback: bool,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            connection_rate_per_ip: 20.0,
            connection_burst_per_ip: 100,
            max_tracked_ips: 65_536,
            max_connections: 100_000,
            max_connections_per_user: 100,
            commands_per_second: 100.0,
            command_burst: 200,
            command_violations_to_close: 50,
            command_violation_window_ms: 10_000,
            exempt_loopback: true,
        }
    }
}

impl LimitsConfig {
    /// Checks the values; returns the offending field and why.
    pub fn check(&self) -> Result<(), (&'static str, &'static str)> {
        for (field, v) in [
            ("limits.connection_rate_per_ip", self.connection_rate_per_ip),
            ("limits.commands_per_second", self.commands_per_second),
        ] {
            if !v.is_finite() || v < 0.0 {
                return Err((field, "must be a number of at least 0"));
            }
        }
        if self.connection_rate_per_ip > 0.0 && self.connection_burst_per_ip == 0 {
            return Err(("limits.connection_burst_per_ip", "must be at least 1 when the rate is on"));
        }
        if self.connection_rate_per_ip > 0.0 && self.max_tracked_ips == 0 {
            return Err(("limits.max_tracked_ips", "must be at least 1 when the rate is on"));
        }
        if self.commands_per_second > 0.0 && self.command_burst == 0 {
            return Err(("limits.command_burst", "must be at least 1 when the rate is on"));
        }
        if self.commands_per_second > 0.0 && self.command_violation_window_ms == 0 {
            return Err(("limits.command_violation_window_ms", "must be greater than 0"));
        }
        Ok(())
    }
}

/// A token bucket.
#[derive(Debug, Clone, Copy)]
pub struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    pub fn full(burst: u32, now: Instant) -> Self {
        Bucket { tokens: f64::from(burst), last: now }
    }

    fn refill(&mut self, rate: f64, burst: u32, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * rate).min(f64::from(burst));
        self.last = now;
    }

    /// Takes a token if there is one.
    pub fn take(&mut self, rate: f64, burst: u32, now: Instant) -> bool {
        self.refill(rate, burst, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Whether the bucket would be full by `now` (an entry in that state carries no
    /// information and can be forgotten).
    fn idle(&self, rate: f64, burst: u32, now: Instant) -> bool {
        self.tokens + now.saturating_duration_since(self.last).as_secs_f64() * rate >= f64::from(burst)
    }
}

/// Connection rate per client address, bounded.
#[derive(Debug)]
pub struct IpRateLimiter {
    rate: f64,
    burst: u32,
    max: usize,
    state: Mutex<IpState>,
}

#[derive(Debug)]
struct IpState {
    buckets: HashMap<IpAddr, Bucket>,
    last_sweep: Instant,
}

/// How often idle entries are swept even when the map is not full.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

impl IpRateLimiter {
    pub fn new(rate: f64, burst: u32, max: usize) -> Self {
        IpRateLimiter {
            rate,
            burst,
            max: max.max(1),
            state: Mutex::new(IpState { buckets: HashMap::new(), last_sweep: Instant::now() }),
        }
    }

    /// Whether `ip` may open a connection now (and counts it).
    pub fn allow(&self, ip: IpAddr, now: Instant) -> bool {
        let key = client_ip::limit_key(ip);
        let mut st = self.state.lock();
        if now.saturating_duration_since(st.last_sweep) >= SWEEP_EVERY {
            self.sweep(&mut st, now);
        }
        if !st.buckets.contains_key(&key) && st.buckets.len() >= self.max {
            self.sweep(&mut st, now);
            if st.buckets.len() >= self.max {
                self.evict_oldest(&mut st);
            }
        }
        let (rate, burst) = (self.rate, self.burst);
        st.buckets.entry(key).or_insert_with(|| Bucket::full(burst, now)).take(rate, burst, now)
    }

    fn sweep(&self, st: &mut IpState, now: Instant) {
        let (rate, burst) = (self.rate, self.burst);
        st.buckets.retain(|_, b| !b.idle(rate, burst, now));
        st.last_sweep = now;
    }

    /// Drops the least recently seen tenth of the entries (at least one).
    fn evict_oldest(&self, st: &mut IpState) {
        let n = (st.buckets.len() / 10).max(1);
        let mut seen: Vec<Instant> = st.buckets.values().map(|b| b.last).collect();
        let idx = n.min(seen.len()) - 1;
        let (_, cutoff, _) = seen.select_nth_unstable(idx);
        let cutoff = *cutoff;
        let mut removed = 0;
        st.buckets.retain(|_, b| {
            if removed < n && b.last <= cutoff {
                removed += 1;
                false
            } else {
                true
            }
        });
    }

    /// Addresses tracked now.
    pub fn tracked(&self) -> usize {
        self.state.lock().buckets.len()
    }
}

/// Open connections on this node, bounded.
#[derive(Debug, Default)]
pub struct ConnectionSlots {
    open: AtomicUsize,
}

/// One open connection; frees its slot when dropped.
#[derive(Debug)]
pub struct Slot(Arc<ConnectionSlots>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

impl ConnectionSlots {
    /// Takes a slot unless `max` are taken (0: no limit).
    pub fn try_acquire(self: &Arc<Self>, max: usize) -> Option<Slot> {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (max == 0 || n < max).then_some(n + 1))
            .ok()
            .map(|_| Slot(self.clone()))
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }
}

/// A connection's command rate.
#[derive(Debug)]
pub struct CommandLimiter {
    rate: f64,
    burst: u32,
    bucket: Bucket,
    violations: u32,
    window_start: Instant,
    window: Duration,
    to_close: u32,
}

/// What to do with a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandVerdict {
    Allow,
    /// Answer 111.
    Limited,
    /// Too many 111s: close 4007.
    Close,
}

impl CommandLimiter {
    /// A limiter, or `None` when the command rate is off.
    pub fn new(cfg: &LimitsConfig, now: Instant) -> Option<Self> {
        (cfg.commands_per_second > 0.0).then(|| CommandLimiter {
            rate: cfg.commands_per_second,
            burst: cfg.command_burst,
            bucket: Bucket::full(cfg.command_burst, now),
            violations: 0,
            window_start: now,
            window: Duration::from_millis(cfg.command_violation_window_ms),
            to_close: cfg.command_violations_to_close,
        })
    }

    pub fn check(&mut self, now: Instant) -> CommandVerdict {
        if self.bucket.take(self.rate, self.burst, now) {
            return CommandVerdict::Allow;
        }
        if now.saturating_duration_since(self.window_start) > self.window {
            self.window_start = now;
            self.violations = 0;
        }
        self.violations += 1;
        if self.to_close > 0 && self.violations >= self.to_close {
            CommandVerdict::Close
        } else {
            CommandVerdict::Limited
        }
    }
}

/// One counter per limit, readable at any time; `/metrics` exports them as
/// `roomcast_limit_trips_total{limit="<name>"}`.
#[derive(Debug, Default)]
pub struct LimitCounters {
    /// Upgrades refused with HTTP 429 (connection rate per address).
    pub connections_rate_limited: AtomicU64,
    /// Upgrades refused with HTTP 503 (connections per node).
    pub connections_over_node_limit: AtomicU64,
    /// Connections closed with 4010 (connections per user).
    pub connections_over_user_limit: AtomicU64,
    /// Commands answered 111.
    pub commands_rate_limited: AtomicU64,
    /// Connections closed with 4007.
    pub closed_too_many_requests: AtomicU64,
    /// Subscribes answered 106 for `max_subscriptions`.
    pub subscriptions_over_limit: AtomicU64,
    /// Connections closed with 4008.
    pub messages_too_large: AtomicU64,
    /// Publishes answered 106 for `max_data_size`.
    pub data_too_large: AtomicU64,
    /// Connections closed with 4005.
    pub handshake_timeouts: AtomicU64,
    /// Connections closed with 4006.
    pub pong_timeouts: AtomicU64,
    /// Tokens refused with 101 (connect, refresh, subscribe).
    pub tokens_refused: AtomicU64,
    /// Tokens refused as expired (109), and connections closed with 4004.
    pub tokens_expired: AtomicU64,
    /// Backend API requests the NATS client dropped because this node's API subscription
    /// buffer was full (a lower bound: the client reports each drop on a bounded channel).
    /// Fire-and-forget publishers see no error, so this is where an overload shows.
    pub api_requests_dropped: AtomicU64,
}

impl LimitCounters {
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Every counter by name.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            ("connections_rate_limited", r(&self.connections_rate_limited)),
            ("connections_over_node_limit", r(&self.connections_over_node_limit)),
            ("connections_over_user_limit", r(&self.connections_over_user_limit)),
            ("commands_rate_limited", r(&self.commands_rate_limited)),
            ("closed_too_many_requests", r(&self.closed_too_many_requests)),
            ("subscriptions_over_limit", r(&self.subscriptions_over_limit)),
            ("messages_too_large", r(&self.messages_too_large)),
            ("data_too_large", r(&self.data_too_large)),
            ("handshake_timeouts", r(&self.handshake_timeouts)),
            ("pong_timeouts", r(&self.pong_timeouts)),
            ("tokens_refused", r(&self.tokens_refused)),
            ("tokens_expired", r(&self.tokens_expired)),
            ("api_requests_dropped", r(&self.api_requests_dropped)),
        ]
    }
}

/// The node's limits state.
#[derive(Debug)]
pub struct Limits {
    pub config: LimitsConfig,
    pub counters: LimitCounters,
    /// `None` when the connection rate is off.
    pub ip_rate: Option<IpRateLimiter>,
    pub slots: Arc<ConnectionSlots>,
    pub client_ip: ClientIpResolver,
    /// When the last "forwarding header from an untrusted peer" warning was logged
    /// (seconds since the limits were made, plus one; 0: never).
    warned_untrusted: AtomicU64,
    created: Instant,
}

/// Least time between two warnings about ignored forwarding headers.
const WARN_EVERY: Duration = Duration::from_secs(60);

impl Limits {
    pub fn new(config: LimitsConfig, client_ip: ClientIpResolver) -> Self {
        let ip_rate = (config.connection_rate_per_ip > 0.0).then(|| {
            IpRateLimiter::new(
                config.connection_rate_per_ip,
                config.connection_burst_per_ip,
                config.max_tracked_ips,
            )
        });
        Limits {
            config,
            counters: LimitCounters::default(),
            ip_rate,
            slots: Arc::new(ConnectionSlots::default()),
            client_ip,
            warned_untrusted: AtomicU64::new(0),
            created: Instant::now(),
        }
    }

    /// Whether per-client limits (connection rate, command rate) skip this client.
    pub fn is_exempt(&self, client: IpAddr) -> bool {
        self.config.exempt_loopback && client_ip::canonical(client).is_loopback()
    }

    /// Logs (at most once a minute) that `peer` sent a forwarding header that was
    /// ignored because it is not a trusted proxy: a load balancer missing from
    /// `trusted_proxies` makes every client share its address.
    pub fn note_forwarding_header(&self, peer: IpAddr, headers: &http::HeaderMap) {
        if !headers.contains_key("x-forwarded-for") && !headers.contains_key("forwarded") {
            return;
        }
        if self.client_ip.is_trusted(peer) {
            return;
        }
        let now = self.created.elapsed().as_secs() + 1;
        let last = self.warned_untrusted.load(Ordering::Relaxed);
        if last != 0 && now < last + WARN_EVERY.as_secs() {
            return;
        }
        if self.warned_untrusted.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
            tracing::warn!(
                %peer,
                "ignoring X-Forwarded-For/Forwarded from a peer not in trusted_proxies; if it is your \
                 load balancer, add it to trusted_proxies (else all its clients share one address)"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn bucket_refills() {
        let t0 = Instant::now();
        let mut b = Bucket::full(2, t0);
        assert!(b.take(1.0, 2, t0) && b.take(1.0, 2, t0));
        assert!(!b.take(1.0, 2, t0));
        assert!(!b.take(1.0, 2, t0 + Duration::from_millis(500)));
        assert!(b.take(1.0, 2, t0 + Duration::from_millis(1100)));
        // Never more than the burst.
        let later = t0 + Duration::from_secs(100);
        assert!(b.take(1.0, 2, later) && b.take(1.0, 2, later) && !b.take(1.0, 2, later));
    }

    #[test]
    fn ip_limiter_is_per_address_and_per_ipv6_64() {
        let l = IpRateLimiter::new(1.0, 2, 100);
        let t = Instant::now();
        assert!(l.allow(ip("1.1.1.1"), t) && l.allow(ip("1.1.1.1"), t));
        assert!(!l.allow(ip("1.1.1.1"), t));
        assert!(l.allow(ip("2.2.2.2"), t));
        assert!(l.allow(ip("2001:db8::1"), t) && l.allow(ip("2001:db8::2"), t));
        assert!(!l.allow(ip("2001:db8::ffff"), t), "one /64 shares a bucket");
        assert!(l.allow(ip("2001:db8:0:1::1"), t));
    }

    #[test]
    fn ip_limiter_stays_bounded() {
        let l = IpRateLimiter::new(1.0, 5, 100);
        let t = Instant::now();
        for i in 0..10_000u32 {
            let a = std::net::Ipv4Addr::from(0x0a00_0000 + i);
            assert!(l.allow(IpAddr::V4(a), t));
            assert!(l.tracked() <= 100);
        }
        // Idle entries go at the next sweep.
        let later = t + Duration::from_secs(60);
        assert!(l.allow(ip("9.9.9.9"), later));
        assert_eq!(l.tracked(), 1);
    }

    #[test]
    fn slots() {
        let s = Arc::new(ConnectionSlots::default());
        let a = s.try_acquire(2).unwrap();
        let _b = s.try_acquire(2).unwrap();
        assert!(s.try_acquire(2).is_none());
        drop(a);
        assert!(s.try_acquire(2).is_some());
        assert_eq!(s.open(), 1);
        let many: Vec<_> = (0..10).filter_map(|_| s.try_acquire(0)).collect();
        assert_eq!(many.len(), 10);
    }

    #[test]
    fn command_limiter_limits_then_closes() {
        let cfg = LimitsConfig {
            commands_per_second: 10.0,
            command_burst: 5,
            command_violations_to_close: 3,
            ..LimitsConfig::default()
        };
        let t = Instant::now();
        let mut l = CommandLimiter::new(&cfg, t).unwrap();
        for _ in 0..5 {
            assert_eq!(l.check(t), CommandVerdict::Allow);
        }
        assert_eq!(l.check(t), CommandVerdict::Limited);
        assert_eq!(l.check(t), CommandVerdict::Limited);
        // Refilled: allowed again; violations are remembered within the window.
        assert_eq!(l.check(t + Duration::from_millis(150)), CommandVerdict::Allow);
        assert_eq!(l.check(t + Duration::from_millis(150)), CommandVerdict::Close);
        // A new window forgets old violations.
        let mut l = CommandLimiter::new(&cfg, t).unwrap();
        for _ in 0..5 {
            l.check(t);
        }
        assert_eq!(l.check(t), CommandVerdict::Limited);
        assert_eq!(l.check(t), CommandVerdict::Limited);
        let t2 = t + Duration::from_secs(11);
        for _ in 0..5 {
            assert_eq!(l.check(t2), CommandVerdict::Allow);
        }
        assert_eq!(l.check(t2), CommandVerdict::Limited);
        assert!(CommandLimiter::new(&LimitsConfig { commands_per_second: 0.0, ..cfg }, t).is_none());
    }
}
