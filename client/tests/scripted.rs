//! The SDK against a scripted node: reconnect, recovery, exactly-once delivery, liveness,
//! errors and close codes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use roomcast_client::{
    ClientError, ConnectionEvent, Data, Encoding, HistoryOptions, SubscribeOptions, SubscriptionEvent,
};
use roomcast_protocol::{Command, Push, Reply, ServerMessage};
use tokio::time::timeout;

async fn next_conn_event(rx: &mut tokio::sync::broadcast::Receiver<ConnectionEvent>) -> ConnectionEvent {
    timeout(STEP, rx.recv()).await.expect("no connection event in time").unwrap()
}

#[tokio::test]
async fn requests_are_routed_by_id_and_errors_mapped() {
    let srv = Server::start().await;
    let connecting = tokio::spawn(builder(vec![srv.url.clone()]).token("jwt").name("tester").connect());
    let mut conn = srv.accept().await;
    let connect = conn.handshake(25_000).await;
    assert_eq!(connect.id, Some(1));
    match &connect.command {
        Command::Connect { token, name, .. } => {
            assert_eq!(token.as_deref(), Some("jwt"));
            assert_eq!(name.as_deref(), Some("tester"));
        }
        other => panic!("{other:?}"),
    }
    let client = connecting.await.unwrap().unwrap();

    // Two calls in flight at once, answered out of order.
    let c1 = client.clone();
    let c2 = client.clone();
    let publish =
        tokio::spawn(async move { c1.publish("chat:a", Data::from_json("{\"x\":1}").unwrap()).await });
    let stats = tokio::spawn(async move { c2.presence_stats("chat:a").await });
    let r1 = conn.recv().await;
    let r2 = conn.recv().await;
    assert_ne!(r1.id, r2.id);
    assert!(r1.id.unwrap() > 1 && r2.id.unwrap() > 1);
    let (pub_req, stats_req) = if r1.command.type_name() == "publish" { (r1, r2) } else { (r2, r1) };
    match &pub_req.command {
        Command::Publish { room, data, skip_self } => {
            assert_eq!(room.as_str(), "chat:a");
            assert_eq!(data, &Data::from_json("{\"x\":1}").unwrap());
            assert!(!skip_self);
        }
        other => panic!("{other:?}"),
    }
    conn.reply(&stats_req, Reply::PresenceStats { room: "chat:a".into(), clients: 3, users: 2 }).await;
    conn.reply(&pub_req, Reply::Published { room: "chat:a".into(), position: Some(pos(7, "e1")) }).await;
    assert_eq!(stats.await.unwrap().unwrap(), (3, 2));
    assert_eq!(publish.await.unwrap().unwrap(), Some(pos(7, "e1")));

    // A server error reply.
    let (res, ()) = tokio::join!(client.publish("chat:a", Data::from_json("1").unwrap()), async {
        let r = conn.expect("publish").await;
        conn.error(&r, 103, "permission denied", false).await;
    });
    assert_eq!(
        res.unwrap_err(),
        ClientError::Server { code: 103, message: "permission denied".into(), temporary: false }
    );
    let (res, ()) = tokio::join!(client.rpc("get", Data::from_json("{}").unwrap()), async {
        let r = conn.expect("rpc").await;
        conn.error(&r, 114, "backend unavailable", true).await;
    });
    assert!(matches!(res, Err(ClientError::Server { code: 114, temporary: true, .. })));

    // history, presence, rpc.
    let opts = HistoryOptions { since: Some(pos(2, "e1")), limit: Some(5), reverse: true };
    let (res, ()) = tokio::join!(client.history("chat:a", opts), async {
        let r = conn.expect("history").await;
        match &r.command {
            Command::History { since, limit, reverse, .. } => {
                assert_eq!(since, &Some(pos(2, "e1")));
                assert_eq!(*limit, Some(5));
                assert!(*reverse);
            }
            other => panic!("{other:?}"),
        }
        conn.reply(
            &r,
            Reply::History {
                room: "chat:a".into(),
                position: pos(4, "e1"),
                publications: vec![publication("chat:a", 4), publication("chat:a", 3)],
            },
        )
        .await;
    });
    let h = res.unwrap();
    assert_eq!(h.position, pos(4, "e1"));
    assert_eq!(h.publications.iter().map(|p| p.offset.unwrap()).collect::<Vec<_>>(), [4, 3]);

    let (res, ()) = tokio::join!(client.presence("chat:a"), async {
        let r = conn.expect("presence").await;
        conn.reply(
            &r,
            Reply::Presence { room: "chat:a".into(), members: vec![member("c1", "u1"), member("c2", "u2")] },
        )
        .await;
    });
    assert_eq!(res.unwrap(), vec![member("c1", "u1"), member("c2", "u2")]);

    let (res, ()) = tokio::join!(client.rpc("sum", Data::from_json("[1,2]").unwrap()), async {
        let r = conn.expect("rpc").await;
        assert!(matches!(&r.command, Command::Rpc { method, .. } if method == "sum"));
        conn.reply(&r, Reply::Rpc { data: Data::from_json("3").unwrap() }).await;
    });
    assert_eq!(res.unwrap().decode::<u32>().unwrap(), 3);

    // Invalid room names are refused locally.
    assert!(matches!(
        client.publish("bad room", Data::from_json("1").unwrap()).await,
        Err(ClientError::InvalidRoom(_))
    ));
}

