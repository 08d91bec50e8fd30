//! The roomcast node.
//!
//! Module map, from the wire inwards:
//! - [`server`]: HTTP routes (`/ws`, `/healthz`, `/readyz`) and serving until shutdown.
//! - [`ws`]: WebSocket framing: handshake negotiation, frames, permessage-deflate.
//! - [`connection`]: the task per connection: framing <-> session, timers, backpressure.
//! - [`session`]: one connection's protocol behaviour (every command of spec section 2).
//! - [`outbound`]: a connection's bounded outbound queue and shared encoded messages.
//! - [`hub`]: this node's subscriptions by room, and fan-out.
//! - [`node`]: owns the hub, broker, presence and configuration.
//! - [`api`]: the backend API (NATS and HTTP), control messages between nodes, client RPC.
//! - [`config`]: typed configuration from TOML and environment.
//! - [`limits`]: abuse limits (connection and command rates, connection counts) and
//!   their counters; [`client_ip`]: the client's address behind trusted proxies.

pub mod api;
pub mod client_ip;
pub mod config;
pub mod connection;
pub mod hub;
pub mod limits;
pub mod node;
pub mod outbound;
pub mod server;
pub mod session;
pub mod ws;

pub use config::Config;
pub use node::Node;
