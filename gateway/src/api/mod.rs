//! The backend API (spec section 5): backends publish, message users, disconnect and
//! unsubscribe connections and read presence and history without holding a WebSocket.
//!
//! Module map:
//! - [`methods`]: the methods, shared by both transports: typed requests decoded from
//!   JSON or MessagePack bodies, validation (error 107), execution against the node, and
//!   the `{result}` / `{error}` envelope.
//! - [`nats`]: `<prefix>.api.<method>` requests, served by every node in one queue group,
//!   with bounded concurrency.
//! - [`http`]: `POST /api/<method>` with `Authorization: apikey <key>`.
//! - [`control`]: the control messages through which the node that took a `send`,
//!   `disconnect` or `unsubscribe` reaches the user's connections on every node.
//! - [`rpc`]: client `rpc` forwarded to `<prefix>.rpc.<method>` responders.

pub mod control;
pub mod http;
pub mod methods;
pub mod nats;
pub mod rpc;
