//! A node whose data directory is wiped rejoins and catches up by snapshot (the log it would
//! need is compacted away).

mod common;

use std::time::Duration;

use common::*;
use mediamesh_cluster::{Consistency, NodeId, RoomId, Store};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wiped_node_rejoins_and_catches_up_by_snapshot() {
    let root = tempfile::tempdir().unwrap();
    let mut nodes = start_cluster(root.path(), 3, |c| c.snapshot_every_entries = 1_000_000).await;
    for i in 0..20 {
        nodes[i % 3]
            .store
            .place_room_cas(RoomId::new(format!("a-{i}")), None, NodeId::from("x"))
            .await
            .unwrap();
    }
    // Wipe node-2.
    let victim = nodes.pop().unwrap();
    let (name, dir) = (victim.name.clone(), victim.dir.clone());
    victim.stop().await;
    std::fs::remove_dir_all(&dir).unwrap();

    for i in 0..20 {
        nodes[i % 2]
            .store
            .place_room_cas(RoomId::new(format!("b-{i}")), None, NodeId::from("x"))
            .await
            .unwrap();
    }
    // Force compaction everywhere: the entries node-2 would need are gone.
    for node in &nodes {
        let index = node.store.compact_now().await.unwrap();
        assert!(index > 40);
    }
    let compacted_at = nodes[0].store.status().snapshot_index;

    let join = vec![nodes[0].store.advertise_cluster().to_string()];
    nodes.push(Node::start(fast_config(&name, &dir, join)).await.unwrap());
    within(Duration::from_secs(10), nodes[2].store.wait_ready())
        .await
        .unwrap();
    let all: Vec<&Store> = nodes.iter().map(|n| &n.store).collect();
    wait_converged(&all, Duration::from_secs(10)).await;
    let status = nodes[2].store.status();
    assert!(
        status.snapshot_index >= compacted_at,
        "caught up without a snapshot: {status:?}"
    );
    let rooms = nodes[2].store.rooms(Consistency::Linearizable).await.unwrap();
    assert_eq!(rooms.len(), 40);
    // It is a voter again and takes part in writes.
    wait_for(Duration::from_secs(10), || {
        nodes[0]
            .store
            .status()
            .nodes
            .iter()
            .all(|n| n.membership == mediamesh_cluster::Membership::Voter)
    })
    .await;
    nodes[2]
        .store
        .place_room_cas(RoomId::from("after-rejoin"), None, NodeId::from("x"))
        .await
        .unwrap();
    for node in nodes {
        node.stop().await;
    }
}
