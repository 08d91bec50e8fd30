//! WebSocket framing (RFC 6455 / RFC 7692) as the node reads it, with a hand-rolled
//! client: fragmented and compressed messages, control frames between fragments, the
//! client's close, framing violations (close 4002) and the message size limit (4008) at
//! its exact boundary.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use roomcast_tests::raw::{self, OP_BINARY, OP_CLOSE, OP_CONTINUATION, OP_PING, OP_PONG, OP_TEXT, RawWs};
use roomcast_tests::{Value, assert_node_serves, json, start_test_node};

const DEFLATE: (&str, &str) = ("Sec-WebSocket-Extensions", "permessage-deflate");

/// An upgraded, connected JSON connection (with permessage-deflate when `deflate`).
async fn connected(addr: std::net::SocketAddr, deflate: bool) -> RawWs {
    let mut headers = vec![("Sec-WebSocket-Protocol", "roomcast.v1.json")];
    if deflate {
        headers.push(DEFLATE);
    }
    let (resp, ws) = raw::upgrade(addr, &headers).await;
    assert_eq!(resp.status, 101, "{resp:?}");
    assert_eq!(resp.header("sec-websocket-extensions").is_some(), deflate, "{resp:?}");
    let mut ws = ws.unwrap();
    ws.send_text(&json!({"type": "connect", "id": 1}).to_string()).await;
    let m = reply(&mut ws, 1).await;
    assert_eq!(m["type"], "connected", "{m}");
    ws
}

/// The messages of the next text frame (skipping control frames).
async fn next_frame_json(ws: &mut RawWs) -> Vec<Value> {
    loop {
        let f = ws.read_frame().await;
        match f.opcode {
            OP_TEXT => {
                let payload = if f.rsv1 { raw::inflate(&f.payload) } else { f.payload };
                let text = String::from_utf8(payload).unwrap();
                return text
                    .split('\n')
                    .filter(|l| !l.is_empty())
                    .map(|l| serde_json::from_str(l).unwrap())
                    .collect();
            }
            OP_CLOSE => panic!("closed: {:?}", f.payload),
            _ => {}
        }
    }
}

/// Reads until a message matching `pred` (other messages are skipped).
async fn read_until(ws: &mut RawWs, pred: impl Fn(&Value) -> bool) -> Value {
    loop {
        if let Some(m) = next_frame_json(ws).await.into_iter().find(|m| pred(m)) {
            return m;
        }
    }
}

/// The reply with `id`.
async fn reply(ws: &mut RawWs, id: u64) -> Value {
    read_until(ws, |m| m["id"] == id).await
}

/// Reads until the close frame; asserts `disconnect` `code` right before it and close
/// `code`.
async fn expect_close(ws: &mut RawWs, code: u16, what: &str) {
    let (msgs, close) = ws.read_json_until_close().await;
    assert_eq!(close, Some(code), "{what}: close code ({msgs:?})");
    let last = msgs.last().unwrap_or_else(|| panic!("{what}: no disconnect before the close"));
    assert_eq!(last["type"], "disconnect", "{what}: {last}");
    assert_eq!(last["code"], code, "{what}: {last}");
}

#[tokio::test]
async fn fragments_control_frames_and_client_close() {
    let node = start_test_node(&[]);
    for deflate in [false, true] {
        let mut ws = connected(node.addr, deflate).await;
        // A subscribe in three fragments with a ping between them.
        let msg = json!({"type": "subscribe", "id": 2, "room": "frag"}).to_string().into_bytes();
        let (a, rest) = msg.split_at(10);
        let (b, c) = rest.split_at(10);
        ws.send_frame_with(false, false, OP_TEXT, a, true).await;
        ws.send_frame_with(false, false, OP_CONTINUATION, b, true).await;
        ws.send_frame_with(true, false, OP_PING, b"are you there", true).await;
        ws.send_frame_with(true, false, OP_CONTINUATION, c, true).await;
        // The pong comes first: the ping is answered as soon as it is read.
        let pong = ws.read_frame().await;
        assert_eq!((pong.opcode, pong.payload.as_slice()), (OP_PONG, &b"are you there"[..]));
        let m = reply(&mut ws, 2).await;
        assert_eq!(m["type"], "subscribed", "{m}");
        if deflate {
            // A compressed message in two fragments (RSV1 on the first only).
            let msg =
                json!({"type": "publish", "id": 3, "room": "frag", "data": "x".repeat(500)}).to_string();
            let z = raw::deflate(msg.as_bytes());
            let (a, b) = z.split_at(z.len() / 2);
            ws.send_frame_with(false, true, OP_TEXT, a, true).await;
            ws.send_frame_with(true, false, OP_CONTINUATION, b, true).await;
            // The reply and the publication, in one frame or two.
            let mut got = Vec::new();
            while !(got.iter().any(|m: &Value| m["id"] == 3)
                && got.iter().any(|m| m["type"] == "publication"))
            {
                got.extend(next_frame_json(&mut ws).await);
            }
            assert!(got.iter().any(|m| m["type"] == "published" && m["id"] == 3), "{got:?}");
            assert!(
                got.iter().any(|m| m["type"] == "publication" && m["data"] == "x".repeat(500)),
                "{got:?}"
            );
        }
        // The client closes: the node answers with a close frame of the same code.
        ws.send_frame(OP_CLOSE, false, &1000u16.to_be_bytes()).await;
        let (_, code) = ws.read_json_until_close().await;
        assert_eq!(code, Some(1000));
    }
    assert_node_serves(&node.ws_url()).await;
}

