//! The HTTP front: `/ws` (the WebSocket upgrade), `/healthz`, `/readyz`, `/metrics`
//! (Prometheus text format), `POST /api/<method>` (the backend API,
//! [`crate::api::http`]); serving until the node shuts down.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

use crate::connection;
use crate::limits::LimitCounters;
use crate::node::Node;
use crate::ws::handshake::{self, DEFLATE_RESPONSE, DEFLATE_RESPONSE_WINDOW_BITS};

/// The router of a node.
pub fn router(node: Arc<Node>) -> Router {
    Router::new()
        .route(&node.config.ws_path, get(ws_upgrade))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/{method}", post(crate::api::http::handle))
        .with_state(node)
}

/// Prometheus text exposition (format 0.0.4) of the node's gauges and limit counters.
async fn metrics(State(node): State<Arc<Node>>) -> Response {
    let text = render_metrics(&node);
    (StatusCode::OK, [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text)
        .into_response()
}

fn render_metrics(node: &Node) -> String {
    use std::fmt::Write as _;
    let info = node.info();
    let mut out = String::with_capacity(2048);
    let gauge = |out: &mut String, name: &str, help: &str, value: u64| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}");
    };
    gauge(&mut out, "roomcast_connections", "WebSocket connections open on this node.", info.connections);
    gauge(&mut out, "roomcast_rooms", "Rooms with at least one subscriber on this node.", info.rooms);
    gauge(
        &mut out,
        "roomcast_ready",
        "1 when the node is ready (its broker and presence are up).",
        u64::from(node.is_ready()),
    );
    out.push_str(
        "# HELP roomcast_limit_trips_total Times each limit refused a connection, command or token.\n",
    );
    out.push_str("# TYPE roomcast_limit_trips_total counter\n");
    for (name, value) in node.limits.counters.snapshot() {
        let _ = writeln!(out, "roomcast_limit_trips_total{{limit=\"{name}\"}} {value}");
    }
    out
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
        Err(e @ handshake::HandshakeError::Version) => {
            // RFC 6455 4.4: 426 with the version the server speaks.
            let mut r = plain(StatusCode::UPGRADE_REQUIRED, format!("{e}\n"));
            r.headers_mut().insert(header::SEC_WEBSOCKET_VERSION, header::HeaderValue::from_static("13"));
            return r;
        }
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
        let answer = if neg.deflate_window_bits { DEFLATE_RESPONSE_WINDOW_BITS } else { DEFLATE_RESPONSE };
        resp = resp.header(header::SEC_WEBSOCKET_EXTENSIONS, answer);
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

/// How long a client may take to send its request headers.
const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves HTTP/1.1 on `listener` until the node's shutdown token is cancelled.
///
/// An accept loop of our own rather than `axum::serve`: each connection is served by
/// hyper directly on `TokioIo<TcpStream>`, so after an upgrade the plain `TcpStream`
/// comes back (see `ws_upgrade`), with TCP_NODELAY set at accept.
pub async fn serve(node: Arc<Node>, listener: TcpListener) -> std::io::Result<()> {
    let router = router(node.clone());
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
    loop {
        let (tcp, remote) = tokio::select! {
            _ = node.shutdown.cancelled() => return Ok(()),
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors or a reset before accept: back off, go on.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let router = router.clone();
        let svc = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(ConnectInfo(remote));
            tower::Service::call(&mut router.clone(), req)
        });
        let conn = http.serve_connection(TokioIo::new(tcp), svc).with_upgrades();
        let shutdown = node.shutdown.clone();
        // Ends when the request/response exchange ends or the connection is upgraded (the
        // WebSocket then lives in its own tracked task).
        tokio::spawn(async move {
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "http connection ended");
                    }
                }
                _ = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), conn).await;
                }
            }
        });
    }
}
