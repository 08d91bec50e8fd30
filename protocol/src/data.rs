//! Application payloads (`data`), kept as the exact bytes a client sent and transcoded
//! between JSON and MessagePack at most once per encoding.
//!
//! Rules: MessagePack `bin` reaches JSON clients as a base64 string; `ext`, non-string map
//! keys, strings that are not UTF-8 and non-finite floats cannot be expressed in JSON and
//! are refused when the data arrives (error 107), so a stored payload always transcodes.

use std::fmt;
use std::sync::{Arc, OnceLock};

use base64::Engine as _;
use bytes::Bytes;
use thiserror::Error;

use crate::mp::{self, MAX_DEPTH, Reader, Token};

/// Why a payload was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DataError {
    #[error("invalid MessagePack in data: {0}")]
    MessagePack(#[from] mp::MpError),
    #[error("MessagePack ext values are not supported in data")]
    Ext,
    #[error("MessagePack map keys in data must be strings")]
    NonStringKey,
    #[error("MessagePack string in data is not UTF-8")]
    NotUtf8,
    #[error("non-finite float in data")]
    NonFinite,
    #[error("invalid JSON in data: {0}")]
    Json(String),
    #[error("data nested deeper than {MAX_DEPTH}")]
    TooDeep,
}

/// An application payload. Cloning is cheap (shared).
#[derive(Clone)]
pub struct Data(Arc<Inner>);

struct Inner {
    json: OnceLock<Bytes>,
    msgpack: OnceLock<Bytes>,
}

impl Data {
    /// A payload from JSON text. The text is validated (depth included).
    pub fn from_json(text: impl Into<Bytes>) -> Result<Self, DataError> {
        let text: Bytes = text.into();
        validate_json(&text)?;
        Ok(Self::from_json_unchecked(text))
    }

    /// A payload from JSON text already validated by a JSON parser.
    ///
    /// Line breaks are turned into spaces: JSON frames separate messages with `\n`, so a
    /// payload must be one line. Valid JSON has CR and LF only as whitespace between tokens
    /// (inside strings they are escaped), so this changes no value.
    pub(crate) fn from_json_unchecked(text: Bytes) -> Self {
        let text = if text.iter().any(|b| *b == b'\n' || *b == b'\r') {
            Bytes::from(
                text.iter().map(|b| if *b == b'\n' || *b == b'\r' { b' ' } else { *b }).collect::<Vec<u8>>(),
            )
        } else {
            text
        };
        let json = OnceLock::new();
        let _ = json.set(text);
        Data(Arc::new(Inner { json, msgpack: OnceLock::new() }))
    }

    /// A payload from one MessagePack value, validated as JSON-expressible.
    pub fn from_msgpack(bytes: impl Into<Bytes>) -> Result<Self, DataError> {
        let bytes: Bytes = bytes.into();
        let mut r = Reader::new(&bytes);
        transcode_mp_to_json(&mut r, None)?;
        if !r.is_empty() {
            return Err(DataError::MessagePack(mp::MpError::Eof));
        }
        let msgpack = OnceLock::new();
        let _ = msgpack.set(bytes);
        Ok(Data(Arc::new(Inner { json: OnceLock::new(), msgpack })))
    }

    /// Any serializable value, as JSON.
    pub fn from_serialize<T: serde::Serialize>(v: &T) -> Result<Self, DataError> {
        let text = serde_json::to_vec(v).map_err(|e| DataError::Json(e.to_string()))?;
        Ok(Self::from_json_unchecked(Bytes::from(text)))
    }

    /// The payload as JSON text.
    pub fn json(&self) -> Result<&Bytes, DataError> {
        if let Some(b) = self.0.json.get() {
            return Ok(b);
        }
        let Some(src) = self.0.msgpack.get() else {
            return Err(DataError::Json("empty payload".into()));
        };
        let mut out = Vec::with_capacity(src.len() + src.len() / 2);
        transcode_mp_to_json(&mut Reader::new(src), Some(&mut out))?;
        Ok(self.0.json.get_or_init(|| Bytes::from(out)))
    }

