//! JSON and MessagePack codecs. Each message is described once, against two small
//! abstractions: [`Sink`] for encoding and [`Fields`] for decoding; the two encodings only
//! implement those.
//!
//! Framing (spec section 1): a JSON frame holds messages separated by `\n` (empty lines
//! ignored); a MessagePack frame holds values back to back.

use std::borrow::Cow;
use std::collections::BTreeMap;

use bytes::Bytes;
use serde_json::value::RawValue;
use thiserror::Error;

use crate::data::{Data, DataError, write_json_str};
use crate::message::*;
use crate::mp::{self, Reader, Token};
use crate::room::Room;
use crate::{CloseCode, ErrorCode};

/// The encoding of a connection, chosen by subprotocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encoding {
    Json,
    Msgpack,
}

impl Encoding {
    /// The WebSocket subprotocol naming this encoding.
    pub fn subprotocol(self) -> &'static str {
        match self {
            Encoding::Json => crate::SUBPROTOCOL_JSON,
            Encoding::Msgpack => crate::SUBPROTOCOL_MSGPACK,
        }
    }
    /// Looks a subprotocol up.
    pub fn from_subprotocol(s: &str) -> Option<Self> {
        match s {
            crate::SUBPROTOCOL_JSON => Some(Encoding::Json),
            crate::SUBPROTOCOL_MSGPACK => Some(Encoding::Msgpack),
            _ => None,
        }
    }
    /// Whether frames are binary (MessagePack) or text (JSON).
    pub fn is_binary(self) -> bool {
        self == Encoding::Msgpack
    }
    /// Appends the separator between two messages of one frame.
    pub fn separator(self) -> &'static [u8] {
        match self {
            Encoding::Json => b"\n",
            Encoding::Msgpack => b"",
        }
    }
}

// ---------------------------------------------------------------- encoding

/// Why a message could not be encoded (only a payload that cannot be transcoded).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("cannot encode message: {0}")]
pub struct EncodeError(#[from] pub DataError);

trait Sink {
    fn map(&mut self, len: usize);
    fn end_map(&mut self);
    fn array(&mut self, len: usize);
    fn end_array(&mut self);
    fn key(&mut self, k: &str);
    fn str(&mut self, s: &str);
    fn u64(&mut self, v: u64);
    fn bool(&mut self, v: bool);
    fn data(&mut self, d: &Data) -> Result<(), DataError>;
}

struct JsonSink<'a> {
    out: &'a mut Vec<u8>,
    /// One entry per open container: whether it is an array, and whether it is still empty.
    open: Vec<(bool, bool)>,
}

impl JsonSink<'_> {
    fn value(&mut self) {
        if let Some((true, first)) = self.open.last_mut() {
            if !*first {
                self.out.push(b',');
            }
            *first = false;
        }
    }
}

impl Sink for JsonSink<'_> {
    fn map(&mut self, _: usize) {
        self.value();
        self.out.push(b'{');
        self.open.push((false, true));
    }
    fn end_map(&mut self) {
        self.open.pop();
        self.out.push(b'}');
    }
    fn array(&mut self, _: usize) {
        self.value();
        self.out.push(b'[');
        self.open.push((true, true));
    }
    fn end_array(&mut self) {
        self.open.pop();
        self.out.push(b']');
    }
    fn key(&mut self, k: &str) {
        if let Some((false, first)) = self.open.last_mut() {
            if !*first {
                self.out.push(b',');
            }
            *first = false;
        }
        write_json_str(self.out, k);
        self.out.push(b':');
    }
    fn str(&mut self, s: &str) {
        self.value();
        write_json_str(self.out, s);
    }
    fn u64(&mut self, v: u64) {
        self.value();
        self.out.extend_from_slice(itoa(v).as_bytes());
    }
    fn bool(&mut self, v: bool) {
        self.value();
        self.out.extend_from_slice(if v { b"true" } else { b"false" });
    }
    fn data(&mut self, d: &Data) -> Result<(), DataError> {
        let j = d.json()?;
        self.value();
        self.out.extend_from_slice(j);
        Ok(())
    }
}

fn itoa(v: u64) -> String {
    v.to_string()
}

struct MpSink<'a> {
    out: &'a mut Vec<u8>,
}

