//! One simulated node: the real [`Replica`] driver and [`StateMachine`] inside a shell that does
//! what `cluster::store`'s replica task does, minus the IO: it coalesces proposals into
//! [`EntryPayload`]s, forwards followers' proposals to the leader, answers linearizable reads
//! through ReadIndex, carries out every `ReadyBatch` in the driver's documented order, applies
//! committed entries, compacts the log, and runs the leader's jobs (initial settings, viewer
//! expiry from `due_viewers`).
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
//! [`SimStorage`] (log, hard state, snapshot) and the applied [`StateMachine`] are durable: a
//! crash keeps them and loses everything in [`Live`] (pending proposals, reads, timers, rooms,
//! sessions, migrations). A restart rebuilds the state machine from its records with
//! `StateMachine::from_records` (as `Disk::open` does, checking every record) and starts a new
//! replica with `applied_index` from it.

use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;

use mediamesh_cluster::codec::{self, ENTRY_BYTES_MAX};
use mediamesh_cluster::command::{
    COMMANDS_PER_ENTRY_MAX, Command, EntryPayload, Outcome, VIEWERS_PER_EXPIRY_MAX, pack_proposals,
};
use mediamesh_cluster::driver::{ProposeError, Replica, ReplicaConfig};
use mediamesh_cluster::state_machine::{SmWrite, StateMachine};
use mediamesh_cluster::types::ClusterSettings;
use mediamesh_cluster::{NodeId, RoomId, ViewerId};
use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeV2, Entry, EntryType, Message};
use rand::Rng;
use rand::rngs::StdRng;

use crate::checkers::Observation;
use crate::config::{
    CLOCK_BASE_MS, ELECTION_TICKS, EXPIRY_BATCHES_PER_SECOND, Faults, HEARTBEAT_TICKS, NO_LEADER_RETRY_MS,
    NOT_LEADER_RETRY_MS, OPS_PER_NODE_MAX, PENDING_PROPOSALS_MAX, RAFT_TICK_MS, REQUEST_TIMEOUT_MS,
    SNAPSHOT_EVERY_ENTRIES, VIEWER_TTL_MS,
};
use crate::control::Control;
use crate::message::{ClientId, ClientReply, ForwardResult, NodeIndex, Payload};
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

/// Why a store operation failed (the store's `StoreError`, as far as callers tell apart).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpError {
    /// No leader was known until the deadline.
    NoLeader,
    /// The deadline passed (the write may still apply).
    Timeout,
    /// This node stopped being the leader before a leader-local job was proposed.
    NotLeader,
    /// A limit refused it.
    Overloaded(&'static str),
    /// Anything else (the leader failed a forwarded proposal, raft refused it).
    Failed(String),
}

impl std::fmt::Display for OpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpError::NoLeader => write!(f, "no leader"),
            OpError::Timeout => write!(f, "timed out after {REQUEST_TIMEOUT_MS} ms"),
            OpError::NotLeader => write!(f, "not the leader"),
            OpError::Overloaded(what) => write!(f, "overloaded: {what}"),
            OpError::Failed(why) => write!(f, "{why}"),
        }
    }
}

/// What a store operation's result is for: where the completion goes.
#[derive(Clone, Debug)]
pub enum Purpose {
    /// The node's registration.
    Register,
    /// A node heartbeat.
    Heartbeat,
    /// The leader's initial settings.
    Settings,
    /// The leader's viewer expiry.
    Expire,
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
    /// A batch of viewer upserts.
    ViewerBatch { waiters: Vec<(ViewerId, Writers)> },
    /// A resume reads the viewer state (linearizable).
    ResumeRead { join: u64 },
    /// A closing hosted room releases its placement.
    Release { room: RoomId },
    /// A leaving viewer's state is deleted.
    DeleteViewer { client: ClientId, request: u64 },
}

/// The result of a store operation: one outcome per command (none for a read).
pub type OpResult = Result<Vec<Outcome>, OpError>;

#[derive(Debug)]
enum OpKind {
    Propose(Vec<Command>),
    Read,
}

