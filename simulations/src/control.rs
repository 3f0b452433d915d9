//! The node's control plane as `src/` runs it around the store, driving the real sans-IO cores
//! of `cluster::mesh`:
//!
//! - **lifecycle** (`Store::run_lifecycle`, `node::report_load`): register until the state
//!   machine holds this node's registration, then a `Command::Heartbeat` with the node's load
//!   every [`HEARTBEAT_INTERVAL_MS`] (one at a time; a slow one delays the next).
//! - **failover** (`src/mesh/failover.rs`): on the leader, a [`FailureDetector`] on the
//!   leader's own clock, reset when leadership is gained; each node it declares dead has its
//!   rooms re-placed by [`plan_failover`], one compare-and-set after the other.
//! - **directory** (`src/directory.rs`, `RoomRegistry::get_or_create`): a room without a local
//!   copy is located by a linearizable read; one not placed yet, or whose host reads as dead,
//!   is placed by [`placement::choose`] through a `PlaceRoom` compare-and-set (3 attempts).
//! - **rooms** (`actors/src/room.rs`): a local room is `Host { epoch }` or `Relay { host }`;
//!   `promote` and `demote` as the room actor does them; the fence every
//!   [`FENCE_INTERVAL_MS`] compares the mode with this node's replica, and locates a room
//!   again whose host left the cluster (`StoreDirectory::current`).
//! - **relays** (`src/mesh/relay.rs`): a relayed room with viewers keeps asking its host for the
//!   stream (`Watch`, standing in for `PullTrack`); a host that stays silent for
//!   [`RELAY_SILENT_MS`] or answers that it does not host makes the relay re-locate.
//! - **migration** (`src/mesh/migrate.rs`): the [`Migration`] core fed with its events; the
//!   shell blocks on the handoff call, the flip and the promote call as the real one awaits
//!   them; `Handoff`/`Promote` on the target. The flip is `migrate.rs::flip`: a proposal whose
//!   outcome is unknown (timeout, no leader, transport) is proposed again every
//!   [`FLIP_RETRY_MS`] until [`FLIP_OUTCOME_DEADLINE_MS`], then reported as a conflict with this
//!   replica's epoch; a conflict showing `to` at the expected epoch + 1 is the flip's own earlier
//!   attempt, i.e. `Flipped`.
//! - **drain** (`src/mesh/migrate.rs::drain`): the [`Drain`] core every [`DRAIN_TICK_MS`].
//!
//! Under the `skip_epoch_check` fault the migration core proposes the flip with
//! `expected_epoch: None`; the shell carries that out as the unconditional overwrite it stands
//! for: a compare-and-set on whatever epoch this node's replica shows at that moment.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use mediamesh_cluster::command::{Command, Outcome};
use mediamesh_cluster::mesh::drain::{Drain, DrainAction, DrainConfig};
use mediamesh_cluster::mesh::failover::{Replacement, plan_failover};
use mediamesh_cluster::mesh::liveness::{FailureDetector, LivenessChange};
use mediamesh_cluster::mesh::migration::{
    Faults as MigrationFaults, Migration, MigrationAction, MigrationEvent, MigrationOutcome, Phase,
};
use mediamesh_cluster::mesh::placement::{self, Candidate, Thresholds};
use mediamesh_cluster::types::{NodeLoad, NodeRegistration, NodeState, Placement};
use mediamesh_cluster::{NodeId, RoomId};

use crate::checkers::{Observation, PlaceKind};
use crate::config::{
    CLIENTS_DEADLINE_MS, DEAD_AFTER_MISSED, DRAIN_DEADLINE_MS, DRAIN_TICK_MS, FAILOVER_TICK_MS, FENCE_INTERVAL_MS,
    HANDOFF_ANSWER_MAX_MS, HANDOFF_HOLD_MS, HANDOFF_TIMEOUT_MS, HEARTBEAT_INTERVAL_MS, MIGRATION_POLL_MS,
    NODE_CAPACITY, NODE_DEAD_AFTER_MS, RELAY_CHECK_MS, RELAY_SILENT_MS,
};
use crate::message::{NodeIndex, Payload};
use crate::node::{Ctx, Effect, Live, NodeTimer, OpResult, Purpose};

/// Attempts of a placement that loses a compare-and-set race (`PLACE_ATTEMPTS_MAX`).
const PLACE_ATTEMPTS_MAX: usize = 3;
/// A unary mesh call gives up after this long (`CALL_TIMEOUT`).
const CALL_TIMEOUT_MS: u64 = 10_000;
/// A flip whose outcome is unknown is proposed again this often (`flip`'s 250 ms sleep).
const FLIP_RETRY_MS: u64 = 250;
/// ... until this long after its first proposal (`FLIP_OUTCOME_DEADLINE`).
const FLIP_OUTCOME_DEADLINE_MS: u64 = 20_000;
/// Migrations one node runs at once, at most.
const MIGRATIONS_PER_NODE_MAX: usize = 64;
/// Rooms one node holds, at most (`rooms_per_node_max`).
const ROOMS_PER_NODE_MAX: usize = 256;

/// How a local room serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RoomMode {
    /// This node hosts the room under `epoch`.
    Host { epoch: u64 },
    /// The room is relayed from `host` (known at `epoch`).
    Relay { host: NodeId, epoch: u64 },
}

/// A room this node holds (the room actor, as far as the control plane sees it).
#[derive(Clone, Debug)]
pub struct LocalRoom {
    /// Host or relay.
    pub mode: RoomMode,
    /// A handoff's copy stays open until then (`Hold`).
    pub hold_until_ms: Option<u64>,
    /// When the host last answered this relay (virtual ms).
    pub last_watch_ok_ms: u64,
}

/// What waits for a room to be ready here.
#[derive(Clone, Debug)]
pub enum RoomWaiter {
    /// A viewer's join (`get_or_create` for a signal session).
    Join { join: u64 },
    /// Another node's relay watches the room here.
    Watch { from: NodeIndex },
    /// A migration's handoff arrived here.
    Handoff {
        migration: u64,
        from: NodeIndex,
        epoch: u64,
        tracks_ms: u64,
    },
    /// A migration's promote arrived here.
    Promote {
        migration: u64,
        from: NodeIndex,
        epoch: u64,
    },
    /// A relay re-locates its host (always reads the directory).
    Relocate,
}

/// Where the directory says a room is (`Location`).
#[derive(Clone, Debug)]
enum Location {
    Here { epoch: u64 },
    There { host: NodeId, epoch: u64 },
}

#[derive(Debug)]
struct Locate {
    attempt: usize,
    waiters: Vec<RoomWaiter>,
}

