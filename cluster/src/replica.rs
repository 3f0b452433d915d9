//! [`ReplicaCore`]: everything one store replica decides, without IO, threads or a clock. The
//! node's tokio + sled task ([`crate::store`]) and the simulator's node drive the same core; each
//! only carries out its [`Output`]s (send messages, flush, encode a snapshot, answer callers).
//!
//! What it holds, on top of the raft driver ([`Replica`]) and the [`StateMachine`]:
//!
//! - **operations** of this node's callers ([`ReplicaCore::submit`]): a proposal or a
//!   linearizable read with a deadline. On the leader a proposal is queued here; on a follower
//!   it is forwarded to the leader ([`Output::Forward`]); with no leader, or after a "not the
//!   leader" answer, it waits and is tried again (at once when a leader appears) until its
//!   deadline. Forwarded proposals arriving on the leader ([`ReplicaCore::on_forwarded`]) are
//!   answered with [`Output::ForwardReply`].
//! - **coalescing**: everything queued since the last [`ReplicaCore::advance`] goes into as few
//!   entries as [`pack_proposals`] allows (usually one), so concurrent writers share one entry,
//!   one append and one flush.
//! - **reads** by ReadIndex: all reads issued in one turn share one read index; each is answered
//!   once the state machine has applied up to it.
//! - **Ready ordering**: [`ReplicaCore::advance`] takes every Ready raft has, sends leader
//!   messages, writes entries, hard state and received snapshots to the [`LogStore`], applies
//!   committed entries, and returns one [`Persist`] for all of them; the shell flushes once and
//!   calls [`ReplicaCore::on_persisted`], which releases the messages that needed the flush.
//! - **leader jobs**: the initial cluster settings, and viewer expiry decided on the leader's
//!   wall clock after one election timeout of grace (etcd's lease model).
//! - **snapshots**: after [`CoreConfig::snapshot_every_entries`] entries or
//!   [`CoreConfig::snapshot_every_bytes`] bytes of log, or when raft wants one for a peer, the
//!   core hands out a frozen copy of the state ([`Output::BuildSnapshot`], a cheap clone) and
//!   goes on applying; the shell encodes it wherever it likes and returns the bytes
//!   ([`ReplicaCore::on_snapshot_built`]), which compacts the log.
//!
//! Time comes in as `now_ms` (monotonic, for deadlines and retries) on every input, and the wall
//! clock as [`Clock::wall_ms`] on ticks (for expiry and the leader's grace).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use parking_lot::RwLock;
use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeV2, ConfState, Entry, EntryType, Message};

use crate::codec::{self, ENTRY_BYTES_MAX};
use crate::command::{COMMANDS_PER_ENTRY_MAX, Command, EntryPayload, Outcome, VIEWERS_PER_EXPIRY_MAX, pack_proposals};
use crate::driver::{ProposeError, Replica, ReplicaConfig, ReplicaStatus, conf_change_v1_to_v2};
use crate::error::StoreError;
use crate::state_machine::StateMachine;
use crate::storage::LogStore;
use crate::types::ClusterSettings;

/// Proposals (of callers) waiting to be coalesced or applied, at most.
pub const PENDING_PROPOSALS_MAX: usize = 8192;
/// Operations (proposals and reads) of this node's callers in flight at once, at most.
pub const OPS_MAX: usize = 16_384;
/// A proposal answered "not the leader" is tried again after this long.
pub const NOT_LEADER_RETRY_MS: u64 = 20;
/// An operation that finds no leader is tried again after this long (or when one appears).
pub const NO_LEADER_RETRY_MS: u64 = 200;
/// Forwarded proposals this leader holds at once, at most.
pub const FORWARDED_MAX: usize = 8192;

/// An operation's id, chosen by the shell (unique among its operations in flight).
pub type OpId = u64;

/// Settings of a replica core.
#[derive(Clone, Debug)]
pub struct CoreConfig {
    /// The raft driver's settings (its `applied_index` is taken from the state given to
    /// [`ReplicaCore::new`]).
    pub replica: ReplicaConfig,
    /// Upper bound of raft's randomized election timeout (see
    /// [`Replica::new_with_election_ticks_max`]); `None`: raft's default.
    pub election_ticks_max: Option<usize>,
    /// Length of one tick.
    pub tick_ms: u64,
    /// Deadline of forwarded proposals this leader holds.
    pub request_timeout_ms: u64,
    /// Take a snapshot every this many applied entries …
    pub snapshot_every_entries: u64,
    /// … or this many bytes of applied log, whichever comes first.
    pub snapshot_every_bytes: u64,
    /// Expiry batches the leader proposes per second, at most.
    pub expiry_batches_per_second: u32,
    /// Viewer TTL written into the settings of a new cluster.
    pub viewer_ttl_ms: u64,
    /// First batch id (random in production, so a restarted node never takes an entry of its
    /// previous life for one of its batches; from the seed in the simulator).
    pub first_batch_id: u64,
    /// Prefix of this incarnation's read contexts (as random or seeded as the batch ids).
    pub read_context_prefix: u64,
    /// Emit [`Output::Proposed`] for every batch and [`Output::Applied`] for every entry (the
    /// simulator's checkers read them; the node does not).
    pub observe: bool,
    /// Bugs planted on purpose, so the simulator's checkers can show they catch them. All off
    /// in the node.
    pub faults: CoreFaults,
}

