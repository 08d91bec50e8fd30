//! permessage-deflate: with a real third-party client (Python `websockets`), and frame by
//! frame with a hand-rolled client (RSV1, raw inflate, no context takeover).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Stdio;
use std::time::Duration;

use roomcast_tests::raw::{self, OP_BINARY, OP_TEXT, RawWs};
use roomcast_tests::{
    Enc, NO_RATE_LIMITS, NodeOptions, NodeProc, Value, json, json_to_mp, mp_to_json, start_test_node, within,
};

/// Runs `python3 tests/py/deflate_client.py URL` and checks its summary.
#[tokio::test]
async fn python_websockets_client_with_deflate() {
    let check = std::process::Command::new("python3")
        .args(["-c", "import websockets, sys; print(websockets.__version__)"])
        .output();
    match check {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "python3 has no `websockets` module ({}): pip install websockets",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => panic!("python3 is missing ({e}); install it and then: pip install websockets"),
    }
    let node = start_test_node(&[]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/py/deflate_client.py");
    let child = tokio::process::Command::new("python3")
        .arg(script)
        .arg(node.ws_url())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("running python3");
    let out = within(Duration::from_secs(30), "the python client", child.wait_with_output()).await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "python client failed ({}):\n{stdout}\n{stderr}", out.status);
    let summary: Value = serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("no JSON summary ({e}): {stdout}\n{stderr}"));
    let ext = summary["extensions"].as_str().unwrap();
    assert!(ext.contains("permessage-deflate"), "{summary}");
    assert!(
        ext.contains("server_no_context_takeover") && ext.contains("client_no_context_takeover"),
        "{summary}"
    );
    assert_eq!(summary["subprotocol"], "roomcast.v1.json");
    assert_eq!(summary["data_matches"], true, "{summary}");
    assert_eq!(summary["publication_offset"], 1);
    assert_eq!(summary["published_offset"], 1);
    assert!(summary["payload_bytes"].as_u64().unwrap() >= 2000);
}

/// Encodes one message in `enc` (JSON text or MessagePack bytes).
fn encode(enc: Enc, v: &Value) -> Vec<u8> {
    if enc.is_binary() {
        let mut b = Vec::new();
        rmpv::encode::write_value(&mut b, &json_to_mp(v)).unwrap();
        b
    } else {
        v.to_string().into_bytes()
    }
}

