//! WHIP (RFC 9725) and WHEP: one POST creates a session, PATCH trickles or restarts ICE,
//! DELETE ends it. Publish and playback share this code; the kind picks the grant and request.

use super::problem::ApiError;
use super::{AppState, read_body, require_content_type};
use crate::auth::{self, Grant};
use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use mediamesh_actors::media::layer::layer_named;
use mediamesh_actors::room::{RoomReply, RoomRequest, Traced};
use mediamesh_actors::{Access, Identity, RoomError, RoomId, SessionId, SessionKind};
use serde::Deserialize;

const SDP: &str = "application/sdp";
const TRICKLE: &str = "application/trickle-ice-sdpfrag";

#[derive(Debug, Deserialize)]
pub struct PlayQuery {
    layer: Option<String>,
    /// WHEP: a resume token from an earlier session (its layer choice comes back).
    resume: Option<String>,
}

/// The client's region preference: `x-region-preference`, then `x-korean-region`, then the
/// token's `region` claim; `None` places a new room by the region of this node.
pub fn region_preference(request: &HttpRequest, claim: Option<&str>) -> Option<String> {
    let header = |name: &str| request.headers().get(name).and_then(|v| v.to_str().ok());
    mediamesh_cluster::mesh::placement::region_preference(&[
        header("x-region-preference"),
        header("x-korean-region"),
        claim,
    ])
}

fn path_prefix(kind: SessionKind) -> &'static str {
    match kind {
        SessionKind::Publisher => "whip",
        SessionKind::Subscriber => "whep",
    }
}

fn grant(kind: SessionKind) -> Grant {
    match kind {
        SessionKind::Publisher => Grant::Publish,
        SessionKind::Subscriber => Grant::Subscribe,
    }
}

fn room_id(name: &str) -> Result<RoomId, ApiError> {
    RoomId::parse(name).ok_or_else(|| {
        ApiError::BadRequest(format!(
            "invalid room name: 1 to {} characters of A-Z a-z 0-9 _ . -",
            mediamesh_actors::ids::ROOM_NAME_BYTES_MAX
        ))
    })
}

fn claims(state: &AppState, request: &HttpRequest, kind: SessionKind, room: &RoomId) -> Result<auth::Claims, ApiError> {
    let header = request.headers().get("authorization").and_then(|v| v.to_str().ok());
    let token = auth::bearer(header)?;
    Ok(state.keys.authorize(token, grant(kind), Some(room.as_str()))?)
}

fn authorize(state: &AppState, request: &HttpRequest, kind: SessionKind, room: &RoomId) -> Result<Identity, ApiError> {
    claims(state, request, kind, room).map(|claims| Identity(claims.sub))
}

fn parse_layer(query: &PlayQuery) -> Result<Option<u8>, ApiError> {
    let Some(name) = query.layer.as_deref() else {
        return Ok(None);
    };
    layer_named(name)
        .map(Some)
        .ok_or_else(|| ApiError::BadRequest(format!("layer must be low, mid or high, not {name:.20?}")))
}

