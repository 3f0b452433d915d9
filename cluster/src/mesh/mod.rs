//! The mesh's sans-IO decision cores: where rooms go, who is dead, and how rooms move.
//!
//! Like [`crate::driver`], none of these does IO, reads a clock, draws a random number or spawns a
//! task. Time comes in as `now_ms` arguments, facts (load, the directory, results) as plain values,
//! and decisions come out as values the caller carries out. Every choice is deterministic: maps
//! are `BTreeMap`s and every sort ends with a tie-break by id, so a simulator driving them under
//! virtual time replays a seed exactly. Tasks in the node own them and do the IO around them.
//!
//! - [`placement`]: where a new room goes ([`choose`]): preferred region first, load thresholds,
//!   deterministic tie-breaks; and the client's region preference ([`region_preference`]).
//! - [`liveness`]: the leader's failure detector ([`FailureDetector`]): heartbeats in, `Dead` and
//!   `Alive` changes out, each once.
//! - [`failover`]: new hosts for a dead node's rooms ([`plan_failover`]), spread across equally
//!   loaded nodes, each a compare-and-set on the room's epoch.
//! - [`rebalance`]: the optional rebalancer ([`Rebalancer`]): at most one move per interval, off a
//!   node that stays overloaded, with a cooldown per room.
//! - [`drain`]: draining one node before a deadline ([`Drain`]): bounded parallel migrations, one
//!   retry, then close what is left and leave.
//! - [`migration`]: the source side of one room migration ([`Migration`]): handoff, epoch-fenced
//!   directory flip, clients moved with their resume tokens.

pub mod drain;
pub mod failover;
pub mod liveness;
pub mod migration;
pub mod placement;
pub mod rebalance;

pub use drain::{Drain, DrainAction, DrainConfig};
pub use failover::{Replacement, plan_failover};
pub use liveness::{FailureDetector, LivenessChange};
pub use migration::{Faults, Migration, MigrationAction, MigrationEvent, MigrationOutcome, Phase};
pub use placement::{Candidate, Thresholds, choose, region_preference};
pub use rebalance::{Move, RebalanceConfig, Rebalancer};
