//! The single-node room directory: every room is hosted here, epochs count claims.
//! The clustered implementation (over the Raft store) replaces it in the node wiring.

use futures::FutureExt;
use futures::future::BoxFuture;
use mediamesh_actors::ports::RoomDirectory;
use mediamesh_actors::{NodeId, RoomId};
use parking_lot::Mutex;
use std::collections::HashMap;

#[derive(Default)]
pub struct LocalDirectory {
    epochs: Mutex<HashMap<RoomId, u64>>,
}

impl RoomDirectory for LocalDirectory {
    fn claim(&self, room: RoomId, _node: NodeId) -> BoxFuture<'static, Result<u64, String>> {
        let mut epochs = self.epochs.lock();
        let epoch = epochs.entry(room).or_insert(0);
        *epoch += 1;
        let epoch = *epoch;
        async move { Ok(epoch) }.boxed()
    }

    fn release(&self, _room: RoomId, _node: NodeId, _epoch: u64) -> BoxFuture<'static, ()> {
        async {}.boxed()
    }
}
