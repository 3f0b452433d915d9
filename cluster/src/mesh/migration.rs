//! The source side of one room migration (DESIGN.md §9).
//!
//! ```text
//! Idle ──Start──▶ HandingOff ──HandoffAccepted──▶ Flipping ──Flipped{epoch+1}──▶ MovingClients ──▶ Done
//!                     │ HandoffFailed / timeout        │ FlipConflict                 │ SessionsLeft(0)
//!                     ▼                                ▼                              │ or clients deadline
//!                Done(Failed)                  Done(Failed), AbortHandoff             ▼ (CloseRemaining)
//!                                                                                 Done(Moved)
//! ```
//!
//! 1. `Start`: the shell snapshots the room's actors and sends the snapshot (`SendHandoff`).
//! 2. `HandoffAccepted`: the target restored it; propose the directory flip as a compare on the
//!    epoch (`ProposeFlip`). The target relays from the source until publishers reconnect
//!    (make-before-break).
//! 3. `Flipped`: the directory now names the target at `epoch + 1`; tell clients to move with their
//!    resume tokens (`TellClientsMoved`).
//! 4. When no session is left (or at the clients deadline, after `CloseRemaining`) the migration
//!    is `Moved`.
//!
//! A handoff that fails or times out changes nothing: the source keeps the room. A flip that loses
//! its compare (`FlipConflict`: someone else moved the room) aborts the target's copy; the shell
//! then stops the room here if this node is no longer its host. There is no timeout while
//! flipping: the proposal may have applied, so the shell must learn its outcome (retrying or
//! reading the directory) and report `Flipped` or `FlipConflict`.
//!
//! Events out of order are ignored. Time comes only with `Start` and `Tick`; `elapsed_ms` runs from
//! `Start` to the latest time seen when the migration finishes.

use crate::ids::{NodeId, RoomId};

/// An input to [`Migration::handle`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MigrationEvent {
    /// Begin, at `now_ms`.
    Start {
        /// Current time.
        now_ms: u64,
    },
    /// The target restored the snapshot.
    HandoffAccepted,
    /// The target refused or the transfer failed.
    HandoffFailed(String),
    /// The directory flip applied; the room now has `epoch`.
    Flipped {
        /// The room's epoch after the flip.
        epoch: u64,
    },
    /// The flip's compare failed: the room's epoch is no longer the expected one.
    FlipConflict {
        /// The epoch the directory holds (`None`: the room is gone).
        current_epoch: Option<u64>,
    },
    /// Sessions of the room still connected here.
    SessionsLeft(usize),
    /// Time passes.
    Tick {
        /// Current time.
        now_ms: u64,
    },
}

/// An output of [`Migration::handle`], for the shell to carry out in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MigrationAction {
    /// Snapshot the room and hand it to `to`. `epoch` is the epoch the snapshot is taken at; the
    /// target hosts at `epoch + 1` once the flip applies.
    SendHandoff {
        /// Target node.
        to: NodeId,
        /// The room's epoch now.
        epoch: u64,
    },
    /// Propose `room → to` as a compare-and-set on `expected_epoch`. `None` only under the
    /// [`Faults::skip_epoch_check`] fault: an unconditional write.
    ProposeFlip {
        /// The compare; `None` only under a fault.
        expected_epoch: Option<u64>,
        /// The new host.
        to: NodeId,
    },
    /// Tell every client of the room to reconnect to `to` with its resume token.
    TellClientsMoved {
        /// The new host.
        to: NodeId,
        /// The room's new epoch.
        epoch: u64,
    },
    /// The clients deadline passed: end the sessions still here.
    CloseRemaining,
    /// Tell `to` to drop the restored copy.
    AbortHandoff {
        /// The target that restored it.
        to: NodeId,
    },
    /// The migration is over.
    Finished(MigrationOutcome),
}

/// How a migration ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MigrationOutcome {
    /// The room is hosted by the target at `epoch`.
    Moved {
        /// The room's new epoch.
        epoch: u64,
        /// From `Start` to the end.
        elapsed_ms: u64,
    },
    /// The room did not move (why).
    Failed(String),
}

/// Where a migration is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Not started.
    Idle,
    /// Snapshot sent, waiting for the target.
    HandingOff,
    /// Flip proposed, waiting for its outcome.
    Flipping,
    /// Directory flipped, clients moving.
    MovingClients,
    /// Finished (moved or failed).
    Done,
}