impl Sink for MpSink<'_> {
    fn map(&mut self, len: usize) {
        mp::write::map_len(self.out, len);
    }
    fn end_map(&mut self) {}
    fn array(&mut self, len: usize) {
        mp::write::array_len(self.out, len);
    }
    fn end_array(&mut self) {}
    fn key(&mut self, k: &str) {
        mp::write::str(self.out, k);
    }
    fn str(&mut self, s: &str) {
        mp::write::str(self.out, s);
    }
    fn u64(&mut self, v: u64) {
        mp::write::uint(self.out, v);
    }
    fn bool(&mut self, v: bool) {
        mp::write::bool(self.out, v);
    }
    fn data(&mut self, d: &Data) -> Result<(), DataError> {
        let m = d.msgpack()?;
        self.out.extend_from_slice(m);
        Ok(())
    }
}

/// Something that encodes itself as one message (a map).
pub trait Encode {
    /// Appends this message in `enc` to `out` (no separator). On error `out` is unchanged.
    fn encode_into(&self, enc: Encoding, out: &mut Vec<u8>) -> Result<(), EncodeError>;

    /// This message in `enc`, as its own buffer.
    fn encode(&self, enc: Encoding) -> Result<Bytes, EncodeError> {
        let mut out = Vec::with_capacity(64);
        self.encode_into(enc, &mut out)?;
        Ok(Bytes::from(out))
    }
}

fn encode_with(
    enc: Encoding,
    out: &mut Vec<u8>,
    f: impl FnOnce(&mut dyn Sink) -> Result<(), DataError>,
) -> Result<(), EncodeError> {
    let start = out.len();
    let r = match enc {
        Encoding::Json => f(&mut JsonSink { out: &mut *out, open: Vec::new() }),
        Encoding::Msgpack => f(&mut MpSink { out: &mut *out }),
    };
    if r.is_err() {
        out.truncate(start);
    }
    r.map_err(EncodeError)
}

/// Counts present optional fields.
fn n(fields: &[bool]) -> usize {
    fields.iter().filter(|b| **b).count()
}

fn position_fields(s: &mut dyn Sink, p: &Position) {
    s.key("offset");
    s.u64(p.offset);
    s.key("epoch");
    s.str(&p.epoch);
}

fn write_position(s: &mut dyn Sink, p: &Position) {
    s.map(2);
    position_fields(s, p);
    s.end_map();
}

fn write_member(s: &mut dyn Sink, m: &Member) -> Result<(), DataError> {
    s.map(2 + n(&[m.info.is_some(), m.room_info.is_some()]));
    s.key("client");
    s.str(&m.client);
    s.key("user");
    s.str(&m.user);
    if let Some(i) = &m.info {
        s.key("info");
        s.data(i)?;
    }
    if let Some(i) = &m.room_info {
        s.key("room_info");
        s.data(i)?;
    }
    s.end_map();
    Ok(())
}

fn write_members(s: &mut dyn Sink, ms: &[Member]) -> Result<(), DataError> {
    s.array(ms.len());
    for m in ms {
        write_member(s, m)?;
    }
    s.end_array();
    Ok(())
}

/// Writes a publication's fields; `with_type` adds `type: publication` (the push form).
fn write_publication(s: &mut dyn Sink, p: &Publication, with_type: bool) -> Result<(), DataError> {
    s.map(2 + n(&[with_type, p.offset.is_some(), p.info.is_some()]));
    if with_type {
        s.key("type");
        s.str("publication");
    }
    s.key("room");
    s.str(&p.room);
    if let Some(o) = p.offset {
        s.key("offset");
        s.u64(o);
    }
    s.key("data");
    s.data(&p.data)?;
    if let Some(i) = &p.info {
        s.key("info");
        s.map(2);
        s.key("client");
        s.str(&i.client);
        s.key("user");
        s.str(&i.user);
        s.end_map();
    }
    s.end_map();
    Ok(())
}

fn write_publications(s: &mut dyn Sink, ps: &[Publication]) -> Result<(), DataError> {
    s.array(ps.len());
    for p in ps {
        write_publication(s, p, false)?;
    }
    s.end_array();
    Ok(())
}

fn head(s: &mut dyn Sink, len: usize, ty: &str, id: Option<u32>) {
    s.map(len + 1 + n(&[id.is_some()]));
    s.key("type");
    s.str(ty);
    if let Some(id) = id {
        s.key("id");
        s.u64(id as u64);
    }
}

impl Encode for ServerMessage {
    fn encode_into(&self, enc: Encoding, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        encode_with(enc, out, |s| write_server(self, s))
    }
}

