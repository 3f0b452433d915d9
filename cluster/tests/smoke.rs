mod common;

use std::time::Duration;

use common::*;
use mediamesh_cluster::{Consistency, NodeId, RoomId, StoreError};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_node_bootstraps_and_serves_reads_and_writes() {
    let root = tempfile::tempdir().unwrap();
    let node = Node::start(fast_config("solo", &root.path().join("solo"), vec![]))
        .await
        .unwrap();
    within(Duration::from_secs(5), node.store.wait_ready()).await.unwrap();
    let room = RoomId::from("lobby");
    let placed = node
        .store
        .place_room_cas(room.clone(), None, NodeId::from("solo"))
        .await
        .unwrap();
    assert_eq!(placed.epoch, 1);
    let stale = node
        .store
        .place_room_cas(room.clone(), None, NodeId::from("solo"))
        .await;
    assert!(matches!(stale, Err(StoreError::EpochConflict { current: Some(ref p) }) if p.epoch == 1));
    assert_eq!(
        node.store.room(&room, Consistency::Linearizable).await.unwrap(),
        Some(placed)
    );
    let status = node.store.status();
    assert_eq!(status.leader.as_ref().map(|l| l.as_str()), Some("solo"));
    node.stop().await;
}
