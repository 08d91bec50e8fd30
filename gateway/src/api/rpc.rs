//! Client `rpc {method, data}` (spec section 5): forwarded as a NATS request to
//! `<prefix>.rpc.<method>` with headers `roomcast-client` and `roomcast-user`, the body
//! being `data` in the client's encoding (with `content-type: application/msgpack` for
//! MessagePack). The responder's body becomes the reply's `data`. No responder, or no
//! answer within `api.rpc_timeout_ms`, gives error 114.
//!
//! The session never waits for a responder: each call runs in its own task holding one of
//! the connection's [`MAX_IN_FLIGHT`] slots (one more call gets error 106), and its reply
//! goes to the connection's outbound queue. Calls still running when the connection
//! closes are cancelled.

use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::client::RequestErrorKind;
use bytes::Bytes;
use roomcast_protocol::{Data, Encode, Encoding, ErrorCode, Reply, ServerMessage};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use super::methods::MSGPACK_CONTENT_TYPE;
use crate::hub::SessionHandle;
use crate::outbound::Encoded;

/// Calls one connection may have in flight.
pub const MAX_IN_FLIGHT: usize = 16;
/// Longest method name, in bytes.
pub const MAX_METHOD: usize = 128;

/// Header naming the calling client.
pub const CLIENT_HEADER: &str = "roomcast-client";
/// Header naming the calling user (empty for an anonymous connection).
pub const USER_HEADER: &str = "roomcast-user";

/// A connection's RPC state.
#[derive(Debug)]
pub struct RpcCalls {
    /// One permit per call in flight; [`MAX_IN_FLIGHT`] in all.
    slots: Arc<Semaphore>,
    /// Cancelled when the connection ends: its calls stop waiting.
    cancel: CancellationToken,
}

impl Default for RpcCalls {
    fn default() -> Self {
        RpcCalls { slots: Arc::new(Semaphore::new(MAX_IN_FLIGHT)), cancel: CancellationToken::new() }
    }
}

impl Drop for RpcCalls {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// A call refused before it is sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused(pub ErrorCode, pub String);

/// Whether `method` can be a subject's last part: 1..=128 bytes of `A-Z a-z 0-9 _ - :`,
/// or several such tokens joined by single dots.
pub fn valid_method(method: &str) -> bool {
    method.len() <= MAX_METHOD
        && method
            .split('.')
            .all(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-:".contains(&b)))
}

/// Where and how to send calls.
#[derive(Debug, Clone)]
pub struct RpcTarget {
    pub client: async_nats::Client,
    /// `<prefix>.rpc.`.
    pub subject_prefix: String,
    pub timeout: Duration,
    /// Largest answer passed on to the client (else error 106).
    pub max_answer: usize,
}

impl RpcCalls {
    /// Starts a call; its reply (or error) is queued to `session` when it ends.
    pub fn start(
        &self,
        target: Option<&RpcTarget>,
        session: &Arc<SessionHandle>,
        id: Option<u32>,
        method: &str,
        data: Data,
    ) -> Result<(), Refused> {
        if !valid_method(method) {
            return Err(Refused(
                ErrorCode::BadRequest,
                format!(
                    "invalid rpc method {method:?}: 1 to {MAX_METHOD} of A-Z a-z 0-9 _ - : (dots between parts)"
                ),
            ));
        }
        let Some(target) = target else {
            return Err(Refused(
                ErrorCode::BackendUnavailable,
                "no RPC backend is configured on this node".into(),
            ));
        };
        let Ok(permit) = self.slots.clone().try_acquire_owned() else {
            return Err(Refused(
                ErrorCode::LimitExceeded,
                format!("at most {MAX_IN_FLIGHT} rpc calls in flight per connection"),
            ));
        };
        let body = match session.encoding {
            Encoding::Json => data.json().cloned(),
            Encoding::Msgpack => data.msgpack().cloned(),
        }
        .map_err(|e| Refused(ErrorCode::BadRequest, e.to_string()))?;
        let mut headers = HeaderMap::new();
        headers.insert(CLIENT_HEADER, &*session.client);
        headers.insert(USER_HEADER, &*session.user);
        if session.encoding == Encoding::Msgpack {
            headers.insert("content-type", MSGPACK_CONTENT_TYPE);
        }
        let call = Call {
            target: target.clone(),
            subject: format!("{}{method}", target.subject_prefix),
            headers,
            body,
            session: session.clone(),
            id,
            _permit: permit,
        };
        let cancel = self.cancel.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = call.run() => {}
            }
        });
        Ok(())
    }
}

/// One call in flight.
struct Call {
    target: RpcTarget,
    subject: String,
    headers: HeaderMap,
    body: Bytes,
    session: Arc<SessionHandle>,
    id: Option<u32>,
    /// The connection's slot, freed when the call ends.
    _permit: OwnedSemaphorePermit,
}

impl Call {
    async fn run(self) {
        let msg = match self.request().await {
            Ok(data) => ServerMessage::Reply { id: self.id, reply: Reply::Rpc { data } },
            Err(Refused(code, message)) => ServerMessage::error(self.id, code, message),
        };
        match msg.encode(self.session.encoding) {
            Ok(b) => {
                self.session.outbound.push(Encoded::new(b));
            }
            Err(e) => tracing::warn!(error = %e, "cannot encode an rpc reply"),
        }
    }

    async fn request(&self) -> Result<Data, Refused> {
        let request = async_nats::client::Request::new()
            .payload(self.body.clone())
            .headers(self.headers.clone())
            .timeout(Some(self.target.timeout));
        let unavailable = |m: String| Refused(ErrorCode::BackendUnavailable, m);
        let answer = match self.target.client.send_request(self.subject.clone(), request).await {
            Ok(a) => a,
            Err(e) => {
                return Err(unavailable(match e.kind() {
                    RequestErrorKind::NoResponders => format!("no responder for {}", self.subject),
                    RequestErrorKind::TimedOut => {
                        format!("no answer from {} within {:?}", self.subject, self.target.timeout)
                    }
                    _ => format!("rpc request failed: {e}"),
                }));
            }
        };
        if answer.payload.len() > self.target.max_answer {
            return Err(Refused(
                ErrorCode::LimitExceeded,
                format!("the backend's answer is larger than {} bytes", self.target.max_answer),
            ));
        }
        // An empty answer is `null`.
        if answer.payload.is_empty() {
            return Data::from_json(Bytes::from_static(b"null")).map_err(|e| unavailable(e.to_string()));
        }
        let data = match super::nats::encoding_of(answer.headers.as_ref()) {
            super::methods::BodyEncoding::Msgpack => Data::from_msgpack(answer.payload),
            super::methods::BodyEncoding::Json => Data::from_json(answer.payload),
        };
        data.map_err(|e| unavailable(format!("the backend's answer is not valid: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_names() {
        for ok in ["get_profile", "users.get", "a:b-c_1", &"x".repeat(MAX_METHOD)] {
            assert!(valid_method(ok), "{ok}");
        }
        for bad in ["", "a..b", ".a", "a.", "a b", "a.*", ">", &"x".repeat(MAX_METHOD + 1)] {
            assert!(!valid_method(bad), "{bad}");
        }
    }
}