fn write_server(msg: &ServerMessage, s: &mut dyn Sink) -> Result<(), DataError> {
    {
        let this = msg;
        let ty = this.type_name();
        match this {
            ServerMessage::Error { id, code, message, temporary } => {
                head(s, 2 + n(&[*temporary]), ty, *id);
                s.key("code");
                s.u64(*code as u64);
                s.key("message");
                s.str(message);
                if *temporary {
                    s.key("temporary");
                    s.bool(true);
                }
            }
            ServerMessage::Reply { id, reply } => match reply {
                Reply::Connected { client, node, ping_ms, expires_in } => {
                    head(s, 3 + n(&[expires_in.is_some()]), ty, *id);
                    s.key("client");
                    s.str(client);
                    s.key("node");
                    s.str(node);
                    s.key("ping_ms");
                    s.u64(*ping_ms);
                    if let Some(e) = expires_in {
                        s.key("expires_in");
                        s.u64(*e);
                    }
                }
                Reply::Subscribed { room, recoverable, position, recovered, publications, members } => {
                    let extra = n(&[recovered.is_some(), publications.is_some(), members.is_some()])
                        + if position.is_some() { 2 } else { 0 };
                    head(s, 2 + extra, ty, *id);
                    s.key("room");
                    s.str(room);
                    s.key("recoverable");
                    s.bool(*recoverable);
                    if let Some(p) = position {
                        position_fields(s, p);
                    }
                    if let Some(r) = recovered {
                        s.key("recovered");
                        s.bool(*r);
                    }
                    if let Some(ps) = publications {
                        s.key("publications");
                        write_publications(s, ps)?;
                    }
                    if let Some(ms) = members {
                        s.key("members");
                        write_members(s, ms)?;
                    }
                }
                Reply::Unsubscribed { room } => {
                    head(s, 1, ty, *id);
                    s.key("room");
                    s.str(room);
                }
                Reply::Published { room, position } => {
                    head(s, 1 + if position.is_some() { 2 } else { 0 }, ty, *id);
                    s.key("room");
                    s.str(room);
                    if let Some(p) = position {
                        position_fields(s, p);
                    }
                }
                Reply::Presence { room, members } => {
                    head(s, 2, ty, *id);
                    s.key("room");
                    s.str(room);
                    s.key("members");
                    write_members(s, members)?;
                }
                Reply::PresenceStats { room, clients, users } => {
                    head(s, 3, ty, *id);
                    s.key("room");
                    s.str(room);
                    s.key("clients");
                    s.u64(*clients);
                    s.key("users");
                    s.u64(*users);
                }
                Reply::History { room, position, publications } => {
                    head(s, 4, ty, *id);
                    s.key("room");
                    s.str(room);
                    position_fields(s, position);
                    s.key("publications");
                    write_publications(s, publications)?;
                }
                Reply::Rpc { data } => {
                    head(s, 1, ty, *id);
                    s.key("data");
                    s.data(data)?;
                }
                Reply::Refreshed { expires_in } => {
                    head(s, n(&[expires_in.is_some()]), ty, *id);
                    if let Some(e) = expires_in {
                        s.key("expires_in");
                        s.u64(*e);
                    }
                }
            },
            ServerMessage::Push(p) => match p {
                Push::Publication(p) => return write_publication(s, p, true),
                Push::Join { room, member } | Push::Leave { room, member } => {
                    head(s, 2, ty, None);
                    s.key("room");
                    s.str(room);
                    s.key("member");
                    write_member(s, member)?;
                }
                Push::Unsubscribe { room, code, reason } => {
                    head(s, 3, ty, None);
                    s.key("room");
                    s.str(room);
                    s.key("code");
                    s.u64(*code as u64);
                    s.key("reason");
                    s.str(reason);
                }
                Push::Message { data } => {
                    head(s, 1, ty, None);
                    s.key("data");
                    s.data(data)?;
                }
                Push::Ping => head(s, 0, ty, None),
                Push::Disconnect { code, reason, reconnect } => {
                    head(s, 3, ty, None);
                    s.key("code");
                    s.u64(*code as u64);
                    s.key("reason");
                    s.str(reason);
                    s.key("reconnect");
                    s.bool(*reconnect);
                }
            },
        }
        s.end_map();
        Ok(())
    }
}

impl Encode for Request {
    fn encode_into(&self, enc: Encoding, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        encode_with(enc, out, |s| write_request(self, s))
    }
}

