//! Newtype identifiers, so a room name is never passed where a session id belongs.

use std::fmt;

macro_rules! string_id {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub String);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

string_id!(
    /// A room name as clients use it in URLs (validated at the edge).
    RoomId
);
string_id!(
    /// One WHIP/WHEP or signaling session; a UUIDv7 string.
    SessionId
);
string_id!(
    /// The token subject. Personal data: never logged unmasked.
    Identity
);
string_id!(
    /// A node of the mesh (hostname by default).
    NodeId
);

impl SessionId {
    pub fn generate() -> Self {
        SessionId(uuid::Uuid::now_v7().simple().to_string())
    }
}

/// Room names: 1 to 128 characters of `[A-Za-z0-9_.-]`, so they are safe in URLs, logs and keys.
pub const ROOM_NAME_BYTES_MAX: usize = 128;

impl RoomId {
    pub fn parse(name: &str) -> Option<RoomId> {
        let valid = !name.is_empty()
            && name.len() <= ROOM_NAME_BYTES_MAX
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
        valid.then(|| RoomId(name.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_names() {
        assert!(RoomId::parse("seoul-live_1.a").is_some());
        assert!(RoomId::parse("").is_none());
        assert!(RoomId::parse("a/b").is_none());
        assert!(RoomId::parse("방").is_none());
        assert!(RoomId::parse(&"x".repeat(129)).is_none());
        assert_ne!(SessionId::generate(), SessionId::generate());
    }
}
