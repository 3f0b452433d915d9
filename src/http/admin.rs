//! The admin API (`/admin/v1/...`), authorized by admin-grant tokens. Any node answers every
//! route: cluster-wide views gather from the other nodes over the cluster port
//! (`mesh::overview`), writes go through the store (which forwards them to its leader), and a
//! migration goes to the room's host. Each handler's `#[utoipa::path]` is its entry in the
//! OpenAPI document (`http::openapi`), so the document is generated from these types.

use super::AppState;
use super::problem::ApiError;
use crate::auth::{self, Grant};
use crate::clock;
use crate::mesh::migrate::Moved;
use crate::mesh::overview::{self, Gathered};
use actix_web::{HttpRequest, HttpResponse, web};
use mediamesh_actors::RoomId;
use mediamesh_actors::pii::shown_name;
use mediamesh_actors::room::room_info;
use mediamesh_cluster::{Consistency, ViewerId, ViewerState};
use mediamesh_proto::mesh::v1 as pb;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use utoipa::ToSchema;

pub(super) fn authorize_admin(state: &AppState, request: &HttpRequest) -> Result<(), ApiError> {
    let header = request.headers().get("authorization").and_then(|v| v.to_str().ok());
    let token = auth::bearer(header)?;
    state.keys.authorize(token, Grant::Admin, None)?;
    Ok(())
}

fn room_name(path: &str) -> Result<RoomId, ApiError> {
    RoomId::parse(path)
        .ok_or_else(|| ApiError::BadRequest(format!("invalid room name {path:.64?}: 1 to 128 of A-Z a-z 0-9 _ . -")))
}

/// A node's load, from its last heartbeat.
#[derive(Debug, Serialize, ToSchema)]
pub struct LoadView {
    /// CPU use, a fraction of the node's cores.
    cpu: f32,
    /// Media connections.
    connections: u64,
    /// Media sent, bits per second.
    egress_bps: u64,
    /// Rooms open on the node.
    rooms: u64,
}

/// A node as the store sees it.
#[derive(Debug, Serialize, ToSchema)]
pub struct NodeView {
    id: String,
    region: String,
    /// `alive`, `dead` or `draining`.
    #[schema(pattern = "^(alive|dead|draining)$")]
    state: String,
    /// `voter`, `learner` or `none`.
    #[schema(pattern = "^(voter|learner|none)$")]
    membership: String,
    /// Whether the node leads the store.
    leader: bool,
    http: String,
    cluster: String,
    grpc: String,
    /// Media address and UDP port range, `ip:min-max`.
    media: Option<String>,
    /// TURN relay address.
    turn: Option<String>,
    load: LoadView,
    /// RFC 3339.
    last_heartbeat: String,
}

/// The store's view of the cluster.
#[derive(Debug, Serialize, ToSchema)]
pub struct ClusterView {
    /// The node that answered.
    node: String,
    /// The store's leader.
    leader: Option<String>,
    term: u64,
    commit_index: u64,
    applied_index: u64,
    snapshot_index: u64,
    /// SHA-256 of the replicated state (equal on replicas that applied the same entries); only
    /// with `?digest=true` (it hashes the whole state), else null.
    digest: Option<String>,
    nodes: Vec<NodeView>,
}

fn lowercase(value: impl Serialize) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// Whether to hash the replicated state.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ClusterQuery {
    /// `true`: include the state digest (costly on a large state: it hashes every record).
    digest: Option<bool>,
}

/// Nodes, leader and log of the replicated store.
#[utoipa::path(get, path = "/admin/v1/cluster", tag = "cluster",
    params(ClusterQuery),
    responses(
        (status = 200, description = "The cluster", body = ClusterView),
        (status = 400, description = "Invalid query"),
    ))]
