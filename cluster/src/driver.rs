//! The sans-IO replica driver around [`raft::RawNode`]: no sockets, no disk writes, no clock,
//! no threads. Inputs are method calls (ticks, messages, proposals, read requests, persistence
//! and apply completions); outputs are [`ReadyBatch`]es the shell must carry out in order:
//!
//! 1. send `messages` (leader messages may go out before persisting);
//! 2. write `snapshot`, `entries` and `hard_state` to storage, then call [`Replica::on_written`]
//!    (raft reads them back from storage from then on);
//! 3. apply `committed_entries` in order (conf changes through [`Replica::apply_conf_change`]),
//!    then [`Replica::on_applied`];
//! 4. flush, send `persisted_messages`, call [`Replica::on_persisted`].
//!
//! Learner promotion and re-issuing unanswered read requests happen on ticks.

use raft::eraftpb::{
    ConfChange, ConfChangeSingle, ConfChangeTransition, ConfChangeType, ConfChangeV2, ConfState, Entry, HardState,
    Message, MessageType, Snapshot,
};
use raft::{RawNode, ReadState, SnapshotStatus, StateRole, Storage};

/// Reads waiting for a ReadIndex answer, at most.
pub const PENDING_READ_BATCHES_MAX: usize = 1024;

/// Settings of the raft group.
#[derive(Clone, Debug)]
pub struct ReplicaConfig {
    /// This replica's raft id.
    pub raft_id: u64,
    /// Ticks without a leader before an election (randomized up to twice this).
    pub election_ticks: usize,
    /// Ticks between leader heartbeats.
    pub heartbeat_ticks: usize,
    /// Index the state machine has applied (from disk).
    pub applied_index: u64,
    /// Largest append message, in bytes.
    pub max_size_per_msg: u64,
    /// Most in-flight appends per follower.
    pub max_inflight_msgs: usize,
    /// Learners within this many entries of the commit index get promoted to voters.
    pub promote_lag_entries: u64,
}

/// Largest append message the node sends, in bytes.
pub const APPEND_BYTES_MAX: u64 = 1024 * 1024;
/// In-flight appends per follower, at most.
pub const INFLIGHT_APPENDS_MAX: usize = 256;
/// Learners within this many entries of the commit index are promoted.
pub const PROMOTE_LAG_ENTRIES: u64 = 16;

impl ReplicaConfig {
    /// The settings the node runs with (and so the simulator): the message, in-flight and
    /// promotion limits above; `applied_index` 0 (the replica core sets it from its state).
    pub fn new(raft_id: u64, election_ticks: usize, heartbeat_ticks: usize) -> Self {
        ReplicaConfig {
            raft_id,
            election_ticks,
            heartbeat_ticks,
            applied_index: 0,
            max_size_per_msg: APPEND_BYTES_MAX,
            max_inflight_msgs: INFLIGHT_APPENDS_MAX,
            promote_lag_entries: PROMOTE_LAG_ENTRIES,
        }
    }
}

/// Why a proposal was not accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProposeError {
    /// This replica is not the leader; `leader` is the one it knows (0: none).
    NotLeader {
        /// Raft id of the known leader, 0 when unknown.
        leader: u64,
    },
    /// A membership change is still pending; retry after it applies.
    ConfChangePending,
    /// raft refused the proposal.
    Refused(String),
}

/// Role and indexes, for status and waiting.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplicaStatus {
    /// Raft id.
    pub raft_id: u64,
    /// Known leader, 0 when none.
    pub leader: u64,
    /// Term.
    pub term: u64,
    /// Commit index.
    pub commit_index: u64,
    /// Applied index (what the shell reported).
    pub applied_index: u64,
    /// Role name.
    pub role: &'static str,
    /// Voters.
    pub voters: Vec<u64>,
    /// Learners.
    pub learners: Vec<u64>,
}

