//! `mediamesh.signal.v1.Signal/Connect` on the `--grpc` port: the gRPC transport. The
//! `authorization` metadata carries `Bearer <token>` (or `join.token` does).

use super::session;
use super::{FRAME_BYTES_MAX, Inbound, SignalContext, Transport};
use crate::auth;
use futures::StreamExt;
use mediamesh_proto::signal::v1::signal_server::{Signal, SignalServer};
use mediamesh_proto::signal::v1::{ClientMessage, ServerMessage};
use std::pin::Pin;
use std::sync::Arc;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

pub struct SignalService {
    context: Arc<SignalContext>,
}

/// The service, with frames limited to [`FRAME_BYTES_MAX`].
pub fn service(context: Arc<SignalContext>) -> SignalServer<SignalService> {
    SignalServer::new(SignalService { context })
        .max_decoding_message_size(FRAME_BYTES_MAX)
        .max_encoding_message_size(FRAME_BYTES_MAX * 4)
}

type ServerStream = Pin<Box<dyn futures::Stream<Item = Result<ServerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl Signal for SignalService {
    type ConnectStream = ServerStream;

    async fn connect(&self, request: Request<Streaming<ClientMessage>>) -> Result<Response<ServerStream>, Status> {
        let claims = match request.metadata().get("authorization") {
            Some(value) => {
                let value = value
                    .to_str()
                    .map_err(|_| Status::unauthenticated("malformed authorization metadata"))?;
                let token = auth::bearer(Some(value)).map_err(|e| Status::unauthenticated(e.to_string()))?;
                Some(
                    self.context
                        .keys
                        .verify(token)
                        .map_err(|e| Status::unauthenticated(e.to_string()))?,
                )
            }
            None => None,
        };
        let admission = self.context.admit().ok_or_else(|| {
            Status::resource_exhausted(format!(
                "this node holds its limit of {} signal sessions; try another node",
                self.context.sessions_max
            ))
        })?;
        let header = |name: &str| request.metadata().get(name).and_then(|v| v.to_str().ok());
        let region = mediamesh_cluster::mesh::placement::region_preference(&[
            header("x-korean-region"),
            header("x-region-preference"),
        ]);
        let span = tracing::info_span!("signal.session", otel.kind = "server", transport = "grpc");
        // A missing or malformed traceparent leaves the session a root.
        let _ = span.set_parent(crate::telemetry::propagation::extract_grpc(request.metadata()));
        let mut frames = request.into_inner();
        let ((in_tx, in_rx), (out_tx, out_rx)) = session::channels();
        tokio::spawn(
            session::run(
                Arc::clone(&self.context),
                admission,
                Transport::Grpc,
                claims,
                region,
                in_rx,
                out_tx,
            )
            .instrument(span),
        );
        tokio::spawn(async move {
            loop {
                let item = match frames.next().await {
                    Some(Ok(ClientMessage { id, body: None })) => Inbound::Unknown {
                        id,
                        kind: String::new(),
                    },
                    Some(Ok(message)) => Inbound::Message(message),
                    Some(Err(status)) => {
                        // tonic ends the stream after a frame it cannot decode.
                        let item = if status.code() == tonic::Code::OutOfRange
                            || status.message().contains("too large")
                            || status.message().contains("message length")
                        {
                            Inbound::TooLarge
                        } else {
                            Inbound::Malformed {
                                id: 0,
                                reason: format!("undecodable frame: {}", status.message()),
                            }
                        };
                        let _ = in_tx.send(item).await;
                        break;
                    }
                    None => break,
                };
                if in_tx.send(item).await.is_err() {
                    break;
                }
            }
        });
        let outgoing = tokio_stream::wrappers::ReceiverStream::new(out_rx).map(Ok);
        Ok(Response::new(Box::pin(outgoing)))
    }
}
