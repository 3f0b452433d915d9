//! The simulated world: nodes, the network, the viewer clients, one event queue under virtual
//! time and one seeded RNG. Everything that happens is an event popped in `(time, sequence)`
//! order; every event is a line in the [`Trace`]. Time advances in steps of [`STEP_MS`]; after
//! each step the checkers look at the whole world.
//!
//! # The fault schedule
//!
//! Generated from the seed before the run starts, inside `[CHAOS_START_MS, heal)`:
//!
//! - network episodes, one after the other: a region split, one node isolated (both ways or
//!   outbound only), swizzle-clogging (a few nodes' links clogged one by one, unclogged in
//!   random order), a lossy period (drops, duplicates, extra delay);
//! - crashes, independent of those: a node goes down (volatile state lost) and restarts a
//!   while later; at most [`CRASHED_AT_ONCE_MAX`] at once;
//! - admin migrations of rooms picked at run time, and sometimes one drain;
//! - in half the seeds, a *migration race*: a migration starts while its source is cut off
//!   from every node but the target, long enough for the leader to fail the source's rooms
//!   over; the source's flip arrives after the partition heals. With the epoch compare the
//!   flip loses; without it (`--fault skip-epoch-check`) it overwrites the failover.
//!
//! At `heal` everything heals: partitions and clogs go, loss stops, crashed nodes restart.
//! The liveness checks run from then on.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BinaryHeap};
use std::rc::Rc;

use mediamesh_cluster::RoomId;
use mediamesh_cluster::state_machine::StateMachine;
use raft::eraftpb::{ConfState, Snapshot};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::checkers::{At, CheckStats, Checker, Observation, Violation};
use crate::config::{
    CHAOS_START_MS, CLIENT_IN_REGION_LATENCY_MS, CLIENTS, CONTROL_TICK_MS, CRASHED_AT_ONCE_MAX, QUEUE_EVENTS_MAX,
    RAFT_TICK_JITTER_MS, RAFT_TICK_MS, ROOMS, STEP_MS, SimConfig,
};
use crate::control::{MigrationOrigin, RoomMode};
use crate::message::{ClientId, ClientReply, ClientRequest, NodeIndex, Payload};
use crate::network::{Loss, NetStats, Network, Route};
use crate::node::{Ctx, Effect, Live, Node, NodeSpec, NodeTimer, Report, Roster, Undeliverable};
use crate::storage::SimStorage;
use crate::trace::Trace;
use crate::viewers::{Client, ClientEffect, NodeChoice};

/// A fault or an admin action, scheduled from the seed.
#[derive(Clone, Debug)]
pub enum Fault {
    /// Crash a node (if fewer than the maximum are down).
    Crash { node: NodeIndex },
    /// Restart a crashed node.
    Restart { node: NodeIndex },
    /// Block every link between the regions.
    SplitRegions,
    /// Block every link to and from a node (only the outbound ones with `outbound_only`).
    Isolate { node: NodeIndex, outbound_only: bool },
    /// Remove every partition.
    HealPartitions,
    /// Clog one directed link.
    Clog { from: NodeIndex, to: NodeIndex },
    /// Unclog one directed link.
    Unclog { from: NodeIndex, to: NodeIndex },
    /// Make the network lossy.
    Lossy(Loss),
    /// Make the network clean again.
    Clean,
    /// The admin migrates a room (picked at run time) from its host to another node.
    Migrate { tracks_ms: u64 },
    /// A migration whose source is then cut off from all but the target.
    MigrationRace { tracks_ms: u64 },
    /// The admin drains a node (picked at run time).
    Drain,
    /// Everything heals.
    HealAll,
}

