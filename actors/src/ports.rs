//! Ports: what the actors need from the rest of the node, declared here and implemented by the
//! composition root (`src/`) over the cluster store, or in memory on a single node.

use crate::ids::{NodeId, RoomId, SessionId};
use futures::future::BoxFuture;

/// A node that hosts a room, as clients and other nodes reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    pub node: NodeId,
    /// The epoch under which it hosts the room.
    pub epoch: u64,
    /// HTTP base URL (`http://ip:port`): WHIP, WHEP and `/signal` there.
    pub http_url: String,
    /// Public gRPC URL.
    pub grpc_url: String,
}

/// Where a room lives, as the directory answers a lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// This node hosts it under this epoch.
    Here { epoch: u64 },
    /// Another node does.
    There(Host),
}

/// Where rooms live. A room has exactly one host per epoch; the epoch rises on every move, and
/// only through the directory's compare-and-set on it.
pub trait RoomDirectory: Send + Sync + 'static {
    /// Where `room` lives, placing it first if nobody hosts it (or its host is gone): by
    /// `region` preference and load (`Here` means the node asking).
    fn locate(&self, room: RoomId, region: Option<String>) -> BoxFuture<'static, Result<Location, String>>;
    /// The room's current host from this node's replica (fencing checks: cheap, possibly a
    /// little stale). `None` when the room is not placed. A placement naming a node that is no
    /// longer in the cluster is placed again first, as `locate` would.
    fn current(&self, room: RoomId) -> BoxFuture<'static, Result<Option<Host>, String>>;
    /// Gives up a claim made under `epoch` (the room closed). Stale epochs are ignored.
    fn release(&self, room: RoomId, node: NodeId, epoch: u64) -> BoxFuture<'static, ()>;
}

/// Keeps a relay running; dropping it stops the relay.
pub type RelayGuard = Box<dyn std::any::Any + Send>;

/// The media relay between nodes: pulls a room's tracks from the node that hosts it.
pub trait RelaySource: Send + Sync + 'static {
    /// Pulls `room`'s tracks from its host into `into` (as [`crate::room::RoomEvent::RelayPublished`]
    /// and friends), following the host as it changes. When the directory says this node is the
    /// host, it sends [`crate::room::RoomRequest::Promote`] and stops once its current source ends.
    fn follow(&self, room: RoomId, into: actix::Addr<crate::room::Room>) -> RelayGuard;
}

/// Keeps a viewer's time counted; dropping it ends the count.
pub type UsageGuard = Box<dyn std::any::Any + Send>;

/// Where viewers' time goes (the usage ledger): a room holds one guard per subscriber session.
pub trait ViewerUsage: Send + Sync + 'static {
    fn begin(&self, room: &RoomId, session: &SessionId) -> UsageGuard;
}

/// What the TURN relay needs from the cluster store.
pub trait TurnDirectory: Send + Sync + 'static {
    /// The shared TURN secrets; the implementation creates them if the store has none.
    fn secrets(&self) -> BoxFuture<'static, Result<crate::turn::credentials::TurnSecrets, String>>;
    /// The mesh's nodes (media addresses, relays, availability) and whether this node drains.
    fn mesh(&self) -> BoxFuture<'static, Result<crate::turn::MeshView, String>>;
}
