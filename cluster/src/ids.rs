//! Newtype ids, and the mapping from a node's public string id to its raft id.
//!
//! # Node id → raft id
//!
//! The public contract names nodes by string (the hostname by default); raft-rs needs a non-zero
//! `u64`. The mapping is a stable hash: the first 8 bytes of SHA-256 of the UTF-8 node id, big
//! endian, with the top bit cleared (so it fits an `i64` in tools that print it) and 0 mapped to 1.
//! Every node computes every id the same way, without coordination, so a first node can bootstrap
//! and a joining node knows its raft id before it has seen the log. Collisions (about 2^-31 for
//! 2^16 nodes) are checked where a node enters the cluster: `RegisterNode` is refused by the state
//! machine when another node id already holds the same raft id.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Longest id (node, room, viewer, session) the store accepts, in bytes.
pub const ID_BYTES_MAX: usize = 256;

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(
            Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
            bincode::Encode, bincode::Decode,
        )]
        #[serde(transparent)]
        pub struct $name(pub String);

        impl $name {
            /// Wraps a string.
            pub fn new(id: impl Into<String>) -> Self {
                Self(id.into())
            }
            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
            /// Checks the id is non-empty, at most [`ID_BYTES_MAX`] bytes, without control chars.
            pub fn validate(&self) -> Result<(), String> {
                validate_id(stringify!($name), &self.0)
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                Self(s.to_string())
            }
        }

        impl crate::cow_map::ShardKey for $name {
            fn shard_bytes(&self) -> &[u8] {
                self.0.as_bytes()
            }
        }
    };
}

string_id!(
    /// A node's public id (hostname by default).
    NodeId
);
string_id!(
    /// A room's id.
    RoomId
);
string_id!(
    /// A viewer's id (the identity from the token).
    ViewerId
);

/// Checks an id-like string against the store's limits.
pub(crate) fn validate_id(what: &str, id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err(format!("{what} is empty"));
    }
    if id.len() > ID_BYTES_MAX {
        return Err(format!("{what} is {} bytes, more than {ID_BYTES_MAX}", id.len()));
    }
    if id.chars().any(char::is_control) {
        return Err(format!("{what} contains control characters"));
    }
    Ok(())
}

/// The raft id of a node: see the module docs for the mapping.
pub fn raft_id_for(node: &NodeId) -> u64 {
    let digest = Sha256::digest(node.0.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    let id = u64::from_be_bytes(first) & 0x7FFF_FFFF_FFFF_FFFF;
    if id == 0 { 1 } else { id }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raft_id_is_stable_and_nonzero() {
        let a = raft_id_for(&NodeId::from("seoul-1"));
        assert_eq!(a, raft_id_for(&NodeId::from("seoul-1")));
        assert_ne!(a, raft_id_for(&NodeId::from("seoul-2")));
        assert_ne!(a, 0);
        assert_eq!(a >> 63, 0);
    }

    #[test]
    fn ids_are_validated() {
        assert!(RoomId::from("").validate().is_err());
        assert!(RoomId::new("x".repeat(ID_BYTES_MAX + 1)).validate().is_err());
        assert!(RoomId::from("a\nb").validate().is_err());
        assert!(RoomId::from("lobby").validate().is_ok());
    }
}