/// Decodes the messages of one (inflated) frame payload.
fn decode(enc: Enc, payload: &[u8]) -> Vec<Value> {
    if enc.is_binary() {
        let mut rd = payload;
        let mut out = Vec::new();
        while !rd.is_empty() {
            out.push(mp_to_json(rmpv::decode::read_value(&mut rd).unwrap()));
        }
        out
    } else {
        std::str::from_utf8(payload)
            .unwrap()
            .split('\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

/// Reads frames until a message matching `pred`; returns it with its frame's RSV1 and
/// the number of messages in that frame.
async fn read_until(ws: &mut RawWs, enc: Enc, pred: impl Fn(&Value) -> bool) -> (Value, bool, usize) {
    loop {
        let f = ws.read_frame().await;
        assert!(f.fin, "the node sends unfragmented frames");
        assert_eq!(f.opcode, if enc.is_binary() { OP_BINARY } else { OP_TEXT }, "frame type");
        let payload = if f.rsv1 { raw::inflate(&f.payload) } else { f.payload.clone() };
        let msgs = decode(enc, &payload);
        let n = msgs.len();
        if let Some(m) = msgs.into_iter().find(|m| pred(m)) {
            return (m, f.rsv1, n);
        }
    }
}

async fn send(ws: &mut RawWs, enc: Enc, v: &Value, compress: bool) {
    let bytes = encode(enc, v);
    let opcode = if enc.is_binary() { OP_BINARY } else { OP_TEXT };
    if compress {
        ws.send_frame(opcode, true, &raw::deflate(&bytes)).await;
    } else {
        ws.send_frame(opcode, false, &bytes).await;
    }
}

#[tokio::test]
async fn large_publications_arrive_compressed_with_rsv1() {
    let node = start_test_node(&[]);
    for enc in Enc::BOTH {
        let proto = enc.subprotocol().unwrap();
        let (resp, ws) = raw::upgrade(
            node.addr,
            &[
                ("Sec-WebSocket-Protocol", proto),
                ("Sec-WebSocket-Extensions", "permessage-deflate; client_max_window_bits"),
            ],
        )
        .await;
        assert_eq!(resp.status, 101, "{resp:?}");
        let ext = resp.header("sec-websocket-extensions").unwrap_or_default();
        assert!(ext.starts_with("permessage-deflate"), "{resp:?}");
        assert!(
            ext.contains("server_no_context_takeover") && ext.contains("client_no_context_takeover"),
            "{ext}"
        );
        let mut ws = ws.unwrap();
        let room = format!("z-{enc:?}");

        send(&mut ws, enc, &json!({"type": "connect", "id": 1}), false).await;
        let (m, rsv1, _) = read_until(&mut ws, enc, |m| m["id"] == 1).await;
        assert_eq!(m["type"], "connected");
        assert!(!rsv1, "a small message is sent uncompressed (below compression_min_size)");
        // A compressed command from the client is inflated by the node.
        send(&mut ws, enc, &json!({"type": "subscribe", "id": 2, "room": room}), true).await;
        let (m, _, _) = read_until(&mut ws, enc, |m| m["id"] == 2).await;
        assert_eq!(m["type"], "subscribed", "{m}");
        // Two large publications: each must inflate on its own (no context takeover).
        for (i, compress) in [(1u64, true), (2, false)] {
            let data = json!({"text": format!("{i} ").repeat(1000), "i": i});
            send(
                &mut ws,
                enc,
                &json!({"type": "publish", "id": 10 + i, "room": room, "data": data}),
                compress,
            )
            .await;
            let (p, rsv1, n) = read_until(&mut ws, enc, |m| m["type"] == "publication").await;
            assert!(rsv1, "a 2 KB publication arrives in a frame with RSV1 set");
            assert_eq!(n, 1, "a compressed publication has its own frame");
            assert_eq!(p["offset"], i);
            assert_eq!(p["data"], data);
            assert_eq!(p["room"], room.as_str());
        }
    }
}

#[tokio::test]
async fn deflate_declined_when_off_or_unacceptable() {
    let off = NodeProc::start(NodeOptions::with_config(NO_RATE_LIMITS).env("ROOMCAST_COMPRESSION", "false"));
    let on = start_test_node(&[]);
    for (node, offer) in [
        (&off, "permessage-deflate; client_max_window_bits"),
        (&on, "permessage-deflate; server_max_window_bits=10"),
        (&on, "x-webkit-deflate-frame"),
    ] {
        let (resp, ws) = raw::upgrade(
            node.addr,
            &[("Sec-WebSocket-Protocol", "roomcast.v1.json"), ("Sec-WebSocket-Extensions", offer)],
        )
        .await;
        assert_eq!(resp.status, 101);
        assert!(resp.header("sec-websocket-extensions").is_none(), "{offer}: {resp:?}");
        let mut ws = ws.unwrap();
        send(&mut ws, Enc::Json, &json!({"type": "connect", "id": 1}), false).await;
        send(&mut ws, Enc::Json, &json!({"type": "subscribe", "id": 2, "room": "u"}), false).await;
        let data = "u".repeat(3000);
        send(&mut ws, Enc::Json, &json!({"type": "publish", "id": 3, "room": "u", "data": data}), false)
            .await;
        let (p, rsv1, _) = read_until(&mut ws, Enc::Json, |m| m["type"] == "publication").await;
        assert!(!rsv1, "{offer}: no RSV1 without permessage-deflate");
        assert_eq!(p["data"], data.as_str());
    }
}
