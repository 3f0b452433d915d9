//! The replicated state machine: a pure struct (no IO, no clock) that applies committed commands
//! in log order, in memory. Durability comes from the raft log and snapshots: a restarted
//! replica decodes its last snapshot and applies the log after it again, so apply writes
//! nothing to disk. The large tables are [`CowMap`]s: a snapshot clones the state in
//! microseconds ([`StateMachine::clone`]) and is encoded off the apply path.
//!
//! Data directories written before format 2 kept every record in sled trees ([`SmTree`]);
//! [`StateMachine::from_records`] reads them once, when such a directory is upgraded.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

use crate::codec::{self, DecodeError, RECORD_BYTES_MAX, SNAPSHOT_BYTES_MAX};
use crate::command::{Command, Outcome, USAGE_PER_ADD_MAX, VIEWERS_PER_EXPIRY_MAX, VIEWERS_PER_UPSERT_MAX};
use crate::cow_map::CowMap;
use crate::ids::{NodeId, RoomId, ViewerId, raft_id_for};
use crate::types::{
    ClusterSettings, Membership, NodeRecord, NodeState, NodeStatus, Placement, TURN_SECRET_BYTES_MAX, TurnSecrets,
    UsageBatch, UsageRecord, ViewerState, validate_day,
};

/// Most nodes registered.
pub const NODES_MAX: usize = 1024;
/// Most rooms placed.
pub const ROOMS_MAX: usize = 100_000;
/// Most viewer states held.
pub const VIEWERS_MAX: usize = 500_000;
/// Most usage records held (rooms × days within the retention).
pub const USAGE_RECORDS_MAX: usize = 1_000_000;
/// Most nodes whose last usage batch is remembered; beyond it the node whose last batch has
/// the oldest run is forgotten (a resend from that node's run could no longer be told from a
/// new add).
pub const USAGE_SOURCES_MAX: usize = 4096;

/// The sled tree a state machine record lived in (data directory format 1; see
/// [`StateMachine::from_records`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SmTree {
    /// `node id → NodeRecord`
    Nodes,
    /// `room id → Placement`
    Rooms,
    /// `viewer id → ViewerState`
    Viewers,
    /// `applied`, `turn`, `settings`, `usage_batch/<node>`
    Meta,
    /// `day/room → UsageRecord`
    Usage,
}

impl SmTree {
    /// All trees, in a fixed order.
    pub const ALL: [SmTree; 5] = [
        SmTree::Nodes,
        SmTree::Rooms,
        SmTree::Viewers,
        SmTree::Meta,
        SmTree::Usage,
    ];

    /// sled tree name.
    pub fn name(self) -> &'static str {
        match self {
            SmTree::Nodes => "sm_nodes",
            SmTree::Rooms => "sm_rooms",
            SmTree::Viewers => "sm_viewers",
            SmTree::Meta => "sm_meta",
            SmTree::Usage => "sm_usage",
        }
    }
}

/// One key/value record of data directory format 1 (None value: delete).
#[derive(Clone, Debug, PartialEq)]
pub struct SmWrite {
    /// Tree.
    pub tree: SmTree,
    /// Key.
    pub key: Vec<u8>,
    /// New value, or None to delete.
    pub value: Option<Vec<u8>>,
}

/// Meta keys.
pub const META_APPLIED: &[u8] = b"applied";
/// Meta key of the TURN secrets.
pub const META_TURN: &[u8] = b"turn";
/// Meta key of the settings.
pub const META_SETTINGS: &[u8] = b"settings";
/// Meta key prefix of a node's last applied usage batch (the node id follows).
pub const META_USAGE_BATCH: &str = "usage_batch/";

/// The meta key of `node`'s last applied usage batch.
fn usage_batch_key(node: &NodeId) -> String {
    format!("{META_USAGE_BATCH}{node}")
}

/// Index and term of the last applied entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bincode::Encode, bincode::Decode)]
pub struct AppliedIndex {
    /// Raft index.
    pub index: u64,
    /// Raft term of that entry.
    pub term: u64,
}

/// The whole replicated state.
#[derive(Clone, Debug, Default, PartialEq, bincode::Encode, bincode::Decode)]
pub struct StateMachine {
    nodes: BTreeMap<NodeId, NodeRecord>,
    rooms: CowMap<RoomId, Placement>,
    viewers: CowMap<ViewerId, ViewerState>,
    turn: Option<TurnSecrets>,
    settings: Option<ClusterSettings>,
    applied: AppliedIndex,
    /// The usage ledger, by [`UsageRecord::key`] (day first).
    usage: BTreeMap<String, UsageRecord>,
    /// The last usage batch applied per proposing node.
    usage_batches: BTreeMap<NodeId, UsageBatch>,
}