#[derive(Debug)]
enum OpState {
    /// Waiting for a leader (or to retry after a not-leader answer).
    Waiting { retry_at_ms: u64 },
    /// Queued or proposed on this node, the leader.
    Local,
    /// Forwarded to the leader.
    Forwarded,
    /// A read waiting for its read index and the apply.
    Reading,
}

#[derive(Debug)]
struct Op {
    purpose: Purpose,
    kind: OpKind,
    deadline_ms: u64,
    state: OpState,
    /// Retry on not-leader (callers of `Store::propose`); leader-local jobs do not.
    retry: bool,
}

/// Who waits for a proposal's outcome on the leader.
#[derive(Clone, Debug)]
enum Caller {
    Local {
        op: u64,
    },
    Forwarded {
        from: NodeIndex,
        request: u64,
        deadline_ms: u64,
    },
}

#[derive(Debug)]
struct PendingBatch {
    /// Commands and the caller, per caller, in entry order (`None`: gave up).
    callers: Vec<(usize, Option<Caller>)>,
}

/// The durable part of a node plus its running incarnation, if up.
pub struct Node {
    /// Roster index.
    pub index: NodeIndex,
    /// The raft log and hard state (durable).
    pub storage: SimStorage,
    /// The applied state while down (while up it lives in the live node's `sm`).
    pub durable_sm: StateMachine,
    /// The running incarnation, `None` while crashed (or gone).
    pub live: Option<Live>,
    /// Incremented on every start; events of older incarnations are dropped.
    pub incarnation: u64,
    /// Drained and left: never restarts.
    pub left: bool,
}

/// A running node: the store shell's volatile state, the control plane and the sessions.
pub struct Live {
    pub(crate) me: NodeIndex,
    pub(crate) roster: Rc<Roster>,
    pub(crate) incarnation: u64,
    pub(crate) replica: Replica<SimStorage>,
    pub(crate) storage: SimStorage,
    /// The applied state (durable: kept across a crash).
    pub(crate) sm: StateMachine,
    unproposed: Vec<(Vec<Command>, Caller)>,
    pending: BTreeMap<u64, PendingBatch>,
    next_batch_id: u64,
    ops: BTreeMap<u64, Op>,
    next_op: u64,
    unissued_reads: Vec<u64>,
    reads_by_ctx: BTreeMap<Vec<u8>, Vec<u64>>,
    reads_waiting_apply: Vec<(u64, u64)>,
    next_read_ctx: u64,
    leader_since_ms: u64,
    expiry_in_flight: bool,
    last_expiry_ms: u64,
    settings_in_flight: bool,
    raft_ticks: u64,
    completions: VecDeque<(Purpose, OpResult)>,
    scratch_writes: Vec<SmWrite>,
    /// The node's mesh tasks (see [`crate::control`]).
    pub(crate) control: Control,
    /// Viewer sessions and the viewer batcher (see [`crate::sessions`]).
    pub(crate) sessions: Sessions,
}

impl Node {
    /// A node that has never run, holding the bootstrap snapshot.
    pub fn new(index: NodeIndex, storage: SimStorage, sm: StateMachine) -> Self {
        Node {
            index,
            storage,
            durable_sm: sm,
            live: None,
            incarnation: 0,
            left: false,
        }
    }