/// Who started a migration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MigrationOrigin {
    /// The admin API.
    Admin,
    /// This node's drain.
    Drain,
}

/// What the migration shell is blocked on (the real one awaits these calls).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Blocked {
    No,
    Handoff {
        deadline_ms: u64,
    },
    Flip,
    /// The flip's outcome is unknown: propose it again at `at_ms`.
    FlipRetry {
        at_ms: u64,
    },
    Promote {
        deadline_ms: u64,
    },
}

/// The flip the core asked for, while the shell learns its outcome (`migrate.rs::flip`).
#[derive(Clone, Debug)]
struct FlipAttempt {
    /// The core's expected epoch (`None` only under the skip-epoch-check fault).
    expected_epoch: Option<u64>,
    to: NodeId,
    /// Unknown outcomes are proposed again until then (this node's clock).
    deadline_ms: u64,
}

/// One migration this node runs as the source.
#[derive(Debug)]
pub struct MigrationRun {
    /// The room.
    pub room: RoomId,
    to: NodeId,
    to_index: NodeIndex,
    core: Migration,
    events: VecDeque<MigrationEvent>,
    blocked: Blocked,
    next_poll_ms: u64,
    tracks_ms: u64,
    origin: MigrationOrigin,
    /// The epoch the flip moved the room to, while the promote call runs.
    moved_epoch: u64,
    /// The flip in progress.
    flip: Option<FlipAttempt>,
}

impl MigrationRun {
    /// Where the core is.
    pub fn phase(&self) -> Phase {
        self.core.phase()
    }
}

#[derive(Debug)]
struct FailoverState {
    next_ms: u64,
    leading: bool,
    detector: FailureDetector,
    last_heartbeat: BTreeMap<NodeId, u64>,
    changes: VecDeque<LivenessChange>,
    plan: VecDeque<Replacement>,
    placing: bool,
}

#[derive(Debug)]
struct DrainRun {
    core: Drain,
    started: bool,
    next_tick_ms: u64,
    leaving: bool,
    evacuated: BTreeSet<RoomId>,
}

/// The control plane's volatile state on one node.
#[derive(Debug)]
pub struct Control {
    registered: bool,
    register_next_ms: u64,
    register_backoff_ms: u64,
    register_in_flight: bool,
    heartbeat_next_ms: u64,
    heartbeat_in_flight: bool,
    failover: FailoverState,
    fence_next_ms: u64,
    relay_next_ms: u64,
    /// Rooms held here.
    pub rooms: BTreeMap<RoomId, LocalRoom>,
    locates: BTreeMap<RoomId, Locate>,
    /// Migrations running from here.
    pub migrations: BTreeMap<u64, MigrationRun>,
    next_migration: u64,
    drain: Option<DrainRun>,
}

/// A registered node as this node reads it (`NodeStatus`, the fields the mesh uses).
#[derive(Clone, Debug)]
pub struct NodeView {
    /// Id.
    pub id: NodeId,
    /// Region.
    pub region: String,
    /// Alive, dead or draining by this node's clock.
    pub state: NodeState,
    /// A raft voter or learner.
    pub member: bool,
    /// Last reported load.
    pub load: NodeLoad,
    /// Capacity.
    pub capacity: u32,
    /// Last heartbeat stamp.
    pub last_heartbeat_ms: u64,
}

impl Control {
    /// A fresh control plane starting at wall clock `clock_ms`.
    pub fn new(clock_ms: u64) -> Self {
        Control {
            registered: false,
            register_next_ms: 0,
            register_backoff_ms: 50,
            register_in_flight: false,
            heartbeat_next_ms: clock_ms,
            heartbeat_in_flight: false,
            failover: FailoverState {
                next_ms: 0,
                leading: false,
                detector: FailureDetector::new(HEARTBEAT_INTERVAL_MS, DEAD_AFTER_MISSED),
                last_heartbeat: BTreeMap::new(),
                changes: VecDeque::new(),
                plan: VecDeque::new(),
                placing: false,
            },
            fence_next_ms: 0,
            relay_next_ms: 0,
            rooms: BTreeMap::new(),
            locates: BTreeMap::new(),
            migrations: BTreeMap::new(),
            next_migration: 0,
            drain: None,
        }
    }
}

impl Live {
    fn registration(&self) -> NodeRegistration {
        let spec = &self.roster.nodes[self.me];
        NodeRegistration {
            id: spec.id.clone(),
            region: spec.region.clone(),
            cluster_addr: format!("{}.sim:7000", spec.id),
            http_url: format!("http://{}.sim:8080", spec.id),
            grpc_url: format!("http://{}.sim:8081", spec.id),
            capacity: NODE_CAPACITY,
            media_ip: String::new(),
            media_ports: (0, 0),
            turn_addr: String::new(),
        }
    }

    /// The registered nodes as this node reads them (`Store::node_statuses`).
    pub fn node_views(&self, clock_ms: u64) -> Vec<NodeView> {
        let status = self.core.status();
        self.core
            .state()
            .read()
            .nodes()
            .values()
            .map(|n| NodeView {
                id: n.registration.id.clone(),
                region: n.registration.region.clone(),
                state: if n.draining {
                    NodeState::Draining
                } else if n.last_heartbeat_ms > 0 && clock_ms.saturating_sub(n.last_heartbeat_ms) <= NODE_DEAD_AFTER_MS
                {
                    NodeState::Alive
                } else {
                    NodeState::Dead
                },
                member: status.voters.contains(&n.raft_id) || status.learners.contains(&n.raft_id),
                load: n.last_load.clone().unwrap_or_default(),
                capacity: n.registration.capacity,
                last_heartbeat_ms: n.last_heartbeat_ms,
            })
            .collect()
    }

    /// The placement candidates (`src/mesh/mod.rs::candidates`).
    fn candidates(views: &[NodeView]) -> Vec<Candidate> {
        views
            .iter()
            .map(|n| Candidate {
                id: n.id.clone(),
                region: n.region.clone(),
                available: n.state == NodeState::Alive && n.member,
                cpu: n.load.cpu,
                connections: n.load.connections,
                capacity: n.capacity,
                rooms: n.load.rooms,
            })
            .collect()
    }

    fn load(&self) -> NodeLoad {
        let sessions = self.sessions.by_viewer.len() as u64;
        let hosted = self
            .control
            .rooms
            .values()
            .filter(|r| matches!(r.mode, RoomMode::Host { .. }))
            .count() as u64;
        NodeLoad {
            cpu: (0.05 + 0.01 * sessions as f32 + 0.02 * hosted as f32).min(1.0),
            connections: sessions,
            rooms: hosted,
            egress_bps: sessions * 1_000_000,
        }
    }

