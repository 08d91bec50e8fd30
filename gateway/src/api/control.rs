//! Control messages: what the backend API asks of every node's local connections (`send`,
//! `disconnect`, `unsubscribe`). The node that takes the call publishes one control
//! message through the broker (`publish_control`, to every node, itself included); each
//! node applies it to its own connections of that user, found in the hub's user index.
//!
//! Wire form: a small JSON map keyed by the kind (`{"send":{"user":…,"data":…}}`; `data`
//! kept as raw JSON). A node that receives a control message it cannot decode (a newer
//! node's kind) logs it and goes on.

use bytes::Bytes;
use roomcast_protocol::{Data, Encode, Encoding, Push, Room, ServerMessage};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::hub::{Hub, SessionAction};
use crate::outbound::{Disconnect, Encoded};

/// The `code` of the `unsubscribe` push sent when the server API ends a subscription.
pub const UNSUBSCRIBE_CODE: u16 = 4009;
/// Its `reason`.
pub const UNSUBSCRIBE_REASON: &str = "unsubscribed by the server API";

/// One control message.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Control {
    /// A `message` push with `data` (JSON) to every connection of `user`.
    Send { user: String, data: Box<RawValue> },
    /// Close every connection of `user` (or only `client`) with this `disconnect`.
    Disconnect {
        user: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client: Option<String>,
        code: u16,
        reason: String,
        reconnect: bool,
    },
    /// End the subscriptions of `user`'s connections to `room`.
    Unsubscribe { user: String, room: String },
}

impl Control {
    /// The wire form.
    pub fn encode(&self) -> Bytes {
        // Serializing these plain fields cannot fail.
        Bytes::from(serde_json::to_vec(self).unwrap_or_default())
    }

    /// Reads the wire form.
    pub fn decode(payload: &[u8]) -> Result<Control, serde_json::Error> {
        serde_json::from_slice(payload)
    }
}

/// Applies a control message to this node's connections. Never blocks: it only queues.
/// Returns how many local connections it reached.
pub fn apply(hub: &Hub, payload: &[u8]) -> usize {
    let control = match Control::decode(payload) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "undecodable control message ignored");
            return 0;
        }
    };
    match control {
        Control::Send { user, data } => {
            let sessions = hub.sessions_of(&user);
            if sessions.is_empty() {
                return 0;
            }
            let data = match Data::from_json(Bytes::copy_from_slice(data.get().as_bytes())) {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(error = %e, "control `send` with invalid data ignored");
                    return 0;
                }
            };
            let msg = ServerMessage::Push(Push::Message { data });
            let mut encoded: [Option<std::sync::Arc<Encoded>>; 2] = [None, None];
            let mut n = 0;
            for s in &sessions {
                let slot = match s.encoding {
                    Encoding::Json => 0,
                    Encoding::Msgpack => 1,
                };
                if encoded[slot].is_none() {
                    match msg.encode(s.encoding) {
                        Ok(b) => encoded[slot] = Some(Encoded::new(b)),
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot encode a `message` push");
                            continue;
                        }
                    }
                }
                if let Some(e) = &encoded[slot] {
                    s.outbound.push(e.clone());
                    n += 1;
                }
            }
            n
        }
        Control::Disconnect { user, client, code, reason, reconnect } => {
            let mut n = 0;
            for s in hub.sessions_of(&user) {
                if client.as_deref().is_some_and(|c| c != &*s.client) {
                    continue;
                }
                s.outbound.close_with(Disconnect { code, reason: reason.clone(), reconnect });
                n += 1;
            }
            n
        }
        Control::Unsubscribe { user, room } => {
            let Ok(room) = Room::parse(&room) else {
                tracing::warn!(room, "control `unsubscribe` with an invalid room ignored");
                return 0;
            };
            let sessions = hub.sessions_of(&user);
            for s in &sessions {
                s.act(SessionAction::Unsubscribe {
                    room: room.clone(),
                    code: UNSUBSCRIBE_CODE,
                    reason: UNSUBSCRIBE_REASON.into(),
                });
            }
            sessions.len()
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::Arc;

    use roomcast_protocol::decode_server_messages;

    use super::*;
    use crate::hub::SessionHandle;
    use crate::outbound::Outbound;

    #[tokio::test]
    async fn controls_reach_the_users_sessions() {
        let (hub, _rx) = Hub::new(1 << 20);
        let mk = |c: &str, u: &str, enc| {
            let (h, rx) = SessionHandle::new(c.into(), u.into(), enc, Outbound::new(1 << 20));
            let h = Arc::new(h);
            hub.index_user(&h);
            (h, rx)
        };
        let (a, mut arx) = mk("a", "alice", Encoding::Json);
        let (b, _brx) = mk("b", "alice", Encoding::Msgpack);
        let (c, _crx) = mk("c", "carol", Encoding::Json);

        let send =
            Control::Send { user: "alice".into(), data: RawValue::from_string("{\"k\":1}".into()).unwrap() };
        assert_eq!(apply(&hub, &send.encode()), 2);
        for h in [&a, &b] {
            let (q, _) = h.outbound.take();
            let msgs = decode_server_messages(h.encoding, q[0].raw()).unwrap();
            let expected = ServerMessage::Push(Push::Message {
                data: Data::from_serialize(&serde_json::json!({"k": 1})).unwrap(),
            });
            assert_eq!(msgs[0].as_ref().unwrap(), &expected);
        }
        assert!(c.outbound.is_empty());

        let unsub = Control::Unsubscribe { user: "alice".into(), room: "chat".into() };
        assert_eq!(apply(&hub, &unsub.encode()), 2);
        assert!(matches!(arx.try_recv(), Ok(SessionAction::Unsubscribe { code: 4009, .. })));

        let one = Control::Disconnect {
            user: "alice".into(),
            client: Some("b".into()),
            code: 4123,
            reason: "bye".into(),
            reconnect: true,
        };
        assert_eq!(apply(&hub, &one.encode()), 1);
        assert_eq!(b.outbound.custom_close().unwrap().code, 4123);
        assert!(a.outbound.close_requested().is_none());
        assert_eq!(apply(&hub, b"{\"from_the_future\":{}}"), 0);
        assert_eq!(apply(&hub, b"\xff"), 0);
    }
}
