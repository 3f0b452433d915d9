//! The room directory over the Raft store: a room's host and epoch change only through the
//! store's compare-and-set, single-node (one voter) or clustered alike.

use futures::FutureExt;
use futures::future::BoxFuture;
use mediamesh_actors::ports::RoomDirectory;
use mediamesh_actors::{NodeId, RoomId};
use mediamesh_cluster::{Consistency, Store, StoreError};

/// Attempts of a claim that loses a compare-and-set race to a concurrent writer.
const CLAIM_ATTEMPTS_MAX: usize = 3;

pub struct StoreDirectory {
    store: Store,
}

impl StoreDirectory {
    pub fn new(store: Store) -> Self {
        Self { store }
    }
}

impl RoomDirectory for StoreDirectory {
    fn claim(&self, room: RoomId, node: NodeId) -> BoxFuture<'static, Result<u64, String>> {
        let store = self.store.clone();
        async move {
            let room = mediamesh_cluster::RoomId(room.0);
            let node = mediamesh_cluster::NodeId(node.0);
            for _ in 0..CLAIM_ATTEMPTS_MAX {
                let current = store
                    .room(&room, Consistency::Linearizable)
                    .await
                    .map_err(|e| e.to_string())?;
                match store
                    .place_room_cas(room.clone(), current.map(|p| p.epoch), node.clone())
                    .await
                {
                    Ok(placement) => return Ok(placement.epoch),
                    Err(StoreError::EpochConflict { .. }) => continue,
                    Err(error) => return Err(error.to_string()),
                }
            }
            Err(format!("room placement kept changing for {room:?}"))
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
