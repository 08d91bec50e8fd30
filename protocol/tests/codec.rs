#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Round trips of every message in both encodings, frame splitting, and the
//! violation / rejection boundary.

use roomcast_protocol::*;

fn d(v: serde_json::Value) -> Data {
    Data::from_serialize(&v).unwrap()
}
fn room(s: &str) -> Room {
    Room::parse(s).unwrap()
}
fn pos(o: u64) -> Position {
    Position { offset: o, epoch: "ep".into() }
}
fn member(c: &str) -> Member {
    Member {
        client: c.into(),
        user: "u".into(),
        info: Some(d(serde_json::json!({"name": "ann"}))),
        room_info: None,
    }
}
fn publication(o: Option<u64>) -> Publication {
    Publication {
        room: "chat:a".into(),
        offset: o,
        data: d(serde_json::json!({"text": "hi", "n": [1, 2.5, -3]})),
        info: Some(PublisherInfo { client: "c".into(), user: "u".into() }),
    }
}

fn all_requests() -> Vec<Request> {
    let cmds = vec![
        Command::Connect {
            token: Some("t".into()),
            name: Some("n".into()),
            version: None,
            data: Some(d(serde_json::json!({"a": null}))),
        },
        Command::Connect { token: None, name: None, version: None, data: None },
        Command::Subscribe { room: room("chat:a"), token: None, recover: Some(pos(4)), presence: true },
        Command::Unsubscribe { room: room("a") },
        Command::Publish { room: room("a"), data: d(serde_json::json!("x")), skip_self: true },
        Command::Presence { room: room("a") },
        Command::PresenceStats { room: room("a") },
        Command::History { room: room("a"), since: Some(pos(1)), limit: Some(0), reverse: true },
        Command::Rpc { method: "m".into(), data: d(serde_json::json!({"k": [true]})) },
        Command::Refresh { token: "t2".into() },
        Command::Pong,
    ];
    cmds.into_iter()
        .enumerate()
        .map(|(i, command)| Request { id: if i % 2 == 0 { Some(i as u32 + 1) } else { None }, command })
        .collect()
}

fn all_server_messages() -> Vec<ServerMessage> {
    let replies = vec![
        Reply::Connected { client: "c".into(), node: "n".into(), ping_ms: 25000, expires_in: Some(60) },
        Reply::Subscribed {
            room: "chat:a".into(),
            recoverable: true,
            position: Some(pos(7)),
            recovered: Some(true),
            publications: Some(vec![publication(Some(6)), publication(Some(7))]),
            members: Some(vec![member("c1")]),
        },
        Reply::Subscribed {
            room: "x".into(),
            recoverable: false,
            position: None,
            recovered: None,
            publications: None,
            members: None,
        },
        Reply::Unsubscribed { room: "a".into() },
        Reply::Published { room: "a".into(), position: Some(pos(9)) },
        Reply::Published { room: "a".into(), position: None },
        Reply::Presence { room: "a".into(), members: vec![member("c1"), member("c2")] },
        Reply::PresenceStats { room: "a".into(), clients: 3, users: 2 },
        Reply::History { room: "a".into(), position: pos(0), publications: vec![] },
        Reply::Rpc { data: d(serde_json::json!([1, "two"])) },
        Reply::Refreshed { expires_in: None },
    ];
    let mut out: Vec<ServerMessage> =
        replies.into_iter().map(|reply| ServerMessage::Reply { id: Some(42), reply }).collect();
    out.push(ServerMessage::error(Some(3), ErrorCode::Internal, "boom"));
    out.push(ServerMessage::error(None, ErrorCode::BadRequest, "bad"));
    for p in [
        Push::Publication(publication(Some(1))),
        Push::Publication(publication(None)),
        Push::Join { room: "a".into(), member: member("c") },
        Push::Leave { room: "a".into(), member: member("c") },
        Push::Unsubscribe { room: "a".into(), code: 3000, reason: "r".into() },
        Push::Message { data: d(serde_json::json!({"m": 1})) },
        Push::Ping,
        Push::Disconnect { code: 4000, reason: "bye".into(), reconnect: true },
    ] {
        out.push(ServerMessage::Push(p));
    }
    out
}