impl StateMachine {
    /// Last applied index and term.
    pub fn applied(&self) -> AppliedIndex {
        self.applied
    }
    /// Registered nodes.
    pub fn nodes(&self) -> &BTreeMap<NodeId, NodeRecord> {
        &self.nodes
    }
    /// Room placements.
    pub fn rooms(&self) -> &CowMap<RoomId, Placement> {
        &self.rooms
    }
    /// Viewer states.
    pub fn viewers(&self) -> &CowMap<ViewerId, ViewerState> {
        &self.viewers
    }
    /// The usage ledger's records of one day, by room.
    pub fn usage_of_day(&self, day: &str) -> impl Iterator<Item = &UsageRecord> {
        let from = format!("{day}/");
        self.usage
            .range(from.clone()..)
            .take_while(move |(key, _)| key.starts_with(&from))
            .map(|(_, record)| record)
    }
    /// TURN secrets, if set.
    pub fn turn(&self) -> Option<&TurnSecrets> {
        self.turn.as_ref()
    }
    /// Settings, if set.
    pub fn settings(&self) -> Option<&ClusterSettings> {
        self.settings.as_ref()
    }
    /// The registered nodes as a replica sees them at `now_ms` on its clock: alive while the
    /// last heartbeat is at most `dead_after_ms` old (draining wins), membership from the
    /// replica's configuration (`voters`, `learners`). What `Store::nodes` answers and what
    /// the simulator's nodes read, so both derive it alike.
    pub fn node_statuses(&self, voters: &[u64], learners: &[u64], now_ms: u64, dead_after_ms: u64) -> Vec<NodeStatus> {
        self.nodes
            .values()
            .map(|n| NodeStatus {
                id: n.registration.id.clone(),
                raft_id: n.raft_id,
                region: n.registration.region.clone(),
                cluster_addr: n.registration.cluster_addr.clone(),
                http_url: n.registration.http_url.clone(),
                grpc_url: n.registration.grpc_url.clone(),
                capacity: n.registration.capacity,
                media_ip: n.registration.media_ip.clone(),
                media_ports: n.registration.media_ports,
                turn_addr: n.registration.turn_addr.clone(),
                state: if n.draining {
                    NodeState::Draining
                } else if n.last_heartbeat_ms > 0 && now_ms.saturating_sub(n.last_heartbeat_ms) <= dead_after_ms {
                    NodeState::Alive
                } else {
                    NodeState::Dead
                },
                membership: if voters.contains(&n.raft_id) {
                    Membership::Voter
                } else if learners.contains(&n.raft_id) {
                    Membership::Learner
                } else {
                    Membership::None
                },
                last_load: n.last_load.clone(),
                last_heartbeat_ms: n.last_heartbeat_ms,
            })
            .collect()
    }

    /// The node with this raft id.
    pub fn node_by_raft_id(&self, raft_id: u64) -> Option<&NodeRecord> {
        self.nodes.values().find(|n| n.raft_id == raft_id)
    }

    /// Marks an entry that carries no commands (empty, or a conf change) as applied.
    pub fn apply_empty(&mut self, index: u64, term: u64) {
        self.advance(index, term);
    }

    fn advance(&mut self, index: u64, term: u64) {
        // Entries are applied exactly once, in order; anything else is a bug in the shell.
        assert!(
            index > self.applied.index,
            "apply out of order: {index} after {}",
            self.applied.index
        );
        self.applied = AppliedIndex { index, term };
    }

    /// Applies the commands of entry `index` in order; returns one outcome per command.
    pub fn apply(&mut self, index: u64, term: u64, commands: Vec<Command>) -> Vec<Outcome> {
        let outcomes = commands.into_iter().map(|c| self.apply_one(index, c)).collect();
        self.advance(index, term);
        outcomes
    }

    fn put<T: bincode::Encode>(writes: &mut Vec<SmWrite>, tree: SmTree, key: &str, value: &T) {
        writes.push(SmWrite {
            tree,
            key: key.as_bytes().to_vec(),
            value: Some(codec::encode(value)),
        });
    }