/// Bugs the simulator can plant in the core (test-only switches; the node never sets them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CoreFaults {
    /// Acknowledge a viewer upsert as stored as soon as the leader proposes it, before it
    /// commits: a leader that crashes then loses writes it acknowledged.
    pub ack_upserts_on_propose: bool,
}

/// The clock of one input: monotonic milliseconds and this node's wall clock.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Clock {
    /// Monotonic time (deadlines, retries).
    pub now_ms: u64,
    /// Wall clock, ms since the Unix epoch (expiry).
    pub wall_ms: u64,
}

/// Why an operation failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpError {
    /// No leader was known until the deadline.
    NoLeader,
    /// The deadline passed (a write may still apply).
    Timeout,
    /// This node is not the leader (only for calls that must run on the leader).
    NotLeader,
    /// A limit refused it.
    Overloaded(&'static str),
    /// raft or the proposal's size refused it.
    Rejected(String),
    /// The leader failed a forwarded proposal, or the call to it failed.
    Remote(String),
}

impl OpError {
    /// The store's error for it (`timeout_ms`: the deadline the caller had).
    pub fn into_store_error(self, timeout_ms: u64) -> StoreError {
        match self {
            OpError::NoLeader | OpError::NotLeader => StoreError::NoLeader,
            OpError::Timeout => StoreError::Timeout(timeout_ms),
            OpError::Overloaded(what) => StoreError::Overloaded(what),
            OpError::Rejected(m) => StoreError::Rejected(m),
            OpError::Remote(m) => StoreError::Transport(m),
        }
    }
}

impl std::fmt::Display for OpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpError::NoLeader => write!(f, "no leader"),
            OpError::Timeout => write!(f, "timed out"),
            OpError::NotLeader => write!(f, "not the leader"),
            OpError::Overloaded(what) => write!(f, "overloaded: {what}"),
            OpError::Rejected(why) => write!(f, "rejected: {why}"),
            OpError::Remote(why) => write!(f, "{why}"),
        }
    }
}

/// The result of an operation: one outcome per command (none for a read).
pub type OpResult = Result<Vec<Outcome>, OpError>;

/// The leader's answer to a forwarded proposal.
#[derive(Clone, Debug, PartialEq)]
pub enum ForwardResult {
    /// Applied; one outcome per command.
    Applied(Vec<Outcome>),
    /// Not the leader (or the request never arrived): the follower may try again.
    NotLeader,
    /// Failed on the leader, or the call failed after it may have arrived: the message.
    Failed(String),
}

/// What an operation does.
#[derive(Clone, Debug)]
pub enum OpKind {
    /// Propose these commands (through the leader).
    Propose(Vec<Command>),
    /// Wait for a linearizable read point (the caller then reads the state machine).
    Read,
    /// A membership change (only on the leader).
    ConfChange(ConfChangeV2),
}

/// Who waits for a proposal on the leader.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// An operation of this node.
    Local(OpId),
    /// A follower's forwarded proposal: `request` is the follower's id of it.
    Forwarded {
        /// Raft id of the follower.
        from: u64,
        /// The follower's operation id.
        request: u64,
        /// Answer a timeout then.
        deadline_ms: u64,
    },
    /// One of this leader's own jobs.
    Job(Job),
}

/// The leader's own proposals.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Job {
    /// The initial cluster settings.
    Settings,
    /// Viewer expiry.
    Expire,
}

/// What the shell must carry out, in order.
#[derive(Debug)]
pub enum Output {
    /// Send raft messages to their peers.
    Send(Vec<Message>),
    /// Forward a proposal to the leader `to`; answer with [`ReplicaCore::on_forward_reply`].
    Forward {
        /// Raft id of the leader.
        to: u64,
        /// The operation.
        request: OpId,
        /// Its commands.
        commands: Vec<Command>,
        /// The operation's deadline.
        deadline_ms: u64,
    },
    /// Answer a forwarded proposal of follower `to`.
    ForwardReply {
        /// Raft id of the follower.
        to: u64,
        /// The follower's id of it.
        request: u64,
        /// The answer.
        result: ForwardResult,
        /// Index of the entry that applied it, if it applied here.
        index: Option<u64>,
    },
    /// An operation of this node finished.
    Done {
        /// The operation.
        op: OpId,
        /// Its result.
        result: OpResult,
        /// Index of the entry that applied it, if it applied here.
        index: Option<u64>,
    },
    /// The leader this replica knows changed (0: none).
    LeaderChanged {
        /// Raft id of the new leader.
        leader: u64,
    },
    /// A node's cluster address, from an applied registration or an installed snapshot.
    PeerAddress {
        /// Raft id.
        raft_id: u64,
        /// `host:port`.
        cluster_addr: String,
    },
    /// Encode `state` ([`StateMachine::encode_snapshot`]) and give the bytes back with
    /// [`ReplicaCore::on_snapshot_built`]; the core goes on applying meanwhile.
    BuildSnapshot {
        /// Applied index of `state`.
        index: u64,
        /// Its term.
        term: u64,
        /// The configuration at that index.
        conf_state: ConfState,
        /// A frozen copy of the state (copy-on-write: cheap to make and to keep).
        state: Box<StateMachine>,
    },
    /// A snapshot from the leader replaced the state.
    SnapshotInstalled {
        /// Its index.
        index: u64,
    },
    /// A batch was proposed (only with [`CoreConfig::observe`]).
    Proposed {
        /// The batch id in the entry.
        batch_id: u64,
        /// Callers and their number of commands, in entry order.
        callers: Vec<(Caller, usize)>,
    },
    /// An entry was applied (only with [`CoreConfig::observe`]).
    Applied {
        /// Index.
        index: u64,
        /// Term.
        term: u64,
        /// Type.
        entry_type: EntryType,
        /// Data.
        data: Vec<u8>,
    },
    /// An undecodable entry or conf change was skipped, or raft refused a conf change (a
    /// warning for the log: every replica does the same, but it means a bug or a newer writer).
    Warning(String),
    /// raft refused a message from a peer (stale, misaddressed or impossible; a debug line).
    Refused(String),
}

