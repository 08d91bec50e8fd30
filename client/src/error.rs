//! The error type of every fallible SDK call.

use roomcast_protocol::{DataError, RoomError};

/// Why a client call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// The node answered the command with an `error` (spec section 2.3).
    #[error("server error {code}: {message}")]
    Server {
        code: u16,
        message: String,
        /// The node says the same command may succeed if retried later.
        temporary: bool,
    },
    /// The connection dropped while the command was in flight; whether it was carried out
    /// is unknown. Nothing is retried behind the caller's back.
    #[error("disconnected before the reply arrived")]
    Disconnected,
    /// The client has ended: the node closed it for good (a close code whose table says no
    /// reconnect), or the application closed or dropped it.
    #[error("client closed ({code}: {reason})")]
    Closed { code: u16, reason: String },
    /// No reply within the request timeout.
    #[error("request timed out")]
    Timeout,
    /// Opening the WebSocket failed (refused, handshake error, wrong subprotocol).
    #[error("cannot connect to {url}: {reason}")]
    Connect { url: String, reason: String },
    /// The room name is not legal (spec section 3); nothing was sent.
    #[error("invalid room name")]
    InvalidRoom(#[from] RoomError),
    /// The payload cannot be expressed in the connection's encoding.
    #[error("invalid data")]
    Data(#[from] DataError),
    /// The node sent something the SDK did not expect (a reply of the wrong type).
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The builder was given no URL.
    #[error("no server URL given")]
    NoUrls,
    /// Reading or writing a local stream (command-line front end).
    #[error("i/o error: {0}")]
    Io(String),
}

impl ClientError {
    /// The error for a local close of the client.
    pub(crate) fn closed_locally() -> Self {
        ClientError::Closed {
            code: crate::machine::LOCAL_CLOSE_CODE,
            reason: crate::machine::LOCAL_CLOSE_REASON.to_string(),
        }
    }

    /// The node's error code, for [`ClientError::Server`].
    pub fn server_code(&self) -> Option<u16> {
        match self {
            ClientError::Server { code, .. } => Some(*code),
            _ => None,
        }
    }
}

impl From<std::io::Error> for ClientError {
    fn from(e: std::io::Error) -> Self {
        ClientError::Io(e.to_string())
    }
}
