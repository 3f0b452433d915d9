//! mediamesh-sim: the deterministic simulation of mediamesh's control plane.
//!
//! N nodes, each running the real replica driver (`cluster::driver::Replica`), the real state
//! machine and the real mesh cores (`cluster::mesh`: placement, the failover loop, locate, the
//! fence, migration and its flip outcome, drain, and their timings), in one thread under virtual time with one seeded RNG; a simulated network with the
//! Seoul–Busan latency, loss, duplication, reordering, partitions and swizzle-clogging; crashes
//! and restarts with durable state; viewer clients that join, report positions, drop and resume;
//! and invariant checkers after every step. The same seed gives the same trace hash.
//!
//! - [`config`]: the run's settings and every timing, limit and bound, named.
//! - [`world`]: the event queue, the fault schedule, the run loop ([`world::run`]).
//! - [`node`]: one node's store shell around the real driver and state machine.
//! - [`control`]: the node's control plane (heartbeats, failover, directory, rooms, relays,
//!   migrations, drain): an effect executor around the real `cluster::mesh` cores (failover
//!   loop, locate, fence, flip, migration, drain) and a model of the node's room runtime.
//! - [`sessions`]: the node's viewer sessions and the viewer batcher.
//! - [`viewers`]: the viewer clients' churn.
//! - [`network`]: the simulated network. [`storage`]: the durable raft storage.
//! - [`checkers`]: the invariants. [`trace`]: the trace and its hash.

pub mod checkers;
pub mod config;
pub mod control;
pub mod message;
pub mod network;
pub mod node;
pub mod sessions;
pub mod storage;
pub mod trace;
pub mod viewers;
pub mod world;

pub use checkers::Violation;
pub use config::{Faults, SimConfig};
pub use world::{RunReport, run};
