//! The backend API's methods (spec section 5), shared by NATS and HTTP: request bodies in
//! JSON or MessagePack decoded into typed requests, validation (error 107), execution
//! against the node, and the `{result}` / `{error}` reply envelope in either encoding.
//!
//! A body's `data` is kept as the exact bytes the backend sent (a [`Data`]), like a client
//! publication's; every other field is read through JSON values into the typed request.

use std::sync::Arc;

use bytes::Bytes;
use roomcast_broker::{BrokerPublication, HistoryQuery};
use roomcast_protocol::mp::{Reader, Token};
use roomcast_protocol::{Data, ErrorCode, Member, Position, Room};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};
use thiserror::Error;

use super::control::Control;
use crate::config::NamespaceConfig;
use crate::node::{Node, PublishFailure};

/// The encoding of a request body and of its reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyEncoding {
    Json,
    Msgpack,
}

/// The content type of MessagePack bodies.
pub const MSGPACK_CONTENT_TYPE: &str = "application/msgpack";

impl BodyEncoding {
    /// From a `content-type` value: MessagePack for `application/msgpack` (parameters and
    /// case ignored), JSON otherwise.
    pub fn from_content_type(v: Option<&str>) -> Self {
        match v {
            Some(v)
                if v.split(';')
                    .next()
                    .is_some_and(|t| t.trim().eq_ignore_ascii_case(MSGPACK_CONTENT_TYPE)) =>
            {
                BodyEncoding::Msgpack
            }
            _ => BodyEncoding::Json,
        }
    }
}

/// A failed call: `{error: {code, message}}`.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{} {message}", code.number())]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError { code, message: message.into() }
    }
    fn bad(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }
    /// A backend failure; the details go to the log, not to the caller.
    fn internal(e: impl std::fmt::Display) -> Self {
        tracing::warn!(error = %e, "backend API call failed");
        Self::new(ErrorCode::Internal, "internal error, try again")
    }
}

/// A body that cannot be decoded at all (HTTP 400; over NATS error 107).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum BodyError {
    #[error("the body is not valid JSON: {0}")]
    Json(String),
    #[error("the body is not valid MessagePack: {0}")]
    Msgpack(String),
    #[error("the body must be a map")]
    NotAMap,
    #[error("the body's map keys must be strings")]
    NonStringKey,
    #[error("field `{0}`: {1}")]
    Field(String, String),
}

/// The API methods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Publish,
    Broadcast,
    Send,
    Disconnect,
    Unsubscribe,
    Presence,
    PresenceStats,
    History,
    HistoryRemove,
    Info,
}

impl Method {
    /// Every method, with its name on the wire.
    pub const ALL: [(Method, &'static str); 10] = [
        (Method::Publish, "publish"),
        (Method::Broadcast, "broadcast"),
        (Method::Send, "send"),
        (Method::Disconnect, "disconnect"),
        (Method::Unsubscribe, "unsubscribe"),
        (Method::Presence, "presence"),
        (Method::PresenceStats, "presence_stats"),
        (Method::History, "history"),
        (Method::HistoryRemove, "history_remove"),
        (Method::Info, "info"),
    ];

    /// The method called `name`, if any.
    pub fn parse(name: &str) -> Option<Method> {
        Self::ALL.iter().find(|(_, n)| *n == name).map(|(m, _)| *m)
    }

    /// The wire name.
    pub fn name(self) -> &'static str {
        Self::ALL.iter().find(|(m, _)| *m == self).map_or("", |(_, n)| n)
    }
}

/// A decoded body: its fields as JSON values, `data` apart.
#[derive(Debug, Default)]
pub struct Body {
    fields: Map<String, Value>,
    data: Option<Data>,
}

impl Body {
    /// The typed request; a missing or ill-typed field is error 107.
    fn parse<T: serde::de::DeserializeOwned>(&self) -> Result<T, ApiError> {
        serde_json::from_value(Value::Object(self.fields.clone())).map_err(|e| ApiError::bad(e.to_string()))
    }

