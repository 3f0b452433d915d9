//! Failover, run by whichever node leads the store: the leader's failure detector
//! (`mediamesh_cluster::mesh::liveness`) counts missed heartbeats on its own clock; a node that
//! misses `--dead-after-missed` in a row is dead, and its rooms are re-placed
//! (`mediamesh_cluster::mesh::failover`), each through the directory's compare-and-set on its
//! epoch. Clients reconnect and resume from the store; a host that was only cut off finds its
//! epoch stale when it hears from the cluster again, and stops serving as host.

use super::Mesh;
use mediamesh_cluster::mesh::failover::plan_failover;
use mediamesh_cluster::mesh::liveness::{FailureDetector, LivenessChange};
use mediamesh_cluster::{Consistency, NodeId};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Runs forever (the node aborts it at shutdown).
pub async fn run(mesh: Arc<Mesh>, heartbeat_interval: Duration, missed_max: u32) {
    let mut detector = FailureDetector::new(heartbeat_interval.as_millis() as u64, missed_max);
    let mut last_heartbeat: HashMap<NodeId, u64> = HashMap::new();
    let mut leading = false;
    let started = Instant::now();
    let mut tick = tokio::time::interval((heartbeat_interval / 4).max(Duration::from_millis(20)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = started.elapsed().as_millis() as u64;
        if mesh.store.leader().as_ref() != Some(mesh.store.node_id()) {
            leading = false;
            continue;
        }
        let nodes = mesh.store.nodes();
        if !leading {
            // A new leader gives every node a fresh grace period: it has not been counting.
            leading = true;
            detector = FailureDetector::new(heartbeat_interval.as_millis() as u64, missed_max);
            last_heartbeat.clear();
            for node in &nodes {
                detector.track(node.id.clone(), now);
                last_heartbeat.insert(node.id.clone(), node.last_heartbeat_ms);
            }
        }
        let mut changes = Vec::new();
        for node in &nodes {
            let previous = last_heartbeat.insert(node.id.clone(), node.last_heartbeat_ms);
            if node.id == *mesh.store.node_id() || previous != Some(node.last_heartbeat_ms) {
                changes.extend(detector.observe(&node.id, now));
            }
        }
        last_heartbeat.retain(|id, _| {
            let known = nodes.iter().any(|n| n.id == *id);
            if !known {
                detector.forget(id);
            }
            known
        });
        changes.extend(detector.tick(now));
        for change in changes {
            match change {
                LivenessChange::Dead(node) => {
                    tracing::warn!(node = %node.as_str(), missed = missed_max, "node missed its heartbeats; re-placing its rooms");
                    replace_rooms(&mesh, &node, &detector).await;
                }
                LivenessChange::Alive(node) => tracing::info!(node = %node.as_str(), "node heartbeats again"),
            }
        }
    }
}

/// Re-places every room of `dead` on the nodes the detector believes alive.
async fn replace_rooms(mesh: &Mesh, dead: &NodeId, detector: &FailureDetector) {
    let nodes = mesh.store.nodes();
    let region = nodes
        .iter()
        .find(|n| n.id == *dead)
        .map(|n| n.region.clone())
        .unwrap_or_default();
    let rooms = match mesh.store.rooms(Consistency::Local).await {
        Ok(rooms) => rooms,
        Err(error) => {
            tracing::warn!(%error, "room list unreadable; failover postponed to the next dead node");
            return;
        }
    };
    let rooms: Vec<_> = rooms.into_iter().map(|p| (p.room, p.node, p.epoch)).collect();
    let mut candidates = super::candidates(&nodes);
    for candidate in &mut candidates {
        candidate.available &= !detector.is_dead(&candidate.id);
    }
    for replacement in plan_failover(dead, &region, &rooms, &candidates, &mesh.thresholds) {
        let placed = mesh
            .store
            .place_room_cas(
                replacement.room.clone(),
                Some(replacement.expected_epoch),
                replacement.to.clone(),
            )
            .await;
        match placed {
            Ok(placement) => {
                mesh.stats.failovers.fetch_add(1, Ordering::Relaxed);
                tracing::info!(room = %placement.room.as_str(), to = %placement.node.as_str(), epoch = placement.epoch, "room re-placed after its host died");
            }
            Err(error) => {
                tracing::debug!(room = %replacement.room.as_str(), %error, "room not re-placed (it moved meanwhile)")
            }
        }
    }
}
