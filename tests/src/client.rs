//! A WebSocket test client working in `serde_json::Value`, in either encoding. It decodes
//! what the node sends with serde_json and rmpv, not with the project's protocol crate, so
//! the tests check the wire format itself.

use std::collections::VecDeque;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Map, Number, Value, json};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderMap, HeaderValue};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::RECV_TIMEOUT;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The encoding a test client asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enc {
    /// `Sec-WebSocket-Protocol: roomcast.v1.json`.
    Json,
    /// `Sec-WebSocket-Protocol: roomcast.v1.msgpack`.
    Msgpack,
    /// No `Sec-WebSocket-Protocol` at all (JSON on the wire).
    NoSubprotocol,
}

impl Enc {
    /// The two encodings every behaviour test runs in.
    pub const BOTH: [Enc; 2] = [Enc::Json, Enc::Msgpack];

    /// The subprotocol offered, if any.
    pub fn subprotocol(self) -> Option<&'static str> {
        match self {
            Enc::Json => Some("roomcast.v1.json"),
            Enc::Msgpack => Some("roomcast.v1.msgpack"),
            Enc::NoSubprotocol => None,
        }
    }

    /// Whether messages travel in binary (MessagePack) frames.
    pub fn is_binary(self) -> bool {
        self == Enc::Msgpack
    }

    /// One frame holding `msgs` in this encoding.
    pub fn frame(self, msgs: &[Value]) -> Message {
        if self.is_binary() {
            let mut out = Vec::new();
            for m in msgs {
                rmpv::encode::write_value(&mut out, &json_to_mp(m)).expect("encoding MessagePack");
            }
            Message::Binary(out.into())
        } else {
            let text: Vec<String> = msgs.iter().map(Value::to_string).collect();
            Message::Text(text.join("\n").into())
        }
    }
}

/// A JSON value as a MessagePack value (maps keep string keys).
pub fn json_to_mp(v: &Value) -> rmpv::Value {
    match v {
        Value::Null => rmpv::Value::Nil,
        Value::Bool(b) => rmpv::Value::Boolean(*b),
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                rmpv::Value::from(u)
            } else if let Some(i) = n.as_i64() {
                rmpv::Value::from(i)
            } else {
                rmpv::Value::F64(n.as_f64().expect("a finite number"))
            }
        }
        Value::String(s) => rmpv::Value::from(s.as_str()),
        Value::Array(a) => rmpv::Value::Array(a.iter().map(json_to_mp).collect()),
        Value::Object(o) => {
            rmpv::Value::Map(o.iter().map(|(k, v)| (rmpv::Value::from(k.as_str()), json_to_mp(v))).collect())
        }
    }
}

/// A MessagePack value from the node as JSON. `bin` becomes `{"$bin": [bytes]}`. Panics on
/// what the protocol never allows from a node: `ext`, non-string keys, non-UTF-8 strings.
pub fn mp_to_json(v: rmpv::Value) -> Value {
    match v {
        rmpv::Value::Nil => Value::Null,
        rmpv::Value::Boolean(b) => Value::Bool(b),
        rmpv::Value::Integer(i) => {
            if let Some(u) = i.as_u64() {
                Value::from(u)
            } else {
                Value::from(i.as_i64().expect("an integer"))
            }
        }
        rmpv::Value::F32(f) => Number::from_f64(f64::from(f)).map_or(Value::Null, Value::Number),
        rmpv::Value::F64(f) => Number::from_f64(f).map_or(Value::Null, Value::Number),
        rmpv::Value::String(s) => {
            Value::String(s.into_str().expect("the node sent a MessagePack string that is not UTF-8"))
        }
        rmpv::Value::Binary(b) => json!({ "$bin": b }),
        rmpv::Value::Array(a) => Value::Array(a.into_iter().map(mp_to_json).collect()),
        rmpv::Value::Map(m) => {
            let mut o = Map::new();
            for (k, v) in m {
                let rmpv::Value::String(k) = k else {
                    panic!("the node sent a MessagePack map with a non-string key {k:?}")
                };
                o.insert(k.into_str().expect("UTF-8 key"), mp_to_json(v));
            }
            Value::Object(o)
        }
        rmpv::Value::Ext(t, _) => panic!("the node sent a MessagePack ext value (type {t})"),
    }
}

