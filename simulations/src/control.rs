//! The node's control plane as an effect executor around the same sans-IO cores of
//! `cluster::mesh` that `src/` runs: the decisions are the cores', this module carries out
//! their steps through the simulated replica and network, as the node's async shells do
//! through the store and gRPC.
//!
//! - **lifecycle** (`Store::run_lifecycle`, `node::report_load`): register until the state
//!   machine holds this node's registration, then a `Command::Heartbeat` with the node's load
//!   every [`HEARTBEAT_INTERVAL_MS`] (one at a time; a slow one delays the next).
//! - **failover** ([`FailoverLoop`], as `src/mesh/failover.rs` drives it): ticked every
//!   [`FAILOVER_TICK_MS`]; its steps (read the directory, one compare-and-set at a time) are
//!   carried out here.
//! - **directory** ([`Locate`], as `src/directory.rs` drives it for `get_or_create`): the
//!   linearizable read and the `PlaceRoom` compare-and-set it asks for.
//! - **rooms** (`actors/src/room.rs`): a local room is `Host { epoch }` or `Relay { host }`;
//!   `promote` and `demote` as the room actor does them; every [`FENCE_INTERVAL_MS`] each
//!   room runs [`fence::check`] against this node's replica (`StoreDirectory::fence`), and a
//!   room whose host left the cluster is located again and then compared.
//! - **relays** (`src/mesh/relay.rs`): a relayed room with viewers keeps asking its host for the
//!   stream (`Watch`, standing in for `PullTrack`); a host that stays silent for
//!   [`RELAY_SILENT_MS`] or answers that it does not host makes the relay re-locate.
//! - **migration** (`src/mesh/migrate.rs`): the [`Migration`] core fed with its events; the
//!   shell blocks on the handoff call, the flip and the promote call as the real one awaits
//!   them; `Handoff`/`Promote` on the target. The flip's outcome is [`FlipAttempt`]'s, as in
//!   `migrate.rs::flip`; the shell proposes it again when told.
//! - **drain** (`src/mesh/migrate.rs::drain`): the [`Drain`] core every [`DRAIN_TICK_MS`].
//!
//! What is this module's own is the world the cores run in, modelled: the room actors' modes,
//! holds and closing (`LocalRoom`), the relay's pull stream (a keepalive, `relay_checks`), the
//! handoff target's readiness (`tracks_ms`), waiting on calls (`Blocked`), the registration
//! backoff and the node's load report.
//!
//! Under the `skip_epoch_check` fault the migration core proposes the flip with
//! `expected_epoch: None`; the shell carries that out as the unconditional overwrite it stands
//! for: a compare-and-set on whatever epoch this node's replica shows at that moment.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use mediamesh_cluster::command::{Command, Outcome};
use mediamesh_cluster::mesh::directory::{Locate as LocateCore, LocateStep, PlaceResult, Resolved};
use mediamesh_cluster::mesh::drain::{Drain, DrainAction, DrainConfig};
use mediamesh_cluster::mesh::failover::{FailoverLoop, FailoverStep};
use mediamesh_cluster::mesh::fence::{self, FenceAction, Held};
use mediamesh_cluster::mesh::flip::{FlipAttempt, FlipResult, FlipStep};
use mediamesh_cluster::mesh::liveness::LivenessChange;
use mediamesh_cluster::mesh::migration::{
    Faults as MigrationFaults, Migration, MigrationAction, MigrationEvent, MigrationOutcome, Phase,
};
use mediamesh_cluster::mesh::placement::{self, Thresholds};
use mediamesh_cluster::mesh::timing::CALL_TIMEOUT_MS;
use mediamesh_cluster::types::{NodeLoad, NodeRegistration, NodeState, NodeStatus};
use mediamesh_cluster::{NodeId, RoomId};

