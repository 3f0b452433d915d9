//! Ports: what the actors need from the rest of the node, declared here and implemented by the
//! composition root (`src/`) over the cluster store, or in memory on a single node.

use crate::ids::{NodeId, RoomId};
use futures::future::BoxFuture;

/// Where rooms live. A room has exactly one host per epoch; the epoch rises on every move.
pub trait RoomDirectory: Send + Sync + 'static {
    /// Claims `room` for `node`; returns the epoch under which this node hosts it.
    fn claim(&self, room: RoomId, node: NodeId) -> BoxFuture<'static, Result<u64, String>>;
    /// Gives up a claim made under `epoch` (the room closed). Stale epochs are ignored.
    fn release(&self, room: RoomId, node: NodeId, epoch: u64) -> BoxFuture<'static, ()>;
}

/// What the TURN relay needs from the cluster store.
pub trait TurnDirectory: Send + Sync + 'static {
    /// The shared TURN secrets; the implementation creates them if the store has none.
    fn secrets(&self) -> BoxFuture<'static, Result<crate::turn::credentials::TurnSecrets, String>>;
    /// The mesh's nodes (media addresses, relays, availability) and whether this node drains.
    fn mesh(&self) -> BoxFuture<'static, Result<crate::turn::MeshView, String>>;
}
