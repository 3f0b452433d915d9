//! Re-placing the rooms of a dead node (DESIGN.md §9, failover).
//!
//! The leader, having proposed a node dead, plans where each of its rooms goes and proposes each
//! move as a compare-and-set on the room's epoch: a room that moved meanwhile fails its compare and
//! is left alone. Clients then reconnect and resume from the store.
//!
//! Rooms are planned one by one in id order through [`placement::choose`] with the dead node's
//! region preferred. After each choice the chosen candidate counts one more room, so rooms spread
//! across equally loaded nodes (the fewest-rooms tie-break) instead of piling onto one.
//!
//! [`FailoverLoop`] is the loop around it that the store's leader runs: the
//! [`FailureDetector`] on the leader's own clock, and each dead node's plan carried out one
//! compare-and-set after the other.

use std::collections::{BTreeMap, VecDeque};

use super::liveness::{FailureDetector, LivenessChange};
use super::placement::{self, Candidate, Thresholds};
use crate::ids::{NodeId, RoomId};
use crate::types::{NodeStatus, Placement};

/// One room's new host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Replacement {
    /// The room.
    pub room: RoomId,
    /// Its epoch in the directory now: the compare of the compare-and-set.
    pub expected_epoch: u64,
    /// The new host.
    pub to: NodeId,
}

/// Plans new hosts for the rooms `dead` hosted. `rooms` is the directory: `(room, host, epoch)`;
/// rooms of other hosts are ignored, and a room listed twice is planned once, at its highest
/// epoch. The dead node is never a target, even if listed among `candidates`. Empty when no
/// candidate is available.
pub fn plan_failover(
    dead: &NodeId,
    dead_region: &str,
    rooms: &[(RoomId, NodeId, u64)],
    candidates: &[Candidate],
    t: &Thresholds,
) -> Vec<Replacement> {
    let mut orphans: Vec<(&RoomId, u64)> = rooms
        .iter()
        .filter(|(_, host, _)| host == dead)
        .map(|(room, _, epoch)| (room, *epoch))
        .collect();
    // Id order, highest epoch first within a room, then keep the first of each room.
    orphans.sort_by(|a, b| a.0.cmp(b.0).then(b.1.cmp(&a.1)));
    orphans.dedup_by(|later, first| later.0 == first.0);

    let mut pool: Vec<Candidate> = candidates.iter().filter(|c| &c.id != dead).cloned().collect();
    let mut plan = Vec::with_capacity(orphans.len());
    for (room, epoch) in orphans {
        let Some(index) = placement::choose_index(&pool, Some(dead_region), t, |_| true) else {
            // No candidate is available: nothing can be placed (the pool does not change).
            break;
        };
        let target = &mut pool[index];
        target.rooms = target.rooms.saturating_add(1);
        plan.push(Replacement {
            room: room.clone(),
            expected_epoch: epoch,
            to: target.id.clone(),
        });
    }
    plan
}

/// What the failover loop needs done next ([`FailoverLoop::next_step`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FailoverStep {
    /// Nothing, until the next tick (or an answer the loop waits for).
    Idle,
    /// Read the directory (every room's placement, this replica's view is enough: each move is
    /// a compare-and-set) and the registered nodes, and hand them to [`FailoverLoop::plan`]; or
    /// call [`FailoverLoop::rooms_unreadable`].
    ReadRooms {
        /// The node whose rooms are re-placed.
        dead: NodeId,
    },
    /// Propose this compare-and-set, then report with [`FailoverLoop::placed`].
    Place(Replacement),
}

/// What the loop waits for.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Waiting {
    Rooms(NodeId),
    Place,
}