pub async fn cluster(
    state: web::Data<AppState>,
    request: HttpRequest,
    query: web::Query<ClusterQuery>,
) -> Result<HttpResponse, ApiError> {
    authorize_admin(&state, &request)?;
    let with_digest = query.digest.unwrap_or(false);
    let status = state.store.status_with(with_digest);
    let nodes = status
        .nodes
        .iter()
        .map(|node| {
            let load = node.last_load.clone().unwrap_or_default();
            NodeView {
                id: node.id.to_string(),
                region: node.region.clone(),
                state: lowercase(node.state),
                membership: lowercase(node.membership),
                leader: status.leader.as_ref() == Some(&node.id),
                http: node.http_url.clone(),
                cluster: node.cluster_addr.clone(),
                grpc: node.grpc_url.clone(),
                media: (!node.media_ip.is_empty())
                    .then(|| format!("{}:{}-{}", node.media_ip, node.media_ports.0, node.media_ports.1)),
                turn: (!node.turn_addr.is_empty()).then(|| node.turn_addr.clone()),
                load: LoadView {
                    cpu: load.cpu,
                    connections: load.connections,
                    egress_bps: load.egress_bps,
                    rooms: load.rooms,
                },
                last_heartbeat: clock::rfc3339_ms(node.last_heartbeat_ms),
            }
        })
        .collect();
    Ok(HttpResponse::Ok().json(ClusterView {
        node: status.node_id.to_string(),
        leader: status.leader.map(|l| l.to_string()),
        term: status.term,
        commit_index: status.commit_index,
        applied_index: status.applied_index,
        snapshot_index: status.snapshot_index,
        digest: with_digest.then_some(status.digest),
        nodes,
    }))
}

/// A room's sessions on one node.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct NodeRoomView {
    node: String,
    /// Whether this node hosts the room (else it relays it from the host).
    hosted: bool,
    /// The epoch the node knows the room under.
    epoch: u64,
    publishers: u64,
    subscribers: u64,
    /// Signal sessions watching the room there.
    watchers: u64,
    /// Tracks the node pulls from other nodes.
    relayed_tracks: u64,
    /// The publishers' identities (names with Hangul masked, see `--mask-names`).
    publisher_names: Vec<String>,
}

impl NodeRoomView {
    fn new(node: &str, summary: &pb::RoomSummary) -> Self {
        NodeRoomView {
            node: node.to_string(),
            hosted: summary.hosted,
            epoch: summary.epoch,
            publishers: u64::from(summary.publishers),
            subscribers: u64::from(summary.subscribers),
            watchers: u64::from(summary.watchers),
            relayed_tracks: u64::from(summary.relayed_tracks),
            publisher_names: summary.publisher_names.clone(),
        }
    }
}

/// A room across the cluster.
#[derive(Debug, Serialize, ToSchema)]
pub struct RoomSummaryView {
    room: String,
    /// The host (null: not placed; the room is closing on the nodes listed).
    node: Option<String>,
    /// Placement epoch (0: not placed).
    epoch: u64,
    /// The host's region.
    region: Option<String>,
    /// Totals over the nodes that answered.
    publishers: u64,
    subscribers: u64,
    watchers: u64,
    /// The room's sessions per node, by node id.
    nodes: Vec<NodeRoomView>,
}

/// Every room of the cluster.
#[derive(Debug, Serialize, ToSchema)]
pub struct RoomsView {
    /// Sorted by name.
    rooms: Vec<RoomSummaryView>,
    /// Nodes that did not answer in time: their sessions are missing from the counts.
    unreachable: Vec<String>,
}