    /// The payload as one MessagePack value.
    pub fn msgpack(&self) -> Result<&Bytes, DataError> {
        if let Some(b) = self.0.msgpack.get() {
            return Ok(b);
        }
        let Some(src) = self.0.json.get() else {
            return Err(DataError::Json("empty payload".into()));
        };
        let value: serde_json::Value =
            serde_json::from_slice(src).map_err(|e| DataError::Json(e.to_string()))?;
        let mut out = Vec::with_capacity(src.len());
        json_to_mp(&value, &mut out);
        Ok(self.0.msgpack.get_or_init(|| Bytes::from(out)))
    }

    /// Size of the payload as it arrived (the encoding it was first given in).
    pub fn wire_len(&self) -> usize {
        self.0.json.get().or_else(|| self.0.msgpack.get()).map_or(0, Bytes::len)
    }

    /// Decodes the payload into a Rust value.
    pub fn decode<T: serde::de::DeserializeOwned>(&self) -> Result<T, DataError> {
        serde_json::from_slice(self.json()?).map_err(|e| DataError::Json(e.to_string()))
    }
}

impl PartialEq for Data {
    /// Payloads are equal when they mean the same JSON value.
    fn eq(&self, other: &Self) -> bool {
        match (self.json(), other.json()) {
            (Ok(a), Ok(b)) => {
                a == b
                    || serde_json::from_slice::<serde_json::Value>(a).ok()
                        == serde_json::from_slice::<serde_json::Value>(b).ok()
            }
            _ => false,
        }
    }
}

impl fmt::Debug for Data {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.json() {
            Ok(j) => write!(f, "Data({})", String::from_utf8_lossy(j)),
            Err(e) => write!(f, "Data(<{e}>)"),
        }
    }
}

fn validate_json(text: &[u8]) -> Result<(), DataError> {
    // serde_json refuses nesting deeper than 128 with an error (no stack overflow).
    let v: serde_json::Value = serde_json::from_slice(text).map_err(|e| DataError::Json(e.to_string()))?;
    if json_depth(&v) > MAX_DEPTH {
        return Err(DataError::TooDeep);
    }
    Ok(())
}

/// Nesting depth of a JSON value: the most arrays and maps on one path (scalars are 0),
/// counted as the MessagePack reader counts them.
pub(crate) fn json_depth(v: &serde_json::Value) -> usize {
    let mut max = 0;
    let mut stack = vec![(v, 1usize)];
    while let Some((v, d)) = stack.pop() {
        match v {
            serde_json::Value::Array(a) => {
                max = max.max(d);
                stack.extend(a.iter().map(|c| (c, d + 1)));
            }
            serde_json::Value::Object(o) => {
                max = max.max(d);
                stack.extend(o.values().map(|c| (c, d + 1)));
            }
            _ => {}
        }
    }
    max
}

fn json_to_mp(v: &serde_json::Value, out: &mut Vec<u8>) {
    use serde_json::Value as V;
    match v {
        V::Null => mp::write::nil(out),
        V::Bool(b) => mp::write::bool(out, *b),
        V::Number(n) => {
            if let Some(u) = n.as_u64() {
                mp::write::uint(out, u)
            } else if let Some(i) = n.as_i64() {
                mp::write::int(out, i)
            } else {
                mp::write::f64(out, n.as_f64().unwrap_or(0.0))
            }
        }
        V::String(s) => mp::write::str(out, s),
        V::Array(a) => {
            mp::write::array_len(out, a.len());
            for c in a {
                json_to_mp(c, out);
            }
        }
        V::Object(o) => {
            mp::write::map_len(out, o.len());
            for (k, c) in o {
                mp::write::str(out, k);
                json_to_mp(c, out);
            }
        }
    }
}

