//! Typed commands replicated through raft, their outcomes, and the payload of one raft entry.

use crate::ids::{NodeId, RoomId, ViewerId};
use crate::types::{
    ClusterSettings, NodeLoad, NodeRecord, NodeRegistration, Placement, TurnSecrets, UsageBatch, UsageRecord,
    ViewerState,
};

/// Most commands coalesced into one raft entry.
pub const COMMANDS_PER_ENTRY_MAX: usize = 4096;
/// Most viewer states in one `UpsertViewers` command.
pub const VIEWERS_PER_UPSERT_MAX: usize = 1024;
/// Most viewers one `ExpireViewers` command removes.
pub const VIEWERS_PER_EXPIRY_MAX: usize = 512;
/// Most usage records in one `AddUsage` command.
pub const USAGE_PER_ADD_MAX: usize = 1024;

/// How the proposals queued in one turn go into raft entries (`Store`'s `issue_proposals`): in
/// order, an entry takes proposals while it holds at most [`COMMANDS_PER_ENTRY_MAX`] commands
/// and half of [`crate::codec::ENTRY_BYTES_MAX`] of commands by their sizes; a proposal always
/// fits an empty entry. Given each proposal's (commands, bytes), answers how many proposals
/// each entry takes.
pub fn pack_proposals(proposals: impl IntoIterator<Item = (usize, usize)>) -> Vec<usize> {
    let mut entries = Vec::new();
    let (mut taken, mut commands, mut bytes) = (0, 0, 0);
    for (c, s) in proposals {
        if taken > 0 && (bytes + s > crate::codec::ENTRY_BYTES_MAX / 2 || commands + c > COMMANDS_PER_ENTRY_MAX) {
            entries.push(taken);
            (taken, commands, bytes) = (0, 0, 0);
        }
        taken += 1;
        commands += c;
        bytes += s;
    }
    if taken > 0 {
        entries.push(taken);
    }
    entries
}

/// A change to the state machine. Everything a replica needs to apply it deterministically is in
/// the command (clocks are read by the proposer, never by the applier).
#[derive(Clone, Debug, PartialEq, bincode::Encode, bincode::Decode)]
pub enum Command {
    /// Add or update a node (addresses, capacity). Refused if another id has the same raft id.
    RegisterNode(NodeRegistration),
    /// Liveness and load of a node, stamped with the sender's clock.
    Heartbeat { node: NodeId, load: NodeLoad, at_ms: u64 },
    /// Forget a node.
    RemoveNode { node: NodeId },
    /// Mark a node as draining (or not).
    SetNodeDraining { node: NodeId, draining: bool },
    /// Place a room: compare-and-set on the epoch. `expected_epoch: None` means "must not be
    /// placed yet"; on success the epoch becomes `expected + 1` (1 for a new room).
    PlaceRoom {
        room: RoomId,
        expected_epoch: Option<u64>,
        node: NodeId,
    },
    /// Remove a room's placement, if its epoch is still `expected_epoch`.
    DeleteRoom { room: RoomId, expected_epoch: u64 },
    /// Write a batch of viewer states (last one per viewer wins, already coalesced).
    UpsertViewers { viewers: Vec<ViewerState> },
    /// Delete one viewer state.
    DeleteViewer { viewer: ViewerId },
    /// Leader-decided expiry: delete each viewer whose revision is still the given one (a viewer
    /// updated after the leader decided survives).
    ExpireViewers { viewers: Vec<(ViewerId, u64)> },
    /// Rotate the TURN secret (the current one becomes `previous`).
    RotateTurnSecret { secret: String, at_ms: u64 },
    /// Add viewer time to the usage ledger (records for the same day and room add up), then
    /// drop the days before `keep_from_day` (retention, decided by the proposer's clock). Once
    /// per `(node, batch)`: an add at or before the last one applied for `node` is a resend
    /// and changes nothing.
    AddUsage {
        node: NodeId,
        batch: UsageBatch,
        records: Vec<UsageRecord>,
        keep_from_day: String,
    },
    /// Change cluster settings; with `only_if_unset` a no-op when settings exist (bootstrap).
    SetSettings {
        settings: ClusterSettings,
        only_if_unset: bool,
    },
}

impl Command {
    /// Short name for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Command::RegisterNode(_) => "register_node",
            Command::Heartbeat { .. } => "heartbeat",
            Command::RemoveNode { .. } => "remove_node",
            Command::SetNodeDraining { .. } => "set_node_draining",
            Command::PlaceRoom { .. } => "place_room",
            Command::DeleteRoom { .. } => "delete_room",
            Command::UpsertViewers { .. } => "upsert_viewers",
            Command::DeleteViewer { .. } => "delete_viewer",
            Command::ExpireViewers { .. } => "expire_viewers",
            Command::RotateTurnSecret { .. } => "rotate_turn_secret",
            Command::SetSettings { .. } => "set_settings",
            Command::AddUsage { .. } => "add_usage",
        }
    }
}