/// The work of one raft Ready.
#[derive(Debug, Default)]
pub struct ReadyBatch {
    /// Ready number, for [`Replica::on_persisted`].
    pub number: u64,
    /// Send before persisting (leader appends).
    pub messages: Vec<Message>,
    /// Snapshot to install (storage and state machine), if any.
    pub snapshot: Option<Snapshot>,
    /// Entries to append.
    pub entries: Vec<Entry>,
    /// Hard state to save.
    pub hard_state: Option<HardState>,
    /// Whether the writes must be flushed before `persisted_messages` go out.
    pub must_sync: bool,
    /// Send after persisting.
    pub persisted_messages: Vec<Message>,
    /// Apply, in order.
    pub committed_entries: Vec<Entry>,
    /// Answers to read requests: `(index, context)`.
    pub read_states: Vec<ReadState>,
    /// Set when leadership changed: the new leader (0: none) and whether it is us.
    pub leader_changed: Option<u64>,
}

/// The replica driver.
pub struct Replica<S: Storage> {
    node: RawNode<S>,
    config: ReplicaConfig,
    /// Ready taken but not yet written.
    unwritten: Option<raft::Ready>,
    applied_index: u64,
    last_leader: u64,
    ticks: u64,
    /// Read contexts waiting for an answer, with the tick they were (re)issued at.
    pending_reads: Vec<(Vec<u8>, u64)>,
}

fn role_name(role: StateRole) -> &'static str {
    match role {
        StateRole::Leader => "leader",
        StateRole::Follower => "follower",
        StateRole::Candidate => "candidate",
        StateRole::PreCandidate => "precandidate",
    }
}

/// Builds a one-step ConfChangeV2.
pub fn conf_change(change: ConfChangeType, raft_id: u64) -> ConfChangeV2 {
    let mut single = ConfChangeSingle::default();
    single.set_change_type(change);
    single.node_id = raft_id;
    let mut cc = ConfChangeV2::default();
    cc.set_transition(ConfChangeTransition::Auto);
    cc.set_changes(vec![single].into());
    cc
}

/// A committed v1 conf change (raft's own entries of the first term) as the v2 one raft applies.
pub fn conf_change_v1_to_v2(v1: ConfChange) -> ConfChangeV2 {
    let mut cc = conf_change(v1.get_change_type(), v1.node_id);
    cc.context = v1.context;
    cc
}

impl<S: Storage> Replica<S> {
    /// Creates the driver over `storage` (which must hold the persisted raft state).
    pub fn new(config: ReplicaConfig, storage: S, logger: &slog::Logger) -> Result<Self, raft::Error> {
        Self::new_with_election_ticks_max(config, None, storage, logger)
    }

    /// [`Replica::new`] with the upper bound of the randomized election timeout set: raft-rs
    /// draws each timeout from `[election_ticks, election_ticks_max)` with `rand::thread_rng()`,
    /// which nothing can seed. `Some(election_ticks + 1)` leaves one value, so the replica is
    /// deterministic and the caller breaks split votes itself (the simulator jitters each
    /// node's tick times from its seeded RNG). `None`: raft's default, `2 * election_ticks`.
    pub fn new_with_election_ticks_max(
        config: ReplicaConfig,
        election_ticks_max: Option<usize>,
        storage: S,
        logger: &slog::Logger,
    ) -> Result<Self, raft::Error> {
        let raft_config = raft::Config {
            id: config.raft_id,
            election_tick: config.election_ticks,
            heartbeat_tick: config.heartbeat_ticks,
            applied: config.applied_index,
            max_size_per_msg: config.max_size_per_msg,
            max_inflight_msgs: config.max_inflight_msgs,
            check_quorum: true,
            pre_vote: true,
            read_only_option: raft::ReadOnlyOption::Safe,
            min_election_tick: config.election_ticks,
            // 0 is raft's "2 * election_tick"; validate() refuses a max not above the min.
            max_election_tick: election_ticks_max.unwrap_or(0),
            ..Default::default()
        };
        raft_config.validate()?;
        let node = RawNode::new(&raft_config, storage, logger)?;
        Ok(Replica {
            node,
            applied_index: config.applied_index,
            config,
            unwritten: None,
            last_leader: 0,
            ticks: 0,
            pending_reads: Vec::new(),
        })
    }

    /// Access to the storage raft reads from.
    pub fn storage(&self) -> &S {
        self.node.store()
    }