    /// Starts (or restarts) the node: rebuilds the state machine from its records and starts a
    /// replica over the durable log.
    pub fn start(&mut self, roster: Rc<Roster>, now_ms: u64, rng: &mut StdRng) -> Result<(), String> {
        if self.live.is_some() || self.left {
            return Ok(());
        }
        self.incarnation += 1;
        let records = self
            .durable_sm
            .all_records()
            .into_iter()
            .filter_map(|w| w.value.map(|v| (w.tree, w.key, v)));
        let sm = StateMachine::from_records(records)
            .map_err(|(tree, key, why)| format!("state machine record {tree:?}/{key:?} unreadable: {why}"))?;
        let config = ReplicaConfig {
            raft_id: roster.nodes[self.index].raft_id,
            election_ticks: ELECTION_TICKS,
            heartbeat_ticks: HEARTBEAT_TICKS,
            applied_index: sm.applied().index,
            max_size_per_msg: 1024 * 1024,
            max_inflight_msgs: 256,
            promote_lag_entries: 16,
        };
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        // One value in the election range: raft-rs would otherwise draw it from thread_rng.
        let replica =
            Replica::new_with_election_ticks_max(config, Some(ELECTION_TICKS + 1), self.storage.clone(), &logger)
                .map_err(|e| format!("raft init: {e}"))?;
        let seed: u64 = rng.random();
        let clock = roster.clock_ms(self.index, now_ms);
        self.live = Some(Live {
            me: self.index,
            incarnation: self.incarnation,
            replica,
            storage: self.storage.clone(),
            sm,
            unproposed: Vec::new(),
            pending: BTreeMap::new(),
            // A random start, so a restarted node never mistakes an entry of its previous life
            // for one of its new batches (as the store does).
            next_batch_id: seed >> 1,
            ops: BTreeMap::new(),
            next_op: self.incarnation << 40,
            unissued_reads: Vec::new(),
            reads_by_ctx: BTreeMap::new(),
            reads_waiting_apply: Vec::new(),
            next_read_ctx: 0,
            leader_since_ms: 0,
            expiry_in_flight: false,
            last_expiry_ms: 0,
            settings_in_flight: false,
            raft_ticks: 0,
            completions: VecDeque::new(),
            scratch_writes: Vec::new(),
            control: Control::new(clock),
            sessions: Sessions::default(),
            roster,
        });
        Ok(())
    }

