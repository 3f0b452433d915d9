//! The admin API (`/admin/v1/...`), authorized by admin-grant tokens.

use super::AppState;
use super::problem::ApiError;
use crate::auth::{self, Grant};
use crate::clock;
use actix_web::{HttpRequest, HttpResponse, web};
use mediamesh_actors::RoomId;
use mediamesh_actors::room::room_info;
use mediamesh_cluster::{Consistency, ViewerId, ViewerState};
use serde::Deserialize;
use serde_json::json;
use std::collections::BTreeMap;

fn authorize_admin(state: &AppState, request: &HttpRequest) -> Result<(), ApiError> {
    let header = request.headers().get("authorization").and_then(|v| v.to_str().ok());
    let token = auth::bearer(header)?;
    state.keys.authorize(token, Grant::Admin, None)?;
    Ok(())
}

/// `GET /admin/v1/rooms`
pub async fn rooms(state: web::Data<AppState>, request: HttpRequest) -> Result<HttpResponse, ApiError> {
    authorize_admin(&state, &request)?;
    let mut rooms = Vec::new();
    for (_, addr) in state.rooms.list() {
        if let Some(info) = room_info(&addr).await {
            rooms.push(info);
        }
    }
    Ok(HttpResponse::Ok().json(json!({ "rooms": rooms })))
}

/// How long the room endpoint waits for a linearizable placement read.
const PLACEMENT_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// `GET /admin/v1/rooms/{room}`: the room on this node (its sessions here), with its placement
/// in the directory (`placement.node` hosts it under `placement.epoch`).
pub async fn room(
    state: web::Data<AppState>,
    request: HttpRequest,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    authorize_admin(&state, &request)?;
    let not_found = || ApiError::NotFound(format!("no room {:.128?} in the cluster", path.as_str()));
    let room = RoomId::parse(&path).ok_or_else(not_found)?;
    // A node cut off from the majority cannot confirm a linearizable read: it answers from its
    // own replica then, and says so (`placement_stale`).
    let id = mediamesh_cluster::RoomId::new(room.to_string());
    let confirmed =
        tokio::time::timeout(PLACEMENT_READ_TIMEOUT, state.store.room(&id, Consistency::Linearizable)).await;
    let (placement, stale) = match confirmed {
        Ok(Ok(placement)) => (placement, false),
        _ => (state.store.room(&id, Consistency::Local).await?, true),
    };
    let info = match state.rooms.get(&room) {
        Some(addr) => room_info(&addr).await,
        None => None,
    };
    if placement.is_none() && info.is_none() {
        return Err(not_found());
    }
    let mut body = match info {
        Some(info) => serde_json::to_value(info).unwrap_or_default(),
        None => {
            json!({ "room": room.as_str(), "node": state.node_id, "hosted": false, "publishers": [], "subscribers": [] })
        }
    };
    if let Some(placement) = placement {
        body["placement"] = json!({ "node": placement.node.as_str(), "epoch": placement.epoch });
    }
    body["placement_stale"] = json!(stale);
    Ok(HttpResponse::Ok().json(body))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateBody {
    to: String,
}

fn status_error(status: tonic::Status) -> ApiError {
    use tonic::Code;
    let message = status.message().to_string();
    match status.code() {
        Code::InvalidArgument => ApiError::BadRequest(message),
        Code::NotFound => ApiError::NotFound(message),
        Code::FailedPrecondition | Code::Aborted | Code::AlreadyExists => ApiError::Conflict(message),
        _ => ApiError::Unavailable(message),
    }
}

/// `POST /admin/v1/rooms/{room}/migrate` with `{"to": "<node id>"}`: moves the room to that
/// node (run by the room's host; any node forwards it there). Answers when the room's clients
/// have moved: `{room, from, to, epoch, elapsed_ms}`.
pub async fn migrate(
    state: web::Data<AppState>,
    request: HttpRequest,
    path: web::Path<String>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    authorize_admin(&state, &request)?;
    let room = RoomId::parse(&path).ok_or_else(|| ApiError::BadRequest("invalid room name".into()))?;
    let body: MigrateBody = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("body must be {{\"to\": \"<node id>\"}}: {e}")))?;
    let placement = state
        .store
        .room(
            &mediamesh_cluster::RoomId::new(room.to_string()),
            Consistency::Linearizable,
        )
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("room {room} is not placed on any node")))?;
    let moved = if placement.node.as_str() == state.node_id {
        crate::mesh::migrate::migrate(&state.mesh, &room, &body.to)
            .await
            .map_err(|e| status_error(e.into()))?
    } else {
        let mut client = state
            .mesh
            .client(placement.node.as_str())
            .map_err(ApiError::Unavailable)?;
        let request = mediamesh_proto::mesh::v1::MigrateRequest {
            room: room.to_string(),
            to: body.to.clone(),
        };
        let reply = client
            .migrate(crate::mesh::traced(request))
            .await
            .map_err(status_error)?
            .into_inner();
        crate::mesh::migrate::Moved {
            room: room.to_string(),
            from: placement.node.as_str().to_string(),
            to: reply.to,
            epoch: reply.epoch,
            elapsed_ms: reply.elapsed_ms,
        }
    };
    Ok(HttpResponse::Ok().json(moved))
}

