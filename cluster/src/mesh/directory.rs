//! Locating and placing a room through the directory (DESIGN.md §9): the decisions of a node
//! that needs a room's host, for a join, a relay or a handoff.
//!
//! [`Locate`] reads the room's placement; a placement whose host is alive (or draining) is the
//! answer. A room not placed yet, or whose host is dead or gone, is placed by
//! [`placement::choose`] (this node's region first, then load) through the directory's
//! compare-and-set on the epoch it read, so two nodes placing at once agree on one host: the
//! loser reads again and finds the winner's placement. After [`PLACE_ATTEMPTS_MAX`] lost races
//! it gives up.
//!
//! Driven by the node's `src/directory.rs` (`StoreDirectory::locate`, which
//! `RoomRegistry::get_or_create` calls, and the fence's re-placement) and by the simulator's
//! `simulations/src/control.rs` (`ensure_room`). Sans-IO: the reads and the compare-and-set
//! are the caller's; their results come in, the next step comes out.

use super::placement::{self, Thresholds};
use super::timing::PLACE_ATTEMPTS_MAX;
use crate::ids::{NodeId, RoomId};
use crate::types::{NodeState, NodeStatus, Placement};

/// Where a placed room is, for the node that asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolved {
    /// This node hosts it under `epoch`.
    Here {
        /// The room's epoch.
        epoch: u64,
    },
    /// `node`, registered, hosts it under `epoch`.
    There {
        /// The host.
        node: NodeId,
        /// The room's epoch.
        epoch: u64,
    },
}

/// Where `placement` puts the room, seen from `me`: here, or on a node registered in `nodes`;
/// an error when its host is not registered (it left the cluster).
pub fn resolve(me: &NodeId, placement: &Placement, nodes: &[NodeStatus]) -> Result<Resolved, String> {
    if placement.node == *me {
        return Ok(Resolved::Here { epoch: placement.epoch });
    }
    if nodes.iter().any(|n| n.id == placement.node) {
        Ok(Resolved::There {
            node: placement.node.clone(),
            epoch: placement.epoch,
        })
    } else {
        Err(format!("room host {} is not registered", placement.node))
    }
}

/// The answer to a placement's compare-and-set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PlaceResult {
    /// It applied: the room's new placement.
    Placed(Placement),
    /// The epoch was no longer the one read: someone else placed or moved the room.
    Conflict,
    /// The store refused it, or its outcome is unknown (no leader, timeout).
    Failed(String),
}

/// What [`Locate`] needs done next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LocateStep {
    /// Read the room's placement (linearizable: a stale read would answer a moved room's old
    /// host) and the registered nodes; report with [`Locate::read`].
    Read,
    /// Propose `PlaceRoom { room, expected_epoch, node }`; report with [`Locate::placed`].
    Place {
        /// The epoch read (`None`: not placed yet).
        expected_epoch: Option<u64>,
        /// The chosen host.
        node: NodeId,
    },
    /// Located (or failed, with the reason).
    Done(Result<Resolved, String>),
}

/// One lookup of a room's host, placing the room when nobody (alive) hosts it.
#[derive(Clone, Debug)]
pub struct Locate {
    room: RoomId,
    me: NodeId,
    /// Placement prefers nodes of this region (the client's, else this node's).
    region: String,
    /// Compare-and-sets lost so far.
    conflicts: usize,
}

impl Locate {
    /// A lookup of `room` by node `me`, placing in `region` first. Starts with
    /// [`LocateStep::Read`].
    pub fn new(room: RoomId, me: NodeId, region: String) -> Self {
        Self {
            room,
            me,
            region,
            conflicts: 0,
        }
    }

    /// The room.
    pub fn room(&self) -> &RoomId {
        &self.room
    }

    /// The read's answer: the room's placement (`None`: not placed) and the registered nodes.
    pub fn read(&mut self, current: Option<&Placement>, nodes: &[NodeStatus], t: &Thresholds) -> LocateStep {
        if let Some(placement) = current {
            let host_alive = nodes
                .iter()
                .any(|n| n.id == placement.node && n.state != NodeState::Dead);
            if host_alive {
                return LocateStep::Done(resolve(&self.me, placement, nodes));
            }
        }
        // Not placed yet, or its host is dead or gone: place it. With no candidate this node
        // takes it (it is up: better a loaded host than none).
        let node =
            placement::choose(&placement::candidates(nodes), Some(&self.region), t).unwrap_or_else(|| self.me.clone());
        LocateStep::Place {
            expected_epoch: current.map(|p| p.epoch),
            node,
        }
    }

