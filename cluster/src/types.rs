//! Plain domain types of the store. They are bincode-encodable because the state machine persists
//! them (in sled and in snapshots) and serde-serializable so the edge can render them as JSON;
//! they carry no behaviour beyond validation.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ids::{NodeId, RoomId, ViewerId, validate_id};

/// Most subscriptions one viewer state may hold.
pub const SUBSCRIPTIONS_PER_VIEWER_MAX: usize = 64;
/// Most layer choices one viewer state may hold.
pub const LAYERS_PER_VIEWER_MAX: usize = 64;
/// Longest address or URL in a node registration, in bytes.
pub const ADDRESS_BYTES_MAX: usize = 512;
/// Longest TURN secret, in bytes.
pub const TURN_SECRET_BYTES_MAX: usize = 512;

/// How fresh a read must be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Consistency {
    /// Linearizable: confirmed through raft's ReadIndex (a quorum round trip) and waits until
    /// this replica has applied up to the read index. The default.
    Linearizable,
    /// This replica's applied state, possibly stale (by up to the replication lag), never
    /// blocks on the network. Use where staleness is fine (dashboards, hints).
    Local,
}

/// What a node announces about itself when it registers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, bincode::Encode, bincode::Decode)]
pub struct NodeRegistration {
    /// Public id.
    pub id: NodeId,
    /// Region (`seoul`, `busan`, ...).
    pub region: String,
    /// Cluster gRPC address other nodes dial, `host:port`.
    pub cluster_addr: String,
    /// HTTP base URL clients are pointed to.
    pub http_url: String,
    /// Public gRPC URL.
    pub grpc_url: String,
    /// Capacity in abstract units (e.g. max connections).
    pub capacity: u32,
    /// IP the node's media sockets use (empty: not announced).
    pub media_ip: String,
    /// Its media UDP port range, inclusive (`(0, 0)`: not announced).
    pub media_ports: (u16, u16),
    /// Its TURN relay, `host:port` (empty: it runs none).
    pub turn_addr: String,
}

impl NodeRegistration {
    /// Checks lengths and ids.
    pub fn validate(&self) -> Result<(), String> {
        self.id.validate()?;
        validate_id("region", &self.region)?;
        for (what, s) in [
            ("cluster_addr", &self.cluster_addr),
            ("http_url", &self.http_url),
            ("grpc_url", &self.grpc_url),
            ("media_ip", &self.media_ip),
            ("turn_addr", &self.turn_addr),
        ] {
            if s.len() > ADDRESS_BYTES_MAX {
                return Err(format!("{what} is longer than {ADDRESS_BYTES_MAX} bytes"));
            }
        }
        if self.cluster_addr.is_empty() {
            return Err("cluster_addr is empty".into());
        }
        Ok(())
    }
}

/// A node's load as reported in its heartbeat.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, bincode::Encode, bincode::Decode)]
pub struct NodeLoad {
    /// CPU use as a fraction of the node's cores, 0.0..=1.0.
    pub cpu: f32,
    /// Open media connections.
    pub connections: u64,
    /// Rooms hosted.
    pub rooms: u64,
    /// Media sent to viewers, bits per second.
    #[serde(default)]
    pub egress_bps: u64,
}

/// A node as the state machine stores it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, bincode::Encode, bincode::Decode)]
pub struct NodeRecord {
    /// What the node registered.
    pub registration: NodeRegistration,
    /// Its raft id (see [`crate::ids::raft_id_for`]).
    pub raft_id: u64,
    /// Set by a drain: the node takes no new work.
    pub draining: bool,
    /// Load from the last heartbeat.
    pub last_load: Option<NodeLoad>,
    /// Wall clock of the last heartbeat, as stamped by the node that sent it (ms since epoch).
    pub last_heartbeat_ms: u64,
}

/// Liveness of a node as seen by a reader (derived, not replicated).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// Heartbeating.
    Alive,
    /// No heartbeat for longer than the dead-after window.
    Dead,
    /// Being drained (takes precedence over alive).
    Draining,
}

/// Raft role of a node in the membership.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Membership {
    /// Votes.
    Voter,
    /// Receives the log, does not vote (a joining node before promotion).
    Learner,
    /// Registered in the state machine but not (or no longer) in the raft configuration.
    None,
}

/// Where a room lives: exactly one host per epoch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, bincode::Encode, bincode::Decode)]
pub struct Placement {
    /// The room.
    pub room: RoomId,
    /// Its host node.
    pub node: NodeId,
    /// Fencing epoch: changes on every move, compared on every change.
    pub epoch: u64,
}

