//! The `loadgen` command line. Also makes `cargo test --workspace` build the `loadgen`
//! binary (`target/<profile>/loadgen`), which tests/tests/bench_smoke.rs runs against real
//! nodes.

use std::process::Command;

fn loadgen(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_loadgen")).args(args).output();
    let out = match out {
        Ok(o) => o,
        Err(e) => panic!("cannot run loadgen: {e}"),
    };
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn lists_every_scenario() {
    let (ok, out, _) = loadgen(&["--help"]);
    assert!(ok);
    for s in ["idle", "fanout", "storm", "compression", "cluster"] {
        assert!(out.contains(s), "{s} missing from --help:\n{out}");
    }
}

#[test]
fn refuses_targets_off_loopback() {
    let (ok, _, err) = loadgen(&["idle", "--url", "ws://192.0.2.1:8000/ws", "--conns", "1"]);
    assert!(!ok);
    assert!(err.contains("loopback"), "{err}");
}

#[test]
fn refuses_more_connections_than_file_descriptors() {
    let (ok, _, err) = loadgen(&["idle", "--conns", "100000000"]);
    assert!(!ok);
    assert!(err.contains("file descriptors"), "{err}");
}

#[test]
fn roomcast_only_scenarios_say_so() {
    for s in ["storm", "compression"] {
        let (ok, _, err) = loadgen(&[s, "--proto", "socketio", "--url", "ws://127.0.0.1:1/"]);
        assert!(!ok);
        assert!(err.contains("roomcast only"), "{s}: {err}");
    }
}
