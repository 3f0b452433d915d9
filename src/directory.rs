//! The room directory over the Raft store: a room's host and epoch change only through the
//! store's compare-and-set, single-node (one voter) or clustered alike. A room is placed on its
//! first join (region preference, then load) and stays there until a migration, a drain or a
//! failover moves it. The decisions are the cluster's sans-IO cores, which the simulator runs
//! too: `mediamesh_cluster::mesh::directory::Locate` (locate and place, with the bounded retries
//! on a lost compare-and-set) and `mediamesh_cluster::mesh::fence` (the rooms' fence check);
//! this module does their reads and writes.

use futures::FutureExt;
use futures::future::BoxFuture;
use mediamesh_actors::ports::{FenceVerdict, Host, Location, RoomDirectory};
use mediamesh_actors::room::RoomMode;
use mediamesh_actors::{NodeId, RoomId};
use mediamesh_cluster::mesh::directory::{Locate, LocateStep, PlaceResult, Resolved};
use mediamesh_cluster::mesh::fence::{self, FenceAction, Held};
use mediamesh_cluster::mesh::placement::Thresholds;
use mediamesh_cluster::mesh::timing::FENCE_INTERVAL_MS;
use mediamesh_cluster::{Consistency, Store, StoreError};

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

/// A resolved placement as the actors see it (the host with its URLs).
fn location(store: &Store, resolved: Resolved) -> Result<Location, String> {
    match resolved {
        Resolved::Here { epoch } => Ok(Location::Here { epoch }),
        Resolved::There { node, epoch } => host_of(store, &node, epoch)
            .map(Location::There)
            .ok_or_else(|| format!("room host {} is not registered", node.as_str())),
    }
}

/// Where `room` is hosted; placed first (on a node of `region` if one fits) when it is not
/// placed yet or its host is dead or gone. The steps are [`Locate`]'s.
async fn locate(store: Store, room: RoomId, region: String, thresholds: Thresholds) -> Result<Location, String> {
    let id = mediamesh_cluster::RoomId(room.0);
    let mut core = Locate::new(id.clone(), store.node_id().clone(), region);
    let mut step = LocateStep::Read;
    loop {
        step = match step {
            LocateStep::Read => {
                let current = store
                    .room(&id, Consistency::Linearizable)
                    .await
                    .map_err(|e| e.to_string())?;
                core.read(current.as_ref(), &store.nodes(), &thresholds)
            }
            LocateStep::Place { expected_epoch, node } => {
                let result = match store.place_room_cas(id.clone(), expected_epoch, node).await {
                    Ok(placement) => {
                        tracing::info!(room = %id.as_str(), node = %placement.node.as_str(), epoch = placement.epoch, "room placed");
                        PlaceResult::Placed(placement)
                    }
                    Err(StoreError::EpochConflict { .. }) => PlaceResult::Conflict,
                    Err(error) => PlaceResult::Failed(error.to_string()),
                };
                core.placed(result, &store.nodes())
            }
            LocateStep::Done(resolved) => return resolved.and_then(|resolved| location(&store, resolved)),
        };
    }
}

