//! Smoke runs (seconds each) of every roomcast load scenario of `loadgen` against real
//! nodes: the `RESULT {json}` line parses and shows sane values. The numbers themselves
//! are not checked (this is a test, not a benchmark).
//!
//! `loadgen` is `target/<profile>/loadgen`, next to the `roomcast` binary (built by
//! `cargo test --workspace`, or `cargo build -p roomcast-loadgen`), or `LOADGEN_BIN`.
//! The Socket.IO comparison (bench/run.sh socketio-*) needs npm and is not run here.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use roomcast_tests::{NodeOptions, NodeProc, Value, roomcast_bin, within};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

fn loadgen_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("LOADGEN_BIN") {
        return PathBuf::from(p);
    }
    let bin = roomcast_bin().with_file_name(format!("loadgen{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.is_file(),
        "the loadgen binary is missing at {}: build it with `cargo build -p roomcast-loadgen` \
         or run `cargo test --workspace` (or set LOADGEN_BIN)",
        bin.display()
    );
    bin
}

/// A running `loadgen`, its stdout read line by line.
struct Loadgen {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    seen: Vec<String>,
    stderr: tokio::task::JoinHandle<String>,
    args: Vec<String>,
}

impl Loadgen {
    fn spawn(args: &[String]) -> Loadgen {
        let mut child = Command::new(loadgen_bin())
            .args(args)
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run loadgen: {e}"));
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut err = child.stderr.take().unwrap();
        let stderr = tokio::spawn(async move {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s).await;
            s
        });
        Loadgen { child, lines, seen: Vec::new(), stderr, args: args.to_vec() }
    }

    /// Reads stdout until a line starts with `prefix` (returned).
    async fn line_starting(&mut self, prefix: &str, limit: Duration) -> String {
        let what = format!("a line starting with {prefix:?} from loadgen {:?}", self.args);
        within(limit, &what, async {
            loop {
                match self.lines.next_line().await {
                    Ok(Some(l)) => {
                        self.seen.push(l.clone());
                        if l.starts_with(prefix) {
                            return l;
                        }
                    }
                    _ => panic!("loadgen ended before {prefix:?}; stdout:\n{}", self.seen.join("\n")),
                }
            }
        })
        .await
    }

    /// Waits for the end; returns the exit status, all of stdout and stderr.
    async fn finish(mut self, limit: Duration) -> (ExitStatus, String, String) {
        let what = format!("loadgen {:?} to finish", self.args);
        within(limit, &what, async {
            while let Ok(Some(l)) = self.lines.next_line().await {
                self.seen.push(l);
            }
        })
        .await;
        let status = within(Duration::from_secs(5), "loadgen to exit", self.child.wait()).await.unwrap();
        let err = self.stderr.await.unwrap_or_default();
        (status, self.seen.join("\n"), err)
    }
}

/// Runs loadgen to the end and returns its `RESULT` JSON, failing on a bad exit.
async fn run(args: &[String], limit: Duration) -> Value {
    let (status, out, err) = Loadgen::spawn(args).finish(limit).await;
    assert!(status.success(), "loadgen {args:?} failed ({status}):\n{out}\n{err}");
    result_of(&out, &err)
}

fn result_of(out: &str, err: &str) -> Value {
    let line = out
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("RESULT "))
        .unwrap_or_else(|| panic!("no RESULT line:\n{out}\n{err}"));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("RESULT is not JSON ({e}): {line}"))
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

fn u(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("`{key}` is not an unsigned integer in {v}"))
}

fn f(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or_else(|| panic!("`{key}` is not a number in {v}"))
}