/// One flush for the Readies [`ReplicaCore::advance`] processed: when `sync`, flush the log
/// storage, then call [`ReplicaCore::on_persisted`] with `number` (also when not `sync`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Persist {
    /// The last Ready number.
    pub number: u64,
    /// Whether anything must reach the disk first.
    pub sync: bool,
}

#[derive(Debug)]
enum OpState {
    /// Waiting for a leader, or to retry after a not-leader answer.
    Waiting { retry_at_ms: u64 },
    /// Queued or proposed here, the leader.
    Local,
    /// Forwarded to the leader.
    Forwarded,
    /// A read waiting for its read index and the apply.
    Reading,
}

#[derive(Debug)]
struct Op {
    kind: OpKind,
    deadline_ms: u64,
    state: OpState,
    /// Try again after not-leader answers (false: fail with [`OpError::NotLeader`]).
    retry: bool,
}

#[derive(Debug)]
struct PendingBatch {
    /// Callers and their number of commands, in entry order (`None`: gave up).
    callers: Vec<(usize, Option<Caller>)>,
}

/// A proposal waiting for the next turn: commands, encoded size, caller.
type Unproposed = (Vec<Command>, usize, Caller);

/// The replica core. `S` is the log storage (sled in the node, memory in the simulator).
pub struct ReplicaCore<S: LogStore> {
    config: CoreConfig,
    replica: Replica<S>,
    storage: S,
    state: Arc<RwLock<StateMachine>>,
    outputs: Vec<Output>,
    ops: BTreeMap<OpId, Op>,
    unproposed: Vec<Unproposed>,
    pending: BTreeMap<u64, PendingBatch>,
    next_batch_id: u64,
    forwarded: usize,
    conf_pending: BTreeMap<u64, OpId>,
    next_conf_id: u64,
    unissued_reads: Vec<OpId>,
    reads_by_ctx: BTreeMap<Vec<u8>, Vec<OpId>>,
    reads_waiting_apply: VecDeque<(u64, OpId)>,
    next_read_ctx: u64,
    leader_since_wall_ms: u64,
    expiry_in_flight: bool,
    last_expiry_wall_ms: u64,
    settings_in_flight: bool,
    ticks: u64,
    /// Readies processed and not yet persisted: messages to send after the flush.
    persisted_messages: Vec<Message>,
    /// Snapshot indexes installed and not yet persisted (they count as applied after).
    installed_snapshots: Vec<u64>,
    /// Bytes of entries applied since the last snapshot.
    applied_bytes: u64,
    /// A snapshot is being built by the shell.
    building_snapshot: bool,
    /// Someone asked for a snapshot now.
    snapshot_forced: bool,
    /// No waiting operation is due before this (may be early, never late).
    next_retry_ms: u64,
}

impl<S: LogStore + Clone> ReplicaCore<S> {
    /// A core over `storage`, whose applied state is `state` (the state of its last snapshot;
    /// the log after it is applied again as raft hands it out).
    pub fn new(
        config: CoreConfig,
        storage: S,
        state: StateMachine,
        logger: &slog::Logger,
    ) -> Result<Self, raft::Error> {
        let mut replica_config = config.replica.clone();
        replica_config.applied_index = state.applied().index;
        let replica =
            Replica::new_with_election_ticks_max(replica_config, config.election_ticks_max, storage.clone(), logger)?;
        Ok(ReplicaCore {
            next_batch_id: config.first_batch_id,
            next_conf_id: config.first_batch_id,
            config,
            replica,
            storage,
            state: Arc::new(RwLock::new(state)),
            outputs: Vec::new(),
            ops: BTreeMap::new(),
            unproposed: Vec::new(),
            pending: BTreeMap::new(),
            forwarded: 0,
            conf_pending: BTreeMap::new(),
            unissued_reads: Vec::new(),
            reads_by_ctx: BTreeMap::new(),
            reads_waiting_apply: VecDeque::new(),
            next_read_ctx: 0,
            leader_since_wall_ms: 0,
            expiry_in_flight: false,
            last_expiry_wall_ms: 0,
            settings_in_flight: false,
            ticks: 0,
            persisted_messages: Vec::new(),
            installed_snapshots: Vec::new(),
            applied_bytes: 0,
            building_snapshot: false,
            snapshot_forced: false,
            next_retry_ms: u64::MAX,
        })
    }

    /// The applied state, shared with readers (the shell's handle reads it under the lock).
    pub fn state(&self) -> &Arc<RwLock<StateMachine>> {
        &self.state
    }

    /// The log storage.
    pub fn storage(&self) -> &S {
        &self.storage
    }

    /// Role, leader and indexes.
    pub fn status(&self) -> ReplicaStatus {
        self.replica.status()
    }

    /// Known leader (0: none).
    pub fn leader(&self) -> u64 {
        self.replica.leader()
    }

    /// True when this replica leads.
    pub fn is_leader(&self) -> bool {
        self.replica.is_leader()
    }

    /// This replica's raft id.
    pub fn raft_id(&self) -> u64 {
        self.config.replica.raft_id
    }