/// Faults a simulator may inject to check that its checkers catch them (issue 8). Off by default;
/// settable only with the `fault-injection` feature (or in this crate's tests).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Faults {
    /// Propose the flip without the epoch compare and accept any flipped epoch.
    pub skip_epoch_check: bool,
}

/// The source side of one room migration.
#[derive(Clone, Debug)]
pub struct Migration {
    room: RoomId,
    from: NodeId,
    to: NodeId,
    epoch: u64,
    handoff_timeout_ms: u64,
    clients_deadline_ms: u64,
    faults: Faults,
    phase: Phase,
    started_ms: u64,
    /// Latest time seen (Start or Tick).
    now_ms: u64,
    /// When clients were told to move.
    moving_since_ms: u64,
    /// The room's epoch after the flip.
    new_epoch: u64,
}

impl Migration {
    /// A migration of `room` at `epoch` from `from` to `to`. The handoff fails after
    /// `handoff_timeout_ms` from `Start`; sessions still here `clients_deadline_ms` after clients
    /// were told to move are closed (counted from the latest time seen when `Flipped` arrived).
    pub fn new(
        room: RoomId,
        from: NodeId,
        to: NodeId,
        epoch: u64,
        handoff_timeout_ms: u64,
        clients_deadline_ms: u64,
    ) -> Self {
        Self {
            room,
            from,
            to,
            epoch,
            handoff_timeout_ms,
            clients_deadline_ms,
            faults: Faults::default(),
            phase: Phase::Idle,
            started_ms: 0,
            now_ms: 0,
            moving_since_ms: 0,
            new_epoch: 0,
        }
    }

    /// Injects `faults` (tests and simulations only).
    #[cfg(any(test, feature = "fault-injection"))]
    pub fn with_faults(mut self, faults: Faults) -> Self {
        self.faults = faults;
        self
    }

    /// Feeds one event; returns the actions it causes (none when it is out of order).
    pub fn handle(&mut self, event: MigrationEvent) -> Vec<MigrationAction> {
        match (self.phase, event) {
            (Phase::Idle, MigrationEvent::Start { now_ms }) => {
                self.started_ms = now_ms;
                self.now_ms = now_ms;
                self.phase = Phase::HandingOff;
                vec![MigrationAction::SendHandoff {
                    to: self.to.clone(),
                    epoch: self.epoch,
                }]
            }
            (Phase::HandingOff, MigrationEvent::HandoffAccepted) => {
                self.phase = Phase::Flipping;
                let expected_epoch = if self.faults.skip_epoch_check {
                    None
                } else {
                    Some(self.epoch)
                };
                vec![MigrationAction::ProposeFlip {
                    expected_epoch,
                    to: self.to.clone(),
                }]
            }
            (Phase::HandingOff, MigrationEvent::HandoffFailed(reason)) => {
                vec![self.finish(MigrationOutcome::Failed(format!("handoff failed: {reason}")))]
            }
            (Phase::HandingOff, MigrationEvent::Tick { now_ms }) => {
                self.advance(now_ms);
                if self.now_ms.saturating_sub(self.started_ms) > self.handoff_timeout_ms {
                    // The target may still restore a late copy: tell it to drop it. (It could not
                    // serve it anyway: without a flip its epoch is stale.)
                    let abort = MigrationAction::AbortHandoff { to: self.to.clone() };
                    vec![abort, self.finish(MigrationOutcome::Failed("handoff timed out".into()))]
                } else {
                    Vec::new()
                }
            }
            (Phase::Flipping, MigrationEvent::Flipped { epoch }) => {
                let expected = self.epoch.checked_add(1);
                if !self.faults.skip_epoch_check && Some(epoch) != expected {
                    let reason = format!("flipped to epoch {epoch}, expected {}", self.epoch.saturating_add(1));
                    return vec![self.finish(MigrationOutcome::Failed(reason))];
                }
                self.new_epoch = epoch;
                self.moving_since_ms = self.now_ms;
                self.phase = Phase::MovingClients;
                vec![MigrationAction::TellClientsMoved {
                    to: self.to.clone(),
                    epoch,
                }]
            }
            (Phase::Flipping, MigrationEvent::FlipConflict { current_epoch: _ }) => {
                let abort = MigrationAction::AbortHandoff { to: self.to.clone() };
                vec![abort, self.finish(MigrationOutcome::Failed("epoch changed".into()))]
            }
            (Phase::Flipping, MigrationEvent::Tick { now_ms }) => {
                self.advance(now_ms);
                Vec::new()
            }
            (Phase::MovingClients, MigrationEvent::SessionsLeft(0)) => {
                vec![self.moved()]
            }
            (Phase::MovingClients, MigrationEvent::Tick { now_ms }) => {
                self.advance(now_ms);
                if self.now_ms.saturating_sub(self.moving_since_ms) > self.clients_deadline_ms {
                    vec![MigrationAction::CloseRemaining, self.moved()]
                } else {
                    Vec::new()
                }
            }
            _ => Vec::new(),
        }
    }

