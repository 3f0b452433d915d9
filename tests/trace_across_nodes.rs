//! One trace across two node processes: a WHIP publish on a follower claims its room through the
//! store, the follower forwards the proposal to the leader, and the leader's spans join the
//! caller's trace. Both nodes export to one OTLP receiver run by this test. A gRPC signal
//! session carrying `traceparent` metadata continues that trace too.

#[path = "common/cluster.rs"]
mod cluster;
mod common;

use cluster::ProcessCluster;
use mediamesh::auth::{Grants, TokenKeys};
use mediamesh_proto::signal::v1 as pb;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A span as the receiver saw it.
#[derive(Debug, Clone)]
struct Received {
    node: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
}

#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Received>>>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().expect("receiver lock");
        for resource_spans in request.into_inner().resource_spans {
            let node = resource_spans
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.instance.id")
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    Value::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    spans.push(Received {
                        node: node.clone(),
                        name: span.name,
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent_span_id: hex(&span.parent_span_id),
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// Starts the receiver on its own runtime thread; returns its endpoint URL.
fn start_receiver(receiver: Receiver) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("receiver port");
    let addr = listener.local_addr().expect("receiver address");
    listener.set_nonblocking(true).expect("nonblocking");
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Runtime::new().expect("receiver runtime");
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
            let _ = tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(receiver))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await;
        });
    });
    format!("http://{addr}")
}

/// Waits until the spans of `trace_id` include every name in `names`.
fn wait_for_trace(receiver: &Receiver, trace_id: &str, names: &[&str], timeout: Duration) -> Vec<Received> {
    let deadline = Instant::now() + timeout;
    loop {
        let spans: Vec<Received> = receiver
            .spans
            .lock()
            .expect("receiver lock")
            .iter()
            .filter(|s| s.trace_id == trace_id)
            .cloned()
            .collect();
        if names.iter().all(|n| spans.iter().any(|s| s.name == *n)) {
            return spans;
        }
        assert!(
            Instant::now() < deadline,
            "trace {trace_id} lacks some of {names:?} after {timeout:?}: {spans:#?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn span<'a>(spans: &'a [Received], name: &str) -> &'a Received {
    spans
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no {name} in {spans:#?}"))
}

#[test]
fn a_publish_on_a_follower_is_one_trace_across_both_nodes() {
    let receiver = Receiver::default();
    let endpoint = start_receiver(receiver.clone());
    let mut cluster = ProcessCluster::start(
        std::path::Path::new(env!("CARGO_BIN_EXE_mediamesh")),
        // One node per region: the publish below prefers the follower's, so the room is placed
        // on the follower (a publish elsewhere would be redirected to the room's host).
        &[("seoul-1", "seoul"), ("busan-1", "busan")],
        &["--otlp-endpoint", &endpoint, "--trace-sample-floor", "1"],
        Duration::from_secs(30),
    );
    let leader = cluster.leader().expect("a leader");
    let follower = 1 - leader;
    let (leader_id, follower_id) = (
        cluster.nodes[leader].spec.id.clone(),
        cluster.nodes[follower].spec.id.clone(),
    );
    let keys = TokenKeys::new(&cluster.secret);
    let token = |identity: &str, grants: Grants| keys.create(identity, "traced-room", grants, Duration::from_secs(600));

    // HTTP: a caller's trace context on a WHIP publish to a new room on the follower.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let publish_token = token(
        "tracer",
        Grants {
            publish: true,
            ..Default::default()
        },
    );
    let response = reqwest::blocking::Client::new()
        .post(format!("{}/whip/traced-room", cluster.nodes[follower].base_url()))
        .header("authorization", format!("Bearer {publish_token}"))
        .header("content-type", "application/sdp")
        .header("x-region-preference", cluster.nodes[follower].spec.region.clone())
        .header("traceparent", format!("00-{trace_id}-{caller_span}-01"))
        .header("tracestate", "vendor=opaque")
        .body(common::sample_offer())
        .send()
        .expect("WHIP publish");
    assert_eq!(response.status(), 201);

    let names = [
        "POST /whip/{room}",
        "room.claim",
        "store.propose",
        "store.forwarded_propose",
        "store.commit",
        "room.publish",
    ];
    let spans = wait_for_trace(&receiver, trace_id, &names, Duration::from_secs(20));
    let http = span(&spans, "POST /whip/{room}");
    assert_eq!(
        http.parent_span_id, caller_span,
        "the server span continues the caller's span"
    );
    assert_eq!(http.node, follower_id);
    let claim = span(&spans, "room.claim");
    assert_eq!(claim.parent_span_id, http.span_id);
    let propose = span(&spans, "store.propose");
    assert_eq!(propose.parent_span_id, claim.span_id);
    assert_eq!(propose.node, follower_id);
    let forwarded = span(&spans, "store.forwarded_propose");
    assert_eq!(
        forwarded.parent_span_id, propose.span_id,
        "the leader continues the follower's span"
    );
    assert_eq!(forwarded.node, leader_id, "forwarded to the leader");
    let commit = spans
        .iter()
        .find(|s| s.name == "store.commit" && s.parent_span_id == forwarded.span_id)
        .unwrap_or_else(|| panic!("no commit under the forwarded proposal: {spans:#?}"));
    assert_eq!(commit.node, leader_id);
    let publish = span(&spans, "room.publish");
    assert_eq!(
        publish.parent_span_id, http.span_id,
        "the room actor's span is the request's child"
    );
    for s in &spans {
        assert!(
            s.span_id == http.span_id || spans.iter().any(|p| p.span_id == s.parent_span_id),
            "{} has a parent outside the trace: {spans:#?}",
            s.name
        );
    }

    // gRPC: a signal session with trace context in its metadata.
    let grpc_trace = "0af7651916cd43dd8448eb211c80319c";
    let grpc_caller = "b7ad6b7169203331";
    let view_token = token(
        "viewer",
        Grants {
            subscribe: true,
            ..Default::default()
        },
    );
    let grpc_url = format!("http://127.0.0.1:{}", cluster.nodes[follower].spec.grpc_port);
    tokio::runtime::Runtime::new().expect("runtime").block_on(async move {
        let channel = tonic::transport::Endpoint::from_shared(grpc_url)
            .expect("url")
            .connect()
            .await
            .expect("gRPC connect");
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(pb::ClientMessage {
            id: 1,
            body: Some(pb::client_message::Body::Join(pb::Join {
                room: "traced-room".into(),
                role: "subscriber".into(),
                token: view_token,
                ..Default::default()
            })),
        })
        .await
        .expect("queue join");
        let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        request.metadata_mut().insert(
            "traceparent",
            format!("00-{grpc_trace}-{grpc_caller}-01").parse().expect("ascii"),
        );
        let mut replies = pb::signal_client::SignalClient::new(channel)
            .connect(request)
            .await
            .expect("Connect")
            .into_inner();
        let first = tokio::time::timeout(Duration::from_secs(10), replies.message())
            .await
            .expect("a reply in time")
            .expect("stream")
            .expect("a message");
        assert!(
            matches!(first.body, Some(pb::server_message::Body::Joined(_))),
            "{first:?}"
        );
        drop(tx); // ends the session, which ends its span
    });
    let spans = wait_for_trace(
        &receiver,
        grpc_trace,
        &["signal.session", "signal.join"],
        Duration::from_secs(20),
    );
    let session = span(&spans, "signal.session");
    assert_eq!(session.parent_span_id, grpc_caller);
    assert_eq!(span(&spans, "signal.join").parent_span_id, session.span_id);
    drop(cluster);
}