#[derive(Debug)]
enum Event {
    RaftTick {
        node: NodeIndex,
        incarnation: u64,
    },
    ControlTick {
        node: NodeIndex,
        incarnation: u64,
    },
    Deliver {
        from: NodeIndex,
        from_incarnation: u64,
        to: NodeIndex,
        payload: Payload,
    },
    Report {
        node: NodeIndex,
        incarnation: u64,
        report: Report,
    },
    Timer {
        node: NodeIndex,
        incarnation: u64,
        timer: NodeTimer,
    },
    ClientToNode {
        client: ClientId,
        node: NodeIndex,
        request: Box<ClientRequest>,
    },
    NodeToClient {
        client: ClientId,
        from: NodeIndex,
        reply: Box<ClientReply>,
    },
    ClientWake {
        client: ClientId,
        token: u64,
    },
    Fault(Fault),
}

struct Scheduled {
    at_ms: u64,
    seq: u64,
    event: Event,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at_ms, self.seq) == (other.at_ms, other.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    // Reversed: BinaryHeap is a max-heap and the earliest event must come first.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at_ms, other.seq).cmp(&(self.at_ms, self.seq))
    }
}

/// Counters of one run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RunStats {
    /// Steps run.
    pub steps: u64,
    /// Events processed.
    pub events: u64,
    /// Faults and admin actions that took effect.
    pub faults: u64,
    /// Migrations started.
    pub migrations: u64,
    /// Crashes.
    pub crashes: u64,
}

/// What one run produced.
#[derive(Clone, Debug)]
pub struct RunReport {
    /// The seed.
    pub seed: u64,
    /// Hex SHA-256 of the trace.
    pub trace_hash: String,
    /// Counters.
    pub stats: RunStats,
    /// What the checkers counted.
    pub checks: CheckStats,
    /// What the network did.
    pub net: NetStats,
    /// Broken invariants (the run stops after the step of the first).
    pub violations: Vec<Violation>,
    /// The trace's last lines when something broke.
    pub trace_tail: Vec<String>,
}

/// The world of one run.
pub struct World {
    config: SimConfig,
    now_ms: u64,
    rng: StdRng,
    queue: BinaryHeap<Scheduled>,
    seq: u64,
    roster: Rc<Roster>,
    nodes: Vec<Node>,
    network: Network,
    clients: Vec<Client>,
    regions: Vec<String>,
    checker: Checker,
    trace: Trace,
    stats: RunStats,
    heal_ms: Option<u64>,
    /// A simulator limit was hit (reported as a shell error).
    overflow: bool,
}

fn node_name(index: NodeIndex, nodes: usize) -> (String, String) {
    // The first 3/5 (rounded up) in Seoul, the rest in Busan: 3 + 2 for five nodes.
    let seoul = (nodes * 3).div_ceil(5);
    if index < seoul {
        (format!("seoul-{}", index + 1), "seoul".into())
    } else {
        (format!("busan-{}", index - seoul + 1), "busan".into())
    }
}

