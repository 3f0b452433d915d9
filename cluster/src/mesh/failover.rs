//! Re-placing the rooms of a dead node (DESIGN.md §9, failover).
//!
//! The leader, having proposed a node dead, plans where each of its rooms goes and proposes each
//! move as a compare-and-set on the room's epoch: a room that moved meanwhile fails its compare and
//! is left alone. Clients then reconnect and resume from the store.
//!
//! Rooms are planned one by one in id order through [`placement::choose`] with the dead node's
//! region preferred. After each choice the chosen candidate counts one more room, so rooms spread
//! across equally loaded nodes (the fewest-rooms tie-break) instead of piling onto one.

use super::placement::{self, Candidate, Thresholds};
use crate::ids::{NodeId, RoomId};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::placement::tests::candidate;

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
}