fn write_request(req: &Request, s: &mut dyn Sink) -> Result<(), DataError> {
    {
        let ty = req.command.type_name();
        let id = req.id;
        match &req.command {
            Command::Connect { token, name, version, data } => {
                head(s, n(&[token.is_some(), name.is_some(), version.is_some(), data.is_some()]), ty, id);
                for (k, v) in [("token", token), ("name", name), ("version", version)] {
                    if let Some(v) = v {
                        s.key(k);
                        s.str(v);
                    }
                }
                if let Some(d) = data {
                    s.key("data");
                    s.data(d)?;
                }
            }
            Command::Subscribe { room, token, recover, presence } => {
                head(s, 1 + n(&[token.is_some(), recover.is_some(), *presence]), ty, id);
                s.key("room");
                s.str(room);
                if let Some(t) = token {
                    s.key("token");
                    s.str(t);
                }
                if let Some(p) = recover {
                    s.key("recover");
                    write_position(s, p);
                }
                if *presence {
                    s.key("presence");
                    s.bool(true);
                }
            }
            Command::Unsubscribe { room } | Command::Presence { room } | Command::PresenceStats { room } => {
                head(s, 1, ty, id);
                s.key("room");
                s.str(room);
            }
            Command::Publish { room, data, skip_self } => {
                head(s, 2 + n(&[*skip_self]), ty, id);
                s.key("room");
                s.str(room);
                s.key("data");
                s.data(data)?;
                if *skip_self {
                    s.key("skip_self");
                    s.bool(true);
                }
            }
            Command::History { room, since, limit, reverse } => {
                head(s, 1 + n(&[since.is_some(), limit.is_some(), *reverse]), ty, id);
                s.key("room");
                s.str(room);
                if let Some(p) = since {
                    s.key("since");
                    write_position(s, p);
                }
                if let Some(l) = limit {
                    s.key("limit");
                    s.u64(*l);
                }
                if *reverse {
                    s.key("reverse");
                    s.bool(true);
                }
            }
            Command::Rpc { method, data } => {
                head(s, 2, ty, id);
                s.key("method");
                s.str(method);
                s.key("data");
                s.data(data)?;
            }
            Command::Refresh { token } => {
                head(s, 1, ty, id);
                s.key("token");
                s.str(token);
            }
            Command::Pong => head(s, 0, ty, id),
        }
        s.end_map();
        Ok(())
    }
}

// ---------------------------------------------------------------- decoding

/// A frame or message that breaks the protocol: the connection is closed with 4002.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("protocol violation: {0}")]
pub struct Violation(pub String);

impl Violation {
    /// The close code for any violation.
    pub fn close_code(&self) -> CloseCode {
        CloseCode::ProtocolViolation
    }
}

/// A well-formed message whose command cannot be carried out: answered with an error.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{code:?}: {message}")]
pub struct Rejection {
    pub id: Option<u32>,
    pub code: ErrorCode,
    pub message: String,
    /// Whether the message was a `connect` (before `connect`, a rejected message of any
    /// other type is answered 113, whatever was wrong with it).
    pub is_connect: bool,
}