/// Rooms from the placements in the store plus every node's sessions.
fn room_summaries(
    placements: Vec<mediamesh_cluster::Placement>,
    regions: &HashMap<String, String>,
    gathered: &Gathered,
) -> BTreeMap<String, RoomSummaryView> {
    let mut rooms: BTreeMap<String, RoomSummaryView> = BTreeMap::new();
    let empty = |room: &str| RoomSummaryView {
        room: room.to_string(),
        node: None,
        epoch: 0,
        region: None,
        publishers: 0,
        subscribers: 0,
        watchers: 0,
        nodes: Vec::new(),
    };
    for placement in placements {
        let room = rooms
            .entry(placement.room.to_string())
            .or_insert_with(|| empty(placement.room.as_str()));
        room.region = regions.get(placement.node.as_str()).cloned();
        room.node = Some(placement.node.to_string());
        room.epoch = placement.epoch;
    }
    for (node, overview) in &gathered.nodes {
        for summary in &overview.rooms {
            let room = rooms
                .entry(summary.room.clone())
                .or_insert_with(|| empty(&summary.room));
            let view = NodeRoomView::new(node, summary);
            room.publishers += view.publishers;
            room.subscribers += view.subscribers;
            room.watchers += view.watchers;
            room.nodes.push(view);
        }
    }
    rooms
}

fn regions(state: &AppState) -> HashMap<String, String> {
    state
        .store
        .nodes()
        .into_iter()
        .map(|n| (n.id.to_string(), n.region))
        .collect()
}

/// Every room of the cluster, with its host and its sessions on each node.
#[utoipa::path(get, path = "/admin/v1/rooms", tag = "rooms",
    responses((status = 200, description = "The rooms", body = RoomsView)))]
pub async fn rooms(state: web::Data<AppState>, request: HttpRequest) -> Result<HttpResponse, ApiError> {
    authorize_admin(&state, &request)?;
    let placements = state.store.rooms(Consistency::Local).await?;
    let gathered = overview::gather(&state.mesh).await;
    let rooms = room_summaries(placements, &regions(&state), &gathered);
    Ok(HttpResponse::Ok().json(RoomsView {
        rooms: rooms.into_values().collect(),
        unreachable: gathered.unreachable,
    }))
}

/// How long the room endpoint waits for a linearizable placement read.
const PLACEMENT_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// A session on the answering node.
#[derive(Debug, Serialize, ToSchema)]
pub struct SessionView {
    session: String,
    /// The token's subject (names with Hangul masked, see `--mask-names`).
    identity: String,
    /// Whether its media connection is up.
    connected: bool,
    /// Tracks it publishes, or slots it forwards.
    tracks: u64,
}

/// Where a room lives.
#[derive(Debug, Serialize, ToSchema)]
pub struct PlacementView {
    node: String,
    epoch: u64,
}

/// One room: the answering node's sessions of it, its placement and its sessions per node.
#[derive(Debug, Serialize, ToSchema)]
pub struct RoomView {
    room: String,
    /// The node that answered.
    node: String,
    /// The epoch the answering node knows the room under (0: not open here).
    epoch: u64,
    /// Whether the answering node hosts it.
    hosted: bool,
    relayed_tracks: u64,
    watchers: u64,
    /// Sessions on the answering node.
    publishers: Vec<SessionView>,
    subscribers: Vec<SessionView>,
    /// The store's placement (null: not placed).
    placement: Option<PlacementView>,
    /// The placement came from this node's replica because the majority could not confirm it.
    placement_stale: bool,
    /// The room's sessions on every node that answered.
    nodes: Vec<NodeRoomView>,
    unreachable: Vec<String>,
}

/// One room: placement, the answering node's sessions and every node's counts.
#[utoipa::path(get, path = "/admin/v1/rooms/{room}", tag = "rooms",
    params(("room" = String, Path, description = "Room name", pattern = "^[A-Za-z0-9_.-]{1,128}$")),
    responses(
        (status = 200, description = "The room", body = RoomView),
        (status = 400, description = "Invalid room name"),
        (status = 404, description = "No such room in the cluster"),
    ))]