use crate::checkers::{Observation, PlaceKind};
use crate::config::{
    CLIENTS_DEADLINE_MS, DEAD_AFTER_MISSED, DRAIN_DEADLINE_MS, DRAIN_TICK_MS, FAILOVER_TICK_MS, FENCE_INTERVAL_MS,
    HANDOFF_ANSWER_MAX_MS, HANDOFF_HOLD_MS, HANDOFF_TIMEOUT_MS, HEARTBEAT_INTERVAL_MS, MIGRATION_POLL_MS,
    NODE_CAPACITY, NODE_DEAD_AFTER_MS, RELAY_CHECK_MS, RELAY_SILENT_MS,
};
use crate::message::{NodeIndex, Payload};
use crate::node::{Ctx, Effect, Live, NodeTimer, OpResult, Purpose};

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
    /// The fence found the room's host gone: placed again, then compared as the fence does
    /// (`StoreDirectory::fence`). Always reads the directory.
    Fence,
}

/// A lookup in flight: the core, and who waits for it.
#[derive(Debug)]
struct Locate {
    core: LocateCore,
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
    failover: FailoverLoop,
    failover_next_ms: u64,
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
            failover: FailoverLoop::new(HEARTBEAT_INTERVAL_MS, DEAD_AFTER_MISSED),
            failover_next_ms: 0,
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