/// `POST /admin/v1/nodes/{id}/drain`: the node moves every room and client off within its drain
/// deadline, leaves the cluster, and stops. Answers `202 Accepted` once the drain started.
pub async fn drain(
    state: web::Data<AppState>,
    request: HttpRequest,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    authorize_admin(&state, &request)?;
    let node = path.into_inner();
    if node == state.node_id {
        if !(state.start_drain)() {
            return Err(ApiError::Conflict("this node is already draining".into()));
        }
    } else {
        let known = state.store.nodes().iter().any(|n| n.id.as_str() == node);
        if !known {
            return Err(ApiError::NotFound(format!("no node {node:.64?} in the cluster")));
        }
        let mut client = state.mesh.client(&node).map_err(ApiError::Unavailable)?;
        let request = mediamesh_proto::mesh::v1::DrainRequest { node: node.clone() };
        client.drain(request).await.map_err(status_error)?;
    }
    Ok(HttpResponse::Accepted().json(json!({ "node": node, "draining": true })))
}

/// `GET /admin/v1/cluster`: the store's view: leader, term, commit index, nodes, digest.
pub async fn cluster(state: web::Data<AppState>, request: HttpRequest) -> Result<HttpResponse, ApiError> {
    authorize_admin(&state, &request)?;
    let status = state.store.status();
    let nodes: Vec<_> = status
        .nodes
        .iter()
        .map(|node| {
            json!({
                "id": node.id,
                "region": node.region,
                "state": node.state,
                "membership": node.membership,
                "http": node.http_url,
                "cluster": node.cluster_addr,
                "grpc": node.grpc_url,
                "media": (!node.media_ip.is_empty())
                    .then(|| format!("{}:{}-{}", node.media_ip, node.media_ports.0, node.media_ports.1)),
                "turn": (!node.turn_addr.is_empty()).then_some(&node.turn_addr),
                "load": {
                    "cpu": node.last_load.as_ref().map_or(0.0, |l| l.cpu),
                    "connections": node.last_load.as_ref().map_or(0, |l| l.connections),
                    "egress_bps": node.last_load.as_ref().map_or(0, |l| l.egress_bps),
                    "rooms": node.last_load.as_ref().map_or(0, |l| l.rooms),
                },
                "last_heartbeat": clock::rfc3339_ms(node.last_heartbeat_ms),
            })
        })
        .collect();
    Ok(HttpResponse::Ok().json(json!({
        "node": status.node_id,
        "leader": status.leader,
        "term": status.term,
        "commit_index": status.commit_index,
        "applied_index": status.applied_index,
        "snapshot_index": status.snapshot_index,
        "digest": status.digest,
        "nodes": nodes,
    })))
}

