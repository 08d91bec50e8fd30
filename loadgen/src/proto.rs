//! The two protocols the load generator speaks over [`rawws`]: roomcast v1 JSON, and
//! Socket.IO 4 (Engine.IO v4, WebSocket transport only) against `bench/socketio/server.js`.
//!
//! Socket.IO, as spoken here: `GET /socket.io/?EIO=4&transport=websocket`; the server
//! opens with `0{"sid":…}`; the client connects to the main namespace with `40` (or
//! `40{"token":…}`), answered by `40{"sid":…}`; events are `42["name",…]`, with an ack id
//! `42<id>["name",…]` answered by `43<id>[…]`; the server pings with `2`, the client
//! answers `3`. One Engine.IO packet per WebSocket frame.

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, SocketAddr};

use anyhow::Context as _;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;

use crate::rawws::{self, Inflater, Ws};

/// Which server the load generator talks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Proto {
    /// roomcast v1, JSON (`roomcast.v1.json`).
    Roomcast,
    /// Socket.IO 4 (`bench/socketio/server.js`): rooms, `join`, `publish`, acks.
    Socketio,
}

impl Proto {
    pub fn name(self) -> &'static str {
        match self {
            Proto::Roomcast => "roomcast",
            Proto::Socketio => "socketio",
        }
    }

    /// Whether one incoming message is a publication (a delivery).
    pub fn is_publication(self, msg: &[u8]) -> bool {
        match self {
            Proto::Roomcast => msg.starts_with(b"{\"type\":\"publication\""),
            Proto::Socketio => msg.starts_with(b"42[\"publication\""),
        }
    }

    /// Appends publications `(id, room, data)` (data: a JSON value) as WebSocket frames:
    /// roomcast puts them all in one frame (one message per line), Socket.IO sends one
    /// frame per packet. The publisher gets no copy of its own publications. An `id` asks
    /// for a reply (`published`, or a Socket.IO ack).
    pub fn publish_frames<'a>(
        self,
        out: &mut Vec<u8>,
        items: impl IntoIterator<Item = (Option<u32>, &'a str, &'a str)>,
    ) {
        match self {
            Proto::Roomcast => {
                let mut payload = Vec::new();
                for (id, room, data) in items {
                    if !payload.is_empty() {
                        payload.push(b'\n');
                    }
                    payload.extend_from_slice(b"{\"type\":\"publish\",");
                    if let Some(id) = id {
                        payload.extend_from_slice(format!("\"id\":{id},").as_bytes());
                    }
                    payload.extend_from_slice(b"\"room\":\"");
                    payload.extend_from_slice(room.as_bytes());
                    payload.extend_from_slice(b"\",\"skip_self\":true,\"data\":");
                    payload.extend_from_slice(data.as_bytes());
                    payload.push(b'}');
                }
                if !payload.is_empty() {
                    rawws::client_frame(out, 0x1, &payload);
                }
            }
            Proto::Socketio => {
                for (id, room, data) in items {
                    let id = id.map(|i| i.to_string()).unwrap_or_default();
                    let p = format!("42{id}[\"publish\",{{\"room\":\"{room}\",\"data\":{data}}}]");
                    rawws::client_frame(out, 0x1, p.as_bytes());
                }
            }
        }
    }
}

/// A connection speaking one [`Proto`].
pub struct Conn<S = TcpStream> {
    pub ws: Ws<S>,
    pub proto: Proto,
    inflater: Option<Box<Inflater>>,
    scratch: Vec<u8>,
    /// Messages read with a reply that was waited for, not yet passed on.
    pending: VecDeque<Vec<u8>>,
    /// Inflate compressed frames (else they are reported as [`Step::Frame::compressed`]
    /// and not read: cheaper, for counting).
    pub inflate: bool,
    /// Compressed frames inflated so far.
    pub inflated_frames: u64,
    /// Wire size of the last frame read.
    pub last_frame_len: usize,
}

/// What reading one frame gave.
pub enum Step {
    /// A frame was handled; `pong` is the answer owed to a ping it held, if any;
    /// `compressed`: a compressed frame left unread (`inflate` is off).
    Frame { pong: Option<&'static [u8]>, compressed: bool },
    /// The connection ended (close frame or end of stream).
    Closed { code: Option<u16> },
}

/// Where and how to connect.
pub struct Dial<'a> {
    pub addr: SocketAddr,
    pub path: &'a str,
    pub source: Option<IpAddr>,
    pub deflate: bool,
    pub token: Option<&'a str>,
}

