//! One simulated node: the store's shipped [`ReplicaCore`] (the same one `cluster::store`'s
//! replica task drives: operations, forwarding, coalescing, ReadIndex, Ready ordering, apply,
//! leader jobs, snapshots) inside an effect executor. This file decides nothing about the
//! store: it turns the core's [`Output`]s into network messages, completions and checker
//! observations, and feeds it ticks, messages and delivery reports.
//!
//! The shell is sans-IO in the same sense as the cores it drives: inputs are method calls with
//! the virtual time in a [`Ctx`]; outputs are [`Effect`]s (messages, replies, timers,
//! observations for the checkers) the world carries out. The control plane ([`crate::control`])
//! and the viewer sessions ([`crate::sessions`]) are further `impl Live` blocks: they issue store
//! operations ([`Live::propose`], [`Live::read`]) and get their results back as
//! [`Purpose`]-tagged completions.
//!
//! # Durability and crashes
//!
//! [`SimStorage`] (log, hard state, snapshot) is durable; the applied state lives in memory,
//! as in the node. A crash loses everything in [`Live`] (the applied state, pending proposals,
//! reads, timers, rooms, sessions, migrations). A restart decodes the last snapshot (as
//! `Disk::open` does) and the core applies the committed log after it again.

use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;

use mediamesh_cluster::command::{Command, Outcome};
use mediamesh_cluster::driver::{Replica, ReplicaConfig};
use mediamesh_cluster::replica::{Caller, Clock, CoreConfig, CoreFaults, ForwardResult, OpKind, Output, ReplicaCore};
use mediamesh_cluster::state_machine::StateMachine;
use mediamesh_cluster::{NodeId, RoomId, ViewerId};
use parking_lot::RwLockReadGuard;
use raft::eraftpb::Message;
use rand::Rng;
use rand::rngs::StdRng;

use crate::checkers::Observation;
use crate::config::{
    CLOCK_BASE_MS, ELECTION_TICKS, EXPIRY_BATCHES_PER_SECOND, Faults, HEARTBEAT_TICKS, RAFT_TICK_MS,
    REQUEST_TIMEOUT_MS, SNAPSHOT_EVERY_ENTRIES, VIEWER_TTL_MS,
};
use crate::control::Control;
use crate::message::{ClientId, ClientReply, NodeIndex, Payload};
use crate::sessions::{Sessions, Writers};
use crate::storage::SimStorage;

/// Rounds of "issue, process readies, dispatch completions" one input may cause, at most.
const TURN_ROUNDS_MAX: usize = 64;

/// What every node knows about every node: ids, regions, raft ids; and each node's clock skew
/// (which only the world and the node itself use).
pub struct Roster {
    /// The nodes, by index.
    pub nodes: Vec<NodeSpec>,
}

/// One node's identity.
#[derive(Clone, Debug)]
pub struct NodeSpec {
    /// Public id.
    pub id: NodeId,
    /// Region.
    pub region: String,
    /// Raft id (from the id, as in production).
    pub raft_id: u64,
    /// Constant offset of this node's wall clock from virtual time.
    pub skew_ms: i64,
}

impl Roster {
    /// The node with raft id `raft_id`.
    pub fn by_raft(&self, raft_id: u64) -> Option<NodeIndex> {
        self.nodes.iter().position(|n| n.raft_id == raft_id)
    }

    /// The node with public id `id`.
    pub fn by_id(&self, id: &NodeId) -> Option<NodeIndex> {
        self.nodes.iter().position(|n| n.id == *id)
    }

    /// Node `index`'s wall clock at virtual time `now_ms`.
    pub fn clock_ms(&self, index: NodeIndex, now_ms: u64) -> u64 {
        (CLOCK_BASE_MS + now_ms).saturating_add_signed(self.nodes[index].skew_ms)
    }
}

/// What a node asks the world to do.
#[derive(Debug)]
pub enum Effect {
    /// Send a message to another node over the network.
    Send { to: NodeIndex, payload: Payload },
    /// Answer or notify a client.
    Reply { client: ClientId, reply: ClientReply },
    /// Call [`Live::on_timer`] at `at_ms` (if this incarnation is still up).
    Timer { at_ms: u64, timer: NodeTimer },
    /// Tell the checkers.
    Observe(Observation),
    /// A line for the trace.
    Trace(String),
    /// The node drained and leaves the cluster: stop it for good.
    Leave,
}

