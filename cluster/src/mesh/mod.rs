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
//! - [`flip`]: learning the flip's outcome ([`FlipAttempt`]): unknown outcomes proposed again,
//!   our own earlier attempt told from another node's move.
//! - [`directory`]: locating a room and placing it when nobody alive hosts it ([`Locate`]),
//!   through the epoch compare-and-set with a bounded number of attempts.
//! - [`fence`]: a held room's mode against the directory ([`fence::check`]): keep, promote,
//!   demote, follow, or place again.
//! - [`timing`]: the intervals, deadlines and retry bounds of all of the above.
//!
//! The node's tasks (`src/mesh/`, `src/directory.rs`) and the simulator's control plane
//! (`simulations/src/control.rs`) both drive these cores; each core's docs name its drivers.

pub mod directory;
pub mod drain;
pub mod failover;
pub mod fence;
pub mod flip;
pub mod liveness;
pub mod migration;
pub mod placement;
pub mod rebalance;
pub mod timing;

pub use directory::{Locate, LocateStep, PlaceResult, Resolved};
pub use drain::{Drain, DrainAction, DrainConfig};
pub use failover::{FailoverLoop, FailoverStep, Replacement, plan_failover};
pub use fence::{FenceAction, Held};
pub use flip::{FlipAttempt, FlipResult, FlipStep};
pub use liveness::{FailureDetector, LivenessChange};
pub use migration::{Faults, Migration, MigrationAction, MigrationEvent, MigrationOutcome, Phase};
pub use placement::{Candidate, Thresholds, candidates, choose, region_preference};
pub use rebalance::{Move, RebalanceConfig, Rebalancer};

/// What the cores' tests share.
#[cfg(test)]
pub(crate) mod test_support {
    use crate::ids::{NodeId, RoomId};
    use crate::types::Placement;

    /// Room `r` placed on `node` under `epoch`.
    pub fn placement(node: &str, epoch: u64) -> Placement {
        Placement {
            room: RoomId::from("r"),
            node: NodeId::from(node),
            epoch,
        }
    }
}