#[test]
fn requests_round_trip_in_both_encodings() {
    for enc in [Encoding::Json, Encoding::Msgpack] {
        let reqs = all_requests();
        let encoded: Vec<_> = reqs.iter().map(|r| r.encode(enc).unwrap()).collect();
        // All in one frame: several messages per frame, in order.
        let frame = join_frame(enc, &encoded);
        let decoded: Vec<Request> =
            decode_requests(enc, &frame).into_iter().map(|r| r.unwrap().unwrap()).collect();
        assert_eq!(decoded, reqs, "{enc:?}");
    }
}

#[test]
fn server_messages_round_trip_in_both_encodings() {
    for enc in [Encoding::Json, Encoding::Msgpack] {
        let msgs = all_server_messages();
        let encoded: Vec<_> = msgs.iter().map(|m| m.encode(enc).unwrap()).collect();
        let frame = join_frame(enc, &encoded);
        let decoded: Vec<ServerMessage> =
            decode_server_messages(enc, &frame).unwrap().into_iter().map(|r| r.unwrap()).collect();
        assert_eq!(decoded, msgs, "{enc:?}");
    }
}

#[test]
fn json_wire_form_is_plain() {
    let m = ServerMessage::Push(Push::Publication(Publication {
        room: "a".into(),
        offset: Some(3),
        data: Data::from_json(&b"{\"x\":1}"[..]).unwrap(),
        info: None,
    }));
    assert_eq!(
        &m.encode(Encoding::Json).unwrap()[..],
        br#"{"type":"publication","room":"a","offset":3,"data":{"x":1}}"#
    );
    let e = ServerMessage::error(Some(7), ErrorCode::BackendUnavailable, "no responder");
    assert_eq!(
        &e.encode(Encoding::Json).unwrap()[..],
        br#"{"type":"error","id":7,"code":114,"message":"no responder","temporary":true}"#
    );
}