#[tokio::test]
async fn reconnects_and_recovers_every_offset_exactly_once() {
    let srv = Server::start().await;
    let (client, mut conn) = connect(&srv, builder(vec![srv.url.clone()])).await;
    let mut events = client.events();
    let (mut sub, req) =
        subscribe(&client, &mut conn, "chat:a", subscribed("chat:a", 0, "e1", None, &[])).await;
    assert_eq!(recover_of(&req), None);
    assert_eq!(
        next(&mut sub).await,
        SubscriptionEvent::Subscribed { recovered: None, position: Some(pos(0, "e1")), members: None }
    );
    // Several messages in one frame, handled in order.
    conn.send(pushes("chat:a", 1..=3)).await;
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(next_offset(&mut sub).await);
    }

    // 1: the connection just dies.
    drop(conn);
    assert!(matches!(next_conn_event(&mut events).await, ConnectionEvent::Disconnected { code: None, .. }));
    let mut conn = srv.accept().await;
    conn.handshake(25_000).await;
    assert!(matches!(next_conn_event(&mut events).await, ConnectionEvent::Connected { .. }));
    let req = conn.expect("subscribe").await;
    assert_eq!(recover_of(&req), Some(pos(3, "e1")));
    // The reply repeats 3; a live push repeats 5: neither is delivered twice.
    conn.reply(&req, subscribed("chat:a", 5, "e1", Some(true), &[3, 4, 5])).await;
    conn.send(pushes("chat:a", [5, 6])).await;
    assert_eq!(
        next(&mut sub).await,
        SubscriptionEvent::Subscribed { recovered: Some(true), position: Some(pos(5, "e1")), members: None }
    );
    for _ in 0..3 {
        got.push(next_offset(&mut sub).await);
    }

    // 2: the node says it is going away (4000: reconnect).
    conn.disconnect(4000, "node shutting down", true).await;
    assert_eq!(
        next_conn_event(&mut events).await,
        ConnectionEvent::Disconnected { code: Some(4000), reason: "node shutting down".into() }
    );
    let mut conn = srv.accept().await;
    conn.handshake(25_000).await;
    let req = conn.expect("subscribe").await;
    assert_eq!(recover_of(&req), Some(pos(6, "e1")));
    conn.reply(&req, subscribed("chat:a", 8, "e1", Some(true), &[7, 8])).await;
    conn.send(pushes("chat:a", [9])).await;
    assert!(matches!(next(&mut sub).await, SubscriptionEvent::Subscribed { recovered: Some(true), .. }));
    for _ in 0..3 {
        got.push(next_offset(&mut sub).await);
    }
    assert_eq!(got, (1..=9).collect::<Vec<_>>());
    assert!(sub.try_next().is_none());
}

#[tokio::test]
async fn gap_resubscribes_with_recover_and_delivers_in_order() {
    let srv = Server::start().await;
    let (client, mut conn) = connect(&srv, builder(vec![srv.url.clone()])).await;
    let (mut sub, _) =
        subscribe(&client, &mut conn, "chat:g", subscribed("chat:g", 10, "e", None, &[])).await;
    next(&mut sub).await;
    conn.send(pushes("chat:g", [11, 13, 14])).await;
    assert_eq!(next_offset(&mut sub).await, 11);
    let unsub = conn.expect("unsubscribe").await;
    let resub = conn.expect("subscribe").await;
    assert_eq!(recover_of(&resub), Some(pos(11, "e")));
    conn.reply(&unsub, Reply::Unsubscribed { room: "chat:g".into() }).await;
    conn.reply(&resub, subscribed("chat:g", 14, "e", Some(true), &[12, 13, 14])).await;
    conn.send(pushes("chat:g", [15])).await;
    assert!(matches!(next(&mut sub).await, SubscriptionEvent::Subscribed { recovered: Some(true), .. }));
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(next_offset(&mut sub).await);
    }
    assert_eq!(got, [12, 13, 14, 15]);
}

