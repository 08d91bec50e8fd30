//! The NATS face of the backend API: every node subscribes to `<prefix>.api.>` in the
//! queue group [`QUEUE_GROUP`], so each request is served by exactly one node. The body is
//! JSON, or MessagePack with `content-type: application/msgpack`; the reply (to the
//! request's reply subject, in the same encoding) is `{result}` or `{error}`. A message
//! without a reply subject is carried out and not answered.
//!
//! At most `api.max_in_flight` requests run at once per node; beyond that the serving loop
//! stops taking messages until one finishes (backpressure: NATS buffers, then the client
//! library reports a slow consumer), rather than spawning without bound.

use std::sync::{Arc, Weak};

use async_nats::{HeaderMap, Message};
use futures_util::StreamExt as _;
use roomcast_protocol::ErrorCode;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::methods::{
    ApiError, BodyEncoding, MSGPACK_CONTENT_TYPE, Method, decode_body, dispatch, encode_reply,
};
use crate::node::Node;

/// The queue group of every node's API subscription.
pub const QUEUE_GROUP: &str = "roomcast-api";

/// Subscribes this node to the API subjects (confirmed by the server before this returns,
/// so a request sent afterwards is served) and spawns the serving loop. The loop ends when
/// the node shuts down (its subscription is drained so that other nodes take the
/// requests) or is dropped.
pub async fn start(node: &Arc<Node>, client: async_nats::Client) -> Result<(), async_nats::Error> {
    let prefix = node.config.api.prefix.clone();
    let subject = format!("{prefix}.api.>");
    let sub = client.queue_subscribe(subject.clone(), QUEUE_GROUP.to_string()).await?;
    // `flush` only empties the client's buffer: a request to an inbox nobody listens on is
    // answered "no responders" by the server after it processed the SUB above.
    match client.request(client.new_inbox(), bytes::Bytes::new()).await {
        Ok(_) => {}
        Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => {}
        Err(e) => return Err(e.into()),
    }
    tracing::info!(subject, group = QUEUE_GROUP, "serving the backend API over NATS");
    let serving = Serving {
        node: Arc::downgrade(node),
        client,
        api_prefix: format!("{prefix}.api."),
        in_flight: Arc::new(Semaphore::new(node.config.api.max_in_flight)),
    };
    tokio::spawn(serving.run(sub, node.shutdown.clone()));
    Ok(())
}

/// What the serving loop needs.
struct Serving {
    /// The node, upgraded per request (the loop must not keep it alive).
    node: Weak<Node>,
    client: async_nats::Client,
    /// `<prefix>.api.`, stripped from subjects to find the method.
    api_prefix: String,
    /// Permits for requests being handled; its size is `api.max_in_flight`.
    in_flight: Arc<Semaphore>,
}

impl Serving {
    async fn run(self, mut sub: async_nats::Subscriber, shutdown: CancellationToken) {
        let mut draining = false;
        loop {
            let msg = tokio::select! {
                _ = shutdown.cancelled(), if !draining => {
                    // Take no new requests; those already delivered here are still served.
                    draining = true;
                    if let Err(e) = sub.drain().await {
                        tracing::warn!(error = %e, "draining the API subscription failed");
                        return;
                    }
                    continue;
                }
                m = sub.next() => match m {
                    Some(m) => m,
                    None => return,
                },
            };
            let Ok(permit) = self.in_flight.clone().acquire_owned().await else {
                return;
            };
            let Some(node) = self.node.upgrade() else {
                return;
            };
            let client = self.client.clone();
            let method =
                msg.subject.as_str().strip_prefix(self.api_prefix.as_str()).unwrap_or("").to_string();
            tokio::spawn(async move {
                handle(&node, &client, &method, msg).await;
                drop(permit);
            });
        }
    }
}

/// The encoding a message's `content-type` header asks for.
pub fn encoding_of(headers: Option<&HeaderMap>) -> BodyEncoding {
    BodyEncoding::from_content_type(headers.and_then(|h| h.get("content-type")).map(|v| v.as_str()))
}

/// Serves one request.
async fn handle(node: &Arc<Node>, client: &async_nats::Client, method: &str, msg: Message) {
    let enc = encoding_of(msg.headers.as_ref());
    let result = match Method::parse(method) {
        None => Err(ApiError::new(ErrorCode::UnknownCommand, format!("unknown method {method:?}"))),
        Some(m) => match decode_body(enc, &msg.payload) {
            Ok(body) => dispatch(node, m, body).await,
            Err(e) => Err(ApiError::new(ErrorCode::BadRequest, e.to_string())),
        },
    };
    if let Err(e) = &result {
        tracing::debug!(method, error = %e, "backend API call refused");
    }
    let Some(reply) = msg.reply else {
        return;
    };
    let payload = encode_reply(enc, &result);
    let sent = match enc {
        BodyEncoding::Json => client.publish(reply, payload).await,
        BodyEncoding::Msgpack => {
            let mut h = HeaderMap::new();
            h.insert("content-type", MSGPACK_CONTENT_TYPE);
            client.publish_with_headers(reply, h, payload).await
        }
    };
    if let Err(e) = sent {
        tracing::warn!(method, error = %e, "backend API reply not sent");
    }
}
