//! mediamesh-cluster: the Raft-replicated store embedded in every mediamesh node.
//!
//! # API boundary
//!
//! The edge (`src/`) calls [`Store`]: [`Store::open`] takes a [`StoreConfig`] and a shutdown
//! future and returns a cloneable handle; the node serves [`server::service`] on its cluster
//! port itself ([`server::start`] does both, for tests and benchmarks). The handle has async
//! methods for membership ([`Store::register_node`], [`Store::heartbeat`],
//! [`Store::remove_node`]), room placement as a compare-and-set on the epoch
//! ([`Store::place_room_cas`]), resumable viewer state ([`Store::upsert_viewer`], batched per
//! node), TURN secret rotation, cluster settings, reads with an explicit [`Consistency`]
//! (linearizable through ReadIndex by default, or local), and [`Store::status`] for the admin API.
//! All types crossing the boundary are plain Rust structs in [`types`] and [`ids`]; errors are
//! [`StoreError`].
//!
//! # Architecture invariant
//!
//! `cluster` knows nothing of actix or webrtc: it depends on raft-rs, sled, tonic and the
//! generated `mediamesh-proto` types only. `actors/` reaches it through ports that `src/`
//! implements. Serialization happens at the edges of this crate: protobuf on the wire
//! ([`transport`], [`server`]), versioned bincode on disk and inside raft entries ([`codec`]).
//!
//! # Inside
//!
//! - [`driver`]: the sans-IO wrapper around `raft::RawNode` (no IO, no clock).
//! - [`replica`]: [`replica::ReplicaCore`], everything a replica decides (sans-IO), driven by
//!   the store's replica task and by the simulator.
//! - [`state_machine`] and [`cow_map`]: the pure state machine, applied in memory.
//! - [`storage`]: the sled log, hard state and snapshot (data directory format 2).
//! - [`store`]: the tasks doing the IO (replica task, batcher, join/registration/heartbeat
//!   lifecycle) and the public handle.
//! - [`transport`] and [`server`]: the tonic service on the cluster port (the server depends on
//!   the store, not the other way round).
//!
//! Node ids are strings; raft ids are derived by a stable hash (see [`ids`]).

pub mod codec;
pub mod command;
pub mod cow_map;
pub mod driver;
pub mod error;
pub mod ids;
pub mod mesh;
pub mod metrics;
pub mod replica;
pub mod server;
pub mod state_machine;
pub mod storage;
pub mod store;
pub mod trace_context;
pub mod transport;
pub mod types;

pub use error::StoreError;
pub use ids::{NodeId, RoomId, ViewerId, raft_id_for};
pub use store::{Store, StoreConfig};
pub use transport::FaultInjector;
pub use types::{
    ClusterSettings, ClusterStatus, Consistency, DISPLAY_NAME_BYTES_MAX, Membership, NodeLoad, NodeRegistration,
    NodeState, NodeStatus, Placement, TURN_SECRET_BYTES_MAX, TurnSecrets, UsageBatch, UsageRecord, ViewerState,
    validate_day,
};