    /// Takes what the shell must do, in order.
    pub fn take_outputs(&mut self) -> Vec<Output> {
        std::mem::take(&mut self.outputs)
    }

    /// The earliest time a waiting operation may be due (the shell wakes the core then with
    /// [`Self::advance`]); `None` when none waits.
    pub fn next_retry_ms(&self) -> Option<u64> {
        (self.next_retry_ms != u64::MAX).then_some(self.next_retry_ms)
    }

    fn wait(&mut self, op: OpId, retry_at_ms: u64) {
        if let Some(o) = self.ops.get_mut(&op) {
            o.state = OpState::Waiting { retry_at_ms };
            self.next_retry_ms = self.next_retry_ms.min(retry_at_ms);
        }
    }

    /// Tries again the waiting operations whose time came.
    fn retry_due(&mut self, now_ms: u64) {
        if self.next_retry_ms > now_ms {
            return;
        }
        self.next_retry_ms = u64::MAX;
        let mut due = Vec::new();
        for (id, op) in &self.ops {
            if let OpState::Waiting { retry_at_ms } = op.state {
                if retry_at_ms <= now_ms {
                    due.push(*id);
                } else {
                    self.next_retry_ms = self.next_retry_ms.min(retry_at_ms);
                }
            }
        }
        for id in due {
            self.try_submit(now_ms, id);
        }
    }

    // ----- inputs -----

    /// Starts an operation of this node. `retry`: try again after "not the leader" answers
    /// until the deadline (false: fail with [`OpError::NotLeader`] unless this node leads).
    pub fn submit(&mut self, now_ms: u64, op: OpId, kind: OpKind, deadline_ms: u64, retry: bool) {
        if self.ops.len() >= OPS_MAX {
            self.done(op, Err(OpError::Overloaded("store operations")));
            return;
        }
        if let OpKind::Propose(commands) = &kind
            && (commands.is_empty() || commands.len() > COMMANDS_PER_ENTRY_MAX)
        {
            self.done(
                op,
                Err(OpError::Rejected(format!(
                    "1..={COMMANDS_PER_ENTRY_MAX} commands per proposal"
                ))),
            );
            return;
        }
        let read = matches!(kind, OpKind::Read);
        self.ops.insert(
            op,
            Op {
                kind,
                deadline_ms,
                state: if read {
                    OpState::Reading
                } else {
                    OpState::Waiting { retry_at_ms: now_ms }
                },
                retry,
            },
        );
        if read {
            self.unissued_reads.push(op);
        } else {
            self.try_submit(now_ms, op);
        }
    }

    /// The caller of `op` gave up: forget it (a proposal may still apply).
    pub fn abandon(&mut self, op: OpId) {
        self.ops.remove(&op);
    }

    /// A raft message from a peer. A refused one is reported ([`Output::Refused`]).
    pub fn step(&mut self, message: Message) {
        if let Err(e) = self.replica.step(message) {
            self.outputs
                .push(Output::Refused(format!("raft refused a message: {e}")));
        }
    }

    /// A follower's forwarded proposal arrives here.
    pub fn on_forwarded(&mut self, now_ms: u64, from: u64, request: u64, commands: Vec<Command>) {
        let reply = |result| Output::ForwardReply {
            to: from,
            request,
            result,
            index: None,
        };
        if !self.replica.is_leader() {
            self.outputs.push(reply(ForwardResult::NotLeader));
        } else if commands.is_empty() || commands.len() > COMMANDS_PER_ENTRY_MAX {
            self.outputs
                .push(reply(ForwardResult::Failed("bad number of commands".into())));
        } else if self.unproposed.len() + self.pending.len() >= PENDING_PROPOSALS_MAX || self.forwarded >= FORWARDED_MAX
        {
            self.outputs
                .push(reply(ForwardResult::Failed("overloaded: pending proposals".into())));
        } else {
            let size = codec::encoded_len(&commands);
            self.forwarded += 1;
            let caller = Caller::Forwarded {
                from,
                request,
                deadline_ms: now_ms + self.config.request_timeout_ms,
            };
            self.unproposed.push((commands, size, caller));
        }
    }

    /// The leader's answer to a forwarded operation (or the call's failure).
    pub fn on_forward_reply(&mut self, now_ms: u64, request: OpId, result: ForwardResult) {
        let Some(op) = self.ops.get_mut(&request) else { return };
        if !matches!(op.state, OpState::Forwarded) {
            return;
        }
        let expected = match &op.kind {
            OpKind::Propose(commands) => commands.len(),
            _ => 0,
        };
        match result {
            ForwardResult::Applied(outcomes) if outcomes.len() == expected => self.done(request, Ok(outcomes)),
            ForwardResult::Applied(_) => self.done(
                request,
                Err(OpError::Remote("leader answered the wrong number of outcomes".into())),
            ),
            ForwardResult::NotLeader => self.wait(request, now_ms + NOT_LEADER_RETRY_MS),
            ForwardResult::Failed(why) => self.done(request, Err(OpError::Remote(why))),
        }
    }

    /// Tells raft whether a snapshot reached `to`.
    pub fn report_snapshot(&mut self, to: u64, delivered: bool) {
        self.replica.report_snapshot(to, delivered);
    }

    /// Tells raft a peer could not be reached.
    pub fn report_unreachable(&mut self, to: u64) {
        self.replica.report_unreachable(to);
    }

    /// Asks leadership to move to `to`.
    pub fn transfer_leader(&mut self, to: u64) {
        self.replica.transfer_leader(to);
    }