/// A node-local timer.
#[derive(Clone, Debug)]
pub enum NodeTimer {
    /// A handoff's tracks are relayed: answer the source.
    HandoffReady {
        migration: u64,
        room: RoomId,
        from: NodeIndex,
        epoch: u64,
        tracks_ms: u64,
    },
    /// The viewer batcher's linger window ended.
    BatchWindow,
}

/// Why the world could not deliver a message a node sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Undeliverable {
    /// The destination's process is down (the connection was refused: nothing was received).
    Down,
    /// The call failed on the way (partition, loss, a full queue): only raft's transport
    /// notices; other calls hang until their deadline.
    Failed,
}

/// The inputs a node gets from the world besides its own events.
#[derive(Clone, Debug)]
pub enum Report {
    /// A message to `to` was not delivered.
    Undeliverable {
        to: NodeIndex,
        payload: Payload,
        why: Undeliverable,
    },
    /// A snapshot message reached `to`.
    SnapshotDelivered { to: NodeIndex },
}

/// The world's context for one call into a node.
pub struct Ctx<'a> {
    /// Virtual time.
    pub now_ms: u64,
    /// The run's one RNG.
    pub rng: &'a mut StdRng,
    /// Effects, in order.
    pub out: &'a mut Vec<Effect>,
    /// Faults switched on in the real code.
    pub faults: Faults,
}

impl Ctx<'_> {
    /// Queues a message to `to`.
    pub fn send(&mut self, to: NodeIndex, payload: Payload) {
        self.out.push(Effect::Send { to, payload });
    }
    /// Queues a reply to `client`.
    pub fn reply(&mut self, client: ClientId, reply: ClientReply) {
        self.out.push(Effect::Reply { client, reply });
    }
    /// Tells the checkers.
    pub fn observe(&mut self, observation: Observation) {
        self.out.push(Effect::Observe(observation));
    }
    /// A trace line.
    pub fn trace(&mut self, line: String) {
        self.out.push(Effect::Trace(line));
    }
    /// A random draw in `range`.
    pub fn random_range(&mut self, range: std::ops::RangeInclusive<u64>) -> u64 {
        self.rng.random_range(range)
    }
}

/// Why a store operation failed: the replica core's own error.
pub use mediamesh_cluster::replica::OpError;

/// What a store operation's result is for: where the completion goes.
#[derive(Clone, Debug)]
pub enum Purpose {
    /// The node's registration.
    Register,
    /// A node heartbeat.
    Heartbeat,
    /// A drain marks the node draining.
    SetDraining,
    /// A drained node removes its registration.
    Leave,
    /// Failover re-places `room` on `to`.
    FailoverPlace { room: RoomId, to: NodeId },
    /// The directory reads `room` (linearizable).
    LocateRead { room: RoomId },
    /// The directory places `room`.
    LocatePlace { room: RoomId },
    /// A migration's flip.
    Flip { migration: u64 },
    /// A batch of viewer upserts (`sent`: the states proposed, in order).
    ViewerBatch {
        waiters: Vec<(ViewerId, Writers)>,
        sent: Vec<mediamesh_cluster::ViewerState>,
    },
    /// A resume reads the viewer state (linearizable).
    ResumeRead { join: u64 },
    /// A closing hosted room releases its placement.
    Release { room: RoomId },
    /// A leaving viewer's state is deleted.
    DeleteViewer { client: ClientId, request: u64 },
}

/// The result of a store operation: one outcome per command (none for a read).
pub type OpResult = Result<Vec<Outcome>, OpError>;

/// The durable part of a node plus its running incarnation, if up.
pub struct Node {
    /// Roster index.
    pub index: NodeIndex,
    /// The raft log, hard state and last snapshot (durable; the state machine is rebuilt from
    /// them on every start, as the node rebuilds it from sled).
    pub storage: SimStorage,
    /// The running incarnation, `None` while crashed (or gone).
    pub live: Option<Live>,
    /// Incremented on every start; events of older incarnations are dropped.
    pub incarnation: u64,
    /// Drained and left: never restarts.
    pub left: bool,
}