    /// The mesh tasks' timers, run from the node's control tick.
    pub(crate) fn control_jobs(&mut self, ctx: &mut Ctx<'_>) {
        let clock = self.clock_ms(ctx);
        self.lifecycle(ctx, clock);
        if clock >= self.control.failover.next_ms {
            self.control.failover.next_ms = clock + FAILOVER_TICK_MS;
            self.failover_tick(ctx, clock);
        }
        if clock >= self.control.fence_next_ms {
            self.control.fence_next_ms = clock + FENCE_INTERVAL_MS;
            self.fence(ctx);
        }
        if clock >= self.control.relay_next_ms {
            self.control.relay_next_ms = clock + RELAY_CHECK_MS;
            self.relay_checks(ctx);
        }
        self.poll_migrations(ctx, clock);
        self.drain_tick(ctx, clock);
    }

    // ----- lifecycle -----

    fn lifecycle(&mut self, ctx: &mut Ctx<'_>, clock: u64) {
        if !self.control.registered {
            let mine = self.registration();
            if self.core.state().read().nodes().get(&mine.id).map(|n| &n.registration) == Some(&mine) {
                self.control.registered = true;
            } else if !self.control.register_in_flight
                && clock >= self.control.register_next_ms
                && self.core.leader() != 0
            {
                self.control.register_in_flight = true;
                self.propose(ctx, vec![Command::RegisterNode(mine)], Purpose::Register);
            }
            return;
        }
        if !self.control.heartbeat_in_flight && clock >= self.control.heartbeat_next_ms {
            // tokio's interval bursts to catch up on missed ticks.
            self.control.heartbeat_next_ms += HEARTBEAT_INTERVAL_MS;
            self.control.heartbeat_in_flight = true;
            let command = Command::Heartbeat {
                node: self.node_id().clone(),
                load: self.load(),
                at_ms: clock,
            };
            self.propose(ctx, vec![command], Purpose::Heartbeat);
        }
    }

    /// A control-plane store operation finished.
    pub(crate) fn control_done(&mut self, ctx: &mut Ctx<'_>, purpose: Purpose, result: OpResult) {
        match purpose {
            Purpose::Register => {
                self.control.register_in_flight = false;
                let clock = self.clock_ms(ctx);
                let backoff = self.control.register_backoff_ms;
                let jitter = ctx.random_range(0..=backoff / 2);
                self.control.register_next_ms = clock + backoff + jitter;
                self.control.register_backoff_ms = (backoff * 2).min(2_000);
            }
            Purpose::Heartbeat => self.control.heartbeat_in_flight = false,
            Purpose::FailoverPlace { room, to } => {
                let placed = matches!(result.as_deref(), Ok([Outcome::Placed(_)]));
                ctx.trace(format!(
                    "n{} failover {room} -> {to}: {}",
                    self.me,
                    if placed { "placed" } else { "not placed" }
                ));
                self.control.failover.placing = false;
                self.failover_continue(ctx);
            }
            Purpose::LocateRead { room } => self.locate_read_done(ctx, room, result),
            Purpose::LocatePlace { room } => self.locate_place_done(ctx, room, result),
            Purpose::Flip { migration } => {
                let clock = self.clock_ms(ctx);
                let Some(run) = self.control.migrations.get_mut(&migration) else {
                    return;
                };
                let Some(flip) = run.flip.clone() else {
                    return;
                };
                // As `migrate.rs::flip` does.
                let event = match result.as_deref() {
                    Ok([Outcome::Placed(p)]) => MigrationEvent::Flipped { epoch: p.epoch },
                    Ok([Outcome::EpochConflict(current)]) => {
                        let ours = flip.expected_epoch.and_then(|e| e.checked_add(1));
                        match current {
                            // Our own earlier attempt applied.
                            Some(p) if p.node == flip.to && Some(p.epoch) == ours => {
                                ctx.trace(format!(
                                    "n{} migration m{migration}: an earlier attempt of the flip applied (epoch {})",
                                    self.me, p.epoch
                                ));
                                MigrationEvent::Flipped { epoch: p.epoch }
                            }
                            current => MigrationEvent::FlipConflict {
                                current_epoch: current.as_ref().map(|p| p.epoch),
                            },
                        }
                    }
                    Ok(other) => MigrationEvent::HandoffFailed(format!("unexpected outcome {other:?}")),
                    Err(e) if clock < flip.deadline_ms => {
                        ctx.trace(format!(
                            "n{} migration m{migration}: the flip's outcome is unknown ({e}); proposing it again",
                            self.me
                        ));
                        run.blocked = Blocked::FlipRetry {
                            at_ms: clock + FLIP_RETRY_MS,
                        };
                        return;
                    }
                    Err(e) => {
                        let current_epoch = self.core.state().read().rooms().get(&run.room).map(|p| p.epoch);
                        ctx.trace(format!(
                            "n{} migration m{migration}: the flip's outcome is still unknown ({e}); giving up with this replica's epoch {current_epoch:?}",
                            self.me
                        ));
                        MigrationEvent::FlipConflict { current_epoch }
                    }
                };
                run.flip = None;
                run.blocked = Blocked::No;
                run.events.push_back(event);
                self.pump_migration(ctx, migration);
            }
            Purpose::SetDraining => {
                if let Some(d) = &mut self.control.drain {
                    d.started = true;
                }
            }
            Purpose::Release { room } => {
                ctx.trace(format!("n{} released {room}: {:?}", self.me, result.map(|_| ())));
            }
            Purpose::Leave => {
                ctx.trace(format!("n{} leaves the cluster ({:?})", self.me, result.map(|_| ())));
                ctx.out.push(Effect::Leave);
            }
            other => ctx.trace(format!("n{} unexpected completion {other:?}", self.me)),
        }
    }

    // ----- failover (on the leader) -----

