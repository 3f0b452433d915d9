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

/// What a room held on this node does after its fence check ([`RoomDirectory::fence`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FenceVerdict {
    /// Nothing: the directory agrees.
    Keep,
    /// The directory names this node the host under a newer `epoch`.
    Promote { epoch: u64 },
    /// The room is hosted here under a stale epoch: its clients move to this host, it relays.
    Demote(Host),
    /// The relayed room's host changed: relay from this one.
    Follow(Host),
}

/// Where rooms live. A room has exactly one host per epoch; the epoch rises on every move, and
/// only through the directory's compare-and-set on it.
pub trait RoomDirectory: Send + Sync + 'static {
    /// Where `room` lives, placing it first if nobody hosts it (or its host is gone): by
    /// `region` preference and load (`Here` means the node asking).
    fn locate(&self, room: RoomId, region: Option<String>) -> BoxFuture<'static, Result<Location, String>>;
    /// The fence check of `room`, held here as `mode`: what the room does so that it agrees
    /// with the directory in this node's replica (cheap, possibly a little stale). The decision
    /// is the directory's (the cluster's fence rule, shared with the simulator); a placement
    /// naming a node that is no longer in the cluster is placed again first, as `locate` would.
    fn fence(&self, room: RoomId, mode: crate::room::RoomMode) -> BoxFuture<'static, Result<FenceVerdict, String>>;
    /// How often a room runs [`RoomDirectory::fence`] (the cluster's fence interval).
    fn fence_interval(&self) -> std::time::Duration;
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
