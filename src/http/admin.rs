//! The admin API (`/admin/v1/...`), authorized by admin-grant tokens.

use super::AppState;
use super::problem::ApiError;
use crate::auth::{self, Grant};
use actix_web::{HttpRequest, HttpResponse, web};
use mediamesh_actors::room::{RoomReply, RoomRequest};
use mediamesh_actors::{RoomId, RoomInfo};
use serde_json::json;
use std::sync::atomic::Ordering;

fn authorize_admin(state: &AppState, request: &HttpRequest) -> Result<(), ApiError> {
    let header = request.headers().get("authorization").and_then(|v| v.to_str().ok());
    let token = auth::bearer(header)?;
    state.keys.authorize(token, Grant::Admin, None)?;
    Ok(())
}

async fn room_info(addr: &actix::Addr<mediamesh_actors::room::Room>) -> Option<RoomInfo> {
    match addr.send(RoomRequest::Info).await {
        Ok(Ok(RoomReply::Info(info))) => Some(info),
        _ => None,
    }
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

/// `GET /admin/v1/rooms/{room}`
pub async fn room(
    state: web::Data<AppState>,
    request: HttpRequest,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    authorize_admin(&state, &request)?;
    let not_found = || ApiError::NotFound(format!("no room {:.128?} on this node", path.as_str()));
    let room = RoomId::parse(&path).ok_or_else(not_found)?;
    let addr = state.rooms.get(&room).ok_or_else(not_found)?;
    let info = room_info(&addr).await.ok_or_else(not_found)?;
    Ok(HttpResponse::Ok().json(info))
}

/// `GET /admin/v1/cluster`: on a single node, the node itself.
pub async fn cluster(state: web::Data<AppState>, request: HttpRequest) -> Result<HttpResponse, ApiError> {
    authorize_admin(&state, &request)?;
    let stats = &state.rooms.context().stats;
    Ok(HttpResponse::Ok().json(json!({
        "leader": state.node_id,
        "term": 1,
        "commit_index": 0,
        "nodes": [{
            "id": state.node_id,
            "region": state.region,
            "state": "alive",
            "load": {
                "cpu": crate::metrics::process_cpu_seconds(),
                "connections": stats.active_connections.load(Ordering::Relaxed),
            }
        }]
    })))
}