/// `POST /whip/{room}` and `POST /whep/{room}`.
pub async fn create(
    state: web::Data<AppState>,
    request: HttpRequest,
    path: web::Path<String>,
    query: web::Query<PlayQuery>,
    payload: web::Payload,
    kind: SessionKind,
) -> Result<HttpResponse, ApiError> {
    let room = room_id(&path)?;
    let claims = claims(&state, &request, kind, &room)?;
    let identity = Identity(claims.sub.clone());
    require_content_type(&request, SDP)?;
    let mut layer = match kind {
        SessionKind::Subscriber => parse_layer(&query)?,
        SessionKind::Publisher => None,
    };
    let mut tracks = None;
    if kind == SessionKind::Subscriber
        && let Some(token) = query.resume.as_deref()
        && let Some(signal) = request.app_data::<web::Data<std::sync::Arc<crate::signal::SignalContext>>>()
        && let Some(state) = signal
            .resume_state(token, room.as_str(), &identity.0)
            .await
            .map_err(|refused| ApiError::BadRequest(format!("resume: {refused}")))?
    {
        layer = layer.or_else(|| state.layers.get("video").and_then(|l| layer_named(l)));
        tracks = (!state.subscriptions.is_empty()).then(|| state.subscriptions.clone());
    }
    let region = region_preference(&request, claims.region.as_deref());
    let access = match kind {
        SessionKind::Publisher => Access::Publish,
        SessionKind::Subscriber => Access::View,
    };
    let body = read_body(&request, payload, state.body_bytes_max).await?;
    let offer =
        String::from_utf8(body.to_vec()).map_err(|_| ApiError::BadRequest("the SDP offer is not UTF-8".into()))?;
    mediamesh_actors::sdp::validate_offer(&offer).map_err(RoomError::BadOffer)?;
    let make_request = || match kind {
        SessionKind::Publisher => RoomRequest::Publish {
            identity: identity.clone(),
            offer: offer.clone(),
        },
        SessionKind::Subscriber => RoomRequest::Subscribe {
            identity: identity.clone(),
            offer: offer.clone(),
            layer,
            tracks: tracks.clone(),
        },
    };
    // A room that is closing refuses its mailbox; the second attempt makes a fresh room.
    let mut reply = None;
    for _ in 0..2 {
        let addr = match state.rooms.get_or_create(&room, access, region.as_deref()).await {
            Ok(addr) => addr,
            Err(RoomError::Elsewhere(host)) => {
                // RFC 9725 §4.5: a WHIP endpoint may redirect to the one that serves the room.
                let location = match request.query_string() {
                    "" => format!("{}/{}/{}", host.http_url, path_prefix(kind), room),
                    query => format!("{}/{}/{}?{query}", host.http_url, path_prefix(kind), room),
                };
                return Ok(HttpResponse::TemporaryRedirect()
                    .insert_header(("Location", location))
                    .finish());
            }
            Err(error) => return Err(error.into()),
        };
        match addr.send(Traced::here(make_request())).await {
            Ok(result) => {
                reply = Some(result?);
                break;
            }
            Err(_) => continue,
        }
    }
    let Some(RoomReply::Answer(answer)) = reply else {
        return Err(RoomError::Closing.into());
    };
    let location = format!("/{}/{}/{}", path_prefix(kind), room, answer.session);
    let mut response = HttpResponse::build(StatusCode::CREATED);
    response
        .content_type(SDP)
        .insert_header(("Location", location))
        .insert_header(("ETag", answer.etag));
    // RFC 9725 §4.6: the ICE servers the client may use (for ICE restarts and later sessions).
    if let Some((_, turn)) = &state.turn {
        let region = request
            .headers()
            .get("x-region-preference")
            .and_then(|v| v.to_str().ok())
            .filter(|r| !r.is_empty() && r.len() <= 64);
        for server in turn.ice_servers(&identity.0, region) {
            response.append_header(("Link", crate::turn::link_header(&server)));
        }
    }
    Ok(response.body(answer.sdp))
}

/// `PATCH /whip/{room}/{session}` and the WHEP equivalent.
pub async fn patch(
    state: web::Data<AppState>,
    request: HttpRequest,
    path: web::Path<(String, String)>,
    payload: web::Payload,
    kind: SessionKind,
) -> Result<HttpResponse, ApiError> {
    let (room, session) = path.into_inner();
    let room = room_id(&room)?;
    authorize(&state, &request, kind, &room)?;
    require_content_type(&request, TRICKLE)?;
    let body = read_body(&request, payload, state.body_bytes_max).await?;
    let fragment =
        String::from_utf8(body.to_vec()).map_err(|_| ApiError::BadRequest("the fragment is not UTF-8".into()))?;
    let if_match = request
        .headers()
        .get("if-match")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let addr = state.rooms.get(&room).ok_or(RoomError::UnknownSession)?;
    let reply = addr
        .send(Traced::here(RoomRequest::Patch {
            kind,
            session: SessionId(session),
            if_match,
            fragment,
        }))
        .await
        .map_err(|_| RoomError::UnknownSession)??;
    let RoomReply::Patched(outcome) = reply else {
        return Err(RoomError::UnknownSession.into());
    };
    Ok(match outcome.restart_fragment {
        Some(fragment) => HttpResponse::Ok()
            .content_type(TRICKLE)
            .insert_header(("ETag", outcome.etag))
            .body(fragment),
        None => HttpResponse::NoContent().finish(),
    })
}

/// `DELETE /whip/{room}/{session}` and the WHEP equivalent.
pub async fn delete(
    state: web::Data<AppState>,
    request: HttpRequest,
    path: web::Path<(String, String)>,
    kind: SessionKind,
) -> Result<HttpResponse, ApiError> {
    let (room, session) = path.into_inner();
    let room = room_id(&room)?;
    authorize(&state, &request, kind, &room)?;
    let addr = state.rooms.get(&room).ok_or(RoomError::UnknownSession)?;
    addr.send(Traced::here(RoomRequest::End {
        kind,
        session: SessionId(session),
    }))
    .await
    .map_err(|_| RoomError::UnknownSession)??;
    Ok(HttpResponse::Ok().finish())
}