    fn apply_one(&mut self, index: u64, command: Command) -> Outcome {
        match command {
            Command::RegisterNode(registration) => {
                if let Err(e) = registration.validate() {
                    return Outcome::Rejected(e);
                }
                let raft_id = raft_id_for(&registration.id);
                if let Some(other) = self
                    .nodes
                    .values()
                    .find(|n| n.raft_id == raft_id && n.registration.id != registration.id)
                {
                    return Outcome::Rejected(format!(
                        "raft id {raft_id} of node {} collides with node {}",
                        registration.id, other.registration.id
                    ));
                }
                if !self.nodes.contains_key(&registration.id) && self.nodes.len() >= NODES_MAX {
                    return Outcome::Rejected(format!("more than {NODES_MAX} nodes"));
                }
                let record = match self.nodes.get(&registration.id) {
                    Some(existing) => NodeRecord {
                        registration: registration.clone(),
                        ..existing.clone()
                    },
                    None => NodeRecord {
                        registration: registration.clone(),
                        raft_id,
                        draining: false,
                        last_load: None,
                        last_heartbeat_ms: 0,
                    },
                };
                self.nodes.insert(registration.id, record.clone());
                Outcome::Node(record)
            }
            Command::Heartbeat { node, load, at_ms } => match self.nodes.get_mut(&node) {
                None => Outcome::Rejected(format!("unknown node {node}")),
                Some(record) => {
                    record.last_load = Some(load);
                    record.last_heartbeat_ms = record.last_heartbeat_ms.max(at_ms);
                    Outcome::Node(record.clone())
                }
            },
            Command::RemoveNode { node } => Outcome::Deleted(self.nodes.remove(&node).is_some()),
            Command::SetNodeDraining { node, draining } => match self.nodes.get_mut(&node) {
                None => Outcome::Rejected(format!("unknown node {node}")),
                Some(record) => {
                    record.draining = draining;
                    Outcome::Node(record.clone())
                }
            },
            Command::PlaceRoom {
                room,
                expected_epoch,
                node,
            } => {
                if let Err(e) = room.validate().and_then(|_| node.validate()) {
                    return Outcome::Rejected(e);
                }
                let current = self.rooms.get(&room);
                let current_epoch = current.map(|p| p.epoch);
                if current_epoch != expected_epoch {
                    return Outcome::EpochConflict(current.cloned());
                }
                if current.is_none() && self.rooms.len() >= ROOMS_MAX {
                    return Outcome::Rejected(format!("more than {ROOMS_MAX} rooms"));
                }
                let placement = Placement {
                    room: room.clone(),
                    node,
                    epoch: current_epoch.unwrap_or(0) + 1,
                };
                self.rooms.insert(room, placement.clone());
                Outcome::Placed(placement)
            }
            Command::DeleteRoom { room, expected_epoch } => match self.rooms.get(&room) {
                Some(p) if p.epoch == expected_epoch => {
                    self.rooms.remove(&room);
                    Outcome::Deleted(true)
                }
                other => Outcome::EpochConflict(other.cloned()),
            },
            Command::UpsertViewers { viewers } => self.upsert_viewers(index, viewers),
            Command::DeleteViewer { viewer } => Outcome::Deleted(self.viewers.remove(&viewer).is_some()),
            Command::ExpireViewers { viewers } => {
                if viewers.len() > VIEWERS_PER_EXPIRY_MAX {
                    return Outcome::Rejected(format!("more than {VIEWERS_PER_EXPIRY_MAX} viewers in one expiry"));
                }
                let mut expired = 0;
                for (viewer, revision) in viewers {
                    if self.viewers.get(&viewer).is_some_and(|v| v.revision == revision) {
                        self.viewers.remove(&viewer);
                        expired += 1;
                    }
                }
                Outcome::Expired(expired)
            }
            Command::RotateTurnSecret { secret, at_ms } => {
                if secret.is_empty() || secret.len() > TURN_SECRET_BYTES_MAX {
                    return Outcome::Rejected(format!("TURN secret must be 1..={TURN_SECRET_BYTES_MAX} bytes"));
                }
                let turn = TurnSecrets {
                    current: secret,
                    previous: self.turn.as_ref().map(|t| t.current.clone()),
                    rotated_at_ms: at_ms,
                };
                self.turn = Some(turn.clone());
                Outcome::Turn(turn)
            }
            Command::AddUsage {
                node,
                batch,
                records,
                keep_from_day,
            } => {
                if records.len() > USAGE_PER_ADD_MAX {
                    return Outcome::Rejected(format!("more than {USAGE_PER_ADD_MAX} usage records in one add"));
                }
                if let Some(e) = records
                    .iter()
                    .find_map(|r| r.validate().err())
                    .or_else(|| validate_day(&keep_from_day).err())
                {
                    return Outcome::Rejected(e);
                }
                if let Err(e) = node.validate() {
                    return Outcome::Rejected(e);
                }
                if self.usage_batches.get(&node).is_some_and(|last| batch <= *last) {
                    // Sent again after an unknown outcome: it was counted already.
                    return Outcome::Done;
                }
                let new_keys = records.iter().filter(|r| !self.usage.contains_key(&r.key())).count();
                if self.usage.len() + new_keys > USAGE_RECORDS_MAX {
                    return Outcome::Rejected(format!("more than {USAGE_RECORDS_MAX} usage records"));
                }
                self.mark_usage_batch(node, batch);
                for record in records {
                    let entry = self.usage.entry(record.key()).or_insert_with(|| UsageRecord {
                        viewer_ms: 0,
                        sessions: 0,
                        ..record.clone()
                    });
                    entry.viewer_ms = entry.viewer_ms.saturating_add(record.viewer_ms);
                    entry.sessions = entry.sessions.saturating_add(record.sessions);
                }
                // Keys sort by day first: everything before `keep_from_day/` is older.
                self.usage = self.usage.split_off(&keep_from_day);
                Outcome::Done
            }
            Command::SetSettings {
                settings,
                only_if_unset,
            } => {
                if only_if_unset && self.settings.is_some() {
                    return Outcome::Done;
                }
                if settings.viewer_ttl_ms == 0 {
                    return Outcome::Rejected("viewer_ttl_ms must be positive".into());
                }
                self.settings = Some(settings);
                Outcome::Done
            }
        }
    }

    /// `UpsertViewers`: every state is checked before any is stored (the command applies whole
    /// or not at all); each is then stored unless the stored state refuses it
    /// ([`ViewerState::accepts`]). The outcome names only the refusals: the proposer knows what
    /// it sent, so the stored states are not sent back.
    fn upsert_viewers(&mut self, index: u64, viewers: Vec<ViewerState>) -> Outcome {
        if viewers.len() > VIEWERS_PER_UPSERT_MAX {
            return Outcome::Rejected(format!("more than {VIEWERS_PER_UPSERT_MAX} viewers in one upsert"));
        }
        if let Some(e) = viewers.iter().find_map(|v| v.validate().err()) {
            return Outcome::Rejected(e);
        }
        // Count the new viewers (one more lookup each) only when the limit is within reach.
        if self.viewers.len() + viewers.len() > VIEWERS_MAX {
            let new_count = viewers.iter().filter(|v| !self.viewers.contains_key(&v.viewer)).count();
            if self.viewers.len() + new_count > VIEWERS_MAX {
                return Outcome::Rejected(format!("more than {VIEWERS_MAX} viewer states"));
            }
        }
        let ttl_ms = self.viewer_ttl_ms();
        let mut kept = Vec::new();
        for (position, mut v) in (0u32..).zip(viewers) {
            if let Some(stored) = self.viewers.get_mut(&v.viewer) {
                if !stored.accepts(&v) {
                    // A late write of a session the viewer left, or of a resume that lost the
                    // claim to another one from the same state: the owner's state stays.
                    kept.push((position, stored.clone()));
                    continue;
                }
                v.expires_at_ms = v.updated_at_ms.saturating_add(ttl_ms);
                v.revision = index;
                *stored = v;
            } else {
                v.expires_at_ms = v.updated_at_ms.saturating_add(ttl_ms);
                v.revision = index;
                self.viewers.insert(v.viewer.clone(), v);
            }
        }
        Outcome::Upserted { index, ttl_ms, kept }
    }

