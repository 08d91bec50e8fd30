//! What every scenario shares: where to connect, /proc sampling, small helpers.

use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use anyhow::Context as _;
use clap::Args;
use hdrhistogram::Histogram;

use crate::proto::{Dial, Proto};
use crate::rawws;

#[derive(Args, Clone)]
pub struct Common {
    /// Node WebSocket URL(s), comma separated; connections are spread over them. For
    /// Socket.IO: ws://HOST:PORT/socket.io/?EIO=4&transport=websocket (the path is added
    /// when the URL has none).
    #[arg(long, default_value = "ws://127.0.0.1:8000/ws")]
    pub url: String,
    /// Source addresses to connect from (to go past one address's port range), e.g.
    /// 127.0.0.2,127.0.0.3.
    #[arg(long, default_value = "127.0.0.1", value_delimiter = ',')]
    pub sources: Vec<IpAddr>,
    /// Offer permessage-deflate.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub deflate: bool,
    /// Handshakes in flight at once.
    #[arg(long, default_value_t = 200)]
    pub concurrency: usize,
    /// The server's protocol.
    #[arg(long, value_enum, default_value_t = Proto::Roomcast)]
    pub proto: Proto,
    /// Connection token (JWT) sent in `connect` (Socket.IO: in the `40` auth payload).
    #[arg(long)]
    pub token: Option<String>,
}

/// Node addresses to spread connections over.
#[derive(Clone)]
pub struct Target {
    pub addrs: Vec<(SocketAddr, String)>,
}

pub fn parse_url(url: &str, proto: Proto) -> anyhow::Result<(SocketAddr, String)> {
    let rest = url.strip_prefix("ws://").with_context(|| format!("{url}: only ws:// URLs"))?;
    let (hostport, path) =
        rest.split_once('/').map_or((rest, "/".to_string()), |(h, p)| (h, format!("/{p}")));
    let addr: SocketAddr = hostport.parse().with_context(|| format!("{hostport} is not ip:port"))?;
    if !addr.ip().is_loopback() {
        anyhow::bail!("{addr}: this load generator only targets loopback addresses");
    }
    let path = match proto {
        Proto::Socketio if path == "/" => "/socket.io/?EIO=4&transport=websocket".to_string(),
        _ => path,
    };
    Ok((addr, path))
}

impl Target {
    /// From comma-separated URLs.
    pub fn new(urls: &str, proto: Proto) -> anyhow::Result<Self> {
        let addrs: Vec<_> = urls
            .split(',')
            .filter(|u| !u.trim().is_empty())
            .map(|u| parse_url(u.trim(), proto))
            .collect::<anyhow::Result<_>>()?;
        if addrs.is_empty() {
            anyhow::bail!("no URL given");
        }
        Ok(Target { addrs })
    }

    /// Connection `i`'s node (round robin) and source address.
    pub fn dial<'a>(&'a self, c: &'a Common, i: usize) -> Dial<'a> {
        let (addr, path) = &self.addrs[i % self.addrs.len()];
        Dial {
            addr: *addr,
            path,
            source: Some(c.sources[(i / self.addrs.len()) % c.sources.len()]),
            deflate: c.deflate,
            token: c.token.as_deref(),
        }
    }
}

pub fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// CPU time (user + system) of a process, in clock ticks.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = s.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// CPU used by a set of processes over an interval.
pub struct CpuMeter {
    pids: Vec<u32>,
    ticks: u64,
    at: Instant,
}

impl CpuMeter {
    pub fn start(pids: &[u32]) -> Self {
        CpuMeter { pids: pids.to_vec(), ticks: Self::sum(pids), at: Instant::now() }
    }
    fn sum(pids: &[u32]) -> u64 {
        pids.iter().filter_map(|p| cpu_ticks(*p)).sum()
    }
    /// (CPU seconds used, cores used on average) since `start`.
    pub fn read(&self) -> (f64, f64) {
        let secs = Self::sum(&self.pids).saturating_sub(self.ticks) as f64 / rawws::clock_ticks_per_sec();
        (secs, secs / self.at.elapsed().as_secs_f64().max(1e-6))
    }
}

/// A histogram of microseconds, 1 µs .. 120 s.
pub fn new_hist() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, 120_000_000, 3)?)
}

/// p50/p99/p999/max of a histogram of microseconds, in milliseconds, as JSON.
pub fn latency_json(h: &Histogram<u64>) -> serde_json::Value {
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    serde_json::json!({
        "count": h.len(), "p50": ms(0.5), "p99": ms(0.99), "p999": ms(0.999), "max": h.max() as f64 / 1000.0,
    })
}

/// `p50 … p99 … p999 … max …` in milliseconds.
pub fn latency_line(h: &Histogram<u64>) -> String {
    if h.is_empty() {
        return "no samples".into();
    }
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    format!(
        "p50 {:.2}  p99 {:.2}  p999 {:.2}  max {:.2}",
        ms(0.5),
        ms(0.99),
        ms(0.999),
        h.max() as f64 / 1000.0
    )
}

/// Prints a line at once (scripts wait for some lines while the scenario runs).
pub fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Prints the final `RESULT {json}` line.
pub fn result(v: serde_json::Value) {
    say(&format!("RESULT {v}"));
}

/// Microseconds since `origin`.
pub fn now_micros(origin: Instant) -> u64 {
    origin.elapsed().as_micros() as u64
}

/// `n` per second over `secs` (0 for no time).
pub fn per_second(n: u64, secs: f64) -> f64 {
    if secs > 0.0 { n as f64 / secs } else { 0.0 }
}