const LIMIT: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_over_two_nodes() {
    let (a, b) = (NodeProc::start(NodeOptions::new()), NodeProc::start(NodeOptions::new()));
    let r = run(
        &args(&[
            "idle",
            "--url",
            &format!("{},{}", a.ws_url(), b.ws_url()),
            "--node-pid",
            &format!("{},{}", a.pid, b.pid),
            "--sources",
            "127.0.0.2,127.0.0.3",
            "--conns",
            "300",
            "--rooms",
            "10",
            "--hold-secs",
            "1",
        ]),
        LIMIT,
    )
    .await;
    assert_eq!(r["scenario"], "idle");
    assert_eq!(u(&r, "connections"), 300, "{r}");
    assert_eq!(u(&r, "failed"), 0, "{r}");
    assert_eq!(u(&r, "still_open"), 300, "{r}");
    assert_eq!(r["node_rss_kib_after"].as_array().map(Vec::len), Some(2), "{r}");
    assert!(r["node_rss_kib_after"].as_array().unwrap().iter().all(|k| k.as_u64() > Some(0)), "{r}");
    assert!(f(&r, "rss_bytes_per_connection") >= 0.0, "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_delivers_everything() {
    let n = NodeProc::start(NodeOptions::new());
    let r = run(
        &args(&[
            "fanout",
            "--url",
            &n.ws_url(),
            "--node-pid",
            &n.pid.to_string(),
            "--subs",
            "50",
            "--rate",
            "200",
            "--duration-secs",
            "2",
        ]),
        LIMIT,
    )
    .await;
    assert!(u(&r, "published") > 0, "{r}");
    assert_eq!(u(&r, "delivered"), u(&r, "expected"), "{r}");
    assert_eq!(u(&r, "lost"), 0, "{r}");
    assert!(f(&r, "deliveries_per_s") > 0.0, "{r}");
    assert!(r["latency_ms"]["count"].as_u64() > Some(0), "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storm_connection_rate() {
    let n = NodeProc::start(NodeOptions::new());
    let r = run(
        &args(&[
            "storm",
            "--mode",
            "rate",
            "--url",
            &n.ws_url(),
            "--conns",
            "400",
            "--concurrency",
            "50",
            "--sources",
            "127.0.0.2,127.0.0.3",
            "--timeout-secs",
            "60",
        ]),
        LIMIT,
    )
    .await;
    assert_eq!(u(&r, "connections"), 400, "{r}");
    assert_eq!(u(&r, "failed"), 0, "{r}");
    assert!(f(&r, "connections_per_s") > 0.0, "{r}");
}

fn storm_reconnect_args(url: &str, extra: &[&str]) -> Vec<String> {
    let mut a = args(&[
        "storm",
        "--mode",
        "reconnect",
        "--url",
        url,
        "--conns",
        "60",
        "--rate",
        "20",
        "--warmup-secs",
        "1",
        "--settle-secs",
        "1",
        "--wait-disconnect-secs",
        "30",
        "--timeout-secs",
        "30",
        "--backoff-min-ms",
        "50",
        "--backoff-max-ms",
        "500",
    ]);
    a.extend(args(extra));
    a
}

/// Checks a finished reconnect storm in which the memory broker's history was lost.
fn assert_storm_recovered_honestly(r: &Value) {
    assert_eq!(r["mode"], "reconnect");
    assert_eq!(r["storm"], true, "{r}");
    assert_eq!(r["complete"], true, "{r}");
    assert_eq!(u(r, "disconnected"), 60, "{r}");
    assert_eq!(u(r, "still_down"), 0, "{r}");
    assert!(u(r, "published") > 0, "{r}");
    assert_eq!(u(r, "duplicated"), 0, "{r}");
    assert_eq!(u(r, "offset_gaps"), 0, "{r}");
    // A new memory broker (or another node's) has another epoch: every resubscription
    // says recovered:false, and nothing may be lost by a client that was told true.
    assert_eq!(u(r, "recovered_false"), 60, "{r}");
    assert_eq!(u(r, "lost_recovered"), 0, "{r}");
    assert!(f(r, "all_back_s") > 0.0, "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storm_reconnect_after_sigkill_and_restart() {
    let mut node = NodeProc::start(NodeOptions::new());
    let addr = node.addr;
    let mut lg = Loadgen::spawn(&storm_reconnect_args(&node.ws_url(), &[]));
    lg.line_starting("READY", LIMIT).await;
    node.kill();
    // The same address, as bench/run.sh does; the memory broker starts empty.
    let _restarted = NodeProc::start(NodeOptions::new().env("ROOMCAST_LISTEN", addr));
    let (status, out, err) = lg.finish(LIMIT).await;
    assert!(status.success(), "{out}\n{err}");
    let r = result_of(&out, &err);
    assert_storm_recovered_honestly(&r);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storm_reconnect_after_sigterm_to_another_node() {
    let mut a = NodeProc::start(NodeOptions::new());
    let b = NodeProc::start(NodeOptions::new());
    let mut lg = Loadgen::spawn(&storm_reconnect_args(&a.ws_url(), &["--reconnect-url", &b.ws_url()]));
    lg.line_starting("READY", LIMIT).await;
    a.terminate();
    let (status, out, err) = lg.finish(LIMIT).await;
    assert!(status.success(), "{out}\n{err}");
    let r = result_of(&out, &err);
    assert_storm_recovered_honestly(&r);
    // A graceful shutdown closes every connection with 4000.
    assert_eq!(r["close_codes"]["4000"].as_u64(), Some(60), "{r}");
    assert!(a.wait_exit(Duration::from_secs(15)).await.is_some(), "node a did not exit on SIGTERM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compression_with_and_without_deflate() {
    let n = NodeProc::start(NodeOptions::new());
    let r = run(
        &args(&[
            "compression",
            "--url",
            &n.ws_url(),
            "--node-pid",
            &n.pid.to_string(),
            "--subs",
            "20",
            "--rate",
            "50",
            "--duration-secs",
            "2",
        ]),
        LIMIT,
    )
    .await;
    let runs = r["runs"].as_array().unwrap_or_else(|| panic!("no runs in {r}"));
    assert_eq!(runs.len(), 2, "{r}");
    let (on, off) = (&runs[0], &runs[1]);
    assert_eq!(on["deflate"], true);
    assert_eq!(u(on, "negotiated"), 20, "{r}");
    assert_eq!(u(off, "negotiated"), 0, "{r}");
    for run in runs {
        assert!(u(run, "delivered") > 0, "{r}");
        assert_eq!(u(run, "lost"), 0, "{r}");
        assert!(f(run, "app_bytes_per_delivery") >= 300.0, "{r}");
    }
    // Chat JSON compresses, and uncompressed frames are the messages plus a header.
    assert!(f(on, "wire_bytes_per_delivery") < f(off, "wire_bytes_per_delivery"), "{r}");
    assert!(f(off, "wire_bytes_per_delivery") >= f(off, "app_bytes_per_delivery"), "{r}");
}

fn cluster_args(publish: &str, subs: &str) -> Vec<String> {
    args(&[
        "cluster",
        "--publish-url",
        publish,
        "--url",
        subs,
        "--subs",
        "40",
        "--rooms",
        "10",
        "--rate",
        "500",
        "--duration-secs",
        "1",
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_between_memory_nodes_reports_that_nothing_crosses() {
    let (a, b) = (NodeProc::start(NodeOptions::new()), NodeProc::start(NodeOptions::new()));
    let r = run(&cluster_args(&a.ws_url(), &b.ws_url()), LIMIT).await;
    assert!(u(&r, "published") > 0, "{r}");
    assert!(u(&r, "expected") > 0, "{r}");
    // Memory brokers share nothing: expected until the nodes share a Redis or NATS broker.
    assert_eq!(u(&r, "delivered"), 0, "{r}");
    assert_eq!(r["crossed"], false, "{r}");
    assert_eq!(r["same_node"], false, "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_on_one_node_delivers_everything() {
    let n = NodeProc::start(NodeOptions::new());
    let r = run(&cluster_args(&n.ws_url(), &n.ws_url()), LIMIT).await;
    assert!(u(&r, "delivered") > 0, "{r}");
    assert_eq!(u(&r, "delivered"), u(&r, "expected"), "{r}");
    assert_eq!(u(&r, "lost"), 0, "{r}");
    assert_eq!(r["crossed"], true, "{r}");
    assert!(r["latency_ms"]["count"].as_u64() > Some(0), "{r}");
}
