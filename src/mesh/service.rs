//! The `mediamesh.mesh.v1.Mesh` gRPC service on the cluster port: relay, handoff, promote,
//! migrate and drain between nodes. Every call carries the cluster secret (checked by the same
//! interceptor as the store's service).

use super::{Mesh, migrate, relay};
use mediamesh_actors::RoomId;
use mediamesh_cluster::transport::{SecretCheck, TransportMetrics};
use mediamesh_proto::mesh::v1 as pb;
use mediamesh_proto::mesh::v1::mesh_server::MeshServer;
use std::sync::Arc;
use tonic::{Request, Response, Status};
use tracing::Instrument;

/// Starts a drain of this node (set by the node wiring; it also stops the process after).
pub type DrainStarter = Arc<dyn Fn() -> bool + Send + Sync>;

/// The mesh service of one node: built by the node wiring once the mesh and its drain exist,
/// and served on the cluster port next to the store's service.
pub struct MeshService {
    mesh: Arc<Mesh>,
    drain: DrainStarter,
}

impl MeshService {
    fn mesh(&self) -> Result<&Arc<Mesh>, Status> {
        Ok(&self.mesh)
    }
}

/// The service, wrapped in the cluster-secret check, ready for the node's cluster server.
pub fn routes(mesh: Arc<Mesh>, drain: DrainStarter, cluster_secret: &str) -> tonic::service::Routes {
    let service = MeshServer::new(MeshService { mesh, drain })
        .max_decoding_message_size(super::MESSAGE_BYTES_MAX)
        .max_encoding_message_size(super::MESSAGE_BYTES_MAX);
    let checked = tonic::service::interceptor::InterceptedService::new(
        service,
        SecretCheck::new(cluster_secret, Arc::new(TransportMetrics::default())),
    );
    tonic::service::Routes::new(checked)
}

/// A server span continuing the caller's trace (W3C context in the metadata).
fn server_span(name: &'static str, metadata: &tonic::metadata::MetadataMap) -> tracing::Span {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let span = tracing::info_span!("mesh", otel.name = name, otel.kind = "server");
    let _ = span.set_parent(mediamesh_cluster::trace_context::extract(metadata));
    span
}

fn room_id(name: &str) -> Result<RoomId, Status> {
    RoomId::parse(name).ok_or_else(|| Status::invalid_argument("invalid room name"))
}

#[tonic::async_trait]
impl pb::mesh_server::Mesh for MeshService {
    type WatchRoomStream = relay::EventStream;
    type PullTrackStream = relay::PacketStream;

    async fn watch_room(
        &self,
        request: Request<pb::WatchRoomRequest>,
    ) -> Result<Response<Self::WatchRoomStream>, Status> {
        relay::watch_room(self.mesh()?, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn pull_track(
        &self,
        request: Request<pb::PullTrackRequest>,
    ) -> Result<Response<Self::PullTrackStream>, Status> {
        relay::pull(Arc::clone(self.mesh()?), request.into_inner())
            .await
            .map(Response::new)
    }

    async fn request_keyframe(
        &self,
        request: Request<pb::KeyframeRequest>,
    ) -> Result<Response<pb::KeyframeAck>, Status> {
        relay::request_keyframe(self.mesh()?, request.into_inner()).await?;
        Ok(Response::new(pb::KeyframeAck {}))
    }

    async fn handoff(&self, request: Request<pb::HandoffRequest>) -> Result<Response<pb::HandoffResponse>, Status> {
        let span = server_span("room.handoff", request.metadata());
        let tracks = migrate::handoff(self.mesh()?, request.into_inner())
            .instrument(span)
            .await?;
        Ok(Response::new(pb::HandoffResponse { tracks }))
    }

    async fn promote(&self, request: Request<pb::PromoteRequest>) -> Result<Response<pb::PromoteResponse>, Status> {
        let span = server_span("room.promote", request.metadata());
        migrate::promote(self.mesh()?, request.into_inner())
            .instrument(span)
            .await?;
        Ok(Response::new(pb::PromoteResponse {}))
    }

    async fn migrate(&self, request: Request<pb::MigrateRequest>) -> Result<Response<pb::MigrateResponse>, Status> {
        let span = server_span("mesh.migrate", request.metadata());
        let request = request.into_inner();
        let moved = migrate::migrate(self.mesh()?, &room_id(&request.room)?, &request.to)
            .instrument(span)
            .await?;
        Ok(Response::new(pb::MigrateResponse {
            epoch: moved.epoch,
            elapsed_ms: moved.elapsed_ms,
            to: moved.to,
        }))
    }

    async fn overview(&self, _request: Request<pb::OverviewRequest>) -> Result<Response<pb::OverviewResponse>, Status> {
        Ok(Response::new(super::overview::local(self.mesh()?).await))
    }

    async fn drain(&self, request: Request<pb::DrainRequest>) -> Result<Response<pb::DrainResponse>, Status> {
        if request.into_inner().node != self.mesh()?.node {
            return Err(Status::invalid_argument("a drain goes to the node it drains"));
        }
        if !(self.drain)() {
            return Err(Status::already_exists("this node is already draining"));
        }
        Ok(Response::new(pb::DrainResponse {}))
    }
}