/// Why a read ended without a message.
#[derive(Debug)]
enum ReadEnd {
    /// The node's close frame.
    Closed(u16, String),
    /// The stream ended (or failed) without a close frame.
    Eof(String),
    Timeout,
}

/// A WebSocket client speaking roomcast in `Value`s.
pub struct TestClient {
    ws: Ws,
    /// The encoding this connection negotiated.
    pub enc: Enc,
    /// Decoded messages not yet handed out by `recv`.
    buf: VecDeque<Value>,
    next_id: u64,
    /// Headers of the handshake response.
    pub headers: HeaderMap,
    /// The client id from `connected`.
    pub client_id: String,
    /// The `connected` reply.
    pub connected: Value,
    /// The close frame, once it arrived.
    closed: Option<(u16, String)>,
    /// The message that arrived right before the close frame.
    pub last_before_close: Option<Value>,
}

impl std::fmt::Debug for TestClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestClient").field("enc", &self.enc).field("client", &self.client_id).finish()
    }
}

fn request_for(url: &str, enc: Enc) -> tungstenite::handshake::client::Request {
    let mut req = url.into_client_request().expect("a ws:// URL");
    if let Some(p) = enc.subprotocol() {
        req.headers_mut().insert("Sec-WebSocket-Protocol", HeaderValue::from_static(p));
    }
    req
}

impl TestClient {
    /// Opens a WebSocket (no `connect` sent yet); `Err` when the handshake fails.
    pub async fn try_open(url: &str, enc: Enc) -> Result<TestClient, tungstenite::Error> {
        let (ws, resp) = crate::within(
            RECV_TIMEOUT,
            "the WebSocket handshake",
            tokio_tungstenite::connect_async_with_config(request_for(url, enc), None, true),
        )
        .await?;
        Ok(Self::wrap(ws, enc, resp.headers().clone()))
    }

    /// Opens a WebSocket (no `connect` sent yet).
    pub async fn open(url: &str, enc: Enc) -> TestClient {
        Self::try_open(url, enc).await.unwrap_or_else(|e| panic!("cannot open {url} ({enc:?}): {e}"))
    }

    /// Opens a WebSocket whose socket has a small kernel receive buffer (for slow
    /// consumer tests: the node's writes block sooner).
    pub async fn open_with_rcvbuf(url: &str, enc: Enc, rcvbuf: u32) -> TestClient {
        let addr: std::net::SocketAddr = url
            .strip_prefix("ws://")
            .and_then(|r| r.split('/').next())
            .and_then(|a| a.parse().ok())
            .expect("ws://IP:PORT/… URL");
        let socket = TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(rcvbuf).expect("SO_RCVBUF");
        let stream = socket.connect(addr).await.expect("connect");
        stream.set_nodelay(true).expect("TCP_NODELAY");
        let (ws, resp) =
            tokio_tungstenite::client_async(request_for(url, enc), MaybeTlsStream::Plain(stream))
                .await
                .expect("WebSocket handshake");
        Self::wrap(ws, enc, resp.headers().clone())
    }

    fn wrap(ws: Ws, enc: Enc, headers: HeaderMap) -> TestClient {
        TestClient {
            ws,
            enc,
            buf: VecDeque::new(),
            next_id: 1,
            headers,
            client_id: String::new(),
            connected: Value::Null,
            closed: None,
            last_before_close: None,
        }
    }

    /// Opens a WebSocket and sends `connect`; asserts `connected`.
    pub async fn connected(url: &str, enc: Enc) -> TestClient {
        let mut c = Self::open(url, enc).await;
        c.connect().await;
        c
    }

    /// Sends `connect` and checks the `connected` reply.
    pub async fn connect(&mut self) -> Value {
        let r = self.request(json!({"type": "connect", "name": "roomcast-tests", "version": "1"})).await;
        assert_eq!(r["type"], "connected", "{r}");
        assert!(r["client"].is_string() && r["node"].is_string() && r["ping_ms"].is_u64(), "{r}");
        self.client_id = crate::str_of(&r, "client").to_string();
        self.connected = r.clone();
        r
    }

