//! The connection task: drives one WebSocket. Reads frames into messages for the
//! [`Session`], writes the session's outbound queue as frames, and keeps the timers
//! (handshake, ping/pong, close). Reading and writing proceed concurrently in one task,
//! and no buffer is held while the connection is idle.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Poll, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use roomcast_protocol::{CloseCode, Encoding, Push, ServerMessage};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::{Instant, sleep_until};
use tracing::Instrument;

use crate::limits::LimitCounters;
use crate::node::Node;
use crate::outbound::Encoded;
use crate::session::{Flow, Session};
use crate::ws::frame::{self, FrameError, Incoming, MessageReader};
use crate::ws::handshake::Negotiated;

/// How long a closing connection may take to flush before it is dropped.
const CLOSE_FLUSH: Duration = Duration::from_secs(2);
/// How long a connection closed by the node keeps reading (and discarding) what the client
/// still sends, until the client closes its side, and at most how many bytes. Dropping a
/// socket with unread input makes the kernel answer with a reset, and the client may then
/// lose the `disconnect` and close frame it has not read yet.
const CLOSE_LINGER: Duration = Duration::from_secs(2);
const CLOSE_LINGER_BYTES: usize = 1 << 20;
/// Largest coalesced uncompressed frame.
const MAX_COALESCED: usize = 64 * 1024;

/// Reads what is available into `buf`. Uses a stack buffer when `buf` has no room, so
/// that an idle connection holds no read buffer. Cancel safe.
async fn read_some<R: AsyncRead + Unpin>(rd: &mut R, buf: &mut BytesMut) -> io::Result<usize> {
    poll_fn(|cx| {
        if buf.capacity() - buf.len() >= 4096 {
            let n = ready!(tokio_util::io::poll_read_buf(Pin::new(&mut *rd), cx, buf))?;
            return Poll::Ready(Ok(n));
        }
        let mut stack = [0u8; 8192];
        let mut rb = ReadBuf::new(&mut stack);
        ready!(Pin::new(&mut *rd).poll_read(cx, &mut rb))?;
        buf.extend_from_slice(rb.filled());
        Poll::Ready(Ok(rb.filled().len()))
    })
    .await
}

/// Appends queued messages as frames: small (or, without deflate, all) messages are
/// coalesced into one frame; with deflate, larger ones go in their own compressed frame
/// whose bytes are shared with every other subscriber.
fn write_messages(out: &mut Vec<u8>, enc: Encoding, deflate: Option<usize>, msgs: &[Arc<Encoded>]) {
    let opcode = if enc.is_binary() { frame::OP_BINARY } else { frame::OP_TEXT };
    let sep = enc.separator();
    let mut batch: Vec<&Bytes> = Vec::new();
    let mut batch_len = 0;
    let flush = |out: &mut Vec<u8>, batch: &mut Vec<&Bytes>, batch_len: &mut usize| {
        if batch.is_empty() {
            return;
        }
        frame::write_header(out, opcode, false, *batch_len);
        for (i, m) in batch.iter().enumerate() {
            if i > 0 {
                out.extend_from_slice(sep);
            }
            out.extend_from_slice(m);
        }
        batch.clear();
        *batch_len = 0;
    };
    for m in msgs {
        let raw = m.raw();
        if let Some(min) = deflate
            && raw.len() >= min
        {
            flush(out, &mut batch, &mut batch_len);
            frame::write_frame(out, opcode, true, m.deflated());
            continue;
        }
        let add = raw.len() + if batch.is_empty() { 0 } else { sep.len() };
        if batch_len + add > MAX_COALESCED && !batch.is_empty() {
            flush(out, &mut batch, &mut batch_len);
            batch_len = raw.len();
        } else {
            batch_len += add;
        }
        batch.push(raw);
    }
    flush(out, &mut batch, &mut batch_len);
}

/// Serves one upgraded connection until it closes.
pub async fn serve<R, W>(
    node: Arc<Node>,
    rd: R,
    wr: W,
    leftover: Bytes,
    neg: Negotiated,
    remote: Option<std::net::SocketAddr>,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut session = Session::new(node.clone(), neg.encoding);
    if remote.is_some_and(|a| node.limits.is_exempt(a.ip())) {
        session.exempt_from_command_rate();
    }
    let span = tracing::info_span!(
        "conn",
        client = %session.client(),
        remote = remote.map(|a| a.to_string()).unwrap_or_default(),
        encoding = ?neg.encoding,
        deflate = neg.deflate,
    );
    run(node, session, rd, wr, leftover, neg).instrument(span).await
}