impl World {
    /// Builds the world of `config` (nodes not started yet).
    pub fn new(config: SimConfig) -> Result<Self, String> {
        config.validate()?;
        let mut rng = StdRng::seed_from_u64(config.seed);
        let specs: Vec<NodeSpec> = (0..config.nodes)
            .map(|i| {
                let (id, region) = node_name(i, config.nodes);
                let id = mediamesh_cluster::NodeId::new(id);
                let skew = crate::config::CLOCK_SKEW_MAX_MS as i64;
                NodeSpec {
                    raft_id: mediamesh_cluster::raft_id_for(&id),
                    id,
                    region,
                    skew_ms: rng.random_range(-skew..=skew),
                }
            })
            .collect();
        let regions: Vec<String> = specs.iter().map(|s| s.region.clone()).collect();
        let roster = Rc::new(Roster { nodes: specs });
        // As in production: start from a snapshot at index 1 whose configuration has every
        // node as a voter, and a state machine that applied it.
        let mut initial = StateMachine::default();
        initial.apply_empty(1, 1);
        let mut snapshot = Snapshot::default();
        snapshot.mut_metadata().index = 1;
        snapshot.mut_metadata().term = 1;
        let voters: Vec<u64> = roster.nodes.iter().map(|n| n.raft_id).collect();
        snapshot
            .mut_metadata()
            .set_conf_state(ConfState::from((voters, Vec::<u64>::new())));
        snapshot.set_data(initial.encode_snapshot().into());
        let nodes = (0..config.nodes)
            .map(|i| Node::new(i, SimStorage::from_snapshot(snapshot.clone())))
            .collect();
        let clients = (0..CLIENTS)
            .map(|i| {
                let region = if rng.random_bool(0.6) { "seoul" } else { "busan" };
                let room = RoomId::new(format!("room-{}", rng.random_range(0..ROOMS)));
                Client::new(i, region.into(), room)
            })
            .collect();
        let heal_ms = config.heal_ms();
        Ok(World {
            trace: Trace::new(config.print_trace),
            checker: Checker::new(roster.clone(), initial, heal_ms),
            network: Network::new(regions.clone()),
            regions,
            now_ms: 0,
            rng,
            queue: BinaryHeap::new(),
            seq: 0,
            roster,
            nodes,
            clients,
            stats: RunStats::default(),
            heal_ms,
            overflow: false,
            config,
        })
    }

    fn schedule(&mut self, at_ms: u64, event: Event) {
        if self.queue.len() >= QUEUE_EVENTS_MAX {
            self.overflow = true;
            return;
        }
        self.seq += 1;
        self.queue.push(Scheduled {
            at_ms,
            seq: self.seq,
            event,
        });
    }

    /// Runs every step and returns the report.
    pub fn run(mut self) -> RunReport {
        self.trace.record(
            0,
            format_args!(
                "seed {} nodes {} steps {} faults {:?}",
                self.config.seed, self.config.nodes, self.config.steps, self.config.faults
            ),
        );
        for i in 0..self.nodes.len() {
            let at = self.rng.random_range(0..50);
            self.schedule(at, Event::Fault(Fault::Restart { node: i }));
        }
        for client in 0..self.clients.len() {
            let at = self.rng.random_range(500..=4_000);
            self.clients[client].token += 1;
            let token = self.clients[client].token;
            self.schedule(at, Event::ClientWake { client, token });
        }
        self.schedule_faults();
        for step in 0..self.config.steps {
            let end_ms = (step + 1) * STEP_MS;
            while self.queue.peek().is_some_and(|s| s.at_ms < end_ms) {
                let Some(next) = self.queue.pop() else { break };
                self.now_ms = next.at_ms;
                self.stats.events += 1;
                self.dispatch(next.event);
            }
            self.now_ms = end_ms;
            self.stats.steps = step + 1;
            let at = At { step, now_ms: end_ms };
            if self.overflow {
                self.checker.observe(
                    at,
                    Observation::WorldError {
                        detail: format!("the event queue reached {QUEUE_EVENTS_MAX} events"),
                    },
                );
                self.overflow = false;
            }
            let watched = self.watched_rooms();
            self.checker.after_step(at, &self.nodes, &watched);
            if !self.checker.violations().is_empty() {
                break;
            }
        }
        let violations = self.checker.violations().to_vec();
        for v in &violations {
            self.trace
                .record(self.now_ms, format_args!("VIOLATION {}: {v}", v.checker()));
        }
        RunReport {
            seed: self.config.seed,
            trace_hash: self.trace.hash(),
            stats: self.stats,
            checks: self.checker.stats,
            net: self.network.stats,
            trace_tail: if violations.is_empty() {
                Vec::new()
            } else {
                self.trace.tail().map(str::to_string).collect()
            },
            violations,
        }
    }

    /// Rooms watched by clients connected to an up node, with their viewer counts.
    fn watched_rooms(&self) -> BTreeMap<RoomId, usize> {
        let mut watched = BTreeMap::new();
        for client in &self.clients {
            if let Some(node) = client.watching()
                && self.nodes[node].live.is_some()
            {
                *watched.entry(client.room.clone()).or_insert(0) += 1;
            }
        }
        watched
    }