    fn failover_tick(&mut self, ctx: &mut Ctx<'_>, clock: u64) {
        if self.control.failover.placing || !self.control.failover.changes.is_empty() {
            return; // the real loop is busy re-placing rooms
        }
        if self.leader_id().as_ref() != Some(self.node_id()) {
            self.control.failover.leading = false;
            return;
        }
        let nodes = self.node_views(clock);
        let me = self.node_id().clone();
        let f = &mut self.control.failover;
        if !f.leading {
            // A new leader gives every node a fresh grace period: it has not been counting.
            f.leading = true;
            f.detector = FailureDetector::new(HEARTBEAT_INTERVAL_MS, DEAD_AFTER_MISSED);
            f.last_heartbeat.clear();
            for node in &nodes {
                f.detector.track(node.id.clone(), clock);
                f.last_heartbeat.insert(node.id.clone(), node.last_heartbeat_ms);
            }
        }
        let mut changes = Vec::new();
        for node in &nodes {
            let previous = f.last_heartbeat.insert(node.id.clone(), node.last_heartbeat_ms);
            if node.id == me || previous != Some(node.last_heartbeat_ms) {
                changes.extend(f.detector.observe(&node.id, clock));
            }
        }
        let known: BTreeSet<NodeId> = nodes.iter().map(|n| n.id.clone()).collect();
        let forgotten: Vec<NodeId> = f
            .last_heartbeat
            .keys()
            .filter(|id| !known.contains(*id))
            .cloned()
            .collect();
        for id in forgotten {
            f.last_heartbeat.remove(&id);
            f.detector.forget(&id);
        }
        changes.extend(f.detector.tick(clock));
        for change in changes {
            match &change {
                LivenessChange::Dead(node) => {
                    ctx.trace(format!("n{} failover: {node} missed its heartbeats", self.me));
                    self.control.failover.changes.push_back(change);
                }
                LivenessChange::Alive(node) => ctx.trace(format!("n{} failover: {node} heartbeats again", self.me)),
            }
        }
        self.failover_continue(ctx);
    }

    /// Re-places the next room of the plan, or plans the next dead node's rooms
    /// (`replace_rooms`, one compare-and-set at a time).
    fn failover_continue(&mut self, ctx: &mut Ctx<'_>) {
        loop {
            if self.control.failover.placing {
                return;
            }
            if let Some(r) = self.control.failover.plan.pop_front() {
                self.control.failover.placing = true;
                let purpose = Purpose::FailoverPlace {
                    room: r.room.clone(),
                    to: r.to.clone(),
                };
                let command = Command::PlaceRoom {
                    room: r.room.clone(),
                    expected_epoch: Some(r.expected_epoch),
                    node: r.to.clone(),
                };
                if let Some(op) = self.propose(ctx, vec![command], purpose) {
                    ctx.observe(Observation::PlaceIntent {
                        origin: self.me,
                        op,
                        kind: PlaceKind::Failover,
                    });
                }
                return;
            }
            let Some(LivenessChange::Dead(dead)) = self.control.failover.changes.pop_front() else {
                return;
            };
            let clock = self.clock_ms(ctx);
            let nodes = self.node_views(clock);
            let region = nodes
                .iter()
                .find(|n| n.id == dead)
                .map(|n| n.region.clone())
                .unwrap_or_default();
            let rooms: Vec<(RoomId, NodeId, u64)> = self
                .core
                .state()
                .read()
                .rooms()
                .values()
                .map(|p| (p.room.clone(), p.node.clone(), p.epoch))
                .collect();
            let mut candidates = Self::candidates(&nodes);
            for c in &mut candidates {
                c.available &= !self.control.failover.detector.is_dead(&c.id);
            }
            let plan = plan_failover(&dead, &region, &rooms, &candidates, &Thresholds::default());
            ctx.trace(format!("n{} failover plan for {dead}: {} rooms", self.me, plan.len()));
            self.control.failover.plan = plan.into();
        }
    }

    // ----- directory -----

    /// Makes sure `room` is held here (`get_or_create`), then tells `waiter`. A relay's
    /// re-locate always reads the directory.
    pub(crate) fn ensure_room(&mut self, ctx: &mut Ctx<'_>, room: RoomId, waiter: RoomWaiter) {
        if !matches!(waiter, RoomWaiter::Relocate) && self.control.rooms.contains_key(&room) {
            self.room_ready(ctx, &room, waiter, Ok(None));
            return;
        }
        if let Some(locate) = self.control.locates.get_mut(&room) {
            locate.waiters.push(waiter);
            return;
        }
        self.control.locates.insert(
            room.clone(),
            Locate {
                attempt: 0,
                waiters: vec![waiter],
            },
        );
        self.read(ctx, Purpose::LocateRead { room });
    }

    fn locate_read_done(&mut self, ctx: &mut Ctx<'_>, room: RoomId, result: OpResult) {
        if let Err(e) = result {
            self.locate_finish(ctx, &room, Err(format!("directory read failed: {e}")));
            return;
        }
        let clock = self.clock_ms(ctx);
        let current = self.core.state().read().rooms().get(&room).cloned();
        let nodes = self.node_views(clock);
        if let Some(p) = &current {
            let host_alive = nodes.iter().any(|n| n.id == p.node && n.state != NodeState::Dead);
            if host_alive {
                let location = self.location(p);
                self.locate_finish(ctx, &room, location);
                return;
            }
        }
        // Not placed yet, or its host is gone: place it (the compare-and-set on the epoch makes
        // two nodes placing at once agree on one host).
        let region = self.roster.nodes[self.me].region.clone();
        let target = placement::choose(&Self::candidates(&nodes), Some(&region), &Thresholds::default())
            .unwrap_or_else(|| self.node_id().clone());
        let command = Command::PlaceRoom {
            room: room.clone(),
            expected_epoch: current.map(|p| p.epoch),
            node: target,
        };
        if let Some(op) = self.propose(ctx, vec![command], Purpose::LocatePlace { room }) {
            ctx.observe(Observation::PlaceIntent {
                origin: self.me,
                op,
                kind: PlaceKind::Place,
            });
        }
    }

    fn locate_place_done(&mut self, ctx: &mut Ctx<'_>, room: RoomId, result: OpResult) {
        match result.as_deref() {
            Ok([Outcome::Placed(p)]) => {
                let location = self.location(p);
                self.locate_finish(ctx, &room, location);
            }
            Ok([Outcome::EpochConflict(_)]) => {
                let retry = self.control.locates.get_mut(&room).is_some_and(|l| {
                    l.attempt += 1;
                    l.attempt < PLACE_ATTEMPTS_MAX
                });
                if retry {
                    self.read(ctx, Purpose::LocateRead { room });
                } else {
                    let why = format!("room placement kept changing for {room}");
                    self.locate_finish(ctx, &room, Err(why));
                }
            }
            Ok(other) => {
                let why = format!("placement refused: {other:?}");
                self.locate_finish(ctx, &room, Err(why));
            }
            Err(e) => {
                let why = e.to_string();
                self.locate_finish(ctx, &room, Err(why));
            }
        }
    }

