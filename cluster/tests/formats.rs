//! Persisted and wire shapes: a stored fixture of each current format decodes to what it holds,
//! the previous version of a changed shape still decodes, and a data directory of format 1 (the
//! layout before the state machine moved into memory) is upgraded when a node starts on it.
//!
//! The fixtures under `tests/fixtures/` were written by this test with
//! `MEDIAMESH_WRITE_FIXTURES=1 cargo test -p mediamesh-cluster --test formats`; never rewrite
//! one for a format that shipped: add a new file for a new version.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{Node, fast_config, within};
use mediamesh_cluster::codec;
use mediamesh_cluster::command::{
    Command, EntryPayload, FORWARD_VERSION, ForwardedOutcome, Outcome, decode_forwarded_outcome,
};
use mediamesh_cluster::state_machine::{SmTree, StateMachine};
use mediamesh_cluster::types::{ClusterSettings, UsageBatch, UsageRecord};
use mediamesh_cluster::{Consistency, NodeId, NodeRegistration, RoomId, ViewerId, ViewerState, raft_id_for};
use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
        .join(name)
}

/// Reads a fixture, or writes `bytes` to it first when asked to.
fn stored(name: &str, bytes: &[u8]) -> Vec<u8> {
    let path = fixture(name);
    if std::env::var_os("MEDIAMESH_WRITE_FIXTURES").is_some() {
        std::fs::create_dir_all(path.parent().expect("a parent")).expect("fixtures folder");
        std::fs::write(&path, bytes).expect("fixture written");
    }
    std::fs::read(&path).unwrap_or_else(|e| panic!("fixture {}: {e}", path.display()))
}

fn registration(id: &str) -> NodeRegistration {
    NodeRegistration {
        id: NodeId::from(id),
        region: "busan".into(),
        cluster_addr: "127.0.0.1:7001".into(),
        http_url: "http://127.0.0.1:8080".into(),
        grpc_url: "http://127.0.0.1:8081".into(),
        capacity: 500,
        media_ip: "127.0.0.1".into(),
        media_ports: (50000, 50099),
        turn_addr: "127.0.0.1:3478".into(),
    }
}

fn viewer(id: &str, position_ms: u64) -> ViewerState {
    ViewerState {
        viewer: ViewerId::from(id),
        room: RoomId::from("lobby"),
        node: NodeId::from("solo"),
        session: format!("session-{id}"),
        display_name: "***".into(),
        position_ms,
        subscriptions: vec!["video".into(), "audio".into()],
        layers: [("video".to_string(), "h".to_string())].into(),
        updated_at_ms: 1_765_000_000_000,
        expires_at_ms: 0,
        revision: 0,
        generation: 2,
    }
}

/// The commands of the fixture entries: one of every kind that carries data.
fn commands() -> Vec<Command> {
    vec![
        Command::RegisterNode(registration("solo")),
        Command::SetSettings {
            settings: ClusterSettings { viewer_ttl_ms: 300_000 },
            only_if_unset: true,
        },
        Command::PlaceRoom {
            room: RoomId::from("lobby"),
            expected_epoch: None,
            node: NodeId::from("solo"),
        },
        Command::UpsertViewers {
            viewers: vec![viewer("v1", 1_000), viewer("v2", 2_000)],
        },
        Command::RotateTurnSecret {
            secret: "turn-secret".into(),
            at_ms: 1_765_000_000_000,
        },
        Command::AddUsage {
            node: NodeId::from("solo"),
            batch: UsageBatch {
                run: 7,
                seq: 1,
                part: 0,
            },
            records: vec![UsageRecord {
                day: "2026-12-07".into(),
                room: RoomId::from("lobby"),
                viewer_ms: 60_000,
                sessions: 2,
            }],
            keep_from_day: "2026-11-01".into(),
        },
    ]
}

/// The state the fixture entry leaves, applied at index 2 after the bootstrap at 1.
fn state() -> StateMachine {
    let mut sm = StateMachine::default();
    sm.apply_empty(1, 1);
    sm.apply(2, 1, commands());
    sm
}

#[test]
fn stored_fixtures_of_the_current_formats_decode() {
    // Raft entry payload, envelope version 1.
    let entry = EntryPayload {
        proposer: 42,
        batch_id: 9,
        commands: commands(),
    };
    let bytes = stored("entry-payload-v1.bin", &codec::encode(&entry));
    assert_eq!(bytes[0], 1, "envelope version");
    assert_eq!(
        codec::decode::<EntryPayload, { codec::ENTRY_BYTES_MAX }>(&bytes),
        Ok(entry)
    );

    // Snapshot data (the whole state machine), envelope version 1.
    let sm = state();
    let bytes = stored("snapshot-v1.bin", &sm.encode_snapshot());
    assert_eq!(bytes[0], 1, "envelope version");
    let decoded = StateMachine::decode_snapshot(&bytes).expect("the stored snapshot decodes");
    assert_eq!(decoded, sm);
    assert_eq!(decoded.viewers()[&ViewerId::from("v2")].position_ms, 2_000);
    assert_eq!(decoded.rooms()[&RoomId::from("lobby")].epoch, 1);
    assert_eq!(decoded.digest(), sm.digest());

    // A forwarded proposal's answer: version 2 (upserts answered with refusals only) ...
    let upserted = ForwardedOutcome::Applied(vec![Outcome::Upserted {
        index: 2,
        ttl_ms: 300_000,
        kept: vec![(1, viewer("v2", 2_000))],
    }]);
    let bytes = stored(
        "forwarded-outcome-v2.bin",
        &codec::encode_versioned(FORWARD_VERSION, &upserted),
    );
    assert_eq!(bytes[0], 2, "envelope version");
    assert_eq!(decode_forwarded_outcome(&bytes), Ok(upserted));
    // ... and version 1 (every stored state sent back), which a leader of the previous build
    // answers during a rolling upgrade.
    let previous = ForwardedOutcome::Applied(vec![Outcome::Viewers(vec![viewer("v1", 1_000)])]);
    let bytes = stored("forwarded-outcome-v1.bin", &codec::encode(&previous));
    assert_eq!(bytes[0], 1, "envelope version");
    let decoded = decode_forwarded_outcome(&bytes).expect("version 1 still decodes");
    assert_eq!(decoded, previous);
    let ForwardedOutcome::Applied(mut outcomes) = decoded else {
        panic!("applied")
    };
    let stored_states = outcomes
        .pop()
        .and_then(|o| o.stored_viewers(vec![viewer("v1", 1_000)]))
        .expect("a version-1 upsert answer reads as stored states");
    assert_eq!(stored_states, [viewer("v1", 1_000)]);
    // An unknown version is an error, not a guess.
    let mut future = codec::encode_versioned(FORWARD_VERSION, &ForwardedOutcome::Failed("x".into()));
    future[0] = 3;
    assert!(decode_forwarded_outcome(&future).is_err());
}

