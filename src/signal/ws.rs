//! `GET /signal`: the WebSocket transport, one JSON message per text frame. The same URL tells a
//! client that asks (`x-signal-mode: grpc`, no upgrade) where the gRPC transport listens.

use super::session;
use super::{FRAME_BYTES_MAX, HEARTBEAT_INTERVAL, Inbound, SignalContext, Transport};
use crate::auth;
use crate::http::problem::ApiError;
use actix_web::{HttpRequest, HttpResponse, web};
use actix_ws::{AggregatedMessage, CloseCode, CloseReason, ProtocolError};
use mediamesh_proto::signal::v1::json;
use serde::Deserialize;
use std::sync::Arc;
use tracing::Instrument;

#[derive(Debug, Deserialize)]
pub struct SignalQuery {
    access_token: Option<String>,
}

pub async fn connect(
    context: web::Data<Arc<SignalContext>>,
    request: HttpRequest,
    query: web::Query<SignalQuery>,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let upgrade = request
        .headers()
        .get("upgrade")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let mode = request.headers().get("x-signal-mode").and_then(|v| v.to_str().ok());
    if !upgrade {
        return match mode {
            Some(mode) if mode.eq_ignore_ascii_case("grpc") => Ok(HttpResponse::Ok().json(serde_json::json!({
                "mode": "grpc",
                "grpc": context.grpc_url,
                "service": "mediamesh.signal.v1.Signal/Connect",
            }))),
            _ => Err(ApiError::BadRequest(
                "GET /signal is a WebSocket endpoint: send Upgrade: websocket (or x-signal-mode: grpc \
                 without an upgrade to learn the gRPC address)"
                    .into(),
            )),
        };
    }
    // A token given at connect time is checked before the upgrade, so a bad one gets a plain 401.
    let header = request.headers().get("authorization").and_then(|v| v.to_str().ok());
    let token = match (header, query.access_token.as_deref()) {
        (Some(header), _) => Some(auth::bearer(Some(header))?.to_string()),
        (None, Some(token)) if !token.is_empty() => Some(token.to_string()),
        _ => None,
    };
    let claims = token.map(|t| context.keys.verify(&t)).transpose()?;
    let admission = context.admit().ok_or_else(|| {
        ApiError::Unavailable(format!(
            "this node holds its limit of {} signal sessions; try another node",
            context.sessions_max
        ))
    })?;
    let (response, mut ws, stream) = actix_ws::handle(&request, body)
        .map_err(|e| ApiError::BadRequest(format!("WebSocket handshake failed: {e}")))?;
    let mut stream = stream
        .max_frame_size(FRAME_BYTES_MAX)
        .aggregate_continuations()
        .max_continuation_size(FRAME_BYTES_MAX);
    let ((in_tx, in_rx), (out_tx, mut out_rx)) = session::channels();
    // A child of the upgrade request's span, which carries the caller's trace context.
    let span = tracing::info_span!("signal.session", otel.kind = "server", transport = "websocket");
    tokio::spawn(
        session::run(
            Arc::clone(context.get_ref()),
            admission,
            Transport::WebSocket,
            claims,
            crate::http::sessions::region_preference(&request, None),
            in_rx,
            out_tx,
        )
        .instrument(span),
    );
    // The socket halves are not `Send`: they stay on this worker's thread.
    actix_web::rt::spawn(async move {
        let mut heartbeat = tokio::time::interval(HEARTBEAT_INTERVAL);
        heartbeat.tick().await;
        let mut reading = true;
        loop {
            tokio::select! {
                outgoing = out_rx.recv() => match outgoing {
                    Some(message) => {
                        if ws.text(json::encode_server(&message)).await.is_err() {
                            break;
                        }
                    }
                    None => break, // the session ended
                },
                frame = stream.recv(), if reading => {
                    let item = match frame {
                        Some(Ok(AggregatedMessage::Text(text))) => Some(match json::decode_client(&text) {
                            Ok(message) => Inbound::Message(message),
                            Err(json::DecodeError::Unknown(kind)) => Inbound::Unknown { id: json::peek_id(&text), kind },
                            Err(error) => Inbound::Malformed { id: json::peek_id(&text), reason: error.to_string() },
                        }),
                        Some(Ok(AggregatedMessage::Binary(_))) => {
                            Some(Inbound::Malformed { id: 0, reason: "binary frames are not used: send JSON text frames".into() })
                        }
                        Some(Ok(AggregatedMessage::Ping(payload))) => {
                            let _ = ws.pong(&payload).await;
                            Some(Inbound::Heartbeat)
                        }
                        Some(Ok(AggregatedMessage::Pong(_))) => Some(Inbound::Heartbeat),
                        Some(Err(ProtocolError::Overflow)) => {
                            reading = false;
                            Some(Inbound::TooLarge)
                        }
                        // Closed by the client, or a protocol error: the session sees the end.
                        Some(Ok(AggregatedMessage::Close(_))) | Some(Err(_)) | None => {
                            reading = false;
                            None
                        }
                    };
                    match item {
                        Some(item) => {
                            if in_tx.send(item).await.is_err() {
                                break;
                            }
                        }
                        // Dropping the sender tells the session the client is gone.
                        None => break,
                    }
                }
                _ = heartbeat.tick() => {
                    if ws.ping(b"").await.is_err() {
                        break;
                    }
                }
            }
        }
        drop(in_tx);
        // Deliver what the session still has to say (a fatal error), then close.
        while let Ok(message) = out_rx.try_recv() {
            if ws.text(json::encode_server(&message)).await.is_err() {
                break;
            }
        }
        let _ = ws
            .close(Some(CloseReason {
                code: CloseCode::Normal,
                description: None,
            }))
            .await;
    });
    Ok(response)
}