    fn location(&self, p: &Placement) -> Result<Location, String> {
        if p.node == *self.node_id() {
            return Ok(Location::Here { epoch: p.epoch });
        }
        if self.core.state().read().nodes().contains_key(&p.node) {
            Ok(Location::There {
                host: p.node.clone(),
                epoch: p.epoch,
            })
        } else {
            Err(format!("room host {} is not registered", p.node))
        }
    }

    fn locate_finish(&mut self, ctx: &mut Ctx<'_>, room: &RoomId, location: Result<Location, String>) {
        let Some(locate) = self.control.locates.remove(room) else {
            return;
        };
        for waiter in locate.waiters {
            self.room_ready(ctx, room, waiter, Some(location.clone()).transpose());
        }
    }

    /// Applies a located room (`get_or_create`'s modes), then continues the waiter.
    /// `location` is `Ok(None)` when the room was held already.
    fn room_ready(
        &mut self,
        ctx: &mut Ctx<'_>,
        room: &RoomId,
        waiter: RoomWaiter,
        location: Result<Option<Location>, String>,
    ) {
        let relocate = matches!(waiter, RoomWaiter::Relocate);
        let watch = matches!(waiter, RoomWaiter::Watch { .. });
        let ready: Result<(), String> = match location {
            Err(e) => Err(e),
            Ok(None) => Ok(()),
            Ok(Some(Location::Here { epoch })) => {
                if self.control.rooms.contains_key(room) {
                    // A relay of this room becomes its host (failover or migration chose us).
                    self.promote(ctx, room, epoch, "located here");
                    Ok(())
                } else {
                    self.open_room(ctx, room, RoomMode::Host { epoch })
                        .map(|()| self.host_acting(ctx, room, epoch, "created as host"))
                }
            }
            Ok(Some(Location::There { host, epoch })) => {
                if let Some(local) = self.control.rooms.get_mut(room) {
                    if relocate
                        && let RoomMode::Relay {
                            host: followed,
                            epoch: followed_epoch,
                        } = &mut local.mode
                    {
                        *followed = host;
                        *followed_epoch = epoch;
                        local.last_watch_ok_ms = ctx.now_ms;
                    }
                    Ok(())
                } else if watch {
                    // Watched here but hosted elsewhere: nothing to serve.
                    Ok(())
                } else {
                    self.open_room(ctx, room, RoomMode::Relay { host, epoch })
                }
            }
        };
        match waiter {
            RoomWaiter::Join { join } => self.join_room_ready(ctx, join, ready),
            RoomWaiter::Watch { from } => {
                let hosting = match self.control.rooms.get(room).map(|r| &r.mode) {
                    Some(RoomMode::Host { epoch }) => Some(*epoch),
                    _ => None,
                };
                ctx.send(
                    from,
                    Payload::WatchReply {
                        room: room.clone(),
                        hosting,
                    },
                );
            }
            RoomWaiter::Handoff {
                migration,
                from,
                epoch,
                tracks_ms,
            } => match ready {
                Ok(()) => {
                    if let Some(local) = self.control.rooms.get_mut(room) {
                        local.hold_until_ms = Some(ctx.now_ms + HANDOFF_HOLD_MS);
                    }
                    let at_ms = ctx.now_ms + tracks_ms.min(HANDOFF_ANSWER_MAX_MS);
                    ctx.trace(format!(
                        "n{} handoff m{migration} {room}@{epoch} ready at {at_ms}",
                        self.me
                    ));
                    ctx.out.push(Effect::Timer {
                        at_ms,
                        timer: NodeTimer::HandoffReady {
                            migration,
                            room: room.clone(),
                            from,
                            epoch,
                            tracks_ms,
                        },
                    });
                }
                Err(e) => ctx.send(
                    from,
                    Payload::HandoffReply {
                        migration,
                        result: Err(e),
                    },
                ),
            },
            RoomWaiter::Promote { migration, from, epoch } => {
                if ready.is_ok() {
                    self.promote(ctx, room, epoch, "promoted by the migration");
                }
                ctx.send(
                    from,
                    Payload::PromoteReply {
                        migration,
                        result: ready,
                    },
                );
            }
            RoomWaiter::Relocate => {}
        }
    }

    // ----- rooms -----

    /// Opens a local copy of `room` in `mode` (`get_or_create`), within [`ROOMS_PER_NODE_MAX`].
    fn open_room(&mut self, ctx: &Ctx<'_>, room: &RoomId, mode: RoomMode) -> Result<(), String> {
        if self.control.rooms.len() >= ROOMS_PER_NODE_MAX {
            return Err("rooms per node".into());
        }
        let local = LocalRoom {
            mode,
            hold_until_ms: None,
            last_watch_ok_ms: ctx.now_ms,
        };
        self.control.rooms.insert(room.clone(), local);
        Ok(())
    }

    fn host_acting(&mut self, ctx: &mut Ctx<'_>, room: &RoomId, epoch: u64, how: &'static str) {
        ctx.trace(format!("n{} hosts {room}@{epoch} ({how})", self.me));
        ctx.observe(Observation::HostActing {
            node: self.me,
            room: room.clone(),
            epoch,
        });
    }

    /// Becomes the room's host under `epoch` (`Room::promote`).
    fn promote(&mut self, ctx: &mut Ctx<'_>, room: &RoomId, epoch: u64, how: &'static str) {
        let Some(local) = self.control.rooms.get_mut(room) else {
            return;
        };
        if let RoomMode::Host { epoch: current } = local.mode
            && current >= epoch
        {
            return;
        }
        local.mode = RoomMode::Host { epoch };
        self.host_acting(ctx, room, epoch, how);
    }

    /// Another node hosts the room now: its sessions here move, the room relays
    /// (`Room::demote`).
    fn demote(&mut self, ctx: &mut Ctx<'_>, room: &RoomId, host: NodeId, epoch: u64) {
        let Some(local) = self.control.rooms.get_mut(room) else {
            return;
        };
        match &mut local.mode {
            RoomMode::Relay {
                host: current,
                epoch: current_epoch,
            } => {
                if epoch >= *current_epoch {
                    *current = host;
                    *current_epoch = epoch;
                }
            }
            RoomMode::Host { epoch: hosted } => {
                if epoch < *hosted {
                    return;
                }
                let old = *hosted;
                local.mode = RoomMode::Relay {
                    host: host.clone(),
                    epoch,
                };
                local.last_watch_ok_ms = ctx.now_ms;
                ctx.trace(format!("n{} demoted {room}@{old}: {host} hosts it at {epoch}", self.me));
                ctx.observe(Observation::HostStopped {
                    node: self.me,
                    room: room.clone(),
                    epoch: old,
                });
                if let Some(to) = self.roster.by_id(&host) {
                    self.move_sessions(ctx, room, to);
                }
            }
        }
    }