    /// Advances logical time by one tick.
    pub fn tick(&mut self) {
        self.ticks += 1;
        self.node.tick();
        // Re-issue reads nobody answered within an election timeout (the request or its answer
        // was lost, or a new leader has not committed in its term yet and dropped it).
        let stale_after = self.config.election_ticks as u64;
        let now = self.ticks;
        let mut reissue = Vec::new();
        for (ctx, issued) in &mut self.pending_reads {
            if now.saturating_sub(*issued) >= stale_after {
                *issued = now;
                reissue.push(ctx.clone());
            }
        }
        for ctx in reissue {
            self.node.read_index(ctx);
        }
        self.maybe_promote_learners();
    }

    fn maybe_promote_learners(&mut self) {
        if !self.is_leader() || self.node.raft.has_pending_conf() {
            return;
        }
        let committed = self.node.raft.raft_log.committed;
        let learners: Vec<u64> = self.node.raft.prs().conf().learners().iter().copied().collect();
        for learner in learners {
            let caught_up = self
                .node
                .raft
                .prs()
                .get(learner)
                .is_some_and(|p| p.matched + self.config.promote_lag_entries >= committed);
            if caught_up {
                let cc = conf_change(ConfChangeType::AddNode, learner);
                // A refusal here only delays promotion to a later tick.
                let _ = self.node.propose_conf_change(Vec::new(), cc);
                return;
            }
        }
    }

    /// Feeds a message from a peer. Messages not addressed to us, or local-only message types,
    /// are refused (they can only come from a confused or hostile peer).
    pub fn step(&mut self, message: Message) -> Result<(), String> {
        if message.to != self.config.raft_id {
            return Err(format!(
                "message for {} delivered to {}",
                message.to, self.config.raft_id
            ));
        }
        if raft::raw_node::is_local_msg(message.get_msg_type()) {
            return Err(format!(
                "local message type {:?} from the network",
                message.get_msg_type()
            ));
        }
        // raft-rs treats a heartbeat committing beyond our log as fatal (a lost log). A node whose
        // data directory was wiped sees exactly that until the leader has re-added it, so refuse
        // the message instead of crashing: input errors are not bugs.
        if message.get_msg_type() == MessageType::MsgHeartbeat && message.commit > self.node.raft.raft_log.last_index()
        {
            return Err(format!(
                "heartbeat commits {} beyond our last index {} (wiped or lost log)",
                message.commit,
                self.node.raft.raft_log.last_index()
            ));
        }
        self.node.step(message).map_err(|e| e.to_string())
    }

    /// True when this replica is the leader.
    pub fn is_leader(&self) -> bool {
        self.node.raft.state == StateRole::Leader
    }

    /// Index of the last entry in the log (persisted or not).
    pub fn last_index(&self) -> u64 {
        self.node.raft.raft_log.last_index()
    }

    /// Known leader (0: none).
    pub fn leader(&self) -> u64 {
        self.node.raft.leader_id
    }

    /// True when the leader has committed an entry of its own term (reads and expiry are safe).
    pub fn leader_ready(&self) -> bool {
        self.is_leader()
            && self
                .node
                .raft
                .raft_log
                .term(self.node.raft.raft_log.committed)
                .unwrap_or(0)
                == self.node.raft.term
    }

    /// Proposes a normal entry. Only the leader proposes; followers forward to it.
    pub fn propose(&mut self, data: Vec<u8>) -> Result<(), ProposeError> {
        if !self.is_leader() {
            return Err(ProposeError::NotLeader { leader: self.leader() });
        }
        self.node
            .propose(Vec::new(), data)
            .map_err(|e| ProposeError::Refused(e.to_string()))
    }

    /// Proposes a membership change; `context` is returned with the applied entry.
    pub fn propose_conf_change(&mut self, context: Vec<u8>, cc: ConfChangeV2) -> Result<(), ProposeError> {
        if !self.is_leader() {
            return Err(ProposeError::NotLeader { leader: self.leader() });
        }
        if self.node.raft.has_pending_conf() {
            return Err(ProposeError::ConfChangePending);
        }
        self.node
            .propose_conf_change(context, cc)
            .map_err(|e| ProposeError::Refused(e.to_string()))
    }