    // ----- dispatch -----

    fn dispatch(&mut self, event: Event) {
        match event {
            Event::RaftTick { node, incarnation } => {
                if self.nodes[node].incarnation != incarnation || self.nodes[node].live.is_none() {
                    return;
                }
                self.trace.record(self.now_ms, format_args!("n{node} raft tick"));
                self.with_node(node, |live, ctx| live.on_raft_tick(ctx));
                let jitter = self.rng.random_range(0..=2 * RAFT_TICK_JITTER_MS);
                let at = self.now_ms + RAFT_TICK_MS - RAFT_TICK_JITTER_MS + jitter;
                self.schedule(at, Event::RaftTick { node, incarnation });
            }
            Event::ControlTick { node, incarnation } => {
                if self.nodes[node].incarnation != incarnation || self.nodes[node].live.is_none() {
                    return;
                }
                self.trace.record(self.now_ms, format_args!("n{node} control tick"));
                self.with_node(node, |live, ctx| live.on_control_tick(ctx));
                self.schedule(self.now_ms + CONTROL_TICK_MS, Event::ControlTick { node, incarnation });
            }
            Event::Deliver {
                from,
                from_incarnation,
                to,
                payload,
            } => self.deliver(from, from_incarnation, to, payload),
            Event::Report {
                node,
                incarnation,
                report,
            } => {
                if self.nodes[node].incarnation != incarnation {
                    return;
                }
                self.trace
                    .record(self.now_ms, format_args!("n{node} report {report:?}"));
                self.with_node(node, |live, ctx| live.on_report(ctx, report));
            }
            Event::Timer {
                node,
                incarnation,
                timer,
            } => {
                if self.nodes[node].incarnation != incarnation {
                    return;
                }
                self.trace.record(self.now_ms, format_args!("n{node} timer {timer:?}"));
                self.with_node(node, |live, ctx| live.on_timer(ctx, timer));
            }
            Event::ClientToNode { client, node, request } => {
                self.trace
                    .record(self.now_ms, format_args!("c{client} -> n{node} {request:?}"));
                if self.nodes[node].live.is_none() {
                    // The connection is refused.
                    let mut out = Vec::new();
                    let now = self.now_ms;
                    self.clients[client].on_connection_lost(now, node, &mut self.rng, &mut out);
                    self.client_effects(client, out);
                    return;
                }
                self.with_node(node, |live, ctx| live.on_client(ctx, client, *request));
            }
            Event::NodeToClient { client, from, reply } => {
                self.trace
                    .record(self.now_ms, format_args!("n{from} -> c{client} {reply:?}"));
                let mut out = Vec::new();
                let now = self.now_ms;
                self.clients[client].on_reply(now, from, *reply, &mut self.rng, &mut out);
                self.client_effects(client, out);
            }
            Event::ClientWake { client, token } => {
                if self.clients[client].token != token {
                    return;
                }
                self.trace.record(self.now_ms, format_args!("c{client} wakes"));
                let mut out = Vec::new();
                let now = self.now_ms;
                let choice = NodeChoice { regions: &self.regions };
                self.clients[client].on_wake(now, token, &choice, &mut self.rng, &mut out);
                self.client_effects(client, out);
            }
            Event::Fault(fault) => self.fault(fault),
        }
    }