pub async fn room(
    state: web::Data<AppState>,
    request: HttpRequest,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    authorize_admin(&state, &request)?;
    let room = room_name(&path)?;
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
    let gathered = overview::gather(&state.mesh).await;
    let nodes: Vec<NodeRoomView> = gathered
        .nodes
        .iter()
        .flat_map(|(node, overview)| {
            overview
                .rooms
                .iter()
                .filter(|r| r.room == room.as_str())
                .map(|r| NodeRoomView::new(node, r))
        })
        .collect();
    if placement.is_none() && info.is_none() && nodes.is_empty() {
        return Err(ApiError::NotFound(format!("no room {room} in the cluster")));
    }
    let sessions = |list: &[mediamesh_actors::room::SessionInfo]| -> Vec<SessionView> {
        list.iter()
            .map(|s| SessionView {
                session: s.session.clone(),
                identity: shown_name(&s.identity, state.mask_names),
                connected: s.connected,
                tracks: s.tracks as u64,
            })
            .collect()
    };
    let view = RoomView {
        room: room.to_string(),
        node: state.node_id.clone(),
        epoch: info.as_ref().map_or(0, |i| i.epoch),
        hosted: info.as_ref().is_some_and(|i| i.hosted),
        relayed_tracks: info.as_ref().map_or(0, |i| i.relayed_tracks as u64),
        watchers: info.as_ref().map_or(0, |i| i.watchers as u64),
        publishers: info.as_ref().map(|i| sessions(&i.publishers)).unwrap_or_default(),
        subscribers: info.as_ref().map(|i| sessions(&i.subscribers)).unwrap_or_default(),
        placement: placement.map(|p| PlacementView {
            node: p.node.to_string(),
            epoch: p.epoch,
        }),
        placement_stale: stale,
        nodes,
        unreachable: gathered.unreachable,
    };
    Ok(HttpResponse::Ok().json(view))
}

/// Where to move a room.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MigrateBody {
    /// The target node's id.
    #[schema(min_length = 1, max_length = 128)]
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

/// Moves a room to another node while its viewers watch; answers when the room's clients have
/// moved. Run by the room's host; any node forwards it there.
#[utoipa::path(post, path = "/admin/v1/rooms/{room}/migrate", tag = "rooms",
    params(("room" = String, Path, description = "Room name", pattern = "^[A-Za-z0-9_.-]{1,128}$")),
    request_body(content = MigrateBody, content_type = "application/json"),
    responses(
        (status = 200, description = "The room moved", body = Moved),
        (status = 400, description = "Invalid room name or body"),
        (status = 404, description = "The room is not placed on any node, or the target node is not in the cluster"),
        (status = 409, description = "The room is being migrated or is on the target already, the target is not alive, or the room's host changed"),
        (status = 413, description = "Body too large"),
        (status = 415, description = "Body is not application/json"),
    ))]
pub async fn migrate(
    state: web::Data<AppState>,
    request: HttpRequest,
    path: web::Path<String>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    authorize_admin(&state, &request)?;
    let room = room_name(&path)?;
    let body: MigrateBody = json_body(&state, &request, payload).await?;
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
        let request = pb::MigrateRequest {
            room: room.to_string(),
            to: body.to.clone(),
        };
        let reply = client
            .migrate(crate::mesh::traced(request))
            .await
            .map_err(status_error)?
            .into_inner();
        Moved {
            room: room.to_string(),
            from: placement.node.as_str().to_string(),
            to: reply.to,
            epoch: reply.epoch,
            elapsed_ms: reply.elapsed_ms,
        }
    };
    Ok(HttpResponse::Ok().json(moved))
}

/// A drain that started.
#[derive(Debug, Serialize, ToSchema)]
pub struct DrainView {
    node: String,
    draining: bool,
}

/// Moves every room and client off a node within its drain deadline; the node then leaves the
/// cluster and stops. Answers once the drain started.
#[utoipa::path(post, path = "/admin/v1/nodes/{id}/drain", tag = "cluster",
    params(("id" = String, Path, description = "Node id")),
    responses(
        (status = 202, description = "The drain started", body = DrainView),
        (status = 404, description = "No such node"),
        (status = 409, description = "The node is draining already"),
    ))]
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
        let request = pb::DrainRequest { node: node.clone() };
        client.drain(request).await.map_err(status_error)?;
    }
    Ok(HttpResponse::Accepted().json(DrainView { node, draining: true }))
}