    /// The compare-and-set's answer, with the registered nodes now.
    pub fn placed(&mut self, result: PlaceResult, nodes: &[NodeStatus]) -> LocateStep {
        match result {
            PlaceResult::Placed(placement) => LocateStep::Done(resolve(&self.me, &placement, nodes)),
            PlaceResult::Conflict => {
                self.conflicts += 1;
                if self.conflicts < PLACE_ATTEMPTS_MAX {
                    LocateStep::Read
                } else {
                    LocateStep::Done(Err(format!("room placement kept changing for {}", self.room)))
                }
            }
            PlaceResult::Failed(reason) => LocateStep::Done(Err(reason)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::placement::tests::status;

    use crate::mesh::test_support::placement;

    fn locate() -> Locate {
        Locate::new(RoomId::from("r"), NodeId::from("me"), "seoul".into())
    }

    fn nodes() -> Vec<NodeStatus> {
        vec![status("me", "busan"), status("other", "seoul")]
    }

    #[test]
    fn a_live_host_is_the_answer() {
        let t = Thresholds::default();
        let there = locate().read(Some(&placement("other", 3)), &nodes(), &t);
        let expected = Resolved::There {
            node: NodeId::from("other"),
            epoch: 3,
        };
        assert_eq!(there, LocateStep::Done(Ok(expected)));
        let here = locate().read(Some(&placement("me", 4)), &nodes(), &t);
        assert_eq!(here, LocateStep::Done(Ok(Resolved::Here { epoch: 4 })));
        let mut draining = nodes();
        draining[1].state = NodeState::Draining;
        let step = locate().read(Some(&placement("other", 3)), &draining, &t);
        assert!(matches!(step, LocateStep::Done(Ok(_))), "a draining host still hosts");
    }

    #[test]
    fn an_unplaced_room_is_placed_in_the_preferred_region() {
        let step = locate().read(None, &nodes(), &Thresholds::default());
        assert_eq!(
            step,
            LocateStep::Place {
                expected_epoch: None,
                node: NodeId::from("other")
            }
        );
    }

    #[test]
    fn a_room_whose_host_is_dead_or_gone_is_placed_again_over_its_epoch() {
        let t = Thresholds::default();
        let mut dead = nodes();
        dead[1].state = NodeState::Dead;
        let step = locate().read(Some(&placement("other", 5)), &dead, &t);
        assert_eq!(
            step,
            LocateStep::Place {
                expected_epoch: Some(5),
                node: NodeId::from("me")
            }
        );
        let step = locate().read(Some(&placement("gone", 2)), &nodes(), &t);
        assert_eq!(
            step,
            LocateStep::Place {
                expected_epoch: Some(2),
                node: NodeId::from("other")
            }
        );
    }

    #[test]
    fn lost_races_read_again_up_to_the_attempts_bound() {
        let mut core = locate();
        for _ in 1..PLACE_ATTEMPTS_MAX {
            assert_eq!(core.placed(PlaceResult::Conflict, &nodes()), LocateStep::Read);
        }
        let LocateStep::Done(Err(reason)) = core.placed(PlaceResult::Conflict, &nodes()) else {
            panic!("gives up after {PLACE_ATTEMPTS_MAX} conflicts")
        };
        assert!(reason.contains("kept changing"), "{reason}");
    }

    #[test]
    fn a_placement_answers_where_it_went() {
        let mut core = locate();
        let step = core.placed(PlaceResult::Placed(placement("me", 1)), &nodes());
        assert_eq!(step, LocateStep::Done(Ok(Resolved::Here { epoch: 1 })));
        let step = core.placed(PlaceResult::Failed("no leader".into()), &nodes());
        assert_eq!(step, LocateStep::Done(Err("no leader".into())));
        let step = core.placed(PlaceResult::Placed(placement("gone", 1)), &nodes());
        assert!(
            matches!(step, LocateStep::Done(Err(_))),
            "a host nobody knows is no answer"
        );
    }
}
