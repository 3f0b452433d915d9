//! The leader's failure detector: a node that has not heartbeated for `heartbeat_interval_ms *
//! missed_max` is dead; a dead node that heartbeats again is alive.
//!
//! Only the raft leader acts on these changes (it proposes them, then re-places the dead node's
//! rooms), so a new leader starts with [`FailureDetector::reset`]: it cannot know how long ago the
//! others last heard from each node, so everyone gets a fresh grace period. Which nodes are dead
//! already is replicated state; the shell tells the detector with
//! [`FailureDetector::mark_known_dead`] so it reports no duplicate `Dead`.
//!
//! Time is an argument (`now_ms`, any monotonic clock); nothing here reads a clock.

use std::collections::{BTreeMap, BTreeSet};

use crate::ids::NodeId;

/// Most nodes the detector watches. Heartbeats from further unknown nodes are counted in
/// [`FailureDetector::refused_total`] and otherwise ignored.
pub const NODES_TRACKED_MAX: usize = 4096;

/// A change in a node's liveness, to be proposed by the leader.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum LivenessChange {
    /// No heartbeat within the deadline.
    Dead(NodeId),
    /// A node known as dead heartbeated again.
    Alive(NodeId),
}

/// Tracks the last heartbeat of every node and reports each change once.
#[derive(Clone, Debug)]
pub struct FailureDetector {
    heartbeat_interval_ms: u64,
    missed_max: u32,
    /// Last heartbeat (or grace period start) of each tracked node.
    last_seen_ms: BTreeMap<NodeId, u64>,
    /// Nodes already reported (or known) as dead; may hold untracked nodes.
    dead: BTreeSet<NodeId>,
    /// Heartbeats from unknown nodes refused because [`NODES_TRACKED_MAX`] was reached.
    refused_total: u64,
}

impl FailureDetector {
    /// A detector declaring dead after `missed_max` heartbeat intervals of silence.
    pub fn new(heartbeat_interval_ms: u64, missed_max: u32) -> Self {
        Self {
            heartbeat_interval_ms,
            missed_max,
            last_seen_ms: BTreeMap::new(),
            dead: BTreeSet::new(),
            refused_total: 0,
        }
    }

    /// Silence after which a node is dead: `heartbeat_interval_ms * missed_max` (saturating).
    pub fn deadline_ms(&self) -> u64 {
        self.heartbeat_interval_ms.saturating_mul(u64::from(self.missed_max))
    }

    /// Starts watching `node` with a fresh grace period from `now_ms` (no change event). A node
    /// already tracked gets its grace period renewed; a node known dead stays dead until it
    /// heartbeats. Beyond [`NODES_TRACKED_MAX`] new nodes are refused and counted.
    pub fn track(&mut self, node: NodeId, now_ms: u64) {
        if !self.last_seen_ms.contains_key(&node) && self.last_seen_ms.len() >= NODES_TRACKED_MAX {
            self.refused_total += 1;
            return;
        }
        let last_seen_ms = self.last_seen_ms.entry(node).or_insert(now_ms);
        *last_seen_ms = (*last_seen_ms).max(now_ms);
    }

    /// Stops watching `node` (it left the cluster) and forgets whether it was dead.
    pub fn forget(&mut self, node: &NodeId) {
        self.last_seen_ms.remove(node);
        self.dead.remove(node);
    }

    /// A heartbeat from `node` arrived at `now_ms`. Returns `Alive` if the node was dead; an unknown
    /// node starts being tracked.
    pub fn observe(&mut self, node: &NodeId, now_ms: u64) -> Option<LivenessChange> {
        if !self.last_seen_ms.contains_key(node) && self.last_seen_ms.len() >= NODES_TRACKED_MAX {
            self.refused_total += 1;
            return None;
        }
        self.track(node.clone(), now_ms);
        if self.dead.remove(node) {
            Some(LivenessChange::Alive(node.clone()))
        } else {
            None
        }
    }

    /// A new leader takes over at `now_ms`: every tracked node gets a fresh grace period. The dead
    /// set is kept as it is (it holds what [`Self::mark_known_dead`] and earlier ticks said); no
    /// node is declared dead by the reset itself.
    pub fn reset(&mut self, now_ms: u64) {
        for last_seen_ms in self.last_seen_ms.values_mut() {
            *last_seen_ms = now_ms;
        }
    }

