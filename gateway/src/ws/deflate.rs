//! permessage-deflate with no context takeover: each message is compressed and
//! decompressed on its own, with a compressor and decompressor kept per thread (not per
//! connection) and reset between messages.

use std::cell::RefCell;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use thiserror::Error;

const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

thread_local! {
    static COMPRESS: RefCell<Compress> = RefCell::new(Compress::new(Compression::fast(), false));
    static DECOMPRESS: RefCell<Decompress> = RefCell::new(Decompress::new(false));
}

/// Why a compressed message was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum InflateError {
    #[error("decompressed message exceeds {0} bytes")]
    TooLarge(usize),
    #[error("invalid deflate data")]
    Corrupt,
}

/// Compresses one message payload (RFC 7692 section 7.2.1: the trailing empty block's
/// 0x00 0x00 0xff 0xff is removed).
pub fn compress(input: &[u8]) -> Vec<u8> {
    COMPRESS.with(|c| {
        let mut c = c.borrow_mut();
        c.reset();
        let mut out = Vec::with_capacity(input.len() / 2 + 64);
        let mut pos = 0;
        loop {
            if out.capacity() - out.len() < 64 {
                out.reserve(out.capacity().max(256));
            }
            let before = c.total_in();
            if c.compress_vec(&input[pos..], &mut out, FlushCompress::Sync).is_err() {
                return stored(input);
            }
            pos += (c.total_in() - before) as usize;
            // All input taken and room left in the output: the sync flush is complete.
            if pos >= input.len() && out.len() < out.capacity() {
                break;
            }
        }
        if !out.ends_with(&TAIL) {
            return stored(input);
        }
        out.truncate(out.len() - TAIL.len());
        out
    })
}

/// Deflate "stored" blocks: valid output that needs no compressor.
fn stored(input: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(input.len() + input.len() / 65535 * 5 + 5);
    for chunk in input.chunks(65535) {
        out.push(0);
        out.extend_from_slice(&(chunk.len() as u16).to_le_bytes());
        out.extend_from_slice(&(!(chunk.len() as u16)).to_le_bytes());
        out.extend_from_slice(chunk);
    }
    out
}

/// Decompresses one message payload, refusing output over `max` bytes.
pub fn decompress(input: &[u8], max: usize) -> Result<Vec<u8>, InflateError> {
    DECOMPRESS.with(|d| {
        let mut d = d.borrow_mut();
        d.reset(false);
        let mut out: Vec<u8> = Vec::new();
        for chunk in [input, &TAIL[..]] {
            let mut pos = 0;
            loop {
                if out.len() > max {
                    return Err(InflateError::TooLarge(max));
                }
                if out.capacity() - out.len() < 1024 {
                    // Never let the buffer grow past max + 1: one byte over is enough to know.
                    let room = (max + 1).saturating_sub(out.len()).max(1);
                    out.reserve(room.min(out.capacity().max(4096)));
                }
                let (in0, out0) = (d.total_in(), d.total_out());
                let status = d
                    .decompress_vec(&chunk[pos..], &mut out, FlushDecompress::Sync)
                    .map_err(|_| InflateError::Corrupt)?;
                pos += (d.total_in() - in0) as usize;
                let progressed = d.total_in() != in0 || d.total_out() != out0;
                if status == Status::StreamEnd {
                    break;
                }
                let full = out.len() == out.capacity();
                if pos >= chunk.len() && !full {
                    break;
                }
                if !progressed && !full {
                    return Err(InflateError::Corrupt);
                }
            }
        }
        if out.len() > max {
            return Err(InflateError::TooLarge(max));
        }
        Ok(out)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        for input in [
            &b""[..],
            b"a",
            &b"hello hello hello hello ".repeat(1000),
            &(0..=255u8).cycle().take(200_000).collect::<Vec<_>>(),
        ] {
            let c = compress(input);
            assert_eq!(decompress(&c, 1 << 20).unwrap(), input);
        }
    }

    #[test]
    fn stored_blocks_decode() {
        let input = b"stored".repeat(20_000);
        assert_eq!(decompress(&stored(&input), 1 << 20).unwrap(), input);
    }

    #[test]
    fn bombs_and_garbage_are_refused() {
        let bomb = compress(&vec![0u8; 10 << 20]);
        assert!(bomb.len() < 100_000);
        assert_eq!(decompress(&bomb, 128 * 1024), Err(InflateError::TooLarge(128 * 1024)));
        assert_eq!(decompress(&[0xff, 0xff, 0xff, 0x00, 0x13], 1024), Err(InflateError::Corrupt));
    }
}