#[derive(Debug, Deserialize)]
pub struct ReadQuery {
    /// `local` reads this replica's state without a quorum round trip; default linearizable.
    consistency: Option<String>,
}

fn consistency(query: &ReadQuery) -> Result<Consistency, ApiError> {
    match query.consistency.as_deref() {
        None | Some("linearizable") => Ok(Consistency::Linearizable),
        Some("local") => Ok(Consistency::Local),
        Some(other) => Err(ApiError::BadRequest(format!(
            "consistency must be linearizable or local, not {other:.20?}"
        ))),
    }
}

/// The body of `PUT /admin/v1/viewers/{viewer}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ViewerUpdate {
    room: String,
    #[serde(default)]
    session: Option<String>,
    #[serde(default)]
    node: Option<String>,
    #[serde(default)]
    position_ms: u64,
    #[serde(default)]
    subscriptions: Vec<String>,
    #[serde(default)]
    layers: BTreeMap<String, String>,
}

/// Subscriptions and layers one viewer state may hold.
const VIEWER_SUBSCRIPTIONS_MAX: usize = 64;

fn viewer_json(viewer: &ViewerState) -> serde_json::Value {
    json!({
        "viewer": viewer.viewer,
        "room": viewer.room,
        "node": viewer.node,
        "session": viewer.session,
        "position_ms": viewer.position_ms,
        "subscriptions": viewer.subscriptions,
        "layers": viewer.layers,
        "updated_at": clock::rfc3339_ms(viewer.updated_at_ms),
        "expires_at": clock::rfc3339_ms(viewer.expires_at_ms),
        "updated_at_ms": viewer.updated_at_ms,
        "expires_at_ms": viewer.expires_at_ms,
        "revision": viewer.revision,
    })
}

fn viewer_id(path: &str) -> Result<ViewerId, ApiError> {
    let id = ViewerId(path.to_string());
    id.validate().map_err(ApiError::BadRequest)?;
    Ok(id)
}

/// `GET /admin/v1/viewers/{viewer}`
pub async fn viewer_get(
    state: web::Data<AppState>,
    request: HttpRequest,
    path: web::Path<String>,
    query: web::Query<ReadQuery>,
) -> Result<HttpResponse, ApiError> {
    authorize_admin(&state, &request)?;
    let id = viewer_id(&path)?;
    let viewer = state.store.viewer(&id, consistency(&query)?).await?;
    let viewer = viewer.ok_or_else(|| ApiError::NotFound(format!("no viewer state for {:.64?}", id.0)))?;
    Ok(HttpResponse::Ok().json(viewer_json(&viewer)))
}

/// `PUT /admin/v1/viewers/{viewer}`: answers after the write is committed.
pub async fn viewer_put(
    state: web::Data<AppState>,
    request: HttpRequest,
    path: web::Path<String>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    authorize_admin(&state, &request)?;
    let id = viewer_id(&path)?;
    super::require_content_type(&request, "application/json")?;
    let body = super::read_body(&request, payload, state.body_bytes_max).await?;
    let update: ViewerUpdate =
        serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest(format!("invalid viewer JSON: {e}")))?;
    if update.subscriptions.len() > VIEWER_SUBSCRIPTIONS_MAX || update.layers.len() > VIEWER_SUBSCRIPTIONS_MAX {
        return Err(ApiError::BadRequest(format!(
            "at most {VIEWER_SUBSCRIPTIONS_MAX} subscriptions and layers"
        )));
    }
    let viewer = ViewerState {
        viewer: id,
        room: mediamesh_cluster::RoomId(update.room),
        node: mediamesh_cluster::NodeId(update.node.unwrap_or_else(|| state.node_id.clone())),
        session: update.session.unwrap_or_else(|| "admin".into()),
        position_ms: update.position_ms,
        subscriptions: update.subscriptions,
        layers: update.layers,
        updated_at_ms: 0,
        expires_at_ms: 0,
        revision: 0,
    };
    let stored = state.store.upsert_viewer(viewer).await?;
    Ok(HttpResponse::Ok().json(viewer_json(&stored)))
}

