//! The HTTP face of the backend API: `POST /api/<method>` with `Authorization: apikey
//! <key>`, on the port of `/ws`.
//!
//! Statuses (checked in this order): 404 when no key is configured (the HTTP API is off),
//! 401 for a missing or wrong key (nothing is carried out), 404 for an unknown method, 413
//! for a body over `max_message_size`, 400 for an undecodable body (not JSON, not a map);
//! otherwise 200 with the `{result}` / `{error}` envelope. Every status comes with an
//! envelope body too, so a backend can always read `error.message`.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use roomcast_protocol::ErrorCode;

use super::methods::{
    ApiError, BodyEncoding, MSGPACK_CONTENT_TYPE, Method, decode_body, dispatch, encode_reply,
};
use crate::node::Node;

/// `POST /api/{method}`.
pub async fn handle(State(node): State<Arc<Node>>, Path(method): Path<String>, req: Request) -> Response {
    let Some(key) = node.config.api.key.as_deref() else {
        return error(
            StatusCode::NOT_FOUND,
            ErrorCode::NotAvailable,
            "the HTTP API is off: no API key configured",
        );
    };
    if !authorized(req.headers(), key) {
        let mut r = error(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, "missing or wrong API key");
        r.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("apikey"));
        return r;
    }
    let Some(m) = Method::parse(&method) else {
        return error(
            StatusCode::NOT_FOUND,
            ErrorCode::UnknownCommand,
            &format!("unknown method {method:?}"),
        );
    };
    let enc = BodyEncoding::from_content_type(
        req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()),
    );
    let limit = node.config.max_message_size;
    let body = match axum::body::to_bytes(req.into_body(), limit).await {
        Ok(b) => b,
        Err(e) => {
            let too_large =
                std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            return if too_large {
                error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    ErrorCode::LimitExceeded,
                    &format!("the body is larger than {limit} bytes"),
                )
            } else {
                error(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, &format!("cannot read the body: {e}"))
            };
        }
    };
    let body = match decode_body(enc, &body) {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, &e.to_string()),
    };
    let result = dispatch(&node, m, body).await;
    envelope(StatusCode::OK, enc, &result)
}

/// Whether the request carries `Authorization: apikey <key>` (the scheme in any case),
/// compared in constant time.
fn authorized(headers: &HeaderMap, key: &str) -> bool {
    let Some(value) = headers.get(header::AUTHORIZATION).map(|v| v.as_bytes()) else {
        return false;
    };
    let Some((scheme, given)) = value.split_at_checked(7) else {
        return false;
    };
    scheme.eq_ignore_ascii_case(b"apikey ") && constant_time_eq(given, key.as_bytes())
}

/// Equality whose time depends on the lengths only, not on where the bytes differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn envelope(status: StatusCode, enc: BodyEncoding, result: &Result<serde_json::Value, ApiError>) -> Response {
    let content_type = match enc {
        BodyEncoding::Json => "application/json",
        BodyEncoding::Msgpack => MSGPACK_CONTENT_TYPE,
    };
    let body: Bytes = encode_reply(enc, result);
    (status, [(header::CONTENT_TYPE, content_type)], Body::from(body)).into_response()
}

fn error(status: StatusCode, code: ErrorCode, message: &str) -> Response {
    envelope(status, BodyEncoding::Json, &Err(ApiError::new(code, message)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_key_header() {
        let key = "0123456789abcdef";
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(
                header::AUTHORIZATION,
                header::HeaderValue::from_str(v).unwrap_or(header::HeaderValue::from_static("x")),
            );
            m
        };
        assert!(authorized(&h("apikey 0123456789abcdef"), key));
        assert!(authorized(&h("ApiKey 0123456789abcdef"), key));
        assert!(!authorized(&h("apikey 0123456789abcdeF"), key));
        assert!(!authorized(&h("apikey 0123456789abcde"), key));
        assert!(!authorized(&h("Bearer 0123456789abcdef"), key));
        assert!(!authorized(&h("apikey"), key));
        assert!(!authorized(&HeaderMap::new(), key));
    }
}