    /// Remembers `batch` as `node`'s last applied usage batch, forgetting the oldest run when
    /// [`USAGE_SOURCES_MAX`] are remembered.
    fn mark_usage_batch(&mut self, node: NodeId, batch: UsageBatch) {
        if !self.usage_batches.contains_key(&node) && self.usage_batches.len() >= USAGE_SOURCES_MAX {
            let oldest = self
                .usage_batches
                .iter()
                .min_by_key(|(id, b)| (b.run, (*id).clone()))
                .map(|(id, _)| id.clone());
            if let Some(oldest) = oldest {
                self.usage_batches.remove(&oldest);
            }
        }
        self.usage_batches.insert(node, batch);
    }

    /// TTL in force (the default until settings are replicated).
    pub fn viewer_ttl_ms(&self) -> u64 {
        self.settings
            .as_ref()
            .map_or(DEFAULT_VIEWER_TTL_MS, |s| s.viewer_ttl_ms)
    }

    /// Viewers the leader should expire now (etcd's lease model): a viewer is due when both its
    /// stored deadline and `not_before_ms` (the new leader's grace: leadership start + one
    /// election timeout) have passed. At most `max` entries, oldest deadline first.
    pub fn due_viewers(&self, now_ms: u64, not_before_ms: u64, max: usize) -> Vec<(ViewerId, u64)> {
        if now_ms < not_before_ms {
            return Vec::new();
        }
        let mut due: Vec<&ViewerState> = self.viewers.values().filter(|v| v.expires_at_ms <= now_ms).collect();
        due.sort_by_key(|v| (v.expires_at_ms, v.viewer.clone()));
        due.into_iter()
            .take(max)
            .map(|v| (v.viewer.clone(), v.revision))
            .collect()
    }

