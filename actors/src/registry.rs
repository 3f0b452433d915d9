//! The rooms of one node: creation on a spread of arbiters, the per-node limits, and the
//! counters every room shares.

use crate::ids::{NodeId, RoomId};
use crate::media::bwe::BweConfig;
use crate::media::engine::PeerFactory;
use crate::media::track::MediaCounters;
use crate::ports::{Location, RelaySource, RoomDirectory};
use crate::room::{Room, RoomError, RoomMode, RoomRequest};
use actix::{Actor, Addr, ArbiterHandle};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use tracing::Instrument;

/// Limits that apply per room and per node. Hitting one answers 429/503 at the edge.
#[derive(Debug, Clone)]
pub struct RoomLimits {
    pub rooms_per_node_max: usize,
    pub sessions_per_node_max: usize,
    pub subscribers_per_room_max: usize,
    pub publishers_per_room_max: usize,
}

impl Default for RoomLimits {
    fn default() -> Self {
        Self {
            rooms_per_node_max: 1_000,
            sessions_per_node_max: 900,
            subscribers_per_room_max: 500,
            publishers_per_room_max: 16,
        }
    }
}

/// Live gauges of a node, read by the metrics endpoint.
#[derive(Debug, Default)]
pub struct NodeStats {
    pub rooms: AtomicI64,
    pub publishers: AtomicI64,
    pub subscribers: AtomicI64,
    /// Peer connections in the `connected` state: the scaling signal.
    pub active_connections: AtomicI64,
    pub sessions: AtomicUsize,
    pub sessions_refused: AtomicUsize,
}

/// A reserved session slot of the node; released on drop.
#[derive(Debug)]
pub struct SessionPermit {
    stats: Arc<NodeStats>,
}

impl Drop for SessionPermit {
    fn drop(&mut self) {
        self.stats.sessions.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Everything a room needs from its node, shared by all rooms.
pub struct RoomContext {
    pub node: NodeId,
    pub factory: PeerFactory,
    pub limits: RoomLimits,
    pub counters: Arc<MediaCounters>,
    pub stats: Arc<NodeStats>,
    pub bwe: BweConfig,
    /// The multi-thread runtime the media plane (connections, forwarding) runs on; actors run
    /// on arbiters and only hold handles.
    pub media_runtime: tokio::runtime::Handle,
    /// A runtime of its own for publishers' connections, so ingress keeps its share of CPU
    /// when a node is saturated by egress: a packet lost at ingress is lost for every viewer.
    pub ingress_runtime: tokio::runtime::Handle,
    /// Counts viewers' time (the usage ledger).
    pub usage: Arc<dyn crate::ports::ViewerUsage>,
}

impl RoomContext {
    pub fn reserve_session(&self) -> Result<SessionPermit, RoomError> {
        let max = self.limits.sessions_per_node_max;
        let reserved = self
            .stats
            .sessions
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1));
        match reserved {
            Ok(_) => Ok(SessionPermit {
                stats: Arc::clone(&self.stats),
            }),
            Err(_) => {
                self.stats.sessions_refused.fetch_add(1, Ordering::Relaxed);
                Err(RoomError::NodeFull("sessions per node", max))
            }
        }
    }
}

/// What a caller of [`RoomRegistry::get_or_create`] wants to do in the room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Publish: only on the room's host (elsewhere the caller is sent there).
    Publish,
    /// Watch or subscribe: on any node (a node that does not host the room relays it).
    View,
}

struct RoomSlot {
    addr: Addr<Room>,
    /// Whether the room is hosted here (else it relays from the host).
    hosted: bool,
}

pub struct RoomRegistry {
    context: Arc<RoomContext>,
    directory: Arc<dyn RoomDirectory>,
    relay: Arc<dyn RelaySource>,
    arbiters: Vec<ArbiterHandle>,
    next_arbiter: AtomicUsize,
    rooms: Mutex<HashMap<RoomId, RoomSlot>>,
    /// Serializes room creation so two first joins of one room make one room.
    creating: tokio::sync::Mutex<()>,
}

impl RoomRegistry {
    pub fn new(
        context: Arc<RoomContext>,
        directory: Arc<dyn RoomDirectory>,
        relay: Arc<dyn RelaySource>,
        arbiters: Vec<ArbiterHandle>,
    ) -> Arc<Self> {
        assert!(!arbiters.is_empty(), "the node starts at least one arbiter");
        Arc::new(Self {
            context,
            directory,
            relay,
            arbiters,
            next_arbiter: AtomicUsize::new(0),
            rooms: Mutex::new(HashMap::new()),
            creating: tokio::sync::Mutex::new(()),
        })
    }

    pub fn context(&self) -> &Arc<RoomContext> {
        &self.context
    }

    pub fn directory(&self) -> &Arc<dyn RoomDirectory> {
        &self.directory
    }

    pub(crate) fn relay(&self) -> &Arc<dyn RelaySource> {
        &self.relay
    }