/// Failover as the store's leader runs it: a [`FailureDetector`] fed with the heartbeat stamps
/// of the registered nodes on the leader's own clock, reset when this node gains leadership
/// (it has not been counting: everyone gets a fresh grace period), and for each node it
/// declares dead a [`plan_failover`] carried out one compare-and-set after the other. While a
/// plan runs, ticks do nothing (the node's loop awaits each placement before it ticks again).
///
/// Driven by the node's `src/mesh/failover.rs` (a tokio interval of
/// [`timing::failover_tick_ms`](super::timing::failover_tick_ms), the store calls) and by the
/// simulator's `simulations/src/control.rs` (its control tick, proposals through the simulated
/// replica). Sans-IO: time and the node list are arguments, steps come out.
#[derive(Clone, Debug)]
pub struct FailoverLoop {
    heartbeat_interval_ms: u64,
    missed_max: u32,
    leading: bool,
    detector: FailureDetector,
    /// The heartbeat stamp each node had at the last tick: a new stamp is a heartbeat.
    last_heartbeat_ms: BTreeMap<NodeId, u64>,
    /// Nodes declared dead whose rooms are not planned yet, in the order they died.
    dead: VecDeque<NodeId>,
    /// The current plan's placements not proposed yet.
    plan: VecDeque<Replacement>,
    waiting: Option<Waiting>,
}

impl FailoverLoop {
    /// A loop declaring a node dead after `missed_max` heartbeat intervals of silence.
    pub fn new(heartbeat_interval_ms: u64, missed_max: u32) -> Self {
        Self {
            heartbeat_interval_ms,
            missed_max,
            leading: false,
            detector: FailureDetector::new(heartbeat_interval_ms, missed_max),
            last_heartbeat_ms: BTreeMap::new(),
            dead: VecDeque::new(),
            plan: VecDeque::new(),
            waiting: None,
        }
    }

    /// Whether dead nodes' rooms are still being re-placed (ticks do nothing meanwhile).
    pub fn is_busy(&self) -> bool {
        self.waiting.is_some() || !self.dead.is_empty() || !self.plan.is_empty()
    }

    /// Whether the detector has declared `node` dead (and not seen it since).
    pub fn is_dead(&self, node: &NodeId) -> bool {
        self.detector.is_dead(node)
    }

    /// One tick at `now_ms` (the leader's monotonic clock). `leader`: whether this node `me`
    /// leads the store now; `nodes`: the registered nodes with their heartbeat stamps. Returns
    /// the liveness changes seen (for the log); each `Dead` queues that node's rooms for
    /// [`FailoverLoop::next_step`].
    pub fn tick(&mut self, now_ms: u64, me: &NodeId, leader: bool, nodes: &[NodeStatus]) -> Vec<LivenessChange> {
        if self.is_busy() {
            return Vec::new();
        }
        if !leader {
            self.leading = false;
            return Vec::new();
        }
        if !self.leading {
            self.leading = true;
            self.detector = FailureDetector::new(self.heartbeat_interval_ms, self.missed_max);
            self.last_heartbeat_ms.clear();
            for node in nodes {
                self.detector.track(node.id.clone(), now_ms);
                self.last_heartbeat_ms.insert(node.id.clone(), node.last_heartbeat_ms);
            }
        }
        let mut changes = Vec::new();
        for node in nodes {
            let previous = self.last_heartbeat_ms.insert(node.id.clone(), node.last_heartbeat_ms);
            // The leader's own heartbeat is its being here: it never waits for its stamp.
            if node.id == *me || previous != Some(node.last_heartbeat_ms) {
                changes.extend(self.detector.observe(&node.id, now_ms));
            }
        }
        let detector = &mut self.detector;
        self.last_heartbeat_ms.retain(|id, _| {
            let known = nodes.iter().any(|n| n.id == *id);
            if !known {
                detector.forget(id);
            }
            known
        });
        changes.extend(self.detector.tick(now_ms));
        for change in &changes {
            if let LivenessChange::Dead(node) = change {
                self.dead.push_back(node.clone());
            }
        }
        changes
    }

    /// The next thing to do; [`FailoverStep::Idle`] while an answer is awaited.
    pub fn next_step(&mut self) -> FailoverStep {
        if self.waiting.is_some() {
            return FailoverStep::Idle;
        }
        if let Some(replacement) = self.plan.pop_front() {
            self.waiting = Some(Waiting::Place);
            return FailoverStep::Place(replacement);
        }
        if let Some(dead) = self.dead.pop_front() {
            self.waiting = Some(Waiting::Rooms(dead.clone()));
            return FailoverStep::ReadRooms { dead };
        }
        FailoverStep::Idle
    }

