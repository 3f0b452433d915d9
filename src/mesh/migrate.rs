//! Room migration (DESIGN.md §9) and drain, as this node carries them out. The decisions are
//! the sans-IO cores `mediamesh_cluster::mesh::{migration, drain}`; this module feeds them
//! events and time and performs their actions:
//!
//! 1. handoff: the target gets the room's snapshot and starts relaying the room from this node,
//!    answering once it holds the room's tracks (publishers move make-before-break: the target
//!    relays from here until the publisher has reconnected there);
//! 2. flip: the directory's compare-and-set moves the room to the target under epoch + 1, and
//!    the target is told it hosts the room;
//! 3. clients: this node's room tells its signal sessions `moved` (they resume on the target)
//!    and relays from the target for the WHIP/WHEP sessions that cannot move.

use super::overview::InFlight;
use super::{Mesh, traced};
use mediamesh_actors::room::{RoomReply, RoomRequest, room_info};
use mediamesh_actors::{Access, RoomId};
use mediamesh_cluster::mesh::drain::{Drain, DrainAction, DrainConfig};
use mediamesh_cluster::mesh::flip::{FlipAttempt, FlipResult, FlipStep};
use mediamesh_cluster::mesh::migration::{Migration, MigrationAction, MigrationEvent, MigrationOutcome};
use mediamesh_cluster::mesh::timing;
use mediamesh_cluster::{Consistency, NodeState, StoreError};
use mediamesh_proto::mesh::v1 as pb;
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tracing::Instrument;

/// The target must hold the room's tracks within this long, or the migration is called off.
const HANDOFF_TIMEOUT: Duration = Duration::from_millis(timing::HANDOFF_TIMEOUT_MS);
/// A room made for a handoff stays open this long waiting for its clients.
pub const HANDOFF_HOLD: Duration = Duration::from_millis(timing::HANDOFF_HOLD_MS);
/// How often a running migration looks at its room.
const POLL_INTERVAL: Duration = Duration::from_millis(timing::MIGRATION_POLL_MS);
/// How often a drain looks at its rooms.
const DRAIN_POLL_INTERVAL: Duration = Duration::from_millis(timing::DRAIN_POLL_MS);
/// Most bytes of a room snapshot.
const SNAPSHOT_BYTES_MAX: usize = 64 * 1024;
/// A unary mesh call gives up after this long.
const CALL_TIMEOUT: Duration = Duration::from_millis(timing::CALL_TIMEOUT_MS);

/// What a target needs to restore a room: the room under its epoch, and its tracks (relayed
/// before the flip). bincode behind the store's version byte.
#[derive(Debug, Clone, PartialEq, bincode::Encode, bincode::Decode)]
pub struct RoomSnapshot {
    pub room: String,
    pub epoch: u64,
    pub tracks: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("room {0} is not hosted on this node")]
    NotHostedHere(String),
    /// The target is not in the cluster.
    #[error("{0}")]
    UnknownTarget(String),
    /// The target cannot take the room now: it has it already, or it is not alive.
    #[error("{0}")]
    UnfitTarget(String),
    #[error("migration failed: {0}")]
    Failed(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("room {0} is being migrated already")]
    Busy(String),
}

impl From<MigrateError> for tonic::Status {
    fn from(error: MigrateError) -> Self {
        match &error {
            MigrateError::NotHostedHere(_) | MigrateError::Busy(_) => {
                tonic::Status::failed_precondition(error.to_string())
            }
            MigrateError::UnknownTarget(_) => tonic::Status::not_found(error.to_string()),
            MigrateError::UnfitTarget(_) => tonic::Status::failed_precondition(error.to_string()),
            MigrateError::Failed(_) => tonic::Status::aborted(error.to_string()),
            MigrateError::Unavailable(_) => tonic::Status::unavailable(error.to_string()),
        }
    }
}

/// A finished migration (also the admin API's answer to a migrate).
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct Moved {
    pub room: String,
    pub from: String,
    pub to: String,
    /// The room's epoch on its new host.
    pub epoch: u64,
    pub elapsed_ms: u64,
}

/// Moves `room`, hosted here, to node `to`. Returns when the room's clients have left this
/// node (or the clients' deadline passed). One `room.migrate` span; the target's handoff and
/// promote spans join its trace.
pub async fn migrate(mesh: &Arc<Mesh>, room: &RoomId, to: &str) -> Result<Moved, MigrateError> {
    let span = tracing::info_span!("room.migrate", room = %room, to = %to, epoch = tracing::field::Empty);
    let in_flight = InFlight::begin(mesh, room.as_str(), to).ok_or_else(|| MigrateError::Busy(room.to_string()))?;
    let moved = migrate_in_span(mesh, room, to).instrument(span).await;
    in_flight.finish(moved.as_ref().map(|m| m.epoch).map_err(ToString::to_string));
    moved
}