/// A migration (the source node's record).
#[derive(Debug, Serialize, ToSchema)]
pub struct MigrationView {
    room: String,
    from: String,
    to: String,
    /// RFC 3339.
    started_at: String,
    /// RFC 3339; null while in flight.
    finished_at: Option<String>,
    elapsed_ms: u64,
    /// The room's new epoch (0 unless it moved).
    epoch: u64,
    /// Whether it moved (false while in flight).
    ok: bool,
    /// Why it failed.
    error: Option<String>,
}

impl From<&pb::MigrationRecord> for MigrationView {
    fn from(r: &pb::MigrationRecord) -> Self {
        MigrationView {
            room: r.room.clone(),
            from: r.from.clone(),
            to: r.to.clone(),
            started_at: clock::rfc3339_ms(r.started_at_ms),
            finished_at: (r.finished_at_ms != 0).then(|| clock::rfc3339_ms(r.finished_at_ms)),
            elapsed_ms: r.elapsed_ms,
            epoch: r.epoch,
            ok: r.ok,
            error: (!r.error.is_empty()).then(|| r.error.clone()),
        }
    }
}

/// Migrations of the whole cluster.
#[derive(Debug, Serialize, ToSchema)]
pub struct MigrationsView {
    /// Oldest first.
    in_flight: Vec<MigrationView>,
    /// Newest first; each node remembers its last 20.
    recent: Vec<MigrationView>,
    unreachable: Vec<String>,
}

/// Migrations in flight and recently finished, on every node.
#[utoipa::path(get, path = "/admin/v1/migrations", tag = "rooms",
    responses((status = 200, description = "The migrations", body = MigrationsView)))]
pub async fn migrations(state: web::Data<AppState>, request: HttpRequest) -> Result<HttpResponse, ApiError> {
    authorize_admin(&state, &request)?;
    let gathered = overview::gather(&state.mesh).await;
    let mut in_flight: Vec<&pb::MigrationRecord> =
        gathered.nodes.iter().flat_map(|(_, o)| o.in_flight.iter()).collect();
    in_flight.sort_by_key(|r| (r.started_at_ms, r.room.clone()));
    let mut recent: Vec<&pb::MigrationRecord> = gathered.nodes.iter().flat_map(|(_, o)| o.recent.iter()).collect();
    recent.sort_by_key(|r| std::cmp::Reverse(r.finished_at_ms));
    Ok(HttpResponse::Ok().json(MigrationsView {
        in_flight: in_flight.into_iter().map(MigrationView::from).collect(),
        recent: recent.into_iter().map(MigrationView::from).collect(),
        unreachable: gathered.unreachable,
    }))
}

/// How a read is served.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ReadQuery {
    /// `local` reads this replica's state without a quorum round trip; default linearizable.
    #[param(pattern = "^(linearizable|local)$")]
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
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ViewerUpdate {
    /// The room watched.
    #[schema(min_length = 1, max_length = 128)]
    room: String,
    /// The writing session [default: the stored state's, else "admin"]. The stored session
    /// keeps the viewer; another one takes it over (the live session, if any, ends with
    /// `replaced` and its client resumes).
    #[serde(default)]
    session: Option<String>,
    /// The node serving the viewer [default: the answering node].
    #[serde(default)]
    node: Option<String>,
    /// Display name; kept masked when it has Hangul (see `--mask-names`).
    #[serde(default)]
    display_name: Option<String>,
    #[serde(default)]
    position_ms: u64,
    /// Track ids (at most 64).
    #[serde(default)]
    subscriptions: Vec<String>,
    /// Layer per track (at most 64).
    #[serde(default)]
    layers: BTreeMap<String, String>,
}

/// Subscriptions and layers one viewer state may hold.
const VIEWER_SUBSCRIPTIONS_MAX: usize = 64;