/// One field value, not yet interpreted.
#[derive(Clone, Copy)]
enum Raw<'a> {
    Json(&'a RawValue),
    Mp(&'a [u8]),
}

/// Why a field has the wrong shape (becomes error 107, or a violation for envelopes).
struct FieldError(String);

type FResult<T> = Result<T, FieldError>;

impl<'a> Raw<'a> {
    fn is_null(&self) -> bool {
        match self {
            Raw::Json(r) => r.get() == "null",
            Raw::Mp(b) => b.first() == Some(&0xc0),
        }
    }
    fn str(&self) -> FResult<String> {
        match self {
            Raw::Json(r) => {
                serde_json::from_str::<String>(r.get()).map_err(|_| FieldError("must be a string".into()))
            }
            Raw::Mp(b) => match Reader::new(b).token() {
                Ok(Token::Str(s)) => std::str::from_utf8(s)
                    .map(str::to_owned)
                    .map_err(|_| FieldError("is not valid UTF-8".into())),
                _ => Err(FieldError("must be a string".into())),
            },
        }
    }
    fn u64(&self) -> FResult<u64> {
        match self {
            Raw::Json(r) => serde_json::from_str::<u64>(r.get())
                .map_err(|_| FieldError("must be an unsigned integer".into())),
            Raw::Mp(b) => match Reader::new(b).token() {
                Ok(Token::Uint(u)) => Ok(u),
                Ok(Token::Int(i)) if i >= 0 => Ok(i as u64),
                _ => Err(FieldError("must be an unsigned integer".into())),
            },
        }
    }
    fn bool(&self) -> FResult<bool> {
        match self {
            Raw::Json(r) => {
                serde_json::from_str::<bool>(r.get()).map_err(|_| FieldError("must be a boolean".into()))
            }
            Raw::Mp(b) => match Reader::new(b).token() {
                Ok(Token::Bool(v)) => Ok(v),
                _ => Err(FieldError("must be a boolean".into())),
            },
        }
    }
    fn data(&self) -> FResult<Data> {
        match self {
            Raw::Json(r) => {
                // Already parsed and depth-checked by the message parser.
                Data::from_json(Bytes::copy_from_slice(r.get().as_bytes()))
                    .map_err(|e| FieldError(e.to_string()))
            }
            Raw::Mp(b) => {
                Data::from_msgpack(Bytes::copy_from_slice(b)).map_err(|e| FieldError(e.to_string()))
            }
        }
    }
    fn fields(&self) -> FResult<Fields<'a>> {
        match self {
            Raw::Json(r) => {
                let map: BTreeMap<Cow<'a, str>, &'a RawValue> =
                    serde_json::from_str(r.get()).map_err(|_| FieldError("must be a map".into()))?;
                Ok(Fields(map.into_iter().map(|(k, v)| (k, Raw::Json(v))).collect()))
            }
            Raw::Mp(b) => mp_fields(b).map_err(|e| FieldError(e.0)),
        }
    }
    fn array(&self) -> FResult<Vec<Raw<'a>>> {
        match self {
            Raw::Json(r) => {
                let v: Vec<&'a RawValue> =
                    serde_json::from_str(r.get()).map_err(|_| FieldError("must be an array".into()))?;
                Ok(v.into_iter().map(Raw::Json).collect())
            }
            Raw::Mp(b) => {
                let mut rd = Reader::new(b);
                let Ok(Token::Array(len)) = rd.token() else {
                    return Err(FieldError("must be an array".into()));
                };
                let mut out = Vec::with_capacity((len as usize).min(1024));
                for _ in 0..len {
                    out.push(Raw::Mp(rd.value(1).map_err(|e| FieldError(e.to_string()))?));
                }
                Ok(out)
            }
        }
    }
}

/// The entries of one map.
struct Fields<'a>(Vec<(Cow<'a, str>, Raw<'a>)>);

fn mp_fields(b: &[u8]) -> Result<Fields<'_>, Violation> {
    let mut rd = Reader::new(b);
    let Ok(Token::Map(len)) = rd.token() else {
        return Err(Violation("message is not a map".into()));
    };
    let mut out = Vec::with_capacity((len as usize).min(32));
    for _ in 0..len {
        let key = match rd.token() {
            Ok(Token::Str(k)) => {
                std::str::from_utf8(k).map_err(|_| Violation("map key is not UTF-8".into()))?
            }
            Ok(_) => return Err(Violation("map key is not a string".into())),
            Err(e) => return Err(Violation(e.to_string())),
        };
        let v = rd.value(1).map_err(|e| Violation(e.to_string()))?;
        out.push((Cow::Borrowed(key), Raw::Mp(v)));
    }
    Ok(Fields(out))
}