    /// Crashes the node: everything volatile is lost, the log and the applied state stay.
    pub fn crash(&mut self) {
        if let Some(live) = self.live.take() {
            self.durable_sm = live.sm;
        }
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

    /// The known leader's node id, when it is registered (`Store::leader`).
    pub fn leader_id(&self) -> Option<NodeId> {
        self.sm
            .node_by_raft_id(self.replica.leader())
            .map(|n| n.registration.id.clone())
    }

    // ----- operations issued by the control plane and the sessions -----

    fn new_op(&mut self, ctx: &Ctx<'_>, purpose: Purpose, kind: OpKind, retry: bool) -> Option<u64> {
        if self.ops.len() >= OPS_PER_NODE_MAX {
            self.completions
                .push_back((purpose, Err(OpError::Overloaded("store operations"))));
            return None;
        }
        let id = self.next_op;
        self.next_op += 1;
        self.ops.insert(
            id,
            Op {
                purpose,
                kind,
                deadline_ms: ctx.now_ms + REQUEST_TIMEOUT_MS,
                state: OpState::Waiting { retry_at_ms: 0 },
                retry,
            },
        );
        Some(id)
    }

    /// Proposes `commands` (through the leader when this node follows) and completes `purpose`
    /// with one outcome per command once applied (`Store::propose`). Returns the op id.
    pub fn propose(&mut self, ctx: &mut Ctx<'_>, commands: Vec<Command>, purpose: Purpose) -> Option<u64> {
        let id = self.new_op(ctx, purpose, OpKind::Propose(commands), true)?;
        self.try_submit(ctx, id);
        Some(id)
    }

    /// Waits for a linearizable read point, then completes `purpose` (the caller reads
    /// the live node's `sm` in its completion): `Store::read_barrier`.
    pub fn read(&mut self, ctx: &mut Ctx<'_>, purpose: Purpose) {
        if let Some(id) = self.new_op(ctx, purpose, OpKind::Read, false) {
            if let Some(op) = self.ops.get_mut(&id) {
                op.state = OpState::Reading;
            }
            self.unissued_reads.push(id);
        }
    }

    /// A leader-local job proposes `commands` directly (no retry, no forwarding).
    fn propose_leader_job(&mut self, ctx: &Ctx<'_>, commands: Vec<Command>, purpose: Purpose) {
        if let Some(id) = self.new_op(ctx, purpose, OpKind::Propose(Vec::new()), false) {
            if let Some(op) = self.ops.get_mut(&id) {
                op.state = OpState::Local;
            }
            self.unproposed.push((commands, Caller::Local { op: id }));
        }
    }

    fn complete(&mut self, op: u64, result: OpResult) {
        if let Some(op) = self.ops.remove(&op) {
            self.completions.push_back((op.purpose, result));
        }
    }

    fn try_submit(&mut self, ctx: &mut Ctx<'_>, id: u64) {
        let leader = self.replica.leader();
        let me = self.raft_id();
        let Some(op) = self.ops.get_mut(&id) else { return };
        let OpKind::Propose(commands) = &op.kind else { return };
        if leader == me {
            if !self.replica.is_leader() {
                op.state = OpState::Waiting {
                    retry_at_ms: ctx.now_ms + NOT_LEADER_RETRY_MS,
                };
            } else if self.unproposed.len() + self.pending.len() >= PENDING_PROPOSALS_MAX {
                self.complete(id, Err(OpError::Overloaded("pending proposals")));
            } else {
                let commands = commands.clone();
                op.state = OpState::Local;
                self.unproposed.push((commands, Caller::Local { op: id }));
            }
        } else if let Some(to) = (leader != 0).then(|| self.roster.by_raft(leader)).flatten() {
            let commands = commands.clone();
            op.state = OpState::Forwarded;
            ctx.send(to, Payload::Forward { request: id, commands });
        } else {
            op.state = OpState::Waiting {
                retry_at_ms: ctx.now_ms + NO_LEADER_RETRY_MS,
            };
        }
    }

    /// Fails ops past their deadline and resubmits the ones whose retry time came.
    fn sweep_ops(&mut self, ctx: &mut Ctx<'_>) {
        let now = ctx.now_ms;
        let leader = self.replica.leader();
        let expired: Vec<(u64, bool)> = self
            .ops
            .iter()
            .filter(|(_, op)| op.deadline_ms <= now)
            .map(|(id, op)| (*id, matches!(op.state, OpState::Waiting { .. })))
            .collect();
        for (id, waiting) in expired {
            let error = if waiting && leader == 0 {
                OpError::NoLeader
            } else {
                OpError::Timeout
            };
            self.complete(id, Err(error));
        }
        let due: Vec<u64> = self
            .ops
            .iter()
            .filter(|(_, op)| matches!(op.state, OpState::Waiting { retry_at_ms } if retry_at_ms <= now))
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            self.try_submit(ctx, id);
        }
        // The leader answers forwarded callers that waited past their deadline.
        let mut timed_out = Vec::new();
        for batch in self.pending.values_mut() {
            for (_, caller) in &mut batch.callers {
                if let Some(Caller::Forwarded {
                    from,
                    request,
                    deadline_ms,
                }) = caller
                    && *deadline_ms <= now
                {
                    timed_out.push((*from, *request));
                    *caller = None;
                }
            }
        }
        self.pending.retain(|_, b| b.callers.iter().any(|(_, c)| c.is_some()));
        for (from, request) in timed_out {
            ctx.send(
                from,
                Payload::ForwardReply {
                    request,
                    result: ForwardResult::Failed(format!("timed out after {REQUEST_TIMEOUT_MS} ms")),
                },
            );
        }
    }

    fn wake_waiting_ops(&mut self, now_ms: u64) {
        for op in self.ops.values_mut() {
            if let OpState::Waiting { retry_at_ms } = &mut op.state {
                *retry_at_ms = (*retry_at_ms).min(now_ms);
            }
        }
    }

    // ----- inputs -----

    /// A raft tick (the replica task's ticker).
    pub fn on_raft_tick(&mut self, ctx: &mut Ctx<'_>) {
        self.raft_ticks += 1;
        self.replica.tick();
        if self.replica.leader_ready() {
            self.leader_jobs(ctx);
        }
        if self.raft_ticks.is_multiple_of(20) {
            // Reads whose callers all gave up are cancelled (the driver stops re-issuing them).
            let ops = &self.ops;
            let abandoned: Vec<Vec<u8>> = self
                .reads_by_ctx
                .iter()
                .filter(|(_, ids)| ids.iter().all(|id| !ops.contains_key(id)))
                .map(|(c, _)| c.clone())
                .collect();
            for c in abandoned {
                self.reads_by_ctx.remove(&c);
                self.replica.cancel_read(&c);
            }
            self.reads_waiting_apply.retain(|(_, id)| ops.contains_key(id));
        }
        self.turn(ctx);
    }