    /// `node` is recorded as dead in the replicated state already: no `Dead` will be reported for
    /// it, and its next heartbeat reports `Alive`.
    pub fn mark_known_dead(&mut self, node: &NodeId) {
        self.dead.insert(node.clone());
    }

    /// `Dead` for each tracked node not yet dead whose silence exceeds [`Self::deadline_ms`], in id
    /// order; each is reported once (until a heartbeat revives it).
    pub fn tick(&mut self, now_ms: u64) -> Vec<LivenessChange> {
        let deadline_ms = self.deadline_ms();
        let mut changes = Vec::new();
        for (node, &last_seen_ms) in &self.last_seen_ms {
            if now_ms.saturating_sub(last_seen_ms) > deadline_ms && !self.dead.contains(node) {
                changes.push(LivenessChange::Dead(node.clone()));
            }
        }
        for change in &changes {
            if let LivenessChange::Dead(node) = change {
                self.dead.insert(node.clone());
            }
        }
        changes
    }

    /// Whether `node` is dead (reported by a tick or marked as known dead).
    pub fn is_dead(&self, node: &NodeId) -> bool {
        self.dead.contains(node)
    }

    /// Whether `node` is being watched.
    pub fn is_tracked(&self, node: &NodeId) -> bool {
        self.last_seen_ms.contains_key(node)
    }