    /// SHA-256 over the canonical encoding of the contents (without the applied index, so
    /// replicas that applied the same commands compare equal).
    pub fn digest(&self) -> String {
        let mut hasher = Sha256::new();
        hasher.update(codec::encode(&(
            &self.nodes,
            &self.rooms,
            &self.viewers,
            &self.turn,
            &self.settings,
            &self.usage,
            &self.usage_batches,
        )));
        hasher.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Encodes the whole state for a raft snapshot.
    pub fn encode_snapshot(&self) -> Vec<u8> {
        codec::encode(self)
    }

    /// Decodes a snapshot produced by [`Self::encode_snapshot`].
    pub fn decode_snapshot(bytes: &[u8]) -> Result<StateMachine, DecodeError> {
        let sm: StateMachine = codec::decode::<_, SNAPSHOT_BYTES_MAX>(bytes)?;
        sm.check_invariants().map_err(DecodeError::Malformed)?;
        Ok(sm)
    }

    /// Every record of the state as data directory format 1 kept it in its sled trees (the
    /// format [`Self::from_records`] upgrades from; tests write such directories with it).
    pub fn all_records(&self) -> Vec<SmWrite> {
        let mut writes = Vec::new();
        for (id, n) in &self.nodes {
            Self::put(&mut writes, SmTree::Nodes, id.as_str(), n);
        }
        for (id, p) in self.rooms.iter() {
            Self::put(&mut writes, SmTree::Rooms, id.as_str(), p);
        }
        for (id, v) in self.viewers.iter() {
            Self::put(&mut writes, SmTree::Viewers, id.as_str(), v);
        }
        for (key, record) in &self.usage {
            Self::put(&mut writes, SmTree::Usage, key, record);
        }
        for (node, batch) in &self.usage_batches {
            Self::put(&mut writes, SmTree::Meta, &usage_batch_key(node), batch);
        }
        if let Some(t) = &self.turn {
            writes.push(SmWrite {
                tree: SmTree::Meta,
                key: META_TURN.to_vec(),
                value: Some(codec::encode(t)),
            });
        }
        if let Some(s) = &self.settings {
            writes.push(SmWrite {
                tree: SmTree::Meta,
                key: META_SETTINGS.to_vec(),
                value: Some(codec::encode(s)),
            });
        }
        writes.push(SmWrite {
            tree: SmTree::Meta,
            key: META_APPLIED.to_vec(),
            value: Some(codec::encode(&self.applied)),
        });
        writes
    }

    /// Rebuilds the state from the records of a format-1 data directory (tree, key, value),
    /// checking each. The error says which tree and key is wrong.
    pub fn from_records(
        records: impl IntoIterator<Item = (SmTree, Vec<u8>, Vec<u8>)>,
    ) -> Result<StateMachine, (SmTree, Vec<u8>, String)> {
        let mut sm = StateMachine::default();
        for (tree, key, value) in records {
            let bad = |reason: String| (tree, key.clone(), reason);
            let key_text = std::str::from_utf8(&key)
                .map_err(|_| bad("key is not UTF-8".into()))?
                .to_string();
            match tree {
                SmTree::Nodes => {
                    let n: NodeRecord = codec::decode::<_, RECORD_BYTES_MAX>(&value).map_err(|e| bad(e.to_string()))?;
                    if n.registration.id.as_str() != key_text {
                        return Err(bad(format!("record is for node {}", n.registration.id)));
                    }
                    sm.nodes.insert(n.registration.id.clone(), n);
                }
                SmTree::Rooms => {
                    let p: Placement = codec::decode::<_, RECORD_BYTES_MAX>(&value).map_err(|e| bad(e.to_string()))?;
                    if p.room.as_str() != key_text {
                        return Err(bad(format!("record is for room {}", p.room)));
                    }
                    sm.rooms.insert(p.room.clone(), p);
                }
                SmTree::Viewers => {
                    let v: ViewerState =
                        codec::decode::<_, RECORD_BYTES_MAX>(&value).map_err(|e| bad(e.to_string()))?;
                    if v.viewer.as_str() != key_text {
                        return Err(bad(format!("record is for viewer {}", v.viewer)));
                    }
                    sm.viewers.insert(v.viewer.clone(), v);
                }
                SmTree::Usage => {
                    let r: UsageRecord =
                        codec::decode::<_, RECORD_BYTES_MAX>(&value).map_err(|e| bad(e.to_string()))?;
                    if r.key() != key_text {
                        return Err(bad(format!("record is for {}", r.key())));
                    }
                    sm.usage.insert(key_text, r);
                }
                SmTree::Meta => match key.as_slice() {
                    META_APPLIED => {
                        sm.applied = codec::decode::<_, RECORD_BYTES_MAX>(&value).map_err(|e| bad(e.to_string()))?
                    }
                    META_TURN => {
                        sm.turn = Some(codec::decode::<_, RECORD_BYTES_MAX>(&value).map_err(|e| bad(e.to_string()))?)
                    }
                    META_SETTINGS => {
                        sm.settings =
                            Some(codec::decode::<_, RECORD_BYTES_MAX>(&value).map_err(|e| bad(e.to_string()))?)
                    }
                    _ => match key_text.strip_prefix(META_USAGE_BATCH) {
                        Some(node) => {
                            let node = NodeId::from(node);
                            node.validate().map_err(bad)?;
                            let batch = codec::decode::<_, RECORD_BYTES_MAX>(&value).map_err(|e| bad(e.to_string()))?;
                            sm.usage_batches.insert(node, batch);
                        }
                        None => return Err(bad("unknown meta key".into())),
                    },
                },
            }
        }
        sm.check_invariants().map_err(|e| (SmTree::Meta, Vec::new(), e))?;
        Ok(sm)
    }

    /// Invariants that hold after every apply; checked after reading state back from disk or a
    /// snapshot.
    pub fn check_invariants(&self) -> Result<(), String> {
        if self.nodes.len() > NODES_MAX
            || self.rooms.len() > ROOMS_MAX
            || self.viewers.len() > VIEWERS_MAX
            || self.usage.len() > USAGE_RECORDS_MAX
            || self.usage_batches.len() > USAGE_SOURCES_MAX
        {
            return Err("more records than the limits allow".into());
        }
        for (id, p) in self.rooms.iter() {
            if &p.room != id || p.epoch == 0 {
                return Err(format!("room {id}: bad placement"));
            }
        }
        for (id, v) in self.viewers.iter() {
            if &v.viewer != id || v.revision > self.applied.index {
                return Err(format!("viewer {id}: bad record"));
            }
        }
        for (key, r) in &self.usage {
            if &r.key() != key || r.validate().is_err() {
                return Err(format!("usage {key}: bad record"));
            }
        }
        for (id, n) in &self.nodes {
            if &n.registration.id != id || n.raft_id != raft_id_for(id) {
                return Err(format!("node {id}: bad record"));
            }
        }
        Ok(())
    }
}

/// Viewer TTL before the cluster settings are replicated (DESIGN.md §8: 300 s).
pub const DEFAULT_VIEWER_TTL_MS: u64 = 300_000;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{NodeLoad, NodeRegistration};

    fn registration(id: &str) -> NodeRegistration {
        NodeRegistration {
            id: NodeId::from(id),
            region: "seoul".into(),
            cluster_addr: "127.0.0.1:7000".into(),
            http_url: "http://127.0.0.1:8080".into(),
            grpc_url: "http://127.0.0.1:8081".into(),
            capacity: 100,
            media_ip: "127.0.0.1".into(),
            media_ports: (50000, 50999),
            turn_addr: "127.0.0.1:3478".into(),
        }
    }

    fn viewer(id: &str, updated_at_ms: u64) -> ViewerState {
        ViewerState {
            viewer: ViewerId::from(id),
            room: RoomId::from("lobby"),
            node: NodeId::from("n1"),
            session: "s1".into(),
            display_name: String::new(),
            position_ms: 10,
            subscriptions: vec!["video".into()],
            layers: [("video".to_string(), "h".to_string())].into(),
            updated_at_ms,
            expires_at_ms: 0,
            revision: 0,
            generation: 0,
        }
    }

    fn apply(sm: &mut StateMachine, index: u64, command: Command) -> Outcome {
        sm.apply(index, 1, vec![command]).remove(0)
    }

