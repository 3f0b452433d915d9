//! Viewer states expire at the configured TTL after their last update, decided by the leader,
//! identically on every replica, across a leader change.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use mediamesh_cluster::{Consistency, NodeId, RoomId, Store, ViewerId, ViewerState};

const TTL_MS: u64 = 2_000;
/// Slack after the deadline: expiry scan period + commit + apply on a loaded 2-core machine.
const SLACK_MS: u64 = 1_500;

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

fn viewer(id: &str) -> ViewerState {
    ViewerState {
        viewer: ViewerId::from(id),
        room: RoomId::from("lobby"),
        node: NodeId::from("node-0"),
        session: format!("session-{id}"),
        display_name: String::new(),
        position_ms: 42,
        subscriptions: vec!["video".into(), "audio".into()],
        layers: BTreeMap::from([("video".to_string(), "h".to_string())]),
        updated_at_ms: 0,
        expires_at_ms: 0,
        revision: 0,
        generation: 0,
    }
}

/// Waits until `viewer` is gone on every store; returns when (ms since epoch).
async fn wait_gone_everywhere(stores: &[&Store], viewer: &ViewerId, limit: Duration) -> u64 {
    let mut gone_at = 0;
    wait_for(limit, || {
        let gone = stores.iter().all(|s| {
            futures::executor::block_on(s.viewer(viewer, Consistency::Local))
                .unwrap()
                .is_none()
        });
        if gone {
            gone_at = now_ms();
        }
        gone
    })
    .await;
    gone_at
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn viewers_expire_at_ttl_on_every_replica_across_a_leader_change() {
    let root = tempfile::tempdir().unwrap();
    let mut nodes = start_cluster(root.path(), 3, |c| c.viewer_ttl_ms = TTL_MS).await;
    let settings = nodes[0]
        .store
        .settings(Consistency::Linearizable)
        .await
        .unwrap()
        .expect("settings replicated");
    assert_eq!(settings.viewer_ttl_ms, TTL_MS);

    let first = nodes[1].store.upsert_viewer(viewer("early")).await.unwrap();
    assert_eq!(first.expires_at_ms, first.updated_at_ms + TTL_MS);

    // Leader change: stop the leader (it will come back later and must agree).
    let stores: Vec<&Store> = nodes.iter().map(|n| &n.store).collect();
    let leader = agreed_leader(&stores).unwrap();
    let index = nodes.iter().position(|n| n.store.raft_id() == leader).unwrap();
    let old_leader = nodes.remove(index);
    let (old_name, old_dir) = (old_leader.name.clone(), old_leader.dir.clone());
    old_leader.stop().await;
    let survivors: Vec<&Store> = nodes.iter().map(|n| &n.store).collect();
    wait_for(Duration::from_secs(3), || {
        agreed_leader(&survivors).is_some_and(|l| l != leader)
    })
    .await;

    // A viewer written after the change, and a refresh that keeps "kept" alive longer.
    let kept = nodes[0].store.upsert_viewer(viewer("kept")).await.unwrap();
    assert!(
        nodes[0]
            .store
            .viewer(&ViewerId::from("early"), Consistency::Linearizable)
            .await
            .unwrap()
            .is_some()
    );

    let early_gone = wait_gone_everywhere(
        &survivors,
        &ViewerId::from("early"),
        Duration::from_millis(TTL_MS + SLACK_MS + 1_000),
    )
    .await;
    eprintln!("early expired {} ms after its update", early_gone - first.updated_at_ms);
    assert!(early_gone >= first.updated_at_ms + TTL_MS, "expired before its TTL");
    assert!(
        early_gone <= first.updated_at_ms + TTL_MS + SLACK_MS,
        "expired too late"
    );

    // "kept" must still be there until its own deadline.
    if now_ms() + 200 < kept.expires_at_ms {
        assert!(
            nodes[1]
                .store
                .viewer(&ViewerId::from("kept"), Consistency::Linearizable)
                .await
                .unwrap()
                .is_some()
        );
    }
    let kept_gone = wait_gone_everywhere(
        &survivors,
        &ViewerId::from("kept"),
        Duration::from_millis(TTL_MS + SLACK_MS + 1_000),
    )
    .await;
    assert!(kept_gone >= kept.updated_at_ms + TTL_MS);
    assert!(kept_gone <= kept.updated_at_ms + TTL_MS + SLACK_MS);

    // The old leader returns and reaches the identical state.
    let join = vec![nodes[0].store.advertise_cluster().to_string()];
    nodes.push(Node::start(fast_config(&old_name, &old_dir, join)).await.unwrap());
    let all: Vec<&Store> = nodes.iter().map(|n| &n.store).collect();
    wait_converged(&all, Duration::from_secs(10)).await;
    for store in &all {
        assert!(store.viewers(Consistency::Local).await.unwrap().is_empty());
    }
    for node in nodes {
        node.stop().await;
    }
}