impl<'a> Fields<'a> {
    /// The value of `key`, treating `null` as absent. The last duplicate wins.
    fn get(&self, key: &str) -> Option<Raw<'a>> {
        self.get_with_null(key).filter(|r| !r.is_null())
    }
    fn get_with_null(&self, key: &str) -> Option<Raw<'a>> {
        self.0.iter().rev().find(|(k, _)| k == key).map(|(_, v)| *v)
    }
    fn req<T>(&self, key: &str, f: impl Fn(&Raw<'a>) -> FResult<T>) -> Result<T, String> {
        match self.get(key) {
            None => Err(format!("missing field `{key}`")),
            Some(r) => f(&r).map_err(|e| format!("field `{key}` {}", e.0)),
        }
    }
    fn opt<T>(&self, key: &str, f: impl Fn(&Raw<'a>) -> FResult<T>) -> Result<Option<T>, String> {
        match self.get(key) {
            None => Ok(None),
            Some(r) => f(&r).map(Some).map_err(|e| format!("field `{key}` {}", e.0)),
        }
    }
    fn flag(&self, key: &str) -> Result<bool, String> {
        Ok(self.opt(key, Raw::bool)?.unwrap_or(false))
    }
    /// `data`: required, `null` is a legal payload.
    fn data(&self, key: &str) -> Result<Data, String> {
        match self.get_with_null(key) {
            None => Err(format!("missing field `{key}`")),
            Some(r) => r.data().map_err(|e| format!("field `{key}`: {}", e.0)),
        }
    }
    fn opt_data(&self, key: &str) -> Result<Option<Data>, String> {
        match self.get(key) {
            None => Ok(None),
            Some(r) => r.data().map(Some).map_err(|e| format!("field `{key}`: {}", e.0)),
        }
    }
    fn room(&self) -> Result<Room, String> {
        let s = self.req("room", Raw::str)?;
        Room::parse(&s).map_err(|e| format!("field `room`: {e}"))
    }
    fn position(&self, key: &str) -> Result<Option<Position>, String> {
        let Some(r) = self.get(key) else {
            return Ok(None);
        };
        let f = r.fields().map_err(|e| format!("field `{key}` {}", e.0))?;
        let offset = f.req("offset", Raw::u64).map_err(|e| format!("field `{key}`: {e}"))?;
        let epoch = f.req("epoch", Raw::str).map_err(|e| format!("field `{key}`: {e}"))?;
        Ok(Some(Position { offset, epoch }))
    }
}

/// The envelope every message shares: `type` and `id`.
fn envelope<'a>(f: &Fields<'a>) -> Result<(String, Option<u32>), Violation> {
    let ty = match f.get_with_null("type") {
        None => return Err(Violation("missing `type`".into())),
        Some(r) => r.str().map_err(|_| Violation("`type` must be a string".into()))?,
    };
    let id = match f.get("id") {
        None => None,
        Some(r) => {
            let v = r.u64().map_err(|_| Violation("`id` must be an integer 1..2^32-1".into()))?;
            if v == 0 || v > u32::MAX as u64 {
                return Err(Violation("`id` must be an integer 1..2^32-1".into()));
            }
            Some(v as u32)
        }
    };
    Ok((ty, id))
}

fn command_from_fields(ty: &str, f: &Fields<'_>) -> Result<Command, (ErrorCode, String)> {
    let bad = |m: String| (ErrorCode::BadRequest, m);
    Ok(match ty {
        "connect" => Command::Connect {
            token: f.opt("token", Raw::str).map_err(bad)?,
            name: f.opt("name", Raw::str).map_err(bad)?,
            version: f.opt("version", Raw::str).map_err(bad)?,
            data: f.opt_data("data").map_err(bad)?,
        },
        "subscribe" => Command::Subscribe {
            room: f.room().map_err(bad)?,
            token: f.opt("token", Raw::str).map_err(bad)?,
            recover: f.position("recover").map_err(bad)?,
            presence: f.flag("presence").map_err(bad)?,
        },
        "unsubscribe" => Command::Unsubscribe { room: f.room().map_err(bad)? },
        "publish" => Command::Publish {
            room: f.room().map_err(bad)?,
            data: f.data("data").map_err(bad)?,
            skip_self: f.flag("skip_self").map_err(bad)?,
        },
        "presence" => Command::Presence { room: f.room().map_err(bad)? },
        "presence_stats" => Command::PresenceStats { room: f.room().map_err(bad)? },
        "history" => Command::History {
            room: f.room().map_err(bad)?,
            since: f.position("since").map_err(bad)?,
            limit: f.opt("limit", Raw::u64).map_err(bad)?,
            reverse: f.flag("reverse").map_err(bad)?,
        },
        "rpc" => Command::Rpc {
            method: f.req("method", Raw::str).map_err(bad)?,
            data: f.data("data").map_err(bad)?,
        },
        "refresh" => Command::Refresh { token: f.req("token", Raw::str).map_err(bad)? },
        "pong" => Command::Pong,
        other => {
            return Err((
                ErrorCode::UnknownCommand,
                format!("unknown command type `{}`", other.chars().take(64).collect::<String>()),
            ));
        }
    })
}