    /// Heartbeats and tracks refused because [`NODES_TRACKED_MAX`] was reached (for a metric).
    pub fn refused_total(&self) -> u64 {
        self.refused_total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> NodeId {
        NodeId::from(s)
    }

    fn dead(s: &str) -> LivenessChange {
        LivenessChange::Dead(id(s))
    }

    #[test]
    fn deadline_is_interval_times_missed() {
        assert_eq!(FailureDetector::new(1_000, 3).deadline_ms(), 3_000);
        assert_eq!(FailureDetector::new(u64::MAX, 2).deadline_ms(), u64::MAX);
    }

    #[test]
    fn dead_only_strictly_after_the_deadline_and_reported_once() {
        let mut fd = FailureDetector::new(1_000, 3);
        fd.track(id("a"), 0);
        assert!(fd.tick(3_000).is_empty(), "exactly at the deadline is still alive");
        assert!(!fd.is_dead(&id("a")));
        assert_eq!(fd.tick(3_001), vec![dead("a")]);
        assert!(fd.is_dead(&id("a")));
        assert!(fd.tick(10_000).is_empty(), "reported once");
    }

    #[test]
    fn heartbeats_keep_a_node_alive() {
        let mut fd = FailureDetector::new(1_000, 3);
        fd.track(id("a"), 0);
        for now in (1_000..=20_000).step_by(1_000) {
            assert_eq!(fd.observe(&id("a"), now), None);
            assert!(fd.tick(now + 2_999).is_empty());
        }
    }

    #[test]
    fn a_dead_node_that_heartbeats_is_alive_once_and_can_die_again() {
        let mut fd = FailureDetector::new(1_000, 2);
        fd.track(id("a"), 0);
        assert_eq!(fd.tick(2_001), vec![dead("a")]);
        assert_eq!(fd.observe(&id("a"), 2_500), Some(LivenessChange::Alive(id("a"))));
        assert!(!fd.is_dead(&id("a")));
        assert_eq!(fd.observe(&id("a"), 2_600), None, "alive reported once");
        assert!(fd.tick(4_600).is_empty());
        assert_eq!(fd.tick(4_601), vec![dead("a")]);
    }

    #[test]
    fn several_nodes_die_in_id_order() {
        let mut fd = FailureDetector::new(100, 1);
        for name in ["c", "a", "b"] {
            fd.track(id(name), 0);
        }
        fd.observe(&id("b"), 150);
        assert_eq!(fd.tick(200), vec![dead("a"), dead("c")]);
        assert_eq!(fd.tick(251), vec![dead("b")]);
    }

    #[test]
    fn unknown_node_heartbeat_starts_tracking_without_event() {
        let mut fd = FailureDetector::new(1_000, 3);
        assert!(!fd.is_tracked(&id("x")));
        assert_eq!(fd.observe(&id("x"), 500), None);
        assert!(fd.is_tracked(&id("x")));
        assert!(fd.tick(3_500).is_empty());
        assert_eq!(fd.tick(3_501), vec![dead("x")]);
    }

    #[test]
    fn track_gives_a_grace_period_and_no_event() {
        let mut fd = FailureDetector::new(1_000, 3);
        fd.track(id("a"), 10_000);
        assert!(fd.tick(13_000).is_empty());
        // Re-tracking renews the grace period.
        fd.track(id("a"), 12_000);
        assert!(fd.tick(15_000).is_empty());
        assert_eq!(fd.tick(15_001), vec![dead("a")]);
    }

    #[test]
    fn late_heartbeat_timestamps_do_not_move_last_seen_back() {
        let mut fd = FailureDetector::new(1_000, 1);
        fd.track(id("a"), 5_000);
        fd.observe(&id("a"), 4_000);
        assert!(fd.tick(6_000).is_empty());
        assert_eq!(fd.tick(6_001), vec![dead("a")]);
    }

    #[test]
    fn forget_stops_watching_and_clears_dead() {
        let mut fd = FailureDetector::new(1_000, 1);
        fd.track(id("a"), 0);
        assert_eq!(fd.tick(1_001), vec![dead("a")]);
        fd.forget(&id("a"));
        assert!(!fd.is_dead(&id("a")));
        assert!(!fd.is_tracked(&id("a")));
        assert!(fd.tick(100_000).is_empty());
        // Coming back is a fresh start, not an Alive.
        assert_eq!(fd.observe(&id("a"), 100_000), None);
    }

    #[test]
    fn reset_gives_everyone_a_fresh_grace_period() {
        let mut fd = FailureDetector::new(1_000, 3);
        fd.track(id("a"), 0);
        fd.track(id("b"), 0);
        // A new leader at 2_900: a and b would have died at 3_001 without the reset.
        fd.reset(2_900);
        assert!(fd.tick(5_900).is_empty());
        assert_eq!(fd.tick(5_901), vec![dead("a"), dead("b")]);
    }

    #[test]
    fn reset_keeps_known_dead_and_declares_no_one_dead() {
        let mut fd = FailureDetector::new(1_000, 3);
        fd.track(id("a"), 0);
        fd.track(id("b"), 0);
        fd.mark_known_dead(&id("b"));
        fd.reset(50_000);
        assert!(fd.is_dead(&id("b")));
        assert!(!fd.is_dead(&id("a")));
        assert_eq!(fd.tick(53_001), vec![dead("a")], "no duplicate Dead for b");
        assert_eq!(fd.observe(&id("b"), 53_002), Some(LivenessChange::Alive(id("b"))));
    }

    #[test]
    fn known_dead_untracked_node_revives_on_heartbeat() {
        let mut fd = FailureDetector::new(1_000, 3);
        fd.mark_known_dead(&id("z"));
        assert!(fd.is_dead(&id("z")));
        assert!(fd.tick(1_000_000).is_empty());
        assert_eq!(fd.observe(&id("z"), 1_000_000), Some(LivenessChange::Alive(id("z"))));
        assert!(fd.is_tracked(&id("z")));
    }

    #[test]
    fn missed_max_zero_means_dead_after_any_silence() {
        let mut fd = FailureDetector::new(1_000, 0);
        fd.track(id("a"), 100);
        assert!(fd.tick(100).is_empty());
        assert_eq!(fd.tick(101), vec![dead("a")]);
    }

    #[test]
    fn tracked_nodes_are_bounded() {
        let mut fd = FailureDetector::new(1_000, 3);
        for i in 0..NODES_TRACKED_MAX {
            fd.track(id(&format!("n{i:05}")), 0);
        }
        assert_eq!(fd.refused_total(), 0);
        assert_eq!(fd.observe(&id("extra"), 0), None);
        fd.track(id("extra-2"), 0);
        assert_eq!(fd.refused_total(), 2);
        assert!(!fd.is_tracked(&id("extra")));
        // Known nodes still refresh.
        assert_eq!(fd.observe(&id("n00000"), 10), None);
        assert_eq!(fd.refused_total(), 2);
    }
}