    /// Every room compares its mode with this node's replica (`Room::check_fence`); relayed
    /// rooms nobody watches any more close.
    fn fence(&mut self, ctx: &mut Ctx<'_>) {
        let rooms: Vec<RoomId> = self.control.rooms.keys().cloned().collect();
        for room in rooms {
            let Some(current) = self.core.state().read().rooms().get(&room).cloned() else {
                continue;
            };
            if !self.core.state().read().nodes().contains_key(&current.node) {
                // Its host left the cluster: placed again, as a join would (`StoreDirectory::
                // current`); the next fence follows the new placement (seed 2639).
                self.ensure_room(ctx, room, RoomWaiter::Relocate);
                continue;
            }
            let Some(mode) = self.control.rooms.get(&room).map(|r| r.mode.clone()) else {
                continue;
            };
            let mine = current.node == *self.node_id();
            match mode {
                RoomMode::Host { epoch } if current.epoch > epoch => {
                    if mine {
                        self.promote(ctx, &room, current.epoch, "fence");
                    } else {
                        self.demote(ctx, &room, current.node.clone(), current.epoch);
                    }
                }
                RoomMode::Relay { host, epoch } if current.epoch > epoch && current.node != host => {
                    if mine {
                        self.promote(ctx, &room, current.epoch, "fence");
                    } else if let Some(local) = self.control.rooms.get_mut(&room) {
                        local.mode = RoomMode::Relay {
                            host: current.node.clone(),
                            epoch: current.epoch,
                        };
                        local.last_watch_ok_ms = ctx.now_ms;
                    }
                }
                _ => {}
            }
        }
        let now = ctx.now_ms;
        let sessions = &self.sessions;
        let migrations = &self.control.migrations;
        self.control.rooms.retain(|room, local| {
            let relay = matches!(local.mode, RoomMode::Relay { .. });
            let held = local.hold_until_ms.is_some_and(|until| until > now);
            let migrating = migrations.values().any(|m| m.room == *room);
            !relay || held || migrating || sessions.in_room(room) > 0
        });
    }

    /// Relayed rooms with viewers ask their host for the stream; a silent host is re-located.
    fn relay_checks(&mut self, ctx: &mut Ctx<'_>) {
        let mut watch = Vec::new();
        let mut relocate = Vec::new();
        for (room, local) in &mut self.control.rooms {
            let RoomMode::Relay { host, .. } = &local.mode else {
                continue;
            };
            if self.sessions.in_room(room) == 0 {
                continue;
            }
            if ctx.now_ms.saturating_sub(local.last_watch_ok_ms) > RELAY_SILENT_MS {
                local.last_watch_ok_ms = ctx.now_ms;
                relocate.push(room.clone());
            } else if let Some(to) = self.roster.by_id(host) {
                watch.push((to, room.clone()));
            }
        }
        for (to, room) in watch {
            ctx.send(to, Payload::Watch { room });
        }
        for room in relocate {
            ctx.trace(format!("n{} relay of {room} re-locates its host", self.me));
            self.ensure_room(ctx, room, RoomWaiter::Relocate);
        }
    }

    // ----- mesh messages -----

    /// A mesh message from `from`.
    pub(crate) fn on_mesh_message(&mut self, ctx: &mut Ctx<'_>, from: NodeIndex, payload: Payload) {
        match payload {
            Payload::Handoff {
                migration,
                room,
                epoch,
                tracks_ms,
            } => self.ensure_room(
                ctx,
                room,
                RoomWaiter::Handoff {
                    migration,
                    from,
                    epoch,
                    tracks_ms,
                },
            ),
            Payload::HandoffReply { migration, result } => {
                let Some(run) = self.control.migrations.get_mut(&migration) else {
                    return;
                };
                if !matches!(run.blocked, Blocked::Handoff { .. }) {
                    return;
                }
                run.blocked = Blocked::No;
                run.events.push_back(match result {
                    Ok(()) => MigrationEvent::HandoffAccepted,
                    Err(e) => MigrationEvent::HandoffFailed(e),
                });
                self.pump_migration(ctx, migration);
            }
            Payload::Promote { migration, room, epoch } => {
                self.ensure_room(ctx, room, RoomWaiter::Promote { migration, from, epoch })
            }
            Payload::PromoteReply { migration, .. } => self.promote_returned(ctx, migration),
            Payload::Watch { room } => match self.control.rooms.get(&room).map(|r| r.mode.clone()) {
                Some(RoomMode::Host { epoch }) => ctx.send(
                    from,
                    Payload::WatchReply {
                        room,
                        hosting: Some(epoch),
                    },
                ),
                Some(RoomMode::Relay { .. }) => ctx.send(from, Payload::WatchReply { room, hosting: None }),
                None => self.ensure_room(ctx, room, RoomWaiter::Watch { from }),
            },
            Payload::WatchReply { room, hosting } => {
                let from_id = self.roster.nodes[from].id.clone();
                let Some(local) = self.control.rooms.get_mut(&room) else {
                    return;
                };
                let RoomMode::Relay { host, epoch } = &mut local.mode else {
                    return;
                };
                if *host != from_id {
                    return;
                }
                match hosting {
                    Some(e) => {
                        local.last_watch_ok_ms = ctx.now_ms;
                        *epoch = (*epoch).max(e);
                    }
                    None => {
                        // The stream ended: re-locate at once.
                        local.last_watch_ok_ms = ctx.now_ms;
                        self.ensure_room(ctx, room, RoomWaiter::Relocate);
                    }
                }
            }
            Payload::Raft(_) | Payload::Forward { .. } | Payload::ForwardReply { .. } => {}
        }
    }

    /// A mesh call to `to` was refused (its process is down).
    pub(crate) fn on_mesh_refused(&mut self, ctx: &mut Ctx<'_>, to: NodeIndex, payload: Payload) {
        match payload {
            Payload::Handoff { migration, .. } => {
                if let Some(run) = self.control.migrations.get_mut(&migration)
                    && matches!(run.blocked, Blocked::Handoff { .. })
                {
                    run.blocked = Blocked::No;
                    run.events
                        .push_back(MigrationEvent::HandoffFailed("connection refused".into()));
                    self.pump_migration(ctx, migration);
                }
            }
            Payload::Promote { migration, .. } => self.promote_returned(ctx, migration),
            Payload::Watch { room } => {
                let to_id = self.roster.nodes[to].id.clone();
                if let Some(local) = self.control.rooms.get_mut(&room)
                    && matches!(&local.mode, RoomMode::Relay { host, .. } if *host == to_id)
                {
                    // The stream ended: the next relay check re-locates.
                    local.last_watch_ok_ms = 0;
                }
            }
            _ => {}
        }
    }