/// Walks one MessagePack value, checking it is JSON-expressible, and writes its JSON form
/// to `out` when given. Iterative: nesting is bounded by `MAX_DEPTH`, not by the stack.
fn transcode_mp_to_json(r: &mut Reader<'_>, mut out: Option<&mut Vec<u8>>) -> Result<(), DataError> {
    enum Frame {
        Array { left: u32, first: bool },
        Map { left: u32, first: bool, key_next: bool },
    }
    let mut stack: Vec<Frame> = Vec::new();
    let w = |out: &mut Option<&mut Vec<u8>>, s: &[u8]| {
        if let Some(o) = out.as_deref_mut() {
            o.extend_from_slice(s);
        }
    };
    loop {
        // Emit separators, close finished containers, and learn whether a key is expected.
        let mut expect_key = false;
        loop {
            match stack.last_mut() {
                None => break,
                Some(Frame::Array { left, first }) => {
                    if *left == 0 {
                        stack.pop();
                        w(&mut out, b"]");
                        if stack.is_empty() {
                            return Ok(());
                        }
                        continue;
                    }
                    *left -= 1;
                    if !*first {
                        w(&mut out, b",");
                    }
                    *first = false;
                    break;
                }
                Some(Frame::Map { left, first, key_next }) => {
                    if *key_next {
                        if *left == 0 {
                            stack.pop();
                            w(&mut out, b"}");
                            if stack.is_empty() {
                                return Ok(());
                            }
                            continue;
                        }
                        *left -= 1;
                        if !*first {
                            w(&mut out, b",");
                        }
                        *first = false;
                        *key_next = false;
                        expect_key = true;
                    } else {
                        *key_next = true;
                    }
                    break;
                }
            }
        }
        let tok = r.token()?;
        if expect_key {
            let Token::Str(s) = tok else {
                return Err(DataError::NonStringKey);
            };
            let s = std::str::from_utf8(s).map_err(|_| DataError::NotUtf8)?;
            if let Some(o) = out.as_deref_mut() {
                write_json_str(o, s);
                o.push(b':');
            }
            continue;
        }
        match tok {
            Token::Nil => w(&mut out, b"null"),
            Token::Bool(b) => w(&mut out, if b { b"true" } else { b"false" }),
            Token::Uint(u) => w(&mut out, u.to_string().as_bytes()),
            Token::Int(i) => w(&mut out, i.to_string().as_bytes()),
            Token::F32(f) => write_float(&mut out, f as f64)?,
            Token::F64(f) => write_float(&mut out, f)?,
            Token::Str(s) => {
                let s = std::str::from_utf8(s).map_err(|_| DataError::NotUtf8)?;
                if let Some(o) = out.as_deref_mut() {
                    write_json_str(o, s);
                }
            }
            Token::Bin(b) => {
                if let Some(o) = out.as_deref_mut() {
                    o.push(b'"');
                    o.extend_from_slice(base64::engine::general_purpose::STANDARD.encode(b).as_bytes());
                    o.push(b'"');
                }
            }
            Token::Ext(..) => return Err(DataError::Ext),
            Token::Array(n) => {
                if stack.len() >= MAX_DEPTH {
                    return Err(DataError::TooDeep);
                }
                w(&mut out, b"[");
                stack.push(Frame::Array { left: n, first: true });
            }
            Token::Map(n) => {
                if stack.len() >= MAX_DEPTH {
                    return Err(DataError::TooDeep);
                }
                w(&mut out, b"{");
                stack.push(Frame::Map { left: n, first: true, key_next: true });
            }
        }
        if stack.is_empty() {
            return Ok(());
        }
    }

    fn write_float(out: &mut Option<&mut Vec<u8>>, f: f64) -> Result<(), DataError> {
        if !f.is_finite() {
            return Err(DataError::NonFinite);
        }
        if let Some(o) = out.as_deref_mut()
            && let Ok(s) = serde_json::to_string(&f)
        {
            o.extend_from_slice(s.as_bytes());
        }
        Ok(())
    }
}