/// Splits a frame into its messages' raw values, in order; stops at the first message
/// that cannot be split off (a violation).
fn split_frame<'a>(enc: Encoding, frame: &'a [u8]) -> Vec<Result<Raw<'a>, Violation>> {
    let mut out = Vec::new();
    match enc {
        Encoding::Json => {
            let Ok(text) = std::str::from_utf8(frame) else {
                out.push(Err(Violation("frame is not valid UTF-8".into())));
                return out;
            };
            for line in text.split('\n') {
                let line = line.trim_matches(|c: char| c == '\r' || c == ' ' || c == '\t');
                if line.is_empty() {
                    continue;
                }
                let item = if json_too_deep(line.as_bytes(), mp::MAX_MESSAGE_DEPTH) {
                    Err(Violation(format!("message nested deeper than {}", mp::MAX_MESSAGE_DEPTH)))
                } else {
                    serde_json::from_str::<&RawValue>(line)
                        .map(Raw::Json)
                        .map_err(|e| Violation(format!("undecodable JSON message: {e}")))
                };
                let stop = item.is_err();
                out.push(item);
                if stop {
                    break;
                }
            }
        }
        Encoding::Msgpack => {
            let mut rd = Reader::new(frame);
            while !rd.is_empty() {
                let item = rd
                    .value(0)
                    .map(Raw::Mp)
                    .map_err(|e| Violation(format!("undecodable MessagePack message: {e}")));
                let stop = item.is_err();
                out.push(item);
                if stop {
                    break;
                }
            }
        }
    }
    out
}

/// Whether JSON text nests arrays and objects deeper than `max` (a linear scan that
/// skips strings), so that hostile nesting is refused before any parser recurses.
fn json_too_deep(text: &[u8], max: usize) -> bool {
    let (mut depth, mut in_str, mut escaped) = (0usize, false, false);
    for &b in text {
        if in_str {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_str = false;
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

fn message_fields<'a>(raw: Raw<'a>) -> Result<Fields<'a>, Violation> {
    match raw {
        Raw::Json(_) => raw.fields().map_err(|_| Violation("message is not a map".into())),
        Raw::Mp(b) => mp_fields(b),
    }
}

/// Decodes one frame from a client into its messages, in order. Each is a command or a
/// [`Rejection`] to answer with an error; a [`Violation`] anywhere is returned in place
/// of the message that broke the rules, and the caller closes the connection there.
pub fn decode_requests(enc: Encoding, frame: &[u8]) -> Vec<Result<Result<Request, Rejection>, Violation>> {
    let raws = split_frame(enc, frame);
    let mut out = Vec::with_capacity(raws.len());
    for raw in raws {
        let item = raw.and_then(message_fields).and_then(|f| {
            let (ty, id) = envelope(&f)?;
            Ok(command_from_fields(&ty, &f)
                .map(|command| Request { id, command })
                .map_err(|(code, message)| Rejection { id, code, message, is_connect: ty == "connect" }))
        });
        let stop = item.is_err();
        out.push(item);
        if stop {
            break;
        }
    }
    out
}

fn member_from(r: &Raw<'_>) -> FResult<Member> {
    let f = r.fields()?;
    Ok(Member {
        client: f.req("client", Raw::str).map_err(FieldError)?,
        user: f.req("user", Raw::str).map_err(FieldError)?,
        info: f.opt_data("info").map_err(FieldError)?,
        room_info: f.opt_data("room_info").map_err(FieldError)?,
    })
}

fn publication_from(r: &Raw<'_>) -> FResult<Publication> {
    publication_fields(&r.fields()?).map_err(FieldError)
}

fn publication_fields(f: &Fields<'_>) -> Result<Publication, String> {
    Ok(Publication {
        room: f.req("room", Raw::str)?,
        offset: f.opt("offset", Raw::u64)?,
        data: f.data("data")?,
        info: f.opt("info", |r| {
            let i = r.fields()?;
            Ok(PublisherInfo {
                client: i.req("client", Raw::str).map_err(FieldError)?,
                user: i.req("user", Raw::str).map_err(FieldError)?,
            })
        })?,
    })
}

fn list<T>(f: &Fields<'_>, key: &str, item: fn(&Raw<'_>) -> FResult<T>) -> Result<Option<Vec<T>>, String> {
    f.opt(key, |r| r.array()?.iter().map(item).collect())
}

fn position_pair(f: &Fields<'_>) -> Result<Option<Position>, String> {
    match (f.opt("offset", Raw::u64)?, f.opt("epoch", Raw::str)?) {
        (Some(offset), Some(epoch)) => Ok(Some(Position { offset, epoch })),
        _ => Ok(None),
    }
}

