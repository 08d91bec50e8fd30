//! The HTTP front: `/ws` (the WebSocket upgrade), `/healthz`, `/readyz`; serving until
//! the node shuts down.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

use crate::connection;
use crate::limits::LimitCounters;
use crate::node::Node;
use crate::ws::handshake::{self, DEFLATE_RESPONSE};

/// The router of a node.
pub fn router(node: Arc<Node>) -> Router {
    Router::new()
        .route(&node.config.ws_path, get(ws_upgrade))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(node)
}

async fn readyz(State(node): State<Arc<Node>>) -> Response {
    if node.is_ready() {
        (StatusCode::OK, "ready").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready").into_response()
    }
}

fn plain(status: StatusCode, text: String) -> Response {
    (status, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response()
}

async fn ws_upgrade(
    State(node): State<Arc<Node>>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    mut req: Request,
) -> Response {
    if node.shutdown.is_cancelled() {
        return plain(StatusCode::SERVICE_UNAVAILABLE, "node is shutting down\n".into());
    }
    let neg = match handshake::negotiate(req.headers(), node.config.compression) {
        Ok(n) => n,
        Err(e) => return plain(StatusCode::BAD_REQUEST, format!("{e}\n")),
    };
    // Limits, before anything is allocated for the connection.
    let limits = &node.limits;
    let client_ip = limits.client_ip.resolve(remote.ip(), req.headers());
    limits.note_forwarding_header(remote.ip(), req.headers());
    let exempt = limits.is_exempt(client_ip);
    if let Some(rate) = limits.ip_rate.as_ref().filter(|_| !exempt)
        && !rate.allow(client_ip, tokio::time::Instant::now())
    {
        LimitCounters::inc(&limits.counters.connections_rate_limited);
        tracing::debug!(client = %client_ip, "connection rate limit");
        let mut r = plain(StatusCode::TOO_MANY_REQUESTS, "too many connections from this address\n".into());
        r.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        return r;
    }
    let Some(slot) = limits.slots.try_acquire(limits.config.max_connections) else {
        LimitCounters::inc(&limits.counters.connections_over_node_limit);
        tracing::debug!(client = %client_ip, "connection limit of the node");
        let mut r = plain(StatusCode::SERVICE_UNAVAILABLE, "this node is at its connection limit\n".into());
        r.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("5"));
        return r;
    };
    let remote = SocketAddr::new(client_ip, if client_ip == remote.ip() { remote.port() } else { 0 });
    let Some(on_upgrade) = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>() else {
        return plain(StatusCode::UPGRADE_REQUIRED, "connection cannot be upgraded\n".into());
    };
    let mut resp = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::UPGRADE, "websocket")
        .header(header::CONNECTION, "upgrade")
        .header(header::SEC_WEBSOCKET_ACCEPT, neg.accept.as_str());
    if let Some(p) = neg.subprotocol {
        resp = resp.header(header::SEC_WEBSOCKET_PROTOCOL, p);
    }
    if neg.deflate {
        resp = resp.header(header::SEC_WEBSOCKET_EXTENSIONS, DEFLATE_RESPONSE);
    }
    let task_node = node.clone();
    node.tasks.spawn(async move {
        // Held as long as the connection lives.
        let _slot = slot;
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(error = %e, "upgrade failed");
                return;
            }
        };
        // Take the TCP stream back from hyper: borrowed halves, no locks, no extra buffers.
        match upgraded.downcast::<TokioIo<TcpStream>>() {
            Ok(parts) => {
                let mut tcp = parts.io.into_inner();
                let _ = tcp.set_nodelay(true);
                let (rd, wr) = tcp.split();
                connection::serve(task_node, rd, wr, parts.read_buf, neg, Some(remote)).await;
            }
            Err(upgraded) => {
                let (rd, wr) = tokio::io::split(TokioIo::new(upgraded));
                connection::serve(task_node, rd, wr, Bytes::new(), neg, Some(remote)).await;
            }
        }
    });
    resp.body(Body::empty())
        .unwrap_or_else(|_| plain(StatusCode::INTERNAL_SERVER_ERROR, "bad response\n".into()))
}

/// Serves HTTP on `listener` until the node's shutdown token is cancelled.
pub async fn serve(node: Arc<Node>, listener: TcpListener) -> std::io::Result<()> {
    let app = router(node.clone()).into_make_service_with_connect_info::<SocketAddr>();
    let shutdown = node.shutdown.clone();
    axum::serve(listener, app).with_graceful_shutdown(async move { shutdown.cancelled().await }).await
}
