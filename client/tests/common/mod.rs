//! A scripted roomcast node for the SDK tests: accepts WebSockets on 127.0.0.1:0, picks
//! the offered subprotocol, and lets the test read the client's requests and write any
//! server message, one step at a time. Every wait has a timeout.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::result_large_err, dead_code)]

use std::collections::VecDeque;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use roomcast_client::{
    BackoffConfig, Client, ClientBuilder, Data, Position, Publication, Subscription, SubscriptionEvent,
};
use roomcast_protocol::{
    Command, Encode, Encoding, Member, Push, Reply, Request, ServerMessage, decode_requests, join_frame,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{Request as HttpRequest, Response as HttpResponse};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

/// How long any single step may take.
pub const STEP: Duration = Duration::from_secs(5);

pub struct Server {
    listener: TcpListener,
    pub url: String,
}

impl Server {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}/ws", listener.local_addr().unwrap());
        Server { listener, url }
    }

    /// The next client connection, WebSocket handshake done.
    pub async fn accept(&self) -> Conn {
        let (tcp, _) = timeout(STEP, self.listener.accept())
            .await
            .expect("no connection from the client in time")
            .unwrap();
        let mut enc = None;
        let ws = tokio_tungstenite::accept_hdr_async(tcp, |req: &HttpRequest, mut resp: HttpResponse| {
            let offered = req
                .headers()
                .get("Sec-WebSocket-Protocol")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let chosen = offered
                .split(',')
                .map(str::trim)
                .find_map(Encoding::from_subprotocol)
                .unwrap_or(Encoding::Json);
            enc = Some(chosen);
            resp.headers_mut()
                .insert("Sec-WebSocket-Protocol", HeaderValue::from_static(chosen.subprotocol()));
            Ok(resp)
        })
        .await
        .unwrap();
        Conn { ws, enc: enc.unwrap(), buf: VecDeque::new() }
    }

    /// Asserts no client connects within `d`.
    pub async fn no_connection_within(&self, d: Duration) {
        if let Ok(Ok((_, addr))) = timeout(d, self.listener.accept()).await {
            panic!("unexpected connection from {addr}");
        }
    }
}

pub struct Conn {
    ws: WebSocketStream<TcpStream>,
    pub enc: Encoding,
    buf: VecDeque<Request>,
}

impl Conn {
    /// The client's next request.
    pub async fn recv(&mut self) -> Request {
        loop {
            if let Some(r) = self.buf.pop_front() {
                return r;
            }
            let msg = timeout(STEP, self.ws.next())
                .await
                .expect("no request from the client in time")
                .expect("connection ended")
                .expect("websocket error");
            let frame: Vec<u8> = match msg {
                Message::Text(t) => {
                    assert_eq!(self.enc, Encoding::Json, "text frame on a MessagePack connection");
                    t.as_bytes().to_vec()
                }
                Message::Binary(b) => {
                    assert_eq!(self.enc, Encoding::Msgpack, "binary frame on a JSON connection");
                    b.to_vec()
                }
                Message::Close(f) => panic!("client closed the connection: {f:?}"),
                _ => continue,
            };
            for item in decode_requests(self.enc, &frame) {
                self.buf.push_back(item.expect("protocol violation").expect("rejected request"));
            }
        }
    }

    /// The next request, which must be of this type.
    pub async fn expect(&mut self, ty: &str) -> Request {
        let r = self.recv().await;
        assert_eq!(r.command.type_name(), ty, "{r:?}");
        r
    }

    /// Sends messages in one frame.
    pub async fn send(&mut self, msgs: Vec<ServerMessage>) {
        let encoded: Vec<_> = msgs.iter().map(|m| m.encode(self.enc).unwrap()).collect();
        let frame = join_frame(self.enc, &encoded);
        let msg = match self.enc {
            Encoding::Json => Message::text(String::from_utf8(frame).unwrap()),
            Encoding::Msgpack => Message::binary(frame),
        };
        self.ws.send(msg).await.unwrap();
    }

    pub async fn reply(&mut self, req: &Request, reply: Reply) {
        self.send(vec![ServerMessage::Reply { id: req.id, reply }]).await;
    }

    pub async fn error(&mut self, req: &Request, code: u16, message: &str, temporary: bool) {
        self.send(vec![ServerMessage::Error { id: req.id, code, message: message.into(), temporary }]).await;
    }