/// A viewer's resumable state.
#[derive(Debug, Serialize, ToSchema)]
pub struct ViewerView {
    viewer: String,
    room: String,
    node: String,
    session: String,
    /// As kept in the store (masked when it has Hangul, see `--mask-names`); null: none.
    display_name: Option<String>,
    position_ms: u64,
    subscriptions: Vec<String>,
    layers: BTreeMap<String, String>,
    /// RFC 3339.
    updated_at: String,
    /// RFC 3339.
    expires_at: String,
    updated_at_ms: u64,
    expires_at_ms: u64,
    /// Raft index of the write that produced it.
    revision: u64,
    /// Session generation: one more per resume; older generations' writes are ignored.
    generation: u64,
}

impl From<&ViewerState> for ViewerView {
    fn from(viewer: &ViewerState) -> Self {
        ViewerView {
            viewer: viewer.viewer.to_string(),
            room: viewer.room.to_string(),
            node: viewer.node.to_string(),
            session: viewer.session.clone(),
            display_name: (!viewer.display_name.is_empty()).then(|| viewer.display_name.clone()),
            position_ms: viewer.position_ms,
            subscriptions: viewer.subscriptions.clone(),
            layers: viewer.layers.clone(),
            updated_at: clock::rfc3339_ms(viewer.updated_at_ms),
            expires_at: clock::rfc3339_ms(viewer.expires_at_ms),
            updated_at_ms: viewer.updated_at_ms,
            expires_at_ms: viewer.expires_at_ms,
            revision: viewer.revision,
            generation: viewer.generation,
        }
    }
}

fn viewer_id(path: &str) -> Result<ViewerId, ApiError> {
    let id = ViewerId(path.to_string());
    id.validate().map_err(ApiError::BadRequest)?;
    Ok(id)
}

/// A viewer's state.
#[utoipa::path(get, path = "/admin/v1/viewers/{viewer}", tag = "viewers",
    params(("viewer" = String, Path, description = "Viewer id"), ReadQuery),
    responses(
        (status = 200, description = "The viewer's state", body = ViewerView),
        (status = 400, description = "Invalid viewer id or consistency"),
        (status = 404, description = "No state for this viewer"),
    ))]
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
    Ok(HttpResponse::Ok().json(ViewerView::from(&viewer)))
}

/// Writes a viewer's state; answers after the write is committed.
#[utoipa::path(put, path = "/admin/v1/viewers/{viewer}", tag = "viewers",
    params(("viewer" = String, Path, description = "Viewer id")),
    request_body(content = ViewerUpdate, content_type = "application/json"),
    responses(
        (status = 200, description = "The stored state", body = ViewerView),
        (status = 400, description = "Invalid viewer id or body"),
        (status = 409, description = "The store refused the write, or a resume took the viewer over meanwhile"),
        (status = 413, description = "Body too large"),
        (status = 415, description = "Body is not application/json"),
    ))]
