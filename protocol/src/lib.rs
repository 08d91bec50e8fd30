//! The roomcast wire protocol, v1 (see `docs/protocol.md`).
//!
//! Module map:
//! - [`codes`]: the error (100..114) and close (4000..4010) code tables, as data.
//! - [`room`]: room names and their namespaces.
//! - [`data`]: application payloads, transcoded between JSON and MessagePack once.
//! - [`message`]: the messages, by direction: [`Request`]/[`Command`] from clients,
//!   [`ServerMessage`] ([`Reply`], error, [`Push`]) from nodes.
//! - [`codec`]: JSON and MessagePack encoding and frame decoding.
//! - [`mp`]: a minimal in-place MessagePack reader and writer used by the codec.

pub mod codec;
pub mod codes;
pub mod data;
pub mod message;
pub mod mp;
pub mod room;

pub use codec::{
    Encode, EncodeError, Encoding, Rejection, Violation, decode_requests, decode_server_messages, join_frame,
};
pub use codes::{CloseCode, ErrorCode};
pub use data::{Data, DataError};
pub use message::{
    Command, Member, Position, Publication, PublisherInfo, Push, Reply, Request, ServerMessage,
};
pub use room::{Room, RoomError};

/// Subprotocol for JSON text frames.
pub const SUBPROTOCOL_JSON: &str = "roomcast.v1.json";
/// Subprotocol for MessagePack binary frames.
pub const SUBPROTOCOL_MSGPACK: &str = "roomcast.v1.msgpack";
