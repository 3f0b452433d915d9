//! Three replicas over the real tonic transport with the fault injector: leader crash, minority
//! partition, convergence, no acknowledged write lost.

mod common;

use std::time::{Duration, Instant};

use common::*;
use mediamesh_cluster::{Consistency, NodeId, RoomId, Store, StoreError};

async fn place(store: &Store, room: &str) -> Result<(), StoreError> {
    store
        .place_room_cas(RoomId::from(room), None, NodeId::from("somewhere"))
        .await
        .map(|_| ())
}

async fn assert_rooms_present(store: &Store, rooms: &[String]) {
    let held = store.rooms(Consistency::Linearizable).await.expect("linearizable read");
    for room in rooms {
        assert!(
            held.iter().any(|p| p.room.as_str() == room),
            "acknowledged room {room} lost"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_crash_elects_a_new_leader_within_2s_and_loses_no_acknowledged_write() {
    let root = tempfile::tempdir().unwrap();
    let mut nodes = start_cluster(root.path(), 3, |_| {}).await;
    let mut acked = Vec::new();
    for i in 0..10 {
        let room = format!("before-{i}");
        place(&nodes[i % 3].store, &room).await.expect("write before the crash");
        acked.push(room);
    }
    let stores: Vec<&Store> = nodes.iter().map(|n| &n.store).collect();
    let leader = agreed_leader(&stores).expect("one leader");
    let leader_index = nodes.iter().position(|n| n.store.raft_id() == leader).unwrap();
    let crashed = nodes.remove(leader_index);
    let crashed_config_dir = crashed.dir.clone();
    let crashed_name = crashed.name.clone();
    let crash_at = Instant::now();
    crashed.stop().await;

    let survivors: Vec<&Store> = nodes.iter().map(|n| &n.store).collect();
    wait_for(Duration::from_secs(2), || {
        agreed_leader(&survivors).is_some_and(|l| l != leader)
    })
    .await;
    let elected_after = crash_at.elapsed();
    eprintln!("new leader after {elected_after:?}");
    assert!(elected_after < Duration::from_secs(2));

    for i in 0..10 {
        let room = format!("after-{i}");
        place(&nodes[i % 2].store, &room).await.expect("write after the crash");
        acked.push(room);
    }
    // The crashed node comes back with its data and catches up.
    let first_addr = nodes[0].store.advertise_cluster().to_string();
    let restarted = Node::start(fast_config(&crashed_name, &crashed_config_dir, vec![first_addr]))
        .await
        .unwrap();
    nodes.push(restarted);
    let all: Vec<&Store> = nodes.iter().map(|n| &n.store).collect();
    wait_converged(&all, Duration::from_secs(10)).await;
    for store in &all {
        assert_rooms_present(store, &acked).await;
    }
    for node in nodes {
        node.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_minority_cannot_commit_and_replicas_converge_after_healing() {
    let root = tempfile::tempdir().unwrap();
    let nodes = start_cluster(root.path(), 3, |c| c.request_timeout_ms = 1_500).await;
    let stores: Vec<&Store> = nodes.iter().map(|n| &n.store).collect();
    let mut acked = Vec::new();
    for i in 0..5 {
        let room = format!("pre-{i}");
        place(stores[i % 3], &room).await.unwrap();
        acked.push(room);
    }
    // Isolate the leader: the worst case, it must stop committing.
    let leader = agreed_leader(&stores).expect("one leader");
    let minority = stores.iter().position(|s| s.raft_id() == leader).unwrap();
    let majority: Vec<&Store> = stores
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != minority)
        .map(|(_, s)| *s)
        .collect();
    partition(stores[minority], &majority);

    // The minority cannot commit: its write fails (timeout or no leader) and its linearizable
    // read fails. (Entries already acknowledged before the cut may still commit, so the commit
    // index is sampled after these attempts.)
    let minority_write = place(stores[minority], "minority-write").await;
    assert!(minority_write.is_err(), "a partitioned minority committed a write");
    let minority_read = stores[minority].rooms(Consistency::Linearizable).await;
    assert!(
        minority_read.is_err(),
        "a partitioned minority served a linearizable read"
    );
    let commit_before = stores[minority].status().commit_index;

    // The majority elects a leader and keeps committing.
    wait_for(Duration::from_secs(3), || {
        agreed_leader(&majority).is_some_and(|l| l != leader)
    })
    .await;
    for i in 0..5 {
        let room = format!("during-{i}");
        place(majority[i % 2], &room).await.expect("majority commits");
        acked.push(room);
    }
    assert_eq!(stores[minority].status().commit_index, commit_before);
    let minority_rooms = stores[minority].rooms(Consistency::Local).await.unwrap();
    assert!(minority_rooms.iter().all(|p| !p.room.as_str().starts_with("during-")));

    heal(&stores);
    wait_converged(&stores, Duration::from_secs(10)).await;
    for store in &stores {
        assert_rooms_present(store, &acked).await;
        // The failed minority write was never acknowledged; after healing it must not exist
        // (its entry was only in the isolated leader's log and got overwritten).
        let room = store
            .room(&RoomId::from("minority-write"), Consistency::Local)
            .await
            .unwrap();
        assert!(room.is_none());
    }
    for node in nodes {
        node.stop().await;
    }
}
