//! The fence (DESIGN.md §9): a room held on a node compares, every
//! [`FENCE_INTERVAL_MS`](super::timing::FENCE_INTERVAL_MS), its own mode with the directory
//! as this node's replica shows it. A host whose epoch went stale demotes itself (its clients
//! move, it relays from the new host), so after a partition heals no viewer gets media from two
//! hosts; a relay still following a host the directory no longer names follows the new one; a
//! node the directory names at a newer epoch takes the room over. A placement naming a node that
//! left the cluster is placed again, as a join would ([`super::directory::Locate`]): otherwise
//! the room's old host, fenced by an epoch nobody serves, would act on forever (simulator seed
//! 2639).
//!
//! Driven by the node's room actor (`actors/src/room.rs`, through the `RoomDirectory` port's
//! `fence`, which `src/directory.rs` implements with [`check`]) and by the simulator's
//! `simulations/src/control.rs`. Pure functions: the read is the caller's.

use crate::ids::NodeId;
use crate::types::{NodeStatus, Placement};

/// How the room serves on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Held {
    /// This node hosts it under `epoch`.
    Host {
        /// The epoch it hosts under.
        epoch: u64,
    },
    /// It relays the room from `host`, known to host it under `epoch`.
    Relay {
        /// The host followed.
        host: NodeId,
        /// The epoch it was known to host under.
        epoch: u64,
    },
}

/// What the room does after the fence check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FenceAction {
    /// Nothing: the directory agrees (or is older, or has no placement).
    Keep,
    /// The directory names this node under a newer `epoch`: host the room under it.
    Promote {
        /// The directory's epoch.
        epoch: u64,
    },
    /// This node hosts under a stale epoch: `host` does under `epoch`; move the clients there
    /// and relay from it.
    Demote {
        /// The new host.
        host: NodeId,
        /// Its epoch.
        epoch: u64,
    },
    /// The relay follows a host the directory no longer names: follow `host` instead.
    Follow {
        /// The new host.
        host: NodeId,
        /// Its epoch.
        epoch: u64,
    },
    /// The directory names a node that left the cluster: place the room again (a
    /// [`super::directory::Locate`]), then [`compare`] with the new placement.
    PlaceAgain,
}

/// The fence check of a room held as `held` on node `me`, against `directory` (the room's
/// placement in this node's replica, `None`: not placed) and the registered `nodes`.
pub fn check(me: &NodeId, held: &Held, directory: Option<&Placement>, nodes: &[NodeStatus]) -> FenceAction {
    let Some(placement) = directory else {
        // Not placed: a closed room released it, or nobody placed it yet. Nothing names
        // another host, so nothing to fence against.
        return FenceAction::Keep;
    };
    if !nodes.iter().any(|n| n.id == placement.node) {
        return FenceAction::PlaceAgain;
    }
    compare(me, held, &placement.node, placement.epoch)
}

/// The room held as `held` on `me`, against the directory's `host` under `epoch` (a registered
/// node). Only a newer epoch acts: an older one is a replica that has not caught up.
pub fn compare(me: &NodeId, held: &Held, host: &NodeId, epoch: u64) -> FenceAction {
    match held {
        Held::Host { epoch: hosted } if epoch > *hosted => {
            if host == me {
                FenceAction::Promote { epoch }
            } else {
                FenceAction::Demote {
                    host: host.clone(),
                    epoch,
                }
            }
        }
        Held::Relay {
            host: followed,
            epoch: followed_epoch,
        } if epoch > *followed_epoch && host != followed => {
            if host == me {
                FenceAction::Promote { epoch }
            } else {
                FenceAction::Follow {
                    host: host.clone(),
                    epoch,
                }
            }
        }
        _ => FenceAction::Keep,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::RoomId;
    use crate::mesh::placement::tests::status;

    fn me() -> NodeId {
        NodeId::from("me")
    }

    fn placed(node: &str, epoch: u64) -> Placement {
        Placement {
            room: RoomId::from("r"),
            node: NodeId::from(node),
            epoch,
        }
    }

    fn nodes() -> Vec<NodeStatus> {
        vec![status("me", "seoul"), status("b", "seoul"), status("c", "busan")]
    }

    #[test]
    fn a_host_demotes_on_a_higher_epoch_elsewhere() {
        let action = check(&me(), &Held::Host { epoch: 3 }, Some(&placed("b", 4)), &nodes());
        assert_eq!(
            action,
            FenceAction::Demote {
                host: NodeId::from("b"),
                epoch: 4
            }
        );
    }

    #[test]
    fn a_host_keeps_its_room_at_its_own_or_an_older_epoch() {
        for (node, epoch) in [("me", 3), ("b", 3), ("b", 2)] {
            let action = check(&me(), &Held::Host { epoch: 3 }, Some(&placed(node, epoch)), &nodes());
            assert_eq!(action, FenceAction::Keep, "{node}@{epoch}");
        }
        assert_eq!(
            check(&me(), &Held::Host { epoch: 3 }, None, &nodes()),
            FenceAction::Keep
        );
    }

    #[test]
    fn a_newer_epoch_here_promotes() {
        let action = check(&me(), &Held::Host { epoch: 3 }, Some(&placed("me", 5)), &nodes());
        assert_eq!(action, FenceAction::Promote { epoch: 5 });
        let relay = Held::Relay {
            host: NodeId::from("b"),
            epoch: 3,
        };
        assert_eq!(
            check(&me(), &relay, Some(&placed("me", 4)), &nodes()),
            FenceAction::Promote { epoch: 4 }
        );
    }

    #[test]
    fn a_relay_follows_the_new_host_only() {
        let relay = Held::Relay {
            host: NodeId::from("b"),
            epoch: 3,
        };
        assert_eq!(
            check(&me(), &relay, Some(&placed("c", 4)), &nodes()),
            FenceAction::Follow {
                host: NodeId::from("c"),
                epoch: 4
            }
        );
        // The same host at a newer epoch (it was promoted again): the relay stream goes on.
        assert_eq!(check(&me(), &relay, Some(&placed("b", 5)), &nodes()), FenceAction::Keep);
        assert_eq!(check(&me(), &relay, Some(&placed("c", 2)), &nodes()), FenceAction::Keep);
    }

    #[test]
    fn a_host_that_left_the_cluster_is_placed_again() {
        let held = Held::Host { epoch: 3 };
        assert_eq!(
            check(&me(), &held, Some(&placed("gone", 4)), &nodes()),
            FenceAction::PlaceAgain
        );
        // Even at an older epoch: nobody fences the room otherwise.
        assert_eq!(
            check(&me(), &held, Some(&placed("gone", 2)), &nodes()),
            FenceAction::PlaceAgain
        );
    }
}
