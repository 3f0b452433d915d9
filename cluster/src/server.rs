//! The cluster gRPC service (server side). The secret is checked by the interceptor before any
//! of these run; here every payload is decoded defensively: malformed input is an
//! `INVALID_ARGUMENT`, never a panic.

use mediamesh_proto::cluster::v1 as pb;
use pb::cluster_server::Cluster;
use tonic::{Request, Response, Status};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use std::future::Future;

use tokio::net::TcpListener;

use crate::error::StoreError;
use crate::ids::NodeId;
use crate::store::{FORWARDED_METADATA_KEY, Store, StoreConfig};
use crate::transport::{self, SecretCheck, decode_raft_batch};

/// The store's cluster gRPC service (raft transport, forwarded proposals, join, remove,
/// status), behind the cluster-secret check. The node serves it on the cluster port next to its
/// own services; the store itself serves nothing.
pub fn service(
    store: &Store,
) -> tonic::service::interceptor::InterceptedService<pb::cluster_server::ClusterServer<ClusterService>, SecretCheck> {
    tonic::service::interceptor::InterceptedService::new(
        pb::cluster_server::ClusterServer::new(ClusterService { store: store.clone() })
            .max_decoding_message_size(transport::MESSAGE_BYTES_MAX)
            .max_encoding_message_size(transport::MESSAGE_BYTES_MAX),
        store.secret_check(),
    )
}

/// [`Store::open`] and [`service`] on `listener` until `shutdown` resolves (the advertised
/// address defaults to the listener's): a store with nothing else on its port, as tests and
/// benchmarks run it.
pub async fn start(
    mut config: StoreConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Store, StoreError> {
    if config.advertise_cluster.is_empty() {
        config.advertise_cluster = listener
            .local_addr()
            .map_err(|e| StoreError::Config(format!("listener address: {e}")))?
            .to_string();
    }
    let store = Store::open(config, shutdown).await?;
    let routes = tonic::service::Routes::default().add_service(service(&store));
    serve(routes, listener, store.shutdown_token().cancelled_owned());
    Ok(store)
}

/// Serves `routes` on the cluster port until `shutdown` resolves (on a task of its own; a
/// server that stops on an error says so in the log).
pub fn serve(
    routes: tonic::service::Routes,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        let result = tonic::transport::Server::builder()
            .add_routes(routes)
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await;
        if let Err(e) = result {
            tracing::error!("cluster server stopped: {e}");
        }
    })
}

/// Implementation of `mediamesh.cluster.v1.Cluster` over a [`Store`].
pub struct ClusterService {
    pub(crate) store: Store,
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn raft(&self, request: Request<pb::RaftBatch>) -> Result<Response<pb::RaftAck>, Status> {
        let batch = request.into_inner();
        let messages = decode_raft_batch(&batch, self.store.self_raft_id()).map_err(|e| {
            self.store.count_refused();
            Status::invalid_argument(e)
        })?;
        self.store
            .deliver_raft(batch.from_raft_id, &batch.from_addr, messages)?;
        Ok(Response::new(pb::RaftAck {}))
    }

    async fn propose(&self, request: Request<pb::ProposeRequest>) -> Result<Response<pb::ProposeResponse>, Status> {
        // The proposer's trace continues here, on the leader.
        let span = tracing::info_span!("store.forwarded_propose", otel.kind = "server");
        let _ = span.set_parent(crate::trace_context::extract(request.metadata()));
        let body = request.into_inner().commands;
        let results = self.store.handle_forwarded(&body).instrument(span).await?;
        Ok(Response::new(pb::ProposeResponse { results }))
    }

    async fn join(&self, request: Request<pb::JoinRequest>) -> Result<Response<pb::JoinResponse>, Status> {
        let forwarded = request.metadata().contains_key(FORWARDED_METADATA_KEY);
        let response = self.store.handle_join(request.into_inner(), forwarded).await?;
        Ok(Response::new(response))
    }

    async fn remove(&self, request: Request<pb::RemoveRequest>) -> Result<Response<pb::RemoveResponse>, Status> {
        let node = NodeId::new(request.into_inner().node_id);
        node.validate().map_err(Status::invalid_argument)?;
        self.store.handle_remove(node).await?;
        Ok(Response::new(pb::RemoveResponse {}))
    }

    async fn status(&self, _request: Request<pb::StatusRequest>) -> Result<Response<pb::StatusResponse>, Status> {
        Ok(Response::new(self.store.status_proto()))
    }
}
