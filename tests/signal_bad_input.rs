//! Bad input on both signal transports against a real node: malformed JSON and protobuf, unknown
//! message types, oversized frames, messages out of order, bad tokens. Each gets an error reply
//! and a clean close or a session that goes on; the node keeps serving.

mod common;

use common::TestNode;
use futures::{SinkExt, StreamExt};
use mediamesh_proto::signal::v1 as pb;
use prost::Message as _;
use serde_json::{Value, json as j};
use std::time::Duration;
use tokio_tungstenite::tungstenite::{self, Message};

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn start_node() -> TestNode {
    start_node_with(&[]).await
}

async fn start_node_with(extra: &'static [&'static str]) -> TestNode {
    tokio::task::spawn_blocking(move || TestNode::start(extra))
        .await
        .expect("node started")
}

fn ws_url(node: &TestNode, token: &str) -> String {
    format!("{}/signal?access_token={token}", node.base.replace("http://", "ws://"))
}

async fn open(node: &TestNode, token: &str) -> Ws {
    tokio_tungstenite::connect_async(ws_url(node, token))
        .await
        .expect("WebSocket opens")
        .0
}

/// The next JSON message, or `None` when the node closed the socket.
async fn next(ws: &mut Ws) -> Option<Value> {
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("the node answers within 10 s");
        match frame {
            Some(Ok(Message::Text(text))) => return Some(serde_json::from_str(&text).expect("the node sends JSON")),
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
            Some(Ok(_)) => {}
        }
    }
}

async fn send(ws: &mut Ws, text: impl Into<String>) {
    ws.send(Message::text(text.into())).await.expect("send");
}

async fn expect_error(ws: &mut Ws, code: &str, id: Option<u64>) -> Value {
    let reply = next(ws).await.expect("an error reply, not a close");
    assert_eq!(reply["error"]["code"], code, "{reply}");
    if let Some(id) = id {
        assert_eq!(reply["id"], id, "{reply}");
    }
    reply
}