async fn run<R, W>(
    node: Arc<Node>,
    mut session: Session,
    mut rd: R,
    mut wr: W,
    leftover: Bytes,
    neg: Negotiated,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let cfg = node.config.clone();
    let enc = neg.encoding;
    let deflate = neg.deflate.then_some(cfg.compression_min_size);
    let mut reader = MessageReader::new(cfg.max_message_size, neg.deflate);
    let mut rbuf = BytesMut::new();
    rbuf.extend_from_slice(&leftover);
    drop(leftover);
    // Bytes of whole frames being written, and how far.
    let mut wbuf: Vec<u8> = Vec::new();
    let mut wpos = 0usize;
    let mut reading = true;
    let mut close_sent = false;
    let mut shutdown_seen = false;
    // The client's side is closed or broken: nothing to linger for.
    let mut peer_gone = false;

    let now = Instant::now();
    let mut handshake_deadline = Some(now + Duration::from_millis(cfg.handshake_timeout_ms));
    let mut next_ping: Option<Instant> = None;
    let mut pong_deadline: Option<Instant> = None;
    let mut close_deadline: Option<Instant> = None;
    // When the connection token expires (close 4004 unless refreshed).
    let mut expiry_deadline: Option<Instant> = None;
    // Server-side actions (backend API) for this session.
    let mut actions = session.take_actions();
    let timer = sleep_until(now + Duration::from_secs(86_400));
    tokio::pin!(timer);
    tracing::debug!("connection open");

    'conn: loop {
        // Fill the write buffer when it is idle.
        if wpos == wbuf.len() && !close_sent {
            let (msgs, close) = session.outbound().take();
            if !msgs.is_empty() {
                wbuf.clear();
                wpos = 0;
                let msgs: Vec<Arc<Encoded>> = msgs.into();
                write_messages(&mut wbuf, enc, deflate, &msgs);
            }
            if let Some(code) = close {
                if wpos != 0 {
                    wbuf.clear();
                    wpos = 0;
                }
                let (msg, number, reason) = match session.outbound().custom_close() {
                    Some(d) => (
                        ServerMessage::Push(Push::Disconnect {
                            code: d.code,
                            reason: d.reason.clone(),
                            reconnect: d.reconnect,
                        }),
                        d.code,
                        std::borrow::Cow::Owned(d.reason),
                    ),
                    None => (ServerMessage::disconnect(code), code.number(), code.reason().into()),
                };
                if let Ok(bytes) = roomcast_protocol::Encode::encode(&msg, enc) {
                    write_messages(&mut wbuf, enc, None, &[Encoded::new(bytes)]);
                }
                frame::write_close(&mut wbuf, number, &reason);
                close_sent = true;
                reading = false;
                close_deadline.get_or_insert(Instant::now() + CLOSE_FLUSH);
                tracing::debug!(code = code.number(), "closing");
            }
        } else if session.outbound().close_requested().is_some() && close_deadline.is_none() {
            // Closing while a write is stuck: give it a bounded time.
            close_deadline = Some(Instant::now() + CLOSE_FLUSH);
        }
        if close_sent && wpos == wbuf.len() {
            break 'conn;
        }

        let next = [handshake_deadline, next_ping, pong_deadline, close_deadline, expiry_deadline]
            .into_iter()
            .flatten()
            .min();
        if let Some(n) = next
            && timer.deadline() != n
        {
            timer.as_mut().reset(n);
        }

        tokio::select! {
            biased;
            _ = node.shutdown.cancelled(), if !shutdown_seen => {
                shutdown_seen = true;
                session.outbound().close(CloseCode::Shutdown);
            }
            r = wr.write(&wbuf[wpos..]), if wpos < wbuf.len() => match r {
                Ok(0) | Err(_) => {
                    peer_gone = true;
                    break 'conn;
                }
                Ok(n) => {
                    wpos += n;
                    if wpos == wbuf.len() {
                        // Release the buffer: idle connections hold none.
                        wbuf = Vec::new();
                        wpos = 0;
                        if close_sent {
                            break 'conn;
                        }
                    }
                }
            },
            r = read_some(&mut rd, &mut rbuf), if reading => match r {
                Ok(0) | Err(_) => {
                    peer_gone = true;
                    break 'conn;
                }
                Ok(_) => loop {
                    match reader.next(&mut rbuf) {
                        Ok(None) => {
                            if rbuf.is_empty() {
                                rbuf = BytesMut::new();
                            }
                            break;
                        }
                        Err(FrameError::TooLarge(_)) => {
                            LimitCounters::inc(&node.limits.counters.messages_too_large);
                            session.outbound().close(CloseCode::MessageTooLarge);
                            reading = false;
                            break;
                        }
                        Err(FrameError::Protocol(why)) => {
                            tracing::debug!(reason = why, "framing violation");
                            session.outbound().close(CloseCode::ProtocolViolation);
                            reading = false;
                            break;
                        }
                        Ok(Some(Incoming::Ping(payload))) => frame::write_frame(&mut wbuf, frame::OP_PONG, false, &payload),
                        Ok(Some(Incoming::Pong)) => {}
                        Ok(Some(Incoming::Close(code))) => {
                            tracing::debug!(code, "client closed");
                            frame::write_close(&mut wbuf, code.filter(|c| *c >= 1000).unwrap_or(1000), "");
                            close_sent = true;
                            reading = false;
                            close_deadline = Some(Instant::now() + CLOSE_FLUSH);
                            break;
                        }
                        Ok(Some(Incoming::Message { binary, payload })) => {
                            if binary != enc.is_binary() {
                                session.outbound().close(CloseCode::ProtocolViolation);
                                reading = false;
                                break;
                            }
                            let was_connected = session.is_connected();
                            let flow = session.handle_message(&payload).await;
                            if !was_connected && session.is_connected() {
                                handshake_deadline = None;
                                next_ping = Some(Instant::now() + Duration::from_millis(cfg.ping_ms));
                            }
                            if session.take_pong() {
                                pong_deadline = None;
                            }
                            expiry_deadline = session.expires_at();
                            if let Flow::Close(code) = flow {
                                session.outbound().close(code);
                                reading = false;
                                break;
                            }
                        }
                    }
                },
            },
            _ = session.outbound().notified() => {}
            a = async { actions.as_mut()?.recv().await }, if actions.is_some() && reading => match a {
                Some(action) => session.handle_action(action).await,
                None => actions = None,
            },
            _ = &mut timer, if next.is_some() => {
                let now = Instant::now();
                if close_deadline.is_some_and(|d| d <= now) {
                    tracing::debug!("close did not flush in time");
                    break 'conn;
                }
                if handshake_deadline.is_some_and(|d| d <= now) {
                    handshake_deadline = None;
                    LimitCounters::inc(&node.limits.counters.handshake_timeouts);
                    session.outbound().close(CloseCode::HandshakeTimeout);
                }
                if expiry_deadline.is_some_and(|d| d <= now) {
                    expiry_deadline = None;
                    LimitCounters::inc(&node.limits.counters.tokens_expired);
                    session.outbound().close(CloseCode::TokenExpired);
                }
                if pong_deadline.is_some_and(|d| d <= now) {
                    pong_deadline = None;
                    LimitCounters::inc(&node.limits.counters.pong_timeouts);
                    session.outbound().close(CloseCode::PongTimeout);
                }
                if next_ping.is_some_and(|d| d <= now) {
                    session.send(&ServerMessage::Push(Push::Ping));
                    if pong_deadline.is_none() {
                        pong_deadline = Some(now + Duration::from_millis(cfg.pong_timeout_ms));
                    }
                    next_ping = Some(now + Duration::from_millis(cfg.ping_ms));
                }
            }
        }
    }
    session.outbound().shut();
    session.close().await;
    let _ = tokio::time::timeout(Duration::from_millis(500), wr.shutdown()).await;
    if !peer_gone {
        drop(rbuf);
        linger(&mut rd).await;
    }
    tracing::debug!("connection closed");
}

