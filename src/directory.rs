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

/// Where `room` is hosted; placed first (on a node of `region` if one fits) when it is not
/// placed yet or its host is dead or gone.
async fn locate(store: Store, room: RoomId, region: String, thresholds: Thresholds) -> Result<Location, String> {
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

impl RoomDirectory for StoreDirectory {
    fn locate(&self, room: RoomId, region: Option<String>) -> BoxFuture<'static, Result<Location, String>> {
        let region = region.unwrap_or_else(|| self.region.clone());
        locate(self.store.clone(), room, region, self.thresholds).boxed()
    }

    /// The room's host by this node's replica. A placement that names a node no longer
    /// registered (it left: a drain removes only the rooms it hosts, not one failover placed
    /// on it that nobody joined there since) is placed again, as a join would: otherwise the
    /// room's actual host, fenced by an epoch nobody serves, would act on forever (simulator
    /// seed 2639, `stale-host`).
    fn current(&self, room: RoomId) -> BoxFuture<'static, Result<Option<Host>, String>> {
        let (store, region, thresholds) = (self.store.clone(), self.region.clone(), self.thresholds);
        async move {
            let placement = store
                .room(&mediamesh_cluster::RoomId(room.0.clone()), Consistency::Local)
                .await
                .map_err(|e| e.to_string())?;
            let Some(placement) = placement else { return Ok(None) };
            if let Some(host) = host_of(&store, &placement.node, placement.epoch) {
                return Ok(Some(host));
            }
            tracing::info!(room = %room, gone = %placement.node.as_str(), "room host left the cluster; placing the room again");
            match locate(store.clone(), room, region, thresholds).await? {
                Location::Here { epoch } => Ok(host_of(&store, store.node_id(), epoch)),
                Location::There(host) => Ok(Some(host)),
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use mediamesh_cluster::{NodeRegistration, StoreConfig};

    fn registration(id: &str) -> NodeRegistration {
        NodeRegistration {
            id: mediamesh_cluster::NodeId::new(id),
            region: "busan".into(),
            cluster_addr: "127.0.0.1:1".into(),
            http_url: format!("http://{id}.test:8080"),
            grpc_url: format!("http://{id}.test:8081"),
            capacity: 100,
            media_ip: String::new(),
            media_ports: (0, 0),
            turn_addr: String::new(),
        }
    }

    /// Simulator seed 2639: failover placed a room on a node that drained (moving only the
    /// rooms it hosted) and left. The fence's read places such a room again, instead of
    /// reading "not registered" as "not placed" and leaving the old host acting forever.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_fence_places_again_a_room_whose_host_left_the_cluster() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let mut config = StoreConfig::new("solo", dir.path(), "directory-test-secret");
        config.tick_ms = 20;
        let store = Store::start(config, listener, std::future::pending())
            .await
            .expect("store");
        tokio::time::timeout(std::time::Duration::from_secs(10), store.wait_ready())
            .await
            .expect("ready in time")
            .expect("ready");
        // The node registers itself once ready: wait for it (it is where the room goes).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !store.nodes().iter().any(|n| n.id == *store.node_id()) {
            assert!(std::time::Instant::now() < deadline, "the node never registered itself");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let directory = StoreDirectory::new(store.clone(), "seoul".into(), Thresholds::default());
        let room = mediamesh_cluster::RoomId::new("after-the-drain");
        store.register_node(registration("busan-1")).await.expect("registered");
        let placed = store
            .place_room_cas(room.clone(), None, mediamesh_cluster::NodeId::new("busan-1"))
            .await
            .expect("placed on busan-1");
        let host = directory.current(RoomId(room.as_str().into())).await.expect("read");
        assert_eq!(
            host.map(|h| (h.node.0, h.epoch)),
            Some(("busan-1".to_string(), placed.epoch)),
            "a registered host is answered as it is"
        );
        store
            .remove_node(mediamesh_cluster::NodeId::new("busan-1"))
            .await
            .expect("busan-1 left");
        let host = directory
            .current(RoomId(room.as_str().into()))
            .await
            .expect("read")
            .expect("the room is placed again, not answered as unplaced");
        assert_eq!((host.node.0.as_str(), host.epoch), ("solo", placed.epoch + 1));
        let stored = store.room(&room, Consistency::Linearizable).await.expect("read");
        assert_eq!(
            stored.map(|p| (p.node, p.epoch)),
            Some((store.node_id().clone(), placed.epoch + 1))
        );
        // An unplaced room stays unplaced: the fence's read places nothing new.
        let host = directory.current(RoomId("never-placed".into())).await.expect("read");
        assert!(host.is_none());
        assert!(
            store
                .room(&mediamesh_cluster::RoomId::new("never-placed"), Consistency::Local)
                .await
                .expect("read")
                .is_none()
        );
    }
}