pub async fn viewer_put(
    state: web::Data<AppState>,
    request: HttpRequest,
    path: web::Path<String>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    authorize_admin(&state, &request)?;
    let id = viewer_id(&path)?;
    let update: ViewerUpdate = json_body(&state, &request, payload).await?;
    if update.subscriptions.len() > VIEWER_SUBSCRIPTIONS_MAX || update.layers.len() > VIEWER_SUBSCRIPTIONS_MAX {
        return Err(ApiError::BadRequest(format!(
            "at most {VIEWER_SUBSCRIPTIONS_MAX} subscriptions and layers"
        )));
    }
    // The operator writes as the stored session (in log order with its writes), or takes the
    // viewer over with another one (one generation more).
    let stored = state.store.viewer(&id, Consistency::Local).await?;
    let (session, generation) = match (update.session, stored) {
        (Some(session), Some(stored)) if session != stored.session => (session, stored.generation + 1),
        (session, Some(stored)) => (session.unwrap_or(stored.session), stored.generation),
        (session, None) => (session.unwrap_or_else(|| "admin".into()), 0),
    };
    let viewer = ViewerState {
        viewer: id,
        room: mediamesh_cluster::RoomId(update.room),
        node: mediamesh_cluster::NodeId(update.node.unwrap_or_else(|| state.node_id.clone())),
        session: session.clone(),
        // The raw name never reaches the store when it is to be masked.
        display_name: update
            .display_name
            .map(|name| shown_name(&name, state.mask_names))
            .unwrap_or_default(),
        position_ms: update.position_ms,
        subscriptions: update.subscriptions,
        layers: update.layers,
        updated_at_ms: 0,
        expires_at_ms: 0,
        revision: 0,
        generation,
    };
    let stored = state.store.upsert_viewer(viewer).await?;
    if stored.session != session || stored.generation != generation {
        return Err(ApiError::Conflict(format!(
            "a resume took the viewer over meanwhile (session generation {}); read it and write again",
            stored.generation
        )));
    }
    Ok(HttpResponse::Ok().json(ViewerView::from(&stored)))
}

/// Deletes a viewer's state.
#[utoipa::path(delete, path = "/admin/v1/viewers/{viewer}", tag = "viewers",
    params(("viewer" = String, Path, description = "Viewer id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "Invalid viewer id"),
        (status = 404, description = "No state for this viewer"),
    ))]
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

/// Which day's usage.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UsageQuery {
    /// A KST (UTC+9) calendar day, `YYYY-MM-DD`.
    #[param(format = Date)]
    day: Option<String>,
}

/// One room's viewer time on a day.
#[derive(Debug, Serialize, ToSchema)]
pub struct UsageRoomView {
    room: String,
    viewer_minutes: f64,
    viewer_ms: u64,
    /// Viewer sessions with time in the room that day.
    sessions: u64,
}

/// Viewer-minutes per room for one KST day.
#[derive(Debug, Serialize, ToSchema)]
pub struct UsageView {
    day: String,
    timezone: String,
    /// The day's span in UTC, RFC 3339, `[from, to)`.
    from: String,
    to: String,
    /// Sorted by room.
    rooms: Vec<UsageRoomView>,
    total_viewer_minutes: f64,
}

/// Viewer-minutes per room for one day in KST (UTC+9), from the replicated usage ledger. Nodes
/// add their viewers' time every `--usage-flush-ms`, split at KST midnights.
#[utoipa::path(get, path = "/admin/v1/usage", tag = "usage",
    params(UsageQuery),
    responses(
        (status = 200, description = "The day's usage", body = UsageView),
        (status = 400, description = "Missing or invalid day"),
    ))]
pub async fn usage(
    state: web::Data<AppState>,
    request: HttpRequest,
    query: web::Query<UsageQuery>,
) -> Result<HttpResponse, ApiError> {
    authorize_admin(&state, &request)?;
    let day = query
        .day
        .as_deref()
        .ok_or_else(|| ApiError::BadRequest("give the day: ?day=YYYY-MM-DD (KST)".into()))?;
    let (from, to) = clock::kst_day_span(day)
        .ok_or_else(|| ApiError::BadRequest(format!("day {day:.16?} is not a calendar day YYYY-MM-DD")))?;
    let records = state.store.usage(day, Consistency::Linearizable).await?;
    let rooms: Vec<UsageRoomView> = records
        .into_iter()
        .map(|r| UsageRoomView {
            room: r.room.to_string(),
            viewer_minutes: r.viewer_ms as f64 / 60_000.0,
            viewer_ms: r.viewer_ms,
            sessions: r.sessions,
        })
        .collect();
    Ok(HttpResponse::Ok().json(UsageView {
        day: day.to_string(),
        timezone: "UTC+09:00 (KST)".into(),
        from: clock::rfc3339_ms(from),
        to: clock::rfc3339_ms(to),
        // A fold from +0.0: an empty `sum()` of floats is -0.0.
        total_viewer_minutes: rooms.iter().fold(0.0, |total, r| total + r.viewer_minutes),
        rooms,
    }))
}