    /// Answers the `connect` that must come first; returns it.
    pub async fn handshake(&mut self, ping_ms: u64) -> Request {
        let r = self.expect("connect").await;
        self.reply(
            &r,
            Reply::Connected { client: "client-1".into(), node: "node-1".into(), ping_ms, expires_in: None },
        )
        .await;
        r
    }

    /// A `disconnect` push, then the close frame with the same code.
    pub async fn disconnect(&mut self, code: u16, reason: &str, reconnect: bool) {
        self.send(vec![ServerMessage::Push(Push::Disconnect { code, reason: reason.into(), reconnect })])
            .await;
        let _ = self.ws.close(Some(CloseFrame { code: code.into(), reason: reason.into() })).await;
    }

    /// Only a close frame, no `disconnect` push.
    pub async fn close_frame(&mut self, code: u16, reason: &str) {
        let _ = self.ws.close(Some(CloseFrame { code: code.into(), reason: reason.into() })).await;
    }

    /// Waits until the client closes the connection; returns its close code, if any.
    pub async fn closed_by_client(&mut self) -> Option<u16> {
        loop {
            match timeout(STEP, self.ws.next()).await.expect("client did not close in time") {
                Some(Ok(Message::Close(f))) => return f.map(|f| u16::from(f.code)),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return None,
            }
        }
    }
}

/// A builder with quick reconnects, for tests.
pub fn builder(urls: Vec<String>) -> ClientBuilder {
    Client::builder(urls)
        .backoff(BackoffConfig {
            min: Duration::from_millis(10),
            max: Duration::from_millis(50),
            factor: 2.0,
        })
        .request_timeout(STEP)
}

/// Connects `builder` to `server`, answering the handshake.
pub async fn connect(server: &Server, builder: ClientBuilder) -> (Client, Conn) {
    let connecting = tokio::spawn(builder.connect());
    let mut conn = server.accept().await;
    conn.handshake(25_000).await;
    let client = timeout(STEP, connecting).await.unwrap().unwrap().unwrap();
    (client, conn)
}

/// Subscribes `client` to `room`, answering with `reply`; returns the subscription and
/// the `subscribe` request the node saw.
pub async fn subscribe(
    client: &Client,
    conn: &mut Conn,
    room: &str,
    reply: Reply,
) -> (Subscription, Request) {
    let (sub, req) = tokio::join!(client.subscribe(room), async {
        let req = conn.expect("subscribe").await;
        conn.reply(&req, reply).await;
        req
    });
    (sub.unwrap(), req)
}

pub fn pos(offset: u64, epoch: &str) -> Position {
    Position { offset, epoch: epoch.into() }
}

pub fn publication(room: &str, offset: u64) -> Publication {
    Publication {
        room: room.into(),
        offset: Some(offset),
        data: Data::from_json(format!("{{\"n\":{offset}}}")).unwrap(),
        info: None,
    }
}

pub fn push(room: &str, offset: u64) -> ServerMessage {
    ServerMessage::Push(Push::Publication(publication(room, offset)))
}

pub fn pushes(room: &str, offsets: impl IntoIterator<Item = u64>) -> Vec<ServerMessage> {
    offsets.into_iter().map(|o| push(room, o)).collect()
}

/// A `subscribed` reply in a room with history.
pub fn subscribed(room: &str, offset: u64, epoch: &str, recovered: Option<bool>, pubs: &[u64]) -> Reply {
    Reply::Subscribed {
        room: room.into(),
        recoverable: true,
        position: Some(pos(offset, epoch)),
        recovered,
        publications: (!pubs.is_empty()).then(|| pubs.iter().map(|o| publication(room, *o)).collect()),
        members: None,
    }
}

pub fn member(client: &str, user: &str) -> Member {
    Member { client: client.into(), user: user.into(), info: None, room_info: None }
}

/// The subscription's next event.
pub async fn next(sub: &mut Subscription) -> SubscriptionEvent {
    timeout(STEP, sub.next()).await.expect("no subscription event in time").expect("subscription ended")
}

/// The next event, which must be a publication; returns its offset.
pub async fn next_offset(sub: &mut Subscription) -> u64 {
    match next(sub).await {
        SubscriptionEvent::Publication(p) => {
            assert_eq!(p.data.decode::<serde_json::Value>().unwrap()["n"], p.offset.unwrap());
            p.offset.unwrap()
        }
        other => panic!("expected a publication, got {other:?}"),
    }
}

/// The recover position of a `subscribe` request.
pub fn recover_of(req: &Request) -> Option<Position> {
    match &req.command {
        Command::Subscribe { recover, .. } => recover.clone(),
        other => panic!("not a subscribe: {other:?}"),
    }
}