/// What applying one command produced. Deterministic: equal on every replica.
#[derive(Clone, Debug, PartialEq, bincode::Encode, bincode::Decode)]
pub enum Outcome {
    /// Done, nothing to return.
    Done,
    /// The node record after the command.
    Node(NodeRecord),
    /// The placement after a successful `PlaceRoom`.
    Placed(Placement),
    /// A compare-and-set on an epoch failed; the current placement.
    EpochConflict(Option<Placement>),
    /// The stored viewer states after an upsert, in input order (what leaders of
    /// forwarded-outcome version 1 answer; [`Outcome::Upserted`] replaced it).
    Viewers(Vec<ViewerState>),
    /// Whether something was deleted.
    Deleted(bool),
    /// How many viewers an expiry removed.
    Expired(u64),
    /// TURN secrets after a rotation.
    Turn(TurnSecrets),
    /// The command was refused (reason). Deterministic, so every replica refuses it.
    Rejected(String),
    /// The viewers of an upsert as applied (forwarded-outcome version 2): every state sent was
    /// stored as sent, with `revision` = `index` and `expires_at_ms` = `updated_at_ms` +
    /// `ttl_ms`, except the viewers in `kept`, whose stored state refused the update
    /// ([`ViewerState::accepts`]) and is given instead. See [`Outcome::stored_viewers`].
    Upserted {
        /// Raft index of the entry.
        index: u64,
        /// Viewer TTL in force.
        ttl_ms: u64,
        /// Stored states that refused their update, with the update's position in the
        /// command, in that order.
        kept: Vec<(u32, ViewerState)>,
    },
}

impl Outcome {
    /// The stored state of each viewer `sent` in an upsert, from its outcome (either version),
    /// or `None` when the outcome is not an upsert's.
    pub fn stored_viewers(self, sent: Vec<ViewerState>) -> Option<Vec<ViewerState>> {
        match self {
            Outcome::Viewers(stored) => Some(stored),
            Outcome::Upserted { index, ttl_ms, kept } => {
                let mut kept = kept.into_iter().peekable();
                Some(
                    (0u32..)
                        .zip(sent)
                        .map(|(position, mut v)| {
                            if let Some((_, stored)) = kept.next_if(|(p, _)| *p == position) {
                                return stored;
                            }
                            v.expires_at_ms = v.updated_at_ms.saturating_add(ttl_ms);
                            v.revision = index;
                            v
                        })
                        .collect(),
                )
            }
            _ => None,
        }
    }
}

/// Payload of one normal raft entry: a batch of commands coalesced by one proposer.
/// `(proposer, batch_id)` lets the proposer match the applied entry to its waiting callers.
#[derive(Clone, Debug, PartialEq, bincode::Encode, bincode::Decode)]
pub struct EntryPayload {
    /// Raft id of the replica that proposed the entry.
    pub proposer: u64,
    /// Proposer-local sequence number of the batch.
    pub batch_id: u64,
    /// The commands, applied in order.
    pub commands: Vec<Command>,
}

/// Body of a forwarded proposal (`Propose` RPC).
#[derive(Clone, Debug, PartialEq, bincode::Encode, bincode::Decode)]
pub struct ForwardedCommands {
    /// Commands to propose, in order.
    pub commands: Vec<Command>,
}

/// Envelope version of a leader's [`ForwardedOutcome`]: 2 added [`Outcome::Upserted`].
/// Version-1 bytes still decode (the variants they use are unchanged); a version-1 node cannot
/// read a version-2 answer holding `Upserted`. ([`ForwardedCommands`] did not change: version 1.)
pub const FORWARD_VERSION: u8 = 2;

/// Decodes a leader's answer to a forwarded proposal, of version 1 or 2.
pub fn decode_forwarded_outcome(bytes: &[u8]) -> Result<ForwardedOutcome, crate::codec::DecodeError> {
    crate::codec::decode_versions::<_, { crate::codec::ENTRY_BYTES_MAX }>(bytes, &[1, FORWARD_VERSION])
}

/// Answer to a forwarded proposal.
#[derive(Clone, Debug, PartialEq, bincode::Encode, bincode::Decode)]
pub enum ForwardedOutcome {
    /// Applied; one outcome per command.
    Applied(Vec<Outcome>),
    /// Not applied (no leader here any more, timeout, overload): the message.
    Failed(String),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::ENTRY_BYTES_MAX;

    #[test]
    fn proposals_pack_into_entries_by_commands_and_bytes() {
        assert!(pack_proposals([]).is_empty());
        // Commands: 4096 fit one entry, the next one starts another.
        assert_eq!(pack_proposals([(4000, 10), (96, 10), (1, 10)]), [2, 1]);
        // Bytes: half an entry's limit at most, but a proposal always fits an empty entry.
        let half = ENTRY_BYTES_MAX / 2;
        assert_eq!(pack_proposals([(1, half), (1, 1), (1, half + 1), (1, 1)]), [1, 1, 1, 1]);
        assert_eq!(pack_proposals([(1, half / 2), (1, half / 2), (1, 1)]), [2, 1]);
    }
}
