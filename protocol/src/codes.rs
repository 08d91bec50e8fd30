//! Error and close codes as data: one table each, shared by the gateway and the client SDK
//! (spec sections 2.3 and 2.4).

/// A command failure, sent as `{type: "error", id, code, message, temporary?}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    Internal,
    Unauthorized,
    UnknownNamespace,
    PermissionDenied,
    UnknownCommand,
    AlreadySubscribed,
    LimitExceeded,
    BadRequest,
    NotAvailable,
    TokenExpired,
    TooManyRequests,
    UnrecoverablePosition,
    NotConnected,
    BackendUnavailable,
}

/// One row of the error table.
#[derive(Debug, Clone, Copy)]
pub struct ErrorRow {
    pub code: ErrorCode,
    pub number: u16,
    pub message: &'static str,
    /// The client may retry the same command later.
    pub temporary: bool,
}

/// The error table of spec section 2.3.
pub const ERRORS: &[ErrorRow] = &[
    row(ErrorCode::Internal, 100, "internal error", true),
    row(ErrorCode::Unauthorized, 101, "unauthorized", false),
    row(ErrorCode::UnknownNamespace, 102, "unknown namespace", false),
    row(ErrorCode::PermissionDenied, 103, "permission denied", false),
    row(ErrorCode::UnknownCommand, 104, "unknown command type", false),
    row(ErrorCode::AlreadySubscribed, 105, "already subscribed", false),
    row(ErrorCode::LimitExceeded, 106, "limit exceeded", false),
    row(ErrorCode::BadRequest, 107, "bad request", false),
    row(ErrorCode::NotAvailable, 108, "not available", false),
    row(ErrorCode::TokenExpired, 109, "token expired", false),
    row(ErrorCode::TooManyRequests, 111, "too many requests", true),
    row(ErrorCode::UnrecoverablePosition, 112, "unrecoverable position", false),
    row(ErrorCode::NotConnected, 113, "not connected", false),
    row(ErrorCode::BackendUnavailable, 114, "backend unavailable", true),
];

const fn row(code: ErrorCode, number: u16, message: &'static str, temporary: bool) -> ErrorRow {
    ErrorRow { code, number, message, temporary }
}

impl ErrorCode {
    fn row(self) -> &'static ErrorRow {
        // The table lists every variant exactly once (checked by a test).
        ERRORS.iter().find(|r| r.code == self).unwrap_or(&ERRORS[0])
    }
    /// The number on the wire.
    pub fn number(self) -> u16 {
        self.row().number
    }
    /// The default human-readable message.
    pub fn message(self) -> &'static str {
        self.row().message
    }
    /// Whether the client may retry.
    pub fn temporary(self) -> bool {
        self.row().temporary
    }
    /// Looks a wire number up in the table.
    pub fn from_number(n: u16) -> Option<Self> {
        ERRORS.iter().find(|r| r.number == n).map(|r| r.code)
    }
}

/// Why a node closes a connection: sent in `disconnect` and as the WebSocket close code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseCode {
    Shutdown,
    Unauthorized,
    ProtocolViolation,
    SlowConsumer,
    TokenExpired,
    HandshakeTimeout,
    PongTimeout,
    TooManyRequests,
    MessageTooLarge,
    DisconnectedByServer,
    ConnectionLimit,
}

/// One row of the close table.
#[derive(Debug, Clone, Copy)]
pub struct CloseRow {
    pub code: CloseCode,
    pub number: u16,
    pub reason: &'static str,
    /// Whether a client should reconnect after this close.
    pub reconnect: bool,
}

/// The close table of spec section 2.4.
pub const CLOSES: &[CloseRow] = &[
    close(CloseCode::Shutdown, 4000, "node shutting down", true),
    close(CloseCode::Unauthorized, 4001, "unauthorized", false),
    close(CloseCode::ProtocolViolation, 4002, "protocol violation", false),
    close(CloseCode::SlowConsumer, 4003, "slow consumer", true),
    close(CloseCode::TokenExpired, 4004, "token expired", true),
    close(CloseCode::HandshakeTimeout, 4005, "no connect within the handshake timeout", true),
    close(CloseCode::PongTimeout, 4006, "no pong within the pong timeout", true),
    close(CloseCode::TooManyRequests, 4007, "too many requests", true),
    close(CloseCode::MessageTooLarge, 4008, "message too large", false),
    close(CloseCode::DisconnectedByServer, 4009, "disconnected by the server", false),
    close(CloseCode::ConnectionLimit, 4010, "connection limit reached", true),
];

const fn close(code: CloseCode, number: u16, reason: &'static str, reconnect: bool) -> CloseRow {
    CloseRow { code, number, reason, reconnect }
}

impl CloseCode {
    fn row(self) -> &'static CloseRow {
        CLOSES.iter().find(|r| r.code == self).unwrap_or(&CLOSES[0])
    }
    /// The number on the wire.
    pub fn number(self) -> u16 {
        self.row().number
    }
    /// The default reason text.
    pub fn reason(self) -> &'static str {
        self.row().reason
    }
    /// Whether a client should reconnect.
    pub fn reconnect(self) -> bool {
        self.row().reconnect
    }
    /// Looks a wire number up in the table.
    pub fn from_number(n: u16) -> Option<Self> {
        CLOSES.iter().find(|r| r.number == n).map(|r| r.code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_code_has_one_row() {
        let all = [
            ErrorCode::Internal,
            ErrorCode::Unauthorized,
            ErrorCode::UnknownNamespace,
            ErrorCode::PermissionDenied,
            ErrorCode::UnknownCommand,
            ErrorCode::AlreadySubscribed,
            ErrorCode::LimitExceeded,
            ErrorCode::BadRequest,
            ErrorCode::NotAvailable,
            ErrorCode::TokenExpired,
            ErrorCode::TooManyRequests,
            ErrorCode::UnrecoverablePosition,
            ErrorCode::NotConnected,
            ErrorCode::BackendUnavailable,
        ];
        assert_eq!(all.len(), ERRORS.len());
        for c in all {
            assert_eq!(ERRORS.iter().filter(|r| r.code == c).count(), 1, "{c:?}");
            assert_eq!(ErrorCode::from_number(c.number()), Some(c));
        }
        assert_eq!(ErrorCode::BadRequest.number(), 107);
        assert!(ErrorCode::Internal.temporary());
        assert!(!ErrorCode::BadRequest.temporary());
    }

    #[test]
    fn every_close_code_has_one_row() {
        for (i, r) in CLOSES.iter().enumerate() {
            assert_eq!(r.number, 4000 + i as u16);
            assert_eq!(CloseCode::from_number(r.number), Some(r.code));
            assert_eq!(r.code.number(), r.number);
        }
        assert!(!CloseCode::ProtocolViolation.reconnect());
        assert!(CloseCode::SlowConsumer.reconnect());
    }
}