    /// `data`, required.
    fn data(&self) -> Result<Data, ApiError> {
        self.data.clone().ok_or_else(|| ApiError::bad("missing field `data`"))
    }
}

/// Decodes a request body. An empty body is an empty map (`info` needs no field). A `null`
/// field counts as absent, except `data`, where `null` is the payload.
pub fn decode_body(enc: BodyEncoding, body: &[u8]) -> Result<Body, BodyError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Body::default());
    }
    let mut out = Body::default();
    match enc {
        BodyEncoding::Json => {
            let whole: &RawValue =
                serde_json::from_slice(body).map_err(|e| BodyError::Json(e.to_string()))?;
            if !whole.get().starts_with('{') {
                return Err(BodyError::NotAMap);
            }
            let map: Vec<(std::borrow::Cow<'_, str>, &RawValue)> =
                serde_json::from_str::<MapEntries<'_>>(whole.get())
                    .map_err(|e| BodyError::Json(e.to_string()))?
                    .0;
            for (k, v) in map {
                // `data: null` is a payload like any other.
                if v.get() == "null" && k != "data" {
                    continue;
                }
                if k == "data" {
                    let d = Data::from_json(Bytes::copy_from_slice(v.get().as_bytes()))
                        .map_err(|e| BodyError::Field(k.to_string(), e.to_string()))?;
                    out.data = Some(d);
                } else {
                    let value: Value =
                        serde_json::from_str(v.get()).map_err(|e| BodyError::Json(e.to_string()))?;
                    out.fields.insert(k.into_owned(), value);
                }
            }
        }
        BodyEncoding::Msgpack => {
            let mut rd = Reader::new(body);
            let len = match rd.token() {
                Ok(Token::Map(n)) => n,
                Ok(_) => return Err(BodyError::NotAMap),
                Err(e) => return Err(BodyError::Msgpack(e.to_string())),
            };
            for _ in 0..len {
                let key = match rd.token() {
                    Ok(Token::Str(k)) => std::str::from_utf8(k).map_err(|_| BodyError::NonStringKey)?,
                    Ok(_) => return Err(BodyError::NonStringKey),
                    Err(e) => return Err(BodyError::Msgpack(e.to_string())),
                };
                let raw = rd.value(1).map_err(|e| BodyError::Msgpack(e.to_string()))?;
                if raw.first() == Some(&0xc0) && key != "data" {
                    continue;
                }
                let field =
                    |e: roomcast_protocol::DataError| BodyError::Field(key.to_string(), e.to_string());
                let data = Data::from_msgpack(Bytes::copy_from_slice(raw)).map_err(field)?;
                if key == "data" {
                    out.data = Some(data);
                } else {
                    let value = data.decode::<Value>().map_err(field)?;
                    out.fields.insert(key.to_string(), value);
                }
            }
            if !rd.is_empty() {
                return Err(BodyError::Msgpack("bytes after the body's map".into()));
            }
        }
    }
    Ok(out)
}

/// A JSON map's entries in order, values unparsed.
struct MapEntries<'a>(Vec<(std::borrow::Cow<'a, str>, &'a RawValue)>);

impl<'de: 'a, 'a> Deserialize<'de> for MapEntries<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for V<'a> {
            type Value = MapEntries<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a map")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = m.next_entry::<std::borrow::Cow<'de, str>, &'de RawValue>()? {
                    out.push((k, v));
                }
                Ok(MapEntries(out))
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

/// Encodes a reply envelope: `{result}` or `{error: {code, message}}`.
pub fn encode_reply(enc: BodyEncoding, reply: &Result<Value, ApiError>) -> Bytes {
    let envelope = match reply {
        Ok(v) => json!({ "result": v }),
        Err(e) => json!({ "error": { "code": e.code.number(), "message": e.message } }),
    };
    let json = Bytes::from(serde_json::to_vec(&envelope).unwrap_or_else(|_| b"{}".to_vec()));
    match enc {
        BodyEncoding::Json => json,
        // JSON from serde_json always transcodes.
        BodyEncoding::Msgpack => Data::from_json(json)
            .and_then(|d| d.msgpack().cloned())
            .unwrap_or_else(|_| Bytes::from_static(&[0x80])),
    }
}