    /// Moves the latest time seen forward (never back).
    fn advance(&mut self, now_ms: u64) {
        self.now_ms = self.now_ms.max(now_ms);
    }

    fn moved(&mut self) -> MigrationAction {
        let epoch = self.new_epoch;
        let elapsed_ms = self.now_ms.saturating_sub(self.started_ms);
        self.finish(MigrationOutcome::Moved { epoch, elapsed_ms })
    }

    fn finish(&mut self, outcome: MigrationOutcome) -> MigrationAction {
        self.phase = Phase::Done;
        MigrationAction::Finished(outcome)
    }

    /// Where the migration is.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The room.
    pub fn room(&self) -> &RoomId {
        &self.room
    }

    /// The source node.
    pub fn from(&self) -> &NodeId {
        &self.from
    }

    /// The target node.
    pub fn to(&self) -> &NodeId {
        &self.to
    }

    /// The room's epoch when the migration was created.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HANDOFF_TIMEOUT_MS: u64 = 5_000;
    const CLIENTS_DEADLINE_MS: u64 = 10_000;

    fn migration() -> Migration {
        Migration::new(
            RoomId::from("lobby"),
            NodeId::from("src"),
            NodeId::from("dst"),
            7,
            HANDOFF_TIMEOUT_MS,
            CLIENTS_DEADLINE_MS,
        )
    }

    fn to() -> NodeId {
        NodeId::from("dst")
    }

    fn failed(actions: &[MigrationAction]) -> Option<&str> {
        match actions.last() {
            Some(MigrationAction::Finished(MigrationOutcome::Failed(reason))) => Some(reason),
            _ => None,
        }
    }

    /// Runs Start at 1_000, HandoffAccepted, Flipped{8} and returns the migration in MovingClients.
    fn flipped() -> Migration {
        let mut m = migration();
        m.handle(MigrationEvent::Start { now_ms: 1_000 });
        m.handle(MigrationEvent::HandoffAccepted);
        m.handle(MigrationEvent::Flipped { epoch: 8 });
        assert_eq!(m.phase(), Phase::MovingClients);
        m
    }

    #[test]
    fn happy_path() {
        let mut m = migration();
        assert_eq!(m.phase(), Phase::Idle);
        assert_eq!(
            m.handle(MigrationEvent::Start { now_ms: 1_000 }),
            vec![MigrationAction::SendHandoff { to: to(), epoch: 7 }]
        );
        assert_eq!(m.phase(), Phase::HandingOff);
        assert!(m.handle(MigrationEvent::Tick { now_ms: 1_500 }).is_empty());
        assert_eq!(
            m.handle(MigrationEvent::HandoffAccepted),
            vec![MigrationAction::ProposeFlip {
                expected_epoch: Some(7),
                to: to()
            }]
        );
        assert_eq!(m.phase(), Phase::Flipping);
        assert!(m.handle(MigrationEvent::Tick { now_ms: 2_000 }).is_empty());
        assert_eq!(
            m.handle(MigrationEvent::Flipped { epoch: 8 }),
            vec![MigrationAction::TellClientsMoved { to: to(), epoch: 8 }]
        );
        assert_eq!(m.phase(), Phase::MovingClients);
        assert!(m.handle(MigrationEvent::SessionsLeft(3)).is_empty());
        assert!(m.handle(MigrationEvent::Tick { now_ms: 2_600 }).is_empty());
        assert_eq!(
            m.handle(MigrationEvent::SessionsLeft(0)),
            vec![MigrationAction::Finished(MigrationOutcome::Moved {
                epoch: 8,
                elapsed_ms: 1_600
            })]
        );
        assert_eq!(m.phase(), Phase::Done);
    }