/// Writes a JSON string literal with escaping.
pub(crate) fn write_json_str(out: &mut Vec<u8>, s: &str) {
    // serde_json's escaping is exact; writing to a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

#[cfg(test)]
mod tests {
    #[test]
    fn json_payloads_are_one_line() {
        let d = super::Data::from_json(&b"{\r\n  \"a\": [1,\n 2],\n  \"s\": \"x\\ny\"\n}"[..]).unwrap();
        let text = d.json().unwrap().clone();
        assert!(!text.contains(&b'\n') && !text.contains(&b'\r'), "{text:?}");
        let v: serde_json::Value = serde_json::from_slice(&text).unwrap();
        assert_eq!(v, serde_json::json!({"a": [1, 2], "s": "x\ny"}));
    }

    use super::*;

    #[test]
    fn numbers_survive_json_to_msgpack_and_back() {
        // Found by the decode_requests fuzz target: an integer literal beyond 64 bits is a
        // float; without correctly rounded parsing it came back 1 ULP off.
        for text in [
            "[2222222222222222222222222222222222222222222222222222222222222222222222222222222222222222222222222222222222]",
            "[0.1, 1e-7, 123456789.123456789, -18446744073709551616]",
        ] {
            let a = Data::from_json(text.as_bytes().to_vec()).unwrap();
            let b = Data::from_msgpack(a.msgpack().unwrap().clone()).unwrap();
            assert_eq!(a, b, "{text}");
        }
    }

    fn mp(v: &rmpv::Value) -> Vec<u8> {
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, v).unwrap();
        out
    }

    #[test]
    fn json_to_msgpack_and_back() {
        let d = Data::from_json(&br#"{"a":[1,-2,3.5,"x",null,true],"b":{"c":{}}}"#[..]).unwrap();
        let m = d.msgpack().unwrap().clone();
        let back = Data::from_msgpack(m).unwrap();
        let v: serde_json::Value = serde_json::from_slice(back.json().unwrap()).unwrap();
        assert_eq!(v, serde_json::json!({"a":[1,-2,3.5,"x",null,true],"b":{"c":{}}}));
    }

    #[test]
    fn bin_becomes_base64_for_json() {
        let v = rmpv::Value::Map(vec![("b".into(), rmpv::Value::Binary(vec![0, 1, 2, 255]))]);
        let d = Data::from_msgpack(mp(&v)).unwrap();
        assert_eq!(&d.json().unwrap()[..], br#"{"b":"AAEC/w=="}"#);
    }

    #[test]
    fn scalars_at_top_level() {
        for v in [rmpv::Value::from(5), rmpv::Value::from("hi"), rmpv::Value::Nil, rmpv::Value::from(-7)] {
            let d = Data::from_msgpack(mp(&v)).unwrap();
            let j: serde_json::Value = serde_json::from_slice(d.json().unwrap()).unwrap();
            assert_eq!(j.to_string(), v.to_string().replace("nil", "null"));
        }
    }

    #[test]
    fn unexpressible_msgpack_is_refused() {
        let ext = rmpv::Value::Ext(1, vec![1, 2]);
        assert_eq!(Data::from_msgpack(mp(&ext)).unwrap_err(), DataError::Ext);
        let nested = rmpv::Value::Array(vec![rmpv::Value::Map(vec![(1.into(), 2.into())])]);
        assert_eq!(Data::from_msgpack(mp(&nested)).unwrap_err(), DataError::NonStringKey);
        let nan = rmpv::Value::F64(f64::NAN);
        assert_eq!(Data::from_msgpack(mp(&nan)).unwrap_err(), DataError::NonFinite);
        let mut deep = vec![0x91u8; 65];
        deep.push(0xc0);
        assert_eq!(Data::from_msgpack(deep).unwrap_err(), DataError::TooDeep);
        let mut ok = vec![0x91u8; 64];
        ok.push(0xc0);
        assert!(Data::from_msgpack(ok).is_ok());
        // trailing bytes after the value
        assert!(Data::from_msgpack(vec![0xc0, 0xc0]).is_err());
    }

    #[test]
    fn deep_json_is_refused() {
        let deep = format!("{}{}", "[".repeat(65), "]".repeat(65));
        assert_eq!(Data::from_json(deep.into_bytes()).unwrap_err(), DataError::TooDeep);
        let very = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(Data::from_json(very.into_bytes()).is_err());
    }

    #[test]
    fn equality_is_semantic() {
        let a = Data::from_json(&b"{\"x\": 1}"[..]).unwrap();
        let b = Data::from_msgpack(a.msgpack().unwrap().clone()).unwrap();
        assert_eq!(a, b);
    }
}