    /// The directory and the nodes for [`FailoverStep::ReadRooms`]: plans the dead node's rooms
    /// on the nodes alive by the store and by this detector (a node the store still shows alive
    /// may be one this leader has just declared dead). Returns how many rooms it plans.
    pub fn plan(&mut self, nodes: &[NodeStatus], rooms: &[Placement], t: &Thresholds) -> usize {
        let Some(Waiting::Rooms(dead)) = self.waiting.take() else {
            return 0;
        };
        let region = nodes
            .iter()
            .find(|n| n.id == dead)
            .map(|n| n.region.clone())
            .unwrap_or_default();
        let rooms: Vec<(RoomId, NodeId, u64)> = rooms
            .iter()
            .map(|p| (p.room.clone(), p.node.clone(), p.epoch))
            .collect();
        let mut candidates = placement::candidates(nodes);
        for candidate in &mut candidates {
            candidate.available &= !self.detector.is_dead(&candidate.id);
        }
        let plan = plan_failover(&dead, &region, &rooms, &candidates, t);
        let planned = plan.len();
        self.plan = plan.into();
        planned
    }

    /// The directory could not be read for [`FailoverStep::ReadRooms`]: that node's rooms are
    /// left to the directory's own re-placement (a join or a fence places a room whose host is
    /// dead), the loop goes on with the next dead node.
    pub fn rooms_unreadable(&mut self) {
        if matches!(self.waiting, Some(Waiting::Rooms(_))) {
            self.waiting = None;
        }
    }