async fn migrate_in_span(mesh: &Arc<Mesh>, room: &RoomId, to: &str) -> Result<Moved, MigrateError> {
    let registry = mesh
        .registry()
        .map_err(|s| MigrateError::Unavailable(s.message().to_string()))?;
    let addr = registry
        .get_hosted(room)
        .ok_or_else(|| MigrateError::NotHostedHere(room.to_string()))?;
    let info = room_info(&addr)
        .await
        .ok_or_else(|| MigrateError::NotHostedHere(room.to_string()))?;
    if to == mesh.node {
        return Err(MigrateError::UnfitTarget(format!("room {room} is already on {to}")));
    }
    match mesh.store.nodes().iter().find(|n| n.id.as_str() == to) {
        None => return Err(MigrateError::UnknownTarget(format!("no node {to:.64?} in the cluster"))),
        Some(node) if node.state != NodeState::Alive => {
            return Err(MigrateError::UnfitTarget(format!(
                "node {to} is {:?}, not alive",
                node.state
            )));
        }
        Some(_) => {}
    }
    tracing::Span::current().record("epoch", i64::try_from(info.epoch).unwrap_or(i64::MAX));
    let started = Instant::now();
    let now = || started.elapsed().as_millis() as u64 + 1;
    let mut machine = Migration::new(
        mediamesh_cluster::RoomId::new(room.to_string()),
        mediamesh_cluster::NodeId::new(mesh.node.clone()),
        mediamesh_cluster::NodeId::new(to),
        info.epoch,
        timing::HANDOFF_TIMEOUT_MS,
        timing::CLIENTS_DEADLINE_MS,
    );
    let tracks: Vec<String> = match addr.send(RoomRequest::Tracks).await {
        Ok(Ok(RoomReply::Tracks(tracks))) => tracks.into_iter().map(|t| t.id).collect(),
        _ => Vec::new(),
    };
    let snapshot = RoomSnapshot {
        room: room.to_string(),
        epoch: info.epoch,
        tracks,
    };
    tracing::info!(room = %room, to = %to, tracks = snapshot.tracks.len(), viewers = info.watchers, "migration started");
    let mut events: VecDeque<MigrationEvent> = VecDeque::from([MigrationEvent::Start { now_ms: now() }]);
    loop {
        let event = match events.pop_front() {
            Some(event) => event,
            None => {
                tokio::time::sleep(POLL_INTERVAL).await;
                let left = room_info(&addr).await.map_or(0, |info| info.watchers);
                events.push_back(MigrationEvent::SessionsLeft(left));
                MigrationEvent::Tick { now_ms: now() }
            }
        };
        for action in machine.handle(event) {
            match action {
                MigrationAction::SendHandoff { to, epoch } => {
                    let request = pb::HandoffRequest {
                        room: room.to_string(),
                        from: mesh.node.clone(),
                        epoch,
                        snapshot: mediamesh_cluster::codec::encode(&snapshot),
                    };
                    let handed = async {
                        let mut client = mesh.client(to.as_str())?;
                        tokio::time::timeout(HANDOFF_TIMEOUT, client.handoff(traced(request)))
                            .await
                            .map_err(|_| "the target did not take the room in time".to_string())?
                            .map_err(|status| status.message().to_string())
                    };
                    events.push_back(match handed.await {
                        Ok(_) => MigrationEvent::HandoffAccepted,
                        Err(reason) => MigrationEvent::HandoffFailed(reason),
                    });
                }
                MigrationAction::ProposeFlip { expected_epoch, to } => {
                    events.push_back(flip(mesh, room, expected_epoch, to).await);
                }
                MigrationAction::TellClientsMoved { to, epoch } => {
                    if let Ok(mut client) = mesh.client(to.as_str()) {
                        let promote = pb::PromoteRequest {
                            room: room.to_string(),
                            epoch,
                        };
                        if let Err(error) = tokio::time::timeout(CALL_TIMEOUT, client.promote(traced(promote))).await {
                            // The target learns it from the directory anyway (its relay re-locates).
                            tracing::debug!(%error, "promote call timed out");
                        }
                    }
                    if let Some(host) = crate::directory::host_of(&mesh.store, &to, epoch) {
                        let _ = addr.send(RoomRequest::Demote { host }).await;
                    }
                }
                MigrationAction::CloseRemaining | MigrationAction::AbortHandoff { .. } => {
                    // Sessions that cannot move (WHIP/WHEP) stay: the room here relays for them.
                    // An aborted target's relay room closes when its hold ends.
                }
                MigrationAction::Finished(MigrationOutcome::Moved { epoch, elapsed_ms }) => {
                    mesh.stats.migrations_moved.fetch_add(1, Ordering::Relaxed);
                    mesh.stats.migration_seconds.observe(elapsed_ms as f64 / 1000.0);
                    tracing::info!(room = %room, to = %to, epoch, elapsed_ms, "migration done");
                    return Ok(Moved {
                        room: room.to_string(),
                        from: mesh.node.clone(),
                        to: to.to_string(),
                        epoch,
                        elapsed_ms,
                    });
                }
                MigrationAction::Finished(MigrationOutcome::Failed(reason)) => {
                    mesh.stats.migrations_failed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(room = %room, to = %to, %reason, "migration failed");
                    return Err(MigrateError::Failed(reason));
                }
            }
        }
    }
}

