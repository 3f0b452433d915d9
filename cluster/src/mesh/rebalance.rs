//! The optional rebalancer: moves one room at a time off a node that stays overloaded.
//!
//! Each [`Rebalancer::decide`] call looks at the candidates' scores (see
//! [`Candidate::score`]) and the directory, and returns at most one [`Move`]:
//!
//! - **source**: an available node whose score is above `high` in this call and in every call
//!   since one at least `min_interval_ms / 2` earlier (hysteresis: a spike does not move rooms);
//!   the most loaded first (ties by id);
//! - **room**: the source's smallest room (fewest viewers, then id) with viewers, not moved within
//!   `cooldown_ms` (cheap to move, no ping-pong);
//! - **target**: an available node other than the source whose score is below `low`, in the
//!   source's region if one qualifies there, else anywhere; the least loaded (score, rooms, id).
//!
//! At most one move per `min_interval_ms` cluster-wide. The leader drives it; the move itself is a
//! [`super::migration::Migration`].

use std::collections::BTreeMap;

use super::placement::{Candidate, Thresholds, compare_load, in_region};
use crate::ids::{NodeId, RoomId};

/// Settings of the rebalancer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RebalanceConfig {
    /// A node whose score stays above this is a source. Default 0.9.
    pub high: f32,
    /// A target's score must be below this. Default 0.6.
    pub low: f32,
    /// At most one move per this interval, cluster-wide. Default 30 s.
    pub min_interval_ms: u64,
    /// A room moved is not moved again within this. Default 300 s.
    pub cooldown_ms: u64,
}

impl Default for RebalanceConfig {
    fn default() -> Self {
        Self {
            high: 0.9,
            low: 0.6,
            min_interval_ms: 30_000,
            cooldown_ms: 300_000,
        }
    }
}

impl RebalanceConfig {
    /// Checks `0 <= low < high` (otherwise rooms could bounce between two nodes).
    pub fn validate(&self) -> Result<(), String> {
        if !(self.low >= 0.0 && self.low < self.high) {
            return Err(format!(
                "rebalance thresholds need 0 <= low < high, got low {} high {}",
                self.low, self.high
            ));
        }
        Ok(())
    }
}

/// One room to move.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Move {
    /// The room.
    pub room: RoomId,
    /// Its host now.
    pub from: NodeId,
    /// Its new host.
    pub to: NodeId,
    /// Its epoch now: the compare of the flip.
    pub expected_epoch: u64,
}

/// The rebalancer's memory between calls: hysteresis, rate limit and cooldowns.
#[derive(Clone, Debug)]
pub struct Rebalancer {
    config: RebalanceConfig,
    /// Nodes above `high` in every call since the given time.
    above_since_ms: BTreeMap<NodeId, u64>,
    /// When the last move was decided.
    last_move_ms: Option<u64>,
    /// Rooms moved within the cooldown, with when.
    moved_at_ms: BTreeMap<RoomId, u64>,
}

impl Rebalancer {
    /// A rebalancer that has seen nothing yet.
    pub fn new(config: RebalanceConfig) -> Self {
        Self {
            config,
            above_since_ms: BTreeMap::new(),
            last_move_ms: None,
            moved_at_ms: BTreeMap::new(),
        }
    }

    /// Its settings.
    pub fn config(&self) -> &RebalanceConfig {
        &self.config
    }

