//! Frames: parsing what clients send (masked, possibly fragmented, possibly compressed)
//! into whole messages, and writing what the node sends (unmasked).

use bytes::{Buf, BytesMut};
use thiserror::Error;

use super::deflate::{self, InflateError};

pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Why the client's frames were refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FrameError {
    /// Broken framing (RFC 6455 rules): close 4002.
    #[error("framing violation: {0}")]
    Protocol(&'static str),
    /// A message over the configured limit: close 4008.
    #[error("message larger than {0} bytes")]
    TooLarge(usize),
}

/// A frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub fin: bool,
    pub rsv1: bool,
    pub opcode: u8,
    pub mask: Option<[u8; 4]>,
    pub len: u64,
    /// Bytes the header itself takes.
    pub header_len: usize,
}

/// Parses a frame header from the start of `buf`; `None` when more bytes are needed.
pub fn parse_header(buf: &[u8]) -> Result<Option<Header>, FrameError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    if b0 & 0x30 != 0 {
        return Err(FrameError::Protocol("RSV2 or RSV3 set"));
    }
    let fin = b0 & 0x80 != 0;
    let rsv1 = b0 & 0x40 != 0;
    let opcode = b0 & 0x0f;
    let masked = b1 & 0x80 != 0;
    let (len, mut at) = match b1 & 0x7f {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as u64, 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut a = [0u8; 8];
            a.copy_from_slice(&buf[2..10]);
            let l = u64::from_be_bytes(a);
            if l >> 63 != 0 {
                return Err(FrameError::Protocol("payload length has its top bit set"));
            }
            (l, 10)
        }
        l => (l as u64, 2),
    };
    let mask = if masked {
        if buf.len() < at + 4 {
            return Ok(None);
        }
        let m = [buf[at], buf[at + 1], buf[at + 2], buf[at + 3]];
        at += 4;
        Some(m)
    } else {
        None
    };
    Ok(Some(Header { fin, rsv1, opcode, mask, len, header_len: at }))
}

/// XORs `data` with the mask, starting at mask offset `offset`.
pub fn apply_mask(data: &mut [u8], mask: [u8; 4], offset: usize) {
    for (i, b) in data.iter_mut().enumerate() {
        *b ^= mask[(i + offset) & 3];
    }
}

