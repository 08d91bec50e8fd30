//! Room names (spec section 3): 1 to 200 bytes of `A-Z a-z 0-9 . _ - : @ = , /`; the part
//! before the first `:` is the namespace.

use std::fmt;
use std::sync::Arc;

/// Longest legal room name, in bytes.
pub const MAX_ROOM_LEN: usize = 200;

/// Why a room name is not legal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoomError {
    #[error("room name is empty")]
    Empty,
    #[error("room name is longer than {MAX_ROOM_LEN} bytes")]
    TooLong,
    #[error("room name has a character outside A-Z a-z 0-9 . _ - : @ = , /")]
    BadCharacter,
    #[error("room name has an empty namespace or an empty name after ':'")]
    EmptyPart,
}

/// A validated room name. Cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Room(Arc<str>);

fn legal_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':' | b'@' | b'=' | b',' | b'/')
}

impl Room {
    /// Validates a room name.
    pub fn parse(name: &str) -> Result<Self, RoomError> {
        if name.is_empty() {
            return Err(RoomError::Empty);
        }
        if name.len() > MAX_ROOM_LEN {
            return Err(RoomError::TooLong);
        }
        if !name.bytes().all(legal_byte) {
            return Err(RoomError::BadCharacter);
        }
        if let Some((ns, rest)) = name.split_once(':')
            && (ns.is_empty() || rest.is_empty())
        {
            return Err(RoomError::EmptyPart);
        }
        Ok(Room(Arc::from(name)))
    }

    /// The room name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The namespace: the part before the first `:`, or `None` for the default namespace.
    pub fn namespace(&self) -> Option<&str> {
        self.0.split_once(':').map(|(ns, _)| ns)
    }

    /// The part after the namespace (the whole name in the default namespace).
    pub fn local_name(&self) -> &str {
        self.0.split_once(':').map_or(&self.0, |(_, rest)| rest)
    }
}

impl fmt::Debug for Room {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for Room {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::ops::Deref for Room {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for Room {
    type Err = RoomError;
    fn from_str(s: &str) -> Result<Self, RoomError> {
        Room::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legal_names() {
        for n in ["a", "chat:lobby", "a:b:c", "x.y_z-1@host=,/", &"r".repeat(200)] {
            assert!(Room::parse(n).is_ok(), "{n}");
        }
        let r = Room::parse("chat:lobby:1").unwrap();
        assert_eq!(r.namespace(), Some("chat"));
        assert_eq!(r.local_name(), "lobby:1");
        assert_eq!(Room::parse("lobby").unwrap().namespace(), None);
    }

    #[test]
    fn illegal_names() {
        assert_eq!(Room::parse(""), Err(RoomError::Empty));
        assert_eq!(Room::parse(&"r".repeat(201)), Err(RoomError::TooLong));
        for n in ["a b", "é", "a*", "a\n", "a#", "a\0"] {
            assert_eq!(Room::parse(n), Err(RoomError::BadCharacter), "{n:?}");
        }
        assert_eq!(Room::parse(":x"), Err(RoomError::EmptyPart));
        assert_eq!(Room::parse("chat:"), Err(RoomError::EmptyPart));
        assert_eq!(Room::parse(":"), Err(RoomError::EmptyPart));
    }
}
