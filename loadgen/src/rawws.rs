//! A minimal WebSocket client for load generation: handshake, masked sends, frame
//! reads. Lean on purpose: the load generator shares the machine with the node, so each
//! delivery it counts must cost it as little as possible.

use std::io;
use std::net::{IpAddr, SocketAddr};

use base64::Engine as _;
use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// A connected WebSocket.
pub struct Ws {
    pub stream: TcpStream,
    /// Bytes read but not yet framed.
    pub buf: BytesMut,
}

/// One frame from the server.
pub struct Frame {
    pub opcode: u8,
    pub rsv1: bool,
    pub payload: BytesMut,
}

/// Opens a WebSocket to `addr` + `path`, from `source` when given.
pub async fn connect(
    addr: SocketAddr,
    path: &str,
    source: Option<IpAddr>,
    subprotocol: &str,
    deflate: bool,
) -> io::Result<Ws> {
    let sock = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    if let Some(src) = source {
        sock.bind(SocketAddr::new(src, 0))?;
    }
    let mut stream = sock.connect(addr).await?;
    stream.set_nodelay(true)?;
    let key = base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 16]>());
    let ext =
        if deflate { "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n" } else { "" };
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: {subprotocol}\r\n{ext}\r\n"
    );
    stream.write_all(req.as_bytes()).await?;
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        if stream.read_buf(&mut buf).await? == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed during handshake"));
        }
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            if !head.starts_with("HTTP/1.1 101") {
                return Err(io::Error::other(format!(
                    "upgrade refused: {}",
                    head.lines().next().unwrap_or("")
                )));
            }
            buf.advance(end + 4);
            return Ok(Ws { stream, buf: BytesMut::from(&buf[..]) });
        }
        if buf.len() > 16 * 1024 {
            return Err(io::Error::other("handshake response too long"));
        }
    }
}

/// Appends a masked client frame (the mask key is zero: legal, and free to apply).
pub fn client_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    out.push(0x80 | opcode);
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= u16::MAX as usize {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(payload);
}

impl Ws {
    /// Sends one text frame.
    pub async fn send_text(&mut self, payload: &[u8]) -> io::Result<()> {
        let mut out = Vec::with_capacity(payload.len() + 14);
        client_frame(&mut out, 0x1, payload);
        self.stream.write_all(&out).await
    }

    /// Reads the next frame; `None` at end of stream.
    pub async fn next_frame(&mut self) -> io::Result<Option<Frame>> {
        loop {
            if let Some(f) = self.take_frame()? {
                return Ok(Some(f));
            }
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return Ok(None);
            }
        }
    }

    fn take_frame(&mut self) -> io::Result<Option<Frame>> {
        let b = &self.buf;
        if b.len() < 2 {
            return Ok(None);
        }
        let (len, hdr) = match b[1] & 0x7f {
            126 if b.len() >= 4 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
            127 if b.len() >= 10 => {
                let mut a = [0u8; 8];
                a.copy_from_slice(&b[2..10]);
                (u64::from_be_bytes(a) as usize, 10)
            }
            126 | 127 => return Ok(None),
            l => (l as usize, 2),
        };
        if b.len() < hdr + len {
            self.buf.reserve(hdr + len - b.len());
            return Ok(None);
        }
        let opcode = b[0] & 0x0f;
        let rsv1 = b[0] & 0x40 != 0;
        self.buf.advance(hdr);
        let payload = self.buf.split_to(len);
        Ok(Some(Frame { opcode, rsv1, payload }))
    }

    /// Reads frames until one holds a message of `type` (JSON); returns that line.
    pub async fn wait_for(&mut self, ty: &str) -> io::Result<String> {
        let needle = format!("\"type\":\"{ty}\"");
        loop {
            let Some(f) = self.next_frame().await? else {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("closed while waiting for {ty}"),
                ));
            };
            if f.opcode == 0x8 {
                return Err(io::Error::other(format!("closed while waiting for {ty}")));
            }
            for line in f.payload[..].split(|c| *c == b'\n') {
                let s = String::from_utf8_lossy(line);
                if s.contains(&needle) {
                    return Ok(s.to_string());
                }
            }
        }
    }
}

/// Raises this process's open-file limit to its hard limit; returns the new soft limit.
#[allow(unsafe_code)]
pub fn raise_fd_limit() -> u64 {
    // SAFETY: getrlimit/setrlimit with a valid, initialised struct.
    unsafe {
        let mut rl = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) != 0 {
            return 0;
        }
        rl.rlim_cur = rl.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &rl);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl);
        rl.rlim_cur
    }
}
