//! Failover, run by whichever node leads the store: the shell around
//! `mediamesh_cluster::mesh::failover::FailoverLoop`, which decides (the leader's failure
//! detector on its own clock; a node that misses `--dead-after-missed` heartbeats in a row is
//! dead, and its rooms are re-placed one compare-and-set on the epoch after the other). This
//! task only ticks it and does the store calls it asks for. Clients reconnect and resume from
//! the store; a host that was only cut off finds its epoch stale when it hears from the
//! cluster again, and stops serving as host.

use super::Mesh;
use mediamesh_cluster::Consistency;
use mediamesh_cluster::mesh::failover::{FailoverLoop, FailoverStep};
use mediamesh_cluster::mesh::liveness::LivenessChange;
use mediamesh_cluster::mesh::timing::failover_tick_ms;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Runs forever (the node aborts it at shutdown).
pub async fn run(mesh: Arc<Mesh>, heartbeat_interval: Duration, missed_max: u32) {
    let interval_ms = heartbeat_interval.as_millis() as u64;
    let mut core = FailoverLoop::new(interval_ms, missed_max);
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(failover_tick_ms(interval_ms)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = started.elapsed().as_millis() as u64;
        let leader = mesh.store.leader().as_ref() == Some(mesh.store.node_id());
        // A follower's tick only notes that it does not lead: no need to read the nodes.
        let nodes = if leader { mesh.store.nodes() } else { Vec::new() };
        for change in core.tick(now, mesh.store.node_id(), leader, &nodes) {
            match change {
                LivenessChange::Dead(node) => {
                    tracing::warn!(node = %node.as_str(), missed = missed_max, "node missed its heartbeats; re-placing its rooms")
                }
                LivenessChange::Alive(node) => tracing::info!(node = %node.as_str(), "node heartbeats again"),
            }
        }
        carry_out(&mesh, &mut core).await;
    }
}

/// Does what the loop asks until it has nothing left: read the directory for a dead node's
/// plan, propose each re-placement and wait for its answer.
async fn carry_out(mesh: &Mesh, core: &mut FailoverLoop) {
    loop {
        match core.next_step() {
            FailoverStep::Idle => return,
            FailoverStep::ReadRooms { dead } => match mesh.store.rooms(Consistency::Local).await {
                Ok(rooms) => {
                    let planned = core.plan(&mesh.store.nodes(), &rooms, &mesh.thresholds);
                    tracing::info!(node = %dead.as_str(), rooms = planned, "failover planned");
                }
                Err(error) => {
                    tracing::warn!(%error, "room list unreadable; failover postponed to the next dead node");
                    core.rooms_unreadable();
                }
            },
            FailoverStep::Place(replacement) => {
                let placed = mesh
                    .store
                    .place_room_cas(
                        replacement.room.clone(),
                        Some(replacement.expected_epoch),
                        replacement.to.clone(),
                    )
                    .await;
                core.placed();
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
    }
}
