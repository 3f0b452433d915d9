//! What each node has, gathered for operators: its rooms (hosted or relayed) with their
//! sessions there, and its migrations. A node answers for itself (`Mesh/Overview`); the admin
//! API asks every live node at once and says which ones did not answer in time.

use super::{Mesh, traced};
use mediamesh_actors::pii::shown_name;
use mediamesh_actors::room::room_info;
use mediamesh_cluster::NodeState;
use mediamesh_proto::mesh::v1 as pb;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Finished migrations a node remembers.
pub const RECENT_MAX: usize = 20;
/// How long the admin API waits for another node's overview.
pub const OVERVIEW_TIMEOUT: Duration = Duration::from_secs(1);

fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Migrations run on this node as the source.
#[derive(Debug, Default)]
pub struct MigrationLog {
    in_flight: HashMap<String, (pb::MigrationRecord, Instant)>,
    recent: VecDeque<pb::MigrationRecord>,
}

impl MigrationLog {
    /// In-flight migrations with their elapsed time now, oldest first.
    pub fn in_flight(&self) -> Vec<pb::MigrationRecord> {
        let mut records: Vec<pb::MigrationRecord> = self
            .in_flight
            .values()
            .map(|(record, started)| pb::MigrationRecord {
                elapsed_ms: started.elapsed().as_millis() as u64,
                ..record.clone()
            })
            .collect();
        records.sort_by(|a, b| (a.started_at_ms, &a.room).cmp(&(b.started_at_ms, &b.room)));
        records
    }

    /// Finished migrations, newest first.
    pub fn recent(&self) -> Vec<pb::MigrationRecord> {
        self.recent.iter().cloned().collect()
    }
}

/// One migration of a room in flight; at most one per room. Dropping it without
/// [`InFlight::finish`] (the call was cancelled) forgets it.
pub struct InFlight {
    mesh: Arc<Mesh>,
    room: String,
}

impl InFlight {
    /// Registers a migration of `room` to `to`; `None` when one of the room is running.
    pub fn begin(mesh: &Arc<Mesh>, room: &str, to: &str) -> Option<InFlight> {
        let mut log = mesh.migrations.lock();
        if log.in_flight.contains_key(room) {
            return None;
        }
        let record = pb::MigrationRecord {
            room: room.to_string(),
            from: mesh.node.clone(),
            to: to.to_string(),
            started_at_ms: wall_ms(),
            ..Default::default()
        };
        log.in_flight.insert(room.to_string(), (record, Instant::now()));
        Some(InFlight {
            mesh: Arc::clone(mesh),
            room: room.to_string(),
        })
    }

    /// Records the outcome (the room's new epoch, or why it did not move) among the recent
    /// migrations.
    pub fn finish(self, outcome: Result<u64, String>) {
        let mut log = self.mesh.migrations.lock();
        if let Some((record, started)) = log.in_flight.remove(&self.room) {
            let (epoch, ok, error) = match outcome {
                Ok(epoch) => (epoch, true, String::new()),
                Err(error) => (0, false, error),
            };
            log.recent.push_front(pb::MigrationRecord {
                finished_at_ms: wall_ms(),
                elapsed_ms: started.elapsed().as_millis() as u64,
                epoch,
                ok,
                error,
                ..record
            });
            log.recent.truncate(RECENT_MAX);
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.mesh.migrations.lock().in_flight.remove(&self.room);
    }
}

/// This node's overview.
pub async fn local(mesh: &Mesh) -> pb::OverviewResponse {
    let mut rooms = Vec::new();
    if let Ok(registry) = mesh.registry() {
        for (_, addr) in registry.list() {
            let Some(info) = room_info(&addr).await else {
                continue;
            };
            rooms.push(pb::RoomSummary {
                room: info.room,
                hosted: info.hosted,
                epoch: info.epoch,
                publishers: info.publishers.len() as u32,
                subscribers: info.subscribers.len() as u32,
                watchers: info.watchers as u32,
                relayed_tracks: info.relayed_tracks as u32,
                publisher_names: info
                    .publishers
                    .iter()
                    .map(|p| shown_name(&p.identity, mesh.mask_names))
                    .collect(),
            });
        }
    }
    rooms.sort_by(|a, b| a.room.cmp(&b.room));
    let log = mesh.migrations.lock();
    pb::OverviewResponse {
        rooms,
        in_flight: log.in_flight(),
        recent: log.recent(),
    }
}

/// Every live node's overview (this one's without a call), and the nodes that did not answer.
pub struct Gathered {
    /// By node id, sorted.
    pub nodes: Vec<(String, pb::OverviewResponse)>,
    pub unreachable: Vec<String>,
}

pub async fn gather(mesh: &Mesh) -> Gathered {
    let others: Vec<String> = mesh
        .store
        .nodes()
        .into_iter()
        .filter(|n| n.id.as_str() != mesh.node && n.state != NodeState::Dead)
        .map(|n| n.id.as_str().to_string())
        .collect();
    let calls = others.into_iter().map(|node| async move {
        let answer = async {
            let mut client = mesh.client(&node).ok()?;
            let reply = tokio::time::timeout(OVERVIEW_TIMEOUT, client.overview(traced(pb::OverviewRequest {})))
                .await
                .ok()?
                .ok()?;
            Some(reply.into_inner())
        };
        (node.clone(), answer.await)
    });
    let (own, answers) = tokio::join!(local(mesh), futures::future::join_all(calls));
    let mut nodes = vec![(mesh.node.clone(), own)];
    let mut unreachable = Vec::new();
    for (node, answer) in answers {
        match answer {
            Some(overview) => nodes.push((node, overview)),
            None => unreachable.push(node),
        }
    }
    nodes.sort_by(|a, b| a.0.cmp(&b.0));
    unreachable.sort();
    Gathered { nodes, unreachable }
}