#[tokio::test]
async fn failed_recovery_is_reported_and_delivery_continues_in_the_new_epoch() {
    let srv = Server::start().await;
    let (client, mut conn) = connect(&srv, builder(vec![srv.url.clone()])).await;
    let (mut sub, _) =
        subscribe(&client, &mut conn, "chat:r", subscribed("chat:r", 40, "old", None, &[])).await;
    next(&mut sub).await;
    conn.send(pushes("chat:r", [41])).await;
    assert_eq!(next_offset(&mut sub).await, 41);
    drop(conn);
    let mut conn = srv.accept().await;
    conn.handshake(25_000).await;
    let req = conn.expect("subscribe").await;
    assert_eq!(recover_of(&req), Some(pos(41, "old")));
    conn.reply(&req, subscribed("chat:r", 2, "new", Some(false), &[])).await;
    conn.send(pushes("chat:r", [3])).await;
    assert_eq!(
        next(&mut sub).await,
        SubscriptionEvent::Subscribed {
            recovered: Some(false),
            position: Some(pos(2, "new")),
            members: None
        }
    );
    assert_eq!(next_offset(&mut sub).await, 3);
    // And the next reconnect recovers from the new epoch.
    drop(conn);
    let mut conn = srv.accept().await;
    conn.handshake(25_000).await;
    assert_eq!(recover_of(&conn.expect("subscribe").await), Some(pos(3, "new")));
}

#[tokio::test]
async fn answers_ping_with_pong_and_delivers_message_pushes() {
    let srv = Server::start().await;
    let (client, mut conn) = connect(&srv, builder(vec![srv.url.clone()])).await;
    let mut events = client.events();
    conn.send(vec![ServerMessage::Push(Push::Ping)]).await;
    let pong = conn.recv().await;
    assert_eq!(pong.command, Command::Pong);
    assert_eq!(pong.id, None);
    conn.send(vec![ServerMessage::Push(Push::Message {
        data: Data::from_json("{\"hello\":true}").unwrap(),
    })])
    .await;
    assert_eq!(
        next_conn_event(&mut events).await,
        ConnectionEvent::Message(Data::from_json("{\"hello\":true}").unwrap())
    );
}

#[tokio::test]
async fn silent_connection_is_declared_dead_and_replaced() {
    let srv = Server::start().await;
    let b = builder(vec![srv.url.clone()]).liveness_grace(Duration::from_millis(200));
    let connecting = tokio::spawn(b.connect());
    let mut conn = srv.accept().await;
    conn.handshake(200).await;
    let client = connecting.await.unwrap().unwrap();
    let mut events = client.events();
    // The node says nothing for longer than ping_ms + grace.
    assert!(matches!(next_conn_event(&mut events).await, ConnectionEvent::Disconnected { code: None, .. }));
    let mut conn2 = srv.accept().await;
    conn2.handshake(25_000).await;
    assert!(matches!(next_conn_event(&mut events).await, ConnectionEvent::Connected { .. }));
    // The old socket was closed by the client.
    conn.closed_by_client().await;
}