/// Connects and completes the protocol's own handshake (roomcast: `connect` →
/// `connected`; Socket.IO: open packet, `40` → `40`). With `room`, also subscribes
/// (joins) and waits for the reply, which is returned (the `subscribed` line, or the ack).
/// `recover` (roomcast only) is `(offset, epoch)`.
pub async fn open(
    proto: Proto,
    d: &Dial<'_>,
    room: Option<&str>,
    recover: Option<(u64, &str)>,
) -> anyhow::Result<(Conn, Option<String>)> {
    let up = rawws::Upgrade {
        subprotocol: (proto == Proto::Roomcast).then_some("roomcast.v1.json"),
        deflate: d.deflate,
    };
    let ws = rawws::connect(d.addr, d.path, d.source, &up).await?;
    let mut conn = Conn::new(ws, proto);
    let reply = match proto {
        Proto::Roomcast => {
            let token = d.token.map(|t| format!(",\"token\":{}", json_str(t))).unwrap_or_default();
            let mut cmds = format!("{{\"type\":\"connect\",\"id\":1{token}}}");
            if let Some(room) = room {
                let rec = recover
                    .map(|(o, e)| format!(",\"recover\":{{\"offset\":{o},\"epoch\":{}}}", json_str(e)))
                    .unwrap_or_default();
                cmds.push_str(&format!("\n{{\"type\":\"subscribe\",\"id\":2,\"room\":\"{room}\"{rec}}}"));
            }
            conn.ws.send_text(cmds.as_bytes()).await?;
            // Both replies may come in one frame: wait for the last one (an error to either
            // ends the wait).
            let want: &[u8] =
                if room.is_some() { b"{\"type\":\"subscribed\"" } else { b"{\"type\":\"connected\"" };
            Some(conn.wait_for(want, b"{\"type\":\"error\"").await?)
        }
        Proto::Socketio => {
            conn.wait_for(b"0{", b"\x00").await.context("no Engine.IO open packet")?;
            let auth = d.token.map(|t| format!("{{\"token\":{}}}", json_str(t))).unwrap_or_default();
            conn.ws.send_text(format!("40{auth}").as_bytes()).await?;
            conn.wait_for(b"40", b"44").await.context("Socket.IO connect")?;
            match room {
                Some(room) => {
                    conn.ws.send_text(format!("421[\"join\",\"{room}\"]").as_bytes()).await?;
                    Some(conn.wait_for(b"431[", b"\x00").await.context("join")?)
                }
                None => None,
            }
        }
    };
    Ok((conn, reply))
}