/// A frame to send: FIN, RSV1, opcode (with `0x20` for RSV2), payload, masked.
type RawFrameSpec<'a> = (bool, bool, u8, &'a [u8], bool);

#[tokio::test]
async fn framing_violations_close_4002() {
    let node = start_test_node(&[]);
    let ping126 = vec![b'p'; 126];
    let cases: Vec<(&str, bool, Vec<RawFrameSpec>)> = vec![
        ("unmasked frame", false, vec![(true, false, OP_TEXT, b"{\"type\":\"pong\"}", false)]),
        ("RSV2 set", false, vec![(true, false, 0x20 | OP_TEXT, b"{\"type\":\"pong\"}", true)]),
        ("RSV1 without permessage-deflate", false, vec![(true, true, OP_TEXT, b"{\"type\":\"pong\"}", true)]),
        ("continuation without a message", false, vec![(true, false, OP_CONTINUATION, b"x", true)]),
        (
            "data frame inside a fragmented message",
            false,
            vec![(false, false, OP_TEXT, b"{\"ty", true), (true, false, OP_TEXT, b"pe\":1}", true)],
        ),
        ("control frame over 125 bytes", false, vec![(true, false, OP_PING, &ping126, true)]),
        ("fragmented control frame", false, vec![(false, false, OP_PING, b"x", true)]),
        ("unknown opcode", false, vec![(true, false, 0x3, b"x", true)]),
        ("invalid deflate data", true, vec![(true, true, OP_TEXT, &[0xff, 0xff, 0xff, 0xff, 0x00], true)]),
        ("binary frame on a JSON connection", false, vec![(true, false, OP_BINARY, &[0x80], true)]),
    ];
    for (what, deflate, frames) in cases {
        let mut ws = connected(node.addr, deflate).await;
        for (fin, rsv1, op, payload, masked) in frames {
            ws.send_frame_with(fin, rsv1, op, payload, masked).await;
        }
        expect_close(&mut ws, 4002, what).await;
    }
    assert_node_serves(&node.ws_url()).await;
}

/// A `publish` whose JSON text is exactly `len` bytes (padded with an unknown key).
fn publish_of_len(len: usize) -> String {
    let base = json!({"type": "publish", "id": 5, "room": "lim", "data": "small", "pad": ""}).to_string();
    let pad = "p".repeat(len - base.len());
    let msg = json!({"type": "publish", "id": 5, "room": "lim", "data": "small", "pad": pad}).to_string();
    assert_eq!(msg.len(), len);
    msg
}

#[tokio::test]
async fn message_size_limit_boundaries() {
    let node = start_test_node(&[]);
    const LIMIT: usize = 128 * 1024;
    // Exactly at the limit: accepted.
    let mut ws = connected(node.addr, false).await;
    ws.send_text(&json!({"type": "subscribe", "id": 2, "room": "lim"}).to_string()).await;
    assert_eq!(reply(&mut ws, 2).await["type"], "subscribed");
    ws.send_text(&publish_of_len(LIMIT)).await;
    let m = reply(&mut ws, 5).await;
    assert_eq!(m["type"], "published", "a message of exactly the limit is accepted: {m}");
    // One byte over: 4008.
    ws.send_text(&publish_of_len(LIMIT + 1)).await;
    expect_close(&mut ws, 4008, "one byte over the limit").await;
    // Over the limit only when the fragments are put together.
    let mut ws = connected(node.addr, false).await;
    let msg = publish_of_len(LIMIT + 10);
    let (a, b) = msg.as_bytes().split_at(LIMIT / 2);
    ws.send_frame_with(false, false, OP_TEXT, a, true).await;
    ws.send_frame_with(true, false, OP_CONTINUATION, b, true).await;
    expect_close(&mut ws, 4008, "fragments over the limit").await;
    // Over the limit only once inflated (a small frame, 1 MiB inflated).
    let mut ws = connected(node.addr, true).await;
    let bomb = format!("{{\"type\":\"pong\",\"pad\":\"{}\"}}", "0".repeat(1 << 20));
    let z = raw::deflate(bomb.as_bytes());
    assert!(z.len() < 8 * 1024, "compresses well: {}", z.len());
    ws.send_frame(OP_TEXT, true, &z).await;
    expect_close(&mut ws, 4008, "inflated over the limit").await;
    assert_node_serves(&node.ws_url()).await;
}
