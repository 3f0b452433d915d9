//! Draining one node within a deadline: migrate every room away, then leave.
//!
//! The draining node's drain task feeds [`Drain`] with the rooms it hosts ([`Drain::rooms`], a fresh
//! list from the directory whenever it has one), migration results ([`Drain::migrated`]) and its
//! open session count ([`Drain::sessions_left`]), and calls [`Drain::tick`] periodically. Each
//! [`DrainAction`] is issued once:
//!
//! - before the deadline, `Migrate` for waiting rooms, at most `parallel_max` in flight, in room id
//!   order, targets chosen by [`placement::choose`] with the node's own region preferred (never the
//!   node itself). A failed migration is retried once with another target; after the second failure
//!   the room is left to `CloseRemaining`;
//! - at the deadline, `CloseRemaining` if anything is still here (no new migrations after it);
//! - `Leave` once no room is hosted here and no session is left, or once `CloseRemaining` was issued
//!   and no session is left, or at deadline + [`DRAIN_LEAVE_GRACE_MS`] regardless.
//!
//! "No room hosted here" needs a room list and "no session left" a session count: until the shell
//! has reported each at least once, the drain does not assume them to be zero.

use std::collections::BTreeMap;

use super::placement::{self, Candidate, Thresholds};
use crate::ids::{NodeId, RoomId};

/// After the deadline, the node leaves this much later whatever is left.
pub const DRAIN_LEAVE_GRACE_MS: u64 = 5_000;

/// Migration attempts per room (the first and one retry with another target).
pub const MIGRATION_ATTEMPTS_MAX: usize = 2;

/// Settings of a drain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DrainConfig {
    /// Time from the start to `CloseRemaining`. Default 30 s.
    pub deadline_ms: u64,
    /// Most migrations in flight at once (0 is treated as 1). Default 4.
    pub parallel_max: usize,
}

impl Default for DrainConfig {
    fn default() -> Self {
        Self {
            deadline_ms: 30_000,
            parallel_max: 4,
        }
    }
}

/// What the drain task must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DrainAction {
    /// Start migrating `room` (see [`super::migration::Migration`]) and report the result with
    /// [`Drain::migrated`].
    Migrate {
        /// The room.
        room: RoomId,
        /// Its new host.
        to: NodeId,
        /// Its epoch now: the compare of the flip.
        expected_epoch: u64,
    },
    /// The deadline is reached: end every session still on this node.
    CloseRemaining,
    /// Everything moved (or the grace period ended): leave the cluster and exit.
    Leave,
}

/// Where one room hosted here stands.
#[derive(Clone, Debug, PartialEq, Eq)]
enum RoomState {
    /// To be migrated.
    Waiting,
    /// A migration to `to` is in flight.
    Migrating { to: NodeId },
    /// Failed [`MIGRATION_ATTEMPTS_MAX`] times: left to `CloseRemaining`.
    GaveUp,
}

#[derive(Clone, Debug)]
struct HostedRoom {
    epoch: u64,
    state: RoomState,
    /// Targets whose migration failed, in order.
    failed_targets: Vec<NodeId>,
}

/// The drain of one node.
#[derive(Clone, Debug)]
pub struct Drain {
    node: NodeId,
    region: String,
    config: DrainConfig,
    started_ms: u64,
    /// Rooms hosted here, by id.
    rooms: BTreeMap<RoomId, HostedRoom>,
    /// Rooms migrated away, with the epoch they had here: a stale list naming them at that epoch
    /// (or older) does not bring them back.
    moved: BTreeMap<RoomId, u64>,
    rooms_reported: bool,
    sessions_left: Option<usize>,
    close_issued: bool,
    leave_issued: bool,
}

impl Drain {
    /// Starts draining `node` (in `region`) at `now_ms`.
    pub fn new(node: NodeId, region: String, config: DrainConfig, now_ms: u64) -> Self {
        Self {
            node,
            region,
            config,
            started_ms: now_ms,
            rooms: BTreeMap::new(),
            moved: BTreeMap::new(),
            rooms_reported: false,
            sessions_left: None,
            close_issued: false,
            leave_issued: false,
        }
    }

