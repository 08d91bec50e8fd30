//! The command-line front end against a scripted node.
#![cfg(feature = "cli")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use roomcast_client::cli::{CliCommand, ConnArgs, run_with};
use roomcast_client::{Data, Encoding};
use roomcast_protocol::{Command, Push, Reply, ServerMessage};

fn conn_args(url: &str, msgpack: bool) -> ConnArgs {
    ConnArgs { url: vec![url.to_string()], token: Some("t0k".into()), msgpack }
}

#[tokio::test]
async fn pub_sends_text_as_a_json_string_and_prints_the_position() {
    let srv = Server::start().await;
    let cmd = CliCommand::Pub {
        room: "chat:cli".into(),
        data: "hello there".into(),
        skip_self: false,
        conn: conn_args(&srv.url, false),
    };
    let mut out = Vec::new();
    let (res, ()) = tokio::join!(run_with(cmd, &mut out), async {
        let mut conn = srv.accept().await;
        let c = conn.handshake(25_000).await;
        assert!(matches!(&c.command, Command::Connect { token: Some(t), .. } if t == "t0k"));
        let r = conn.expect("publish").await;
        let Command::Publish { data, .. } = &r.command else { unreachable!() };
        assert_eq!(data, &Data::from_json("\"hello there\"").unwrap());
        conn.reply(&r, Reply::Published { room: "chat:cli".into(), position: Some(pos(12, "ep")) }).await;
        assert_eq!(conn.closed_by_client().await, Some(1000));
    });
    res.unwrap();
    assert_eq!(String::from_utf8(out).unwrap(), "{\"offset\":12,\"epoch\":\"ep\"}\n");
}

#[tokio::test]
async fn sub_prints_publications_as_json_lines_until_count() {
    let srv = Server::start().await;
    let cmd = CliCommand::Sub { room: "chat:cli".into(), count: Some(2), conn: conn_args(&srv.url, true) };
    let mut out = Vec::new();
    let (res, ()) = tokio::join!(run_with(cmd, &mut out), async {
        let mut conn = srv.accept().await;
        assert_eq!(conn.enc, Encoding::Msgpack);
        conn.handshake(25_000).await;
        let r = conn.expect("subscribe").await;
        conn.reply(&r, subscribed("chat:cli", 0, "e", None, &[])).await;
        conn.send(vec![push("chat:cli", 1), ServerMessage::Push(Push::Ping), push("chat:cli", 2)]).await;
        assert_eq!(conn.expect("pong").await.id, None);
        // The client unsubscribes (dropped subscription) and closes.
        assert_eq!(conn.closed_by_client().await, Some(1000));
    });
    res.unwrap();
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "{\"room\":\"chat:cli\",\"offset\":1,\"data\":{\"n\":1}}\n{\"room\":\"chat:cli\",\"offset\":2,\"data\":{\"n\":2}}\n"
    );
}

#[tokio::test]
async fn history_and_presence_print_json_lines() {
    let srv = Server::start().await;
    let cmd = CliCommand::History {
        room: "h".into(),
        limit: Some(2),
        reverse: false,
        conn: conn_args(&srv.url, false),
    };
    let mut out = Vec::new();
    let (res, ()) = tokio::join!(run_with(cmd, &mut out), async {
        let mut conn = srv.accept().await;
        conn.handshake(25_000).await;
        let r = conn.expect("history").await;
        assert!(matches!(r.command, Command::History { limit: Some(2), reverse: false, .. }));
        conn.reply(
            &r,
            Reply::History {
                room: "h".into(),
                position: pos(9, "e"),
                publications: vec![publication("h", 8), publication("h", 9)],
            },
        )
        .await;
    });
    res.unwrap();
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "{\"room\":\"h\",\"offset\":8,\"data\":{\"n\":8}}\n{\"room\":\"h\",\"offset\":9,\"data\":{\"n\":9}}\n"
    );

    let cmd = CliCommand::Presence { room: "h".into(), conn: conn_args(&srv.url, false) };
    let mut out = Vec::new();
    let (res, ()) = tokio::join!(run_with(cmd, &mut out), async {
        let mut conn = srv.accept().await;
        conn.handshake(25_000).await;
        let r = conn.expect("presence").await;
        let mut m = member("c1", "u1");
        m.info = Some(Data::from_json("{\"name\":\"Ann\"}").unwrap());
        conn.reply(&r, Reply::Presence { room: "h".into(), members: vec![m] }).await;
    });
    res.unwrap();
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "{\"client\":\"c1\",\"user\":\"u1\",\"info\":{\"name\":\"Ann\"}}\n"
    );
}

#[tokio::test]
async fn server_errors_become_cli_errors() {
    let srv = Server::start().await;
    let cmd = CliCommand::Presence { room: "nopresence".into(), conn: conn_args(&srv.url, false) };
    let mut out = Vec::new();
    let (res, ()) = tokio::join!(run_with(cmd, &mut out), async {
        let mut conn = srv.accept().await;
        conn.handshake(25_000).await;
        let r = conn.expect("presence").await;
        conn.error(&r, 108, "not available", false).await;
    });
    assert_eq!(res.unwrap_err().server_code(), Some(108));
    assert!(out.is_empty());
}