/// Body of `POST /admin/v1/turn/rotate` (all optional).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RotateBody {
    /// The new secret (16 to 512 characters); generated when absent. Setting it lets an
    /// operator share it with other TURN servers (coturn `static-auth-secret`).
    #[schema(min_length = 16, max_length = 512)]
    secret: Option<String>,
}

/// When the TURN secret changed.
#[derive(Debug, Serialize, ToSchema)]
pub struct RotatedView {
    /// RFC 3339.
    rotated_at: String,
    rotated_at_ms: u64,
}

/// A new TURN secret; the previous one stays valid for `--turn-secret-grace-ms`.
#[utoipa::path(post, path = "/admin/v1/turn/rotate", tag = "turn",
    request_body(content = Option<RotateBody>, content_type = "application/json"),
    responses(
        (status = 200, description = "Rotated", body = RotatedView),
        (status = 400, description = "Invalid body or secret"),
        (status = 413, description = "Body too large"),
    ))]
pub async fn turn_rotate(
    state: web::Data<AppState>,
    request: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    authorize_admin(&state, &request)?;
    let body = super::read_body(&request, payload, state.body_bytes_max).await?;
    let body: RotateBody = if body.is_empty() {
        RotateBody::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest(format!("body: {e}")))?
    };
    if let Some(secret) = &body.secret
        && !(16..=mediamesh_cluster::TURN_SECRET_BYTES_MAX).contains(&secret.chars().count())
    {
        return Err(ApiError::BadRequest(format!(
            "secret must be 16 to {} characters",
            mediamesh_cluster::TURN_SECRET_BYTES_MAX
        )));
    }
    let secrets = crate::turn::rotate(&state.store, body.secret).await?;
    if let Some((relay, _)) = &state.turn {
        let _ = relay.send(mediamesh_actors::turn::TurnRequest::Refresh).await;
    }
    Ok(HttpResponse::Ok().json(RotatedView {
        rotated_at: clock::rfc3339_ms(secrets.rotated_at_ms),
        rotated_at_ms: secrets.rotated_at_ms,
    }))
}

/// A JSON request body: `application/json`, within the node's body limit, of type `T`.
async fn json_body<T: serde::de::DeserializeOwned>(
    state: &AppState,
    request: &HttpRequest,
    payload: web::Payload,
) -> Result<T, ApiError> {
    super::require_content_type(request, "application/json")?;
    let body = super::read_body(request, payload, state.body_bytes_max).await?;
    serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))
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

/// `POST /admin/v1/test/partition` (`--test-faults` only; not in the OpenAPI document):
/// `{"block": ["node", ...]}` drops this node's cluster traffic to those nodes; give each side
/// its half to cut the cluster in two.
pub async fn partition(
    state: web::Data<AppState>,
    request: HttpRequest,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    authorize_admin(&state, &request)?;
    require_test_faults(&state)?;
    let body: PartitionBody = serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest(format!("body: {e}")))?;
    let ids: Vec<u64> = body
        .block
        .iter()
        .map(|id| mediamesh_cluster::raft_id_for(&mediamesh_cluster::NodeId::new(id.clone())))
        .collect();
    state.store.fault_injector().block(&ids);
    tracing::warn!(blocked = ?body.block, "test fault: cluster traffic to these nodes is dropped");
    Ok(HttpResponse::Ok().json(serde_json::json!({ "blocked": body.block })))
}

/// `DELETE /admin/v1/test/partition` (`--test-faults` only): heals every fault on this node.
pub async fn heal(state: web::Data<AppState>, request: HttpRequest) -> Result<HttpResponse, ApiError> {
    authorize_admin(&state, &request)?;
    require_test_faults(&state)?;
    state.store.fault_injector().heal();
    tracing::warn!("test fault healed");
    Ok(HttpResponse::NoContent().finish())
}
