//! A hand-rolled WebSocket client for what tungstenite does not expose: the raw HTTP
//! answer to an upgrade, frame headers (RSV1), permessage-deflate payloads.

use std::net::SocketAddr;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::{RECV_TIMEOUT, within};

pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// An HTTP response head and body.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The first header with this (case-insensitive) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str())
    }
}

/// A frame from the node.
#[derive(Debug, Clone)]
pub struct RawFrame {
    pub fin: bool,
    pub rsv1: bool,
    pub opcode: u8,
    pub payload: Vec<u8>,
}

/// A WebSocket connection driven byte by byte.
#[derive(Debug)]
pub struct RawWs {
    stream: TcpStream,
    buf: Vec<u8>,
    mask_seed: u32,
}

/// Sends an upgrade request to `GET /ws` with the usual headers plus `extra`. Returns the
/// response, and the connection when it was upgraded (101).
pub async fn upgrade(addr: SocketAddr, extra: &[(&str, &str)]) -> (HttpResponse, Option<RawWs>) {
    let mut stream = within(RECV_TIMEOUT, "TCP connect", TcpStream::connect(addr)).await.expect("connect");
    let mut req =
        format!("GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n");
    // The usual headers, unless `extra` gives its own.
    for (k, v) in [("Sec-WebSocket-Version", "13"), ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")] {
        if !extra.iter().any(|(e, _)| e.eq_ignore_ascii_case(k)) {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
    }
    for (k, v) in extra {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes()).await.expect("write request");
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = within(RECV_TIMEOUT, "the HTTP response", stream.read(&mut chunk)).await.expect("read");
        assert!(n > 0, "connection closed before the response head: {:?}", String::from_utf8_lossy(&buf));
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8(buf[..head_end].to_vec()).expect("ASCII head");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut rest = buf[head_end..].to_vec();
    let mut resp = HttpResponse { status, headers, body: Vec::new() };
    if status == 101 {
        return (resp, Some(RawWs { stream, buf: rest, mask_seed: 0x1234_5678 }));
    }
    let len: usize = resp.header("content-length").and_then(|l| l.parse().ok()).unwrap_or(0);
    while rest.len() < len {
        let mut chunk = [0u8; 4096];
        let n = within(RECV_TIMEOUT, "the HTTP body", stream.read(&mut chunk)).await.expect("read");
        if n == 0 {
            break;
        }
        rest.extend_from_slice(&chunk[..n]);
    }
    resp.body = rest;
    (resp, None)
}

impl RawWs {
    /// Sends one masked frame (FIN set).
    pub async fn send_frame(&mut self, opcode: u8, rsv1: bool, payload: &[u8]) {
        self.send_frame_with(true, rsv1, opcode, payload, true).await;
    }

    /// Sends one frame with every header bit chosen: FIN, RSV1, the opcode (its low four
    /// bits; pass `0x20 | op` to set RSV2), and whether it is masked.
    pub async fn send_frame_with(&mut self, fin: bool, rsv1: bool, opcode: u8, payload: &[u8], masked: bool) {
        let mut out = vec![if fin { 0x80 } else { 0 } | if rsv1 { 0x40 } else { 0 } | opcode];
        let mask_bit = if masked { 0x80 } else { 0 };
        let len = payload.len();
        if len < 126 {
            out.push(mask_bit | len as u8);
        } else if len <= usize::from(u16::MAX) {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
        if masked {
            self.mask_seed = self.mask_seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            let mask = self.mask_seed.to_be_bytes();
            out.extend_from_slice(&mask);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
        } else {
            out.extend_from_slice(payload);
        }
        self.stream.write_all(&out).await.expect("write frame");
    }

    /// Reads JSON messages until the node's close frame. Returns the messages and the
    /// close code (`None` for a close frame without one).
    pub async fn read_json_until_close(&mut self) -> (Vec<serde_json::Value>, Option<u16>) {
        let mut msgs = Vec::new();
        loop {
            let f = self.read_frame().await;
            match f.opcode {
                OP_CLOSE => {
                    let code =
                        (f.payload.len() >= 2).then(|| u16::from_be_bytes([f.payload[0], f.payload[1]]));
                    return (msgs, code);
                }
                OP_TEXT => {
                    let payload = if f.rsv1 { inflate(&f.payload) } else { f.payload };
                    let text = String::from_utf8(payload).expect("UTF-8 from the node");
                    for line in text.split('\n').filter(|l| !l.is_empty()) {
                        msgs.push(serde_json::from_str(line).expect("JSON from the node"));
                    }
                }
                _ => {}
            }
        }
    }

    /// Sends a masked text frame; `false` when the connection no longer takes writes.
    pub async fn try_send_text(&mut self, text: &str) -> bool {
        self.mask_seed = self.mask_seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        let mask = self.mask_seed.to_be_bytes();
        let payload = text.as_bytes();
        assert!(payload.len() < 126, "short frames only");
        let mut out = vec![0x80 | OP_TEXT, 0x80 | payload.len() as u8];
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
        self.stream.write_all(&out).await.is_ok()
    }

    /// Sends a text frame.
    pub async fn send_text(&mut self, text: &str) {
        self.send_frame(OP_TEXT, false, text.as_bytes()).await;
    }

    /// The next frame from the node (5 s at most).
    pub async fn read_frame(&mut self) -> RawFrame {
        loop {
            if let Some((frame, used)) = parse_frame(&self.buf) {
                self.buf.drain(..used);
                return frame;
            }
            let mut chunk = [0u8; 16384];
            let n = within(RECV_TIMEOUT, "a frame", self.stream.read(&mut chunk)).await.expect("read");
            assert!(n > 0, "connection closed while reading a frame");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// Parses a server frame (unmasked) from the start of `buf`: the frame and the bytes it
/// took, or `None` when incomplete.
fn parse_frame(buf: &[u8]) -> Option<(RawFrame, usize)> {
    if buf.len() < 2 {
        return None;
    }
    let (b0, b1) = (buf[0], buf[1]);
    assert_eq!(b1 & 0x80, 0, "a server frame is masked");
    let (len, at) = match b1 & 0x7f {
        126 => (u16::from_be_bytes([*buf.get(2)?, *buf.get(3)?]) as usize, 4),
        127 => {
            let b: [u8; 8] = buf.get(2..10)?.try_into().ok()?;
            (u64::from_be_bytes(b) as usize, 10)
        }
        l => (usize::from(l), 2),
    };
    let payload = buf.get(at..at + len)?.to_vec();
    let frame = RawFrame { fin: b0 & 0x80 != 0, rsv1: b0 & 0x40 != 0, opcode: b0 & 0x0f, payload };
    Some((frame, at + len))
}

/// Inflates a permessage-deflate payload (RFC 7692: append `00 00 ff ff`, raw inflate).
pub fn inflate(payload: &[u8]) -> Vec<u8> {
    let mut input = payload.to_vec();
    input.extend_from_slice(&[0x00, 0x00, 0xff, 0xff]);
    let mut d = Decompress::new(false);
    let mut out = Vec::with_capacity(input.len() * 4 + 64);
    loop {
        let consumed = d.total_in() as usize;
        if out.capacity() - out.len() < 1024 {
            out.reserve(out.capacity());
        }
        let status = d
            .decompress_vec(&input[consumed..], &mut out, FlushDecompress::Sync)
            .expect("valid raw deflate data");
        // Done when all input is in and the output did not fill up (nothing pending).
        let all_in = d.total_in() as usize == input.len();
        if status == Status::StreamEnd || (all_in && out.len() < out.capacity()) {
            return out;
        }
    }
}

/// Deflates a message for permessage-deflate (raw deflate, sync flush, without the
/// trailing `00 00 ff ff`).
pub fn deflate(message: &[u8]) -> Vec<u8> {
    let mut c = Compress::new(Compression::default(), false);
    let mut out = Vec::with_capacity(message.len() + 64);
    loop {
        let consumed = c.total_in() as usize;
        if out.capacity() - out.len() < 1024 {
            out.reserve(out.capacity().max(1024));
        }
        c.compress_vec(&message[consumed..], &mut out, FlushCompress::Sync).expect("deflate");
        let all_in = c.total_in() as usize == message.len();
        if all_in && out.len() < out.capacity() && out.ends_with(&[0x00, 0x00, 0xff, 0xff]) {
            break;
        }
    }
    out.truncate(out.len() - 4);
    out
}