/// Writes a data directory as format 1 kept it: the raft tree (hard state, conf state,
/// snapshot, entries) and the state machine's records in `sm_*` trees, applied up to `applied`.
fn write_format_1(dir: &std::path::Path, raft_id: u64) -> StateMachine {
    let db = sled::open(dir).expect("sled opens");
    let raft = db.open_tree("raft").expect("raft tree");
    let conf = ConfState::from((vec![raft_id], vec![]));
    let mut bootstrap = StateMachine::default();
    bootstrap.apply_empty(1, 1);
    let mut snapshot = Snapshot::default();
    snapshot.mut_metadata().index = 1;
    snapshot.mut_metadata().term = 1;
    snapshot.mut_metadata().set_conf_state(conf.clone());
    snapshot.set_data(bootstrap.encode_snapshot().into());
    raft.insert("snap", snapshot.write_to_bytes().expect("encodes"))
        .expect("insert");
    raft.insert("cs", conf.write_to_bytes().expect("encodes"))
        .expect("insert");
    // Entries 2 (the fixture's commands) and 3 (one more viewer), both committed and applied.
    let payloads = [
        commands(),
        vec![Command::UpsertViewers {
            viewers: vec![viewer("v3", 3_000)],
        }],
    ];
    let mut sm = bootstrap;
    for (index, commands) in (2u64..).zip(payloads) {
        let payload = EntryPayload {
            proposer: raft_id,
            batch_id: index,
            commands: commands.clone(),
        };
        let entry = Entry {
            index,
            term: 1,
            data: codec::encode(&payload).into(),
            ..Default::default()
        };
        let mut key = vec![b'e'];
        key.extend_from_slice(&index.to_be_bytes());
        raft.insert(key, entry.write_to_bytes().expect("encodes"))
            .expect("insert");
        sm.apply(index, 1, commands);
    }
    let hard_state = HardState {
        term: 1,
        vote: raft_id,
        commit: 3,
        ..Default::default()
    };
    raft.insert("hs", hard_state.write_to_bytes().expect("encodes"))
        .expect("insert");
    for tree in SmTree::ALL {
        db.open_tree(tree.name()).expect("sm tree");
    }
    for record in sm.all_records() {
        let value = record.value.expect("records are puts");
        db.open_tree(record.tree.name())
            .expect("sm tree")
            .insert(record.key, value)
            .expect("insert");
    }
    db.flush().expect("flush");
    sm
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_format_1_data_directory_is_upgraded_on_start() {
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("solo");
    let before = write_format_1(&dir, raft_id_for(&NodeId::from("solo")));

    let node = Node::start(fast_config("solo", &dir, vec![]))
        .await
        .expect("a format-1 directory starts");
    within(Duration::from_secs(10), node.store.wait_ready())
        .await
        .expect("ready");
    for id in ["v1", "v2", "v3"] {
        let read = node
            .store
            .viewer(&ViewerId::from(id), Consistency::Linearizable)
            .await
            .expect("read");
        assert_eq!(read.as_ref(), before.viewers().get(&ViewerId::from(id)), "{id}");
    }
    let usage = node.store.usage("2026-12-07", Consistency::Local).await.expect("usage");
    assert_eq!(usage.len(), 1);
    // It goes on writing, and a restart reads what it wrote (format 2 from now on).
    node.store.upsert_viewer(viewer("v4", 4_000)).await.expect("write");
    node.stop().await;
    {
        let db = sled::open(&dir).expect("sled opens");
        let names: Vec<String> = db
            .tree_names()
            .iter()
            .map(|n| String::from_utf8_lossy(n).into_owned())
            .collect();
        assert!(!names.iter().any(|n| n.starts_with("sm_")), "{names:?}");
        let format = db.open_tree("raft").expect("raft").get("format").expect("read");
        assert_eq!(format.as_deref(), Some(&[2u8][..]));
    }
    let node = Node::start(fast_config("solo", &dir, vec![])).await.expect("restarts");
    within(Duration::from_secs(10), node.store.wait_ready())
        .await
        .expect("ready");
    let v4 = node
        .store
        .viewer(&ViewerId::from("v4"), Consistency::Linearizable)
        .await
        .expect("read");
    assert_eq!(v4.map(|v| v.position_ms), Some(4_000));
    assert_eq!(node.store.status().viewers, 4);
    node.stop().await;
}
