//! The Python backend examples of `docs/backends.md` (`examples/python`) run against a real
//! node and a real `nats-server`: `publish.py` publishes (with an idempotency key, and fire
//! and forget) into a room a WebSocket client watches, and `rpc_responder.py` answers that
//! client's `rpc`.
//!
//! Needs `python3` with `nats-py` (`.ci/run` installs it) and `nats-server` on PATH; never
//! skipped.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use roomcast_tests::services::{NatsServer, start_nodes};
use roomcast_tests::{Enc, TestClient, json, unique, within};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

fn example(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/python").join(name)
}

fn python(script: &str) -> Command {
    let mut c = Command::new("python3");
    c.arg(example(script))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    c
}

const CONFIG: &str = "[limits]\ncommands_per_second = 0\nconnection_rate_per_ip = 0\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_examples_publish_and_answer_rpc() {
    let nats = NatsServer::start();
    let nodes = start_nodes(1, CONFIG, &nats.url(), &[]);
    let room = format!("py-{}", unique());
    let mut c = TestClient::connected(&nodes[0].ws_url(), Enc::Json).await;
    let r = c.request(json!({"type": "subscribe", "room": room})).await;
    assert_eq!(r["type"], "subscribed", "{r}");

    // publish.py: twice with the same key (a retry), which publishes once.
    for _ in 0..2 {
        let out = within(
            Duration::from_secs(30),
            "publish.py",
            python("publish.py")
                .args([
                    "--nats",
                    &nats.url(),
                    "--room",
                    &room,
                    "--text",
                    "deploy finished",
                    "--key",
                    "deploy-42",
                ])
                .output(),
        )
        .await
        .expect("python3 must be installed (.ci/run installs it)");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "publish.py failed ({}); is nats-py installed (pip install nats-py)?\nstdout: {stdout}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let first: serde_json::Value =
            serde_json::from_str(stdout.lines().next().unwrap_or("")).unwrap_or_default();
        assert_eq!(first["published"]["offset"], 1, "the first position both times: {stdout}");
        assert!(stdout.contains(&nodes[0].node_id), "info lists the node: {stdout}");
    }
    // The keyed publication once, and both fire-and-forget ones.
    let mut texts = Vec::new();
    for _ in 0..3 {
        let p = c.recv_type("publication").await;
        texts.push((p["data"]["text"].clone(), p["data"]["fire"].clone()));
    }
    let keyed = texts.iter().filter(|(_, fire)| fire.is_null()).count();
    assert_eq!(keyed, 1, "the retried publish published once: {texts:?}");
    assert!(texts.iter().all(|(t, _)| t == "deploy finished"), "{texts:?}");

    // rpc_responder.py: answers one call, then exits.
    let mut responder = python("rpc_responder.py")
        .args(["--nats", &nats.url(), "--method", "get_profile", "--count", "1"])
        .spawn()
        .expect("python3 must be installed");
    let mut lines = BufReader::new(responder.stdout.take().unwrap()).lines();
    let ready =
        within(Duration::from_secs(30), "the responder's ready line", lines.next_line()).await.unwrap();
    assert_eq!(ready.as_deref(), Some("ready"), "rpc_responder.py did not start; is nats-py installed?");
    let r = c.request(json!({"type": "rpc", "method": "get_profile", "data": {"user": "bob"}})).await;
    assert_eq!(r["type"], "rpc", "{r}");
    assert_eq!(r["data"]["name"], "Bob", "{r}");
    assert_eq!(r["data"]["asked"], json!({"user": "bob"}), "{r}");
    assert_eq!(r["data"]["client"], c.client_id.as_str(), "{r}");
    let status = within(Duration::from_secs(10), "the responder to exit", responder.wait()).await.unwrap();
    assert!(status.success(), "rpc_responder.py exited with {status}");
}