/// A viewer's resumable playback state (DESIGN.md §8).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, bincode::Encode, bincode::Decode)]
pub struct ViewerState {
    /// Viewer identity.
    pub viewer: ViewerId,
    /// Room watched.
    pub room: RoomId,
    /// Node serving the viewer.
    pub node: NodeId,
    /// The signal session that writes it: unique per session, so a resume gets a new one
    /// (with one more generation). Of two sessions with the same generation (two resumes
    /// that took over the same state) only the one whose write committed first may write.
    pub session: String,
    /// The viewer's display name as the edge chose to keep it (masked unless the operator
    /// turned masking off; never the raw name then). Empty: none.
    #[serde(default)]
    pub display_name: String,
    /// Playback position.
    pub position_ms: u64,
    /// Track ids subscribed to.
    pub subscriptions: Vec<String>,
    /// Simulcast layer choice per track (track id → layer/rid).
    pub layers: BTreeMap<String, String>,
    /// When the state was last written (wall clock of the writing node, ms since epoch). The
    /// store sets it when the update is submitted.
    pub updated_at_ms: u64,
    /// When it expires: `updated_at_ms` + the cluster's viewer TTL, set by the state machine.
    pub expires_at_ms: u64,
    /// Raft index of the write that produced this state (set by the state machine).
    pub revision: u64,
    /// The viewer's session generation: a resume writes with one more than the state it took
    /// over, and the state machine ignores writes of an older generation, so a late write of the
    /// session a viewer left (queued on a node that could not commit, or its final write) never
    /// puts an older state back. Found by the simulator (seed 7).
    #[serde(default)]
    pub generation: u64,
}

impl ViewerState {
    /// Whether a write of `update` may replace this stored state: a newer generation (a
    /// resume took the viewer over), or the same generation from the same session. A write of
    /// an older generation is a late write of a session the viewer left (simulator seed 7); a
    /// write of the same generation from another session is a resume that lost the claim to
    /// another resume of the same state (seed 30). Both leave the owner's state.
    pub fn accepts(&self, update: &ViewerState) -> bool {
        update.generation > self.generation || (update.generation == self.generation && update.session == self.session)
    }

    /// Checks ids and limits.
    pub fn validate(&self) -> Result<(), String> {
        self.viewer.validate()?;
        self.room.validate()?;
        self.node.validate()?;
        validate_id("session", &self.session)?;
        if self.display_name.len() > DISPLAY_NAME_BYTES_MAX || self.display_name.chars().any(char::is_control) {
            return Err(format!(
                "display name must be at most {DISPLAY_NAME_BYTES_MAX} bytes without control characters"
            ));
        }
        if self.subscriptions.len() > SUBSCRIPTIONS_PER_VIEWER_MAX {
            return Err(format!("more than {SUBSCRIPTIONS_PER_VIEWER_MAX} subscriptions"));
        }
        if self.layers.len() > LAYERS_PER_VIEWER_MAX {
            return Err(format!("more than {LAYERS_PER_VIEWER_MAX} layer choices"));
        }
        for s in &self.subscriptions {
            validate_id("subscription", s)?;
        }
        for (track, layer) in &self.layers {
            validate_id("layer track", track)?;
            validate_id("layer", layer)?;
        }
        Ok(())
    }
}

/// Longest display name kept in a viewer state.
pub const DISPLAY_NAME_BYTES_MAX: usize = 256;

/// Viewer time of one room on one day (the usage ledger). Days are civil dates in the
/// operator's accounting zone (KST for mediamesh), chosen by the proposer: the state machine
/// only adds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, bincode::Encode, bincode::Decode)]
pub struct UsageRecord {
    /// `YYYY-MM-DD`.
    pub day: String,
    /// The room.
    pub room: RoomId,
    /// Viewer milliseconds.
    pub viewer_ms: u64,
    /// Viewer sessions that had time in the room that day.
    pub sessions: u64,
}

impl UsageRecord {
    /// Checks the day's shape and the room id.
    pub fn validate(&self) -> Result<(), String> {
        self.room.validate()?;
        validate_day(&self.day)
    }

    /// The record's key in the ledger: day first, so one day's records are adjacent.
    pub fn key(&self) -> String {
        format!("{}/{}", self.day, self.room.as_str())
    }
}

