//! Public value types: options, results and events.

use roomcast_protocol::{Data, Member, Position, Publication};

/// Options of [`crate::Client::history`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HistoryOptions {
    /// Only publications after this position (error 112 if it cannot be continued).
    pub since: Option<Position>,
    /// At most this many (the node's default and maximum: the room's history size);
    /// `Some(0)` returns only the position.
    pub limit: Option<u64>,
    /// Newest first.
    pub reverse: bool,
}

/// A `history` reply.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryResult {
    /// The room's current position.
    pub position: Position,
    pub publications: Vec<Publication>,
}

/// Options of [`crate::Client::subscribe_with`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SubscribeOptions {
    /// Ask for the member list in the `subscribed` reply (see
    /// [`SubscriptionEvent::Subscribed::members`]).
    pub presence: bool,
    /// Subscription token (JWT), for `token` namespaces.
    pub token: Option<String>,
    /// Recover from this position on the first subscribe (e.g. one the application
    /// stored): the publications after it are delivered first, exactly once.
    pub recover: Option<Position>,
}

/// What a [`crate::Subscription`] yields, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum SubscriptionEvent {
    /// A publication, each offset exactly once and in order.
    Publication(Publication),
    /// A member joined (rooms with `join_leave`).
    Join(Member),
    /// A member left (rooms with `join_leave`).
    Leave(Member),
    /// The subscription is (again) in place: on the first subscribe and on every
    /// resubscribe (after a reconnect, a gap, or after the application fell behind).
    /// Publications that follow continue after `position`.
    Subscribed {
        /// `None`: no recovery was asked (first subscribe, or a room without history).
        /// `Some(true)`: every missed publication follows. `Some(false)`: the node could not
        /// recover (epoch changed, too old, too many); the application should reload its
        /// state, publications continue from `position`.
        recovered: Option<bool>,
        /// The room's position, in rooms with history.
        position: Option<Position>,
        /// The member list, when [`SubscribeOptions::presence`] was asked.
        members: Option<Vec<Member>>,
    },
    /// The node ended the subscription (an `unsubscribe` push, a resubscribe refused, or
    /// the client closed for good). Nothing follows.
    Unsubscribed { code: u16, reason: String },
}

/// Connection state changes and direct messages, from [`crate::Client::events`].
#[derive(Debug, Clone, PartialEq)]
pub enum ConnectionEvent {
    /// A `connected` reply: the node accepted this connection.
    Connected { client_id: String, node: String },
    /// A connection that was up is gone. `code` is the close code (from the `disconnect`
    /// push or the close frame), `None` when the transport failed or went silent. The
    /// client reconnects unless the code says not to.
    Disconnected { code: Option<u16>, reason: String },
    /// A `message` push (a direct message to this connection or its user).
    Message(Data),
}