    /// The rooms hosted here now, with their epochs. Rooms missing from the list are no longer
    /// hosted here (moved or closed); new ones wait for a migration; a known room takes the listed
    /// epoch. Duplicates count once, at their highest epoch.
    pub fn rooms(&mut self, rooms: Vec<(RoomId, u64)>) {
        let mut listed: BTreeMap<RoomId, u64> = BTreeMap::new();
        for (room, epoch) in rooms {
            let entry = listed.entry(room).or_insert(epoch);
            *entry = (*entry).max(epoch);
        }
        listed.retain(|room, epoch| self.moved.get(room).is_none_or(|moved_epoch| *epoch > *moved_epoch));
        self.rooms.retain(|room, _| listed.contains_key(room));
        for (room, epoch) in listed {
            self.moved.remove(&room);
            self.rooms
                .entry(room)
                .and_modify(|hosted| hosted.epoch = epoch)
                .or_insert(HostedRoom {
                    epoch,
                    state: RoomState::Waiting,
                    failed_targets: Vec::new(),
                });
        }
        self.rooms_reported = true;
    }

    /// A migration of `room` finished. `ok`: the room is gone from here. Not ok: it is retried once
    /// with another target (before the deadline), then left to `CloseRemaining`. Results for rooms
    /// not migrating are ignored.
    pub fn migrated(&mut self, room: &RoomId, ok: bool) {
        let Some(hosted) = self.rooms.get_mut(room) else {
            return;
        };
        let RoomState::Migrating { to } = &hosted.state else {
            return;
        };
        if ok {
            let epoch = hosted.epoch;
            self.rooms.remove(room);
            self.moved.insert(room.clone(), epoch);
            return;
        }
        hosted.failed_targets.push(to.clone());
        hosted.state = if hosted.failed_targets.len() >= MIGRATION_ATTEMPTS_MAX {
            RoomState::GaveUp
        } else {
            RoomState::Waiting
        };
    }

    /// Sessions still open on this node.
    pub fn sessions_left(&mut self, n: usize) {
        self.sessions_left = Some(n);
    }

    /// The actions due at `now_ms`, given the candidate targets' load.
    pub fn tick(&mut self, now_ms: u64, candidates: &[Candidate], t: &Thresholds) -> Vec<DrainAction> {
        let mut actions = Vec::new();
        if self.leave_issued {
            return actions;
        }
        let elapsed_ms = now_ms.saturating_sub(self.started_ms);
        let deadline_reached = elapsed_ms >= self.config.deadline_ms;
        let grace_over = elapsed_ms >= self.config.deadline_ms.saturating_add(DRAIN_LEAVE_GRACE_MS);

        if !deadline_reached {
            self.start_migrations(candidates, t, &mut actions);
        }
        let sessions_none = self.sessions_left == Some(0);
        let all_moved = self.rooms_reported && self.rooms.is_empty() && sessions_none;
        if deadline_reached && !self.close_issued && !all_moved {
            self.close_issued = true;
            actions.push(DrainAction::CloseRemaining);
        }
        if all_moved || (self.close_issued && sessions_none) || grace_over {
            self.leave_issued = true;
            actions.push(DrainAction::Leave);
        }
        actions
    }

    /// Issues `Migrate` for waiting rooms while fewer than `parallel_max` are in flight.
    fn start_migrations(&mut self, candidates: &[Candidate], t: &Thresholds, actions: &mut Vec<DrainAction>) {
        let parallel_max = self.config.parallel_max.max(1);
        let mut in_flight = self
            .rooms
            .values()
            .filter(|hosted| matches!(hosted.state, RoomState::Migrating { .. }))
            .count();
        // Own copy: each choice counts one more room on its target, spreading equal targets.
        let mut pool: Vec<Candidate> = candidates.iter().filter(|c| c.id != self.node).cloned().collect();
        for (room, hosted) in &mut self.rooms {
            if in_flight >= parallel_max {
                break;
            }
            if hosted.state != RoomState::Waiting {
                continue;
            }
            let eligible = |c: &Candidate| !hosted.failed_targets.contains(&c.id);
            let Some(index) = placement::choose_index(&pool, Some(&self.region), t, eligible) else {
                // No target now; it may appear by a later tick.
                continue;
            };
            let target = &mut pool[index];
            target.rooms = target.rooms.saturating_add(1);
            hosted.state = RoomState::Migrating { to: target.id.clone() };
            in_flight += 1;
            actions.push(DrainAction::Migrate {
                room: room.clone(),
                to: target.id.clone(),
                expected_epoch: hosted.epoch,
            });
        }
    }