/// Which flush of which node process a usage add is part of: `run` is the process's start
/// (ms since the Unix epoch), `seq` its flush number, `part` the command's place in that flush
/// (a flush of more than [`crate::command::USAGE_PER_ADD_MAX`] records is several commands of
/// one entry). Ordered field by field: the state machine applies a node's add only when it is
/// past the last one applied, so a flush sent again after an unknown outcome counts once.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    bincode::Encode,
    bincode::Decode,
)]
pub struct UsageBatch {
    /// The proposing process's start.
    pub run: u64,
    /// Its flush number (from 1).
    pub seq: u64,
    /// The command's place in the flush.
    pub part: u32,
}

/// `YYYY-MM-DD` with a plausible month and day (the edge checks real calendar dates).
pub fn validate_day(day: &str) -> Result<(), String> {
    let b = day.as_bytes();
    let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
    let shaped = b.len() == 10 && b[4] == b'-' && b[7] == b'-' && digits(0..4) && digits(5..7) && digits(8..10);
    let month = day.get(5..7).and_then(|m| m.parse::<u8>().ok()).unwrap_or(0);
    let dom = day.get(8..10).and_then(|d| d.parse::<u8>().ok()).unwrap_or(0);
    if shaped && (1..=12).contains(&month) && (1..=31).contains(&dom) {
        Ok(())
    } else {
        Err(format!("day {day:.16?} is not YYYY-MM-DD"))
    }
}

/// The shared TURN REST secret, with the previous one kept so credentials minted just before a
/// rotation stay valid.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, bincode::Encode, bincode::Decode)]
pub struct TurnSecrets {
    /// Secret new credentials are signed with.
    pub current: String,
    /// Secret before the last rotation.
    pub previous: Option<String>,
    /// When `current` became current (ms since epoch, proposer's clock).
    pub rotated_at_ms: u64,
}

impl std::fmt::Debug for TurnSecrets {
    // Secrets never reach a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TurnSecrets")
            .field("current", &"<redacted>")
            .field("previous", &self.previous.as_ref().map(|_| "<redacted>"))
            .field("rotated_at_ms", &self.rotated_at_ms)
            .finish()
    }
}

/// Cluster-wide settings, replicated.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, bincode::Encode, bincode::Decode)]
pub struct ClusterSettings {
    /// A viewer state expires this long after its last update.
    pub viewer_ttl_ms: u64,
}

/// One node in [`ClusterStatus`].
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct NodeStatus {
    /// Public id.
    pub id: NodeId,
    /// Raft id.
    pub raft_id: u64,
    /// Region.
    pub region: String,
    /// Cluster address.
    pub cluster_addr: String,
    /// HTTP URL.
    pub http_url: String,
    /// gRPC URL.
    pub grpc_url: String,
    /// Capacity.
    pub capacity: u32,
    /// Media IP (empty: not announced).
    pub media_ip: String,
    /// Media UDP port range (`(0, 0)`: not announced).
    pub media_ports: (u16, u16),
    /// TURN relay `host:port` (empty: none).
    pub turn_addr: String,
    /// Alive, dead or draining (derived from the last heartbeat and the reader's clock).
    pub state: NodeState,
    /// Voter, learner, or not in the raft configuration.
    pub membership: Membership,
    /// Last reported load.
    pub last_load: Option<NodeLoad>,
    /// Last heartbeat (ms since epoch).
    pub last_heartbeat_ms: u64,
}

/// This replica's view of the cluster, for the admin API.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ClusterStatus {
    /// This node.
    pub node_id: NodeId,
    /// Its raft id.
    pub raft_id: u64,
    /// The leader this replica knows of.
    pub leader: Option<NodeId>,
    /// The leader's raft id (0: none).
    pub leader_raft_id: u64,
    /// Current raft term.
    pub term: u64,
    /// Raft commit index.
    pub commit_index: u64,
    /// Index the state machine has applied.
    pub applied_index: u64,
    /// Index of the last snapshot: the log is compacted up to here.
    pub snapshot_index: u64,
    /// `leader`, `follower`, `candidate`, `precandidate`.
    pub role: String,
    /// Registered nodes.
    pub nodes: Vec<NodeStatus>,
    /// Hex SHA-256 of the applied state machine contents (equal on replicas at equal applied
    /// index).
    pub digest: String,
    /// Rooms placed.
    pub rooms: u64,
    /// Viewer states held.
    pub viewers: u64,
}