    /// The target's handoff is ready: it answers the source.
    pub(crate) fn on_handoff_ready(
        &mut self,
        ctx: &mut Ctx<'_>,
        migration: u64,
        room: RoomId,
        from: NodeIndex,
        epoch: u64,
        tracks_ms: u64,
    ) {
        let result = if tracks_ms > HANDOFF_ANSWER_MAX_MS {
            Err(format!("tracks not relayed within {HANDOFF_ANSWER_MAX_MS} ms"))
        } else if self.control.rooms.contains_key(&room) {
            ctx.observe(Observation::HandoffTaken {
                node: self.me,
                room: room.clone(),
                epoch,
            });
            Ok(())
        } else {
            Err("the room closed".into())
        };
        ctx.send(from, Payload::HandoffReply { migration, result });
    }

    // ----- migrations (source side) -----

    /// Starts migrating `room` from here to `to` (`migrate`): the room must be hosted here, not
    /// migrating already, and the target alive.
    pub fn start_migration(
        &mut self,
        ctx: &mut Ctx<'_>,
        room: &RoomId,
        to: &NodeId,
        tracks_ms: u64,
        origin: MigrationOrigin,
    ) -> Result<u64, String> {
        let Some(RoomMode::Host { epoch }) = self.control.rooms.get(room).map(|r| r.mode.clone()) else {
            return Err(format!("room {room} is not hosted on this node"));
        };
        if self.control.migrations.values().any(|m| m.room == *room)
            || self.control.migrations.len() >= MIGRATIONS_PER_NODE_MAX
        {
            return Err(format!("room {room} is being migrated already"));
        }
        if to == self.node_id() {
            return Err(format!("room {room} is already on {to}"));
        }
        let clock = self.clock_ms(ctx);
        match self.node_views(clock).iter().find(|n| n.id == *to) {
            None => return Err(format!("no node {to} in the cluster")),
            Some(n) if n.state != NodeState::Alive => return Err(format!("node {to} is {:?}, not alive", n.state)),
            Some(_) => {}
        }
        let Some(to_index) = self.roster.by_id(to) else {
            return Err(format!("no node {to} in the roster"));
        };
        let mut core = Migration::new(
            room.clone(),
            self.node_id().clone(),
            to.clone(),
            epoch,
            HANDOFF_TIMEOUT_MS,
            CLIENTS_DEADLINE_MS,
        );
        if ctx.faults.skip_epoch_check {
            core = core.with_faults(MigrationFaults { skip_epoch_check: true });
        }
        let id = (self.incarnation << 32) | self.control.next_migration;
        self.control.next_migration += 1;
        self.control.migrations.insert(
            id,
            MigrationRun {
                room: room.clone(),
                to: to.clone(),
                to_index,
                core,
                events: VecDeque::from([MigrationEvent::Start { now_ms: clock }]),
                blocked: Blocked::No,
                next_poll_ms: clock + MIGRATION_POLL_MS,
                tracks_ms,
                origin,
                moved_epoch: 0,
                flip: None,
            },
        );
        ctx.observe(Observation::MigrationStarted {
            node: self.me,
            migration: id,
            room: room.clone(),
            epoch,
            to: to.clone(),
        });
        self.pump_migration(ctx, id);
        Ok(id)
    }

    fn poll_migrations(&mut self, ctx: &mut Ctx<'_>, clock: u64) {
        let ids: Vec<u64> = self.control.migrations.keys().copied().collect();
        for id in ids {
            let sessions_left = {
                let Some(run) = self.control.migrations.get(&id) else {
                    continue;
                };
                self.sessions.in_room(&run.room)
            };
            let Some(run) = self.control.migrations.get_mut(&id) else {
                continue;
            };
            match run.blocked {
                Blocked::Handoff { deadline_ms } if clock >= deadline_ms => {
                    run.blocked = Blocked::No;
                    run.events.push_back(MigrationEvent::HandoffFailed(
                        "the target did not take the room in time".into(),
                    ));
                }
                Blocked::Promote { deadline_ms } if clock >= deadline_ms => {
                    self.promote_returned(ctx, id);
                    continue;
                }
                Blocked::FlipRetry { at_ms } if clock >= at_ms => {
                    self.propose_flip(ctx, id);
                    continue;
                }
                Blocked::No if run.events.is_empty() && clock >= run.next_poll_ms => {
                    run.next_poll_ms = clock + MIGRATION_POLL_MS;
                    run.events.push_back(MigrationEvent::Tick { now_ms: clock });
                    run.events.push_back(MigrationEvent::SessionsLeft(sessions_left));
                }
                _ => continue,
            }
            self.pump_migration(ctx, id);
        }
    }

    /// Feeds the migration's queued events to its core and carries out the actions, until it
    /// blocks on a call or runs out of events.
    fn pump_migration(&mut self, ctx: &mut Ctx<'_>, id: u64) {
        loop {
            let clock = self.clock_ms(ctx);
            let Some(run) = self.control.migrations.get_mut(&id) else {
                return;
            };
            if run.blocked != Blocked::No {
                return;
            }
            let Some(event) = run.events.pop_front() else {
                return;
            };
            let actions = run.core.handle(event);
            for action in actions {
                let Some(run) = self.control.migrations.get_mut(&id) else {
                    return;
                };
                let room = run.room.clone();
                match action {
                    MigrationAction::SendHandoff { to: _, epoch } => {
                        run.blocked = Blocked::Handoff {
                            deadline_ms: clock + HANDOFF_TIMEOUT_MS,
                        };
                        let (to, tracks_ms) = (run.to_index, run.tracks_ms);
                        ctx.send(
                            to,
                            Payload::Handoff {
                                migration: id,
                                room,
                                epoch,
                                tracks_ms,
                            },
                        );
                    }
                    MigrationAction::ProposeFlip { expected_epoch, to } => {
                        run.flip = Some(FlipAttempt {
                            expected_epoch,
                            to,
                            deadline_ms: clock + FLIP_OUTCOME_DEADLINE_MS,
                        });
                        self.propose_flip(ctx, id);
                    }
                    MigrationAction::TellClientsMoved { to: _, epoch } => {
                        run.blocked = Blocked::Promote {
                            deadline_ms: clock + CALL_TIMEOUT_MS,
                        };
                        run.moved_epoch = epoch;
                        let to = run.to_index;
                        ctx.send(
                            to,
                            Payload::Promote {
                                migration: id,
                                room,
                                epoch,
                            },
                        );
                    }
                    // Sessions that cannot move stay; an aborted target's copy closes when its
                    // hold ends (as the real shell).
                    MigrationAction::CloseRemaining | MigrationAction::AbortHandoff { .. } => {}
                    MigrationAction::Finished(outcome) => {
                        let origin = run.origin;
                        let ok = matches!(outcome, MigrationOutcome::Moved { .. });
                        ctx.trace(format!("n{} migration m{id} of {room} finished: {outcome:?}", self.me));
                        ctx.observe(Observation::MigrationFinished {
                            node: self.me,
                            migration: id,
                        });
                        self.control.migrations.remove(&id);
                        if origin == MigrationOrigin::Drain
                            && let Some(d) = &mut self.control.drain
                        {
                            d.core.migrated(&room, ok);
                        }
                        return;
                    }
                }
            }
        }
    }