    #[test]
    fn place_room_is_a_compare_and_set_on_the_epoch() {
        let mut sm = StateMachine::default();
        let room = RoomId::from("r");
        let placed = apply(
            &mut sm,
            1,
            Command::PlaceRoom {
                room: room.clone(),
                expected_epoch: None,
                node: "a".into(),
            },
        );
        assert_eq!(
            placed,
            Outcome::Placed(Placement {
                room: room.clone(),
                node: "a".into(),
                epoch: 1
            })
        );
        // A second "create" conflicts.
        let again = apply(
            &mut sm,
            2,
            Command::PlaceRoom {
                room: room.clone(),
                expected_epoch: None,
                node: "b".into(),
            },
        );
        assert!(matches!(again, Outcome::EpochConflict(Some(ref p)) if p.epoch == 1 && p.node.as_str() == "a"));
        // The right epoch moves it.
        let moved = apply(
            &mut sm,
            3,
            Command::PlaceRoom {
                room: room.clone(),
                expected_epoch: Some(1),
                node: "b".into(),
            },
        );
        assert_eq!(
            moved,
            Outcome::Placed(Placement {
                room: room.clone(),
                node: "b".into(),
                epoch: 2
            })
        );
        // A stale epoch is refused and changes nothing.
        let stale = apply(
            &mut sm,
            4,
            Command::PlaceRoom {
                room: room.clone(),
                expected_epoch: Some(1),
                node: "c".into(),
            },
        );
        assert!(matches!(stale, Outcome::EpochConflict(Some(ref p)) if p.epoch == 2 && p.node.as_str() == "b"));
        assert_eq!(sm.rooms()[&room].node.as_str(), "b");
        // Delete with a stale epoch is refused, with the current one succeeds.
        assert!(matches!(
            apply(
                &mut sm,
                5,
                Command::DeleteRoom {
                    room: room.clone(),
                    expected_epoch: 1
                }
            ),
            Outcome::EpochConflict(_)
        ));
        assert_eq!(
            apply(
                &mut sm,
                6,
                Command::DeleteRoom {
                    room: room.clone(),
                    expected_epoch: 2
                }
            ),
            Outcome::Deleted(true)
        );
        assert!(sm.rooms().is_empty());
    }

    #[test]
    fn viewer_ttl_and_leader_expiry_respect_revisions() {
        let mut sm = StateMachine::default();
        apply(
            &mut sm,
            1,
            Command::SetSettings {
                settings: ClusterSettings { viewer_ttl_ms: 2_000 },
                only_if_unset: true,
            },
        );
        // only_if_unset does not overwrite.
        apply(
            &mut sm,
            2,
            Command::SetSettings {
                settings: ClusterSettings { viewer_ttl_ms: 9 },
                only_if_unset: true,
            },
        );
        assert_eq!(sm.viewer_ttl_ms(), 2_000);
        let sent = vec![viewer("v1", 1_000), viewer("v2", 1_500)];
        let outcome = apply(&mut sm, 3, Command::UpsertViewers { viewers: sent.clone() });
        assert!(
            matches!(&outcome, Outcome::Upserted { kept, .. } if kept.is_empty()),
            "{outcome:?}"
        );
        let stored = outcome.stored_viewers(sent).expect("an upsert's outcome");
        assert_eq!(
            stored,
            [
                &sm.viewers()[&ViewerId::from("v1")],
                &sm.viewers()[&ViewerId::from("v2")]
            ]
            .map(Clone::clone)
        );
        assert_eq!(stored[0].expires_at_ms, 3_000);
        assert_eq!(stored[0].revision, 3);
        // Nothing is due before the deadline, or before the new leader's grace.
        assert!(sm.due_viewers(2_999, 0, 10).is_empty());
        assert!(sm.due_viewers(10_000, 10_001, 10).is_empty());
        let due = sm.due_viewers(3_000, 0, 10);
        assert_eq!(due, vec![(ViewerId::from("v1"), 3)]);
        // v1 is updated after the leader decided: the expiry must not remove it.
        apply(
            &mut sm,
            4,
            Command::UpsertViewers {
                viewers: vec![viewer("v1", 2_900)],
            },
        );
        assert_eq!(
            apply(&mut sm, 5, Command::ExpireViewers { viewers: due }),
            Outcome::Expired(0)
        );
        assert!(sm.viewers().contains_key(&ViewerId::from("v1")));
        let due = sm.due_viewers(5_000, 0, 10);
        assert_eq!(due.len(), 2);
        assert_eq!(
            apply(&mut sm, 6, Command::ExpireViewers { viewers: due }),
            Outcome::Expired(2)
        );
        assert!(sm.viewers().is_empty());
    }