    /// Starts an election now (a bootstrapping single node skips the first timeout).
    pub fn campaign(&mut self) {
        if let Err(e) = self.replica.campaign() {
            self.outputs.push(Output::Warning(format!("campaign: {e}")));
        }
    }

    /// Asks for a snapshot now (it comes as [`Output::BuildSnapshot`] unless nothing was
    /// applied since the last one). Returns false when there is nothing new to snapshot.
    pub fn request_snapshot(&mut self) -> bool {
        let state = self.state.read();
        if state.applied().index <= self.storage.snapshot_index() {
            return false;
        }
        self.snapshot_forced = true;
        true
    }

    /// The bytes of the snapshot asked for with [`Output::BuildSnapshot`]: compacts the log.
    pub fn on_snapshot_built(
        &mut self,
        index: u64,
        term: u64,
        conf_state: &ConfState,
        data: Vec<u8>,
    ) -> Result<(), StoreError> {
        self.building_snapshot = false;
        self.storage.compact(index, term, conf_state, data)
    }

    /// One raft tick: elections, heartbeats, the leader's jobs, and every 20 ticks clean-up of
    /// reads nobody waits for.
    pub fn tick(&mut self, clock: Clock) {
        self.ticks += 1;
        self.replica.tick();
        if self.replica.leader_ready() {
            self.leader_jobs(clock);
        }
        if self.ticks.is_multiple_of(20) {
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
            // Conf changes whose callers gave up.
            self.conf_pending.retain(|_, op| ops.contains_key(op));
        }
        self.sweep(clock.now_ms);
    }

    /// Fails operations past their deadline, tries again the ones whose time came, and answers
    /// forwarded callers that waited past theirs.
    pub fn sweep(&mut self, now_ms: u64) {
        let leader = self.replica.leader();
        let expired: Vec<(OpId, bool)> = self
            .ops
            .iter()
            .filter(|(_, op)| op.deadline_ms <= now_ms)
            .map(|(id, op)| (*id, matches!(op.state, OpState::Waiting { .. })))
            .collect();
        for (id, waiting) in expired {
            let error = if waiting && leader == 0 {
                OpError::NoLeader
            } else {
                OpError::Timeout
            };
            self.done(id, Err(error));
        }
        self.retry_due(now_ms);
        let mut timed_out = Vec::new();
        for batch in self.pending.values_mut() {
            for (_, caller) in &mut batch.callers {
                match caller {
                    Some(Caller::Forwarded {
                        from,
                        request,
                        deadline_ms,
                    }) if *deadline_ms <= now_ms => {
                        timed_out.push((*from, *request));
                        *caller = None;
                    }
                    Some(Caller::Local(op)) if !self.ops.contains_key(op) => *caller = None,
                    _ => {}
                }
            }
        }
        self.pending.retain(|_, b| b.callers.iter().any(|(_, c)| c.is_some()));
        self.forwarded = self.forwarded.saturating_sub(timed_out.len());
        for (from, request) in timed_out {
            self.outputs.push(Output::ForwardReply {
                to: from,
                request,
                result: ForwardResult::Failed(format!("timed out after {} ms", self.config.request_timeout_ms)),
                index: None,
            });
        }
    }

    // ----- the turn -----

    /// Proposes what was queued, issues reads, and carries out every Ready raft has (sending,
    /// writing, applying). Returns the flush the shell must do, if any Ready was processed;
    /// until [`Self::on_persisted`] no further Ready is taken.
    pub fn advance(&mut self, clock: Clock) -> Result<Option<Persist>, StoreError> {
        self.retry_due(clock.now_ms);
        self.issue_proposals();
        self.issue_reads();
        let persist = self.process_readies(clock)?;
        self.answer_reads();
        self.maybe_snapshot();
        Ok(persist)
    }

    /// Everything up to Ready `persist.number` is durable: sends the messages that waited for
    /// it and lets raft go on.
    pub fn on_persisted(&mut self, persist: Persist) {
        let messages = std::mem::take(&mut self.persisted_messages);
        if !messages.is_empty() {
            self.outputs.push(Output::Send(messages));
        }
        self.replica.on_persisted(persist.number);
        for index in std::mem::take(&mut self.installed_snapshots) {
            // Only now is the snapshot persisted in raft's eyes, so it may count as applied.
            self.replica.on_applied(index);
        }
    }

    fn done(&mut self, op: OpId, result: OpResult) {
        self.done_at(op, result, None);
    }

    fn done_at(&mut self, op: OpId, result: OpResult, index: Option<u64>) {
        self.ops.remove(&op);
        self.outputs.push(Output::Done { op, result, index });
    }