    /// Decides at most one move at `now_ms`. `rooms` is the directory with viewer counts:
    /// `(room, host, epoch, viewers)`. Call it periodically (every few seconds): the hysteresis
    /// needs two calls to confirm a source.
    pub fn decide(
        &mut self,
        now_ms: u64,
        candidates: &[Candidate],
        rooms: &[(RoomId, NodeId, u64, u64)],
        t: &Thresholds,
    ) -> Option<Move> {
        let config = self.config;
        let confirm_ms = config.min_interval_ms / 2;

        // Hysteresis bookkeeping, on every call (even rate-limited ones).
        let mut above_since_ms = BTreeMap::new();
        let mut sources: Vec<(f32, &Candidate)> = Vec::new();
        for candidate in candidates.iter().filter(|c| c.available) {
            let score = candidate.score(t);
            if score <= config.high {
                continue;
            }
            match self.above_since_ms.get(&candidate.id) {
                Some(&since_ms) => {
                    above_since_ms.insert(candidate.id.clone(), since_ms);
                    if now_ms.saturating_sub(since_ms) >= confirm_ms {
                        sources.push((score, candidate));
                    }
                }
                None => {
                    above_since_ms.insert(candidate.id.clone(), now_ms);
                }
            }
        }
        self.above_since_ms = above_since_ms;
        self.moved_at_ms
            .retain(|_, moved_ms| now_ms.saturating_sub(*moved_ms) < config.cooldown_ms);

        if let Some(last_move_ms) = self.last_move_ms
            && now_ms.saturating_sub(last_move_ms) < config.min_interval_ms
        {
            return None;
        }

        // Most loaded first, ties by id.
        sources.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| a.1.id.cmp(&b.1.id)));
        for (_, source) in sources {
            let Some((room, epoch)) = self.smallest_movable_room(&source.id, rooms) else {
                continue;
            };
            let Some(target) = Self::target(source, candidates, config.low, t) else {
                continue;
            };
            let chosen = Move {
                room: room.clone(),
                from: source.id.clone(),
                to: target.id.clone(),
                expected_epoch: epoch,
            };
            self.last_move_ms = Some(now_ms);
            self.moved_at_ms.insert(room.clone(), now_ms);
            // The source must prove itself overloaded again before another move.
            self.above_since_ms.remove(&source.id);
            return Some(chosen);
        }
        None
    }

    /// The source's room with the fewest viewers (> 0), then smallest id, not in cooldown.
    fn smallest_movable_room<'a>(
        &self,
        source: &NodeId,
        rooms: &'a [(RoomId, NodeId, u64, u64)],
    ) -> Option<(&'a RoomId, u64)> {
        rooms
            .iter()
            .filter(|(room, host, _, viewers)| host == source && *viewers > 0 && !self.moved_at_ms.contains_key(room))
            .min_by(|a, b| a.3.cmp(&b.3).then_with(|| a.0.cmp(&b.0)))
            .map(|(room, _, epoch, _)| (room, *epoch))
    }

    /// The least loaded available node below `low`, in the source's region if any qualifies there.
    fn target<'a>(source: &Candidate, candidates: &'a [Candidate], low: f32, t: &Thresholds) -> Option<&'a Candidate> {
        let eligible = || {
            candidates
                .iter()
                .filter(|c| c.available && c.id != source.id && c.score(t) < low)
        };
        let best = |c: &Candidate, d: &Candidate| compare_load(c, d, t);
        eligible()
            .filter(|c| in_region(c, &source.region))
            .min_by(|a, b| best(a, b))
            .or_else(|| eligible().min_by(|a, b| best(a, b)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::placement::tests::candidate;

    /// Thresholds under which a node's score is exactly its cpu.
    fn unit() -> Thresholds {
        Thresholds {
            cpu_max: 1.0,
            connections_ratio_max: 1.0,
        }
    }

    /// An idle-connection node whose score under [`unit`] is `score`.
    fn node(id: &str, region: &str, score: f32) -> Candidate {
        candidate(id, region, score, 0, 0)
    }

    fn room(name: &str, host: &str, epoch: u64, viewers: u64) -> (RoomId, NodeId, u64, u64) {
        (RoomId::from(name), NodeId::from(host), epoch, viewers)
    }

    fn config() -> RebalanceConfig {
        RebalanceConfig {
            high: 0.9,
            low: 0.6,
            min_interval_ms: 10_000,
            cooldown_ms: 100_000,
        }
    }

    fn summary(m: &Option<Move>) -> Option<(&str, &str, &str, u64)> {
        m.as_ref()
            .map(|m| (m.room.as_str(), m.from.as_str(), m.to.as_str(), m.expected_epoch))
    }

    #[test]
    fn defaults() {
        let c = RebalanceConfig::default();
        assert_eq!(
            (c.high, c.low, c.min_interval_ms, c.cooldown_ms),
            (0.9, 0.6, 30_000, 300_000)
        );
        assert!(c.validate().is_ok());
        assert!(RebalanceConfig { low: 0.9, ..c }.validate().is_err());
        assert!(RebalanceConfig { low: f32::NAN, ..c }.validate().is_err());
    }

    #[test]
    fn a_spike_in_one_call_moves_nothing() {
        let mut r = Rebalancer::new(config());
        let candidates = [node("hot", "seoul", 1.0), node("cold", "seoul", 0.1)];
        let rooms = [room("r1", "hot", 3, 5)];
        let t = unit();
        assert_eq!(r.decide(0, &candidates, &rooms, &t), None);
        // Still above, but not min_interval/2 later yet.
        assert_eq!(r.decide(4_999, &candidates, &rooms, &t), None);
        assert_eq!(
            summary(&r.decide(5_000, &candidates, &rooms, &t)),
            Some(("r1", "hot", "cold", 3))
        );
    }

    #[test]
    fn dipping_below_high_restarts_the_hysteresis() {
        let mut r = Rebalancer::new(config());
        let hot = [node("hot", "seoul", 1.0), node("cold", "seoul", 0.1)];
        let calm = [node("hot", "seoul", 0.8), node("cold", "seoul", 0.1)];
        let rooms = [room("r1", "hot", 3, 5)];
        let t = unit();
        assert_eq!(r.decide(0, &hot, &rooms, &t), None);
        assert_eq!(r.decide(3_000, &calm, &rooms, &t), None);
        assert_eq!(r.decide(6_000, &hot, &rooms, &t), None, "above again only since 6000");
        assert_eq!(r.decide(10_999, &hot, &rooms, &t), None);
        assert!(r.decide(11_000, &hot, &rooms, &t).is_some());
    }

    #[test]
    fn exactly_high_is_not_above() {
        let mut r = Rebalancer::new(RebalanceConfig {
            high: 0.5,
            low: 0.3,
            ..config()
        });
        let candidates = [node("a", "seoul", 0.5), node("b", "seoul", 0.0)];
        let rooms = [room("r1", "a", 1, 1)];
        let t = unit();
        assert_eq!(r.decide(0, &candidates, &rooms, &t), None);
        assert_eq!(r.decide(100_000, &candidates, &rooms, &t), None);
    }

    #[test]
    fn picks_the_smallest_room_with_viewers() {
        let mut r = Rebalancer::new(config());
        let candidates = [node("hot", "seoul", 1.0), node("cold", "seoul", 0.1)];
        let rooms = [
            room("big", "hot", 1, 100),
            room("empty", "hot", 1, 0),
            room("small-b", "hot", 2, 3),
            room("small-a", "hot", 4, 3),
            room("elsewhere", "cold", 1, 1),
        ];
        let t = unit();
        r.decide(0, &candidates, &rooms, &t);
        assert_eq!(
            summary(&r.decide(5_000, &candidates, &rooms, &t)),
            Some(("small-a", "hot", "cold", 4))
        );
    }

    #[test]
    fn at_most_one_move_per_interval_and_rooms_cool_down() {
        let mut r = Rebalancer::new(config());
        let candidates = [node("hot", "seoul", 1.0), node("cold", "seoul", 0.1)];
        let rooms = [room("r1", "hot", 1, 1), room("r2", "hot", 1, 2)];
        let t = unit();
        r.decide(0, &candidates, &rooms, &t);
        assert_eq!(
            summary(&r.decide(5_000, &candidates, &rooms, &t)),
            Some(("r1", "hot", "cold", 1))
        );
        // The source re-confirms from 6_000; the interval ends at 15_000.
        assert_eq!(r.decide(6_000, &candidates, &rooms, &t), None);
        assert_eq!(r.decide(14_999, &candidates, &rooms, &t), None, "rate limited");
        // r1 (reported still on hot, e.g. a stale directory) is cooling down: r2 goes.
        assert_eq!(
            summary(&r.decide(15_000, &candidates, &rooms, &t)),
            Some(("r2", "hot", "cold", 1))
        );
        // Both cooling down: nothing to move.
        assert_eq!(r.decide(21_000, &candidates, &rooms, &t), None);
        assert_eq!(r.decide(30_000, &candidates, &rooms, &t), None);
        // r1's cooldown (100 s from 5_000) ends at 105_000.
        assert_eq!(r.decide(104_999, &candidates, &rooms, &t), None);
        assert_eq!(
            summary(&r.decide(105_000, &candidates, &rooms, &t)),
            Some(("r1", "hot", "cold", 1))
        );
    }

    #[test]
    fn target_must_be_below_low() {
        let mut r = Rebalancer::new(config());
        let candidates = [node("hot", "seoul", 1.0), node("warm", "seoul", 0.6)];
        let rooms = [room("r1", "hot", 1, 1)];
        let t = unit();
        r.decide(0, &candidates, &rooms, &t);
        assert_eq!(r.decide(5_000, &candidates, &rooms, &t), None);
        let candidates = [node("hot", "seoul", 1.0), node("cool", "seoul", 0.59)];
        assert_eq!(
            summary(&r.decide(6_000, &candidates, &rooms, &t)),
            Some(("r1", "hot", "cool", 1))
        );
    }

    #[test]
    fn same_region_target_preferred_even_if_more_loaded() {
        let mut r = Rebalancer::new(config());
        let candidates = [
            node("hot", "seoul", 1.0),
            node("busan-idle", "busan", 0.0),
            node("seoul-b", "seoul", 0.5),
            node("seoul-a", "seoul", 0.5),
        ];
        let rooms = [room("r1", "hot", 1, 1)];
        let t = unit();
        r.decide(0, &candidates, &rooms, &t);
        assert_eq!(
            summary(&r.decide(5_000, &candidates, &rooms, &t)),
            Some(("r1", "hot", "seoul-a", 1))
        );
    }

    #[test]
    fn other_region_target_when_none_in_own() {
        let mut r = Rebalancer::new(config());
        let mut down = node("seoul-idle", "seoul", 0.0);
        down.available = false;
        let candidates = [node("hot", "seoul", 1.0), down, node("busan-1", "busan", 0.3)];
        let rooms = [room("r1", "hot", 1, 1)];
        let t = unit();
        r.decide(0, &candidates, &rooms, &t);
        assert_eq!(
            summary(&r.decide(5_000, &candidates, &rooms, &t)),
            Some(("r1", "hot", "busan-1", 1))
        );
    }

    #[test]
    fn the_most_loaded_source_goes_first_and_falls_through_when_it_has_nothing_to_move() {
        let mut r = Rebalancer::new(config());
        let candidates = [
            node("hot", "seoul", 1.0),
            node("hotter", "seoul", 1.2),
            node("cold", "seoul", 0.1),
        ];
        let t = unit();
        let rooms = [room("a", "hot", 1, 1), room("b", "hotter", 1, 1)];
        r.decide(0, &candidates, &rooms, &t);
        assert_eq!(
            summary(&r.decide(5_000, &candidates, &rooms, &t)).map(|m| m.1),
            Some("hotter")
        );

        let mut r = Rebalancer::new(config());
        let rooms = [room("a", "hot", 1, 1), room("b", "hotter", 1, 0)];
        r.decide(0, &candidates, &rooms, &t);
        assert_eq!(
            summary(&r.decide(5_000, &candidates, &rooms, &t)),
            Some(("a", "hot", "cold", 1))
        );
    }

    #[test]
    fn equally_loaded_sources_break_ties_by_id() {
        let mut r = Rebalancer::new(config());
        let candidates = [
            node("b", "seoul", 1.0),
            node("a", "seoul", 1.0),
            node("cold", "seoul", 0.1),
        ];
        let rooms = [room("rb", "b", 1, 1), room("ra", "a", 1, 1)];
        let t = unit();
        r.decide(0, &candidates, &rooms, &t);
        assert_eq!(
            summary(&r.decide(5_000, &candidates, &rooms, &t)),
            Some(("ra", "a", "cold", 1))
        );
    }

    #[test]
    fn unavailable_overloaded_nodes_are_not_sources() {
        let mut r = Rebalancer::new(config());
        let mut draining = node("hot", "seoul", 1.0);
        draining.available = false;
        let candidates = [draining, node("cold", "seoul", 0.1)];
        let rooms = [room("r1", "hot", 1, 1)];
        let t = unit();
        assert_eq!(r.decide(0, &candidates, &rooms, &t), None);
        assert_eq!(r.decide(5_000, &candidates, &rooms, &t), None);
    }

    #[test]
    fn no_candidates_no_move() {
        let mut r = Rebalancer::new(config());
        let t = unit();
        assert_eq!(r.decide(0, &[], &[], &t), None);
        assert_eq!(r.decide(50_000, &[], &[room("r", "x", 1, 1)], &t), None);
    }

    #[test]
    fn zero_min_interval_still_needs_two_calls() {
        let mut r = Rebalancer::new(RebalanceConfig {
            min_interval_ms: 0,
            ..config()
        });
        let candidates = [node("hot", "seoul", 1.0), node("cold", "seoul", 0.1)];
        let rooms = [room("r1", "hot", 1, 1)];
        let t = unit();
        assert_eq!(r.decide(7, &candidates, &rooms, &t), None);
        assert!(r.decide(7, &candidates, &rooms, &t).is_some());
    }
}