    /// Asks for a linearizable read point; the answer comes back in a later
    /// [`ReadyBatch::read_states`] with the same context.
    pub fn read_index(&mut self, context: Vec<u8>) -> Result<(), ProposeError> {
        if self.pending_reads.len() >= PENDING_READ_BATCHES_MAX {
            return Err(ProposeError::Refused("too many pending reads".into()));
        }
        self.pending_reads.push((context.clone(), self.ticks));
        self.node.read_index(context);
        Ok(())
    }

    /// Gives up on a read request (the caller timed out).
    pub fn cancel_read(&mut self, context: &[u8]) {
        self.pending_reads.retain(|(c, _)| c != context);
    }

    /// Tells raft whether a snapshot reached `to`.
    pub fn report_snapshot(&mut self, to: u64, delivered: bool) {
        let status = if delivered {
            SnapshotStatus::Finish
        } else {
            SnapshotStatus::Failure
        };
        self.node.report_snapshot(to, status);
    }

    /// Tells raft a peer could not be reached.
    pub fn report_unreachable(&mut self, to: u64) {
        self.node.report_unreachable(to);
    }

    /// Asks leadership to move to `to`.
    pub fn transfer_leader(&mut self, to: u64) {
        self.node.transfer_leader(to);
    }

    /// Starts an election now (a bootstrapping single node uses it to skip the first timeout).
    pub fn campaign(&mut self) -> Result<(), String> {
        self.node.campaign().map_err(|e| e.to_string())
    }

    /// Takes the next Ready, if there is work. Until [`Self::on_written`] is called no other
    /// Ready is produced.
    pub fn poll_ready(&mut self) -> Option<ReadyBatch> {
        if self.unwritten.is_some() || !self.node.has_ready() {
            return None;
        }
        let mut ready = self.node.ready();
        let leader = self.node.raft.leader_id;
        let leader_changed = if leader != self.last_leader {
            self.last_leader = leader;
            Some(leader)
        } else {
            None
        };
        let read_states = ready.take_read_states();
        for state in &read_states {
            self.pending_reads.retain(|(c, _)| c != &state.request_ctx);
        }
        let batch = ReadyBatch {
            number: ready.number(),
            messages: ready.take_messages(),
            snapshot: (!ready.snapshot().is_empty()).then(|| ready.snapshot().clone()),
            entries: ready.take_entries(),
            hard_state: ready.hs().cloned(),
            must_sync: ready.must_sync(),
            persisted_messages: ready.take_persisted_messages(),
            committed_entries: ready.take_committed_entries(),
            read_states,
            leader_changed,
        };
        self.unwritten = Some(ready);
        Some(batch)
    }

    /// The Ready's snapshot, entries and hard state are in storage (not necessarily flushed).
    pub fn on_written(&mut self) {
        if let Some(ready) = self.unwritten.take() {
            self.node.advance_append_async(ready);
        }
    }

    /// Everything up to Ready `number` is durable.
    pub fn on_persisted(&mut self, number: u64) {
        self.node.on_persist_ready(number);
    }

    /// Applies a committed membership change to raft; returns the new conf state to persist.
    pub fn apply_conf_change(&mut self, cc: &ConfChangeV2) -> Result<ConfState, String> {
        self.node.apply_conf_change(cc).map_err(|e| e.to_string())
    }

    /// The state machine has applied everything up to `index`.
    pub fn on_applied(&mut self, index: u64) {
        if index > self.applied_index {
            self.applied_index = index;
            self.node.advance_apply_to(index);
        }
    }

    /// Role, leader and indexes.
    pub fn status(&self) -> ReplicaStatus {
        let cs = self.node.raft.prs().conf().to_conf_state();
        ReplicaStatus {
            raft_id: self.config.raft_id,
            leader: self.node.raft.leader_id,
            term: self.node.raft.term,
            commit_index: self.node.raft.raft_log.committed,
            applied_index: self.applied_index,
            role: role_name(self.node.raft.state),
            voters: cs.voters.clone(),
            learners: cs.learners.clone(),
        }
    }

    /// True when `message` carries a snapshot (the shell reports its delivery).
    pub fn is_snapshot(message: &Message) -> bool {
        message.get_msg_type() == MessageType::MsgSnapshot
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, VecDeque};

    use raft::storage::MemStorage;