/// `DELETE /admin/v1/viewers/{viewer}`
pub async fn viewer_delete(
    state: web::Data<AppState>,
    request: HttpRequest,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    authorize_admin(&state, &request)?;
    let id = viewer_id(&path)?;
    if state.store.delete_viewer(id.clone()).await? {
        Ok(HttpResponse::NoContent().finish())
    } else {
        Err(ApiError::NotFound(format!("no viewer state for {:.64?}", id.0)))
    }
}

/// Body of `POST /admin/v1/turn/rotate` (all optional).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotateBody {
    /// The new secret (16 to 512 characters); generated when absent. Setting it lets an
    /// operator share it with other TURN servers (coturn `static-auth-secret`).
    secret: Option<String>,
}

/// `POST /admin/v1/turn/rotate`: a new TURN secret; the previous one stays valid for
/// `--turn-secret-grace-ms`.
pub async fn turn_rotate(
    state: web::Data<AppState>,
    request: HttpRequest,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    authorize_admin(&state, &request)?;
    let body: RotateBody = if body.is_empty() {
        RotateBody::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest(format!("body: {e}")))?
    };
    if let Some(secret) = &body.secret
        && !(16..=mediamesh_cluster::TURN_SECRET_BYTES_MAX).contains(&secret.len())
    {
        return Err(ApiError::BadRequest(format!(
            "secret must be 16 to {} bytes",
            mediamesh_cluster::TURN_SECRET_BYTES_MAX
        )));
    }
    let secrets = crate::turn::rotate(&state.store, body.secret).await?;
    if let Some((relay, _)) = &state.turn {
        let _ = relay.send(mediamesh_actors::turn::TurnRequest::Refresh).await;
    }
    Ok(HttpResponse::Ok().json(json!({
        "rotated_at": clock::rfc3339_ms(secrets.rotated_at_ms),
        "rotated_at_ms": secrets.rotated_at_ms,
    })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartitionBody {
    /// Node ids this node stops talking to (raft, forwarded proposals).
    block: Vec<String>,
}

fn require_test_faults(state: &AppState) -> Result<(), ApiError> {
    if state.test_faults {
        Ok(())
    } else {
        Err(ApiError::NotFound("the node was not started with --test-faults".into()))
    }
}

/// `POST /admin/v1/test/partition` (`--test-faults` only): `{"block": ["node", ...]}` drops this
/// node's cluster traffic to those nodes; give each side its half to cut the cluster in two.
pub async fn partition(
    state: web::Data<AppState>,
    request: HttpRequest,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    require_test_faults(&state)?;
    authorize_admin(&state, &request)?;
    let body: PartitionBody = serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest(format!("body: {e}")))?;
    let ids: Vec<u64> = body
        .block
        .iter()
        .map(|id| mediamesh_cluster::raft_id_for(&mediamesh_cluster::NodeId::new(id.clone())))
        .collect();
    state.store.fault_injector().block(&ids);
    tracing::warn!(blocked = ?body.block, "test fault: cluster traffic to these nodes is dropped");
    Ok(HttpResponse::Ok().json(json!({ "blocked": body.block })))
}

/// `DELETE /admin/v1/test/partition` (`--test-faults` only): heals every fault on this node.
pub async fn heal(state: web::Data<AppState>, request: HttpRequest) -> Result<HttpResponse, ApiError> {
    require_test_faults(&state)?;
    authorize_admin(&state, &request)?;
    state.store.fault_injector().heal();
    tracing::warn!("test fault healed");
    Ok(HttpResponse::NoContent().finish())
}