    /// Sends one message in its own frame.
    pub async fn send(&mut self, msg: Value) {
        let frame = self.enc.frame(std::slice::from_ref(&msg));
        self.send_raw(frame).await;
    }

    /// Sends several messages in one frame.
    pub async fn send_batch(&mut self, msgs: &[Value]) {
        let frame = self.enc.frame(msgs);
        self.send_raw(frame).await;
    }

    /// Sends any WebSocket message. Errors are ignored: a node that closed is seen by the
    /// next read.
    pub async fn send_raw(&mut self, msg: Message) {
        let _ = crate::within(RECV_TIMEOUT, "sending a frame", self.ws.send(msg)).await;
    }

    /// The next id for a request.
    pub fn next_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Reads one WebSocket message and appends what it holds to the buffer.
    async fn fill(&mut self, deadline: Instant) -> Result<usize, ReadEnd> {
        loop {
            if let Some((code, reason)) = &self.closed {
                return Err(ReadEnd::Closed(*code, reason.clone()));
            }
            let msg = match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return Err(ReadEnd::Timeout),
                Ok(None) => return Err(ReadEnd::Eof("stream ended".into())),
                Ok(Some(Err(e))) => return Err(ReadEnd::Eof(e.to_string())),
                Ok(Some(Ok(m))) => m,
            };
            let values = match msg {
                Message::Text(t) => {
                    assert!(!self.enc.is_binary(), "text frame on a MessagePack connection: {t}");
                    t.as_str()
                        .split('\n')
                        .filter(|l| !l.trim().is_empty())
                        .map(|l| {
                            serde_json::from_str::<Value>(l)
                                .unwrap_or_else(|e| panic!("undecodable JSON from the node ({e}): {l}"))
                        })
                        .collect::<Vec<_>>()
                }
                Message::Binary(b) => {
                    assert!(self.enc.is_binary(), "binary frame on a JSON connection ({} bytes)", b.len());
                    let mut rd: &[u8] = &b;
                    let mut out = Vec::new();
                    while !rd.is_empty() {
                        let v = rmpv::decode::read_value(&mut rd)
                            .unwrap_or_else(|e| panic!("undecodable MessagePack from the node: {e}"));
                        out.push(mp_to_json(v));
                    }
                    out
                }
                Message::Close(frame) => {
                    let (code, reason) = frame
                        .map(|f| (u16::from(f.code), f.reason.to_string()))
                        .unwrap_or((1005, String::new()));
                    self.closed = Some((code, reason));
                    continue;
                }
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
            };
            for v in &values {
                assert!(v.is_object(), "a message from the node is not a map: {v}");
                assert!(v["type"].is_string(), "a message from the node has no string type: {v}");
                if let Some(id) = v.get("id") {
                    assert!(
                        id.as_u64().is_some_and(|i| (1..=u64::from(u32::MAX)).contains(&i)),
                        "bad id: {v}"
                    );
                }
            }
            if let Some(last) = values.last() {
                self.last_before_close = Some(last.clone());
            }
            let n = values.len();
            self.buf.extend(values);
            if n > 0 {
                return Ok(n);
            }
        }
    }

    /// The next message (5 s at most).
    pub async fn recv(&mut self) -> Value {
        self.recv_within(RECV_TIMEOUT).await.unwrap_or_else(|| panic!("no message within {RECV_TIMEOUT:?}"))
    }

    /// The next message within `limit`, or `None`. Panics when the connection closes.
    pub async fn recv_within(&mut self, limit: Duration) -> Option<Value> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(v) = self.buf.pop_front() {
                return Some(v);
            }
            match self.fill(deadline).await {
                Ok(_) => {}
                Err(ReadEnd::Timeout) => return None,
                Err(e) => panic!("connection ended while waiting for a message: {e:?}"),
            }
        }
    }

    /// Messages that arrive within `limit` (for asserting that something does *not* come).
    pub async fn collect_for(&mut self, limit: Duration) -> Vec<Value> {
        let deadline = Instant::now() + limit;
        let mut out: Vec<Value> = self.buf.drain(..).collect();
        loop {
            match self.fill(deadline).await {
                Ok(_) => out.extend(self.buf.drain(..)),
                Err(ReadEnd::Timeout) => return out,
                Err(e) => panic!("connection ended: {e:?}"),
            }
        }
    }

    /// Skips messages until one matches `pred` (5 s at most); returns it.
    pub async fn recv_until(&mut self, mut pred: impl FnMut(&Value) -> bool) -> Value {
        let deadline = Instant::now() + RECV_TIMEOUT;
        loop {
            if let Some(v) = self.buf.pop_front() {
                if pred(&v) {
                    return v;
                }
                continue;
            }
            match self.fill(deadline).await {
                Ok(_) => {}
                Err(ReadEnd::Timeout) => panic!("no matching message within {RECV_TIMEOUT:?}"),
                Err(e) => panic!("connection ended while waiting for a matching message: {e:?}"),
            }
        }
    }

    /// Skips messages until one of type `ty`.
    pub async fn recv_type(&mut self, ty: &str) -> Value {
        self.recv_until(|v| v["type"] == ty).await
    }

    /// Sends a command (with the given `id`, or a fresh one) and waits for the reply with
    /// that id; other messages stay buffered for `recv`.
    pub async fn request(&mut self, mut cmd: Value) -> Value {
        let id = match cmd.get("id") {
            Some(id) => id.clone(),
            None => {
                let id = Value::from(self.next_id());
                cmd["id"] = id.clone();
                id
            }
        };
        self.send(cmd).await;
        self.wait_reply(&id).await
    }

    /// Waits for the reply with `id` (5 s at most), leaving other messages buffered.
    pub async fn wait_reply(&mut self, id: &Value) -> Value {
        let deadline = Instant::now() + RECV_TIMEOUT;
        let mut scanned = 0;
        loop {
            if let Some(pos) = self.buf.iter().skip(scanned).position(|v| v.get("id") == Some(id)) {
                return self.buf.remove(scanned + pos).expect("present");
            }
            scanned = self.buf.len();
            match self.fill(deadline).await {
                Ok(_) => {}
                Err(ReadEnd::Timeout) => panic!("no reply with id {id} within {RECV_TIMEOUT:?}"),
                Err(e) => panic!("connection ended while waiting for the reply with id {id}: {e:?}"),
            }
        }
    }

    /// Buffered messages (received, not yet handed out), removing them.
    pub fn take_buffered(&mut self) -> Vec<Value> {
        self.buf.drain(..).collect()
    }

    /// Reads until the node's close frame; asserts that the message right before it was
    /// a `disconnect` with the same code. Returns the close code and reason.
    pub async fn expect_close(&mut self) -> (u16, String) {
        let deadline = Instant::now() + RECV_TIMEOUT;
        loop {
            match self.fill(deadline).await {
                Ok(_) => {}
                Err(ReadEnd::Closed(code, reason)) => {
                    let last = self.last_before_close.clone().unwrap_or(Value::Null);
                    assert_eq!(
                        last["type"], "disconnect",
                        "close {code} without a disconnect before it: {last}"
                    );
                    assert_eq!(last["code"], code, "disconnect and close codes differ: {last} vs {code}");
                    assert!(last["reason"].is_string() && last["reconnect"].is_boolean(), "{last}");
                    assert!(last.get("id").is_none(), "a push with an id: {last}");
                    return (code, reason);
                }
                Err(ReadEnd::Timeout) => panic!("no close frame within {RECV_TIMEOUT:?}"),
                Err(ReadEnd::Eof(e)) => panic!("connection ended without a close frame: {e}"),
            }
        }
    }

    /// The `disconnect` push that came before the close (after [`Self::expect_close`]).
    pub fn disconnect(&self) -> Value {
        self.last_before_close.clone().unwrap_or(Value::Null)
    }

    /// Sends a close frame and waits (briefly) for the node's answer.
    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Some(Ok(_)) = self.ws.next().await {}
        })
        .await;
    }
}