    /// The node's control loop: store deadlines and retries, then the mesh tasks.
    pub fn on_control_tick(&mut self, ctx: &mut Ctx<'_>) {
        self.sweep_ops(ctx);
        self.control_jobs(ctx);
        self.turn(ctx);
    }

    /// A message from node `from`.
    pub fn on_message(&mut self, ctx: &mut Ctx<'_>, from: NodeIndex, payload: Payload) {
        match payload {
            Payload::Raft(message) => {
                if let Err(e) = self.replica.step(*message) {
                    ctx.trace(format!("n{} raft refused a message: {e}", self.me));
                }
            }
            Payload::Forward { request, commands } => self.on_forward(ctx, from, request, commands),
            Payload::ForwardReply { request, result } => self.on_forward_reply(ctx, request, result),
            other => self.on_mesh_message(ctx, from, other),
        }
        self.turn(ctx);
    }

    /// A delivery report from the transport.
    pub fn on_report(&mut self, ctx: &mut Ctx<'_>, report: Report) {
        match report {
            Report::SnapshotDelivered { to } => {
                let raft_id = self.roster.nodes[to].raft_id;
                self.replica.report_snapshot(raft_id, true);
            }
            Report::Undeliverable { to, payload, why } => {
                let raft_id = self.roster.nodes[to].raft_id;
                match payload {
                    Payload::Raft(m) => {
                        if Replica::<SimStorage>::is_snapshot(&m) {
                            self.replica.report_snapshot(raft_id, false);
                        }
                        self.replica.report_unreachable(raft_id);
                    }
                    // A refused connection: the leader never got it, so retry (as the store's
                    // `forward_failure` does). A partitioned call just hangs until the deadline.
                    Payload::Forward { request, .. } if why == Undeliverable::Down => {
                        if let Some(op) = self.ops.get_mut(&request)
                            && matches!(op.state, OpState::Forwarded)
                        {
                            op.state = OpState::Waiting {
                                retry_at_ms: ctx.now_ms + NOT_LEADER_RETRY_MS,
                            };
                        }
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

    fn on_forward(&mut self, ctx: &mut Ctx<'_>, from: NodeIndex, request: u64, commands: Vec<Command>) {
        let leading = self.replica.leader() == self.raft_id() && self.replica.is_leader();
        if !leading {
            ctx.send(
                from,
                Payload::ForwardReply {
                    request,
                    result: ForwardResult::NotLeader,
                },
            );
        } else if commands.is_empty() || commands.len() > COMMANDS_PER_ENTRY_MAX {
            ctx.send(
                from,
                Payload::ForwardReply {
                    request,
                    result: ForwardResult::Failed("bad number of commands".into()),
                },
            );
        } else if self.unproposed.len() + self.pending.len() >= PENDING_PROPOSALS_MAX {
            ctx.send(
                from,
                Payload::ForwardReply {
                    request,
                    result: ForwardResult::Failed("overloaded: pending proposals".into()),
                },
            );
        } else {
            let caller = Caller::Forwarded {
                from,
                request,
                deadline_ms: ctx.now_ms + REQUEST_TIMEOUT_MS,
            };
            self.unproposed.push((commands, caller));
        }
    }

    fn on_forward_reply(&mut self, ctx: &mut Ctx<'_>, request: u64, result: ForwardResult) {
        let Some(op) = self.ops.get_mut(&request) else { return };
        if !matches!(op.state, OpState::Forwarded) {
            return;
        }
        let expected = match &op.kind {
            OpKind::Propose(commands) => commands.len(),
            OpKind::Read => 0,
        };
        match result {
            ForwardResult::Applied(outcomes) if outcomes.len() == expected => self.complete(request, Ok(outcomes)),
            ForwardResult::Applied(_) => self.complete(
                request,
                Err(OpError::Failed("leader answered the wrong number of outcomes".into())),
            ),
            ForwardResult::NotLeader => {
                op.state = OpState::Waiting {
                    retry_at_ms: ctx.now_ms + NOT_LEADER_RETRY_MS,
                };
            }
            ForwardResult::Failed(why) => self.complete(request, Err(OpError::Failed(why))),
        }
    }

    // ----- the replica task's turn -----

    /// Proposes, reads, carries out readies and dispatches completions until quiet.
    pub fn turn(&mut self, ctx: &mut Ctx<'_>) {
        for _ in 0..TURN_ROUNDS_MAX {
            self.issue_proposals(ctx);
            self.issue_reads();
            self.process_readies(ctx);
            self.answer_reads();
            self.maybe_compact(ctx);
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
            Purpose::Settings => self.settings_in_flight = false,
            Purpose::Expire => self.expiry_in_flight = false,
            Purpose::ViewerBatch { waiters } => self.viewer_batch_done(ctx, waiters, result),
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

    /// Leader-only background work (`ReplicaTask::leader_jobs`): the initial settings, then
    /// viewer expiry decided on this node's clock, after one election timeout of grace.
    fn leader_jobs(&mut self, ctx: &mut Ctx<'_>) {
        let now = self.clock_ms(ctx);
        if !self.settings_in_flight && self.sm.settings().is_none() {
            self.settings_in_flight = true;
            let command = Command::SetSettings {
                settings: ClusterSettings {
                    viewer_ttl_ms: VIEWER_TTL_MS,
                },
                only_if_unset: true,
            };
            self.propose_leader_job(ctx, vec![command], Purpose::Settings);
        }
        if self.expiry_in_flight {
            return;
        }
        if now.saturating_sub(self.last_expiry_ms) < 1000 / EXPIRY_BATCHES_PER_SECOND {
            return;
        }
        let not_before = self.leader_since_ms + ELECTION_TICKS as u64 * RAFT_TICK_MS;
        let due = self.sm.due_viewers(now, not_before, VIEWERS_PER_EXPIRY_MAX);
        if due.is_empty() {
            return;
        }
        self.last_expiry_ms = now;
        self.expiry_in_flight = true;
        self.propose_leader_job(ctx, vec![Command::ExpireViewers { viewers: due }], Purpose::Expire);
    }

    /// Coalesces what was proposed since the last turn into entries (`issue_proposals`).
    fn issue_proposals(&mut self, ctx: &mut Ctx<'_>) {
        if self.unproposed.is_empty() {
            return;
        }
        let queued = std::mem::take(&mut self.unproposed);
        // Sized as `Store::propose` sizes them: the encoding of their commands.
        let entries = pack_proposals(queued.iter().map(|(c, _)| (c.len(), codec::encode(c).len())));
        let mut queue = queued.into_iter();
        for taken in entries {
            let mut commands = Vec::new();
            let mut callers = Vec::new();
            for (c, caller) in queue.by_ref().take(taken) {
                callers.push((c.len(), Some(caller)));
                commands.extend(c);
            }
            let batch_id = self.next_batch_id;
            self.next_batch_id = self.next_batch_id.wrapping_add(1);
            let payload = EntryPayload {
                proposer: self.raft_id(),
                batch_id,
                commands,
            };
            let data = codec::encode(&payload);
            if data.len() > ENTRY_BYTES_MAX {
                for (_, caller) in callers.into_iter().filter_map(|(n, c)| c.map(|c| (n, c))) {
                    self.fail_caller(ctx, caller, OpError::Failed("proposal too large".into()));
                }
                continue;
            }
            match self.replica.propose(data) {
                Ok(()) => {
                    let origins = callers
                        .iter()
                        .map(|(count, caller)| match caller {
                            Some(Caller::Local { op }) => (self.me, *op, *count),
                            Some(Caller::Forwarded { from, request, .. }) => (*from, *request, *count),
                            None => (self.me, 0, *count),
                        })
                        .collect();
                    ctx.observe(Observation::BatchProposed {
                        proposer: self.raft_id(),
                        batch_id,
                        callers: origins,
                    });
                    self.pending.insert(batch_id, PendingBatch { callers });
                }
                Err(e) => {
                    for (_, caller) in callers {
                        let Some(caller) = caller else { continue };
                        match &e {
                            ProposeError::NotLeader { .. } => self.not_leader(ctx, caller),
                            other => self.fail_caller(ctx, caller, OpError::Failed(format!("{other:?}"))),
                        }
                    }
                }
            }
        }
    }

    fn not_leader(&mut self, ctx: &mut Ctx<'_>, caller: Caller) {
        match caller {
            Caller::Local { op } => {
                let retry = self.ops.get(&op).is_some_and(|o| o.retry);
                if retry {
                    if let Some(o) = self.ops.get_mut(&op) {
                        o.state = OpState::Waiting {
                            retry_at_ms: ctx.now_ms + NOT_LEADER_RETRY_MS,
                        };
                    }
                } else {
                    self.complete(op, Err(OpError::NotLeader));
                }
            }
            Caller::Forwarded { from, request, .. } => ctx.send(
                from,
                Payload::ForwardReply {
                    request,
                    result: ForwardResult::NotLeader,
                },
            ),
        }
    }

    fn fail_caller(&mut self, ctx: &mut Ctx<'_>, caller: Caller, error: OpError) {
        match caller {
            Caller::Local { op } => self.complete(op, Err(error)),
            Caller::Forwarded { from, request, .. } => ctx.send(
                from,
                Payload::ForwardReply {
                    request,
                    result: ForwardResult::Failed(error.to_string()),
                },
            ),
        }
    }

    fn issue_reads(&mut self) {
        if self.unissued_reads.is_empty() {
            return;
        }
        let ids = std::mem::take(&mut self.unissued_reads);
        self.next_read_ctx += 1;
        let mut read_ctx = self.incarnation.to_be_bytes().to_vec();
        read_ctx.extend_from_slice(&self.next_read_ctx.to_be_bytes());
        match self.replica.read_index(read_ctx.clone()) {
            Ok(()) => {
                self.reads_by_ctx.insert(read_ctx, ids);
            }
            Err(e) => {
                for id in ids {
                    self.complete(id, Err(OpError::Failed(format!("{e:?}"))));
                }
            }
        }
    }

    fn answer_reads(&mut self) {
        let applied = self.sm.applied().index;
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.reads_waiting_apply)
            .into_iter()
            .partition(|(index, _)| *index <= applied);
        self.reads_waiting_apply = waiting;
        for (_, id) in ready {
            self.complete(id, Ok(Vec::new()));
        }
    }

    /// Carries out every Ready in the driver's order (`process_readies`).
    fn process_readies(&mut self, ctx: &mut Ctx<'_>) {
        while let Some(batch) = self.replica.poll_ready() {
            if let Some(leader) = batch.leader_changed {
                if leader == self.raft_id() {
                    self.leader_since_ms = self.clock_ms(ctx);
                } else {
                    // Queued proposals can no longer be proposed here; callers retry elsewhere.
                    for (_, caller) in std::mem::take(&mut self.unproposed) {
                        self.not_leader(ctx, caller);
                    }
                }
                ctx.trace(format!("n{} knows leader {leader}", self.me));
                self.wake_waiting_ops(ctx.now_ms);
            }
            self.send_raft(ctx, batch.messages);
            if let Some(snapshot) = &batch.snapshot {
                match StateMachine::decode_snapshot(snapshot.get_data()) {
                    Ok(sm) => {
                        self.storage.apply_snapshot(snapshot);
                        let index = sm.applied().index;
                        self.sm = sm;
                        ctx.observe(Observation::SnapshotInstalled { node: self.me, index });
                    }
                    Err(e) => {
                        // The store stops its replica on this; the checkers flag it.
                        ctx.observe(Observation::ShellError {
                            node: self.me,
                            detail: format!("undecodable snapshot from the leader: {e}"),
                        });
                        return;
                    }
                }
            }
            if let Err(e) = self.storage.append(&batch.entries) {
                ctx.observe(Observation::ShellError {
                    node: self.me,
                    detail: e.to_string(),
                });
                return;
            }
            if let Some(hs) = &batch.hard_state {
                self.storage.set_hard_state(hs);
            }
            self.replica.on_written();
            self.apply(ctx, batch.committed_entries);
            for state in batch.read_states {
                if let Some(ids) = self.reads_by_ctx.remove(&state.request_ctx) {
                    self.reads_waiting_apply
                        .extend(ids.into_iter().map(|id| (state.index, id)));
                }
            }
            self.send_raft(ctx, batch.persisted_messages);
            self.replica.on_persisted(batch.number);
            if let Some(snapshot) = &batch.snapshot {
                self.replica.on_applied(snapshot.get_metadata().index);
            }
        }
    }

    fn send_raft(&mut self, ctx: &mut Ctx<'_>, messages: Vec<Message>) {
        for m in messages {
            if let Some(to) = self.roster.by_raft(m.to) {
                ctx.send(to, Payload::Raft(Box::new(m)));
            }
        }
    }

    /// Applies committed entries in order (`ReplicaTask::apply`).
    fn apply(&mut self, ctx: &mut Ctx<'_>, entries: Vec<Entry>) {
        let Some(last_index) = entries.last().map(|e| e.index) else {
            return;
        };
        for entry in entries {
            if entry.index <= self.sm.applied().index {
                continue; // already in the state (from a snapshot)
            }
            self.scratch_writes.clear();
            ctx.observe(Observation::Applied {
                node: self.me,
                index: entry.index,
                term: entry.term,
                entry_type: entry.get_entry_type(),
                data: entry.data.to_vec(),
            });
            match entry.get_entry_type() {
                EntryType::EntryNormal if entry.data.is_empty() => {
                    self.sm.apply_empty(entry.index, entry.term, &mut self.scratch_writes)
                }
                EntryType::EntryNormal => match codec::decode::<EntryPayload, ENTRY_BYTES_MAX>(&entry.data) {
                    Ok(payload) => {
                        let outcomes =
                            self.sm
                                .apply(entry.index, entry.term, &payload.commands, &mut self.scratch_writes);
                        if payload.proposer == self.raft_id()
                            && let Some(batch) = self.pending.remove(&payload.batch_id)
                        {
                            self.reply_batch(ctx, batch, outcomes);
                        }
                    }
                    Err(e) => {
                        ctx.trace(format!("n{} undecodable entry {} skipped: {e}", self.me, entry.index));
                        self.sm.apply_empty(entry.index, entry.term, &mut self.scratch_writes);
                    }
                },
                EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => {
                    let cc = if entry.get_entry_type() == EntryType::EntryConfChange {
                        ConfChange::parse_from_bytes(&entry.data).map(mediamesh_cluster::driver::conf_change_v1_to_v2)
                    } else {
                        ConfChangeV2::parse_from_bytes(&entry.data)
                    };
                    if let Ok(cc) = cc
                        && let Ok(cs) = self.replica.apply_conf_change(&cc)
                    {
                        self.storage.set_conf_state(&cs);
                    }
                    self.sm.apply_empty(entry.index, entry.term, &mut self.scratch_writes);
                }
            }
        }
        self.replica.on_applied(last_index);
    }

    fn reply_batch(&mut self, ctx: &mut Ctx<'_>, batch: PendingBatch, outcomes: Vec<Outcome>) {
        let mut outcomes = outcomes.into_iter();
        for (count, caller) in batch.callers {
            let mine: Vec<Outcome> = outcomes.by_ref().take(count).collect();
            match caller {
                Some(Caller::Local { op }) => self.complete(op, Ok(mine)),
                Some(Caller::Forwarded { from, request, .. }) => ctx.send(
                    from,
                    Payload::ForwardReply {
                        request,
                        result: ForwardResult::Applied(mine),
                    },
                ),
                None => {}
            }
        }
    }

    fn maybe_compact(&mut self, ctx: &mut Ctx<'_>) {
        let applied = self.sm.applied();
        let since = applied.index.saturating_sub(self.storage.snapshot_index());
        if since == 0 || (since < SNAPSHOT_EVERY_ENTRIES && !self.storage.snapshot_wanted()) {
            return;
        }
        if let Err(e) = self
            .storage
            .compact(applied.index, applied.term, self.sm.encode_snapshot())
        {
            ctx.observe(Observation::ShellError {
                node: self.me,
                detail: e.to_string(),
            });
        }
    }

    /// Whether `m` carries a snapshot (its delivery is reported back to the sender).
    pub fn is_snapshot_message(m: &Message) -> bool {
        Replica::<SimStorage>::is_snapshot(m)
    }
}
