//! Learning a migration's flip outcome (DESIGN.md §9): the [`super::migration::Migration`] core
//! asks for the directory flip (`ProposeFlip`) and must hear `Flipped` or `FlipConflict`, never
//! nothing. A proposal whose outcome is unknown (a timeout, no leader, a transport error) may
//! still commit, so it is proposed again every [`FLIP_RETRY_MS`] until the store answers: a flip
//! that did apply then comes back as a conflict whose current placement is the target at the
//! expected epoch + 1, which is our own earlier attempt, i.e. `Flipped`. Without this, an
//! unknown outcome left the migration flipping forever (simulator seeds 16 and 22). After
//! [`FLIP_OUTCOME_DEADLINE_MS`] the shell reports a conflict with what its replica shows; if the
//! flip commits later, the fence and the relays put the room right.
//!
//! Driven by the node's `src/mesh/migrate.rs::flip` and by the simulator's
//! `simulations/src/control.rs` (its `Purpose::Flip` completions). Sans-IO: the proposal, the
//! wait between attempts and the replica read are the caller's; time comes in as `now_ms`.

use super::migration::MigrationEvent;
use super::timing::{FLIP_OUTCOME_DEADLINE_MS, FLIP_RETRY_MS};
use crate::ids::NodeId;
use crate::types::Placement;

/// The answer to one proposal of the flip's compare-and-set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FlipResult {
    /// It applied: the room's new placement.
    Placed(Placement),
    /// The compare failed; the directory's current placement (`None`: the room is gone).
    Conflict(Option<Placement>),
    /// The store refused it for good (an invalid command): no retry can apply it.
    Refused(String),
    /// No answer (timeout, no leader, transport): it may or may not have applied.
    Unknown(String),
}

/// What the shell does after an answer ([`FlipAttempt::answer`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FlipStep {
    /// Feed this event to the migration core: the outcome is known.
    Report(MigrationEvent),
    /// Propose the same compare-and-set again at `at_ms`.
    RetryAt {
        /// When (the caller's clock, as `now_ms`).
        at_ms: u64,
    },
    /// Give up: read the room's epoch in this replica and report
    /// [`FlipAttempt::give_up`]'s event.
    GiveUp,
}

/// One flip, from the core's `ProposeFlip` until its outcome is known.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlipAttempt {
    /// The compare (`None` only under the skip-epoch-check test fault).
    expected_epoch: Option<u64>,
    /// The migration's target.
    to: NodeId,
    /// Unknown outcomes are proposed again until then.
    deadline_ms: u64,
}

impl FlipAttempt {
    /// The flip `ProposeFlip { expected_epoch, to }` asked for, first proposed at `now_ms`.
    pub fn new(expected_epoch: Option<u64>, to: NodeId, now_ms: u64) -> Self {
        Self {
            expected_epoch,
            to,
            deadline_ms: now_ms.saturating_add(FLIP_OUTCOME_DEADLINE_MS),
        }
    }

    /// The epoch the compare expects.
    pub fn expected_epoch(&self) -> Option<u64> {
        self.expected_epoch
    }

    /// The node the room moves to.
    pub fn to(&self) -> &NodeId {
        &self.to
    }

    /// The answer to one proposal, at `now_ms`.
    pub fn answer(&self, result: FlipResult, now_ms: u64) -> FlipStep {
        match result {
            FlipResult::Placed(placement) => FlipStep::Report(MigrationEvent::Flipped { epoch: placement.epoch }),
            FlipResult::Conflict(current) => {
                let ours = self.expected_epoch.and_then(|e| e.checked_add(1));
                FlipStep::Report(match current {
                    // Our own earlier attempt applied: the room is on the target at exactly the
                    // epoch the flip makes. (Another move of the room to the same target would
                    // need a migration of its own, which the source's room fence excludes.)
                    Some(p) if p.node == self.to && Some(p.epoch) == ours => MigrationEvent::Flipped { epoch: p.epoch },
                    current => MigrationEvent::FlipConflict {
                        current_epoch: current.map(|p| p.epoch),
                    },
                })
            }
            FlipResult::Refused(_) => FlipStep::GiveUp,
            FlipResult::Unknown(_) if now_ms < self.deadline_ms => FlipStep::RetryAt {
                at_ms: now_ms.saturating_add(FLIP_RETRY_MS),
            },
            FlipResult::Unknown(_) => FlipStep::GiveUp,
        }
    }

    /// The event that ends a flip given up on, with the room's epoch in this replica
    /// (`None`: not placed).
    pub fn give_up(current_epoch: Option<u64>) -> MigrationEvent {
        MigrationEvent::FlipConflict { current_epoch }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::mesh::test_support::placement;

    fn flip() -> FlipAttempt {
        FlipAttempt::new(Some(7), NodeId::from("dst"), 1_000)
    }

    #[test]
    fn an_applied_flip_reports_its_epoch() {
        let step = flip().answer(FlipResult::Placed(placement("dst", 8)), 1_100);
        assert_eq!(step, FlipStep::Report(MigrationEvent::Flipped { epoch: 8 }));
    }

    #[test]
    fn a_conflict_showing_our_own_earlier_flip_is_flipped() {
        let step = flip().answer(FlipResult::Conflict(Some(placement("dst", 8))), 1_100);
        assert_eq!(step, FlipStep::Report(MigrationEvent::Flipped { epoch: 8 }));
    }

    #[test]
    fn a_conflict_showing_another_node_or_epoch_is_a_conflict() {
        for (node, epoch) in [("other", 8), ("dst", 9), ("src", 7)] {
            let step = flip().answer(FlipResult::Conflict(Some(placement(node, epoch))), 1_100);
            assert_eq!(
                step,
                FlipStep::Report(MigrationEvent::FlipConflict {
                    current_epoch: Some(epoch)
                }),
                "{node}@{epoch}"
            );
        }
        let gone = flip().answer(FlipResult::Conflict(None), 1_100);
        assert_eq!(
            gone,
            FlipStep::Report(MigrationEvent::FlipConflict { current_epoch: None })
        );
    }

    #[test]
    fn without_an_epoch_check_no_conflict_is_our_own() {
        let blind = FlipAttempt::new(None, NodeId::from("dst"), 0);
        let step = blind.answer(FlipResult::Conflict(Some(placement("dst", 1))), 10);
        assert_eq!(
            step,
            FlipStep::Report(MigrationEvent::FlipConflict { current_epoch: Some(1) })
        );
    }

    #[test]
    fn an_unknown_outcome_is_proposed_again_until_the_deadline() {
        let unknown = || FlipResult::Unknown("timed out".into());
        assert_eq!(
            flip().answer(unknown(), 1_000),
            FlipStep::RetryAt {
                at_ms: 1_000 + FLIP_RETRY_MS
            }
        );
        let last = 1_000 + FLIP_OUTCOME_DEADLINE_MS - 1;
        assert_eq!(
            flip().answer(unknown(), last),
            FlipStep::RetryAt {
                at_ms: last + FLIP_RETRY_MS
            }
        );
        assert_eq!(
            flip().answer(unknown(), 1_000 + FLIP_OUTCOME_DEADLINE_MS),
            FlipStep::GiveUp
        );
        assert_eq!(
            flip().answer(FlipResult::Refused("invalid".into()), 1_000),
            FlipStep::GiveUp
        );
        assert_eq!(
            FlipAttempt::give_up(Some(9)),
            MigrationEvent::FlipConflict { current_epoch: Some(9) }
        );
    }
}