    fn deliver(&mut self, from: NodeIndex, from_incarnation: u64, to: NodeIndex, payload: Payload) {
        self.network.delivered(from, to);
        self.trace
            .record(self.now_ms, format_args!("deliver n{from} -> n{to} {payload}"));
        if self.nodes[to].live.is_none() {
            // The destination's process is down: the connection is refused.
            let delay = self.network.latency_ms(to, from, &mut self.rng);
            self.schedule(
                self.now_ms + delay,
                Event::Report {
                    node: from,
                    incarnation: from_incarnation,
                    report: Report::Undeliverable {
                        to,
                        payload,
                        why: Undeliverable::Down,
                    },
                },
            );
            return;
        }
        if let Payload::Raft(m) = &payload
            && Live::is_snapshot_message(m)
        {
            let delay = self.network.latency_ms(to, from, &mut self.rng);
            self.schedule(
                self.now_ms + delay,
                Event::Report {
                    node: from,
                    incarnation: from_incarnation,
                    report: Report::SnapshotDelivered { to },
                },
            );
        }
        self.with_node(to, |live, ctx| live.on_message(ctx, from, payload));
    }

    /// Calls into a running node and carries out its effects.
    fn with_node(&mut self, node: NodeIndex, f: impl FnOnce(&mut Live, &mut Ctx<'_>)) {
        let mut out = Vec::new();
        {
            let Some(live) = self.nodes[node].live.as_mut() else {
                return;
            };
            let mut ctx = Ctx {
                now_ms: self.now_ms,
                rng: &mut self.rng,
                out: &mut out,
                faults: self.config.faults,
            };
            f(live, &mut ctx);
        }
        self.node_effects(node, out);
    }

    fn at(&self) -> At {
        At {
            step: self.now_ms / STEP_MS,
            now_ms: self.now_ms,
        }
    }

    fn node_effects(&mut self, node: NodeIndex, effects: Vec<Effect>) {
        let incarnation = self.nodes[node].incarnation;
        for effect in effects {
            match effect {
                Effect::Send { to, payload } => self.send(node, incarnation, to, payload),
                Effect::Reply { client, reply } => {
                    let delay = self.client_latency(client, node);
                    self.schedule(
                        self.now_ms + delay,
                        Event::NodeToClient {
                            client,
                            from: node,
                            reply: Box::new(reply),
                        },
                    );
                }
                Effect::Timer { at_ms, timer } => self.schedule(
                    at_ms,
                    Event::Timer {
                        node,
                        incarnation,
                        timer,
                    },
                ),
                Effect::Observe(observation) => self.observe(observation),
                Effect::Trace(line) => self.trace.record(self.now_ms, format_args!("{line}")),
                Effect::Leave => {
                    self.stop_node(node, "left the cluster");
                    self.nodes[node].left = true;
                }
            }
        }
    }

    fn observe(&mut self, observation: Observation) {
        match &observation {
            Observation::Applied { .. } | Observation::BatchProposed { .. } | Observation::Acked { .. } => {}
            other => self.trace.record(self.now_ms, format_args!("observe {other:?}")),
        }
        let at = self.at();
        self.checker.observe(at, observation);
    }

    fn send(&mut self, from: NodeIndex, incarnation: u64, to: NodeIndex, payload: Payload) {
        match self.network.send(from, to, &payload, &mut self.rng) {
            Route::Deliver(delays) => {
                let last = delays.len() - 1;
                let mut payload = Some(payload);
                for (i, delay) in delays.into_iter().enumerate() {
                    // The last delivery takes the payload; earlier ones (duplicates) a copy.
                    let p = if i == last { payload.take() } else { payload.clone() };
                    let Some(p) = p else { break };
                    self.schedule(
                        self.now_ms + delay,
                        Event::Deliver {
                            from,
                            from_incarnation: incarnation,
                            to,
                            payload: p,
                        },
                    );
                }
            }
            Route::Held => {}
            Route::Dropped(_) => {
                // Raft's transport notices the failed call (and reports a snapshot that did not
                // arrive, as `RaftSender` does); other calls just hang until their deadline.
                if matches!(payload, Payload::Raft(_)) {
                    let delay = 2 * self.network.latency_ms(from, to, &mut self.rng);
                    self.schedule(
                        self.now_ms + delay,
                        Event::Report {
                            node: from,
                            incarnation,
                            report: Report::Undeliverable {
                                to,
                                payload,
                                why: Undeliverable::Failed,
                            },
                        },
                    );
                }
            }
        }
    }

    fn client_latency(&mut self, client: ClientId, node: NodeIndex) -> u64 {
        let same_region = self.clients[client].region == self.regions[node];
        crate::network::one_way_ms(same_region, CLIENT_IN_REGION_LATENCY_MS, &mut self.rng)
    }

    fn client_effects(&mut self, client: ClientId, effects: Vec<ClientEffect>) {
        for effect in effects {
            match effect {
                ClientEffect::Send { node, request } => {
                    let delay = self.client_latency(client, node);
                    self.schedule(
                        self.now_ms + delay,
                        Event::ClientToNode {
                            client,
                            node,
                            request: Box::new(request),
                        },
                    );
                }
                ClientEffect::Wake { at_ms, token } => self.schedule(at_ms, Event::ClientWake { client, token }),
                ClientEffect::Observe(observation) => self.observe(observation),
            }
        }
    }

    // ----- nodes going up and down -----

    fn start_node(&mut self, node: NodeIndex) {
        if self.nodes[node].live.is_some() || self.nodes[node].left {
            return;
        }
        let roster = self.roster.clone();
        let now = self.now_ms;
        if let Err(e) = self.nodes[node].start(roster, now, &mut self.rng, self.config.faults) {
            let at = self.at();
            self.checker.observe(at, Observation::ShellError { node, detail: e });
            return;
        }
        let incarnation = self.nodes[node].incarnation;
        self.trace
            .record(self.now_ms, format_args!("n{node} starts (incarnation {incarnation})"));
        let raft_phase = self.rng.random_range(0..RAFT_TICK_MS);
        let control_phase = self.rng.random_range(0..CONTROL_TICK_MS);
        self.schedule(self.now_ms + raft_phase, Event::RaftTick { node, incarnation });
        self.schedule(self.now_ms + control_phase, Event::ControlTick { node, incarnation });
    }

    fn stop_node(&mut self, node: NodeIndex, why: &str) {
        if self.nodes[node].live.is_none() {
            return;
        }
        self.nodes[node].crash();
        self.trace.record(self.now_ms, format_args!("n{node} down: {why}"));
        self.observe(Observation::NodeDown { node });
        let now = self.now_ms;
        for client in 0..self.clients.len() {
            let mut out = Vec::new();
            self.clients[client].on_connection_lost(now, node, &mut self.rng, &mut out);
            self.client_effects(client, out);
        }
    }

    fn up_nodes(&self) -> Vec<NodeIndex> {
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].live.is_some())
            .collect()
    }

    // ----- faults -----

    fn fault(&mut self, fault: Fault) {
        self.trace.record(self.now_ms, format_args!("fault {fault:?}"));
        match fault {
            Fault::Crash { node } => {
                let down = self.nodes.iter().filter(|n| n.live.is_none() && !n.left).count();
                if down < CRASHED_AT_ONCE_MAX && self.nodes[node].live.is_some() {
                    self.stats.faults += 1;
                    self.stats.crashes += 1;
                    self.stop_node(node, "crashed");
                }
            }
            Fault::Restart { node } => self.start_node(node),
            Fault::SplitRegions => {
                self.stats.faults += 1;
                for a in 0..self.nodes.len() {
                    for b in 0..self.nodes.len() {
                        if self.regions[a] != self.regions[b] {
                            self.network.block(a, b);
                        }
                    }
                }
            }
            Fault::Isolate { node, outbound_only } => {
                self.stats.faults += 1;
                for other in 0..self.nodes.len() {
                    if other != node {
                        self.network.block(node, other);
                        if !outbound_only {
                            self.network.block(other, node);
                        }
                    }
                }
            }
            Fault::HealPartitions => self.network.unblock_all(),
            Fault::Clog { from, to } => {
                self.stats.faults += 1;
                self.network.clog(from, to);
            }
            Fault::Unclog { from, to } => self.unclog(from, to),
            Fault::Lossy(loss) => {
                self.stats.faults += 1;
                self.network.set_loss(loss);
            }
            Fault::Clean => self.network.set_loss(Loss::default()),
            Fault::Migrate { tracks_ms } => {
                self.admin_migrate(tracks_ms, false);
            }
            Fault::MigrationRace { tracks_ms } => {
                self.admin_migrate(tracks_ms, true);
            }
            Fault::Drain => {
                let up = self.up_nodes();
                if up.len() + 1 < self.nodes.len() || up.is_empty() {
                    return; // not with a node down already: keep a quorum
                }
                let node = up[self.rng.random_range(0..up.len())];
                self.stats.faults += 1;
                self.with_node(node, |live, ctx| {
                    let result = live.start_drain(ctx);
                    ctx.trace(format!("n{} admin drain: {result:?}", live.me));
                });
            }
            Fault::HealAll => {
                self.network.unblock_all();
                for (from, to) in self.network.clogged_links() {
                    self.unclog(from, to);
                }
                self.network.set_loss(Loss::default());
                for node in 0..self.nodes.len() {
                    self.start_node(node);
                }
            }
        }
    }

    fn unclog(&mut self, from: NodeIndex, to: NodeIndex) {
        let incarnation = self.nodes[from].incarnation;
        for (delay, payload) in self.network.unclog(from, to, &mut self.rng) {
            self.schedule(
                self.now_ms + delay,
                Event::Deliver {
                    from,
                    from_incarnation: incarnation,
                    to,
                    payload,
                },
            );
        }
    }

    /// Picks a room some up node hosts and migrates it; a race also cuts the source off from
    /// every node but the target.
    fn admin_migrate(&mut self, tracks_ms: u64, race: bool) {
        let mut hosted: Vec<(NodeIndex, RoomId)> = Vec::new();
        for node in self.up_nodes() {
            if let Some(live) = &self.nodes[node].live {
                for (room, local) in &live.control.rooms {
                    if matches!(local.mode, RoomMode::Host { .. }) {
                        hosted.push((node, room.clone()));
                    }
                }
            }
        }
        if hosted.is_empty() {
            return;
        }
        let (from, room) = hosted[self.rng.random_range(0..hosted.len())].clone();
        // There are at least NODES_MIN (3) nodes, so `others` is never empty.
        let others: Vec<NodeIndex> = (0..self.nodes.len()).filter(|&i| i != from).collect();
        let to = others[self.rng.random_range(0..others.len())];
        let to_id = self.roster.nodes[to].id.clone();
        self.stats.faults += 1;
        let mut started = false;
        self.with_node(from, |live, ctx| {
            let result = live.start_migration(ctx, &room, &to_id, tracks_ms, MigrationOrigin::Admin);
            started = result.is_ok();
            ctx.trace(format!("n{from} admin migrate {room} -> {to_id}: {result:?}"));
        });
        if started {
            self.stats.migrations += 1;
        }
        if race && started {
            for other in 0..self.nodes.len() {
                if other != from && other != to {
                    self.network.block(from, other);
                    self.network.block(other, from);
                }
            }
            self.trace
                .record(self.now_ms, format_args!("n{from} cut off from all but n{to}"));
        }
    }

    /// Generates the run's faults from the seed (see the module docs).
    fn schedule_faults(&mut self) {
        let Some(heal) = self.heal_ms else { return };
        let n = self.nodes.len();
        let mut race_left = self.rng.random_bool(0.5);
        let mut t = CHAOS_START_MS + self.rng.random_range(0..=1_000);
        while t + 1_000 < heal {
            let room_for_race = t + 6_000 < heal;
            if race_left && room_for_race && self.rng.random_bool(0.4) {
                race_left = false;
                let tracks_ms = self.rng.random_range(1_500..=4_200);
                let isolate_ms = self.rng.random_range(1_800..=3_200);
                self.schedule(t, Event::Fault(Fault::MigrationRace { tracks_ms }));
                self.schedule(t + isolate_ms, Event::Fault(Fault::HealPartitions));
                t += isolate_ms + self.rng.random_range(3_000..=5_000);
                continue;
            }
            let duration = self.rng.random_range(1_000..=6_000).min(heal - t);
            match self.rng.random_range(0..5) {
                0 => {
                    self.schedule(t, Event::Fault(Fault::SplitRegions));
                    self.schedule(t + duration, Event::Fault(Fault::HealPartitions));
                }
                1 | 2 => {
                    let node = self.rng.random_range(0..n);
                    let outbound_only = self.rng.random_bool(0.3);
                    self.schedule(t, Event::Fault(Fault::Isolate { node, outbound_only }));
                    self.schedule(t + duration, Event::Fault(Fault::HealPartitions));
                }
                3 => {
                    // Swizzle-clogging: a few nodes' links clogged one by one, then unclogged
                    // in another random order.
                    let mut chosen: Vec<NodeIndex> = (0..n).collect();
                    chosen.shuffle(&mut self.rng);
                    chosen.truncate(self.rng.random_range(2..=3.min(n)));
                    let mut links: Vec<(NodeIndex, NodeIndex)> = Vec::new();
                    for &a in &chosen {
                        for b in 0..n {
                            if a != b {
                                links.push((a, b));
                                if !chosen.contains(&b) {
                                    links.push((b, a));
                                }
                            }
                        }
                    }
                    links.shuffle(&mut self.rng);
                    let mut at = t;
                    for &(from, to) in &links {
                        self.schedule(at, Event::Fault(Fault::Clog { from, to }));
                        at += self.rng.random_range(20..=150);
                    }
                    at += self.rng.random_range(500..=2_500);
                    links.shuffle(&mut self.rng);
                    for &(from, to) in &links {
                        self.schedule(at, Event::Fault(Fault::Unclog { from, to }));
                        at += self.rng.random_range(20..=150);
                    }
                    t = at;
                }
                _ => {
                    let loss = Loss {
                        drop_ppm: self.rng.random_range(10_000..=100_000),
                        duplicate_ppm: self.rng.random_range(0..=30_000),
                        reorder_ppm: self.rng.random_range(0..=100_000),
                        reorder_delay_ms: self.rng.random_range(5..=40),
                    };
                    self.schedule(t, Event::Fault(Fault::Lossy(loss)));
                    self.schedule(t + duration, Event::Fault(Fault::Clean));
                }
            }
            t += duration + self.rng.random_range(500..=3_000);
        }
        for _ in 0..self.rng.random_range(0..=3) {
            let at = self.rng.random_range(CHAOS_START_MS..heal - 1_000);
            let node = self.rng.random_range(0..n);
            let down = self.rng.random_range(500..=8_000);
            self.schedule(at, Event::Fault(Fault::Crash { node }));
            self.schedule((at + down).min(heal), Event::Fault(Fault::Restart { node }));
        }
        for _ in 0..self.rng.random_range(2..=5) {
            let at = self.rng.random_range(CHAOS_START_MS..heal - 1_000);
            let tracks_ms = self.rng.random_range(20..=1_500);
            self.schedule(at, Event::Fault(Fault::Migrate { tracks_ms }));
        }
        let drain_latest = heal.saturating_sub(22_000);
        if n >= 5 && drain_latest > CHAOS_START_MS + 2_000 && self.rng.random_bool(0.25) {
            let at = self.rng.random_range(CHAOS_START_MS + 2_000..=drain_latest);
            self.schedule(at, Event::Fault(Fault::Drain));
        }
        self.schedule(heal, Event::Fault(Fault::HealAll));
    }
}

/// Runs one seed.
pub fn run(config: SimConfig) -> Result<RunReport, String> {
    Ok(World::new(config)?.run())
}