    #[test]
    fn register_heartbeat_turn_and_digest() {
        let mut a = StateMachine::default();
        let mut b = StateMachine::default();
        let commands = vec![
            Command::RegisterNode(registration("n1")),
            Command::Heartbeat {
                node: "n1".into(),
                load: NodeLoad {
                    cpu: 0.5,
                    connections: 3,
                    rooms: 1,
                    egress_bps: 2_000_000,
                },
                at_ms: 7,
            },
            Command::Heartbeat {
                node: "nope".into(),
                load: NodeLoad::default(),
                at_ms: 7,
            },
            Command::RotateTurnSecret {
                secret: "s1".into(),
                at_ms: 1,
            },
            Command::RotateTurnSecret {
                secret: "s2".into(),
                at_ms: 2,
            },
        ];
        let outcomes = a.apply(1, 1, commands.clone());
        b.apply(1, 1, commands);
        assert!(matches!(outcomes[2], Outcome::Rejected(_)));
        assert_eq!(a.turn().unwrap().previous.as_deref(), Some("s1"));
        assert_eq!(a.turn().unwrap().current, "s2");
        assert_eq!(a.digest(), b.digest());
        // Format-1 records round-trip to the same state.
        let records = a.all_records().into_iter().map(|w| (w.tree, w.key, w.value.unwrap()));
        let restored = StateMachine::from_records(records).unwrap();
        assert_eq!(restored, a);
        let snapshot = StateMachine::decode_snapshot(&a.encode_snapshot()).unwrap();
        assert_eq!(snapshot, a);
        apply(&mut b, 2, Command::RemoveNode { node: "n1".into() });
        assert_ne!(a.digest(), b.digest());
    }

    fn usage(day: &str, room: &str, viewer_ms: u64) -> UsageRecord {
        UsageRecord {
            day: day.into(),
            room: RoomId::from(room),
            viewer_ms,
            sessions: 1,
        }
    }

    fn add_usage(node: &str, run: u64, seq: u64, part: u32, records: Vec<UsageRecord>, keep: &str) -> Command {
        Command::AddUsage {
            node: NodeId::from(node),
            batch: UsageBatch { run, seq, part },
            records,
            keep_from_day: keep.into(),
        }
    }

    #[test]
    fn usage_adds_up_per_day_and_room_and_old_days_expire() {
        let mut sm = StateMachine::default();
        let mut seq = 0;
        let mut add = |records, keep: &str| {
            seq += 1;
            add_usage("n1", 1, seq, 0, records, keep)
        };
        let first = vec![usage("2026-11-21", "a", 60_000), usage("2026-11-22", "a", 30_000)];
        assert_eq!(apply(&mut sm, 1, add(first, "2026-01-01")), Outcome::Done);
        let second = vec![usage("2026-11-22", "a", 15_000), usage("2026-11-22", "b", 1)];
        assert_eq!(apply(&mut sm, 2, add(second, "2026-01-01")), Outcome::Done);
        let day: Vec<_> = sm.usage_of_day("2026-11-22").cloned().collect();
        assert_eq!(day.len(), 2);
        assert_eq!(
            (day[0].room.as_str(), day[0].viewer_ms, day[0].sessions),
            ("a", 45_000, 2)
        );
        assert_eq!((day[1].room.as_str(), day[1].viewer_ms), ("b", 1));
        assert_eq!(sm.usage_of_day("2026-11-21").count(), 1);
        assert_eq!(sm.usage_of_day("2026-11-2").count(), 0, "a prefix of a day is no day");
        // Records round-trip.
        let records = sm.all_records().into_iter().map(|w| (w.tree, w.key, w.value.unwrap()));
        assert_eq!(StateMachine::from_records(records).unwrap(), sm);
        // Retention: the days before keep_from_day go, in the same entry.
        sm.apply(3, 1, vec![add(vec![], "2026-11-22")]);
        assert_eq!(sm.usage_of_day("2026-11-21").count(), 0);
        assert_eq!(sm.usage_of_day("2026-11-22").count(), 2);
        // Bad input is refused on every replica alike.
        for (i, bad) in [
            add(vec![usage("2026-13-01", "a", 1)], "2026-01-01"),
            add(vec![usage("yesterday", "a", 1)], "2026-01-01"),
            add(vec![usage("2026-11-22", "", 1)], "2026-01-01"),
            add(vec![], "soon"),
            add(vec![usage("2026-11-22", "a", 1); USAGE_PER_ADD_MAX + 1], "2026-01-01"),
        ]
        .into_iter()
        .enumerate()
        {
            assert!(matches!(apply(&mut sm, 4 + i as u64, bad), Outcome::Rejected(_)));
        }
    }

    #[test]
    fn a_usage_flush_sent_again_counts_once() {
        let mut sm = StateMachine::default();
        let keep = "2026-01-01";
        let minute = |room: &str| vec![usage("2026-11-22", room, 60_000)];
        let viewer_ms = |sm: &StateMachine| sm.usage_of_day("2026-11-22").map(|r| r.viewer_ms).sum::<u64>();
        // A flush of two commands (parts) in one entry.
        let flush = [
            add_usage("n1", 100, 1, 0, minute("a"), keep),
            add_usage("n1", 100, 1, 1, minute("b"), keep),
        ];
        // Both parts count.
        sm.apply(1, 1, flush.to_vec());
        assert_eq!(viewer_ms(&sm), 120_000);
        // Its outcome was lost (a timeout): the node sends it again, unchanged. Nothing changes.
        let before = sm.clone();
        let outcomes = sm.apply(2, 1, flush.to_vec());
        assert_eq!(outcomes, [Outcome::Done, Outcome::Done]);
        assert_eq!(sm.digest(), before.digest(), "a resent flush changes nothing");
        assert_eq!(viewer_ms(&sm), 120_000);
        // Its next flush, another node's, and the same node after a restart (a later run,
        // numbering from 1 again) count; an older one does not.
        for (index, (node, run, seq, counted)) in [
            ("n1", 100, 2, 180_000),
            ("n2", 50, 1, 240_000),
            ("n1", 200, 1, 300_000),
            ("n1", 100, 3, 300_000),
        ]
        .into_iter()
        .enumerate()
        {
            apply(
                &mut sm,
                3 + index as u64,
                add_usage(node, run, seq, 0, minute("a"), keep),
            );
            assert_eq!(viewer_ms(&sm), counted, "{node} run {run} flush {seq}");
        }
        // The marks are state: replicated, in the digest, on disk and in snapshots.
        let records = sm.all_records().into_iter().map(|w| (w.tree, w.key, w.value.unwrap()));
        let restored = StateMachine::from_records(records).unwrap();
        assert_eq!(restored, sm);
        assert_eq!(StateMachine::decode_snapshot(&sm.encode_snapshot()).unwrap(), sm);
        let mut fresh = StateMachine::default();
        apply(&mut fresh, 1, add_usage("n1", 200, 1, 0, vec![], keep));
        assert_ne!(fresh.digest(), StateMachine::default().digest());
    }

