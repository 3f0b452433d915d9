//! Bad input on the cluster port and in the data directory: refused with an error, no panic.

mod common;

use std::time::Duration;

use common::*;
use mediamesh_cluster::transport::SECRET_METADATA_KEY;
use mediamesh_cluster::{NodeId, RoomId, StoreError};
use mediamesh_proto::cluster::v1 as pb;
use pb::cluster_client::ClusterClient;
use protobuf::Message as _;
use tonic::Code;
use tonic::transport::Channel;

fn with_secret<T>(body: T, secret: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(body);
    request
        .metadata_mut()
        .insert(SECRET_METADATA_KEY, secret.parse().unwrap());
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_unauthenticated_and_oversized_calls_are_refused() {
    let root = tempfile::tempdir().unwrap();
    let node = Node::start(fast_config("solo", &root.path().join("solo"), vec![]))
        .await
        .unwrap();
    within(Duration::from_secs(5), node.store.wait_ready()).await.unwrap();
    let channel = Channel::from_shared(format!("http://{}", node.store.advertise_cluster()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = ClusterClient::new(channel).max_encoding_message_size(usize::MAX);
    let me = node.store.raft_id();

    // No secret, wrong secret.
    let status = client
        .status(tonic::Request::new(pb::StatusRequest {}))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let status = client
        .status(with_secret(pb::StatusRequest {}, "wrong"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(client.status(with_secret(pb::StatusRequest {}, SECRET)).await.is_ok());

    // A valid raft message, then truncated and corrupted copies of it.
    let mut message = raft::eraftpb::Message::default();
    message.set_msg_type(raft::eraftpb::MessageType::MsgHeartbeat);
    message.from = 7;
    message.to = me;
    message.term = 1;
    let bytes = message.write_to_bytes().unwrap();
    let truncated = bytes[..bytes.len() - 1].to_vec();
    let mut corrupted = bytes.clone();
    corrupted[0] = 0xFF;
    for garbage in [
        truncated,
        corrupted,
        vec![0xFF; 64],
        vec![0x0A, 0xFF, 0xFF, 0xFF, 0xFF, 0x0F],
    ] {
        let batch = pb::RaftBatch {
            from_raft_id: 7,
            from_addr: "127.0.0.1:1".into(),
            messages: vec![garbage],
        };
        let status = client.raft(with_secret(batch, SECRET)).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    }
    // Addressed to someone else, or claiming another sender.
    let mut other = message.clone();
    other.to = me.wrapping_add(1);
    let batch = pb::RaftBatch {
        from_raft_id: 7,
        from_addr: String::new(),
        messages: vec![other.write_to_bytes().unwrap()],
    };
    assert_eq!(
        client.raft(with_secret(batch, SECRET)).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let batch = pb::RaftBatch {
        from_raft_id: 8,
        from_addr: String::new(),
        messages: vec![bytes.clone()],
    };
    assert_eq!(
        client.raft(with_secret(batch, SECRET)).await.unwrap_err().code(),
        Code::InvalidArgument
    );

    // Garbage proposals and joins.
    for body in [vec![], vec![1], vec![9, 9, 9], vec![1, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF]] {
        let status = client
            .propose(with_secret(pb::ProposeRequest { commands: body }, SECRET))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
    }
    let join = pb::JoinRequest {
        node_id: "x".into(),
        raft_id: 1,
        cluster_addr: "127.0.0.1:1".into(),
        region: "seoul".into(),
        ..Default::default()
    };
    assert_eq!(
        client.join(with_secret(join, SECRET)).await.unwrap_err().code(),
        Code::InvalidArgument
    );

    // Oversized: more than the 64 MiB message limit.
    let huge = vec![0u8; mediamesh_cluster::transport::MESSAGE_BYTES_MAX + 1024];
    let batch = pb::RaftBatch {
        from_raft_id: 7,
        from_addr: String::new(),
        messages: vec![huge],
    };
    let status = client.raft(with_secret(batch, SECRET)).await.unwrap_err();
    assert!(
        matches!(
            status.code(),
            Code::ResourceExhausted | Code::OutOfRange | Code::Internal
        ),
        "{status:?}"
    );

    // The node is still healthy.
    node.store
        .place_room_cas(RoomId::from("still-alive"), None, NodeId::from("solo"))
        .await
        .unwrap();
    assert!(
        node.store
            .transport_metrics()
            .refused_calls
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 4
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_records_in_the_data_directory_are_clear_errors() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("solo");
    let node = Node::start(fast_config("solo", &dir, vec![])).await.unwrap();
    within(Duration::from_secs(5), node.store.wait_ready()).await.unwrap();
    node.store
        .place_room_cas(RoomId::from("lobby"), None, NodeId::from("solo"))
        .await
        .unwrap();
    node.stop().await;

    // The snapshot (it holds the state machine).
    let good_snapshot = {
        let db = sled::open(&dir).unwrap();
        let raft = db.open_tree("raft").unwrap();
        let good = raft.get("snap").unwrap().expect("a snapshot");
        raft.insert("snap", &[0xFF, 0x01, 0x02][..]).unwrap();
        db.flush().unwrap();
        good
    };
    let err = Node::start(fast_config("solo", &dir, vec![])).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Corrupt { tree, key, .. } if tree == "raft" && key == "snap"),
        "{err:?}"
    );
    eprintln!("{err}");

    // A data directory of a newer format is refused, naming the versions.
    {
        let db = sled::open(&dir).unwrap();
        let raft = db.open_tree("raft").unwrap();
        raft.insert("snap", good_snapshot).unwrap();
        raft.insert("format", &[9][..]).unwrap();
        db.flush().unwrap();
    }
    let err = Node::start(fast_config("solo", &dir, vec![])).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Config(m) if m.contains("format 9") && m.contains("formats 1 and 2")),
        "{err:?}"
    );
    {
        let db = sled::open(&dir).unwrap();
        db.open_tree("raft").unwrap().insert("format", &[2][..]).unwrap();
        db.flush().unwrap();
    }

    // The raft hard state.
    {
        let db = sled::open(&dir).unwrap();
        db.open_tree("raft")
            .unwrap()
            .insert("hs", &[0xFF, 0xFF, 0xFF][..])
            .unwrap();
        db.flush().unwrap();
    }
    let err = Node::start(fast_config("solo", &dir, vec![])).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Corrupt { tree, key, .. } if tree == "raft" && key == "hs"),
        "{err:?}"
    );
}
