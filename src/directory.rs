//! The room directory over the Raft store: a room's host and epoch change only through the
//! store's compare-and-set, single-node (one voter) or clustered alike. A room is placed on its
//! first join (region preference, then load: `mediamesh_cluster::mesh::placement`) and stays
//! there until a migration, a drain or a failover moves it.

use crate::mesh;
use futures::FutureExt;
use futures::future::BoxFuture;
use mediamesh_actors::ports::{Host, Location, RoomDirectory};
use mediamesh_actors::{NodeId, RoomId};
use mediamesh_cluster::mesh::placement::{self, Thresholds};
use mediamesh_cluster::{Consistency, NodeState, Placement, Store, StoreError};

/// Attempts of a placement that loses a compare-and-set race to a concurrent writer.
const PLACE_ATTEMPTS_MAX: usize = 3;

pub struct StoreDirectory {
    store: Store,
    region: String,
    thresholds: Thresholds,
}

impl StoreDirectory {
    pub fn new(store: Store, region: String, thresholds: Thresholds) -> Self {
        Self {
            store,
            region,
            thresholds,
        }
    }
}

/// `node` hosting a room under `epoch`, as clients reach it (`None` when it is not registered).
pub fn host_of(store: &Store, node: &mediamesh_cluster::NodeId, epoch: u64) -> Option<Host> {
    let nodes = store.nodes();
    let found = nodes.iter().find(|n| n.id == *node)?;
    Some(Host {
        node: NodeId(found.id.as_str().to_string()),
        epoch,
        http_url: found.http_url.clone(),
        grpc_url: found.grpc_url.clone(),
    })
}

fn location(store: &Store, placement: &Placement) -> Result<Location, String> {
    if placement.node == *store.node_id() {
        return Ok(Location::Here { epoch: placement.epoch });
    }
    host_of(store, &placement.node, placement.epoch)
        .map(Location::There)
        .ok_or_else(|| format!("room host {} is not registered", placement.node.as_str()))
}

impl RoomDirectory for StoreDirectory {
    fn locate(&self, room: RoomId, region: Option<String>) -> BoxFuture<'static, Result<Location, String>> {
        let store = self.store.clone();
        let region = region.unwrap_or_else(|| self.region.clone());
        let thresholds = self.thresholds;
        async move {
            let room = mediamesh_cluster::RoomId(room.0);
            for _ in 0..PLACE_ATTEMPTS_MAX {
                let current = store
                    .room(&room, Consistency::Linearizable)
                    .await
                    .map_err(|e| e.to_string())?;
                let nodes = store.nodes();
                if let Some(placement) = &current {
                    let host_alive = nodes
                        .iter()
                        .any(|n| n.id == placement.node && n.state != NodeState::Dead);
                    if host_alive {
                        return location(&store, placement);
                    }
                }
                // Not placed yet, or its host is gone: place it (the compare-and-set on the epoch
                // makes two nodes placing at once agree on one host).
                let target = placement::choose(&mesh::candidates(&nodes), Some(&region), &thresholds)
                    .unwrap_or_else(|| store.node_id().clone());
                match store
                    .place_room_cas(room.clone(), current.map(|p| p.epoch), target)
                    .await
                {
                    Ok(placement) => {
                        tracing::info!(room = %room.as_str(), node = %placement.node.as_str(), epoch = placement.epoch, "room placed");
                        return location(&store, &placement);
                    }
                    Err(StoreError::EpochConflict { .. }) => continue,
                    Err(error) => return Err(error.to_string()),
                }
            }
            Err(format!("room placement kept changing for {room:?}"))
        }
        .boxed()
    }

    fn current(&self, room: RoomId) -> BoxFuture<'static, Result<Option<Host>, String>> {
        let store = self.store.clone();
        async move {
            let placement = store
                .room(&mediamesh_cluster::RoomId(room.0), Consistency::Local)
                .await
                .map_err(|e| e.to_string())?;
            Ok(placement.and_then(|p| host_of(&store, &p.node, p.epoch)))
        }
        .boxed()
    }

    fn release(&self, room: RoomId, _node: NodeId, epoch: u64) -> BoxFuture<'static, ()> {
        let store = self.store.clone();
        async move {
            // A stale epoch means another claim superseded ours: nothing to release.
            if let Err(error) = store.delete_room(mediamesh_cluster::RoomId(room.0), epoch).await {
                tracing::debug!(%error, "room placement not released");
            }
        }
        .boxed()
    }
}