    #[test]
    fn a_write_of_an_older_generation_never_replaces_a_resumed_state() {
        let mut sm = StateMachine::default();
        let mut resumed = viewer("v", 20);
        resumed.generation = 1;
        resumed.position_ms = 8_309;
        apply(&mut sm, 1, Command::UpsertViewers { viewers: vec![resumed] });
        // The session the viewer left writes late (simulator seed 7).
        let mut late = viewer("v", 10);
        late.position_ms = 7_050;
        let outcome = apply(
            &mut sm,
            2,
            Command::UpsertViewers {
                viewers: vec![late.clone()],
            },
        );
        let stored = outcome.clone().stored_viewers(vec![late]).expect("an upsert's outcome");
        assert!(stored[0].position_ms == 8_309, "{outcome:?}");
        assert_eq!(sm.viewers()[&ViewerId::from("v")].position_ms, 8_309);
        assert_eq!(sm.viewers()[&ViewerId::from("v")].revision, 1);
        // The same generation writes in log order; a newer one too.
        for (index, generation, position) in [(3, 1, 9_000), (4, 2, 9_500)] {
            let mut next = viewer("v", 30);
            next.generation = generation;
            next.position_ms = position;
            apply(&mut sm, index, Command::UpsertViewers { viewers: vec![next] });
            assert_eq!(sm.viewers()[&ViewerId::from("v")].position_ms, position);
        }
    }

    #[test]
    fn of_two_resumes_from_one_state_the_first_claim_owns_the_viewer() {
        let mut sm = StateMachine::default();
        apply(
            &mut sm,
            1,
            Command::UpsertViewers {
                viewers: vec![viewer("v", 10)],
            },
        );
        // Two sessions resumed the state of generation 0 (simulator seed 30): both write
        // generation 1. The first to commit claims the viewer.
        let resume = |session: &str, position_ms: u64| ViewerState {
            session: session.into(),
            position_ms,
            generation: 1,
            ..viewer("v", 20)
        };
        apply(
            &mut sm,
            2,
            Command::UpsertViewers {
                viewers: vec![resume("b", 4_070)],
            },
        );
        let loser = vec![resume("a", 2_718)];
        let outcome = apply(&mut sm, 3, Command::UpsertViewers { viewers: loser.clone() });
        let stored = outcome.clone().stored_viewers(loser).expect("an upsert's outcome");
        assert!(
            stored[0].session == "b" && stored[0].revision == 2,
            "the loser is answered with the owner's state: {outcome:?}"
        );
        assert_eq!(sm.viewers()[&ViewerId::from("v")].position_ms, 4_070);
        // The owner goes on writing; the loser resumes again from the owner's state.
        apply(
            &mut sm,
            4,
            Command::UpsertViewers {
                viewers: vec![resume("b", 5_000)],
            },
        );
        assert_eq!(sm.viewers()[&ViewerId::from("v")].position_ms, 5_000);
        let again = ViewerState {
            generation: 2,
            ..resume("a", 5_000)
        };
        apply(&mut sm, 5, Command::UpsertViewers { viewers: vec![again] });
        assert_eq!(sm.viewers()[&ViewerId::from("v")].session, "a");
        assert!(!sm.viewers()[&ViewerId::from("v")].accepts(&resume("b", 6_000)));
    }

    #[test]
    fn corrupt_records_name_tree_and_key() {
        let err = StateMachine::from_records([(SmTree::Viewers, b"v1".to_vec(), vec![1, 2, 3])]).unwrap_err();
        assert_eq!(err.0, SmTree::Viewers);
        assert_eq!(err.1, b"v1".to_vec());
        let err = StateMachine::from_records([(SmTree::Meta, b"what".to_vec(), vec![1])]).unwrap_err();
        assert!(err.2.contains("unknown meta key"));
    }

    #[test]
    fn invalid_input_is_rejected_not_panicking() {
        let mut sm = StateMachine::default();
        let mut bad = viewer("v", 1);
        bad.subscriptions = vec!["x".into(); 1000];
        assert!(matches!(
            apply(&mut sm, 1, Command::UpsertViewers { viewers: vec![bad] }),
            Outcome::Rejected(_)
        ));
        let mut reg = registration("n");
        reg.cluster_addr = String::new();
        assert!(matches!(
            apply(&mut sm, 2, Command::RegisterNode(reg)),
            Outcome::Rejected(_)
        ));
        assert!(matches!(
            apply(
                &mut sm,
                3,
                Command::RotateTurnSecret {
                    secret: String::new(),
                    at_ms: 0
                }
            ),
            Outcome::Rejected(_)
        ));
    }
}
