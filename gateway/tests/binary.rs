#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The `roomcast` binary itself: its command line, configuration errors before binding,
//! and the HTTP endpoints. (Having an integration test here also makes
//! `cargo test --workspace` build the binary the tests/ crate runs.)

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_roomcast");

fn clean_env(cmd: &mut Command) -> &mut Command {
    for (k, _) in std::env::vars() {
        if k.starts_with("ROOMCAST_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

#[test]
fn help_lists_the_node_and_client_commands() {
    let out = clean_env(&mut Command::new(BIN)).arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in ["serve", "sub", "pub", "history", "presence"] {
        assert!(text.contains(cmd), "{cmd} missing from:\n{text}");
    }
}

#[test]
fn a_bad_config_stops_the_node_before_it_binds_and_names_the_field() {
    let dir = std::env::temp_dir().join(format!("roomcast-bin-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bad.toml");
    std::fs::write(&file, "[namespaces.chat]\nhistory_ttl = \"5 parsecs\"\n").unwrap();
    let out = clean_env(&mut Command::new(BIN)).env("ROOMCAST_CONFIG", &file).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("history_ttl") || err.contains("duration"), "{err}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("listening"));

    let out = clean_env(&mut Command::new(BIN)).env("ROOMCAST_LISTEN", "not-an-address").output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("listen"));
}

fn http_get(addr: &str, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn serves_health_and_readiness_and_stops_on_sigterm() {
    let mut child = clean_env(&mut Command::new(BIN))
        .env("ROOMCAST_LISTEN", "127.0.0.1:0")
        .env("ROOMCAST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr = line.split("ws://").nth(1).and_then(|r| r.split('/').next()).expect(&line).to_string();
    assert!(http_get(&addr, "/healthz").starts_with("HTTP/1.1 200"));
    assert!(http_get(&addr, "/readyz").starts_with("HTTP/1.1 200"));
    // A plain GET on the WebSocket path is not an upgrade: 400 with a reason.
    let r = http_get(&addr, "/ws");
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");

    let status = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            assert!(s.success(), "exit status {s}");
            break;
        }
        assert!(Instant::now() < deadline, "node did not stop after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}