    /// The registered nodes as this node reads them (`Store::nodes`, through the same
    /// `StateMachine::node_statuses`: alive by the last heartbeat on this node's clock,
    /// membership by the replica's configuration).
    pub fn node_views(&self, clock_ms: u64) -> Vec<NodeStatus> {
        let status = self.core.status();
        self.core
            .state()
            .read()
            .node_statuses(&status.voters, &status.learners, clock_ms, NODE_DEAD_AFTER_MS)
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
        if clock >= self.control.failover_next_ms {
            self.control.failover_next_ms = clock + FAILOVER_TICK_MS;
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
                self.control.failover.placed();
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
                // As `migrate.rs::flip` does: the answer to the core, the step from it.
                let result = match result {
                    Ok(outcomes) => match <[Outcome; 1]>::try_from(outcomes) {
                        Ok([Outcome::Placed(p)]) => FlipResult::Placed(p),
                        Ok([Outcome::EpochConflict(current)]) => FlipResult::Conflict(current),
                        other => FlipResult::Refused(format!("unexpected outcome {other:?}")),
                    },
                    Err(e) => FlipResult::Unknown(e.to_string()),
                };
                let conflict = matches!(result, FlipResult::Conflict(_));
                let answer = match &result {
                    FlipResult::Unknown(e) | FlipResult::Refused(e) => e.clone(),
                    FlipResult::Placed(_) | FlipResult::Conflict(_) => String::new(),
                };
                let event = match flip.answer(result, clock) {
                    FlipStep::Report(event) => {
                        if let (true, MigrationEvent::Flipped { epoch }) = (conflict, &event) {
                            ctx.trace(format!(
                                "n{} migration m{migration}: an earlier attempt of the flip applied (epoch {epoch})",
                                self.me
                            ));
                        }
                        event
                    }
                    FlipStep::RetryAt { at_ms } => {
                        ctx.trace(format!(
                            "n{} migration m{migration}: the flip's outcome is unknown ({answer}); proposing it again",
                            self.me
                        ));
                        run.blocked = Blocked::FlipRetry { at_ms };
                        return;
                    }
                    FlipStep::GiveUp => {
                        let current_epoch = self.core.state().read().rooms().get(&run.room).map(|p| p.epoch);
                        ctx.trace(format!(
                            "n{} migration m{migration}: the flip's outcome is still unknown ({answer}); giving up with this replica's epoch {current_epoch:?}",
                            self.me
                        ));
                        FlipAttempt::give_up(current_epoch)
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
        let leader = self.leader_id().as_ref() == Some(self.node_id());
        let nodes = if leader { self.node_views(clock) } else { Vec::new() };
        let me = self.node_id().clone();
        for change in self.control.failover.tick(clock, &me, leader, &nodes) {
            match &change {
                LivenessChange::Dead(node) => ctx.trace(format!("n{} failover: {node} missed its heartbeats", self.me)),
                LivenessChange::Alive(node) => ctx.trace(format!("n{} failover: {node} heartbeats again", self.me)),
            }
        }
        self.failover_continue(ctx);
    }

    /// Carries out the failover loop's steps until it waits for a compare-and-set
    /// (`src/mesh/failover.rs::carry_out`).
    fn failover_continue(&mut self, ctx: &mut Ctx<'_>) {
        loop {
            match self.control.failover.next_step() {
                FailoverStep::Idle => return,
                FailoverStep::ReadRooms { dead } => {
                    // This replica's view, as `Store::rooms(Consistency::Local)`.
                    let clock = self.clock_ms(ctx);
                    let nodes = self.node_views(clock);
                    let rooms: Vec<_> = self.core.state().read().rooms().values().cloned().collect();
                    let planned = self.control.failover.plan(&nodes, &rooms, &Thresholds::default());
                    ctx.trace(format!("n{} failover plan for {dead}: {planned} rooms", self.me));
                }
                FailoverStep::Place(r) => {
                    let purpose = Purpose::FailoverPlace {
                        room: r.room.clone(),
                        to: r.to.clone(),
                    };
                    let command = Command::PlaceRoom {
                        room: r.room,
                        expected_epoch: Some(r.expected_epoch),
                        node: r.to,
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
            }
        }
    }

    // ----- directory -----

    /// Makes sure `room` is held here (`get_or_create`), then tells `waiter`. A relay's
    /// re-locate and the fence always read the directory.
    pub(crate) fn ensure_room(&mut self, ctx: &mut Ctx<'_>, room: RoomId, waiter: RoomWaiter) {
        let reads = matches!(waiter, RoomWaiter::Relocate | RoomWaiter::Fence);
        if !reads && self.control.rooms.contains_key(&room) {
            self.room_ready(ctx, &room, waiter, Ok(None));
            return;
        }
        if let Some(locate) = self.control.locates.get_mut(&room) {
            locate.waiters.push(waiter);
            return;
        }
        let region = self.roster.nodes[self.me].region.clone();
        self.control.locates.insert(
            room.clone(),
            Locate {
                core: LocateCore::new(room.clone(), self.node_id().clone(), region),
                waiters: vec![waiter],
            },
        );
        self.locate_step(ctx, room, LocateStep::Read);
    }

    /// Carries out one step of the lookup's core (`src/directory.rs::locate`).
    fn locate_step(&mut self, ctx: &mut Ctx<'_>, room: RoomId, step: LocateStep) {
        match step {
            LocateStep::Read => self.read(ctx, Purpose::LocateRead { room }),
            LocateStep::Place { expected_epoch, node } => {
                let command = Command::PlaceRoom {
                    room: room.clone(),
                    expected_epoch,
                    node,
                };
                if let Some(op) = self.propose(ctx, vec![command], Purpose::LocatePlace { room }) {
                    ctx.observe(Observation::PlaceIntent {
                        origin: self.me,
                        op,
                        kind: PlaceKind::Place,
                    });
                }
            }
            LocateStep::Done(resolved) => self.locate_finish(ctx, &room, resolved),
        }
    }

    fn locate_read_done(&mut self, ctx: &mut Ctx<'_>, room: RoomId, result: OpResult) {
        if let Err(e) = result {
            self.locate_finish(ctx, &room, Err(format!("directory read failed: {e}")));
            return;
        }
        let clock = self.clock_ms(ctx);
        let nodes = self.node_views(clock);
        let current = self.core.state().read().rooms().get(&room).cloned();
        let Some(locate) = self.control.locates.get_mut(&room) else {
            return;
        };
        let step = locate.core.read(current.as_ref(), &nodes, &Thresholds::default());
        self.locate_step(ctx, room, step);
    }

    fn locate_place_done(&mut self, ctx: &mut Ctx<'_>, room: RoomId, result: OpResult) {
        let result = match result {
            Ok(outcomes) => match <[Outcome; 1]>::try_from(outcomes) {
                Ok([Outcome::Placed(p)]) => PlaceResult::Placed(p),
                Ok([Outcome::EpochConflict(_)]) => PlaceResult::Conflict,
                other => PlaceResult::Failed(format!("placement refused: {other:?}")),
            },
            Err(e) => PlaceResult::Failed(e.to_string()),
        };
        let clock = self.clock_ms(ctx);
        let nodes = self.node_views(clock);
        let Some(locate) = self.control.locates.get_mut(&room) else {
            return;
        };
        let step = locate.core.placed(result, &nodes);
        self.locate_step(ctx, room, step);
    }

    fn locate_finish(&mut self, ctx: &mut Ctx<'_>, room: &RoomId, location: Result<Resolved, String>) {
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
        location: Result<Option<Resolved>, String>,
    ) {
        if matches!(waiter, RoomWaiter::Fence) {
            // The node's fence compares the new placement with the room's mode at once.
            if let Ok(Some(resolved)) = location {
                let (host, epoch) = match resolved {
                    Resolved::Here { epoch } => (self.node_id().clone(), epoch),
                    Resolved::There { node, epoch } => (node, epoch),
                };
                if let Some(held) = self.held(room) {
                    let action = fence::compare(self.node_id(), &held, &host, epoch);
                    self.apply_fence(ctx, room, action);
                }
            }
            return;
        }
        let relocate = matches!(waiter, RoomWaiter::Relocate);
        let watch = matches!(waiter, RoomWaiter::Watch { .. });
        let ready: Result<(), String> = match location {
            Err(e) => Err(e),
            Ok(None) => Ok(()),
            Ok(Some(Resolved::Here { epoch })) => {
                if self.control.rooms.contains_key(room) {
                    // A relay of this room becomes its host (failover or migration chose us).
                    self.promote(ctx, room, epoch, "located here");
                    Ok(())
                } else {
                    self.open_room(ctx, room, RoomMode::Host { epoch })
                        .map(|()| self.host_acting(ctx, room, epoch, "created as host"))
                }
            }
            Ok(Some(Resolved::There { node: host, epoch })) => {
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
            RoomWaiter::Relocate | RoomWaiter::Fence => {}
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

    /// How `room` is held here, as the fence sees it.
    fn held(&self, room: &RoomId) -> Option<Held> {
        Some(match &self.control.rooms.get(room)?.mode {
            RoomMode::Host { epoch } => Held::Host { epoch: *epoch },
            RoomMode::Relay { host, epoch } => Held::Relay {
                host: host.clone(),
                epoch: *epoch,
            },
        })
    }

    /// Carries out a fence verdict as the room actor does (`Room::check_fence`).
    fn apply_fence(&mut self, ctx: &mut Ctx<'_>, room: &RoomId, action: FenceAction) {
        match action {
            FenceAction::Keep => {}
            FenceAction::Promote { epoch } => self.promote(ctx, room, epoch, "fence"),
            FenceAction::Demote { host, epoch } => self.demote(ctx, room, host, epoch),
            FenceAction::Follow { host, epoch } => {
                if let Some(local) = self.control.rooms.get_mut(room) {
                    local.mode = RoomMode::Relay { host, epoch };
                    local.last_watch_ok_ms = ctx.now_ms;
                }
            }
            // Placed again, then compared (`StoreDirectory::fence`); the next fence follows.
            FenceAction::PlaceAgain => self.ensure_room(ctx, room.clone(), RoomWaiter::Fence),
        }
    }

    /// Every room runs the fence check against this node's replica (`Room::check_fence`,
    /// `StoreDirectory::fence`); relayed rooms nobody watches any more close.
    fn fence(&mut self, ctx: &mut Ctx<'_>) {
        let clock = self.clock_ms(ctx);
        let nodes = self.node_views(clock);
        let rooms: Vec<RoomId> = self.control.rooms.keys().cloned().collect();
        for room in rooms {
            let Some(held) = self.held(&room) else {
                continue;
            };
            let action = fence::check(
                self.node_id(),
                &held,
                self.core.state().read().rooms().get(&room),
                &nodes,
            );
            self.apply_fence(ctx, &room, action);
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
                        run.flip = Some(FlipAttempt::new(expected_epoch, to, clock));
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
        let expected = match flip.expected_epoch() {
            Some(e) => Some(e),
            None => self.core.state().read().rooms().get(&room).map(|p| p.epoch),
        };
        let command = Command::PlaceRoom {
            room,
            expected_epoch: expected,
            node: flip.to().clone(),
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
        let candidates = placement::candidates(&self.node_views(clock));
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