#[tokio::test]
async fn close_without_reconnect_ends_the_client() {
    let srv = Server::start().await;
    let (client, mut conn) = connect(&srv, builder(vec![srv.url.clone()])).await;
    let (mut sub, _) = subscribe(&client, &mut conn, "chat:x", subscribed("chat:x", 0, "e", None, &[])).await;
    next(&mut sub).await;
    let c = client.clone();
    let publish = tokio::spawn(async move { c.publish("chat:x", Data::from_json("1").unwrap()).await });
    conn.expect("publish").await;
    conn.disconnect(4001, "unauthorized", false).await;
    let closed = ClientError::Closed { code: 4001, reason: "unauthorized".into() };
    assert_eq!(publish.await.unwrap(), Err(closed.clone()));
    assert_eq!(
        next(&mut sub).await,
        SubscriptionEvent::Unsubscribed { code: 4001, reason: "unauthorized".into() }
    );
    assert_eq!(timeout(STEP, sub.next()).await.unwrap(), None);
    assert_eq!(client.presence_stats("chat:x").await, Err(closed.clone()));
    assert!(client.is_closed());
    srv.no_connection_within(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn disconnect_push_saying_reconnect_overrides_the_table() {
    let srv = Server::start().await;
    let (client, mut conn) = connect(&srv, builder(vec![srv.url.clone()])).await;
    let mut events = client.events();
    // 4009 does not reconnect by the table, but the push says to.
    conn.disconnect(4009, "moved", true).await;
    assert!(matches!(
        next_conn_event(&mut events).await,
        ConnectionEvent::Disconnected { code: Some(4009), .. }
    ));
    let mut conn = srv.accept().await;
    conn.handshake(25_000).await;
    assert!(matches!(next_conn_event(&mut events).await, ConnectionEvent::Connected { .. }));
    assert!(!client.is_closed());
}

#[tokio::test]
async fn close_frame_alone_follows_the_close_table() {
    let srv = Server::start().await;
    let (client, mut conn) = connect(&srv, builder(vec![srv.url.clone()])).await;
    // 4002 without a disconnect push: the table says do not reconnect.
    let c = client.clone();
    let call = tokio::spawn(async move { c.presence_stats("r").await });
    conn.expect("presence_stats").await;
    conn.close_frame(4002, "protocol violation").await;
    assert_eq!(
        call.await.unwrap(),
        Err(ClientError::Closed { code: 4002, reason: "protocol violation".into() })
    );
    srv.no_connection_within(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn publish_in_flight_fails_on_disconnect_and_is_not_resent() {
    let srv = Server::start().await;
    let (client, mut conn) = connect(&srv, builder(vec![srv.url.clone()])).await;
    let c = client.clone();
    let publish =
        tokio::spawn(async move { c.publish("chat:p", Data::from_json("\"once\"").unwrap()).await });
    conn.expect("publish").await;
    drop(conn);
    assert_eq!(publish.await.unwrap(), Err(ClientError::Disconnected));
    let mut conn = srv.accept().await;
    conn.handshake(25_000).await;
    // The first request on the new connection is the next call, not the old publish.
    let (res, ()) = tokio::join!(client.presence_stats("chat:p"), async {
        let r = conn.expect("presence_stats").await;
        conn.reply(&r, Reply::PresenceStats { room: "chat:p".into(), clients: 1, users: 1 }).await;
    });
    assert_eq!(res.unwrap(), (1, 1));
}

#[tokio::test]
async fn calls_made_while_disconnected_wait_for_the_next_connection() {
    let srv = Server::start().await;
    let (client, conn) = connect(&srv, builder(vec![srv.url.clone()])).await;
    let mut events = client.events();
    drop(conn);
    assert!(matches!(next_conn_event(&mut events).await, ConnectionEvent::Disconnected { .. }));
    let c = client.clone();
    let stats = tokio::spawn(async move { c.presence_stats("q").await });
    let mut conn = srv.accept().await;
    conn.handshake(25_000).await;
    let r = conn.expect("presence_stats").await;
    conn.reply(&r, Reply::PresenceStats { room: "q".into(), clients: 0, users: 0 }).await;
    assert_eq!(stats.await.unwrap().unwrap(), (0, 0));
}

#[tokio::test]
async fn skip_self_offset_counts_as_seen() {
    let srv = Server::start().await;
    let (client, mut conn) = connect(&srv, builder(vec![srv.url.clone()])).await;
    let (mut sub, _) = subscribe(&client, &mut conn, "chat:s", subscribed("chat:s", 0, "e", None, &[])).await;
    next(&mut sub).await;
    let (res, ()) = tokio::join!(client.publish_skip_self("chat:s", Data::from_json("1").unwrap()), async {
        let r = conn.expect("publish").await;
        assert!(matches!(r.command, Command::Publish { skip_self: true, .. }));
        conn.reply(&r, Reply::Published { room: "chat:s".into(), position: Some(pos(1, "e")) }).await;
    });
    assert_eq!(res.unwrap(), Some(pos(1, "e")));
    // Another client's publication at offset 2 is no gap.
    conn.send(pushes("chat:s", [2])).await;
    assert_eq!(next_offset(&mut sub).await, 2);
    // No resubscribe happened: the next request the node sees is this one.
    let (res, ()) = tokio::join!(client.presence_stats("chat:s"), async {
        let r = conn.expect("presence_stats").await;
        conn.reply(&r, Reply::PresenceStats { room: "chat:s".into(), clients: 1, users: 1 }).await;
    });
    res.unwrap();
}

#[tokio::test]
async fn slow_subscriber_never_blocks_the_client_and_is_recovered() {
    const LAST: u64 = 40;
    let srv = Server::start().await;
    let b = builder(vec![srv.url.clone()]).subscription_buffer(4);
    let (client, mut conn) = connect(&srv, b).await;
    let (mut sub, _) =
        subscribe(&client, &mut conn, "chat:slow", subscribed("chat:slow", 0, "e", None, &[])).await;
    conn.send(pushes("chat:slow", 1..=LAST)).await;

    // The node: answers resubscribes with what was asked, and calls.
    let node = async {
        loop {
            let r = conn.recv().await;
            match &r.command {
                Command::Unsubscribe { .. } => {
                    conn.reply(&r, Reply::Unsubscribed { room: "chat:slow".into() }).await
                }
                Command::Subscribe { recover, .. } => {
                    let from = recover.as_ref().expect("resubscribe without recover").offset;
                    let pubs: Vec<u64> = (from + 1..=LAST).collect();
                    conn.reply(&r, subscribed("chat:slow", LAST, "e", Some(true), &pubs)).await;
                }
                Command::PresenceStats { .. } => {
                    conn.reply(&r, Reply::PresenceStats { room: "chat:slow".into(), clients: 9, users: 9 })
                        .await
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    };
    let app = async {
        // The subscription's channel is full, yet the client answers calls.
        assert_eq!(client.presence_stats("chat:slow").await.unwrap(), (9, 9));
        let mut got = Vec::new();
        let mut resubscribed = 0;
        while got.last() != Some(&LAST) {
            match next(&mut sub).await {
                SubscriptionEvent::Publication(p) => got.push(p.offset.unwrap()),
                SubscriptionEvent::Subscribed { recovered, .. } => {
                    if recovered.is_some() {
                        assert_eq!(recovered, Some(true));
                        resubscribed += 1;
                    }
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(resubscribed >= 1);
        got
    };
    let got = tokio::select! {
        got = app => got,
        _ = node => unreachable!(),
    };
    assert_eq!(got, (1..=LAST).collect::<Vec<_>>());
}

#[tokio::test]
async fn msgpack_connection_round_trip() {
    let srv = Server::start().await;
    let (client, mut conn) = connect(&srv, builder(vec![srv.url.clone()]).encoding(Encoding::Msgpack)).await;
    assert_eq!(conn.enc, Encoding::Msgpack);
    let (mut sub, _) = subscribe(&client, &mut conn, "chat:m", subscribed("chat:m", 0, "e", None, &[])).await;
    next(&mut sub).await;
    let data = Data::from_json("{\"a\":[1,\"two\",null]}").unwrap();
    let (res, ()) = tokio::join!(client.publish("chat:m", data.clone()), async {
        let r = conn.expect("publish").await;
        let Command::Publish { data: got, .. } = &r.command else { unreachable!() };
        assert_eq!(got, &data);
        conn.reply(&r, Reply::Published { room: "chat:m".into(), position: Some(pos(1, "e")) }).await;
    });
    assert_eq!(res.unwrap(), Some(pos(1, "e")));
    conn.send(pushes("chat:m", [1])).await;
    assert_eq!(next_offset(&mut sub).await, 1);
}

#[tokio::test]
async fn urls_are_tried_in_turn() {
    let dead = {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        format!("ws://{}/ws", l.local_addr().unwrap())
    };
    let srv = Server::start().await;
    let (client, _conn) = connect(&srv, builder(vec![dead.clone(), srv.url.clone()])).await;
    assert!(!client.is_closed());
    // With only dead URLs, connect fails after one attempt each.
    let err = builder(vec![dead]).connect().await.unwrap_err();
    assert!(matches!(err, ClientError::Connect { .. }), "{err:?}");
}

#[tokio::test]
async fn connect_refused_by_the_node_returns_its_error() {
    let srv = Server::start().await;
    let connecting = tokio::spawn(builder(vec![srv.url.clone()]).token("bad").connect());
    let mut conn = srv.accept().await;
    let r = conn.expect("connect").await;
    conn.error(&r, 101, "unauthorized", false).await;
    conn.disconnect(4001, "unauthorized", false).await;
    let err = timeout(STEP, connecting).await.unwrap().unwrap().unwrap_err();
    assert_eq!(err.server_code(), Some(101));
}

#[tokio::test]
async fn subscribe_options_presence_members_and_server_unsubscribe() {
    let srv = Server::start().await;
    let (client, mut conn) = connect(&srv, builder(vec![srv.url.clone()])).await;
    let opts =
        SubscribeOptions { presence: true, token: Some("subtoken".into()), recover: Some(pos(5, "e")) };
    let (sub, ()) = tokio::join!(client.subscribe_with("chat:o", opts), async {
        let r = conn.expect("subscribe").await;
        match &r.command {
            Command::Subscribe { token, recover, presence, .. } => {
                assert_eq!(token.as_deref(), Some("subtoken"));
                assert_eq!(recover, &Some(pos(5, "e")));
                assert!(*presence);
            }
            other => panic!("{other:?}"),
        }
        let Reply::Subscribed { room, recoverable, position, publications, .. } =
            subscribed("chat:o", 6, "e", Some(true), &[6])
        else {
            unreachable!()
        };
        conn.reply(
            &r,
            Reply::Subscribed {
                room,
                recoverable,
                position,
                recovered: Some(true),
                publications,
                members: Some(vec![member("client-1", "me")]),
            },
        )
        .await;
    });
    let mut sub = sub.unwrap();
    assert_eq!(
        next(&mut sub).await,
        SubscriptionEvent::Subscribed {
            recovered: Some(true),
            position: Some(pos(6, "e")),
            members: Some(vec![member("client-1", "me")])
        }
    );
    assert_eq!(next_offset(&mut sub).await, 6);
    conn.send(vec![
        ServerMessage::Push(Push::Join { room: "chat:o".into(), member: member("c2", "u2") }),
        ServerMessage::Push(Push::Leave { room: "chat:o".into(), member: member("c2", "u2") }),
        ServerMessage::Push(Push::Unsubscribe { room: "chat:o".into(), code: 2000, reason: "kicked".into() }),
    ])
    .await;
    assert_eq!(next(&mut sub).await, SubscriptionEvent::Join(member("c2", "u2")));
    assert_eq!(next(&mut sub).await, SubscriptionEvent::Leave(member("c2", "u2")));
    assert_eq!(next(&mut sub).await, SubscriptionEvent::Unsubscribed { code: 2000, reason: "kicked".into() });
    assert_eq!(timeout(STEP, sub.next()).await.unwrap(), None);
    // The room can be subscribed again; a second subscription to it is refused locally.
    let (sub2, _) = subscribe(&client, &mut conn, "chat:o", subscribed("chat:o", 6, "e", None, &[])).await;
    assert_eq!(client.subscribe("chat:o").await.unwrap_err().server_code(), Some(105));
    drop(sub2);
    assert_eq!(conn.expect("unsubscribe").await.command.type_name(), "unsubscribe");
}

#[tokio::test]
async fn unsubscribe_and_close() {
    let srv = Server::start().await;
    let (client, mut conn) = connect(&srv, builder(vec![srv.url.clone()])).await;
    let (mut sub, _) = subscribe(&client, &mut conn, "chat:u", subscribed("chat:u", 0, "e", None, &[])).await;
    next(&mut sub).await;
    let (res, ()) = tokio::join!(client.unsubscribe("chat:u"), async {
        let r = conn.expect("unsubscribe").await;
        conn.reply(&r, Reply::Unsubscribed { room: "chat:u".into() }).await;
    });
    res.unwrap();
    assert_eq!(timeout(STEP, sub.next()).await.unwrap(), None);

    let (mut sub, _) = subscribe(&client, &mut conn, "chat:v", subscribed("chat:v", 0, "e", None, &[])).await;
    next(&mut sub).await;
    client.close().await;
    assert_eq!(conn.closed_by_client().await, Some(1000));
    assert!(matches!(next(&mut sub).await, SubscriptionEvent::Unsubscribed { code: 1000, .. }));
    assert!(matches!(client.presence("chat:v").await, Err(ClientError::Closed { code: 1000, .. })));
}

#[tokio::test]
async fn dropping_every_handle_closes_the_connection() {
    let srv = Server::start().await;
    let (client, mut conn) = connect(&srv, builder(vec![srv.url.clone()])).await;
    let mut events = client.events();
    let other = client.clone();
    drop(client);
    // One handle is still alive: still connected.
    conn.send(vec![ServerMessage::Push(Push::Ping)]).await;
    assert_eq!(conn.recv().await.command, Command::Pong);
    drop(other);
    assert_eq!(conn.closed_by_client().await, Some(1000));
    // The event stream ends with the driver.
    let end = timeout(STEP, async {
        loop {
            match events.recv().await {
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                _ => continue,
            }
        }
    })
    .await;
    assert!(end.is_ok());
}
