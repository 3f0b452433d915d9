//! The one error type of the store's public API.

use crate::types::Placement;

/// What can go wrong when calling the store. Input from peers, clients and the disk always ends up
/// here, never in a panic.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum StoreError {
    /// The compare-and-set on a room's epoch failed: `current` is what the store holds now.
    #[error("epoch conflict: the room is now {current:?}")]
    EpochConflict {
        /// The placement the store holds (None: the room is not placed).
        current: Option<Placement>,
    },
    /// The request was malformed or breaks a limit (id too long, too many subscriptions, ...).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The store refused the command (unknown node, raft id collision, a limit reached).
    #[error("rejected: {0}")]
    Rejected(String),
    /// No leader is known, or the leader could not be reached, within the deadline.
    #[error("no leader available")]
    NoLeader,
    /// The operation did not finish in time. For writes, the outcome is unknown.
    #[error("timed out after {0} ms (the outcome of a write is unknown)")]
    Timeout(u64),
    /// A bounded queue was full; the request was not accepted. Retry later.
    #[error("overloaded: {0} is full")]
    Overloaded(&'static str),
    /// A record in the data directory could not be decoded.
    #[error("corrupt record in data directory: tree `{tree}`, key `{key}`: {reason}")]
    Corrupt {
        /// sled tree name.
        tree: String,
        /// key, printed (UTF-8 where possible, hex otherwise).
        key: String,
        /// what is wrong with it.
        reason: String,
    },
    /// Disk errors from sled.
    #[error("storage error: {0}")]
    Storage(String),
    /// Network or peer errors on the cluster transport.
    #[error("transport error: {0}")]
    Transport(String),
    /// The peer refused our cluster secret.
    #[error("unauthenticated: wrong cluster secret")]
    Unauthenticated,
    /// Configuration is unusable.
    #[error("bad configuration: {0}")]
    Config(String),
    /// The store is shutting down (or has shut down).
    #[error("store is shut down")]
    Shutdown,
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::Storage(e.to_string())
    }
}

/// Prints a key for an error message: as text when it is printable UTF-8, else as hex.
pub(crate) fn printable_key(key: &[u8]) -> String {
    match std::str::from_utf8(key) {
        Ok(s) if s.chars().all(|c| !c.is_control()) => s.to_string(),
        _ => key.iter().map(|b| format!("{b:02x}")).collect(),
    }
}