/// A JSON string literal.
pub fn json_str(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

impl<S> Conn<S> {
    pub fn new(ws: Ws<S>, proto: Proto) -> Self {
        Conn {
            ws,
            proto,
            inflater: None,
            scratch: Vec::new(),
            pending: VecDeque::new(),
            inflate: true,
            inflated_frames: 0,
            last_frame_len: 0,
        }
    }
}

impl Conn<TcpStream> {
    /// Splits into a reading connection and the raw write half.
    pub fn into_split(self) -> (Conn<tokio::net::tcp::OwnedReadHalf>, OwnedWriteHalf) {
        let (rd, wr) = self.ws.into_split();
        let conn = Conn {
            ws: rd,
            proto: self.proto,
            inflater: self.inflater,
            scratch: self.scratch,
            pending: self.pending,
            inflate: self.inflate,
            inflated_frames: self.inflated_frames,
            last_frame_len: self.last_frame_len,
        };
        (conn, wr)
    }
}

impl<S: AsyncRead + Unpin> Conn<S> {
    /// Reads one frame and calls `on_msg` for each message it holds (inflated; one line of
    /// a roomcast frame, or one Engine.IO packet). Pings are not passed on: the answer owed
    /// is returned.
    pub async fn read(&mut self, mut on_msg: impl FnMut(&[u8])) -> io::Result<Step> {
        if !self.pending.is_empty() {
            self.last_frame_len = 0;
            for m in self.pending.drain(..) {
                on_msg(&m);
            }
            return Ok(Step::Frame { pong: None, compressed: false });
        }
        let Some(f) = self.ws.next_frame().await? else {
            return Ok(Step::Closed { code: None });
        };
        self.last_frame_len = f.wire_len;
        match f.opcode {
            0x8 => {
                let code = (f.payload.len() >= 2).then(|| u16::from_be_bytes([f.payload[0], f.payload[1]]));
                return Ok(Step::Closed { code });
            }
            0x9 => return Ok(Step::Frame { pong: Some(b""), compressed: false }),
            0x0..=0x2 => {}
            _ => return Ok(Step::Frame { pong: None, compressed: false }),
        }
        if f.rsv1 && !self.inflate {
            return Ok(Step::Frame { pong: None, compressed: true });
        }
        let payload: &[u8] = if f.rsv1 {
            let reset = self.ws.server_no_context_takeover;
            let inf = self.inflater.get_or_insert_with(|| Box::new(Inflater::new(reset)));
            inf.inflate(&f.payload, &mut self.scratch)?;
            self.inflated_frames += 1;
            &self.scratch
        } else {
            &f.payload
        };
        let mut pong = None;
        match self.proto {
            Proto::Roomcast => {
                for line in payload.split(|b| *b == b'\n') {
                    if line.starts_with(b"{\"type\":\"ping\"") {
                        pong = Some(&b"{\"type\":\"pong\"}"[..]);
                    } else if !line.is_empty() {
                        on_msg(line);
                    }
                }
            }
            Proto::Socketio => {
                if payload == b"2" {
                    pong = Some(&b"3"[..]);
                } else {
                    on_msg(payload);
                }
            }
        }
        Ok(Step::Frame { pong, compressed: false })
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    /// Reads until a message starts with `want` (returned); one starting with `fail` is an
    /// error. What follows it in the same frame is kept for the next [`Conn::read`].
    pub async fn wait_for(&mut self, want: &[u8], fail: &[u8]) -> anyhow::Result<String> {
        let mut v = self.wait_for_n(want, fail, 1).await?;
        v.pop().context("no reply")
    }

    /// Reads until `n` messages started with `want` (returned in order); one starting with
    /// `fail` is an error. Other messages before the last one are dropped; pings answered.
    pub async fn wait_for_n(&mut self, want: &[u8], fail: &[u8], n: usize) -> anyhow::Result<Vec<String>> {
        let mut found = Vec::with_capacity(n);
        while found.len() < n {
            let mut msgs: Vec<Vec<u8>> = Vec::new();
            let step = self.recv(|m| msgs.push(m.to_vec())).await?;
            let mut rest = msgs.into_iter();
            for m in rest.by_ref() {
                if m.starts_with(fail) {
                    anyhow::bail!("{}", String::from_utf8_lossy(&m));
                }
                if m.starts_with(want) {
                    found.push(String::from_utf8_lossy(&m).into_owned());
                    if found.len() == n {
                        break;
                    }
                }
            }
            self.pending.extend(rest);
            if found.len() < n
                && let Step::Closed { code } = step
            {
                anyhow::bail!(
                    "closed ({}) while waiting for {}",
                    code.map_or("no close code".into(), |c| c.to_string()),
                    String::from_utf8_lossy(want)
                );
            }
        }
        Ok(found)
    }

    /// Subscribes (roomcast) to more rooms, in one frame, and waits for every reply.
    pub async fn subscribe_all(&mut self, rooms: &[String]) -> anyhow::Result<()> {
        if rooms.is_empty() {
            return Ok(());
        }
        let cmds: Vec<String> = rooms
            .iter()
            .enumerate()
            .map(|(k, r)| format!("{{\"type\":\"subscribe\",\"id\":{},\"room\":{}}}", k + 10, json_str(r)))
            .collect();
        self.ws.send_text(cmds.join("\n").as_bytes()).await?;
        self.wait_for_n(b"{\"type\":\"subscribed\"", b"{\"type\":\"error\"", rooms.len()).await?;
        Ok(())
    }

    /// [`Conn::read`], answering pings itself.
    pub async fn recv(&mut self, on_msg: impl FnMut(&[u8])) -> io::Result<Step> {
        let step = self.read(on_msg).await?;
        if let Step::Frame { pong: Some(p), .. } = step {
            send_pong(&mut self.ws.stream, p).await?;
        }
        Ok(step)
    }
}

/// Sends the answer to a ping (`b""`: a WebSocket pong frame).
pub async fn send_pong<W: AsyncWrite + Unpin>(w: &mut W, p: &[u8]) -> io::Result<()> {
    let mut out = Vec::with_capacity(p.len() + 6);
    rawws::client_frame(&mut out, if p.is_empty() { 0xA } else { 0x1 }, p);
    w.write_all(&out).await
}

/// Parses the unsigned number after `key` (e.g. `"t":`) in a message.
pub fn parse_num(msg: &[u8], key: &[u8]) -> Option<u64> {
    let at = memchr::memmem::find(msg, key)? + key.len();
    let mut v: u64 = 0;
    let mut any = false;
    for &b in &msg[at..] {
        if b.is_ascii_digit() {
            v = v.checked_mul(10)?.checked_add((b - b'0') as u64)?;
            any = true;
        } else {
            break;
        }
    }
    any.then_some(v)
}
