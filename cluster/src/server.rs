//! The cluster gRPC service (server side). The secret is checked by the interceptor before any
//! of these run; here every payload is decoded defensively: malformed input is an
//! `INVALID_ARGUMENT`, never a panic.

use mediamesh_proto::cluster::v1 as pb;
use pb::cluster_server::Cluster;
use tonic::{Request, Response, Status};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::ids::NodeId;
use crate::store::{FORWARDED_METADATA_KEY, Store};
use crate::transport::decode_raft_batch;

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