/// A running node: the shipped replica core, the control plane and the sessions.
pub struct Live {
    pub(crate) me: NodeIndex,
    pub(crate) roster: Rc<Roster>,
    pub(crate) incarnation: u64,
    /// The store's replica core, as the node runs it.
    pub(crate) core: ReplicaCore<SimStorage>,
    /// What each operation in the core is for.
    purposes: BTreeMap<u64, Purpose>,
    next_op: u64,
    completions: VecDeque<(Purpose, OpResult)>,
    /// The node's mesh tasks (see [`crate::control`]).
    pub(crate) control: Control,
    /// Viewer sessions and the viewer batcher (see [`crate::sessions`]).
    pub(crate) sessions: Sessions,
}

impl Node {
    /// A node that has never run, holding the bootstrap snapshot.
    pub fn new(index: NodeIndex, storage: SimStorage) -> Self {
        Node {
            index,
            storage,
            live: None,
            incarnation: 0,
            left: false,
        }
    }

    /// Starts (or restarts) the node: decodes the state machine of its last snapshot (as
    /// `Disk::open` does) and starts a replica core over the durable log, which applies the
    /// committed entries after the snapshot again.
    pub fn start(&mut self, roster: Rc<Roster>, now_ms: u64, rng: &mut StdRng, faults: Faults) -> Result<(), String> {
        if self.live.is_some() || self.left {
            return Ok(());
        }
        self.incarnation += 1;
        self.storage.reopen();
        let sm = StateMachine::decode_snapshot(self.storage.snapshot_data().as_slice())
            .map_err(|e| format!("snapshot unreadable: {e}"))?;
        let seed: u64 = rng.random();
        let config = CoreConfig {
            replica: ReplicaConfig::new(roster.nodes[self.index].raft_id, ELECTION_TICKS, HEARTBEAT_TICKS),
            // One value in the election range: raft-rs would otherwise draw it from thread_rng.
            election_ticks_max: Some(ELECTION_TICKS + 1),
            tick_ms: RAFT_TICK_MS,
            request_timeout_ms: REQUEST_TIMEOUT_MS,
            snapshot_every_entries: SNAPSHOT_EVERY_ENTRIES,
            snapshot_every_bytes: mediamesh_cluster::store::SNAPSHOT_EVERY_BYTES,
            expiry_batches_per_second: EXPIRY_BATCHES_PER_SECOND as u32,
            viewer_ttl_ms: VIEWER_TTL_MS,
            first_batch_id: seed >> 1,
            read_context_prefix: self.incarnation,
            observe: true,
            faults: CoreFaults {
                ack_upserts_on_propose: faults.ack_before_commit,
            },
        };
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let core =
            ReplicaCore::new(config, self.storage.clone(), sm, &logger).map_err(|e| format!("raft init: {e}"))?;
        let clock = roster.clock_ms(self.index, now_ms);
        self.live = Some(Live {
            me: self.index,
            incarnation: self.incarnation,
            core,
            purposes: BTreeMap::new(),
            next_op: self.incarnation << 40,
            completions: VecDeque::new(),
            control: Control::new(clock),
            sessions: Sessions::default(),
            roster,
        });
        Ok(())
    }

    /// Crashes the node: everything volatile is lost (the applied state too); the log, hard
    /// state and snapshot stay.
    pub fn crash(&mut self) {
        self.live = None;
    }
}

impl Live {
    /// This node's raft id.
    pub fn raft_id(&self) -> u64 {
        self.roster.nodes[self.me].raft_id
    }

    /// This node's public id.
    pub fn node_id(&self) -> &NodeId {
        &self.roster.nodes[self.me].id
    }

    /// This node's wall clock.
    pub fn clock_ms(&self, ctx: &Ctx<'_>) -> u64 {
        self.roster.clock_ms(self.me, ctx.now_ms)
    }

    fn clock(&self, ctx: &Ctx<'_>) -> Clock {
        Clock {
            now_ms: ctx.now_ms,
            wall_ms: self.clock_ms(ctx),
        }
    }