/// After the node's close frame and FIN: reads and discards what the client still sends
/// until it closes its side ([`CLOSE_LINGER`], [`CLOSE_LINGER_BYTES`] at most), so that
/// the socket is not dropped with unread input (see [`CLOSE_LINGER`]).
async fn linger<R: AsyncRead + Unpin>(rd: &mut R) {
    use tokio::io::AsyncReadExt as _;
    let deadline = Instant::now() + CLOSE_LINGER;
    let mut scratch = [0u8; 4096];
    let mut total = 0usize;
    while total < CLOSE_LINGER_BYTES {
        match tokio::time::timeout_at(deadline, rd.read(&mut scratch)).await {
            Ok(Ok(n)) if n > 0 => total += n,
            _ => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coalesces_small_and_compresses_large_once() {
        let small: Vec<Arc<Encoded>> =
            (0..3).map(|i| Encoded::new(Bytes::from(format!("{{\"n\":{i}}}")))).collect();
        let mut out = Vec::new();
        write_messages(&mut out, Encoding::Json, None, &small);
        let h = frame::parse_header(&out).unwrap().unwrap();
        assert_eq!(&out[h.header_len..], b"{\"n\":0}\n{\"n\":1}\n{\"n\":2}");

        let big = Encoded::new(Bytes::from(vec![b'a'; 1000]));
        let mut out = Vec::new();
        write_messages(
            &mut out,
            Encoding::Json,
            Some(256),
            &[small[0].clone(), big.clone(), small[1].clone()],
        );
        let h1 = frame::parse_header(&out).unwrap().unwrap();
        assert!(!h1.rsv1);
        let rest = &out[h1.header_len + h1.len as usize..];
        let h2 = frame::parse_header(rest).unwrap().unwrap();
        assert!(h2.rsv1);
        assert_eq!(&rest[h2.header_len..h2.header_len + h2.len as usize], &big.deflated()[..]);
    }
}
