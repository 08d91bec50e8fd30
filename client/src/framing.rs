//! Framing layer: the WebSocket itself (tokio-tungstenite). Opens it with the encoding's
//! subprotocol, sends frames, and turns what the socket yields into [`Incoming`]. Knows
//! nothing of roomcast messages.

use std::time::Duration;

use bytes::Bytes;
use futures_util::SinkExt;
use roomcast_protocol::Encoding;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::ClientError;

/// An open WebSocket to a node.
pub(crate) type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Largest message accepted from a node (after reassembly). The node's own limit on what
/// it accepts is 128 KiB; what it sends may coalesce many messages.
const MAX_INCOMING_MESSAGE: usize = 16 << 20;

/// Opens a WebSocket to `url`, offering the encoding's subprotocol, within `timeout`.
pub(crate) async fn open(url: &str, enc: Encoding, timeout: Duration) -> Result<Ws, ClientError> {
    let err = |reason: String| ClientError::Connect { url: url.to_string(), reason };
    let mut req = url.into_client_request().map_err(|e| err(e.to_string()))?;
    req.headers_mut().insert("Sec-WebSocket-Protocol", HeaderValue::from_static(enc.subprotocol()));
    let cfg = WebSocketConfig::default().max_message_size(Some(MAX_INCOMING_MESSAGE));
    let (ws, resp) =
        tokio::time::timeout(timeout, tokio_tungstenite::connect_async_with_config(req, Some(cfg), true))
            .await
            .map_err(|_| err(format!("no WebSocket handshake within {timeout:?}")))?
            .map_err(|e| err(describe(e)))?;
    // tungstenite already refused a subprotocol we did not offer; check we got ours.
    let chosen = resp.headers().get("Sec-WebSocket-Protocol").and_then(|v| v.to_str().ok());
    if chosen != Some(enc.subprotocol()) {
        return Err(err(format!("node chose subprotocol {chosen:?}, wanted {}", enc.subprotocol())));
    }
    Ok(ws)
}

fn describe(e: WsError) -> String {
    match e {
        WsError::Http(resp) => {
            let body = resp
                .body()
                .as_deref()
                .map(|b| String::from_utf8_lossy(&b[..b.len().min(200)]).into_owned())
                .unwrap_or_default();
            format!("HTTP {}: {}", resp.status(), body.trim())
        }
        e => e.to_string(),
    }
}

/// Sends frames, in order, as text (JSON) or binary (MessagePack) messages, then flushes.
pub(crate) async fn send(ws: &mut Ws, enc: Encoding, frames: Vec<Vec<u8>>) -> Result<(), String> {
    for f in frames {
        let msg = if enc.is_binary() {
            Message::Binary(Bytes::from(f))
        } else {
            // Our JSON encoder writes UTF-8 only; a failure here would be a bug, not input.
            match Utf8Bytes::try_from(f) {
                Ok(t) => Message::Text(t),
                Err(e) => {
                    tracing::error!(error = %e, "encoded JSON frame is not UTF-8; dropped");
                    continue;
                }
            }
        };
        ws.feed(msg).await.map_err(|e| e.to_string())?;
    }
    ws.flush().await.map_err(|e| e.to_string())
}

/// What reading the socket gave.
#[derive(Debug)]
pub(crate) enum Incoming {
    /// A data frame (one or more roomcast messages).
    Frame { binary: bool, data: Bytes },
    /// A WebSocket ping or pong: proof of life, nothing to handle.
    Control,
    /// The connection is over: a close frame (with its code) or an error or EOF.
    Closed { code: Option<u16>, reason: String },
}

/// Classifies one item of the socket's stream.
pub(crate) fn classify(item: Option<Result<Message, WsError>>) -> Incoming {
    match item {
        Some(Ok(Message::Text(t))) => Incoming::Frame { binary: false, data: Bytes::from(t) },
        Some(Ok(Message::Binary(b))) => Incoming::Frame { binary: true, data: b },
        Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => Incoming::Control,
        Some(Ok(Message::Close(frame))) => match frame {
            Some(f) => {
                Incoming::Closed { code: Some(u16::from(f.code)), reason: f.reason.as_str().to_string() }
            }
            None => Incoming::Closed { code: None, reason: "closed by the node without a code".into() },
        },
        Some(Err(e)) => Incoming::Closed { code: None, reason: e.to_string() },
        None => Incoming::Closed { code: None, reason: "connection closed".into() },
    }
}

/// Closes the socket with `code`, best effort and briefly: a dead peer must not hold the
/// driver.
pub(crate) async fn close(ws: &mut Ws, code: u16, reason: &str) {
    let frame = CloseFrame {
        code: WsCloseCode::from(code),
        reason: Utf8Bytes::from(reason.chars().take(100).collect::<String>()),
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(Some(frame))).await;
}
