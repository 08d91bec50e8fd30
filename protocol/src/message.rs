//! The messages of spec section 2, named by direction: [`Request`] (a client [`Command`]
//! with its `id`) goes client -> node; [`ServerMessage`] ([`Reply`], error, [`Push`]) goes
//! node -> client.

use crate::Data;
use crate::room::Room;

/// A position in a room's history (spec section 4).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Position {
    pub offset: u64,
    pub epoch: String,
}

/// Who published a publication.
#[derive(Debug, Clone, PartialEq)]
pub struct PublisherInfo {
    pub client: String,
    pub user: String,
}

/// A presence member: one connection subscribed to a room.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    pub client: String,
    pub user: String,
    /// The connection token's `info` claim.
    pub info: Option<Data>,
    /// The subscription token's `info` claim, when one was used.
    pub room_info: Option<Data>,
}

/// A publication, as pushed and as listed in `subscribed` and `history` replies.
#[derive(Debug, Clone, PartialEq)]
pub struct Publication {
    pub room: String,
    /// Present in rooms with history.
    pub offset: Option<u64>,
    pub data: Data,
    pub info: Option<PublisherInfo>,
}

/// A client command (spec section 2.1).
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Connect { token: Option<String>, name: Option<String>, version: Option<String>, data: Option<Data> },
    Subscribe { room: Room, token: Option<String>, recover: Option<Position>, presence: bool },
    Unsubscribe { room: Room },
    Publish { room: Room, data: Data, skip_self: bool },
    Presence { room: Room },
    PresenceStats { room: Room },
    History { room: Room, since: Option<Position>, limit: Option<u64>, reverse: bool },
    Rpc { method: String, data: Data },
    Refresh { token: String },
    Pong,
}

impl Command {
    /// The wire `type` of this command.
    pub fn type_name(&self) -> &'static str {
        match self {
            Command::Connect { .. } => "connect",
            Command::Subscribe { .. } => "subscribe",
            Command::Unsubscribe { .. } => "unsubscribe",
            Command::Publish { .. } => "publish",
            Command::Presence { .. } => "presence",
            Command::PresenceStats { .. } => "presence_stats",
            Command::History { .. } => "history",
            Command::Rpc { .. } => "rpc",
            Command::Refresh { .. } => "refresh",
            Command::Pong => "pong",
        }
    }
}

/// A command as sent: with the `id` its reply will carry.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub id: Option<u32>,
    pub command: Command,
}

/// A successful reply to a command (spec section 2.1, right column).
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Connected {
        client: String,
        node: String,
        ping_ms: u64,
        expires_in: Option<u64>,
    },
    Subscribed {
        room: String,
        recoverable: bool,
        position: Option<Position>,
        recovered: Option<bool>,
        publications: Option<Vec<Publication>>,
        members: Option<Vec<Member>>,
    },
    Unsubscribed {
        room: String,
    },
    Published {
        room: String,
        position: Option<Position>,
    },
    Presence {
        room: String,
        members: Vec<Member>,
    },
    PresenceStats {
        room: String,
        clients: u64,
        users: u64,
    },
    History {
        room: String,
        position: Position,
        publications: Vec<Publication>,
    },
    Rpc {
        data: Data,
    },
    Refreshed {
        expires_in: Option<u64>,
    },
}

/// A message the node sends unasked (spec section 2.2).
#[derive(Debug, Clone, PartialEq)]
pub enum Push {
    Publication(Publication),
    Join { room: String, member: Member },
    Leave { room: String, member: Member },
    Unsubscribe { room: String, code: u16, reason: String },
    Message { data: Data },
    Ping,
    Disconnect { code: u16, reason: String, reconnect: bool },
}

/// Everything a node sends to a client.
#[derive(Debug, Clone, PartialEq)]
pub enum ServerMessage {
    Reply { id: Option<u32>, reply: Reply },
    Error { id: Option<u32>, code: u16, message: String, temporary: bool },
    Push(Push),
}

impl ServerMessage {
    /// An error reply with the table's message and temporary flag.
    pub fn error(id: Option<u32>, code: crate::ErrorCode, message: impl Into<String>) -> Self {
        ServerMessage::Error { id, code: code.number(), message: message.into(), temporary: code.temporary() }
    }

    /// The `disconnect` push for a close code, with its table reason and reconnect advice.
    pub fn disconnect(code: crate::CloseCode) -> Self {
        ServerMessage::Push(Push::Disconnect {
            code: code.number(),
            reason: code.reason().to_string(),
            reconnect: code.reconnect(),
        })
    }

    /// The wire `type` of this message.
    pub fn type_name(&self) -> &'static str {
        match self {
            ServerMessage::Error { .. } => "error",
            ServerMessage::Reply { reply, .. } => match reply {
                Reply::Connected { .. } => "connected",
                Reply::Subscribed { .. } => "subscribed",
                Reply::Unsubscribed { .. } => "unsubscribed",
                Reply::Published { .. } => "published",
                Reply::Presence { .. } => "presence",
                Reply::PresenceStats { .. } => "presence_stats",
                Reply::History { .. } => "history",
                Reply::Rpc { .. } => "rpc",
                Reply::Refreshed { .. } => "refreshed",
            },
            ServerMessage::Push(p) => match p {
                Push::Publication(_) => "publication",
                Push::Join { .. } => "join",
                Push::Leave { .. } => "leave",
                Push::Unsubscribe { .. } => "unsubscribe",
                Push::Message { .. } => "message",
                Push::Ping => "ping",
                Push::Disconnect { .. } => "disconnect",
            },
        }
    }
}