    /// The applied state (read it within one statement, or clone what you keep).
    pub fn sm(&self) -> RwLockReadGuard<'_, StateMachine> {
        self.core.state().read()
    }

    /// The known leader's node id, when it is registered (`Store::leader`).
    pub fn leader_id(&self) -> Option<NodeId> {
        self.sm()
            .node_by_raft_id(self.core.leader())
            .map(|n| n.registration.id.clone())
    }

    // ----- operations issued by the control plane and the sessions -----

    fn new_op(&mut self, purpose: Purpose) -> u64 {
        let id = self.next_op;
        self.next_op += 1;
        self.purposes.insert(id, purpose);
        id
    }

    /// Proposes `commands` (through the leader when this node follows) and completes `purpose`
    /// with one outcome per command once applied (`Store::propose`). Returns the op id.
    pub fn propose(&mut self, ctx: &mut Ctx<'_>, commands: Vec<Command>, purpose: Purpose) -> Option<u64> {
        let id = self.new_op(purpose);
        self.core.submit(
            ctx.now_ms,
            id,
            OpKind::Propose(commands),
            ctx.now_ms + REQUEST_TIMEOUT_MS,
            true,
        );
        self.collect(ctx);
        Some(id)
    }

    /// Waits for a linearizable read point, then completes `purpose` (the caller reads the
    /// live node's state in its completion): `Store::read_barrier`.
    pub fn read(&mut self, ctx: &mut Ctx<'_>, purpose: Purpose) {
        let id = self.new_op(purpose);
        self.core
            .submit(ctx.now_ms, id, OpKind::Read, ctx.now_ms + REQUEST_TIMEOUT_MS, true);
        self.collect(ctx);
    }

    /// Carries out the core's outputs: messages and forwards go on the network, answers become
    /// completions, snapshots are encoded at once (the world runs one event at a time).
    fn collect(&mut self, ctx: &mut Ctx<'_>) {
        loop {
            let outputs = self.core.take_outputs();
            if outputs.is_empty() {
                return;
            }
            for output in outputs {
                self.carry_out(ctx, output);
            }
        }
    }

    fn carry_out(&mut self, ctx: &mut Ctx<'_>, output: Output) {
        match output {
            Output::Send(messages) => {
                for m in messages {
                    if let Some(to) = self.roster.by_raft(m.to) {
                        ctx.send(to, Payload::Raft(Box::new(m)));
                    }
                }
            }
            Output::Forward {
                to, request, commands, ..
            } => match self.roster.by_raft(to) {
                Some(to) => ctx.send(to, Payload::Forward { request, commands }),
                None => self
                    .core
                    .on_forward_reply(ctx.now_ms, request, ForwardResult::NotLeader),
            },
            Output::ForwardReply {
                to, request, result, ..
            } => {
                if let Some(to) = self.roster.by_raft(to) {
                    ctx.send(to, Payload::ForwardReply { request, result });
                }
            }
            Output::Done { op, result, .. } => {
                if let Some(purpose) = self.purposes.remove(&op) {
                    self.completions.push_back((purpose, result));
                }
            }
            Output::LeaderChanged { leader } => ctx.trace(format!("n{} knows leader {leader}", self.me)),
            Output::PeerAddress { .. } => {}
            Output::BuildSnapshot {
                index,
                term,
                conf_state,
                state,
            } => {
                let data = state.encode_snapshot();
                if let Err(e) = self.core.on_snapshot_built(index, term, &conf_state, data) {
                    ctx.observe(Observation::ShellError {
                        node: self.me,
                        detail: e.to_string(),
                    });
                }
            }
            Output::SnapshotInstalled { index } => ctx.observe(Observation::SnapshotInstalled { node: self.me, index }),
            Output::Proposed { batch_id, callers } => {
                let origins = callers
                    .into_iter()
                    .map(|(caller, count)| match caller {
                        Caller::Local(op) => (self.me, op, count),
                        Caller::Forwarded { from, request, .. } => {
                            (self.roster.by_raft(from).unwrap_or(self.me), request, count)
                        }
                        Caller::Job(_) => (self.me, 0, count),
                    })
                    .collect();
                ctx.observe(Observation::BatchProposed {
                    proposer: self.raft_id(),
                    batch_id,
                    callers: origins,
                });
            }
            Output::Applied {
                index,
                term,
                entry_type,
                data,
            } => ctx.observe(Observation::Applied {
                node: self.me,
                index,
                term,
                entry_type,
                data,
            }),
            Output::Warning(line) | Output::Refused(line) => ctx.trace(format!("n{} {line}", self.me)),
        }
    }

    // ----- inputs -----

    /// A raft tick (the replica task's ticker).
    pub fn on_raft_tick(&mut self, ctx: &mut Ctx<'_>) {
        let clock = self.clock(ctx);
        self.core.tick(clock);
        self.turn(ctx);
    }

    /// The node's control loop: store deadlines and retries, then the mesh tasks.
    pub fn on_control_tick(&mut self, ctx: &mut Ctx<'_>) {
        self.core.sweep(ctx.now_ms);
        self.collect(ctx);
        self.control_jobs(ctx);
        self.turn(ctx);
    }

    /// A message from node `from`.
    pub fn on_message(&mut self, ctx: &mut Ctx<'_>, from: NodeIndex, payload: Payload) {
        match payload {
            Payload::Raft(message) => self.core.step(*message),
            Payload::Forward { request, commands } => {
                let from_raft = self.roster.nodes[from].raft_id;
                self.core.on_forwarded(ctx.now_ms, from_raft, request, commands);
            }
            Payload::ForwardReply { request, result } => self.core.on_forward_reply(ctx.now_ms, request, result),
            other => self.on_mesh_message(ctx, from, other),
        }
        self.turn(ctx);
    }

    /// A delivery report from the transport.
    pub fn on_report(&mut self, ctx: &mut Ctx<'_>, report: Report) {
        match report {
            Report::SnapshotDelivered { to } => {
                let raft_id = self.roster.nodes[to].raft_id;
                self.core.report_snapshot(raft_id, true);
            }
            Report::Undeliverable { to, payload, why } => {
                let raft_id = self.roster.nodes[to].raft_id;
                match payload {
                    Payload::Raft(m) => {
                        if Live::is_snapshot_message(&m) {
                            self.core.report_snapshot(raft_id, false);
                        }
                        self.core.report_unreachable(raft_id);
                    }
                    // A refused connection: the leader never got it, so the core may try again
                    // (as the store's `forward_failure` says). A partitioned call just hangs until
                    // the deadline.
                    Payload::Forward { request, .. } if why == Undeliverable::Down => {
                        self.core
                            .on_forward_reply(ctx.now_ms, request, ForwardResult::NotLeader)
                    }
                    other if why == Undeliverable::Down => self.on_mesh_refused(ctx, to, other),
                    _ => {}
                }
            }
        }
        self.turn(ctx);
    }

    /// A node-local timer fired.
    pub fn on_timer(&mut self, ctx: &mut Ctx<'_>, timer: NodeTimer) {
        match timer {
            NodeTimer::HandoffReady {
                migration,
                room,
                from,
                epoch,
                tracks_ms,
            } => self.on_handoff_ready(ctx, migration, room, from, epoch, tracks_ms),
            NodeTimer::BatchWindow => self.flush_viewer_batch(ctx),
        }
        self.turn(ctx);
    }

    // ----- the replica task's turn -----

    /// Advances the core (every Ready, persisted at once: the simulated disk is durable on
    /// write) and dispatches completions until quiet.
    pub fn turn(&mut self, ctx: &mut Ctx<'_>) {
        for _ in 0..TURN_ROUNDS_MAX {
            loop {
                let clock = self.clock(ctx);
                match self.core.advance(clock) {
                    Ok(Some(persist)) => {
                        self.collect(ctx);
                        self.core.on_persisted(persist);
                        self.collect(ctx);
                    }
                    Ok(None) => {
                        self.collect(ctx);
                        break;
                    }
                    Err(e) => {
                        // The store stops its replica on this; the checkers flag it.
                        self.collect(ctx);
                        ctx.observe(Observation::ShellError {
                            node: self.me,
                            detail: e.to_string(),
                        });
                        return;
                    }
                }
            }
            if self.completions.is_empty() {
                return;
            }
            while let Some((purpose, result)) = self.completions.pop_front() {
                self.dispatch(ctx, purpose, result);
            }
        }
    }

    fn dispatch(&mut self, ctx: &mut Ctx<'_>, purpose: Purpose, result: OpResult) {
        match purpose {
            Purpose::ViewerBatch { waiters, sent } => self.viewer_batch_done(ctx, waiters, sent, result),
            Purpose::ResumeRead { join } => self.resume_read_done(ctx, join, result),
            Purpose::DeleteViewer { client, request } => ctx.reply(
                client,
                ClientReply::Left {
                    request,
                    ok: result.is_ok(),
                },
            ),
            other => self.control_done(ctx, other, result),
        }
    }

    /// Whether `m` carries a snapshot (its delivery is reported back to the sender).
    pub fn is_snapshot_message(m: &Message) -> bool {
        Replica::<SimStorage>::is_snapshot(m)
    }
}