    /// The tests' replica settings: elections after 10 ticks, heartbeats every 2.
    fn test_config(raft_id: u64, applied_index: u64) -> ReplicaConfig {
        ReplicaConfig {
            raft_id,
            election_ticks: 10,
            heartbeat_ticks: 2,
            applied_index,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 64,
            promote_lag_entries: 4,
        }
    }

    use super::*;

    /// A minimal in-memory shell: persists to MemStorage, routes messages, records applied data.
    struct Sim {
        replicas: BTreeMap<u64, Replica<MemStorage>>,
        applied: BTreeMap<u64, Vec<Vec<u8>>>,
        network: VecDeque<Message>,
        down: Vec<u64>,
        reads: Vec<(u64, Vec<u8>)>,
    }

    impl Sim {
        fn new(ids: &[u64]) -> Sim {
            let logger = slog::Logger::root(slog::Discard, slog::o!());
            let mut replicas = BTreeMap::new();
            for &id in ids {
                // As in production: start from a snapshot at index 1, so a later joiner catches
                // up by snapshot and learns the initial configuration.
                let storage = MemStorage::new();
                let mut snapshot = Snapshot::default();
                snapshot.mut_metadata().index = 1;
                snapshot.mut_metadata().term = 1;
                snapshot
                    .mut_metadata()
                    .set_conf_state(ConfState::from((ids.to_vec(), vec![])));
                storage.wl().apply_snapshot(snapshot).unwrap();
                let config = test_config(id, 1);
                replicas.insert(id, Replica::new(config, storage, &logger).unwrap());
            }
            Sim {
                replicas,
                applied: BTreeMap::new(),
                network: VecDeque::new(),
                down: vec![],
                reads: vec![],
            }
        }

        fn drain(&mut self) {
            for _ in 0..1000 {
                let mut progress = false;
                let ids: Vec<u64> = self.replicas.keys().copied().collect();
                for id in ids {
                    let replica = self.replicas.get_mut(&id).unwrap();
                    while let Some(batch) = replica.poll_ready() {
                        progress = true;
                        self.reads
                            .extend(batch.read_states.iter().map(|r| (id, r.request_ctx.clone())));
                        self.network.extend(batch.messages);
                        let store = replica.storage().clone();
                        if let Some(s) = batch.snapshot {
                            store.wl().apply_snapshot(s).unwrap();
                        }
                        store.wl().append(&batch.entries).unwrap();
                        if let Some(hs) = batch.hard_state {
                            store.wl().set_hardstate(hs);
                        }
                        replica.on_written();
                        let mut last = None;
                        for entry in batch.committed_entries {
                            last = Some(entry.index);
                            match entry.get_entry_type() {
                                raft::eraftpb::EntryType::EntryConfChangeV2 => {
                                    let cc: ConfChangeV2 = protobuf::Message::parse_from_bytes(&entry.data).unwrap();
                                    let cs = replica.apply_conf_change(&cc).unwrap();
                                    store.wl().set_conf_state(cs);
                                }
                                _ if !entry.data.is_empty() => {
                                    self.applied.entry(id).or_default().push(entry.data.to_vec())
                                }
                                _ => {}
                            }
                        }
                        self.network.extend(batch.persisted_messages);
                        replica.on_persisted(batch.number);
                        if let Some(last) = last {
                            replica.on_applied(last);
                        }
                    }
                }
                while let Some(m) = self.network.pop_front() {
                    progress = true;
                    if self.down.contains(&m.to) || self.down.contains(&m.from) {
                        continue;
                    }
                    if let Some(r) = self.replicas.get_mut(&m.to) {
                        let _ = r.step(m);
                    }
                }
                if !progress {
                    return;
                }
            }
        }

        fn tick_until_leader(&mut self) -> u64 {
            for _ in 0..200 {
                for (id, r) in self.replicas.iter_mut() {
                    if !self.down.contains(id) {
                        r.tick();
                    }
                }
                self.drain();
                let leaders: Vec<u64> = self
                    .replicas
                    .iter()
                    .filter(|(id, r)| !self.down.contains(id) && r.is_leader())
                    .map(|(id, _)| *id)
                    .collect();
                if leaders.len() == 1 && self.replicas[&leaders[0]].leader_ready() {
                    return leaders[0];
                }
            }
            panic!("no leader elected");
        }
    }

