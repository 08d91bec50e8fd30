//! The opening handshake: what the client offered, what the node answers.

use base64::Engine as _;
use http::HeaderMap;
use roomcast_protocol::Encoding;
use sha1::{Digest, Sha1};
use thiserror::Error;

const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// The answer to the extension offer sent back to the client.
pub const DEFLATE_RESPONSE: &str =
    "permessage-deflate; server_no_context_takeover; client_no_context_takeover";
/// The same, to an offer that named `server_max_window_bits` (RFC 7692 7.1.2.1: a server
/// accepting that parameter includes it in its response).
pub const DEFLATE_RESPONSE_WINDOW_BITS: &str =
    "permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=15";

/// Why an upgrade request was refused (HTTP 400 with this text; 426 for the version).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HandshakeError {
    #[error("not a WebSocket upgrade request")]
    NotUpgrade,
    #[error("unsupported Sec-WebSocket-Version (13 required)")]
    Version,
    #[error("missing or invalid Sec-WebSocket-Key")]
    Key,
    #[error("none of the offered subprotocols is supported (use roomcast.v1.json or roomcast.v1.msgpack)")]
    Subprotocol,
}

/// What was agreed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    pub encoding: Encoding,
    /// The subprotocol to name in the response (none when the client offered none).
    pub subprotocol: Option<&'static str>,
    /// permessage-deflate is on.
    pub deflate: bool,
    /// The accepted deflate offer named `server_max_window_bits` (so must the response).
    pub deflate_window_bits: bool,
    /// The `Sec-WebSocket-Accept` value.
    pub accept: String,
}

fn header_has_token(headers: &HeaderMap, name: &str, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Validates an upgrade request and negotiates.
pub fn negotiate(headers: &HeaderMap, compression: bool) -> Result<Negotiated, HandshakeError> {
    if !header_has_token(headers, "upgrade", "websocket")
        || !header_has_token(headers, "connection", "upgrade")
    {
        return Err(HandshakeError::NotUpgrade);
    }
    if headers.get("sec-websocket-version").and_then(|v| v.to_str().ok()).map(str::trim) != Some("13") {
        return Err(HandshakeError::Version);
    }
    let key = headers
        .get("sec-websocket-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .ok_or(HandshakeError::Key)?;
    match base64::engine::general_purpose::STANDARD.decode(key) {
        Ok(k) if k.len() == 16 => {}
        _ => return Err(HandshakeError::Key),
    }
    let mut h = Sha1::new();
    h.update(key.as_bytes());
    h.update(GUID.as_bytes());
    let accept = base64::engine::general_purpose::STANDARD.encode(h.finalize());

    let offered: Vec<&str> = headers
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    let (encoding, subprotocol) = if offered.is_empty() {
        (Encoding::Json, None)
    } else {
        // The client's order is its preference.
        let enc =
            offered.iter().find_map(|p| Encoding::from_subprotocol(p)).ok_or(HandshakeError::Subprotocol)?;
        (enc, Some(enc.subprotocol()))
    };

    let accepted = if compression { acceptable_deflate_offer(headers) } else { None };
    Ok(Negotiated {
        encoding,
        subprotocol,
        deflate: accepted.is_some(),
        deflate_window_bits: accepted == Some(true),
        accept,
    })
}

/// The first permessage-deflate offer that can be accepted with no context takeover and
/// a 15-bit window: `Some(named_server_max_window_bits)`, or `None` when there is none.
fn acceptable_deflate_offer(headers: &HeaderMap) -> Option<bool> {
    let offers = headers
        .get_all("sec-websocket-extensions")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim);
    for offer in offers {
        let mut parts = offer.split(';').map(str::trim);
        if parts.next() != Some("permessage-deflate") {
            continue;
        }
        let mut ok = true;
        let mut window_bits = false;
        for p in parts {
            let (name, value) = match p.split_once('=') {
                Some((n, v)) => (n.trim(), Some(v.trim().trim_matches('"'))),
                None => (p, None),
            };
            match name {
                "server_no_context_takeover" | "client_no_context_takeover" | "client_max_window_bits" => {}
                // The compressor always uses a 15-bit window.
                "server_max_window_bits" => {
                    ok &= value == Some("15");
                    window_bits = true;
                }
                _ => ok = false,
            }
        }
        if ok {
            return Some(window_bits);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn req(protocols: Option<&str>, ext: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        h.insert("connection", HeaderValue::from_static("keep-alive, Upgrade"));
        h.insert("sec-websocket-version", HeaderValue::from_static("13"));
        h.insert("sec-websocket-key", HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ=="));
        if let Some(p) = protocols {
            h.insert("sec-websocket-protocol", HeaderValue::from_str(p).unwrap());
        }
        if let Some(e) = ext {
            h.insert("sec-websocket-extensions", HeaderValue::from_str(e).unwrap());
        }
        h
    }

    #[test]
    fn rfc_accept_key() {
        let n = negotiate(&req(None, None), true).unwrap();
        assert_eq!(n.accept, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        assert_eq!((n.encoding, n.subprotocol, n.deflate), (Encoding::Json, None, false));
    }

    #[test]
    fn subprotocols() {
        let n = negotiate(&req(Some("foo, roomcast.v1.msgpack, roomcast.v1.json"), None), true).unwrap();
        assert_eq!((n.encoding, n.subprotocol), (Encoding::Msgpack, Some("roomcast.v1.msgpack")));
        assert_eq!(negotiate(&req(Some("foo, bar"), None), true), Err(HandshakeError::Subprotocol));
    }

    #[test]
    fn deflate_offers() {
        let on = |e: &str| negotiate(&req(None, Some(e)), true).unwrap().deflate;
        assert!(on("permessage-deflate; client_max_window_bits"));
        assert!(on("permessage-deflate; server_max_window_bits=10, permessage-deflate"));
        assert!(!on("permessage-deflate; server_max_window_bits=10"));
        assert!(!on("x-webkit-deflate-frame"));
        assert!(!negotiate(&req(None, Some("permessage-deflate")), false).unwrap().deflate);
        // An accepted server_max_window_bits is echoed (RFC 7692 7.1.2.1).
        let n = negotiate(&req(None, Some("permessage-deflate; server_max_window_bits=15")), true).unwrap();
        assert!(n.deflate && n.deflate_window_bits);
        let n = negotiate(&req(None, Some("permessage-deflate; client_max_window_bits")), true).unwrap();
        assert!(n.deflate && !n.deflate_window_bits);
    }
}