/// The fence check of a room held as `mode` (see [`fence::check`]): a placement naming a node
/// that left the cluster is placed again (as a join would: otherwise the room's actual host,
/// fenced by an epoch nobody serves, would act on forever; simulator seed 2639), then compared.
async fn check_fence(
    store: Store,
    room: RoomId,
    mode: RoomMode,
    region: String,
    thresholds: Thresholds,
) -> Result<FenceVerdict, String> {
    let me = store.node_id().clone();
    let held = match &mode {
        RoomMode::Host { epoch } => Held::Host { epoch: *epoch },
        RoomMode::Relay { host } => Held::Relay {
            host: mediamesh_cluster::NodeId::new(host.node.0.clone()),
            epoch: host.epoch,
        },
    };
    let placement = store
        .room(&mediamesh_cluster::RoomId(room.0.clone()), Consistency::Local)
        .await
        .map_err(|e| e.to_string())?;
    let action = match fence::check(&me, &held, placement.as_ref(), &store.nodes()) {
        FenceAction::PlaceAgain => {
            let gone = placement.map(|p| p.node.as_str().to_string()).unwrap_or_default();
            tracing::info!(room = %room, %gone, "room host left the cluster; placing the room again");
            match locate(store.clone(), room, region, thresholds).await? {
                Location::Here { epoch } => fence::compare(&me, &held, &me, epoch),
                Location::There(host) => {
                    fence::compare(&me, &held, &mediamesh_cluster::NodeId::new(host.node.0), host.epoch)
                }
            }
        }
        action => action,
    };
    Ok(match action {
        FenceAction::Keep | FenceAction::PlaceAgain => FenceVerdict::Keep,
        FenceAction::Promote { epoch } => FenceVerdict::Promote { epoch },
        FenceAction::Demote { host, epoch } => match host_of(&store, &host, epoch) {
            Some(host) => FenceVerdict::Demote(host),
            None => FenceVerdict::Keep,
        },
        FenceAction::Follow { host, epoch } => match host_of(&store, &host, epoch) {
            Some(host) => FenceVerdict::Follow(host),
            None => FenceVerdict::Keep,
        },
    })
}

impl RoomDirectory for StoreDirectory {
    fn locate(&self, room: RoomId, region: Option<String>) -> BoxFuture<'static, Result<Location, String>> {
        let region = region.unwrap_or_else(|| self.region.clone());
        locate(self.store.clone(), room, region, self.thresholds).boxed()
    }

    fn fence(&self, room: RoomId, mode: RoomMode) -> BoxFuture<'static, Result<FenceVerdict, String>> {
        check_fence(self.store.clone(), room, mode, self.region.clone(), self.thresholds).boxed()
    }

    fn fence_interval(&self) -> std::time::Duration {
        std::time::Duration::from_millis(FENCE_INTERVAL_MS)
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
    /// rooms it hosted) and left. The fence places such a room again, instead of reading "not
    /// registered" as "not placed" and leaving the old host acting forever.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_fence_places_again_a_room_whose_host_left_the_cluster() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let mut config = StoreConfig::new("solo", dir.path(), "directory-test-secret");
        config.tick_ms = 20;
        let store = mediamesh_cluster::server::start(config, listener, std::future::pending())
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
        // This node relays the room from busan-1.
        let relay = RoomMode::Relay {
            host: Host {
                node: NodeId("busan-1".into()),
                epoch: placed.epoch,
                http_url: String::new(),
                grpc_url: String::new(),
            },
        };
        let verdict = directory
            .fence(RoomId(room.as_str().into()), relay.clone())
            .await
            .expect("read");
        assert_eq!(verdict, FenceVerdict::Keep, "a registered host is followed as it is");
        store
            .remove_node(mediamesh_cluster::NodeId::new("busan-1"))
            .await
            .expect("busan-1 left");
        let verdict = directory
            .fence(RoomId(room.as_str().into()), relay)
            .await
            .expect("read");
        assert_eq!(
            verdict,
            FenceVerdict::Promote {
                epoch: placed.epoch + 1
            },
            "the room is placed again (here, the only node) and this node takes it over"
        );
        let stored = store.room(&room, Consistency::Linearizable).await.expect("read");
        assert_eq!(
            stored.map(|p| (p.node, p.epoch)),
            Some((store.node_id().clone(), placed.epoch + 1))
        );
        // An unplaced room stays unplaced: the fence places nothing new.
        let verdict = directory
            .fence(RoomId("never-placed".into()), RoomMode::Host { epoch: 1 })
            .await
            .expect("read");
        assert_eq!(verdict, FenceVerdict::Keep);
        assert!(
            store
                .room(&mediamesh_cluster::RoomId::new("never-placed"), Consistency::Local)
                .await
                .expect("read")
                .is_none()
        );
    }
}