/// Appends a server frame header (FIN set, unmasked).
pub fn write_header(out: &mut Vec<u8>, opcode: u8, rsv1: bool, len: usize) {
    out.push(0x80 | if rsv1 { 0x40 } else { 0 } | opcode);
    if len < 126 {
        out.push(len as u8);
    } else if len <= u16::MAX as usize {
        out.push(126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
}

/// Appends a whole server frame.
pub fn write_frame(out: &mut Vec<u8>, opcode: u8, rsv1: bool, payload: &[u8]) {
    write_header(out, opcode, rsv1, payload.len());
    out.extend_from_slice(payload);
}

/// Appends a close frame with a code and a reason (cut to fit 123 bytes on a char boundary).
pub fn write_close(out: &mut Vec<u8>, code: u16, reason: &str) {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = Vec::with_capacity(2 + end);
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    write_frame(out, OP_CLOSE, false, &payload);
}

/// A whole message or control frame from the client.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    /// A data message: whether it came in binary frames, and its (decompressed) payload.
    Message {
        binary: bool,
        payload: Vec<u8>,
    },
    Ping(Vec<u8>),
    Pong,
    /// The client's close frame: its code, if any.
    Close(Option<u16>),
}

/// Reassembles client messages. Holds a partial message only while one is in flight.
#[derive(Debug)]
pub struct MessageReader {
    /// Largest message, after reassembly and decompression.
    max: usize,
    /// permessage-deflate was negotiated.
    deflate: bool,
    /// A fragmented message being reassembled: binary?, compressed?, bytes so far.
    partial: Option<(bool, bool, Vec<u8>)>,
}

impl MessageReader {
    pub fn new(max: usize, deflate: bool) -> Self {
        MessageReader { max, deflate, partial: None }
    }

    /// Takes the next whole message or control frame off the front of `buf`; `None`
    /// when `buf` does not hold a whole frame yet.
    pub fn next(&mut self, buf: &mut BytesMut) -> Result<Option<Incoming>, FrameError> {
        loop {
            let Some(h) = parse_header(buf)? else {
                return Ok(None);
            };
            let Some(mask) = h.mask else {
                return Err(FrameError::Protocol("client frame is not masked"));
            };
            let is_control = h.opcode & 0x08 != 0;
            if is_control {
                if !h.fin || h.len > 125 {
                    return Err(FrameError::Protocol("fragmented or oversized control frame"));
                }
                if h.rsv1 {
                    return Err(FrameError::Protocol("RSV1 on a control frame"));
                }
            } else {
                // Refuse before buffering: a frame alone over the limit cannot fit.
                let so_far = self.partial.as_ref().map_or(0, |p| p.2.len()) as u64;
                if h.len.saturating_add(so_far) > self.max as u64 {
                    return Err(FrameError::TooLarge(self.max));
                }
            }
            let total = h.header_len as u64 + h.len;
            if (buf.len() as u64) < total {
                buf.reserve((total as usize).saturating_sub(buf.len()));
                return Ok(None);
            }
            buf.advance(h.header_len);
            let mut payload = buf.split_to(h.len as usize);
            apply_mask(&mut payload, mask, 0);
            match h.opcode {
                OP_PING => return Ok(Some(Incoming::Ping(payload.to_vec()))),
                OP_PONG => return Ok(Some(Incoming::Pong)),
                OP_CLOSE => {
                    let code = match payload.len() {
                        0 => None,
                        1 => return Err(FrameError::Protocol("close frame with a 1-byte payload")),
                        _ => Some(u16::from_be_bytes([payload[0], payload[1]])),
                    };
                    return Ok(Some(Incoming::Close(code)));
                }
                OP_TEXT | OP_BINARY => {
                    if self.partial.is_some() {
                        return Err(FrameError::Protocol("new data frame inside a fragmented message"));
                    }
                    if h.rsv1 && !self.deflate {
                        return Err(FrameError::Protocol("RSV1 set without permessage-deflate"));
                    }
                    let binary = h.opcode == OP_BINARY;
                    if h.fin {
                        return self.finish(binary, h.rsv1, payload.to_vec()).map(Some);
                    }
                    self.partial = Some((binary, h.rsv1, payload.to_vec()));
                }
                OP_CONTINUATION => {
                    if h.rsv1 {
                        return Err(FrameError::Protocol("RSV1 on a continuation frame"));
                    }
                    let Some((binary, compressed, mut acc)) = self.partial.take() else {
                        return Err(FrameError::Protocol("continuation frame without a message"));
                    };
                    acc.extend_from_slice(&payload);
                    if h.fin {
                        return self.finish(binary, compressed, acc).map(Some);
                    }
                    self.partial = Some((binary, compressed, acc));
                }
                _ => return Err(FrameError::Protocol("unknown opcode")),
            }
        }
    }

    fn finish(&self, binary: bool, compressed: bool, payload: Vec<u8>) -> Result<Incoming, FrameError> {
        let payload = if compressed {
            deflate::decompress(&payload, self.max).map_err(|e| match e {
                InflateError::TooLarge(m) => FrameError::TooLarge(m),
                InflateError::Corrupt => FrameError::Protocol("invalid deflate data"),
            })?
        } else {
            payload
        };
        Ok(Incoming::Message { binary, payload })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client_frame(opcode: u8, fin: bool, rsv1: bool, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        write_header(&mut out, opcode, rsv1, payload.len());
        if !fin {
            out[0] &= 0x7f;
        }
        out[1] |= 0x80;
        let mask = [1, 2, 3, 4];
        out.extend_from_slice(&mask);
        let mut p = payload.to_vec();
        apply_mask(&mut p, mask, 0);
        out.extend_from_slice(&p);
        out
    }

    #[test]
    fn whole_and_fragmented_messages() {
        let mut r = MessageReader::new(1000, false);
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&client_frame(OP_TEXT, false, false, b"hel"));
        buf.extend_from_slice(&client_frame(OP_PING, true, false, b"p"));
        buf.extend_from_slice(&client_frame(OP_CONTINUATION, true, false, b"lo"));
        let big = vec![7u8; 300];
        buf.extend_from_slice(&client_frame(OP_BINARY, true, false, &big));
        assert_eq!(r.next(&mut buf).unwrap(), Some(Incoming::Ping(b"p".to_vec())));
        assert_eq!(
            r.next(&mut buf).unwrap(),
            Some(Incoming::Message { binary: false, payload: b"hello".to_vec() })
        );
        assert_eq!(r.next(&mut buf).unwrap(), Some(Incoming::Message { binary: true, payload: big }));
        assert_eq!(r.next(&mut buf).unwrap(), None);
    }

    #[test]
    fn partial_input_waits() {
        let mut r = MessageReader::new(1000, false);
        let f = client_frame(OP_TEXT, true, false, &[b'x'; 200]);
        let mut buf = BytesMut::new();
        for chunk in f.chunks(7) {
            assert_eq!(r.next(&mut buf).unwrap(), None);
            buf.extend_from_slice(chunk);
        }
        assert!(matches!(r.next(&mut buf).unwrap(), Some(Incoming::Message { .. })));
    }

    #[test]
    fn compressed_messages() {
        let mut r = MessageReader::new(100_000, true);
        let text = b"{\"type\":\"ping\"}".repeat(100);
        let mut buf = BytesMut::from(&client_frame(OP_TEXT, true, true, &deflate::compress(&text))[..]);
        assert_eq!(r.next(&mut buf).unwrap(), Some(Incoming::Message { binary: false, payload: text }));
        let bomb = deflate::compress(&vec![b'a'; 1_000_000]);
        let mut buf = BytesMut::from(&client_frame(OP_TEXT, true, true, &bomb)[..]);
        assert_eq!(r.next(&mut buf), Err(FrameError::TooLarge(100_000)));
    }

    #[test]
    fn violations() {
        let cases: Vec<(Vec<u8>, bool)> = vec![
            (
                {
                    let mut f = client_frame(OP_TEXT, true, false, b"x");
                    f[1] &= 0x7f; // unmasked
                    f.truncate(2);
                    f.push(b'x');
                    f
                },
                false,
            ),
            (client_frame(OP_CONTINUATION, true, false, b"x"), false),
            (client_frame(0x3, true, false, b"x"), false),
            (client_frame(OP_PING, false, false, b"x"), false),
            (client_frame(OP_TEXT, true, true, b"x"), false),
            (client_frame(OP_CLOSE, true, false, b"x"), false),
        ];
        for (f, _) in cases {
            let mut r = MessageReader::new(1000, false);
            let mut buf = BytesMut::from(&f[..]);
            assert!(matches!(r.next(&mut buf), Err(FrameError::Protocol(_))), "{f:x?}");
        }
        // Too large is known from the header alone.
        let mut r = MessageReader::new(10, false);
        let mut hdr = Vec::new();
        write_header(&mut hdr, OP_TEXT, false, 1 << 30);
        hdr[1] |= 0x80;
        hdr.extend_from_slice(&[0, 0, 0, 0]);
        assert_eq!(r.next(&mut BytesMut::from(&hdr[..])), Err(FrameError::TooLarge(10)));
    }

    #[test]
    fn close_reason_is_cut_on_a_char_boundary() {
        let mut out = Vec::new();
        write_close(&mut out, 4000, &"é".repeat(100));
        let h = parse_header(&out).unwrap().unwrap();
        assert_eq!(h.len, 2 + 122);
    }
}
