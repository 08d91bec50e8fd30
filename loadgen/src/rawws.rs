//! A minimal WebSocket client for load generation: handshake, masked sends, frame
//! reads. Lean on purpose: the load generator shares the machine with the node, so each
//! delivery it counts must cost it as little as possible.

use std::io;
use std::net::{IpAddr, SocketAddr};

use base64::Engine as _;
use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpSocket, TcpStream};

/// A connected WebSocket (or the read half of one).
pub struct Ws<S = TcpStream> {
    pub stream: S,
    /// Bytes read but not yet framed.
    pub buf: BytesMut,
    /// Every byte read from the socket, the handshake response included.
    pub bytes_read: u64,
    /// permessage-deflate was negotiated.
    pub deflate: bool,
    /// The server resets its compressor after each message (`server_no_context_takeover`).
    pub server_no_context_takeover: bool,
}

/// One frame from the server.
pub struct Frame {
    pub opcode: u8,
    pub rsv1: bool,
    pub payload: BytesMut,
    /// Bytes of the frame on the wire, header included.
    pub wire_len: usize,
}

/// What to send in the upgrade request.
pub struct Upgrade<'a> {
    /// `Sec-WebSocket-Protocol`, when one is offered.
    pub subprotocol: Option<&'a str>,
    /// Offer permessage-deflate.
    pub deflate: bool,
}

/// Opens a WebSocket to `addr` + `path` (which may hold a query), from `source` when given.
pub async fn connect(
    addr: SocketAddr,
    path: &str,
    source: Option<IpAddr>,
    up: &Upgrade<'_>,
) -> io::Result<Ws> {
    let sock = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    if let Some(src) = source {
        sock.bind(SocketAddr::new(src, 0))?;
    }
    let mut stream = sock.connect(addr).await?;
    stream.set_nodelay(true)?;
    let key = base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 16]>());
    let ext = if up.deflate {
        "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
    } else {
        ""
    };
    let proto = up.subprotocol.map(|p| format!("Sec-WebSocket-Protocol: {p}\r\n")).unwrap_or_default();
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{proto}{ext}\r\n"
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
            let ext = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.trim().eq_ignore_ascii_case("sec-websocket-extensions").then(|| v.to_ascii_lowercase())
                })
                .unwrap_or_default();
            let bytes_read = buf.len() as u64;
            buf.advance(end + 4);
            return Ok(Ws {
                stream,
                buf: BytesMut::from(&buf[..]),
                bytes_read,
                deflate: ext.contains("permessage-deflate"),
                server_no_context_takeover: ext.contains("server_no_context_takeover"),
            });
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

impl Ws<TcpStream> {
    /// Splits into a reading WebSocket and the raw write half (write with [`client_frame`]).
    pub fn into_split(self) -> (Ws<OwnedReadHalf>, OwnedWriteHalf) {
        let (rd, wr) = self.stream.into_split();
        (
            Ws {
                stream: rd,
                buf: self.buf,
                bytes_read: self.bytes_read,
                deflate: self.deflate,
                server_no_context_takeover: self.server_no_context_takeover,
            },
            wr,
        )
    }
}

impl<S: AsyncWrite + Unpin> Ws<S> {
    /// Sends one text frame.
    pub async fn send_text(&mut self, payload: &[u8]) -> io::Result<()> {
        let mut out = Vec::with_capacity(payload.len() + 14);
        client_frame(&mut out, 0x1, payload);
        self.stream.write_all(&out).await
    }
}

impl<S: AsyncRead + Unpin> Ws<S> {
    /// Reads the next frame; `None` at end of stream.
    pub async fn next_frame(&mut self) -> io::Result<Option<Frame>> {
        loop {
            if let Some(f) = self.take_frame()? {
                return Ok(Some(f));
            }
            let n = self.stream.read_buf(&mut self.buf).await?;
            if n == 0 {
                return Ok(None);
            }
            self.bytes_read += n as u64;
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
        Ok(Some(Frame { opcode, rsv1, payload, wire_len: hdr + len }))
    }
}

/// Inflates permessage-deflate messages. Keeps its window across messages unless the server
/// resets its own after each (`server_no_context_takeover`), in which case it resets too.
pub struct Inflater {
    d: flate2::Decompress,
    reset_each: bool,
    input: Vec<u8>,
}

impl Inflater {
    pub fn new(reset_each: bool) -> Self {
        Inflater { d: flate2::Decompress::new(false), reset_each, input: Vec::new() }
    }

    /// Inflates one message into `out` (cleared first).
    pub fn inflate(&mut self, p: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
        out.clear();
        if self.reset_each {
            self.d.reset(false);
        }
        self.input.clear();
        self.input.extend_from_slice(p);
        self.input.extend_from_slice(&[0, 0, 0xff, 0xff]);
        out.reserve(p.len() * 4 + 64);
        let start_in = self.d.total_in();
        loop {
            let consumed = (self.d.total_in() - start_in) as usize;
            let before_out = out.len();
            self.d
                .decompress_vec(&self.input[consumed..], out, flate2::FlushDecompress::Sync)
                .map_err(|e| io::Error::other(format!("inflate: {e}")))?;
            let consumed_now = (self.d.total_in() - start_in) as usize;
            if consumed_now >= self.input.len() && out.len() < out.capacity() {
                return Ok(());
            }
            if consumed_now == consumed && out.len() == before_out && out.len() < out.capacity() {
                return Err(io::Error::other("inflate made no progress"));
            }
            out.reserve(out.capacity().max(1024));
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

/// Clock ticks per second of `/proc/PID/stat` CPU times.
#[allow(unsafe_code)]
pub fn clock_ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no memory safety requirements.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}