/// Proposes the directory flip and learns its outcome: the decisions are
/// `mediamesh_cluster::mesh::flip::FlipAttempt`'s (unknown outcomes proposed again every
/// `FLIP_RETRY_MS` until `FLIP_OUTCOME_DEADLINE_MS`, our own earlier attempt told from another
/// move; simulator seed 16); this does the proposals, the waits and the final replica read.
async fn flip(
    mesh: &Arc<Mesh>,
    room: &RoomId,
    expected_epoch: Option<u64>,
    to: mediamesh_cluster::NodeId,
) -> MigrationEvent {
    let id = mediamesh_cluster::RoomId::new(room.to_string());
    let started = Instant::now();
    let now = || started.elapsed().as_millis() as u64;
    let attempt = FlipAttempt::new(expected_epoch, to.clone(), now());
    loop {
        let result = match mesh.store.place_room_cas(id.clone(), expected_epoch, to.clone()).await {
            Ok(placement) => FlipResult::Placed(placement),
            Err(StoreError::EpochConflict { current }) => FlipResult::Conflict(current),
            // Every other error may hide a proposal that still commits (a rejected flip, of
            // a valid room to a valid node, does not happen).
            Err(error) => FlipResult::Unknown(error.to_string()),
        };
        let unknown = match &result {
            FlipResult::Unknown(reason) | FlipResult::Refused(reason) => reason.clone(),
            FlipResult::Placed(_) | FlipResult::Conflict(_) => String::new(),
        };
        match attempt.answer(result, now()) {
            FlipStep::Report(event) => return event,
            FlipStep::RetryAt { at_ms } => {
                tracing::info!(room = %room, error = %unknown, "flip outcome unknown; proposing it again");
                tokio::time::sleep(Duration::from_millis(at_ms.saturating_sub(now()))).await;
            }
            FlipStep::GiveUp => {
                tracing::warn!(room = %room, error = %unknown, "flip outcome still unknown; giving up");
                let current = mesh.store.room(&id, Consistency::Local).await.ok().flatten();
                return FlipAttempt::give_up(current.map(|p| p.epoch));
            }
        }
    }
}

