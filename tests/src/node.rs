//! A real `roomcast` node process.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long a node may take to print its listening line.
const START_DEADLINE: Duration = Duration::from_secs(20);

/// How to start a node.
#[derive(Debug, Clone, Default)]
pub struct NodeOptions {
    /// TOML written to a temporary file and passed as `ROOMCAST_CONFIG`.
    pub config_toml: Option<String>,
    /// Extra environment variables (applied after the defaults, so they may override
    /// `ROOMCAST_LISTEN` or `ROOMCAST_LOG`).
    pub env: Vec<(String, String)>,
}

impl NodeOptions {
    /// No config file, no extra env.
    pub fn new() -> Self {
        Self::default()
    }

    /// With this TOML configuration.
    pub fn with_config(toml: &str) -> Self {
        NodeOptions { config_toml: Some(toml.to_string()), env: Vec::new() }
    }

    /// Adds an environment variable.
    pub fn env(mut self, key: &str, value: impl ToString) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// Adds environment variables.
    pub fn envs(mut self, vars: &[(&str, &str)]) -> Self {
        for (k, v) in vars {
            self.env.push((k.to_string(), v.to_string()));
        }
        self
    }
}

/// The `roomcast` binary: `ROOMCAST_BIN`, or `target/<profile>/roomcast` next to the
/// test executable (`target/<profile>/deps/<test>-<hash>`).
pub fn roomcast_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("ROOMCAST_BIN") {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "ROOMCAST_BIN={} is not a file", p.display());
        return p;
    }
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe.parent().and_then(|deps| deps.parent()).expect("target/<profile>/deps/<test>");
    let bin = profile_dir.join(format!("roomcast{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.is_file(),
        "the roomcast binary is missing at {}: build it with `cargo build -p roomcast-gateway` \
         or run `cargo test --workspace` (or set ROOMCAST_BIN)",
        bin.display()
    );
    bin
}

fn temp_path(what: &str, ext: &str) -> PathBuf {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    std::env::temp_dir().join(format!(
        "roomcast-test-{}-{}-{}-{what}.{ext}",
        std::process::id(),
        crate::unique(),
        nanos
    ))
}

/// A running node. Killed (SIGKILL) on drop.
#[derive(Debug)]
pub struct NodeProc {
    child: Child,
    /// Kept open so that the node never writes into a closed pipe.
    _stdout: Option<mpsc::Receiver<String>>,
    /// The address the node bound.
    pub addr: SocketAddr,
    /// The node's id, as printed.
    pub node_id: String,
    /// The process id.
    pub pid: u32,
    url: String,
    config_path: Option<PathBuf>,
    stderr_path: PathBuf,
}

impl NodeProc {
    /// Starts a node on `127.0.0.1:0` and waits (20 s at most) for its listening line.
    pub fn start(opts: NodeOptions) -> NodeProc {
        let bin = roomcast_bin();
        let mut cmd = Command::new(&bin);
        // Nothing from the test's own environment leaks into the node.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("ROOMCAST_") {
                cmd.env_remove(k);
            }
        }
        // `TEST_NODE_LOG` (e.g. `warn,roomcast_broker=debug`) sets the nodes' log filter when
        // chasing a failure; their stderr is printed when a test fails.
        let log = std::env::var("TEST_NODE_LOG").unwrap_or_else(|_| "warn".into());
        cmd.env("ROOMCAST_LISTEN", "127.0.0.1:0").env("ROOMCAST_LOG", log);
        let config_path = opts.config_toml.as_ref().map(|toml| {
            let p = temp_path("config", "toml");
            std::fs::write(&p, toml).expect("writing the node's config");
            p
        });
        if let Some(p) = &config_path {
            cmd.env("ROOMCAST_CONFIG", p);
        }
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        let stderr_path = temp_path("stderr", "log");
        let stderr = std::fs::File::create(&stderr_path).expect("creating the node's stderr file");
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(stderr);
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
        let stdout: ChildStdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let deadline = Instant::now() + START_DEADLINE;
        let failure = |child: &mut Child, why: String| -> ! {
            let _ = child.kill();
            let _ = child.wait();
            let err = std::fs::read_to_string(&stderr_path).unwrap_or_default();
            panic!("roomcast node did not start: {why}\n--- node stderr ---\n{err}");
        };
        let line = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.starts_with("roomcast listening on ") => break line,
                Ok(_) => continue,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    failure(&mut child, format!("no listening line within {START_DEADLINE:?}"))
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
                    failure(&mut child, format!("the process ended ({status})"))
                }
            }
        };
        // "roomcast listening on ws://127.0.0.1:PORT/ws node=ID"
        let mut words = line.split_whitespace().skip(3);
        let url = words.next().unwrap_or_default().to_string();
        let node_id = words.next().and_then(|w| w.strip_prefix("node=")).unwrap_or_default().to_string();
        let addr: SocketAddr = url
            .strip_prefix("ws://")
            .and_then(|rest| rest.split('/').next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| failure(&mut child, format!("unexpected listening line {line:?}")));
        assert!(!node_id.is_empty(), "no node id in {line:?}");
        let pid = child.id();
        NodeProc { child, _stdout: Some(rx), addr, node_id, pid, url, config_path, stderr_path }
    }

    /// The WebSocket URL, e.g. `ws://127.0.0.1:PORT/ws`.
    pub fn ws_url(&self) -> String {
        self.url.clone()
    }

    /// What the node wrote on stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// SIGKILL, and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM (graceful shutdown: connections get `disconnect` 4000).
    pub fn terminate(&self) {
        send_sigterm(self.pid);
    }

    /// Waits for the process to exit, at most `limit`; `None` if it is still running.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

#[allow(unsafe_code)]
fn send_sigterm(pid: u32) {
    let pid = libc::pid_t::try_from(pid).expect("pid fits pid_t");
    // SAFETY: kill(2) with a pid of our own child and a valid signal number has no memory
    // safety requirements.
    let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
    assert_eq!(rc, 0, "kill(SIGTERM) failed: {}", std::io::Error::last_os_error());
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        self.kill();
        if let Some(p) = &self.config_path {
            let _ = std::fs::remove_file(p);
        }
        if std::thread::panicking() {
            // Show the node's log with the failure.
            let err = self.stderr();
            if !err.is_empty() {
                eprintln!("--- stderr of node {} ---\n{err}", self.node_id);
            }
        }
        let _ = std::fs::remove_file(&self.stderr_path);
    }
}
