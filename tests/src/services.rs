//! Real broker servers for the cluster tests: [`RedisServer`], [`RedisCluster`] (three
//! masters) and [`NatsServer`] (JetStream), each on free loopback ports below the kernel's
//! ephemeral range, with their files in a temporary directory; killed on drop. Also
//! [`start_nodes`] (several `roomcast` processes sharing a broker) and [`http_status`]
//! (for `/readyz`).
//!
//! The server binaries must be on PATH (`.ci/run` installs them): when one is missing the
//! test fails saying so; it is never skipped.
//!
//! Every wait is on a condition with a deadline.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::{NodeOptions, NodeProc};

/// How long a server may take to start answering.
const START_DEADLINE: Duration = Duration::from_secs(20);

/// Ports handed out by [`free_port`] in this process (never handed out twice, so that
/// tests running in parallel cannot pick the same one before either binds it).
static TAKEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A loopback port nobody listens on right now, below the kernel's ephemeral range: a port
/// from that range may meanwhile become the source port of an outgoing connection (a
/// reconnecting client may even connect to itself when it picks the port it dials), and
/// then the server could not bind it, or not again after a restart.
pub fn free_port() -> u16 {
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse::<u16>().ok()))
        .unwrap_or(32768);
    let low = 10_000u16;
    let span = u32::from(ephemeral_start.saturating_sub(low).max(1000));
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
        ^ std::process::id().rotate_left(16);
    let mut taken = TAKEN.lock().expect("port registry");
    let taken = taken.get_or_insert_with(HashSet::new);
    for i in 0..2000u32 {
        let port = low + (seed.wrapping_add(i.wrapping_mul(7919)) % span) as u16;
        if taken.contains(&port) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            taken.insert(port);
            return port;
        }
    }
    panic!("no free port found below {ephemeral_start}");
}

fn temp_dir(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "roomcast-{what}-{}-{}-{}",
        std::process::id(),
        crate::unique(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("creating a temporary directory");
    dir
}

/// Runs `cmd`, failing clearly when its program is not installed.
fn spawn(cmd: &mut Command, program: &str, package: &str) -> Child {
    match cmd.spawn() {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "`{program}` is not on PATH: the cluster tests need a real server. `.ci/run` installs it \
             (Debian: apt-get install {package}); these tests are never skipped"
        ),
        Err(e) => panic!("cannot start {program}: {e}"),
    }
}

fn kill_child(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// A broker server the cluster tests can stop and start again.
pub trait BrokerService: Send {
    /// What the nodes get as `ROOMCAST_BROKER`.
    fn url(&self) -> String;
    /// SIGKILL.
    fn kill(&mut self);
    /// Starts it again (killing it first if it runs) on the same port, with nothing kept.
    fn restart_empty(&mut self);
}

// ---------------------------------------------------------------------------------------
// Redis

/// A `redis-server` on a free port, persisting nothing. Killed on drop.
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    /// The cluster bus port, for a cluster node.
    bus_port: Option<u16>,
    dir: PathBuf,
    child: Option<Child>,
}

impl RedisServer {
    /// A standalone Redis, answering `PING`.
    pub fn start() -> RedisServer {
        Self::new(false)
    }

    /// A `--cluster-enabled yes` Redis holding no slot yet (see [`RedisCluster`]).
    pub fn start_cluster_node() -> RedisServer {
        Self::new(true)
    }