    /// Proposes the migration's flip (again): one attempt of `migrate.rs::flip`'s loop.
    fn propose_flip(&mut self, ctx: &mut Ctx<'_>, id: u64) {
        let Some(run) = self.control.migrations.get_mut(&id) else {
            return;
        };
        let Some(flip) = run.flip.clone() else {
            return;
        };
        run.blocked = Blocked::Flip;
        let room = run.room.clone();
        let handoff_epoch = run.core.epoch();
        // `None` only under the skip-epoch-check fault: an unconditional write, i.e. a
        // compare-and-set on whatever this node's replica shows now.
        let expected = match flip.expected_epoch {
            Some(e) => Some(e),
            None => self.core.state().read().rooms().get(&room).map(|p| p.epoch),
        };
        let command = Command::PlaceRoom {
            room,
            expected_epoch: expected,
            node: flip.to,
        };
        if let Some(op) = self.propose(ctx, vec![command], Purpose::Flip { migration: id }) {
            ctx.observe(Observation::PlaceIntent {
                origin: self.me,
                op,
                kind: PlaceKind::Migration {
                    from: self.node_id().clone(),
                    handoff_epoch,
                },
            });
        }
    }

    /// The promote call returned (or timed out): demote the room here (`TellClientsMoved`).
    fn promote_returned(&mut self, ctx: &mut Ctx<'_>, id: u64) {
        let Some(run) = self.control.migrations.get_mut(&id) else {
            return;
        };
        if !matches!(run.blocked, Blocked::Promote { .. }) {
            return;
        }
        run.blocked = Blocked::No;
        let (room, to, epoch) = (run.room.clone(), run.to.clone(), run.moved_epoch);
        if self.core.state().read().nodes().contains_key(&to) {
            self.demote(ctx, &room, to, epoch);
        }
        self.pump_migration(ctx, id);
    }

    // ----- drain -----

    /// Starts draining this node (`drain`): marks it draining, then migrates its rooms.
    pub fn start_drain(&mut self, ctx: &mut Ctx<'_>) -> Result<(), String> {
        if self.control.drain.is_some() {
            return Err("draining already".into());
        }
        let clock = self.clock_ms(ctx);
        let node = self.node_id().clone();
        let region = self.roster.nodes[self.me].region.clone();
        self.control.drain = Some(DrainRun {
            core: Drain::new(
                node.clone(),
                region,
                DrainConfig {
                    deadline_ms: DRAIN_DEADLINE_MS,
                    ..DrainConfig::default()
                },
                clock,
            ),
            started: false,
            next_tick_ms: clock,
            leaving: false,
            evacuated: BTreeSet::new(),
        });
        self.propose(
            ctx,
            vec![Command::SetNodeDraining { node, draining: true }],
            Purpose::SetDraining,
        );
        Ok(())
    }

    fn drain_tick(&mut self, ctx: &mut Ctx<'_>, clock: u64) {
        let Some(d) = &mut self.control.drain else {
            return;
        };
        if !d.started || d.leaving || clock < d.next_tick_ms {
            return;
        }
        d.next_tick_ms = clock + DRAIN_TICK_MS;
        let hosted: Vec<(RoomId, u64)> = self
            .control
            .rooms
            .iter()
            .filter_map(|(room, r)| match r.mode {
                RoomMode::Host { epoch } => Some((room.clone(), epoch)),
                RoomMode::Relay { .. } => None,
            })
            .collect();
        // Viewers of rooms relayed here go to the host (they may watch from any node).
        let mut evacuate = Vec::new();
        for (room, r) in &self.control.rooms {
            if let RoomMode::Relay { host, .. } = &r.mode
                && let Some(d) = &mut self.control.drain
                && d.evacuated.insert(room.clone())
                && let Some(to) = self.roster.by_id(host)
            {
                evacuate.push((room.clone(), to));
            }
        }
        for (room, to) in evacuate {
            self.move_sessions(ctx, &room, to);
        }
        let sessions = self.sessions.by_viewer.len();
        let candidates = Self::candidates(&self.node_views(clock));
        let Some(d) = &mut self.control.drain else {
            return;
        };
        d.core.rooms(hosted);
        d.core.sessions_left(sessions);
        let actions = d.core.tick(clock, &candidates, &Thresholds::default());
        for action in actions {
            match action {
                DrainAction::Migrate { room, to, .. } => {
                    let tracks_ms = ctx.random_range(20..=400);
                    if let Err(e) = self.start_migration(ctx, &room, &to, tracks_ms, MigrationOrigin::Drain) {
                        ctx.trace(format!("n{} drain could not migrate {room}: {e}", self.me));
                        if let Some(d) = &mut self.control.drain {
                            d.core.migrated(&room, false);
                        }
                    }
                }
                DrainAction::CloseRemaining => {
                    ctx.trace(format!("n{} drain deadline: closing what is left", self.me));
                    self.close_sessions(ctx);
                    let rooms = std::mem::take(&mut self.control.rooms);
                    for (room, local) in rooms {
                        if let RoomMode::Host { epoch } = local.mode {
                            ctx.observe(Observation::HostStopped {
                                node: self.me,
                                room: room.clone(),
                                epoch,
                            });
                            // A hosted room that closes releases its placement.
                            let room_id = room.clone();
                            self.propose(
                                ctx,
                                vec![Command::DeleteRoom {
                                    room,
                                    expected_epoch: epoch,
                                }],
                                Purpose::Release { room: room_id },
                            );
                        }
                    }
                }
                DrainAction::Leave => {
                    if let Some(d) = &mut self.control.drain {
                        d.leaving = true;
                    }
                    let node = self.node_id().clone();
                    self.propose(ctx, vec![Command::RemoveNode { node }], Purpose::Leave);
                }
            }
        }
    }
}
