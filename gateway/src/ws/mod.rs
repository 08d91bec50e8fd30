//! WebSocket framing (RFC 6455 with RFC 7692 permessage-deflate), server side.
//!
//! - [`handshake`]: validates an upgrade request and negotiates subprotocol and deflate.
//! - [`frame`]: frame headers, client frame parsing and message reassembly, server frame
//!   writing.
//! - [`deflate`]: per-message compression with no context takeover in either direction,
//!   so no compressor state lives with a connection and one compressed publication can
//!   be sent to every subscriber.

pub mod deflate;
pub mod frame;
pub mod handshake;