    #[test]
    fn handoff_failure_keeps_the_room() {
        let mut m = migration();
        m.handle(MigrationEvent::Start { now_ms: 0 });
        let actions = m.handle(MigrationEvent::HandoffFailed("target full".into()));
        assert_eq!(actions.len(), 1);
        assert_eq!(failed(&actions), Some("handoff failed: target full"));
        assert_eq!(m.phase(), Phase::Done);
    }

    #[test]
    fn handoff_times_out_strictly_after_the_timeout() {
        let mut m = migration();
        m.handle(MigrationEvent::Start { now_ms: 1_000 });
        assert!(m.handle(MigrationEvent::Tick { now_ms: 6_000 }).is_empty());
        let actions = m.handle(MigrationEvent::Tick { now_ms: 6_001 });
        assert_eq!(actions[0], MigrationAction::AbortHandoff { to: to() });
        assert_eq!(failed(&actions), Some("handoff timed out"));
        assert_eq!(actions.len(), 2);
        assert_eq!(m.phase(), Phase::Done);
        // A late acceptance changes nothing.
        assert!(m.handle(MigrationEvent::HandoffAccepted).is_empty());
    }

    #[test]
    fn flip_conflict_aborts_the_handoff() {
        let mut m = migration();
        m.handle(MigrationEvent::Start { now_ms: 0 });
        m.handle(MigrationEvent::HandoffAccepted);
        let actions = m.handle(MigrationEvent::FlipConflict { current_epoch: Some(9) });
        assert_eq!(
            actions,
            vec![
                MigrationAction::AbortHandoff { to: to() },
                MigrationAction::Finished(MigrationOutcome::Failed("epoch changed".into())),
            ]
        );
        assert_eq!(m.phase(), Phase::Done);
        let mut m = migration();
        m.handle(MigrationEvent::Start { now_ms: 0 });
        m.handle(MigrationEvent::HandoffAccepted);
        assert_eq!(
            failed(&m.handle(MigrationEvent::FlipConflict { current_epoch: None })),
            Some("epoch changed")
        );
    }

    #[test]
    fn a_flip_to_an_unexpected_epoch_fails() {
        for epoch in [7, 9, 0, u64::MAX] {
            let mut m = migration();
            m.handle(MigrationEvent::Start { now_ms: 0 });
            m.handle(MigrationEvent::HandoffAccepted);
            let actions = m.handle(MigrationEvent::Flipped { epoch });
            assert_eq!(actions.len(), 1, "epoch {epoch}");
            assert_eq!(
                failed(&actions),
                Some(format!("flipped to epoch {epoch}, expected 8").as_str())
            );
            assert_eq!(m.phase(), Phase::Done);
        }
    }

    #[test]
    fn no_flip_timeout_while_flipping() {
        let mut m = migration();
        m.handle(MigrationEvent::Start { now_ms: 0 });
        m.handle(MigrationEvent::HandoffAccepted);
        assert!(m.handle(MigrationEvent::Tick { now_ms: 1_000_000 }).is_empty());
        assert_eq!(m.phase(), Phase::Flipping);
    }

    #[test]
    fn clients_deadline_closes_remaining_and_counts_as_moved() {
        let mut m = migration();
        m.handle(MigrationEvent::Start { now_ms: 1_000 });
        m.handle(MigrationEvent::HandoffAccepted);
        m.handle(MigrationEvent::Tick { now_ms: 2_000 });
        m.handle(MigrationEvent::Flipped { epoch: 8 });
        m.handle(MigrationEvent::SessionsLeft(2));
        // Clients were told at 2_000 (latest time seen); the deadline ends after 12_000.
        assert!(m.handle(MigrationEvent::Tick { now_ms: 12_000 }).is_empty());
        assert_eq!(
            m.handle(MigrationEvent::Tick { now_ms: 12_001 }),
            vec![
                MigrationAction::CloseRemaining,
                MigrationAction::Finished(MigrationOutcome::Moved {
                    epoch: 8,
                    elapsed_ms: 11_001
                }),
            ]
        );
        assert_eq!(m.phase(), Phase::Done);
        assert!(m.handle(MigrationEvent::SessionsLeft(0)).is_empty(), "finished once");
    }

    #[test]
    fn sessions_left_before_the_flip_is_ignored() {
        let mut m = migration();
        assert!(m.handle(MigrationEvent::SessionsLeft(0)).is_empty());
        m.handle(MigrationEvent::Start { now_ms: 0 });
        assert!(m.handle(MigrationEvent::SessionsLeft(0)).is_empty());
        m.handle(MigrationEvent::HandoffAccepted);
        assert!(m.handle(MigrationEvent::SessionsLeft(0)).is_empty());
        assert_eq!(m.phase(), Phase::Flipping);
    }