    fn try_submit(&mut self, now_ms: u64, id: OpId) {
        let leader = self.replica.leader();
        let me = self.raft_id();
        let leading = self.replica.is_leader() && leader == me;
        let Some(op) = self.ops.get(&id) else { return };
        let retry = op.retry;
        match op.kind.clone() {
            OpKind::Read => {}
            OpKind::ConfChange(mut cc) => {
                if !leading {
                    self.done(id, Err(if retry { OpError::NoLeader } else { OpError::NotLeader }));
                    return;
                }
                let conf_id = self.next_conf_id;
                self.next_conf_id = self.next_conf_id.wrapping_add(1);
                let mut context = me.to_be_bytes().to_vec();
                context.extend_from_slice(&conf_id.to_be_bytes());
                cc.context = context.clone().into();
                match self.replica.propose_conf_change(context, cc) {
                    Ok(()) => {
                        if let Some(op) = self.ops.get_mut(&id) {
                            op.state = OpState::Local;
                        }
                        self.conf_pending.insert(conf_id, id);
                    }
                    Err(ProposeError::NotLeader { .. }) => self.done(id, Err(OpError::NotLeader)),
                    Err(ProposeError::ConfChangePending) => {
                        self.done(id, Err(OpError::Overloaded("membership change")))
                    }
                    Err(ProposeError::Refused(e)) => self.done(id, Err(OpError::Rejected(e))),
                }
            }
            OpKind::Propose(commands) => {
                if leading {
                    if self.unproposed.len() + self.pending.len() >= PENDING_PROPOSALS_MAX {
                        self.done(id, Err(OpError::Overloaded("pending proposals")));
                        return;
                    }
                    let size = codec::encoded_len(&commands);
                    if let Some(op) = self.ops.get_mut(&id) {
                        op.state = OpState::Local;
                    }
                    self.unproposed.push((commands, size, Caller::Local(id)));
                } else if !retry {
                    self.done(id, Err(OpError::NotLeader));
                } else if leader != 0 && leader != me {
                    let deadline_ms = op.deadline_ms;
                    if let Some(op) = self.ops.get_mut(&id) {
                        op.state = OpState::Forwarded;
                    }
                    self.outputs.push(Output::Forward {
                        to: leader,
                        request: id,
                        commands,
                        deadline_ms,
                    });
                } else {
                    let pause = if leader == 0 {
                        NO_LEADER_RETRY_MS
                    } else {
                        NOT_LEADER_RETRY_MS
                    };
                    self.wait(id, now_ms + pause);
                }
            }
        }
    }

    fn wake_waiting(&mut self) {
        for op in self.ops.values_mut() {
            if let OpState::Waiting { retry_at_ms } = &mut op.state {
                *retry_at_ms = 0;
                self.next_retry_ms = 0;
            }
        }
    }

    /// Leader-only background work: the initial settings, then viewer expiry decided on this
    /// node's wall clock after one election timeout of grace.
    fn leader_jobs(&mut self, clock: Clock) {
        if !self.settings_in_flight && self.state.read().settings().is_none() {
            self.settings_in_flight = true;
            let command = Command::SetSettings {
                settings: ClusterSettings {
                    viewer_ttl_ms: self.config.viewer_ttl_ms,
                },
                only_if_unset: true,
            };
            self.unproposed.push((vec![command], 64, Caller::Job(Job::Settings)));
        }
        if self.expiry_in_flight {
            return;
        }
        let interval_ms = 1000 / u64::from(self.config.expiry_batches_per_second.max(1));
        if clock.wall_ms.saturating_sub(self.last_expiry_wall_ms) < interval_ms {
            return;
        }
        let grace_ms = self.config.replica.election_ticks as u64 * self.config.tick_ms;
        let not_before = self.leader_since_wall_ms + grace_ms;
        let due = self
            .state
            .read()
            .due_viewers(clock.wall_ms, not_before, VIEWERS_PER_EXPIRY_MAX);
        if due.is_empty() {
            return;
        }
        self.last_expiry_wall_ms = clock.wall_ms;
        self.expiry_in_flight = true;
        let size = due.len() * 300;
        self.unproposed.push((
            vec![Command::ExpireViewers { viewers: due }],
            size,
            Caller::Job(Job::Expire),
        ));
    }

    fn job_done(&mut self, job: Job) {
        match job {
            Job::Settings => self.settings_in_flight = false,
            Job::Expire => self.expiry_in_flight = false,
        }
    }

    /// Answers one caller of a batch (or of a batch that could not be proposed).
    fn answer(&mut self, caller: Caller, result: OpResult) {
        self.answer_at(caller, result, None);
    }

    fn answer_at(&mut self, caller: Caller, result: OpResult, index: Option<u64>) {
        match caller {
            Caller::Local(op) => {
                if !self.ops.contains_key(&op) {
                    return;
                }
                match result {
                    Err(OpError::NotLeader) if self.ops.get(&op).is_some_and(|o| o.retry) => self.wait(op, 0),
                    other => self.done_at(op, other, index),
                }
            }
            Caller::Forwarded { from, request, .. } => {
                self.forwarded = self.forwarded.saturating_sub(1);
                let result = match result {
                    Ok(outcomes) => ForwardResult::Applied(outcomes),
                    Err(OpError::NotLeader) => ForwardResult::NotLeader,
                    Err(e) => ForwardResult::Failed(e.to_string()),
                };
                self.outputs.push(Output::ForwardReply {
                    to: from,
                    request,
                    result,
                    index,
                });
            }
            Caller::Job(job) => self.job_done(job),
        }
    }