fn server_from_fields(ty: &str, id: Option<u32>, f: &Fields<'_>) -> Result<ServerMessage, String> {
    let reply = |reply| Ok(ServerMessage::Reply { id, reply });
    let push = |p| Ok(ServerMessage::Push(p));
    match ty {
        "error" => Ok(ServerMessage::Error {
            id,
            code: u16::try_from(f.req("code", Raw::u64)?)
                .map_err(|_| "field `code` out of range".to_string())?,
            message: f.opt("message", Raw::str)?.unwrap_or_default(),
            temporary: f.flag("temporary")?,
        }),
        "connected" => reply(Reply::Connected {
            client: f.req("client", Raw::str)?,
            node: f.req("node", Raw::str)?,
            ping_ms: f.req("ping_ms", Raw::u64)?,
            expires_in: f.opt("expires_in", Raw::u64)?,
        }),
        "subscribed" => reply(Reply::Subscribed {
            room: f.req("room", Raw::str)?,
            recoverable: f.flag("recoverable")?,
            position: position_pair(f)?,
            recovered: f.opt("recovered", Raw::bool)?,
            publications: list(f, "publications", publication_from)?,
            members: list(f, "members", member_from)?,
        }),
        "unsubscribed" => reply(Reply::Unsubscribed { room: f.req("room", Raw::str)? }),
        "published" => {
            reply(Reply::Published { room: f.req("room", Raw::str)?, position: position_pair(f)? })
        }
        "presence" => reply(Reply::Presence {
            room: f.req("room", Raw::str)?,
            members: list(f, "members", member_from)?.unwrap_or_default(),
        }),
        "presence_stats" => reply(Reply::PresenceStats {
            room: f.req("room", Raw::str)?,
            clients: f.req("clients", Raw::u64)?,
            users: f.req("users", Raw::u64)?,
        }),
        "history" => reply(Reply::History {
            room: f.req("room", Raw::str)?,
            position: position_pair(f)?.ok_or("missing `offset`/`epoch`")?,
            publications: list(f, "publications", publication_from)?.unwrap_or_default(),
        }),
        "rpc" => reply(Reply::Rpc { data: f.data("data")? }),
        "refreshed" => reply(Reply::Refreshed { expires_in: f.opt("expires_in", Raw::u64)? }),
        "publication" => push(Push::Publication(publication_fields(f)?)),
        "join" | "leave" => {
            let room = f.req("room", Raw::str)?;
            let member = f.req("member", member_from)?;
            push(if ty == "join" { Push::Join { room, member } } else { Push::Leave { room, member } })
        }
        "unsubscribe" => push(Push::Unsubscribe {
            room: f.req("room", Raw::str)?,
            code: u16::try_from(f.req("code", Raw::u64)?)
                .map_err(|_| "field `code` out of range".to_string())?,
            reason: f.opt("reason", Raw::str)?.unwrap_or_default(),
        }),
        "message" => push(Push::Message { data: f.data("data")? }),
        "ping" => push(Push::Ping),
        "disconnect" => push(Push::Disconnect {
            code: u16::try_from(f.req("code", Raw::u64)?)
                .map_err(|_| "field `code` out of range".to_string())?,
            reason: f.opt("reason", Raw::str)?.unwrap_or_default(),
            reconnect: f.flag("reconnect")?,
        }),
        other => Err(format!("unknown message type `{other}`")),
    }
}

/// Decodes one frame from a node (the client side). Messages of an unknown type are
/// returned as errors in place and do not stop the rest.
pub fn decode_server_messages(
    enc: Encoding,
    frame: &[u8],
) -> Result<Vec<Result<ServerMessage, Violation>>, Violation> {
    let raws = split_frame(enc, frame);
    Ok(raws
        .into_iter()
        .map(|raw| {
            let f = message_fields(raw?)?;
            let (ty, id) = envelope(&f)?;
            server_from_fields(&ty, id, &f).map_err(|m| Violation(format!("`{ty}`: {m}")))
        })
        .collect())
}

/// Joins encoded messages into one frame payload.
pub fn join_frame(enc: Encoding, messages: &[Bytes]) -> Vec<u8> {
    let sep = enc.separator();
    let len = messages.iter().map(|m| m.len() + sep.len()).sum();
    let mut out = Vec::with_capacity(len);
    for (i, m) in messages.iter().enumerate() {
        if i > 0 {
            out.extend_from_slice(sep);
        }
        out.extend_from_slice(m);
    }
    out
}