    /// The room's actor here (`hosted_only`: only if this node hosts it).
    fn find(&self, room: &RoomId, hosted_only: bool) -> Option<Addr<Room>> {
        self.rooms
            .lock()
            .get(room)
            .filter(|slot| (slot.hosted || !hosted_only) && slot.addr.connected())
            .map(|slot| slot.addr.clone())
    }

    /// The rooms here, by name (`hosted_only`: only those this node hosts).
    fn rooms_here(&self, hosted_only: bool) -> Vec<(RoomId, Addr<Room>)> {
        let mut rooms: Vec<_> = self
            .rooms
            .lock()
            .iter()
            .filter(|(_, slot)| slot.hosted || !hosted_only)
            .map(|(k, slot)| (k.clone(), slot.addr.clone()))
            .collect();
        rooms.sort_by(|a, b| a.0.cmp(&b.0));
        rooms
    }

    pub fn get(&self, room: &RoomId) -> Option<Addr<Room>> {
        self.find(room, false)
    }

    /// The room's actor if it is hosted here.
    pub fn get_hosted(&self, room: &RoomId) -> Option<Addr<Room>> {
        self.find(room, true)
    }

    pub fn list(&self) -> Vec<(RoomId, Addr<Room>)> {
        self.rooms_here(false)
    }

    /// The rooms hosted here (not the ones relayed from elsewhere).
    pub fn hosted(&self) -> Vec<(RoomId, Addr<Room>)> {
        self.rooms_here(true)
    }

    fn usable(&self, room: &RoomId, access: Access) -> Option<Addr<Room>> {
        self.find(room, access == Access::Publish)
    }

    /// The room's actor for `access`, created on first use: hosted here when the directory
    /// places the room here (by `region` preference and load), relaying from its host when it
    /// lives elsewhere. Publishing elsewhere is refused with [`RoomError::Elsewhere`].
    pub async fn get_or_create(
        self: &Arc<Self>,
        room: &RoomId,
        access: Access,
        region: Option<&str>,
    ) -> Result<Addr<Room>, RoomError> {
        if let Some(addr) = self.usable(room, access) {
            return Ok(addr);
        }
        let _creating = self.creating.lock().await;
        if let Some(addr) = self.usable(room, access) {
            return Ok(addr);
        }
        let location = self
            .directory
            .locate(room.clone(), region.map(str::to_string))
            .instrument(tracing::info_span!("room.claim", room = %room))
            .await
            .map_err(RoomError::Directory)?;
        let mode = match location {
            Location::Here { epoch } => {
                if let Some(addr) = self.get(room) {
                    // A relay of this room becomes its host (failover or migration chose us).
                    addr.send(RoomRequest::Promote { epoch })
                        .await
                        .map_err(|_| RoomError::Closing)??;
                    return Ok(addr);
                }
                RoomMode::Host { epoch }
            }
            Location::There(host) => {
                if access == Access::Publish {
                    return Err(RoomError::Elsewhere(host));
                }
                if let Some(addr) = self.get(room) {
                    return Ok(addr);
                }
                RoomMode::Relay { host }
            }
        };
        let max = self.context.limits.rooms_per_node_max;
        if self.rooms.lock().len() >= max {
            return Err(RoomError::NodeFull("rooms per node", max));
        }
        let hosted = matches!(mode, RoomMode::Host { .. });
        let index = self.next_arbiter.fetch_add(1, Ordering::Relaxed) % self.arbiters.len();
        let registry = Arc::clone(self);
        let room_id = room.clone();
        let addr = Room::start_in_arbiter(&self.arbiters[index], move |_| Room::new(room_id, mode, registry));
        self.rooms.lock().insert(
            room.clone(),
            RoomSlot {
                addr: addr.clone(),
                hosted,
            },
        );
        self.context.stats.rooms.fetch_add(1, Ordering::Relaxed);
        Ok(addr)
    }

    /// Called by a room whose mode changed (promoted to host, or no longer the host).
    pub(crate) fn set_hosted(&self, room: &RoomId, addr: &Addr<Room>, hosted: bool) {
        if let Some(slot) = self.rooms.lock().get_mut(room)
            && slot.addr == *addr
        {
            slot.hosted = hosted;
        }
    }

    /// Called by a room that has closed.
    pub(crate) fn closed(&self, room: &RoomId, addr: &Addr<Room>, hosted_epoch: Option<u64>) {
        let removed = {
            let mut rooms = self.rooms.lock();
            // A newer room of the same name may already stand in the map: remove only ourselves.
            rooms.get(room).is_some_and(|slot| slot.addr == *addr) && rooms.remove(room).is_some()
        };
        if removed {
            self.context.stats.rooms.fetch_sub(1, Ordering::Relaxed);
        }
        if let Some(epoch) = hosted_epoch {
            let release = self.directory.release(room.clone(), self.context.node.clone(), epoch);
            tokio::spawn(release);
        }
    }
}