    fn new(cluster: bool) -> RedisServer {
        let port = free_port();
        // The bus port defaults to port + 10000, maybe inside the ephemeral range: choose it.
        let bus_port = cluster.then(free_port);
        let mut s = RedisServer { port, bus_port, dir: temp_dir(&format!("redis-{port}")), child: None };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "redis-server on port {} is already running", self.port);
        let _ = std::fs::remove_file(self.dir.join("nodes.conf"));
        let port = self.port.to_string();
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--daemonize", "no", "--loglevel", "warning"])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(self.log_path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(bus) = self.bus_port {
            cmd.args(["--cluster-enabled", "yes", "--cluster-announce-ip", "127.0.0.1"])
                .args(["--cluster-port", &bus.to_string(), "--cluster-node-timeout", "5000"])
                .arg("--cluster-config-file")
                .arg(self.dir.join("nodes.conf"));
        }
        self.child = Some(spawn(&mut cmd, "redis-server", "redis-server"));
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.child = None;
                panic!(
                    "redis-server on port {} exited at start ({status}); its log:\n{}",
                    self.port,
                    self.log()
                );
            }
            if self.try_command(&["PING"]).is_some_and(|r| r == "PONG") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on port {} did not answer PING within {START_DEADLINE:?}; its log:\n{}",
                self.port,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("redis.log")
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Whether the process runs.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// SIGKILL: nothing is saved.
    pub fn kill(&mut self) {
        kill_child(&mut self.child);
    }

    /// Kills the server if it runs, then starts it again, empty, on the same port.
    pub fn restart_empty(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Runs a command on a fresh connection; the reply as text (errors as `ERR …`, arrays
    /// as `[a b c]`). Panics when the server does not answer.
    pub fn command(&self, args: &[&str]) -> String {
        self.try_command(args).unwrap_or_else(|| panic!("redis {args:?} on port {} failed", self.port))
    }

    fn try_command(&self, args: &[&str]) -> Option<String> {
        let mut s =
            TcpStream::connect_timeout(&([127, 0, 0, 1], self.port).into(), Duration::from_secs(2)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        let mut req = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            req.extend_from_slice(format!("${}\r\n{a}\r\n", a.len()).as_bytes());
        }
        s.write_all(&req).ok()?;
        read_reply(&mut BufReader::new(s))
    }
}

/// One RESP2 reply as text.
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
            let mut buf = vec![0; usize::try_from(n).ok()? + 2];
            r.read_exact(&mut buf).ok()?;
            buf.truncate(buf.len() - 2);
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

impl BrokerService for RedisServer {
    fn url(&self) -> String {
        RedisServer::url(self)
    }
    fn kill(&mut self) {
        RedisServer::kill(self);
    }
    fn restart_empty(&mut self) {
        RedisServer::restart_empty(self);
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("--- log of redis-server on port {} ---\n{}", self.port, self.log());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis Cluster of masters without replicas, made with
/// `redis-cli --cluster create … --cluster-replicas 0 --cluster-yes`.
#[derive(Debug)]
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts `masters` (at least 3, as `redis-cli --cluster create` wants) cluster-enabled
    /// servers, joins them into one cluster and waits until every node reports
    /// `cluster_state:ok`.
    pub fn start(masters: usize) -> RedisCluster {
        assert!(masters >= 3, "redis-cli --cluster create needs at least 3 masters");
        let nodes: Vec<RedisServer> = (0..masters).map(|_| RedisServer::start_cluster_node()).collect();
        let mut cmd = Command::new("redis-cli");
        cmd.arg("--cluster").arg("create");
        for n in &nodes {
            cmd.arg(format!("127.0.0.1:{}", n.port));
        }
        cmd.args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = spawn(&mut cmd, "redis-cli", "redis-tools");
        let out = child.wait_with_output().expect("redis-cli --cluster create");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = RedisCluster { nodes };
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            let states: Vec<String> = cluster.nodes.iter().map(|n| n.command(&["CLUSTER", "INFO"])).collect();
            let ok =
                states.iter().all(|s| s.contains("cluster_state:ok") && s.contains("cluster_known_nodes:3"));
            // Every node must also know every slot's owner before clients can use it.
            let slots_ok = cluster
                .nodes
                .iter()
                .all(|n| n.command(&["CLUSTER", "SLOTS"]).matches("127.0.0.1").count() >= masters);
            if ok && slots_ok {
                return cluster;
            }
            assert!(Instant::now() < deadline, "the Redis Cluster did not become ready:\n{states:#?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `redis://SEED,SEED,SEED?cluster=true`.
    pub fn url(&self) -> String {
        let seeds: Vec<String> = self.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        format!("redis://{}?cluster=true", seeds.join(","))
    }

    /// How many keys each master holds (`DBSIZE`), in node order.
    pub fn keys_per_node(&self) -> Vec<u64> {
        self.nodes.iter().map(|n| n.command(&["DBSIZE"]).parse().unwrap_or(0)).collect()
    }

    /// The index of the node that owns `key`'s slot.
    pub fn owner_of(&self, key: &str) -> usize {
        let slot: u64 = self.nodes[0].command(&["CLUSTER", "KEYSLOT", key]).parse().expect("a slot number");
        // CLUSTER SLOTS: [[start end [ip port id] …] …], rendered flat; parse with CLUSTER
        // NODES instead: "<id> <ip:port@bus> <flags> … <slot ranges…>".
        let nodes = self.nodes[0].command(&["CLUSTER", "NODES"]);
        for line in nodes.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 9 {
                continue;
            }
            let port: u16 = fields[1]
                .split('@')
                .next()
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            for range in &fields[8..] {
                let (a, b) = range.split_once('-').unwrap_or((range, range));
                if let (Ok(a), Ok(b)) = (a.parse::<u64>(), b.parse::<u64>())
                    && (a..=b).contains(&slot)
                {
                    return self.nodes.iter().position(|n| n.port == port).expect("a node of this cluster");
                }
            }
        }
        panic!("no owner found for slot {slot} in:\n{nodes}");
    }
}

// ---------------------------------------------------------------------------------------
// NATS

/// A `nats-server` with JetStream (file store in its own directory) on a free port.
/// Killed, and its directory removed, on drop.
#[derive(Debug)]
pub struct NatsServer {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl NatsServer {
    /// Starts the server and waits until it is ready (JetStream included).
    pub fn start() -> NatsServer {
        let port = free_port();
        let mut s = NatsServer { port, dir: temp_dir(&format!("nats-{port}")), child: None };
        s.spawn();
        s
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    /// The server's log (of its current run).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "nats-server on port {} is already running", self.port);
        let store = self.dir.join("store");
        std::fs::create_dir_all(&store).expect("creating the JetStream store directory");
        let _ = std::fs::remove_file(self.log_path());
        let mut cmd = Command::new("nats-server");
        cmd.args(["-js", "-a", "127.0.0.1", "-p", &self.port.to_string(), "-sd"])
            .arg(&store)
            .arg("-l")
            .arg(self.log_path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        self.child = Some(spawn(&mut cmd, "nats-server", "nats-server"));
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.child = None;
                panic!("nats-server on port {} exited at start ({status}):\n{}", self.port, self.log());
            }
            // "Server is ready" is logged once clients are accepted, JetStream enabled.
            if self.log().contains("Server is ready") && self.answers_ping() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "nats-server on port {} was not ready within {START_DEADLINE:?}:\n{}",
                self.port,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Connects, reads `INFO`, sends `CONNECT` and `PING`, expects `PONG`.
    fn answers_ping(&self) -> bool {
        let Ok(s) = TcpStream::connect_timeout(&([127, 0, 0, 1], self.port).into(), Duration::from_secs(1))
        else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let mut w = match s.try_clone() {
            Ok(w) => w,
            Err(_) => return false,
        };
        let mut r = BufReader::new(s);
        let mut line = String::new();
        if r.read_line(&mut line).is_err() || !line.starts_with("INFO ") {
            return false;
        }
        if w.write_all(b"CONNECT {\"verbose\":false}\r\nPING\r\n").is_err() {
            return false;
        }
        line.clear();
        r.read_line(&mut line).is_ok() && line.starts_with("PONG")
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// SIGKILL (the store stays).
    pub fn kill(&mut self) {
        kill_child(&mut self.child);
    }

    /// Kills the server if it runs, deletes its JetStream store, and starts it again on
    /// the same port: every stream is gone.
    pub fn restart_empty(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(self.dir.join("store"));
        self.spawn();
    }
}

impl BrokerService for NatsServer {
    fn url(&self) -> String {
        NatsServer::url(self)
    }
    fn kill(&mut self) {
        NatsServer::kill(self);
    }
    fn restart_empty(&mut self) {
        NatsServer::restart_empty(self);
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("--- log of nats-server on port {} ---\n{}", self.port, self.log());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------------------
// Nodes

/// Starts `n` nodes (in parallel) with this TOML configuration, all on `broker`
/// (`ROOMCAST_BROKER`; presence follows it), plus `env`.
pub fn start_nodes(n: usize, config_toml: &str, broker: &str, env: &[(&str, &str)]) -> Vec<NodeProc> {
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|i| {
                let opts = NodeOptions::with_config(config_toml)
                    .env("ROOMCAST_BROKER", broker)
                    .env("ROOMCAST_NODE_ID", format!("node{i}-{}", crate::unique()))
                    .envs(env);
                s.spawn(move || NodeProc::start(opts))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| panic!("a node did not start"))).collect()
    })
}

/// The HTTP status of `GET path` on `addr` (HTTP/1.1, `Connection: close`), `None` when
/// there is no answer within 2 s.
pub async fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 256];
        while !buf.windows(2).any(|w| w == b"\r\n") {
            let n = s.read(&mut chunk).await.ok()?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let line = String::from_utf8_lossy(&buf);
        line.split_whitespace().nth(1)?.parse().ok()
    };
    tokio::time::timeout(Duration::from_secs(2), attempt).await.ok().flatten()
}

/// Waits until `GET /readyz` answers `status` on every node.
pub async fn wait_readyz(nodes: &[NodeProc], status: u16, limit: Duration) {
    let what = format!("/readyz to answer {status} on every node");
    crate::eventually(limit, &what, || async {
        for n in nodes {
            if http_status(n.addr, "/readyz").await != Some(status) {
                return None;
            }
        }
        Some(())
    })
    .await;
}