#[test]
fn msgpack_data_reaches_json_subscribers_with_bin_as_base64() {
    let v = rmpv::Value::Map(vec![
        ("type".into(), "publish".into()),
        ("id".into(), 1.into()),
        ("room".into(), "a".into()),
        ("data".into(), rmpv::Value::Map(vec![("blob".into(), rmpv::Value::Binary(vec![1, 2, 3]))])),
    ]);
    let mut frame = Vec::new();
    rmpv::encode::write_value(&mut frame, &v).unwrap();
    let req = decode_requests(Encoding::Msgpack, &frame).remove(0).unwrap().unwrap();
    let Command::Publish { data, .. } = req.command else { panic!("not a publish") };
    assert_eq!(&data.json().unwrap()[..], br#"{"blob":"AQID"}"#);
}

#[test]
fn empty_lines_are_ignored() {
    let frame = b"\n{\"type\":\"pong\"}\r\n\n{\"type\":\"pong\",\"id\":2}\n";
    let r = decode_requests(Encoding::Json, frame);
    assert_eq!(r.len(), 2);
    assert!(r.iter().all(|x| matches!(x, Ok(Ok(_)))));
}

fn first(enc: Encoding, frame: &[u8]) -> Result<Result<Request, Rejection>, Violation> {
    decode_requests(enc, frame).remove(0)
}

#[test]
fn violations_close_the_connection() {
    for bad in [
        &b"not json"[..],
        b"[1,2]",
        b"{\"id\":1}",
        b"{\"type\":5}",
        b"{\"type\":null}",
        b"{\"type\":\"pong\",\"id\":0}",
        b"{\"type\":\"pong\",\"id\":4294967296}",
        b"{\"type\":\"pong\",\"id\":-1}",
        b"{\"type\":\"pong\",\"id\":\"1\"}",
        b"\xff\xfe",
    ] {
        assert!(first(Encoding::Json, bad).is_err(), "{}", String::from_utf8_lossy(bad));
    }
    for bad in [&[0xc1u8][..], &[0x92, 0x01, 0x02], &[0x81, 0x01, 0x02], &[0x85]] {
        assert!(first(Encoding::Msgpack, bad).is_err(), "{bad:x?}");
    }
    // A violation stops the frame: the messages after it are not decoded.
    let r = decode_requests(Encoding::Json, b"{\"type\":\"pong\"}\nnope\n{\"type\":\"pong\"}");
    assert_eq!(r.len(), 2);
    assert!(r[1].is_err());
}

#[test]
fn rejections_keep_the_connection() {
    let r = first(Encoding::Json, br#"{"type":"frobnicate","id":9}"#).unwrap().unwrap_err();
    assert_eq!((r.id, r.code), (Some(9), ErrorCode::UnknownCommand));
    for (bad, field) in [
        (&br#"{"type":"subscribe","id":1}"#[..], "room"),
        (br#"{"type":"subscribe","id":1,"room":5}"#, "room"),
        (br#"{"type":"subscribe","id":1,"room":"a b"}"#, "room"),
        (br#"{"type":"subscribe","id":1,"room":"ok","recover":{"offset":"x","epoch":"e"}}"#, "recover"),
        (br#"{"type":"publish","id":1,"room":"a"}"#, "data"),
        (br#"{"type":"history","id":1,"room":"a","limit":-1}"#, "limit"),
        (br#"{"type":"subscribe","id":1,"room":"a","presence":"yes"}"#, "presence"),
    ] {
        let r = first(Encoding::Json, bad).unwrap().unwrap_err();
        assert_eq!(r.code, ErrorCode::BadRequest, "{}", String::from_utf8_lossy(bad));
        assert!(r.message.contains(field), "{} -> {}", String::from_utf8_lossy(bad), r.message);
    }
    // null counts as absent for optional fields; unknown keys are ignored.
    let ok = first(Encoding::Json, br#"{"type":"subscribe","id":1,"room":"a","token":null,"zzz":[1]}"#);
    assert!(matches!(ok, Ok(Ok(_))));
}

#[test]
fn ext_in_msgpack_data_is_a_bad_request() {
    let v = rmpv::Value::Map(vec![
        ("type".into(), "publish".into()),
        ("id".into(), 1.into()),
        ("room".into(), "a".into()),
        ("data".into(), rmpv::Value::Ext(5, vec![0])),
    ]);
    let mut frame = Vec::new();
    rmpv::encode::write_value(&mut frame, &v).unwrap();
    let r = first(Encoding::Msgpack, &frame).unwrap().unwrap_err();
    assert_eq!(r.code, ErrorCode::BadRequest);
}

#[test]
fn hostile_nesting_does_not_crash() {
    let deep_json = format!("{{\"type\":\"pong\",\"x\":{}{}}}", "[".repeat(200_000), "]".repeat(200_000));
    assert!(first(Encoding::Json, deep_json.as_bytes()).is_err());
    let mut deep_mp = vec![0x82, 0xa4, b't', b'y', b'p', b'e', 0xa4, b'p', b'o', b'n', b'g', 0xa1, b'x'];
    deep_mp.extend(std::iter::repeat_n(0x91u8, 200_000));
    deep_mp.push(0xc0);
    assert!(first(Encoding::Msgpack, &deep_mp).is_err());
    // Data nested deeper than 64 inside an otherwise fine message is a bad request.
    let data65 = format!(
        "{{\"type\":\"publish\",\"id\":1,\"room\":\"a\",\"data\":{}{}}}",
        "[".repeat(65),
        "]".repeat(65)
    );
    let r = first(Encoding::Json, data65.as_bytes()).unwrap().unwrap_err();
    assert_eq!(r.code, ErrorCode::BadRequest);
}
