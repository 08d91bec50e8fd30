//! A small, allocation-free MessagePack reader and writer.
//!
//! The reader walks values in place so that a message's `data` can be kept as the exact
//! bytes the client sent, and validates nesting depth and lengths against the input size,
//! so hostile input costs at most one pass over its bytes.

use thiserror::Error;

/// Deepest nesting of arrays and maps accepted in a payload (`data`, `info`).
pub const MAX_DEPTH: usize = 64;
/// Deepest nesting accepted in a whole message (its map, fields and payloads).
pub const MAX_MESSAGE_DEPTH: usize = 128;

/// Why MessagePack input was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MpError {
    #[error("truncated MessagePack value")]
    Eof,
    #[error("reserved MessagePack marker 0xc1")]
    Reserved,
    #[error("MessagePack nesting deeper than {MAX_MESSAGE_DEPTH}")]
    TooDeep,
}

/// One token of MessagePack input.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Token<'a> {
    Nil,
    Bool(bool),
    Uint(u64),
    Int(i64),
    F32(f32),
    F64(f64),
    Str(&'a [u8]),
    Bin(&'a [u8]),
    Array(u32),
    Map(u32),
    Ext(i8, &'a [u8]),
}

/// A cursor over MessagePack bytes.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }
    pub fn position(&self) -> usize {
        self.pos
    }
    pub fn is_empty(&self) -> bool {
        self.pos >= self.buf.len()
    }
    pub fn input(&self) -> &'a [u8] {
        self.buf
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], MpError> {
        let end = self.pos.checked_add(n).ok_or(MpError::Eof)?;
        let s = self.buf.get(self.pos..end).ok_or(MpError::Eof)?;
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, MpError> {
        Ok(self.take(1)?[0])
    }
    fn be<const N: usize>(&mut self) -> Result<[u8; N], MpError> {
        let s = self.take(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    fn len8(&mut self) -> Result<usize, MpError> {
        Ok(self.u8()? as usize)
    }
    fn len16(&mut self) -> Result<usize, MpError> {
        Ok(u16::from_be_bytes(self.be()?) as usize)
    }
    fn len32(&mut self) -> Result<usize, MpError> {
        Ok(u32::from_be_bytes(self.be()?) as usize)
    }

    /// Reads the next token.
    pub fn token(&mut self) -> Result<Token<'a>, MpError> {
        let m = self.u8()?;
        Ok(match m {
            0x00..=0x7f => Token::Uint(m as u64),
            0x80..=0x8f => Token::Map((m & 0x0f) as u32),
            0x90..=0x9f => Token::Array((m & 0x0f) as u32),
            0xa0..=0xbf => Token::Str(self.take((m & 0x1f) as usize)?),
            0xc0 => Token::Nil,
            0xc1 => return Err(MpError::Reserved),
            0xc2 => Token::Bool(false),
            0xc3 => Token::Bool(true),
            0xc4 => {
                let n = self.len8()?;
                Token::Bin(self.take(n)?)
            }
            0xc5 => {
                let n = self.len16()?;
                Token::Bin(self.take(n)?)
            }
            0xc6 => {
                let n = self.len32()?;
                Token::Bin(self.take(n)?)
            }
            0xc7..=0xc9 => {
                let n = match m {
                    0xc7 => self.len8()?,
                    0xc8 => self.len16()?,
                    _ => self.len32()?,
                };
                let t = self.u8()? as i8;
                Token::Ext(t, self.take(n)?)
            }
            0xca => Token::F32(f32::from_be_bytes(self.be()?)),
            0xcb => Token::F64(f64::from_be_bytes(self.be()?)),
            0xcc => Token::Uint(self.u8()? as u64),
            0xcd => Token::Uint(u16::from_be_bytes(self.be()?) as u64),
            0xce => Token::Uint(u32::from_be_bytes(self.be()?) as u64),
            0xcf => Token::Uint(u64::from_be_bytes(self.be()?)),
            0xd0 => Token::Int(self.u8()? as i8 as i64),
            0xd1 => Token::Int(i16::from_be_bytes(self.be()?) as i64),
            0xd2 => Token::Int(i32::from_be_bytes(self.be()?) as i64),
            0xd3 => Token::Int(i64::from_be_bytes(self.be()?)),
            0xd4..=0xd8 => {
                let n = 1usize << (m - 0xd4);
                let t = self.u8()? as i8;
                Token::Ext(t, self.take(n)?)
            }
            0xd9 => {
                let n = self.len8()?;
                Token::Str(self.take(n)?)
            }
            0xda => {
                let n = self.len16()?;
                Token::Str(self.take(n)?)
            }
            0xdb => {
                let n = self.len32()?;
                Token::Str(self.take(n)?)
            }
            0xdc => Token::Array(u16::from_be_bytes(self.be()?) as u32),
            0xdd => Token::Array(u32::from_be_bytes(self.be()?)),
            0xde => Token::Map(u16::from_be_bytes(self.be()?) as u32),
            0xdf => Token::Map(u32::from_be_bytes(self.be()?)),
            0xe0..=0xff => Token::Int(m as i8 as i64),
        })
    }

    /// Skips one whole value and returns its bytes. `depth` is the nesting already entered.
    pub fn value(&mut self, depth: usize) -> Result<&'a [u8], MpError> {
        let start = self.pos;
        self.skip(depth)?;
        Ok(&self.buf[start..self.pos])
    }

    fn skip(&mut self, depth: usize) -> Result<(), MpError> {
        // Iterative, so that nesting cannot exhaust the stack: `pending` counts values
        // still to read at each open level.
        let mut pending: Vec<u64> = Vec::new();
        let mut remaining: u64 = 1;
        loop {
            while remaining == 0 {
                match pending.pop() {
                    Some(r) => remaining = r,
                    None => return Ok(()),
                }
            }
            remaining -= 1;
            let children = match self.token()? {
                Token::Array(n) => n as u64,
                Token::Map(n) => 2 * n as u64,
                _ => 0,
            };
            if children > 0 {
                if depth + pending.len() + 1 > MAX_MESSAGE_DEPTH {
                    return Err(MpError::TooDeep);
                }
                // Every child needs at least one byte: refuse lengths the input cannot hold.
                if children > (self.buf.len() - self.pos) as u64 {
                    return Err(MpError::Eof);
                }
                pending.push(remaining);
                remaining = children;
            }
        }
    }
}

/// Appends MessagePack encodings to a buffer.
pub mod write {
    pub fn nil(out: &mut Vec<u8>) {
        out.push(0xc0);
    }
    pub fn bool(out: &mut Vec<u8>, v: bool) {
        out.push(if v { 0xc3 } else { 0xc2 });
    }
    pub fn uint(out: &mut Vec<u8>, v: u64) {
        if v < 0x80 {
            out.push(v as u8);
        } else if v <= u8::MAX as u64 {
            out.extend_from_slice(&[0xcc, v as u8]);
        } else if v <= u16::MAX as u64 {
            out.push(0xcd);
            out.extend_from_slice(&(v as u16).to_be_bytes());
        } else if v <= u32::MAX as u64 {
            out.push(0xce);
            out.extend_from_slice(&(v as u32).to_be_bytes());
        } else {
            out.push(0xcf);
            out.extend_from_slice(&v.to_be_bytes());
        }
    }
    pub fn int(out: &mut Vec<u8>, v: i64) {
        if v >= 0 {
            uint(out, v as u64);
        } else if v >= -32 {
            out.push(v as i8 as u8);
        } else if v >= i8::MIN as i64 {
            out.extend_from_slice(&[0xd0, v as i8 as u8]);
        } else if v >= i16::MIN as i64 {
            out.push(0xd1);
            out.extend_from_slice(&(v as i16).to_be_bytes());
        } else if v >= i32::MIN as i64 {
            out.push(0xd2);
            out.extend_from_slice(&(v as i32).to_be_bytes());
        } else {
            out.push(0xd3);
            out.extend_from_slice(&v.to_be_bytes());
        }
    }
    pub fn f64(out: &mut Vec<u8>, v: f64) {
        out.push(0xcb);
        out.extend_from_slice(&v.to_be_bytes());
    }
    pub fn str(out: &mut Vec<u8>, s: &str) {
        let n = s.len();
        if n < 32 {
            out.push(0xa0 | n as u8);
        } else if n <= u8::MAX as usize {
            out.extend_from_slice(&[0xd9, n as u8]);
        } else if n <= u16::MAX as usize {
            out.push(0xda);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        } else {
            out.push(0xdb);
            out.extend_from_slice(&(n as u32).to_be_bytes());
        }
        out.extend_from_slice(s.as_bytes());
    }
    pub fn bin(out: &mut Vec<u8>, b: &[u8]) {
        let n = b.len();
        if n <= u8::MAX as usize {
            out.extend_from_slice(&[0xc4, n as u8]);
        } else if n <= u16::MAX as usize {
            out.push(0xc5);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        } else {
            out.push(0xc6);
            out.extend_from_slice(&(n as u32).to_be_bytes());
        }
        out.extend_from_slice(b);
    }
    pub fn array_len(out: &mut Vec<u8>, n: usize) {
        if n < 16 {
            out.push(0x90 | n as u8);
        } else if n <= u16::MAX as usize {
            out.push(0xdc);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        } else {
            out.push(0xdd);
            out.extend_from_slice(&(n as u32).to_be_bytes());
        }
    }
    pub fn map_len(out: &mut Vec<u8>, n: usize) {
        if n < 16 {
            out.push(0x80 | n as u8);
        } else if n <= u16::MAX as usize {
            out.push(0xde);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        } else {
            out.push(0xdf);
            out.extend_from_slice(&(n as u32).to_be_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deep_nesting_is_refused_without_recursion() {
        let mut v = vec![0x91u8; 100_000];
        v.push(0xc0);
        assert_eq!(Reader::new(&v).value(0), Err(MpError::TooDeep));
    }

    #[test]
    fn huge_declared_lengths_are_refused() {
        // array32 claiming 4 billion elements in 5 bytes
        let v = [0xdd, 0xff, 0xff, 0xff, 0xff];
        assert_eq!(Reader::new(&v).value(0), Err(MpError::Eof));
        let v = [0xdb, 0xff, 0xff, 0xff, 0xff, b'a'];
        assert_eq!(Reader::new(&v).value(0), Err(MpError::Eof));
    }

    #[test]
    fn ints_round_trip() {
        for v in [0i64, 1, -1, -32, -33, 127, 128, 255, 256, -129, 65_536, -70_000, i64::MIN, i64::MAX] {
            let mut out = Vec::new();
            write::int(&mut out, v);
            let t = Reader::new(&out).token().unwrap();
            match t {
                Token::Uint(u) => assert_eq!(u as i64, v),
                Token::Int(i) => assert_eq!(i, v),
                other => panic!("{other:?}"),
            }
        }
    }
}
