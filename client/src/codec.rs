//! Protocol layer: requests to message bytes, messages to frames, frames to
//! [`ServerMessage`]s. No I/O and no state.

use bytes::Bytes;
use roomcast_protocol::{
    Encode, EncodeError, Encoding, Request, ServerMessage, Violation, decode_server_messages,
};

/// Largest frame the SDK builds by coalescing several messages (a single larger message
/// still goes alone). Kept well under the node's default 128 KiB message limit.
pub(crate) const MAX_COALESCED_FRAME: usize = 64 * 1024;

/// One request as message bytes.
pub(crate) fn encode(enc: Encoding, req: &Request) -> Result<Bytes, EncodeError> {
    req.encode(enc)
}

/// Packs encoded messages, in order, into as few frames as fit `max` bytes each.
pub(crate) fn frames(enc: Encoding, messages: Vec<Bytes>, max: usize) -> Vec<Vec<u8>> {
    let sep = enc.separator();
    let mut out: Vec<Vec<u8>> = Vec::new();
    let mut cur: Vec<u8> = Vec::new();
    for m in messages {
        if !cur.is_empty() && cur.len() + sep.len() + m.len() > max {
            out.push(std::mem::take(&mut cur));
        }
        if !cur.is_empty() {
            cur.extend_from_slice(sep);
        }
        cur.extend_from_slice(&m);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Decodes one frame from the node. A frame of the wrong kind (binary on a JSON
/// connection or the reverse) or one that cannot be split into messages is a
/// [`Violation`]: the connection is not to be trusted any more. A single message that
/// cannot be understood (unknown type, ill-typed field) is skipped with a warning.
pub(crate) fn decode(enc: Encoding, binary: bool, frame: &[u8]) -> Result<Vec<ServerMessage>, Violation> {
    if binary != enc.is_binary() {
        return Err(Violation(format!(
            "{} frame on a {enc:?} connection",
            if binary { "binary" } else { "text" }
        )));
    }
    let mut out = Vec::new();
    for item in decode_server_messages(enc, frame)? {
        match item {
            Ok(m) => out.push(m),
            Err(v) => tracing::warn!(error = %v, "skipping a message from the node"),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use roomcast_protocol::{Command, Push, decode_requests};

    fn pong(enc: Encoding) -> Bytes {
        encode(enc, &Request { id: None, command: Command::Pong }).unwrap()
    }

    #[test]
    fn coalesces_in_order_within_the_limit() {
        for enc in [Encoding::Json, Encoding::Msgpack] {
            let msgs: Vec<Bytes> = (0..10).map(|_| pong(enc)).collect();
            let one = msgs[0].len();
            let fs = frames(enc, msgs.clone(), 1 << 20);
            assert_eq!(fs.len(), 1);
            assert_eq!(decode_requests(enc, &fs[0]).len(), 10);
            // Room for three messages per frame.
            let limit = 3 * one + 2 * enc.separator().len();
            let fs = frames(enc, msgs, limit);
            assert_eq!(fs.len(), 4);
            assert!(fs.iter().all(|f| f.len() <= limit));
            let n: usize = fs.iter().map(|f| decode_requests(enc, f).len()).sum();
            assert_eq!(n, 10);
        }
        assert!(frames(Encoding::Json, Vec::new(), 10).is_empty());
    }

    #[test]
    fn wrong_frame_kind_is_a_violation_and_bad_messages_are_skipped() {
        assert!(decode(Encoding::Json, true, b"{}").is_err());
        assert!(decode(Encoding::Msgpack, false, b"").is_err());
        assert!(decode(Encoding::Json, false, b"not json").unwrap().is_empty());
        let frame = b"{\"type\":\"nope\"}\n{\"type\":\"ping\"}\n";
        assert_eq!(decode(Encoding::Json, false, frame).unwrap(), vec![ServerMessage::Push(Push::Ping)]);
    }
}
