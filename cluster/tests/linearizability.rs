//! A single-key register (one viewer state's `position_ms`) written and read concurrently from all
//! three replicas while the network drops, delays, duplicates and partitions; the history is then
//! checked for linearizability (Wing & Gong search with memoization; writes that failed are
//! indeterminate: they may or may not have taken effect, at any time after they started).

mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use mediamesh_cluster::{Consistency, NodeId, RoomId, Store, ViewerId, ViewerState};
use parking_lot::Mutex;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

#[derive(Clone, Debug)]
enum Kind {
    Write(u64),
    Read(u64),
}

#[derive(Clone, Debug)]
struct Op {
    start: u64,
    /// None: the write failed, its outcome is unknown.
    end: Option<u64>,
    kind: Kind,
}

fn register(value: u64) -> ViewerState {
    ViewerState {
        viewer: ViewerId::from("register"),
        room: RoomId::from("r"),
        node: NodeId::from("n"),
        session: "s".into(),
        display_name: String::new(),
        position_ms: value,
        subscriptions: vec![],
        layers: BTreeMap::new(),
        updated_at_ms: 0,
        expires_at_ms: 0,
        revision: 0,
        generation: 0,
    }
}

/// True when some order of the operations, consistent with real time, explains every read.
fn linearizable(ops: &[Op], initial: u64) -> bool {
    assert!(ops.len() <= 64);
    fn search(ops: &[Op], done: u64, value: u64, seen: &mut HashSet<(u64, u64)>) -> bool {
        let pending_determinate = ops
            .iter()
            .enumerate()
            .any(|(i, o)| done & (1 << i) == 0 && o.end.is_some());
        if !pending_determinate {
            return true;
        }
        if !seen.insert((done, value)) {
            return false;
        }
        let min_end = ops
            .iter()
            .enumerate()
            .filter(|(i, _)| done & (1 << i) == 0)
            .filter_map(|(_, o)| o.end)
            .min()
            .unwrap_or(u64::MAX);
        for (i, op) in ops.iter().enumerate() {
            if done & (1 << i) != 0 || op.start > min_end {
                continue;
            }
            let next = match op.kind {
                Kind::Write(v) => Some(v),
                Kind::Read(v) if v == value => Some(value),
                Kind::Read(_) => None,
            };
            if let Some(next) = next
                && search(ops, done | (1 << i), next, seen)
            {
                return true;
            }
        }
        false
    }
    search(ops, 0, initial, &mut HashSet::new())
}

#[test]
fn the_checker_itself_rejects_a_stale_read() {
    let ops = vec![
        Op {
            start: 0,
            end: Some(10),
            kind: Kind::Write(1),
        },
        Op {
            start: 20,
            end: Some(30),
            kind: Kind::Read(0),
        },
    ];
    assert!(!linearizable(&ops, 0));
    let ops = vec![
        Op {
            start: 0,
            end: Some(10),
            kind: Kind::Write(1),
        },
        Op {
            start: 5,
            end: Some(30),
            kind: Kind::Read(0),
        },
        Op {
            start: 12,
            end: None,
            kind: Kind::Write(2),
        },
        Op {
            start: 31,
            end: Some(40),
            kind: Kind::Read(2),
        },
    ];
    assert!(linearizable(&ops, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_history_under_faults_is_linearizable() {
    let seed: u64 = std::env::var("SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(7);
    eprintln!("seed {seed} (replay with SEED={seed})");
    let root = tempfile::tempdir().unwrap();
    let nodes = start_cluster(root.path(), 3, |c| c.request_timeout_ms = 1_500).await;
    let stores: Vec<Store> = nodes.iter().map(|n| n.store.clone()).collect();
    stores[0].upsert_viewer(register(0)).await.unwrap();

    for (i, s) in stores.iter().enumerate() {
        let faults = s.fault_injector();
        faults.seed(seed + i as u64);
        faults.set_drop_probability(0.05);
        faults.set_duplicate_probability(0.1);
        faults.set_delay_ms(0, 10);
    }
    let t0 = Instant::now();
    let history = Arc::new(Mutex::new(Vec::new()));
    let mut clients = Vec::new();
    for (c, store) in stores.iter().cloned().enumerate() {
        let history = history.clone();
        clients.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed * 100 + c as u64);
            for k in 0..14u64 {
                let start = t0.elapsed().as_micros() as u64;
                if rng.random_bool(0.5) {
                    let value = 1 + c as u64 * 1000 + k;
                    let result = store.upsert_viewer(register(value)).await;
                    let end = result.is_ok().then(|| t0.elapsed().as_micros() as u64);
                    history.lock().push(Op {
                        start,
                        end,
                        kind: Kind::Write(value),
                    });
                } else if let Ok(Some(state)) = store
                    .viewer(&ViewerId::from("register"), Consistency::Linearizable)
                    .await
                {
                    let end = t0.elapsed().as_micros() as u64;
                    history.lock().push(Op {
                        start,
                        end: Some(end),
                        kind: Kind::Read(state.position_ms),
                    });
                }
                tokio::time::sleep(Duration::from_millis(rng.random_range(0..30))).await;
            }
        }));
    }
    // A partition episode in the middle of the run.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let refs: Vec<&Store> = stores.iter().collect();
    partition(&stores[2], &[&stores[0], &stores[1]]);
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    heal(&refs);
    for (i, s) in stores.iter().enumerate() {
        let faults = s.fault_injector();
        faults.seed(seed + 10 + i as u64);
        faults.set_drop_probability(0.05);
        faults.set_duplicate_probability(0.1);
        faults.set_delay_ms(0, 10);
    }
    for client in clients {
        within(Duration::from_secs(60), client).await.unwrap();
    }
    heal(&refs);
    let ops = history.lock().clone();
    let completed = ops.iter().filter(|o| o.end.is_some()).count();
    eprintln!("{} operations, {completed} completed", ops.len());
    assert!(completed >= 10, "too few operations completed to say anything");
    assert!(linearizable(&ops, 0), "history is not linearizable: {ops:#?}");
    wait_converged(&refs, Duration::from_secs(10)).await;
    for node in nodes {
        node.stop().await;
    }
}