async fn still_alive(ws: &mut Ws) {
    send(ws, r#"{"id":99,"ping":{"timestamp_ms":7}}"#).await;
    let reply = next(ws).await.expect("the session goes on");
    assert_eq!(reply, j!({"id": 99, "pong": {"timestamp_ms": 7}}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_bad_input_gets_error_replies() {
    let node = start_node().await;
    let token = node.subscribe_token("bad-ws");

    // A bad token is refused before the upgrade, with a plain 401.
    match tokio_tungstenite::connect_async(ws_url(&node, "not-a-jwt")).await {
        Err(tungstenite::Error::Http(response)) => assert_eq!(response.status(), 401),
        other => panic!("a bad token was not refused: {:?}", other.map(|_| ())),
    }

    let mut ws = open(&node, &token).await;
    send(&mut ws, r#"{"id":1,"answer":{"target":"subscriber","sdp":"v=0"}}"#).await;
    expect_error(&mut ws, "not_joined", Some(1)).await;
    send(&mut ws, "{not json").await;
    expect_error(&mut ws, "bad_request", None).await;
    send(&mut ws, r#"{"id":2,"join":{"room":5}}"#).await;
    expect_error(&mut ws, "bad_request", Some(2)).await;
    send(&mut ws, r#"{"id":3,"dance":{}}"#).await;
    expect_error(&mut ws, "unknown_message", Some(3)).await;
    ws.send(Message::binary(vec![1u8, 2, 3])).await.expect("send");
    expect_error(&mut ws, "bad_request", None).await;
    send(&mut ws, r#"{"id":4,"join":{"room":"bad ws!","role":"subscriber"}}"#).await;
    expect_error(&mut ws, "bad_request", Some(4)).await;
    send(&mut ws, r#"{"id":5,"join":{"room":"bad-ws","role":"emperor"}}"#).await;
    expect_error(&mut ws, "bad_request", Some(5)).await;
    send(&mut ws, r#"{"id":6,"join":{"room":"bad-ws","role":"subscriber"}}"#).await;
    let joined = next(&mut ws).await.expect("joined");
    assert_eq!(joined["id"], 6, "{joined}");
    assert!(
        joined["joined"]["session"].as_str().is_some_and(|s| !s.is_empty()),
        "{joined}"
    );
    send(&mut ws, r#"{"id":7,"join":{"room":"bad-ws","role":"subscriber"}}"#).await;
    expect_error(&mut ws, "already_joined", Some(7)).await;
    send(&mut ws, r#"{"id":8,"answer":{"target":"subscriber","sdp":"v=0"}}"#).await;
    expect_error(&mut ws, "out_of_order", Some(8)).await;
    send(
        &mut ws,
        r#"{"id":9,"trickle":{"target":"subscriber","fragment":"a=end-of-candidates"}}"#,
    )
    .await;
    expect_error(&mut ws, "out_of_order", Some(9)).await;
    send(&mut ws, r#"{"id":10,"offer":{"target":"subscriber","sdp":"not sdp"}}"#).await;
    expect_error(&mut ws, "bad_request", Some(10)).await;
    send(&mut ws, r#"{"id":11,"offer":{"target":"publisher","sdp":"v=0"}}"#).await;
    expect_error(&mut ws, "forbidden", Some(11)).await;
    send(&mut ws, r#"{"id":12,"set_layer":{"layer":"ultra"}}"#).await;
    expect_error(&mut ws, "bad_request", Some(12)).await;
    send(&mut ws, r#"{"id":13,"subscribe":{"track_ids":[]}}"#).await;
    expect_error(&mut ws, "bad_request", Some(13)).await;
    still_alive(&mut ws).await;

    // An oversized frame ends the session with an error and a close.
    send(
        &mut ws,
        format!(r#"{{"ping":{{}},"pad":"{}"}}"#, "x".repeat(100 * 1024)),
    )
    .await;
    expect_error(&mut ws, "too_large", None).await;
    assert!(
        next(&mut ws).await.is_none(),
        "the node closes after an oversized frame"
    );

    // A token without the grant for the role: forbidden, fatal.
    let mut ws = open(&node, &node.publish_token("bad-ws")).await;
    send(&mut ws, r#"{"id":1,"join":{"room":"bad-ws","role":"subscriber"}}"#).await;
    let reply = expect_error(&mut ws, "forbidden", Some(1)).await;
    assert_eq!(reply["error"]["fatal"], true);
    assert!(next(&mut ws).await.is_none(), "closed after a fatal error");

    // A join token in the message for a client that sent none at connect, and a bad one.
    let url = format!("{}/signal", node.base.replace("http://", "ws://"));
    let (mut ws, _) = tokio_tungstenite::connect_async(&url)
        .await
        .expect("opens without a token");
    send(
        &mut ws,
        r#"{"id":1,"join":{"room":"bad-ws","role":"subscriber","token":"garbage"}}"#,
    )
    .await;
    expect_error(&mut ws, "unauthorized", Some(1)).await;
    assert!(next(&mut ws).await.is_none());
    let (mut ws, _) = tokio_tungstenite::connect_async(&url)
        .await
        .expect("opens without a token");
    send(
        &mut ws,
        j!({"id": 1, "join": {"room": "bad-ws", "role": "subscriber", "token": token}}).to_string(),
    )
    .await;
    assert!(next(&mut ws).await.expect("joined")["joined"].is_object());

    // The node still serves, and counted what it refused.
    let health = reqwest::get(format!("{}/healthz", node.base)).await.expect("healthz");
    assert_eq!(health.status(), 200);
    let metrics = reqwest::get(format!("{}/metrics", node.base))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    for (code, at_least) in [
        ("not_joined", 1),
        ("bad_request", 6),
        ("out_of_order", 2),
        ("too_large", 1),
    ] {
        let line = format!("mediamesh_signal_errors_total{{code=\"{code}\"}} ");
        let count: u64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix(&line))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {line} in the metrics"));
        assert!(count >= at_least, "{line}{count}");
    }
    assert!(
        metrics.contains("mediamesh_signal_sessions{transport=\"websocket\"} 1"),
        "the joined session is open"
    );
}

/// Sends raw bytes as gRPC frames and decodes replies as `ServerMessage`.
#[derive(Clone, Default)]
struct RawCodec;

struct RawEncoder;
struct ServerDecoder;

impl tonic::codec::Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for ServerDecoder {
    type Item = pb::ServerMessage;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<pb::ServerMessage>, tonic::Status> {
        pb::ServerMessage::decode(src)
            .map(Some)
            .map_err(|e| tonic::Status::internal(e.to_string()))
    }
}

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = pb::ServerMessage;
    type Encoder = RawEncoder;
    type Decoder = ServerDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> ServerDecoder {
        ServerDecoder
    }
}

async fn grpc_address(node: &TestNode) -> String {
    let reply: Value = reqwest::Client::new()
        .get(format!("{}/signal", node.base))
        .header("x-signal-mode", "grpc")
        .send()
        .await
        .expect("signal mode")
        .json()
        .await
        .expect("JSON");
    reply["grpc"].as_str().expect("a gRPC address").to_string()
}

/// Opens `Signal/Connect` with `frames` as the client's stream; returns the replies until the end.
async fn raw_session(
    address: &str,
    token: &str,
    frames: Vec<Vec<u8>>,
) -> Result<Vec<pb::ServerMessage>, tonic::Status> {
    let channel = tonic::transport::Endpoint::from_shared(address.to_string())
        .expect("address")
        .connect()
        .await
        .expect("gRPC connects");
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    let mut request = tonic::Request::new(futures::stream::iter(frames).chain(futures::stream::pending()));
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().expect("metadata"));
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/mediamesh.signal.v1.Signal/Connect");
    let mut replies = grpc.streaming(request, path, RawCodec).await?.into_inner();
    let mut out = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(3), replies.message()).await {
            Ok(Ok(Some(message))) => out.push(message),
            Ok(Ok(None)) | Ok(Err(_)) => return Ok(out),
            Err(_) => return Ok(out), // the session stays open: it went on
        }
    }
}

fn frame(id: u64, body: pb::client_message::Body) -> Vec<u8> {
    pb::ClientMessage { id, body: Some(body) }.encode_to_vec()
}

fn error_codes(replies: &[pb::ServerMessage]) -> Vec<(u64, String)> {
    replies
        .iter()
        .filter_map(|m| match &m.body {
            Some(pb::server_message::Body::Error(e)) => Some((m.id, e.code.clone())),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_bad_input_gets_error_replies() {
    use pb::client_message::Body as In;
    let node = start_node().await;
    let address = grpc_address(&node).await;
    let token = node.subscribe_token("bad-grpc");

    // A bad token: refused before the stream.
    let refused = raw_session(&address, "not-a-jwt", vec![]).await;
    assert_eq!(
        refused.map(|_| ()).map_err(|s| s.code()),
        Err(tonic::Code::Unauthenticated)
    );

    // Out of order, unknown (a frame with only an id), then a valid ping: the session goes on.
    let answer = In::Answer(pb::SessionDescription {
        target: "subscriber".into(),
        sdp: "v=0".into(),
    });
    let frames = vec![
        frame(1, answer.clone()),
        pb::ClientMessage { id: 2, body: None }.encode_to_vec(),
        frame(
            3,
            In::Join(pb::Join {
                room: "bad-grpc".into(),
                role: "subscriber".into(),
                ..Default::default()
            }),
        ),
        frame(4, answer),
        frame(5, In::Ping(pb::Ping { timestamp_ms: 9 })),
    ];
    let replies = raw_session(&address, &token, frames).await.expect("the stream opens");
    assert_eq!(
        error_codes(&replies),
        [
            (1, "not_joined".to_string()),
            (2, "unknown_message".into()),
            (4, "out_of_order".into())
        ]
    );
    assert!(
        matches!(replies.last().and_then(|m| m.body.as_ref()), Some(pb::server_message::Body::Pong(p)) if p.timestamp_ms == 9),
        "{replies:?}"
    );

    // Garbage protobuf: an error reply, then the stream ends.
    let replies = raw_session(&address, &token, vec![vec![0xff, 0xff, 0xff, 0x0f, 0x00]])
        .await
        .expect("opens");
    assert_eq!(error_codes(&replies), [(0, "bad_request".to_string())]);

    // An oversized frame: too_large, then the end.
    let big = frame(1, In::Ping(pb::Ping { timestamp_ms: 1 }))
        .into_iter()
        .chain(
            pb::Join {
                room: "x".repeat(100 * 1024),
                ..Default::default()
            }
            .encode_to_vec(),
        )
        .collect();
    let replies = raw_session(&address, &token, vec![big]).await.expect("opens");
    assert_eq!(error_codes(&replies), [(0, "too_large".to_string())]);

    // The node still serves a well-behaved gRPC session.
    let client = mediamesh_sdk::Client::connect(
        &node.base,
        &token,
        mediamesh_sdk::ClientOptions {
            transport: mediamesh_sdk::Transport::Grpc,
            room: "bad-grpc".into(),
            ..Default::default()
        },
    )
    .await
    .expect("a good session after the bad ones");
    assert!(!client.session().is_empty());
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signal_sessions_beyond_the_limit_are_refused() {
    let node = start_node_with(&["--signal-sessions-max", "2"]).await;
    let token = node.subscribe_token("limit");
    let first = open(&node, &token).await;
    let mut second = open(&node, &token).await;
    match tokio_tungstenite::connect_async(ws_url(&node, &token)).await {
        Err(tungstenite::Error::Http(response)) => assert_eq!(response.status(), 503),
        other => panic!("a third session was not refused: {:?}", other.map(|_| ())),
    }
    let refused = raw_session(&grpc_address(&node).await, &token, vec![]).await;
    assert_eq!(
        refused.map(|_| ()).map_err(|s| s.code()),
        Err(tonic::Code::ResourceExhausted)
    );
    // A closed session gives its place back.
    drop(first);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match tokio_tungstenite::connect_async(ws_url(&node, &token)).await {
            Ok(_) => break,
            Err(error) => assert!(tokio::time::Instant::now() < deadline, "no place freed: {error}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    still_alive(&mut second).await;
}