    #[test]
    fn elects_replicates_and_refuses_follower_proposals() {
        let mut sim = Sim::new(&[1, 2, 3]);
        let leader = sim.tick_until_leader();
        let follower = [1, 2, 3].into_iter().find(|id| *id != leader).unwrap();
        assert_eq!(
            sim.replicas.get_mut(&follower).unwrap().propose(b"x".to_vec()),
            Err(ProposeError::NotLeader { leader })
        );
        sim.replicas
            .get_mut(&leader)
            .unwrap()
            .propose(b"hello".to_vec())
            .unwrap();
        sim.drain();
        for id in [1, 2, 3] {
            assert_eq!(sim.applied[&id], vec![b"hello".to_vec()], "replica {id}");
        }
        // A linearizable read point comes back on the leader once confirmed.
        sim.replicas
            .get_mut(&leader)
            .unwrap()
            .read_index(b"r1".to_vec())
            .unwrap();
        sim.drain();
        let answered = sim.reads.contains(&(leader, b"r1".to_vec()));
        assert!(answered, "read index was not answered");
    }

    #[test]
    fn leader_loss_elects_another_and_bad_messages_are_refused() {
        let mut sim = Sim::new(&[1, 2, 3]);
        let first = sim.tick_until_leader();
        sim.down.push(first);
        let second = sim.tick_until_leader();
        assert_ne!(first, second);
        // Misaddressed, local-only and impossible-heartbeat messages are errors, not panics.
        let replica = sim.replicas.get_mut(&second).unwrap();
        let mut m = Message {
            to: 99,
            ..Default::default()
        };
        assert!(replica.step(m.clone()).is_err());
        m.to = second;
        m.set_msg_type(MessageType::MsgHup);
        assert!(replica.step(m.clone()).is_err());
        let follower = [1, 2, 3].into_iter().find(|id| *id != first && *id != second).unwrap();
        let mut hb = Message::default();
        hb.set_msg_type(MessageType::MsgHeartbeat);
        hb.to = follower;
        hb.from = second;
        hb.term = 1000;
        hb.commit = 1_000_000;
        assert!(sim.replicas.get_mut(&follower).unwrap().step(hb).is_err());
    }

    #[test]
    fn a_one_value_election_range_fixes_the_timeout() {
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let storage = MemStorage::new_with_conf_state(ConfState::from((vec![1, 2, 3], vec![])));
        let config = test_config(1, 0);
        let mut fixed = Replica::new_with_election_ticks_max(config.clone(), Some(11), storage, &logger).unwrap();
        for _ in 0..20 {
            fixed.node.raft.reset_randomized_election_timeout();
            assert_eq!(fixed.node.raft.randomized_election_timeout(), 10);
        }
        // Without the bound the range is raft's default [10, 20); an empty range is refused.
        let storage = MemStorage::new_with_conf_state(ConfState::from((vec![1, 2, 3], vec![])));
        let default = Replica::new(config.clone(), storage, &logger).unwrap();
        assert!((10..20).contains(&default.node.raft.randomized_election_timeout()));
        let storage = MemStorage::new_with_conf_state(ConfState::from((vec![1, 2, 3], vec![])));
        assert!(Replica::new_with_election_ticks_max(config, Some(10), storage, &logger).is_err());
    }

    #[test]
    fn learners_are_promoted_once_caught_up() {
        let mut sim = Sim::new(&[1, 2]);
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let leader = sim.tick_until_leader();
        // Node 3 starts empty and is added as a learner.
        let storage = MemStorage::new();
        let config = test_config(3, 0);
        sim.replicas.insert(3, Replica::new(config, storage, &logger).unwrap());
        sim.replicas
            .get_mut(&leader)
            .unwrap()
            .propose_conf_change(vec![], conf_change(ConfChangeType::AddLearnerNode, 3))
            .unwrap();
        sim.drain();
        assert!(sim.replicas[&leader].status().learners.contains(&3));
        for _ in 0..50 {
            for r in sim.replicas.values_mut() {
                r.tick();
            }
            sim.drain();
            if sim.replicas[&leader].status().voters.contains(&3) {
                return;
            }
        }
        panic!("learner was not promoted: {:?}", sim.replicas[&leader].status());
    }
}
