//! A throw-away `redis-server` for tests: on a free port, persisting nothing, killed on drop.
//! Shared by the broker's and the presence's Redis tests.
//!
//! `redis-server` must be on PATH (CI installs it): without it, tests fail with a message
//! saying so, never skip.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a starting server may take to answer.
const START_DEADLINE: Duration = Duration::from_secs(20);

pub struct RedisServer {
    port: u16,
    cluster: bool,
    dir: PathBuf,
    child: Option<Child>,
}

/// A port nobody listens on right now, below the kernel's ephemeral range: a port from that
/// range may meanwhile become the source port of an outgoing connection (a reconnecting
/// client even connects to itself when it picks the port it dials), and the server could not
/// bind it, or not again after a restart.
fn free_port() -> u16 {
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse::<u16>().ok()))
        .unwrap_or(32768);
    let low = 10_000u16;
    let span = ephemeral_start.saturating_sub(low).max(1000);
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos()
        ^ std::process::id().rotate_left(16);
    for i in 0..1000u32 {
        let port = low + ((seed.wrapping_add(i.wrapping_mul(7919))) % u32::from(span)) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port below {ephemeral_start}");
}

impl RedisServer {
    /// A single Redis.
    pub fn start() -> Self {
        Self::new(false)
    }

    /// A Redis Cluster of one node holding every slot.
    pub fn start_cluster() -> Self {
        let s = Self::new(true);
        s.command(&["CLUSTER", "ADDSLOTSRANGE", "0", "16383"]);
        let end = Instant::now() + START_DEADLINE;
        while !s.command(&["CLUSTER", "INFO"]).contains("cluster_state:ok") {
            assert!(Instant::now() < end, "the one-node cluster did not become ready");
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }

    fn new(cluster: bool) -> Self {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("roomcast-redis-test-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut s = RedisServer { port, cluster, dir, child: None };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let port = self.port.to_string();
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--daemonize", "no", "--loglevel", "warning"])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(self.log())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if self.cluster {
            // The bus port defaults to port + 10000, inside the ephemeral range: choose it too.
            let bus = free_port().to_string();
            cmd.args([
                "--cluster-enabled",
                "yes",
                "--cluster-announce-ip",
                "127.0.0.1",
                "--cluster-port",
                &bus,
            ])
            .arg("--cluster-config-file")
            .arg(self.dir.join("nodes.conf"));
        }
        let child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "redis-server is not on PATH: these tests need a real Redis (Debian: apt-get install \
                 redis-server); they are never skipped"
            ),
            Err(e) => panic!("cannot start redis-server: {e}"),
        };
        self.child = Some(child);
        let end = Instant::now() + START_DEADLINE;
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!(
                    "redis-server on port {} exited at start ({status}); its log:\n{}",
                    self.port,
                    std::fs::read_to_string(self.log()).unwrap_or_default()
                );
            }
            if self.try_command(&[b"PING"]).is_some_and(|r| r == "PONG") {
                return;
            }
            assert!(Instant::now() < end, "redis-server on port {} did not answer PING in time", self.port);
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn log(&self) -> PathBuf {
        self.dir.join("redis.log")
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Stops the server (SIGKILL: nothing is saved).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts an empty server again on the same port.
    pub fn restart(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(self.dir.join("nodes.conf"));
        self.spawn();
    }

    /// Runs a command on a fresh connection; the reply rendered as text.
    pub fn command(&self, args: &[&str]) -> String {
        let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        self.command_bytes(&args)
    }

    pub fn command_bytes(&self, args: &[&[u8]]) -> String {
        self.try_command(args)
            .unwrap_or_else(|| panic!("redis command {:?} failed", String::from_utf8_lossy(args[0])))
    }

    fn try_command(&self, args: &[&[u8]]) -> Option<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        let mut req = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            req.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            req.extend_from_slice(a);
            req.extend_from_slice(b"\r\n");
        }
        s.write_all(&req).ok()?;
        read_reply(&mut BufReader::new(s))
    }
}

/// One RESP2 reply, rendered as text (arrays space-separated in brackets).
fn read_reply(r: &mut BufReader<TcpStream>) -> Option<String> {
    let mut line = String::new();
    r.read_line(&mut line).ok()?;
    let line = line.trim_end_matches("\r\n");
    let (kind, rest) = line.split_at_checked(1)?;
    match kind {
        "+" | ":" => Some(rest.to_string()),
        "-" => Some(format!("ERR {rest}")),
        "$" => {
            let n: i64 = rest.parse().ok()?;
            if n < 0 {
                return Some("(nil)".into());
            }
            let mut buf = vec![0; n as usize + 2];
            r.read_exact(&mut buf).ok()?;
            buf.truncate(n as usize);
            Some(String::from_utf8_lossy(&buf).into_owned())
        }
        "*" => {
            let n: i64 = rest.parse().ok()?;
            let items: Option<Vec<String>> = (0..n.max(0)).map(|_| read_reply(r)).collect();
            Some(format!("[{}]", items?.join(" ")))
        }
        _ => None,
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Polls `f` until it holds, failing after `deadline`.
pub async fn wait_until(what: &str, deadline: Duration, f: impl Fn() -> bool) {
    let end = tokio::time::Instant::now() + deadline;
    while !f() {
        assert!(tokio::time::Instant::now() < end, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