    /// Whether `Leave` was issued.
    pub fn is_done(&self) -> bool {
        self.leave_issued
    }

    /// The node being drained.
    pub fn node(&self) -> &NodeId {
        &self.node
    }

    /// Rooms still hosted here (waiting, migrating or given up).
    pub fn rooms_hosted(&self) -> usize {
        self.rooms.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::placement::tests::candidate;

    fn drain(config: DrainConfig) -> Drain {
        Drain::new(NodeId::from("me"), "seoul".into(), config, 1_000)
    }

    fn rooms(list: &[(&str, u64)]) -> Vec<(RoomId, u64)> {
        list.iter().map(|(r, e)| (RoomId::from(*r), *e)).collect()
    }

    fn migrate(room: &str, to: &str, epoch: u64) -> DrainAction {
        DrainAction::Migrate {
            room: RoomId::from(room),
            to: NodeId::from(to),
            expected_epoch: epoch,
        }
    }

    fn targets() -> Vec<Candidate> {
        vec![candidate("a", "seoul", 0.2, 0, 0), candidate("b", "seoul", 0.2, 0, 0)]
    }

    fn t() -> Thresholds {
        Thresholds::default()
    }

    #[test]
    fn defaults() {
        assert_eq!(
            DrainConfig::default(),
            DrainConfig {
                deadline_ms: 30_000,
                parallel_max: 4
            }
        );
    }

    #[test]
    fn empty_node_leaves_at_once() {
        let mut d = drain(DrainConfig::default());
        d.rooms(Vec::new());
        d.sessions_left(0);
        assert_eq!(d.tick(1_000, &targets(), &t()), vec![DrainAction::Leave]);
        assert!(d.is_done());
        assert!(d.tick(2_000, &targets(), &t()).is_empty(), "issued once");
    }

    #[test]
    fn nothing_is_assumed_before_it_is_reported() {
        let mut d = drain(DrainConfig::default());
        assert!(
            d.tick(1_000, &targets(), &t()).is_empty(),
            "no room list, no session count"
        );
        d.sessions_left(0);
        assert!(d.tick(1_001, &targets(), &t()).is_empty(), "no room list yet");
        let mut d = drain(DrainConfig::default());
        d.rooms(Vec::new());
        assert!(d.tick(1_000, &targets(), &t()).is_empty(), "no session count yet");
    }

    #[test]
    fn migrations_are_bounded_spread_and_in_id_order() {
        let mut d = drain(DrainConfig {
            deadline_ms: 30_000,
            parallel_max: 3,
        });
        d.rooms(rooms(&[("r4", 1), ("r2", 5), ("r1", 2), ("r3", 1), ("r5", 9)]));
        d.sessions_left(10);
        assert_eq!(
            d.tick(1_000, &targets(), &t()),
            vec![migrate("r1", "a", 2), migrate("r2", "b", 5), migrate("r3", "a", 1)]
        );
        assert!(d.tick(2_000, &targets(), &t()).is_empty(), "three in flight");
        d.migrated(&RoomId::from("r2"), true);
        assert_eq!(d.tick(3_000, &targets(), &t()), vec![migrate("r4", "a", 1)]);
        assert!(d.tick(3_000, &targets(), &t()).is_empty(), "each Migrate once");
        assert_eq!(d.rooms_hosted(), 4);
    }

    #[test]
    fn parallel_max_zero_counts_as_one() {
        let mut d = drain(DrainConfig {
            deadline_ms: 30_000,
            parallel_max: 0,
        });
        d.rooms(rooms(&[("r1", 1), ("r2", 1)]));
        assert_eq!(d.tick(1_000, &targets(), &t()), vec![migrate("r1", "a", 1)]);
    }

    #[test]
    fn never_migrates_to_itself_and_prefers_own_region() {
        let mut d = drain(DrainConfig::default());
        d.rooms(rooms(&[("r1", 1)]));
        let candidates = [
            candidate("me", "seoul", 0.0, 0, 0),
            candidate("busan-1", "busan", 0.0, 0, 0),
            candidate("seoul-2", "SEOUL", 0.5, 0, 0),
        ];
        assert_eq!(d.tick(1_000, &candidates, &t()), vec![migrate("r1", "seoul-2", 1)]);
    }

    #[test]
    fn no_target_waits_for_one() {
        let mut d = drain(DrainConfig::default());
        d.rooms(rooms(&[("r1", 1)]));
        d.sessions_left(1);
        let mut down = candidate("a", "seoul", 0.0, 0, 0);
        down.available = false;
        assert!(d.tick(1_000, &[down], &t()).is_empty());
        assert_eq!(d.tick(2_000, &targets(), &t()), vec![migrate("r1", "a", 1)]);
    }

    #[test]
    fn everything_moved_then_leave() {
        let mut d = drain(DrainConfig::default());
        d.rooms(rooms(&[("r1", 1), ("r2", 1)]));
        d.sessions_left(4);
        assert_eq!(d.tick(1_000, &targets(), &t()).len(), 2);
        d.migrated(&RoomId::from("r1"), true);
        d.migrated(&RoomId::from("r2"), true);
        assert!(d.tick(2_000, &targets(), &t()).is_empty(), "sessions still open");
        d.sessions_left(0);
        assert_eq!(d.tick(3_000, &targets(), &t()), vec![DrainAction::Leave]);
        assert!(d.is_done());
    }

    #[test]
    fn a_room_gone_from_the_list_counts_as_moved() {
        let mut d = drain(DrainConfig::default());
        d.rooms(rooms(&[("r1", 1)]));
        d.sessions_left(0);
        assert_eq!(d.tick(1_000, &targets(), &t()), vec![migrate("r1", "a", 1)]);
        d.rooms(Vec::new());
        // A late failure report for it is ignored.
        d.migrated(&RoomId::from("r1"), false);
        assert_eq!(d.tick(2_000, &targets(), &t()), vec![DrainAction::Leave]);
    }

    #[test]
    fn a_stale_list_does_not_bring_a_moved_room_back() {
        let mut d = drain(DrainConfig::default());
        d.rooms(rooms(&[("r1", 4)]));
        d.sessions_left(0);
        d.tick(1_000, &targets(), &t());
        d.migrated(&RoomId::from("r1"), true);
        d.rooms(rooms(&[("r1", 4)]));
        assert_eq!(d.rooms_hosted(), 0);
        assert_eq!(d.tick(2_000, &targets(), &t()), vec![DrainAction::Leave]);

        // Listed at a newer epoch, it is here again.
        let mut d = drain(DrainConfig::default());
        d.rooms(rooms(&[("r1", 4)]));
        d.tick(1_000, &targets(), &t());
        d.migrated(&RoomId::from("r1"), true);
        d.rooms(rooms(&[("r1", 6)]));
        assert_eq!(d.tick(2_000, &targets(), &t()), vec![migrate("r1", "a", 6)]);
    }

    #[test]
    fn a_new_epoch_is_used_by_the_next_attempt() {
        let mut d = drain(DrainConfig::default());
        d.rooms(rooms(&[("r1", 1), ("r1", 3)]));
        assert_eq!(d.tick(1_000, &targets(), &t()), vec![migrate("r1", "a", 3)]);
        d.rooms(rooms(&[("r1", 7)]));
        d.migrated(&RoomId::from("r1"), false);
        assert_eq!(d.tick(2_000, &targets(), &t()), vec![migrate("r1", "b", 7)]);
    }

    #[test]
    fn a_failure_is_retried_once_with_another_target_then_given_up() {
        let mut d = drain(DrainConfig::default());
        d.rooms(rooms(&[("r1", 1)]));
        d.sessions_left(3);
        let candidates = [
            candidate("a", "seoul", 0.1, 0, 0),
            candidate("b", "seoul", 0.2, 0, 0),
            candidate("c", "seoul", 0.3, 0, 0),
        ];
        assert_eq!(d.tick(1_000, &candidates, &t()), vec![migrate("r1", "a", 1)]);
        d.migrated(&RoomId::from("r1"), false);
        assert_eq!(d.tick(2_000, &candidates, &t()), vec![migrate("r1", "b", 1)]);
        d.migrated(&RoomId::from("r1"), false);
        assert!(
            d.tick(3_000, &candidates, &t()).is_empty(),
            "given up: no third attempt"
        );
        // Left to CloseRemaining at the deadline (1_000 + 30_000).
        assert!(d.tick(30_999, &candidates, &t()).is_empty());
        assert_eq!(d.tick(31_000, &candidates, &t()), vec![DrainAction::CloseRemaining]);
        d.sessions_left(0);
        assert_eq!(d.tick(31_500, &candidates, &t()), vec![DrainAction::Leave]);
    }

    #[test]
    fn a_retry_with_no_other_target_waits() {
        let mut d = drain(DrainConfig::default());
        d.rooms(rooms(&[("r1", 1)]));
        let only = [candidate("a", "seoul", 0.1, 0, 0)];
        assert_eq!(d.tick(1_000, &only, &t()), vec![migrate("r1", "a", 1)]);
        d.migrated(&RoomId::from("r1"), false);
        assert!(d.tick(2_000, &only, &t()).is_empty(), "never the failed target again");
        assert_eq!(d.tick(3_000, &targets(), &t()), vec![migrate("r1", "b", 1)]);
    }

    #[test]
    fn results_for_rooms_not_migrating_are_ignored() {
        let mut d = drain(DrainConfig::default());
        d.rooms(rooms(&[("r1", 1), ("r2", 1)]));
        d.migrated(&RoomId::from("r1"), true);
        d.migrated(&RoomId::from("zz"), true);
        assert_eq!(d.rooms_hosted(), 2);
        assert_eq!(
            d.tick(1_000, &targets(), &t()),
            vec![migrate("r1", "a", 1), migrate("r2", "b", 1)]
        );
    }

    #[test]
    fn deadline_closes_remaining_then_leaves_when_sessions_end() {
        let mut d = drain(DrainConfig {
            deadline_ms: 10_000,
            parallel_max: 4,
        });
        d.rooms(rooms(&[("r1", 1)]));
        d.sessions_left(5);
        assert_eq!(d.tick(1_000, &targets(), &t()).len(), 1);
        assert!(d.tick(10_999, &targets(), &t()).is_empty());
        assert_eq!(d.tick(11_000, &targets(), &t()), vec![DrainAction::CloseRemaining]);
        assert!(d.tick(12_000, &targets(), &t()).is_empty(), "CloseRemaining once");
        d.sessions_left(0);
        assert_eq!(d.tick(13_000, &targets(), &t()), vec![DrainAction::Leave]);
    }

    #[test]
    fn no_migrations_start_after_the_deadline() {
        let mut d = drain(DrainConfig {
            deadline_ms: 10_000,
            parallel_max: 4,
        });
        d.rooms(rooms(&[("r1", 1)]));
        d.sessions_left(2);
        let mut down = candidate("a", "seoul", 0.0, 0, 0);
        down.available = false;
        assert!(d.tick(1_000, &[down], &t()).is_empty());
        assert_eq!(d.tick(11_000, &targets(), &t()), vec![DrainAction::CloseRemaining]);
        assert!(d.tick(12_000, &targets(), &t()).is_empty());
    }

    #[test]
    fn leaves_at_deadline_plus_grace_regardless() {
        let mut d = drain(DrainConfig {
            deadline_ms: 10_000,
            parallel_max: 4,
        });
        d.rooms(rooms(&[("r1", 1)]));
        d.sessions_left(7);
        d.tick(1_000, &targets(), &t());
        assert_eq!(d.tick(11_000, &targets(), &t()), vec![DrainAction::CloseRemaining]);
        assert!(d.tick(15_999, &targets(), &t()).is_empty());
        assert_eq!(d.tick(16_000, &targets(), &t()), vec![DrainAction::Leave]);
        assert!(d.is_done());
    }

    #[test]
    fn a_late_first_tick_closes_and_leaves_together() {
        let mut d = drain(DrainConfig {
            deadline_ms: 10_000,
            parallel_max: 4,
        });
        d.rooms(rooms(&[("r1", 1)]));
        assert_eq!(
            d.tick(20_000, &targets(), &t()),
            vec![DrainAction::CloseRemaining, DrainAction::Leave]
        );
    }

    #[test]
    fn nothing_left_at_the_deadline_leaves_without_closing() {
        let mut d = drain(DrainConfig {
            deadline_ms: 10_000,
            parallel_max: 4,
        });
        d.rooms(Vec::new());
        d.sessions_left(0);
        assert_eq!(d.tick(50_000, &targets(), &t()), vec![DrainAction::Leave]);
    }

    #[test]
    fn clock_before_start_is_not_past_the_deadline() {
        let mut d = drain(DrainConfig {
            deadline_ms: 10_000,
            parallel_max: 4,
        });
        d.rooms(rooms(&[("r1", 1)]));
        assert_eq!(d.tick(0, &targets(), &t()), vec![migrate("r1", "a", 1)]);
    }
}