    #[test]
    fn out_of_order_events_are_ignored() {
        let mut m = migration();
        for event in [
            MigrationEvent::HandoffAccepted,
            MigrationEvent::HandoffFailed("x".into()),
            MigrationEvent::Flipped { epoch: 8 },
            MigrationEvent::FlipConflict { current_epoch: Some(8) },
            MigrationEvent::Tick { now_ms: 99_999 },
        ] {
            assert!(m.handle(event).is_empty());
            assert_eq!(m.phase(), Phase::Idle);
        }
        m.handle(MigrationEvent::Start { now_ms: 0 });
        assert!(m.handle(MigrationEvent::Start { now_ms: 5 }).is_empty(), "started once");
        assert!(m.handle(MigrationEvent::Flipped { epoch: 8 }).is_empty());
        assert!(
            m.handle(MigrationEvent::FlipConflict { current_epoch: None })
                .is_empty()
        );
        assert_eq!(m.phase(), Phase::HandingOff);
        m.handle(MigrationEvent::HandoffAccepted);
        assert!(m.handle(MigrationEvent::HandoffAccepted).is_empty());
        assert!(m.handle(MigrationEvent::HandoffFailed("late".into())).is_empty());
        assert_eq!(m.phase(), Phase::Flipping);

        let mut m = flipped();
        assert!(
            m.handle(MigrationEvent::Flipped { epoch: 8 }).is_empty(),
            "a duplicate flip"
        );
        assert!(
            m.handle(MigrationEvent::FlipConflict { current_epoch: Some(9) })
                .is_empty()
        );
        assert!(m.handle(MigrationEvent::HandoffFailed("late".into())).is_empty());
        assert_eq!(m.phase(), Phase::MovingClients);
    }

    #[test]
    fn a_tick_backwards_does_not_move_time_back() {
        let mut m = migration();
        m.handle(MigrationEvent::Start { now_ms: 10_000 });
        assert!(m.handle(MigrationEvent::Tick { now_ms: 0 }).is_empty());
        m.handle(MigrationEvent::HandoffAccepted);
        m.handle(MigrationEvent::Flipped { epoch: 8 });
        m.handle(MigrationEvent::Tick { now_ms: 9_000 });
        assert_eq!(
            m.handle(MigrationEvent::SessionsLeft(0)),
            vec![MigrationAction::Finished(MigrationOutcome::Moved {
                epoch: 8,
                elapsed_ms: 0
            })]
        );
    }

    #[test]
    fn epoch_check_fault_skips_the_compare_and_the_check() {
        let mut m = migration().with_faults(Faults { skip_epoch_check: true });
        m.handle(MigrationEvent::Start { now_ms: 0 });
        assert_eq!(
            m.handle(MigrationEvent::HandoffAccepted),
            vec![MigrationAction::ProposeFlip {
                expected_epoch: None,
                to: to()
            }]
        );
        assert_eq!(
            m.handle(MigrationEvent::Flipped { epoch: 42 }),
            vec![MigrationAction::TellClientsMoved { to: to(), epoch: 42 }]
        );
        assert_eq!(
            m.handle(MigrationEvent::SessionsLeft(0)),
            vec![MigrationAction::Finished(MigrationOutcome::Moved {
                epoch: 42,
                elapsed_ms: 0
            })]
        );
    }

    #[test]
    fn faults_are_off_by_default() {
        assert_eq!(
            Faults::default(),
            Faults {
                skip_epoch_check: false
            }
        );
        let m = migration().with_faults(Faults::default());
        assert_eq!(m.faults, Faults::default());
        assert_eq!(
            (m.room().as_str(), m.from().as_str(), m.to().as_str(), m.epoch()),
            ("lobby", "src", "dst", 7)
        );
    }

    #[test]
    fn epoch_at_the_top_cannot_flip() {
        let mut m = Migration::new(RoomId::from("r"), NodeId::from("a"), NodeId::from("b"), u64::MAX, 1, 1);
        m.handle(MigrationEvent::Start { now_ms: 0 });
        m.handle(MigrationEvent::HandoffAccepted);
        assert!(failed(&m.handle(MigrationEvent::Flipped { epoch: u64::MAX })).is_some());
    }
}