// ---------------------------------------------------------------------------- requests

/// Most rooms one `broadcast` publishes into.
pub const MAX_BROADCAST_ROOMS: usize = 1000;
/// Longest `idempotency_key`, in bytes.
pub const MAX_IDEMPOTENCY_KEY: usize = roomcast_broker::MAX_IDEMPOTENCY_KEY;
/// Longest `disconnect` reason, in bytes (the close frame's limit).
pub const MAX_REASON: usize = 123;
/// Longest user id accepted, in bytes.
const MAX_USER: usize = 1024;

#[derive(Debug, Deserialize)]
struct PublishReq {
    room: String,
    idempotency_key: Option<String>,
}

#[derive(Debug, Deserialize)]
struct BroadcastReq {
    rooms: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct SendReq {
    user: String,
}

#[derive(Debug, Deserialize)]
struct DisconnectReq {
    user: String,
    client: Option<String>,
    code: Option<u64>,
    reason: Option<String>,
    reconnect: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct UnsubscribeReq {
    user: String,
    room: String,
}

#[derive(Debug, Deserialize)]
struct RoomReq {
    room: String,
}

#[derive(Debug, Deserialize)]
struct SinceReq {
    offset: u64,
    epoch: String,
}

#[derive(Debug, Deserialize)]
struct HistoryReq {
    room: String,
    since: Option<SinceReq>,
    limit: Option<u64>,
    #[serde(default)]
    reverse: bool,
}

// ---------------------------------------------------------------------------- dispatch

/// Carries out one call.
pub async fn dispatch(node: &Arc<Node>, method: Method, body: Body) -> Result<Value, ApiError> {
    match method {
        Method::Publish => publish(node, &body).await,
        Method::Broadcast => broadcast(node, &body).await,
        Method::Send => send(node, &body).await,
        Method::Disconnect => disconnect(node, &body).await,
        Method::Unsubscribe => unsubscribe(node, &body).await,
        Method::Presence => presence(node, &body).await,
        Method::PresenceStats => presence_stats(node, &body).await,
        Method::History => history(node, &body).await,
        Method::HistoryRemove => history_remove(node, &body).await,
        Method::Info => info(node).await,
    }
}

fn room(name: &str) -> Result<Room, ApiError> {
    Room::parse(name).map_err(|e| ApiError::bad(format!("invalid room name {name:?}: {e}")))
}

fn namespace(node: &Node, room: &Room) -> Result<Arc<NamespaceConfig>, ApiError> {
    node.namespace(room).cloned().ok_or_else(|| {
        ApiError::new(
            ErrorCode::UnknownNamespace,
            format!("namespace {:?} is not configured", room.namespace().unwrap_or("")),
        )
    })
}

/// A user id that can be addressed: not empty (anonymous connections are not addressable).
fn user(u: String) -> Result<String, ApiError> {
    if u.is_empty() {
        return Err(ApiError::bad("`user` must not be empty: anonymous connections cannot be addressed"));
    }
    if u.len() > MAX_USER {
        return Err(ApiError::bad(format!("`user` is longer than {MAX_USER} bytes")));
    }
    Ok(u)
}

fn from_publish(f: PublishFailure) -> ApiError {
    match f {
        PublishFailure::Refused(code, message) => ApiError::new(code, message),
        PublishFailure::Broker(e) => ApiError::internal(e),
    }
}

fn position(p: Option<Position>) -> Value {
    match p {
        Some(p) => json!({ "offset": p.offset, "epoch": p.epoch }),
        None => json!({}),
    }
}

async fn publish(node: &Arc<Node>, body: &Body) -> Result<Value, ApiError> {
    let req: PublishReq = body.parse()?;
    let room = room(&req.room)?;
    let data = body.data()?;
    if let Some(k) = &req.idempotency_key
        && (k.is_empty() || k.len() > MAX_IDEMPOTENCY_KEY)
    {
        return Err(ApiError::bad(format!("`idempotency_key` must be 1 to {MAX_IDEMPOTENCY_KEY} bytes")));
    }
    let ns = node.publication_namespace(&room, &data).map_err(from_publish)?;
    let p = BrokerPublication::new(room, data);
    let pos = node.publish(p, &ns, req.idempotency_key.as_deref()).await.map_err(from_publish)?;
    Ok(position(pos))
}

async fn broadcast(node: &Arc<Node>, body: &Body) -> Result<Value, ApiError> {
    let req: BroadcastReq = body.parse()?;
    let data = body.data()?;
    if req.rooms.is_empty() {
        return Err(ApiError::bad("`rooms` must not be empty"));
    }
    if req.rooms.len() > MAX_BROADCAST_ROOMS {
        return Err(ApiError::new(
            ErrorCode::LimitExceeded,
            format!("at most {MAX_BROADCAST_ROOMS} rooms per broadcast"),
        ));
    }
    // Every room is checked before anything is published: a bad one publishes nothing.
    let mut checked = Vec::with_capacity(req.rooms.len());
    for name in &req.rooms {
        let r = room(name)?;
        let ns = node.publication_namespace(&r, &data).map_err(from_publish)?;
        checked.push((r, ns));
    }
    let publishes = checked.into_iter().map(|(r, ns)| {
        let data = data.clone();
        async move {
            let p = BrokerPublication::new(r, data);
            match node.publish(p, &ns, None).await {
                Ok(pos) => position(pos),
                Err(f) => {
                    let e = from_publish(f);
                    json!({ "error": { "code": e.code.number(), "message": e.message } })
                }
            }
        }
    });
    let results = futures_util::future::join_all(publishes).await;
    Ok(json!({ "results": results }))
}

async fn send(node: &Arc<Node>, body: &Body) -> Result<Value, ApiError> {
    let req: SendReq = body.parse()?;
    let user = user(req.user)?;
    let data = body.data()?;
    if data.wire_len() > node.config.max_data_size {
        return Err(ApiError::new(
            ErrorCode::LimitExceeded,
            format!("data is larger than {} bytes", node.config.max_data_size),
        ));
    }
    let raw = data.json().map_err(|e| ApiError::bad(e.to_string()))?;
    let raw = String::from_utf8(raw.to_vec()).map_err(|e| ApiError::bad(e.to_string()))?;
    let raw = RawValue::from_string(raw).map_err(|e| ApiError::bad(e.to_string()))?;
    node.publish_control(&Control::Send { user, data: raw }).await.map_err(ApiError::internal)?;
    Ok(json!({}))
}

async fn disconnect(node: &Arc<Node>, body: &Body) -> Result<Value, ApiError> {
    let req: DisconnectReq = body.parse()?;
    let user = user(req.user)?;
    let code = req.code.unwrap_or(4009);
    if !(4000..=4999).contains(&code) {
        return Err(ApiError::bad("`code` must be 4000..4999"));
    }
    let reason = req.reason.unwrap_or_else(|| "disconnected by the server".into());
    if reason.len() > MAX_REASON {
        return Err(ApiError::bad(format!("`reason` is longer than {MAX_REASON} bytes")));
    }
    let control = Control::Disconnect {
        user,
        client: req.client,
        code: code as u16,
        reason,
        reconnect: req.reconnect.unwrap_or(false),
    };
    node.publish_control(&control).await.map_err(ApiError::internal)?;
    Ok(json!({}))
}

async fn unsubscribe(node: &Arc<Node>, body: &Body) -> Result<Value, ApiError> {
    let req: UnsubscribeReq = body.parse()?;
    let user = user(req.user)?;
    let room = room(&req.room)?;
    namespace(node, &room)?;
    node.publish_control(&Control::Unsubscribe { user, room: room.to_string() })
        .await
        .map_err(ApiError::internal)?;
    Ok(json!({}))
}

fn data_value(d: &Data) -> Value {
    d.json().ok().and_then(|j| serde_json::from_slice(j).ok()).unwrap_or(Value::Null)
}

fn member_value(m: &Member) -> Value {
    let mut v = json!({ "client": m.client, "user": m.user });
    if let Some(i) = &m.info {
        v["info"] = data_value(i);
    }
    if let Some(i) = &m.room_info {
        v["room_info"] = data_value(i);
    }
    v
}

fn presence_room(node: &Node, body: &Body) -> Result<Room, ApiError> {
    let req: RoomReq = body.parse()?;
    let room = room(&req.room)?;
    let ns = namespace(node, &room)?;
    if !ns.presence {
        return Err(ApiError::new(ErrorCode::NotAvailable, "presence is off in this namespace"));
    }
    Ok(room)
}

async fn presence(node: &Arc<Node>, body: &Body) -> Result<Value, ApiError> {
    let room = presence_room(node, body)?;
    match node.presence.members(&room, node.config.max_presence_members).await.map_err(ApiError::internal)? {
        Some(members) => Ok(json!({ "members": members.iter().map(member_value).collect::<Vec<_>>() })),
        None => Err(ApiError::new(ErrorCode::LimitExceeded, "too many members to list; use presence_stats")),
    }
}

async fn presence_stats(node: &Arc<Node>, body: &Body) -> Result<Value, ApiError> {
    let room = presence_room(node, body)?;
    let s = node.presence.stats(&room).await.map_err(ApiError::internal)?;
    Ok(json!({ "clients": s.clients, "users": s.users }))
}

fn history_namespace(node: &Node, room: &Room) -> Result<Arc<NamespaceConfig>, ApiError> {
    let ns = namespace(node, room)?;
    if !ns.history_enabled() {
        return Err(ApiError::new(ErrorCode::NotAvailable, "history is off in this namespace"));
    }
    Ok(ns)
}

async fn history(node: &Arc<Node>, body: &Body) -> Result<Value, ApiError> {
    let req: HistoryReq = body.parse()?;
    let room = room(&req.room)?;
    let ns = history_namespace(node, &room)?;
    // The client `history` command's rules: `limit` clamped to history_size.
    let limit = req.limit.map_or(ns.history_size, |l| l.min(ns.history_size as u64) as usize);
    let since = req.since.map(|s| Position { offset: s.offset, epoch: s.epoch });
    let query = HistoryQuery { since, limit: Some(limit), reverse: req.reverse };
    let page =
        node.broker.history(&room, query, Node::history_options(&ns)).await.map_err(ApiError::internal)?;
    if !page.continuable {
        return Err(ApiError::new(ErrorCode::UnrecoverablePosition, "that position cannot be continued"));
    }
    let publications: Vec<Value> = page
        .publications
        .iter()
        .map(|p| {
            let mut v = json!({ "room": p.room.as_str(), "data": data_value(&p.data) });
            if let Some(o) = p.offset {
                v["offset"] = json!(o);
            }
            if let Some(i) = &p.info {
                v["info"] = json!({ "client": i.client, "user": i.user });
            }
            v
        })
        .collect();
    Ok(json!({ "offset": page.position.offset, "epoch": page.position.epoch, "publications": publications }))
}

async fn history_remove(node: &Arc<Node>, body: &Body) -> Result<Value, ApiError> {
    let req: RoomReq = body.parse()?;
    let room = room(&req.room)?;
    history_namespace(node, &room)?;
    node.broker.remove_history(&room).await.map_err(ApiError::internal)?;
    Ok(json!({}))
}

async fn info(node: &Arc<Node>) -> Result<Value, ApiError> {
    let mut nodes = node.live_nodes().await.map_err(ApiError::internal)?;
    // The answering node's own counts are live (the registry's are as of its last
    // heartbeat), and it is listed even before its first heartbeat.
    nodes.retain(|n| n.id != node.id);
    nodes.push(node.info());
    nodes.sort_by(|a, b| a.id.cmp(&b.id));
    let nodes: Vec<Value> =
        nodes.iter().map(|n| json!({ "id": n.id, "connections": n.connections, "rooms": n.rooms })).collect();
    Ok(json!({ "nodes": nodes }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn mp(v: &Value) -> Vec<u8> {
        Data::from_serialize(v).unwrap().msgpack().unwrap().to_vec()
    }

    #[test]
    fn bodies_in_both_encodings() {
        let v = json!({"room": "chat", "data": {"a": [1, 2]}, "extra": null, "limit": 3});
        for (enc, bytes) in
            [(BodyEncoding::Json, serde_json::to_vec(&v).unwrap()), (BodyEncoding::Msgpack, mp(&v))]
        {
            let b = decode_body(enc, &bytes).unwrap();
            assert_eq!(b.fields.get("room"), Some(&json!("chat")));
            assert_eq!(b.fields.get("limit"), Some(&json!(3)));
            assert!(!b.fields.contains_key("extra"), "null is absent");
            assert_eq!(b.data().unwrap(), Data::from_serialize(&json!({"a": [1, 2]})).unwrap());
            let r: RoomReq = b.parse().unwrap();
            assert_eq!(r.room, "chat");
        }
        // `data: null` is a payload, not an absent field.
        let v = json!({"room": "chat", "data": null});
        for (enc, bytes) in
            [(BodyEncoding::Json, serde_json::to_vec(&v).unwrap()), (BodyEncoding::Msgpack, mp(&v))]
        {
            let b = decode_body(enc, &bytes).unwrap();
            assert_eq!(b.data().unwrap(), Data::from_serialize(&Value::Null).unwrap(), "{enc:?}");
        }
        assert!(decode_body(BodyEncoding::Json, b"").unwrap().fields.is_empty());
        assert_eq!(decode_body(BodyEncoding::Json, b"[1]").unwrap_err(), BodyError::NotAMap);
        assert_eq!(decode_body(BodyEncoding::Msgpack, &[0x91, 0x01]).unwrap_err(), BodyError::NotAMap);
        assert!(matches!(decode_body(BodyEncoding::Json, b"{\"room\":"), Err(BodyError::Json(_))));
        assert!(matches!(decode_body(BodyEncoding::Msgpack, &[0x81, 0xa1]), Err(BodyError::Msgpack(_))));
        assert_eq!(
            decode_body(BodyEncoding::Msgpack, &[0x81, 0x01, 0x01]).unwrap_err(),
            BodyError::NonStringKey
        );
        // A field of the wrong type is a bad request (107), not an undecodable body.
        let b = decode_body(BodyEncoding::Json, br#"{"room": 5}"#).unwrap();
        assert_eq!(b.parse::<RoomReq>().unwrap_err().code, ErrorCode::BadRequest);
        let b = decode_body(BodyEncoding::Json, br#"{}"#).unwrap();
        assert!(b.parse::<RoomReq>().unwrap_err().message.contains("room"));
    }

    #[test]
    fn envelopes_and_methods() {
        let ok = encode_reply(BodyEncoding::Json, &Ok(json!({"offset": 1})));
        assert_eq!(&ok[..], br#"{"result":{"offset":1}}"#);
        let err = encode_reply(BodyEncoding::Msgpack, &Err(ApiError::new(ErrorCode::UnknownCommand, "no")));
        let back: Value = Data::from_msgpack(err).unwrap().decode().unwrap();
        assert_eq!(back, json!({"error": {"code": 104, "message": "no"}}));
        for (m, n) in Method::ALL {
            assert_eq!(Method::parse(n), Some(m));
            assert_eq!(m.name(), n);
        }
        assert_eq!(Method::parse("frobnicate"), None);
        assert_eq!(BodyEncoding::from_content_type(Some("Application/MsgPack; x=y")), BodyEncoding::Msgpack);
        assert_eq!(BodyEncoding::from_content_type(Some("application/json")), BodyEncoding::Json);
        assert_eq!(BodyEncoding::from_content_type(None), BodyEncoding::Json);
    }
}