    /// The compare-and-set of [`FailoverStep::Place`] was answered (placed, or the room moved
    /// meanwhile and is left alone, or the outcome is unknown: the room's next join or fence
    /// places it if it is still on the dead node).
    pub fn placed(&mut self) {
        if self.waiting == Some(Waiting::Place) {
            self.waiting = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::placement::tests::{candidate, status};

    /// The plan for the rooms of the node `dead`, whose region was `region`.
    fn plan(rooms: &[(RoomId, NodeId, u64)], candidates: &[Candidate], region: &str) -> Vec<Replacement> {
        plan_failover(&NodeId::from("dead"), region, rooms, candidates, &Thresholds::default())
    }

    fn room(name: &str, host: &str, epoch: u64) -> (RoomId, NodeId, u64) {
        (RoomId::from(name), NodeId::from(host), epoch)
    }

    fn summary(plan: &[Replacement]) -> Vec<(&str, u64, &str)> {
        plan.iter()
            .map(|r| (r.room.as_str(), r.expected_epoch, r.to.as_str()))
            .collect()
    }

    #[test]
    fn only_the_dead_nodes_rooms_in_id_order() {
        let rooms = [room("r3", "dead", 7), room("r1", "dead", 2), room("r2", "alive", 4)];
        let candidates = [candidate("alive", "seoul", 0.1, 0, 0)];
        let plan = plan(&rooms, &candidates, "seoul");
        assert_eq!(summary(&plan), vec![("r1", 2, "alive"), ("r3", 7, "alive")]);
    }

    #[test]
    fn rooms_spread_across_equally_loaded_nodes() {
        let rooms: Vec<_> = (0..5).map(|i| room(&format!("r{i}"), "dead", 1)).collect();
        let candidates = [
            candidate("b", "seoul", 0.3, 0, 0),
            candidate("a", "seoul", 0.3, 0, 0),
            candidate("c", "seoul", 0.3, 0, 1),
        ];
        let plan = plan(&rooms, &candidates, "seoul");
        let targets: Vec<&str> = plan.iter().map(|r| r.to.as_str()).collect();
        // a (0 rooms, smallest id), b (0), then a/b/c all at 1 → a, b, c.
        assert_eq!(targets, vec!["a", "b", "a", "b", "c"]);
    }

    #[test]
    fn the_dead_region_is_preferred() {
        let rooms = [room("r1", "dead", 1)];
        let candidates = [
            candidate("busan-1", "busan", 0.0, 0, 0),
            candidate("seoul-2", "seoul", 0.5, 0, 3),
        ];
        let plan = plan(&rooms, &candidates, "Seoul");
        assert_eq!(summary(&plan), vec![("r1", 1, "seoul-2")]);
    }

    #[test]
    fn overloaded_region_spills_to_others() {
        let rooms = [room("r1", "dead", 1)];
        let candidates = [
            candidate("busan-1", "busan", 0.2, 0, 0),
            candidate("seoul-2", "seoul", 0.9, 0, 0),
        ];
        let plan = plan(&rooms, &candidates, "seoul");
        assert_eq!(summary(&plan), vec![("r1", 1, "busan-1")]);
    }

    #[test]
    fn the_dead_node_is_never_a_target() {
        let rooms = [room("r1", "dead", 1)];
        let candidates = [
            candidate("dead", "seoul", 0.0, 0, 0),
            candidate("z", "busan", 0.95, 0, 9),
        ];
        let plan = plan(&rooms, &candidates, "seoul");
        assert_eq!(summary(&plan), vec![("r1", 1, "z")]);
    }

    #[test]
    fn no_available_candidate_plans_nothing() {
        let rooms = [room("r1", "dead", 1), room("r2", "dead", 1)];
        let mut down = candidate("b", "seoul", 0.0, 0, 0);
        down.available = false;
        let t = Thresholds::default();
        assert!(plan_failover(&NodeId::from("dead"), "seoul", &rooms, &[down], &t).is_empty());
        assert!(plan_failover(&NodeId::from("dead"), "seoul", &rooms, &[], &t).is_empty());
    }

    #[test]
    fn no_rooms_no_plan() {
        let candidates = [candidate("a", "seoul", 0.0, 0, 0)];
        let t = Thresholds::default();
        assert!(plan_failover(&NodeId::from("dead"), "seoul", &[], &candidates, &t).is_empty());
        let others = [room("r1", "a", 1)];
        assert!(plan_failover(&NodeId::from("dead"), "seoul", &others, &candidates, &t).is_empty());
    }

    #[test]
    fn a_room_listed_twice_is_planned_once_at_its_highest_epoch() {
        let rooms = [room("r1", "dead", 3), room("r1", "dead", 5), room("r1", "dead", 4)];
        let candidates = [candidate("a", "seoul", 0.0, 0, 0)];
        let plan = plan(&rooms, &candidates, "seoul");
        assert_eq!(summary(&plan), vec![("r1", 5, "a")]);
    }

    #[test]
    fn the_plan_does_not_depend_on_input_order() {
        let mut rooms: Vec<_> = (0..6).map(|i| room(&format!("r{i}"), "dead", i)).collect();
        let mut candidates = vec![
            candidate("a", "seoul", 0.2, 0, 0),
            candidate("b", "seoul", 0.2, 0, 0),
            candidate("c", "busan", 0.1, 0, 0),
        ];
        let t = Thresholds::default();
        let dead = NodeId::from("dead");
        let first = plan_failover(&dead, "seoul", &rooms, &candidates, &t);
        rooms.reverse();
        candidates.reverse();
        assert_eq!(plan_failover(&dead, "seoul", &rooms, &candidates, &t), first);
    }

    fn placement(room: &str, node: &str, epoch: u64) -> Placement {
        Placement {
            room: RoomId::from(room),
            node: NodeId::from(node),
            epoch,
        }
    }

    /// Nodes a, b, c; `silent` stopped heartbeating at stamp 1, the others heartbeat at `now`.
    fn nodes(now_ms: u64, silent: &str) -> Vec<NodeStatus> {
        ["a", "b", "c"]
            .into_iter()
            .map(|id| {
                let mut node = status(id, "seoul");
                node.last_heartbeat_ms = if id == silent { 1 } else { now_ms };
                node
            })
            .collect()
    }

    /// Ticks every 125 ms from `from_ms` to `to_ms` as leader `a`; returns the changes.
    fn run(core: &mut FailoverLoop, from_ms: u64, to_ms: u64, silent: &str) -> Vec<LivenessChange> {
        let mut changes = Vec::new();
        let mut now = from_ms;
        while now <= to_ms {
            changes.extend(core.tick(now, &NodeId::from("a"), true, &nodes(now, silent)));
            now += 125;
        }
        changes
    }

    #[test]
    fn a_silent_node_is_dead_after_its_missed_heartbeats_and_only_its_rooms_move() {
        let mut core = FailoverLoop::new(500, 3);
        assert!(run(&mut core, 0, 1_375, "c").is_empty(), "within the grace period");
        assert_eq!(
            run(&mut core, 1_500, 1_625, "c"),
            vec![LivenessChange::Dead(NodeId::from("c"))]
        );
        assert!(core.is_dead(&NodeId::from("c")));
        assert_eq!(
            core.next_step(),
            FailoverStep::ReadRooms {
                dead: NodeId::from("c")
            }
        );
        assert_eq!(core.next_step(), FailoverStep::Idle, "waits for the directory");
        // The store may still read c alive: the plan never puts its rooms back on it.
        let directory = [
            placement("r1", "c", 4),
            placement("r2", "a", 2),
            placement("r3", "c", 1),
        ];
        let planned = core.plan(&nodes(1_625, "none"), &directory, &Thresholds::default());
        assert_eq!(planned, 2);
        let FailoverStep::Place(first) = core.next_step() else {
            panic!("a placement first")
        };
        assert_eq!((first.room.as_str(), first.expected_epoch), ("r1", 4));
        assert_ne!(first.to.as_str(), "c");
        assert_eq!(core.next_step(), FailoverStep::Idle, "one compare-and-set at a time");
        assert!(
            core.tick(1_750, &NodeId::from("a"), true, &nodes(1_750, "c"))
                .is_empty()
        );
        core.placed();
        let FailoverStep::Place(second) = core.next_step() else {
            panic!("the second room")
        };
        assert_eq!((second.room.as_str(), second.expected_epoch), ("r3", 1));
        core.placed();
        assert_eq!(core.next_step(), FailoverStep::Idle);
        assert!(!core.is_busy());
    }

    #[test]
    fn a_follower_counts_nothing_and_a_new_leader_grants_a_grace_period() {
        let mut core = FailoverLoop::new(500, 3);
        for now in (0..5_000).step_by(125) {
            assert!(core.tick(now, &NodeId::from("a"), false, &nodes(now, "c")).is_empty());
        }
        // Leader from 5 s on: c has been silent for 5 s, but this leader was not counting.
        assert!(run(&mut core, 5_000, 6_375, "c").is_empty());
        assert_eq!(
            run(&mut core, 6_500, 6_625, "c"),
            vec![LivenessChange::Dead(NodeId::from("c"))]
        );
    }

    #[test]
    fn an_unreadable_directory_moves_on_to_the_next_dead_node() {
        let mut core = FailoverLoop::new(500, 3);
        let only_a = |now: u64| {
            let mut b = status("b", "seoul");
            b.last_heartbeat_ms = 1;
            let mut c = status("c", "busan");
            c.last_heartbeat_ms = 1;
            // The store still reads b alive (its state here is the default), and idle where a
            // is busy: only the detector's verdict keeps c's room off b.
            let mut a = status("a", "seoul");
            a.last_heartbeat_ms = now;
            a.last_load = Some(crate::types::NodeLoad {
                cpu: 0.5,
                connections: 10,
                rooms: 3,
                egress_bps: 0,
            });
            vec![a, b, c]
        };
        let mut changes = Vec::new();
        for now in (0..=1_625).step_by(125) {
            changes.extend(core.tick(now, &NodeId::from("a"), true, &only_a(now)));
        }
        assert_eq!(changes.len(), 2, "{changes:?}");
        assert!(matches!(core.next_step(), FailoverStep::ReadRooms { dead } if dead.as_str() == "b"));
        core.rooms_unreadable();
        assert!(matches!(core.next_step(), FailoverStep::ReadRooms { dead } if dead.as_str() == "c"));
        assert_eq!(
            core.plan(&only_a(1_500), &[placement("r", "c", 1)], &Thresholds::default()),
            1
        );
        let FailoverStep::Place(r) = core.next_step() else {
            panic!("c's room is re-placed")
        };
        assert_eq!(r.to.as_str(), "a");
    }
}
