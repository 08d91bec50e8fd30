//! The backend examples of `docs/backends.md` run against a real node and a real
//! `nats-server`, in Python (`examples/python`) and in Node.js (`examples/node`): `publish`
//! publishes (with an idempotency key, and fire and forget) into a room a WebSocket client
//! watches, and `rpc_responder` answers that client's `rpc`.
//!
//! Needs `nats-server`, `python3` with `nats-py`, and `node` with `npm ci` run in
//! `examples/node` (`.ci/run` installs all of them); never skipped.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use roomcast_tests::services::{NatsServer, start_nodes};
use roomcast_tests::{Enc, TestClient, json, unique, within};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

/// The language of a set of examples.
#[derive(Debug, Clone, Copy)]
enum Lang {
    Python,
    Node,
}

impl Lang {
    /// The command running example `name` (`publish` or `rpc_responder`).
    fn example(self, name: &str) -> Command {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples");
        let mut c = match self {
            Lang::Python => {
                let mut c = Command::new("python3");
                c.arg(dir.join("python").join(format!("{name}.py")));
                c
            }
            Lang::Node => {
                let node = dir.join("node");
                assert!(
                    node.join("node_modules/nats").is_dir(),
                    "run `npm ci` in {} first (.ci/run does)",
                    node.display()
                );
                let mut c = Command::new("node");
                c.arg(node.join(format!("{name}.mjs")));
                c
            }
        };
        c.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
        c
    }

    /// What to install when an example cannot run.
    fn needs(self) -> &'static str {
        match self {
            Lang::Python => "python3 with nats-py (pip install nats-py)",
            Lang::Node => "node with `npm ci` in examples/node",
        }
    }
}

const CONFIG: &str = "[limits]\ncommands_per_second = 0\nconnection_rate_per_ip = 0\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_examples_publish_and_answer_rpc() {
    examples_publish_and_answer_rpc(Lang::Python).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_examples_publish_and_answer_rpc() {
    examples_publish_and_answer_rpc(Lang::Node).await;
}

async fn examples_publish_and_answer_rpc(lang: Lang) {
    let nats = NatsServer::start();
    let nodes = start_nodes(1, CONFIG, &nats.url(), &[]);
    let room = format!("{}-{}", format!("{lang:?}").to_lowercase(), unique());
    let mut c = TestClient::connected(&nodes[0].ws_url(), Enc::Json).await;
    let r = c.request(json!({"type": "subscribe", "room": room})).await;
    assert_eq!(r["type"], "subscribed", "{r}");

    // publish: twice with the same key (a retry), which publishes once.
    for _ in 0..2 {
        let out = within(
            Duration::from_secs(30),
            "the publish example",
            lang.example("publish")
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
        .unwrap_or_else(|e| panic!("{lang:?} publish example: {e}; needs {}", lang.needs()));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{lang:?} publish example failed ({}); needs {}\nstdout: {stdout}\nstderr: {}",
            out.status,
            lang.needs(),
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

    // rpc_responder: answers one call, then exits.
    let mut responder = lang
        .example("rpc_responder")
        .args(["--nats", &nats.url(), "--method", "get_profile", "--count", "1"])
        .spawn()
        .unwrap_or_else(|e| panic!("{lang:?} rpc_responder example: {e}; needs {}", lang.needs()));
    let mut lines = BufReader::new(responder.stdout.take().unwrap()).lines();
    let ready =
        within(Duration::from_secs(30), "the responder's ready line", lines.next_line()).await.unwrap();
    assert_eq!(
        ready.as_deref(),
        Some("ready"),
        "{lang:?} rpc_responder did not start; needs {}",
        lang.needs()
    );
    let r = c.request(json!({"type": "rpc", "method": "get_profile", "data": {"user": "bob"}})).await;
    assert_eq!(r["type"], "rpc", "{r}");
    assert_eq!(r["data"]["name"], "Bob", "{r}");
    assert_eq!(r["data"]["asked"], json!({"user": "bob"}), "{r}");
    assert_eq!(r["data"]["client"], c.client_id.as_str(), "{r}");
    let status = within(Duration::from_secs(10), "the responder to exit", responder.wait()).await.unwrap();
    assert!(status.success(), "{lang:?} rpc_responder exited with {status}");
}