/// `Handoff` on the target: relay the room from its host (the source) and answer once the
/// snapshot's tracks arrived (or the source has none).
pub async fn handoff(mesh: &Arc<Mesh>, request: pb::HandoffRequest) -> Result<u32, tonic::Status> {
    let snapshot: RoomSnapshot = mediamesh_cluster::codec::decode::<_, SNAPSHOT_BYTES_MAX>(&request.snapshot)
        .map_err(|e| tonic::Status::invalid_argument(format!("room snapshot: {e}")))?;
    if snapshot.room != request.room || snapshot.epoch != request.epoch {
        return Err(tonic::Status::invalid_argument(
            "the snapshot is of another room or epoch",
        ));
    }
    let room = RoomId::parse(&request.room).ok_or_else(|| tonic::Status::invalid_argument("invalid room name"))?;
    let registry = mesh.registry()?;
    let addr = registry
        .get_or_create(&room, Access::View, None)
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let _ = addr
        .send(RoomRequest::Hold {
            until: Instant::now() + HANDOFF_HOLD,
        })
        .await;
    let deadline = Instant::now() + HANDOFF_TIMEOUT - Duration::from_millis(timing::HANDOFF_ANSWER_MARGIN_MS);
    loop {
        let relayed = room_info(&addr).await.map_or(0, |info| info.relayed_tracks);
        if relayed >= snapshot.tracks.len() {
            return Ok(u32::try_from(relayed).unwrap_or(u32::MAX));
        }
        if Instant::now() >= deadline {
            return Err(tonic::Status::deadline_exceeded(format!(
                "{relayed} of {} tracks relayed",
                snapshot.tracks.len()
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `Promote` on the target: the directory names it the host under `epoch`.
pub async fn promote(mesh: &Arc<Mesh>, request: pb::PromoteRequest) -> Result<(), tonic::Status> {
    let room = RoomId::parse(&request.room).ok_or_else(|| tonic::Status::invalid_argument("invalid room name"))?;
    let registry = mesh.registry()?;
    let addr = registry
        .get_or_create(&room, Access::View, None)
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    addr.send(RoomRequest::Promote { epoch: request.epoch })
        .await
        .map_err(|_| tonic::Status::unavailable("the room is closing"))?
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    Ok(())
}

/// Sessions still open on this node: signal sessions and media sessions.
fn sessions_left(mesh: &Mesh, signal_open: &dyn Fn() -> usize) -> usize {
    let media = mesh
        .registry()
        .map(|r| r.context().stats.sessions.load(Ordering::Relaxed))
        .unwrap_or(0);
    media + signal_open()
}

/// Drains this node: marks it draining (no new rooms, TURN refuses allocations), migrates every
/// hosted room, tells the clients of relayed rooms to move, closes what is left at the deadline,
/// then leaves the cluster. Returns when it is done.
pub async fn drain(mesh: Arc<Mesh>, deadline: Duration, signal_open: Arc<dyn Fn() -> usize + Send + Sync>) {
    let node = mediamesh_cluster::NodeId::new(mesh.node.clone());
    tracing::info!(deadline_ms = deadline.as_millis() as u64, "drain started");
    if let Err(error) = mesh.store.set_node_draining(node.clone(), true).await {
        tracing::warn!(%error, "draining state not replicated; draining anyway");
    }
    let Ok(registry) = mesh.registry().cloned() else { return };
    let started = Instant::now();
    let now = || started.elapsed().as_millis() as u64 + 1;
    let mut core = Drain::new(
        node.clone(),
        mesh.region.clone(),
        DrainConfig {
            deadline_ms: deadline.as_millis() as u64,
            ..DrainConfig::default()
        },
        now(),
    );
    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<(mediamesh_cluster::RoomId, bool)>(64);
    let mut evacuated = std::collections::BTreeSet::new();
    loop {
        while let Ok((room, ok)) = done_rx.try_recv() {
            core.migrated(&room, ok);
        }
        let mut hosted = Vec::new();
        for (room, addr) in registry.hosted() {
            if let Some(info) = room_info(&addr).await {
                hosted.push((mediamesh_cluster::RoomId::new(room.to_string()), info.epoch));
            }
        }
        // Viewers of rooms relayed here go to the host (they may watch from any node).
        for (room, addr) in registry.list() {
            if !hosted.iter().any(|(r, _)| r.as_str() == room.as_str()) && evacuated.insert(room.clone()) {
                let _ = addr.send(RoomRequest::Evacuate).await;
            }
        }
        core.rooms(hosted);
        core.sessions_left(sessions_left(&mesh, signal_open.as_ref()));
        let candidates = super::candidates(&mesh.store.nodes());
        for action in core.tick(now(), &candidates, &mesh.thresholds) {
            match action {
                DrainAction::Migrate { room, to, .. } => {
                    let mesh = Arc::clone(&mesh);
                    let done = done_tx.clone();
                    tokio::spawn(async move {
                        let id = RoomId(room.as_str().to_string());
                        let ok = migrate(&mesh, &id, to.as_str()).await.is_ok();
                        let _ = done.send((room, ok)).await;
                    });
                }
                DrainAction::CloseRemaining => {
                    tracing::warn!("drain deadline reached; closing the sessions left");
                    for (_, addr) in registry.list() {
                        let _ = addr.send(RoomRequest::Close).await;
                    }
                }
                DrainAction::Leave => {
                    tracing::info!(
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "drained; leaving the cluster"
                    );
                    if let Err(error) = mesh.store.remove_node(node.clone()).await {
                        tracing::warn!(%error, "could not leave the cluster; stopping anyway");
                    }
                    return;
                }
            }
        }
        if core.is_done() {
            return;
        }
        tokio::time::sleep(DRAIN_POLL_INTERVAL).await;
    }
}