    /// Coalesces what was queued since the last turn into entries.
    fn issue_proposals(&mut self) {
        if self.unproposed.is_empty() {
            return;
        }
        let queued = std::mem::take(&mut self.unproposed);
        let entries = pack_proposals(queued.iter().map(|(c, s, _)| (c.len(), *s)));
        let mut queue = queued.into_iter();
        for taken in entries {
            let mut commands = Vec::new();
            let mut callers = Vec::with_capacity(taken);
            for (c, _, caller) in queue.by_ref().take(taken) {
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
            let payload_commands = if self.config.faults.ack_upserts_on_propose {
                payload.commands
            } else {
                Vec::new()
            };
            let refused = if data.len() > ENTRY_BYTES_MAX {
                Some(OpError::Rejected(format!(
                    "proposal of {} bytes is too large",
                    data.len()
                )))
            } else {
                match self.replica.propose(data) {
                    Ok(()) => None,
                    Err(ProposeError::NotLeader { .. }) => Some(OpError::NotLeader),
                    Err(other) => Some(OpError::Rejected(format!("{other:?}"))),
                }
            };
            let callers = if refused.is_none() && self.config.faults.ack_upserts_on_propose {
                self.ack_upserts_early(&payload_commands, callers)
            } else {
                callers
            };
            match refused {
                None => {
                    if self.config.observe {
                        self.outputs.push(Output::Proposed {
                            batch_id,
                            callers: callers.iter().filter_map(|(n, c)| c.clone().map(|c| (c, *n))).collect(),
                        });
                    }
                    self.pending.insert(batch_id, PendingBatch { callers });
                }
                Some(error) => {
                    for (_, caller) in callers {
                        if let Some(caller) = caller {
                            self.answer(caller, Err(error.clone()));
                        }
                    }
                }
            }
        }
    }

    /// The planted bug [`CoreFaults::ack_upserts_on_propose`]: callers whose commands are all
    /// upserts are answered now, as if their entry had applied with nothing refused.
    fn ack_upserts_early(
        &mut self,
        commands: &[Command],
        callers: Vec<(usize, Option<Caller>)>,
    ) -> Vec<(usize, Option<Caller>)> {
        let index = self.replica.last_index();
        let ttl_ms = self.state.read().viewer_ttl_ms();
        let mut at = 0;
        let mut kept_callers = Vec::with_capacity(callers.len());
        for (count, caller) in callers {
            let mine = &commands[at..at + count];
            at += count;
            let upserts = mine.iter().all(|c| matches!(c, Command::UpsertViewers { .. }));
            match caller {
                Some(caller) if upserts => {
                    let outcomes = mine
                        .iter()
                        .map(|_| Outcome::Upserted {
                            index,
                            ttl_ms,
                            kept: Vec::new(),
                        })
                        .collect();
                    self.answer_at(caller, Ok(outcomes), Some(index));
                    kept_callers.push((count, None));
                }
                other => kept_callers.push((count, other)),
            }
        }
        kept_callers
    }

    fn issue_reads(&mut self) {
        if self.unissued_reads.is_empty() {
            return;
        }
        let ids = std::mem::take(&mut self.unissued_reads);
        self.next_read_ctx += 1;
        let mut ctx = self.config.read_context_prefix.to_be_bytes().to_vec();
        ctx.extend_from_slice(&self.next_read_ctx.to_be_bytes());
        match self.replica.read_index(ctx.clone()) {
            Ok(()) => {
                self.reads_by_ctx.insert(ctx, ids);
            }
            Err(_) => {
                // The driver refuses reads only beyond `PENDING_READ_BATCHES_MAX`.
                for id in ids {
                    self.done(id, Err(OpError::Overloaded("pending reads")));
                }
            }
        }
    }

    fn answer_reads(&mut self) {
        let applied = self.state.read().applied().index;
        let mut waiting = VecDeque::with_capacity(self.reads_waiting_apply.len());
        for (index, id) in std::mem::take(&mut self.reads_waiting_apply) {
            if index <= applied {
                if self.ops.contains_key(&id) {
                    self.done(id, Ok(Vec::new()));
                }
            } else {
                waiting.push_back((index, id));
            }
        }
        self.reads_waiting_apply = waiting;
    }

    fn process_readies(&mut self, clock: Clock) -> Result<Option<Persist>, StoreError> {
        let mut persist: Option<Persist> = None;
        while let Some(batch) = self.replica.poll_ready() {
            if let Some(leader) = batch.leader_changed {
                self.outputs.push(Output::LeaderChanged { leader });
                if leader == self.raft_id() {
                    self.leader_since_wall_ms = clock.wall_ms;
                } else {
                    // Queued proposals can no longer be proposed here; callers retry elsewhere.
                    for (_, _, caller) in std::mem::take(&mut self.unproposed) {
                        self.answer(caller, Err(OpError::NotLeader));
                    }
                }
                self.wake_waiting();
            }
            if !batch.messages.is_empty() {
                self.outputs.push(Output::Send(batch.messages));
            }
            let wrote = batch.snapshot.is_some() || !batch.entries.is_empty() || batch.hard_state.is_some();
            if let Some(snapshot) = &batch.snapshot {
                let state = StateMachine::decode_snapshot(snapshot.get_data()).map_err(|e| StoreError::Corrupt {
                    tree: "raft snapshot from leader".into(),
                    key: String::new(),
                    reason: e.to_string(),
                })?;
                self.storage.install_snapshot(snapshot)?;
                for node in state.nodes().values() {
                    self.outputs.push(Output::PeerAddress {
                        raft_id: node.raft_id,
                        cluster_addr: node.registration.cluster_addr.clone(),
                    });
                }
                let index = state.applied().index;
                *self.state.write() = state;
                self.applied_bytes = 0;
                self.installed_snapshots.push(snapshot.get_metadata().index);
                self.outputs.push(Output::SnapshotInstalled { index });
            }
            self.storage.append(&batch.entries)?;
            if let Some(hs) = &batch.hard_state {
                self.storage.set_hard_state(hs)?;
            }
            self.replica.on_written();
            self.apply(batch.committed_entries);
            for state in batch.read_states {
                if let Some(ids) = self.reads_by_ctx.remove(&state.request_ctx) {
                    self.reads_waiting_apply
                        .extend(ids.into_iter().map(|id| (state.index, id)));
                }
            }
            self.persisted_messages.extend(batch.persisted_messages);
            let sync = wrote || batch.must_sync;
            persist = Some(Persist {
                number: batch.number,
                sync: sync || persist.is_some_and(|p| p.sync),
            });
        }
        Ok(persist)
    }

    fn apply(&mut self, entries: Vec<Entry>) {
        let Some(last_index) = entries.last().map(|e| e.index) else {
            return;
        };
        let mut answers: Vec<(u64, Vec<Outcome>, PendingBatch)> = Vec::new();
        let mut conf_done: Vec<OpId> = Vec::new();
        {
            let mut state = self.state.write();
            for entry in entries {
                if entry.index <= state.applied().index {
                    continue; // already in the state (from a snapshot)
                }
                self.applied_bytes += entry.data.len() as u64;
                if self.config.observe {
                    self.outputs.push(Output::Applied {
                        index: entry.index,
                        term: entry.term,
                        entry_type: entry.get_entry_type(),
                        data: entry.data.to_vec(),
                    });
                }
                match entry.get_entry_type() {
                    EntryType::EntryNormal if entry.data.is_empty() => state.apply_empty(entry.index, entry.term),
                    EntryType::EntryNormal => match codec::decode::<EntryPayload, ENTRY_BYTES_MAX>(&entry.data) {
                        Ok(payload) => {
                            let registrations: Vec<(u64, String)> = payload
                                .commands
                                .iter()
                                .filter_map(|c| match c {
                                    Command::RegisterNode(r) => {
                                        Some((crate::ids::raft_id_for(&r.id), r.cluster_addr.clone()))
                                    }
                                    _ => None,
                                })
                                .collect();
                            let outcomes = state.apply(entry.index, entry.term, payload.commands);
                            for (raft_id, cluster_addr) in registrations {
                                if state.node_by_raft_id(raft_id).is_some() {
                                    self.outputs.push(Output::PeerAddress { raft_id, cluster_addr });
                                }
                            }
                            if payload.proposer == self.config.replica.raft_id
                                && let Some(batch) = self.pending.remove(&payload.batch_id)
                            {
                                answers.push((entry.index, outcomes, batch));
                            }
                        }
                        Err(e) => {
                            // Every replica fails the same way on the same bytes, so skipping keeps
                            // them identical; it means a newer writer or a bug.
                            self.outputs.push(Output::Warning(format!(
                                "undecodable entry {} skipped: {e}",
                                entry.index
                            )));
                            state.apply_empty(entry.index, entry.term);
                        }
                    },
                    EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => {
                        let cc = if entry.get_entry_type() == EntryType::EntryConfChange {
                            ConfChange::parse_from_bytes(&entry.data).map(conf_change_v1_to_v2)
                        } else {
                            ConfChangeV2::parse_from_bytes(&entry.data)
                        };
                        match cc {
                            Ok(cc) => {
                                // The configuration lives in raft (and in the next snapshot, see
                                // `conf_state`), not in the log storage.
                                if let Err(e) = self.replica.apply_conf_change(&cc) {
                                    self.outputs
                                        .push(Output::Warning(format!("conf change {} refused: {e}", entry.index)));
                                }
                                if cc.context.len() == 16
                                    && cc.context[..8] == self.config.replica.raft_id.to_be_bytes()
                                {
                                    let mut id = [0u8; 8];
                                    id.copy_from_slice(&cc.context[8..]);
                                    if let Some(op) = self.conf_pending.remove(&u64::from_be_bytes(id)) {
                                        conf_done.push(op);
                                    }
                                }
                            }
                            Err(e) => self.outputs.push(Output::Warning(format!(
                                "undecodable conf change {} skipped: {e}",
                                entry.index
                            ))),
                        }
                        state.apply_empty(entry.index, entry.term);
                    }
                }
            }
        }
        self.replica.on_applied(last_index);
        for (index, outcomes, batch) in answers {
            let mut outcomes = outcomes.into_iter();
            for (count, caller) in batch.callers {
                let mine: Vec<Outcome> = outcomes.by_ref().take(count).collect();
                if let Some(caller) = caller {
                    self.answer_at(caller, Ok(mine), Some(index));
                }
            }
        }
        for op in conf_done {
            if self.ops.contains_key(&op) {
                self.done(op, Ok(Vec::new()));
            }
        }
    }

    fn maybe_snapshot(&mut self) {
        if self.building_snapshot {
            return;
        }
        let state = self.state.read();
        let applied = state.applied();
        let since = applied.index.saturating_sub(self.storage.snapshot_index());
        if since == 0 {
            self.snapshot_forced = false;
            return;
        }
        let due = self.snapshot_forced
            || self.storage.snapshot_wanted()
            || since >= self.config.snapshot_every_entries
            || self.applied_bytes >= self.config.snapshot_every_bytes;
        if !due {
            return;
        }
        let frozen = state.clone();
        drop(state);
        self.building_snapshot = true;
        self.snapshot_forced = false;
        self.applied_bytes = 0;
        self.outputs.push(Output::BuildSnapshot {
            index: applied.index,
            term: applied.term,
            conf_state: self.conf_state(),
            state: Box::new(frozen),
        });
    }

    /// The configuration at the applied index (raft's own, which every applied change updates).
    fn conf_state(&self) -> ConfState {
        let status = self.replica.status();
        ConfState::from((status.voters, status.learners))
    }
}
